"""intake's rules: taking a report (上报) once, and following the incident as its reporter sees it.

- **Who reports as whom.** A grid worker (网格员) reports as themselves (source ``grid_worker``), a sensor as
  itself (``sensor``); the operations center's hotline desk reports 12345 calls (``hotline_12345``) for the
  caller, recorded as the desk acting on the caller's behalf; an Open311 application reports for a citizen. An
  administrator may report on any channel.
- **A report is taken once.** The client chooses a ``client_report_id``: a retry under it (same reporter, same
  category, place and words) changes nothing and is answered with the incident it made. A different report under
  the same id is refused (409), and so is anyone but its sender retrying it, without saying which incident it is.
- **The case number** is the day and 48 random bits; one drawn already is drawn again, a few times at most.
- **The reporter's view.** Every lifecycle event is folded into the incident: its status after the event
  (``schemas.STATUS_AFTER``), never stepped back by an event that occurred before the one that set it (two
  producers' records of one incident can cross on their way to the log) and never moved off a final status
  (``schemas.INCIDENT_FINAL``) but to another final one; its grid, departments, deadline, overdue and escalation
  marks; and a line in its timeline.

Pure: no database, no unit of work; the rows are plain dataclasses whose fields are the tables' columns.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from pydantic import HttpUrl

from schemas import INCIDENT_FINAL, STATUS_AFTER, Actor, ActorKind, Event, IncidentStatus, Location, fields_from, row_of
from schemas import events as ev


@dataclass
class Incident:
    """An incident as its reporter follows it (a row of ``intake_incident``)."""

    incident_id: str
    client_report_id: str
    reporter_id: str
    submitted_by: str | None
    """Who sent the report (``<actor kind>:<id>``), the only one who may retry it; None on a report taken by an
    earlier version (its reporter may retry it)."""
    source: str
    category_code: str
    lat: float
    lon: float
    address: str
    description: str
    photo_urls: str
    severity: str
    handled_on_spot: bool
    evidence_urls: str
    status: str
    status_at: datetime | None
    """When the event that set ``status`` occurred."""
    grid_id: str | None
    departments: str
    deadline: datetime | None
    overdue: bool
    escalated: bool
    rework_count: int
    reported_at: datetime
    updated_at: datetime
    closed_at: datetime | None


@dataclass
class Transition:
    """One line of an incident's timeline (a row of ``intake_transition``; ``id`` is the database's)."""

    id: int | None
    incident_id: str
    event_id: str
    type: str
    occurred_at: datetime
    actor_kind: str
    actor_id: str
    on_behalf_of: str | None
    detail: str


class Report(Protocol):
    """A report as a client sends it (``models.ReportCreate``)."""

    source: ev.Source
    reporter_id: str
    client_report_id: str
    category_code: str
    lat: float
    lon: float
    address: str
    description: str
    photo_urls: list[HttpUrl]
    severity: ev.Severity
    handled_on_spot: bool
    evidence_urls: list[HttpUrl]


# -- who reports as whom -------------------------------------------------------------------------------------------

REPORTER_KIND = {
    ev.Source.GRID_WORKER: ActorKind.GRID_WORKER,
    ev.Source.HOTLINE_12345: ActorKind.CITIZEN,
    ev.Source.OPEN311: ActorKind.CITIZEN,
    ev.Source.SENSOR: ActorKind.SENSOR,
}
"""Who the reporter of a channel is."""

_OWN_SOURCE = {ActorKind.GRID_WORKER: ev.Source.GRID_WORKER, ActorKind.SENSOR: ev.Source.SENSOR}


def reporting_refusal(report: Report, by: Actor) -> str | None:
    """Why ``by`` may not send ``report`` (None: it may). Grid workers and sensors report as themselves; the hotline
    desk for 12345 callers; Open311 applications (for citizens) and administrators on any channel."""
    own = _OWN_SOURCE.get(by.kind)
    if own is not None:
        if report.source is not own or report.reporter_id != by.id:
            return f"a {by.kind.value} reports as itself: source {own.value}, reporter_id {by.id}"
    elif by.kind is ActorKind.OPS_CENTER and report.source is not ev.Source.HOTLINE_12345:
        return "the operations center reports 12345 hotline calls (source hotline_12345)"
    return None


def reporting_actor(report: Report, caller: Actor | None) -> Actor:
    """Who is recorded as reporting: the caller (by default the reporter itself), on the reporter's behalf when it
    reports for another (the hotline desk for a caller)."""
    return (caller or Actor(kind=REPORTER_KIND[report.source], id=report.reporter_id)).on_behalf(report.reporter_id)


def sender(actor: Actor) -> str:
    """Who sent a report, as kept with it: only they may retry it."""
    return f"{actor.kind.value}:{actor.id}"


def sent_by(incident: Incident) -> str:
    """Who sent a stored report; one taken by an earlier version (which did not keep it) by its reporter."""
    return incident.submitted_by or f"{REPORTER_KIND[ev.Source(incident.source)].value}:{incident.reporter_id}"


# -- a report taken once -------------------------------------------------------------------------------------------

ID_DRAWS = 5
"""How many case numbers a report tries before giving up (each one taken already)."""


def new_incident_id(now: datetime) -> str:
    """The case number: the day and 48 random bits (``GL20261125-3F2A9C1B07D4``). Two reports drawing the same
    number is unlikely (about one in 560 for a day of a million reports), and a report draws again when it
    happens."""
    return f"GL{now:%Y%m%d}-{secrets.token_hex(6).upper()}"


def report_incident(report: Report, by: Actor, now: datetime) -> ev.IncidentReported:
    """The report as an event under a newly drawn case number (the incident's correlation id too)."""
    incident_id = new_incident_id(now)
    return ev.IncidentReported(
        **fields_from(ev.IncidentReported, report),
        incident_id=incident_id,
        occurred_at=now,
        actor=by,
        correlation_id=incident_id,
        location=Location(lat=report.lat, lon=report.lon, address=report.address),
    )


def incident_of(event: ev.IncidentReported) -> Incident:
    """The incident a report makes: reported, in no grid or department yet."""
    return row_of(
        Incident,
        event,
        submitted_by=sender(event.actor),
        source=event.source.value,
        photo_urls=" ".join(str(u) for u in event.photo_urls),
        severity=event.severity.value,
        evidence_urls=" ".join(str(u) for u in event.evidence_urls),
        status=IncidentStatus.REPORTED.value,
        status_at=event.occurred_at,
        grid_id=None,
        departments="",
        deadline=None,
        overdue=False,
        escalated=False,
        rework_count=0,
        reported_at=event.occurred_at,
        updated_at=event.occurred_at,
        closed_at=None,
    )


def same_report(incident: Incident, report: Report) -> bool:
    """Whether ``report`` says what the stored one says (a retry), to the coordinates' sixth decimal."""
    return (incident.category_code, round(incident.lat, 6), round(incident.lon, 6), incident.description) == (
        report.category_code,
        round(report.lat, 6),
        round(report.lon, 6),
        report.description,
    )


def retry_refusal(existing: Incident, report: Report, by: Actor) -> str | None:
    """Why a report whose client_report_id ``existing`` holds already is not a retry of it (None: it is, and is
    answered with ``existing``): someone else sent it, or it differs. Which incident that is, is not said to
    another caller."""
    if sent_by(existing) != sender(by):
        return (
            f"client_report_id {report.client_report_id!r} of reporter {report.reporter_id!r} was used by another "
            "caller; only whoever sent a report may retry it: report under a new client_report_id"
        )
    if not same_report(existing, report):
        return (
            f"client_report_id {report.client_report_id!r} was already used by {report.reporter_id!r} "
            f"for another report ({existing.incident_id})"
        )
    return None


# -- the reporter's view of the lifecycle --------------------------------------------------------------------------


def arrived_late(event: Event, incident: Incident) -> bool:
    """Whether ``event`` occurred before the one that set the incident's status (it arrived late: two producers'
    records of one incident can cross on their way to the lifecycle log)."""
    return incident.status_at is not None and event.occurred_at < incident.status_at


def fold(incident: Incident, event: Event) -> Transition:
    """Fold one lifecycle event into ``incident`` (changed in place); returns its line of the timeline."""
    status = STATUS_AFTER.get(event.type)
    if status is not None and (
        status in INCIDENT_FINAL or (incident.status not in INCIDENT_FINAL and not arrived_late(event, incident))
    ):
        incident.status, incident.status_at = status.value, event.occurred_at
    match event:
        case ev.IncidentFiled(grid_id=grid):
            incident.grid_id = grid
        case ev.WorkOrderDispatched(department_code=dept, deadline=deadline):
            depts = [d for d in incident.departments.split() if d]
            if dept not in depts:
                depts.append(dept)
            incident.departments = " ".join(depts)
            incident.deadline = max(deadline, incident.deadline) if incident.deadline else deadline
            incident.overdue = False
        case ev.IncidentReworked(deadline=deadline, rework_count=n):
            incident.deadline, incident.rework_count, incident.overdue = deadline, n, False
        case ev.ExtensionGranted(new_deadline=deadline):
            incident.deadline, incident.overdue = deadline, False
        case ev.OverdueReminded():
            incident.overdue = True
        case ev.IncidentEscalated():
            incident.escalated = True
        case ev.IncidentClosed():
            incident.closed_at = event.occurred_at
    incident.updated_at = max(incident.updated_at, event.occurred_at)
    return Transition(
        id=None,
        incident_id=event.incident_id,
        event_id=event.event_id,
        type=event.type,
        occurred_at=event.occurred_at,
        actor_kind=event.actor.kind.value,
        actor_id=event.actor.id,
        on_behalf_of=event.actor.on_behalf_of,
        detail=detail(event)[:2000],
    )


def departments_of(incident: Incident) -> list[str]:
    """The departments the incident was dispatched to, in order."""
    return [d for d in incident.departments.split() if d]


def detail(event: Event) -> str:
    """What a step of the timeline says (staff's words among it: the public never reads it)."""
    match event:
        case ev.IncidentRejected(reason=reason):
            return reason
        case ev.IncidentMerged(into_incident_id=into, distance_m=d):
            return f"merged into {into} ({d:.0f} m away)"
        case ev.IncidentFiled(grid_id=grid, priority=p, big=big):
            return f"filed in grid {grid}, priority {p}" + (", all-network linkage (大事全网联动)" if big else "")
        case ev.WorkOrderDispatched(department_code=dept, deadline=deadline, role=role):
            return f"dispatched to {dept} ({role.value}), due {deadline.isoformat()}"
        case ev.WorkOrderReturned(department_code=dept, reason=reason):
            return f"returned by {dept}: {reason}"
        case ev.ExtensionRequested(department_code=dept, requested_deadline=d, reason=reason):
            return f"{dept} asks until {d.isoformat()}: {reason}"
        case ev.WorkOrderAccepted(department_code=dept):
            return f"accepted by {dept}"
        case ev.ExtensionGranted(department_code=dept, new_deadline=d):
            return f"{dept}: extension granted until {d.isoformat()}"
        case ev.ExtensionRefused(department_code=dept, reason=reason):
            return f"{dept}: extension refused: {reason}"
        case ev.WorkOrderHandled(department_code=dept, result=result):
            return f"{dept}: {result}"
        case ev.VerificationRequested(worker_id=worker):
            return f"verification by {worker}"
        case ev.VerificationPassed(note=note) | ev.VerificationFailed(note=note):
            return note
        case ev.IncidentReworked(department_code=dept, note=note):
            return f"back to {dept}: {note}"
        case ev.OverdueReminded(department_code=dept, overdue_s=s):
            return f"{dept} overdue by {s:.0f} s (催办)"
        case ev.IncidentEscalated(reason=reason, department_code=dept):
            return f"escalated to the operations center (督办){' from ' + dept if dept else ''}: {reason}"
        case ev.IncidentClosed(on_time=on_time):
            return "closed on time" if on_time else "closed late"
    return ""


__all__ = [
    "ID_DRAWS",
    "REPORTER_KIND",
    "Incident",
    "Report",
    "Transition",
    "arrived_late",
    "departments_of",
    "detail",
    "fold",
    "incident_of",
    "new_incident_id",
    "report_incident",
    "reporting_actor",
    "reporting_refusal",
    "retry_refusal",
    "same_report",
    "sender",
    "sent_by",
]
