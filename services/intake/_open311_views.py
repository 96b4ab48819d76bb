"""What the Open311 reading endpoints show of intake's incidents and their timelines: what the public reads.

Only the fields GeoReport v2 lists (and the FixMyStreet update fields) leave this module: never who reported an
incident, nor who acted on it. Which incidents and which of their words the public reads is decided in
``services.common.visibility``: an incident of a public category is a service request whatever channel reported
it (grid worker, 12345 hotline, sensor or Open311); one of any other category is absent from every listing and
unknown by id. A request shows the reporter's description, address and photo only when a citizen posted it
through Open311; of any other it shows the service's name in place of the description. ``status_notes`` and an
update's description are fixed phrases of the status or step, never the words of staff (return reasons,
handling results, verification notes, escalations).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from schemas import INCIDENT_FINAL, IncidentStatus, Town
from services.common import visibility
from services.common.db import UnitOfWork

from . import _open311_catalog as catalog
from ._open311_wire import w3c
from .domain import Incident, Transition, departments_of
from .store import LIMIT, IntakeStore

CLOSED = INCIDENT_FINAL
"""gridloop's final statuses: Open311 "closed". Every other status is "open"."""

LABELS = {
    "IncidentReported": "已上报 reported",
    "IncidentFiled": "已立案 filed",
    "IncidentRejected": "不予立案 rejected",
    "IncidentMerged": "已合并 merged",
    "WorkOrderDispatched": "已派遣 dispatched",
    "WorkOrderAccepted": "已签收 accepted",
    "WorkOrderReturned": "已退回 returned",
    "ExtensionRequested": "申请延期 extension requested",
    "ExtensionGranted": "同意延期 extension granted",
    "ExtensionRefused": "不同意延期 extension refused",
    "WorkOrderHandled": "已处置 handled",
    "VerificationRequested": "待核查 verification requested",
    "VerificationPassed": "核查通过 verified",
    "VerificationFailed": "核查未通过 verification failed",
    "IncidentReworked": "返工 rework",
    "OverdueReminded": "催办 overdue reminder",
    "IncidentEscalated": "督办 escalated",
    "IncidentClosed": "已结案 closed",
}

STATUS_NOTES = {
    "reported": LABELS["IncidentReported"],
    "filed": LABELS["IncidentFiled"],
    "rejected": LABELS["IncidentRejected"],
    "merged": f"{LABELS['IncidentMerged']}: 与附近已受理的诉求重复 a duplicate of a request nearby",
    "dispatched": LABELS["WorkOrderDispatched"],
    "in_progress": LABELS["WorkOrderAccepted"],
    "returned": LABELS["WorkOrderReturned"],
    "handled": LABELS["WorkOrderHandled"],
    "verifying": LABELS["VerificationRequested"],
    "rework": LABELS["IncidentReworked"],
    "closed": LABELS["IncidentClosed"],
}
"""A request's ``status_notes``: a fixed phrase per gridloop status, the label of the step that set it."""
OUTSIDE_GRIDS = "位置不在本镇网格内 the location lies outside every grid of the town"

UPDATE_STATUS = {
    "IncidentReported": "open",
    "IncidentFiled": "investigating",
    "WorkOrderDispatched": "action_scheduled",
    "WorkOrderAccepted": "in_progress",
    "WorkOrderReturned": "internal_referral",
    "WorkOrderHandled": "in_progress",
    "VerificationRequested": "in_progress",
    "VerificationFailed": "in_progress",
    "IncidentReworked": "in_progress",
    "IncidentClosed": "fixed",
    "IncidentRejected": "no_further_action",
    "IncidentMerged": "duplicate",
}
"""The FixMyStreet status after each transition; the others (reminders, extensions, …) leave it as it was."""
_FINAL_UPDATE = frozenset({"fixed", "no_further_action", "duplicate"})


def public_status(status: str) -> str:
    return "closed" if status in CLOSED else "open"


def transition_text(t: Transition) -> str:
    """An update's description: the step's label, never its detail (which may be the words of staff)."""
    return LABELS.get(t.type, t.type)


def status_note(row: Incident, town: Town) -> str:
    """Why a request is as it is, in a fixed phrase; a rejection outside the town's grid cells says so (gridloop's
    own finding from the request's public coordinates, not anyone's words)."""
    note = STATUS_NOTES.get(row.status, row.status)
    if row.status == IncidentStatus.REJECTED and town.grid_at(row.lat, row.lon) is None:
        return f"{note}: {OUTSIDE_GRIDS}"
    return note


def _request(row: Incident, town: Town) -> dict[str, Any]:
    words = visibility.public_words(row.source)
    photos = row.photo_urls.split() if words else []
    updated = row.closed_at if row.status == IncidentStatus.CLOSED and row.closed_at else row.updated_at
    return {
        "service_request_id": row.incident_id,
        "status": public_status(row.status),
        "status_notes": status_note(row, town),
        "service_name": catalog.service_name(row.category_code, town),
        "service_code": row.category_code,
        "description": row.description if words else catalog.service_name(row.category_code, town),
        "agency_responsible": catalog.agency(departments_of(row), town),
        "service_notice": catalog.service_notice(row.category_code, town),
        "requested_datetime": w3c(row.reported_at),
        "updated_datetime": w3c(updated),
        "expected_datetime": w3c(row.deadline),
        "address": (row.address or None) if words else None,
        "address_id": None,
        "zipcode": None,
        "lat": row.lat,
        "long": row.lon,
        "media_url": photos[0] if photos else None,
    }


def _public_row(service_request_id: str, town: Town, uow: UnitOfWork) -> Incident | None:
    row = IntakeStore(uow).incident(service_request_id)
    return row if row is not None and visibility.publicly_listed(row.category_code, town.public_categories) else None


def known(service_request_id: str, town: Town, uow: UnitOfWork) -> bool:
    """Whether the public knows this request (a token stands for it): it exists and its category is public."""
    return _public_row(service_request_id, town, uow) is not None


def request_by_id(service_request_id: str, town: Town, uow: UnitOfWork) -> dict[str, Any] | None:
    """The request, or None when there is none the public may read (unknown and not public alike)."""
    row = _public_row(service_request_id, town, uow)
    return _request(row, town) if row is not None else None


def requests_by_ids(ids: Sequence[str], town: Town, uow: UnitOfWork) -> list[dict[str, Any]]:
    """The requests of these ids the public may read (the first :data:`LIMIT`), newest first."""
    return [_request(r, town) for r in IntakeStore(uow).public_incidents(ids, town.public_categories)]


def requests_matching(
    codes: Sequence[str], statuses: set[str], start: datetime, end: datetime | None, town: Town, uow: UnitOfWork
) -> list[dict[str, Any]]:
    """Requests made from ``start`` to ``end`` (inclusive), newest first, at most :data:`LIMIT`."""
    closed = True if statuses == {"closed"} else False if statuses == {"open"} else None
    rows = IntakeStore(uow).public_incidents_matching(codes, closed, start, end, town.public_categories)
    return [_request(r, town) for r in rows]


def updates(start: datetime, end: datetime | None, town: Town, uow: UnitOfWork) -> list[dict[str, Any]]:
    """One update per timeline transition from ``start`` to ``end``, oldest first, at most :data:`LIMIT`.

    The status is FixMyStreet's (open, investigating, action_scheduled, in_progress, internal_referral, fixed,
    no_further_action, duplicate), found by following each incident's timeline from its report."""
    store = IntakeStore(uow)
    wanted = store.public_transitions(start, end, town.public_categories)
    if not wanted:
        return []
    ids = [t.incident_id for t in wanted]
    media = {
        incident_id: next(iter(photos.split()), None) if visibility.public_words(source) else None
        for incident_id, (photos, source) in store.photos_and_sources(ids).items()
    }
    status_after: dict[str, str] = {}
    running: dict[str, str] = {}
    for t in store.timelines(ids, until=max(t.occurred_at for t in wanted)):
        now = running.get(t.incident_id, "open")
        new = UPDATE_STATUS.get(t.type, now)
        if now not in _FINAL_UPDATE or new in _FINAL_UPDATE:
            now = new
        running[t.incident_id] = status_after[t.event_id] = now
    return [
        {
            "update_id": t.event_id,
            "service_request_id": t.incident_id,
            "status": status_after.get(t.event_id, "open"),
            "updated_datetime": w3c(t.occurred_at),
            "description": transition_text(t),
            "media_url": media.get(t.incident_id) if t.type == "IncidentReported" else None,
        }
        for t in wanted
    ]


__all__ = [
    "CLOSED",
    "LABELS",
    "LIMIT",
    "STATUS_NOTES",
    "UPDATE_STATUS",
    "known",
    "public_status",
    "request_by_id",
    "requests_by_ids",
    "requests_matching",
    "status_note",
    "transition_text",
    "updates",
]
