"""The operations center's fold: every lifecycle event updates the read model once (idempotent on event id).

Order across incidents does not matter. One incident's events are keyed by its id, so each producer's copies
arrive in order; across producers they may not (a retried send lands later), so an event that comes before the
one it follows is parked and folded right after it. Folding the log from offset 0 gives the same read model.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import col, select

from schemas import Event, decode_event, encode_event
from schemas import events as ev
from schemas.reference import grid_at
from services.common.db import Record, UnitOfWork, as_utc

from .models import OpsFact, OpsIncident, OpsParked, OpsWorkOrder

_OPEN_STATUS = {
    "IncidentFiled": "filed",
    "WorkOrderDispatched": "dispatched",
    "WorkOrderAccepted": "in_progress",
    "WorkOrderHandled": "handled",
    "VerificationRequested": "verifying",
    "IncidentReworked": "rework",
}
_FINAL = ("closed", "rejected", "merged")


def _seconds(later: datetime, earlier: datetime | None) -> float | None:
    return (later - as_utc(earlier)).total_seconds() if earlier else None


def fold_event(event: Event, uow: UnitOfWork) -> list[tuple[str, float]]:
    """Apply one lifecycle event. Returns the stage durations it completes, as (stage, seconds)."""
    stages: list[tuple[str, float]] = []
    incident = uow.record(OpsIncident, event.incident_id)
    if incident is None:
        if not isinstance(event, ev.IncidentReported):
            _park(event, uow)  # ahead of its report (another producer's copy): folded when the report comes
            return stages
        grid = grid_at(event.location.lat, event.location.lon)
        incident = uow.insert(
            OpsIncident,
            incident_id=event.incident_id,
            source=event.source.value,
            category_code=event.category_code,
            grid_id=grid.code if grid else None,
            lat=event.location.lat,
            lon=event.location.lon,
            address=event.location.address,
            status="reported",
            handled_on_spot=event.handled_on_spot,
            reported_at=event.occurred_at,
        )

    order: Record | None = None
    work_order_id = getattr(event, "work_order_id", None)
    if work_order_id and not isinstance(event, ev.WorkOrderDispatched):
        order = uow.record(OpsWorkOrder, work_order_id)
        if order is None and isinstance(event, _NEEDS_ORDER):
            _park(event, uow)  # ahead of its dispatch: folded when the work order is known
            return stages

    if incident.status not in _FINAL and event.type in _OPEN_STATUS:
        incident.status = _OPEN_STATUS[event.type]

    match event:
        case ev.IncidentFiled(grid_id=grid_id, big=big):
            incident.grid_id, incident.big, incident.filed_at = grid_id, big, event.occurred_at
        case ev.IncidentRejected():
            incident.status, incident.rejected_at = "rejected", event.occurred_at
        case ev.IncidentMerged():
            incident.status, incident.merged_at = "merged", event.occurred_at
        case ev.WorkOrderDispatched():
            if uow.record(OpsWorkOrder, event.work_order_id) is None:
                uow.insert(
                    OpsWorkOrder,
                    work_order_id=event.work_order_id,
                    incident_id=event.incident_id,
                    department_code=event.department_code,
                    category_code=event.category_code,
                    grid_id=event.grid_id,
                    status="dispatched",
                    deadline=event.deadline,
                    dispatched_at=event.occurred_at,
                )
                depts = incident.departments.split()
                if event.department_code not in depts:
                    incident.departments = " ".join([*depts, event.department_code])
                incident.deadline = (
                    max(event.deadline, as_utc(incident.deadline)) if incident.deadline else event.deadline
                )
        case ev.WorkOrderAccepted() if order is not None:
            order.status = "accepted"
            if order.accepted_at is None:
                order.accepted_at = event.occurred_at
                if (t := _seconds(event.occurred_at, order.dispatched_at)) is not None:
                    stages.append(("accept", t))
        case ev.WorkOrderReturned() if order is not None:
            order.status, order.returned_at = "returned", event.occurred_at
            incident.return_count += 1
        case ev.WorkOrderHandled() if order is not None:
            order.status = "handled"
            if order.handled_at is None:
                order.handled_at = event.occurred_at
                if (t := _seconds(event.occurred_at, order.dispatched_at)) is not None:
                    stages.append(("handle", t))
        case ev.IncidentReworked() if order is not None:
            order.status, order.deadline = "rework", event.deadline
            order.reminded = order.escalated = False
            incident.rework_count = max(incident.rework_count, event.rework_count)
            incident.deadline = max(event.deadline, as_utc(incident.deadline)) if incident.deadline else event.deadline
        case ev.ExtensionGranted() if order is not None:
            order.deadline = event.new_deadline
            order.reminded = order.escalated = False
            incident.deadline = (
                max(event.new_deadline, as_utc(incident.deadline)) if incident.deadline else event.new_deadline
            )
        case ev.OverdueReminded() if order is not None:
            order.reminded = True
        case ev.IncidentEscalated():
            incident.escalated = True
            if order is not None:
                order.escalated = True
        case ev.VerificationRequested():
            incident.verifying_since = event.occurred_at
        case ev.VerificationPassed() | ev.VerificationFailed():
            if (t := _seconds(event.occurred_at, incident.verifying_since)) is not None:
                stages.append(("verify", t))
        case ev.IncidentClosed():
            incident.status, incident.closed_at, incident.on_time = "closed", event.occurred_at, event.on_time
            incident.deadline = event.deadline
            incident.rework_count = event.rework_count
            for o in uow.records_by(OpsWorkOrder, "incident_id", incident.incident_id):
                if o.status == "handled":
                    o.status = "closed"
            if (t := _seconds(event.occurred_at, incident.reported_at)) is not None:
                stages.append(("close", t))
        case _:
            pass

    department = getattr(event, "department_code", None)
    uow.append(
        OpsFact,
        event_id=event.event_id,
        type=event.type,
        incident_id=event.incident_id,
        occurred_at=event.occurred_at,
        category_code=incident.category_code,
        grid_id=incident.grid_id,
        department_code=department,
        work_order_id=work_order_id,
    )
    if isinstance(event, ev.IncidentReported):
        stages += _unpark(uow, "incident_id", event.incident_id)
    elif isinstance(event, ev.WorkOrderDispatched):
        stages += _unpark(uow, "work_order_id", event.work_order_id)
    return stages


_MAY_BE_PARKED = "opscenter.may_be_parked"
"""In the unit's info: False once a batch's preload found no parked event it could release (the usual case),
so the fold skips looking; parking one sets it again."""


def preload(events: Sequence[Event], uow: UnitOfWork) -> None:
    """A batch's incidents and work orders read in two queries rather than two per event, and whether any
    parked event waits for one of them."""
    incident_ids = {e.incident_id for e in events}
    order_ids = {w for e in events if (w := getattr(e, "work_order_id", None))}
    uow.fetch(OpsIncident, incident_ids)
    uow.fetch(OpsWorkOrder, order_ids)
    # a closure closes the incident's handled work orders: all of them, read at once
    uow.fetch_by(OpsWorkOrder, "incident_id", (e.incident_id for e in events if isinstance(e, ev.IncidentClosed)))
    p = OpsParked.__table__.c  # type: ignore[attr-defined]
    waiting = uow.connection.execute(
        sa.select(p.event_id).where(sa.or_(p.incident_id.in_(incident_ids), p.work_order_id.in_(order_ids))).limit(1)
    ).first()
    uow.info[_MAY_BE_PARKED] = waiting is not None


_NEEDS_ORDER = (
    ev.WorkOrderAccepted,
    ev.WorkOrderReturned,
    ev.WorkOrderHandled,
    ev.IncidentReworked,
    ev.ExtensionGranted,
    ev.OverdueReminded,
)
"""Events that change a work order and mean nothing without it."""


def _park(event: Event, uow: UnitOfWork) -> None:
    uow.info[_MAY_BE_PARKED] = True
    s = uow.session
    if s.get(OpsParked, event.event_id) is None:
        s.add(
            OpsParked(
                event_id=event.event_id,
                incident_id=event.incident_id,
                work_order_id=getattr(event, "work_order_id", None),
                occurred_at=event.occurred_at,
                payload=encode_event(event),
            )
        )


def _unpark(uow: UnitOfWork, column: str, key: str) -> list[tuple[str, float]]:
    """Fold the events that waited for the one just folded (those whose ``column`` holds ``key``), oldest first
    (one may park again, waiting for something else still: a work order's events wait for its dispatch after
    the report came)."""
    stages: list[tuple[str, float]] = []
    if not uow.info.get(_MAY_BE_PARKED, True):
        return stages
    s = uow.session
    condition = getattr(OpsParked, column) == key
    waiting = list(s.exec(select(OpsParked.event_id).where(condition).order_by(col(OpsParked.occurred_at))))
    for event_id in waiting:
        parked = s.get(OpsParked, event_id)
        if parked is None:
            continue  # folded meanwhile, by an event folded before it in this loop
        s.delete(parked)
        s.flush()
        stages += fold_event(decode_event(parked.payload), uow)
    return stages
