"""intake's rules: take a report once (idempotent on the client's report id), follow the incident's lifecycle."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, or_, select

from schemas import Actor, ActorKind, Event, Location
from schemas import events as ev
from services.common import visibility
from services.common.auth import Principal, Role
from services.common.db import Record, UnitOfWork, as_utc, insert_unless_taken
from services.common.errors import Forbidden, Rejected, Unavailable, UnknownIncident

from .models import IncidentPublic, IntakeIncident, IntakeTransition, ReportAccepted, ReportCreate, TransitionPublic

_REPORTER_KIND = {
    ev.Source.GRID_WORKER: ActorKind.GRID_WORKER,
    ev.Source.HOTLINE_12345: ActorKind.CITIZEN,
    ev.Source.OPEN311: ActorKind.CITIZEN,
    ev.Source.SENSOR: ActorKind.SENSOR,
}

_STATUS_AFTER: dict[str, str] = {
    "IncidentReported": "reported",
    "IncidentFiled": "filed",
    "IncidentRejected": "rejected",
    "IncidentMerged": "merged",
    "WorkOrderDispatched": "dispatched",
    "WorkOrderAccepted": "in_progress",
    "WorkOrderReturned": "returned",
    "WorkOrderHandled": "handled",
    "VerificationRequested": "verifying",
    "VerificationFailed": "rework",
    "IncidentReworked": "rework",
    "IncidentClosed": "closed",
}
_FINAL = {"closed", "rejected", "merged"}


def new_incident_id(now: datetime) -> str:
    """The case number: the day and 48 random bits (``GL20261125-3F2A9C1B07D4``). Two reports drawing the same
    number is unlikely (about one in 560 for a day of a million reports), and :func:`report_incident` draws again
    when it happens."""
    return f"GL{now:%Y%m%d}-{secrets.token_hex(6).upper()}"


_ID_DRAWS = 5
"""How many case numbers a report tries before giving up (each one taken already)."""


def _same_report(row: IntakeIncident, cmd: ReportCreate) -> bool:
    return (row.category_code, round(row.lat, 6), round(row.lon, 6), row.description) == (
        cmd.category_code,
        round(cmd.lat, 6),
        round(cmd.lon, 6),
        cmd.description,
    )


_INCIDENTS: sa.Table = IntakeIncident.__table__  # type: ignore[attr-defined]
_REPORTED_AS = sa.select(_INCIDENTS.c.incident_id).where(
    _INCIDENTS.c.reporter_id == sa.bindparam("reporter"), _INCIDENTS.c.client_report_id == sa.bindparam("report")
)
"""Which incident a client's report id already names, built once: every report asks, and almost always none."""


def _sender(actor: Actor) -> str:
    """Who sent a report, as kept with it: only they may retry it."""
    return f"{actor.kind.value}:{actor.id}"


def _sent_by(row: IntakeIncident) -> str:
    """Who sent a stored report; one taken by an earlier version (which did not keep it) by its reporter."""
    return row.submitted_by or f"{_REPORTER_KIND[ev.Source(row.source)].value}:{row.reporter_id}"


def _find_report(uow: UnitOfWork, reporter_id: str, client_report_id: str) -> IntakeIncident | None:
    incident_id = uow.connection.execute(_REPORTED_AS, {"reporter": reporter_id, "report": client_report_id}).scalar()
    return None if incident_id is None else uow.session.get(IntakeIncident, incident_id)


_OWN_SOURCE = {Role.GRID_WORKER: ev.Source.GRID_WORKER, Role.SENSOR: ev.Source.SENSOR}


def check_reporter(cmd: ReportCreate, who: Principal) -> None:
    """Grid workers and sensors report as themselves; the hotline desk for 12345 callers; Open311 via its gateway."""
    own = _OWN_SOURCE.get(who.role)
    if own is not None:
        if cmd.source is not own or cmd.reporter_id != who.subject:
            raise Forbidden(f"a {who.role.value} reports as itself: source {own.value}, reporter_id {who.subject}")
    elif who.role is Role.OPS_CENTER and cmd.source is not ev.Source.HOTLINE_12345:
        raise Forbidden("the operations center reports 12345 hotline calls (source hotline_12345)")


def _visible(row: IntakeIncident, who: Principal) -> bool:
    if who.sees_everything:
        return True
    if who.role is Role.DEPARTMENT:
        return who.department in row.departments.split()
    if who.role is Role.GRID_WORKER:
        return row.reporter_id == who.subject or row.grid_id in who.grids
    return row.reporter_id == who.subject


def report_incident(cmd: ReportCreate, uow: UnitOfWork, actor: Actor | None = None) -> ReportAccepted:
    """Record a report and queue IncidentReported; a retry with the same client report id changes nothing.

    ``actor`` is the caller (by default the reporter): one reporting for another reporter (the hotline desk for a
    caller) is recorded as itself on the reporter's behalf. Only whoever sent a report may retry it: the same
    client report id of the same reporter from anyone else is refused, never answered with that report.

    The new incident is inserted first, unless a row holds its client report id or its case number already
    (``ON CONFLICT DO NOTHING``): a report, nearly always new, costs one statement, not a lookup and an insert. An
    insert that took nothing is a retry (answered with its incident) or a case number drawn twice (drawn again).
    Two intake instances that take the same client report id at once serialize on the unique index: the second
    inserts nothing and finds the first's incident."""
    now = uow.now()
    by = (actor or Actor(kind=_REPORTER_KIND[cmd.source], id=cmd.reporter_id)).on_behalf(cmd.reporter_id)
    insert = insert_unless_taken(_INCIDENTS, uow.engine.dialect.name)
    for _ in range(_ID_DRAWS):
        incident_id = new_incident_id(now)
        event = ev.IncidentReported(
            incident_id=incident_id,
            occurred_at=now,
            actor=by,
            correlation_id=incident_id,
            source=cmd.source,
            category_code=cmd.category_code,
            location=Location(lat=cmd.lat, lon=cmd.lon, address=cmd.address),
            description=cmd.description,
            photo_urls=cmd.photo_urls,
            reporter_id=cmd.reporter_id,
            client_report_id=cmd.client_report_id,
            severity=cmd.severity,
            handled_on_spot=cmd.handled_on_spot,
            evidence_urls=cmd.evidence_urls,
        )
        if not uow.connection.execute(insert, _report_values(event)).rowcount:
            existing = _find_report(uow, cmd.reporter_id, cmd.client_report_id)
            if existing is not None:
                return _duplicate(existing, cmd, by)
            continue  # the case number was taken by another report: draw another
        uow.emit(event)
        uow.commit()
        return ReportAccepted(incident_id=incident_id, status="reported")
    raise Unavailable(f"no free case number in {_ID_DRAWS} draws; retry")


def _duplicate(existing: IntakeIncident, cmd: ReportCreate, by: Actor) -> ReportAccepted:
    """The answer to a report whose client_report_id is already taken: its incident, or 409 if it differs or
    someone else sent it (which incident that is, is not said)."""
    if _sent_by(existing) != _sender(by):
        raise Rejected(
            f"client_report_id {cmd.client_report_id!r} of reporter {cmd.reporter_id!r} was used by another caller; "
            "only whoever sent a report may retry it: report under a new client_report_id"
        )
    if not _same_report(existing, cmd):
        raise Rejected(
            f"client_report_id {cmd.client_report_id!r} was already used by {cmd.reporter_id!r} "
            f"for another report ({existing.incident_id})"
        )
    return ReportAccepted(incident_id=existing.incident_id, status=existing.status, duplicate=True)


def _report_values(event: ev.IncidentReported) -> dict[str, Any]:
    """A new incident's columns (the others take their defaults)."""
    return dict(
        incident_id=event.incident_id,
        client_report_id=event.client_report_id,
        reporter_id=event.reporter_id,
        submitted_by=_sender(event.actor),
        source=event.source.value,
        category_code=event.category_code,
        lat=event.location.lat,
        lon=event.location.lon,
        address=event.location.address,
        description=event.description,
        photo_urls=" ".join(str(u) for u in event.photo_urls),
        severity=event.severity.value,
        handled_on_spot=event.handled_on_spot,
        evidence_urls=" ".join(str(u) for u in event.evidence_urls),
        status="reported",
        status_at=event.occurred_at,
        reported_at=event.occurred_at,
        updated_at=event.occurred_at,
    )


def _detail(event: Event) -> str:
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


def _before_status(event: Event, row: Record) -> bool:
    """Whether ``event`` occurred before the one that set the incident's status (it arrived late: two producers'
    records of one incident can cross on their way to the lifecycle log)."""
    return row.status_at is not None and event.occurred_at < as_utc(row.status_at)


def record_transition(event: Event, uow: UnitOfWork) -> None:
    """Fold one lifecycle event into the incident's status and timeline."""
    row = uow.record(IntakeIncident, event.incident_id)
    if row is None:
        if not isinstance(event, ev.IncidentReported):
            raise UnknownIncident(f"{event.type} for unknown incident {event.incident_id}")
        row = uow.insert(IntakeIncident, **_report_values(event))
    status = _STATUS_AFTER.get(event.type)
    if status and (status in _FINAL or (row.status not in _FINAL and not _before_status(event, row))):
        row.status, row.status_at = status, event.occurred_at
    match event:
        case ev.IncidentFiled(grid_id=grid):
            row.grid_id = grid
        case ev.WorkOrderDispatched(department_code=dept, deadline=deadline):
            depts = [d for d in row.departments.split() if d]
            if dept not in depts:
                depts.append(dept)
            row.departments = " ".join(depts)
            row.deadline = max(deadline, as_utc(row.deadline)) if row.deadline else deadline
            row.overdue = False
        case ev.IncidentReworked(deadline=deadline, rework_count=n):
            row.deadline, row.rework_count, row.overdue = deadline, n, False
        case ev.ExtensionGranted(new_deadline=deadline):
            row.deadline, row.overdue = deadline, False
        case ev.OverdueReminded():
            row.overdue = True
        case ev.IncidentEscalated():
            row.escalated = True
        case ev.IncidentClosed():
            row.closed_at = event.occurred_at
    row.updated_at = max(as_utc(row.updated_at), event.occurred_at)
    uow.append(
        IntakeTransition,
        incident_id=event.incident_id,
        event_id=event.event_id,
        type=event.type,
        occurred_at=event.occurred_at,
        actor_kind=event.actor.kind.value,
        actor_id=event.actor.id,
        on_behalf_of=event.actor.on_behalf_of,
        detail=_detail(event)[:2000],
    )


def preload(events: Sequence[Event], uow: UnitOfWork) -> None:
    """A batch's incidents in one query rather than one per event."""
    uow.fetch(IntakeIncident, (e.incident_id for e in events))


def get_incident(incident_id: str, uow: UnitOfWork, who: Principal | None = None) -> IncidentPublic:
    """The incident as ``who`` may see it (services.common.visibility): unknown when it is not theirs to see, a
    citizen reporter's contact withheld from anyone but the operations center. Without ``who``, all of it."""
    row = uow.session.get(IntakeIncident, incident_id)
    if row is None or (who is not None and not _visible(row, who)):
        raise visibility.unseen("incident", incident_id)
    timeline = uow.session.exec(
        select(IntakeTransition)
        .where(IntakeTransition.incident_id == incident_id)
        .order_by(col(IntakeTransition.occurred_at), col(IntakeTransition.id))
    ).all()
    reporter = row.reporter_id if who is None else visibility.reporter(who, row.source, row.reporter_id)
    return IncidentPublic(
        incident_id=row.incident_id,
        status=row.status,
        source=row.source,
        category_code=row.category_code,
        lat=row.lat,
        lon=row.lon,
        address=row.address,
        description=row.description,
        severity=row.severity,
        reporter_id=reporter,
        handled_on_spot=row.handled_on_spot,
        grid_id=row.grid_id,
        departments=[d for d in row.departments.split() if d],
        deadline=as_utc(row.deadline) if row.deadline else None,
        overdue=row.overdue,
        escalated=row.escalated,
        rework_count=row.rework_count,
        reported_at=as_utc(row.reported_at),
        updated_at=as_utc(row.updated_at),
        closed_at=as_utc(row.closed_at) if row.closed_at else None,
        timeline=[
            TransitionPublic(
                event_id=t.event_id,
                type=t.type,
                occurred_at=as_utc(t.occurred_at),
                actor_kind=t.actor_kind,
                actor_id=t.actor_id if who is None else visibility.actor(who, t.actor_kind, t.actor_id),
                on_behalf_of=t.on_behalf_of if t.on_behalf_of != row.reporter_id else reporter,
                detail=t.detail,
            )
            for t in timeline
        ],
    )


def list_incidents(
    uow: UnitOfWork, status: str | None, limit: int, offset: int, who: Principal | None = None
) -> list[IntakeIncident]:
    q = select(IntakeIncident).order_by(col(IntakeIncident.reported_at).desc())
    if status:
        q = q.where(IntakeIncident.status == status)
    if who is not None and not who.sees_everything:
        if who.role is Role.DEPARTMENT:
            q = q.where(col(IntakeIncident.departments).contains(who.department or "?"))
        elif who.role is Role.GRID_WORKER:
            q = q.where(or_(col(IntakeIncident.reporter_id) == who.subject, col(IntakeIncident.grid_id).in_(who.grids)))
        else:
            q = q.where(IntakeIncident.reporter_id == who.subject)
    rows = uow.session.exec(q.offset(offset).limit(limit)).all()
    return [r for r in rows if who is None or _visible(r, who)]


HANDLERS = {cls: record_transition for cls in ev.EVENT_TYPES.values()}
