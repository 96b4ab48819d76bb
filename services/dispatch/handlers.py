"""dispatch's rules, as plain functions ``verb_noun(event, uow, policy)``.

立案: a report is filed only if its category is known and it lies inside a grid; a report of the same category
close to an open case is merged into it. 派遣: the category's lead department gets a work order with a deadline;
a big incident (by category or a major-severity flag) engages every listed department at once, the operations
center coordinating (大事全网联动). A returned order goes to the next candidate; after repeated returns the
operations center takes it. When every live order is handled the grid worker verifies; pass closes the case,
fail sends the work back (返工). The watchdog reminds (催办) overdue orders and later escalates them (督办).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from schemas import LATEST, RANGE, Actor, Event, Location, aware_utc
from schemas import events as ev
from schemas.reference import CATEGORIES, GRIDS, OPS_CENTER, Category, distance_m, grid_at
from services.common.db import Record, UnitOfWork, as_utc
from services.common.errors import NotFound, Rejected, UnknownIncident

from .models import CasePublic, CaseStatus, DispatchCase, DispatchWorkOrder, OrderStatus, WorkOrderPublic
from .settings import DispatchSettings

_M_PER_DEGREE = 111_195.0
"""Metres per degree of latitude (and of longitude at the equator) on the sphere ``distance_m`` uses."""

DISPATCH = Actor.system("dispatch")
WATCHDOG = Actor.system("dispatch-watchdog")


# -- helpers ------------------------------------------------------------------------------------------


def preload(events: Sequence[Event], uow: UnitOfWork) -> None:
    """A batch's cases and work orders read in three queries, rather than several per event."""
    incident_ids = {e.incident_id for e in events}
    uow.fetch(DispatchCase, incident_ids)
    uow.fetch(DispatchWorkOrder, (w for e in events if (w := getattr(e, "work_order_id", None))))
    uow.fetch_by(DispatchWorkOrder, "incident_id", incident_ids)


def _case(uow: UnitOfWork, incident_id: str) -> Record:
    case = uow.record(DispatchCase, incident_id)
    if case is None:
        raise UnknownIncident(f"no case for incident {incident_id}")
    return case


def _order(uow: UnitOfWork, work_order_id: str, incident_id: str) -> Record:
    order = uow.record(DispatchWorkOrder, work_order_id)
    if order is None or order.incident_id != incident_id:
        raise UnknownIncident(f"no work order {work_order_id} for incident {incident_id}")
    return order


def _orders(uow: UnitOfWork, incident_id: str) -> list[Record]:
    """The case's work orders, oldest first (read once per unit of work: a handler may ask twice)."""
    orders = uow.records_by(DispatchWorkOrder, "incident_id", incident_id)
    return sorted(orders, key=lambda o: (as_utc(o.dispatched_at), o.work_order_id))


def _urls(text: str) -> list[Any]:
    return [u for u in text.split() if u]


def _dispatch(
    uow: UnitOfWork, case: Record, cause: Event, department: str, role: ev.WorkOrderRole, attempt: int
) -> None:
    category = CATEGORIES[case.category_code]
    now = uow.now()
    order = uow.insert(
        DispatchWorkOrder,
        work_order_id=f"{case.incident_id}-{len(_orders(uow, case.incident_id)) + 1}",
        incident_id=case.incident_id,
        department_code=department,
        role=role.value,
        attempt=attempt,
        status=OrderStatus.DISPATCHED,
        deadline=uow.due_in(category.deadline_hours),
        dispatched_at=now,
    )
    case.status = CaseStatus.DISPATCHED
    uow.emit(
        ev.WorkOrderDispatched.following(
            cause,
            DISPATCH,
            occurred_at=now,
            work_order_id=order.work_order_id,
            department_code=department,
            role=role,
            coordinator=OPS_CENTER if case.big else None,
            category_code=case.category_code,
            grid_id=case.grid_id,
            location=Location(lat=case.lat, lon=case.lon, address=case.address),
            description=case.description,
            photo_urls=_urls(case.photo_urls),
            priority=case.priority,
            deadline=order.deadline,
            attempt=attempt,
        )
    )


def _verifier(case: Record, handled_by: list[str]) -> str:
    """The grid's worker who verifies: one who neither reported the incident nor did the work (a fix on the spot
    is never asked of the worker who made it). Every grid of the town has two workers, so there is one."""
    workers = GRIDS[case.grid_id].workers if case.grid_id else ()
    others = [w for w in workers if w != case.reporter_id and w not in handled_by]
    return (others or list(workers) or [case.reporter_id])[0]


def _request_verification(uow: UnitOfWork, case: Record, cause: Event, evidence: list[Any]) -> None:
    case.status = CaseStatus.VERIFYING
    case.verification_round += 1
    assert case.grid_id is not None
    handled = [o for o in _orders(uow, case.incident_id) if o.status == OrderStatus.HANDLED]
    handled_by = [case.reporter_id] if case.handled_on_spot else []
    for person in (p for o in handled for p in (o.handled_by or "").split()):
        if person not in handled_by:
            handled_by.append(person)
    uow.emit(
        ev.VerificationRequested.following(
            cause,
            DISPATCH,
            occurred_at=uow.now(),
            verification_id=f"{case.incident_id}-v{case.verification_round}",
            grid_id=case.grid_id,
            worker_id=_verifier(case, handled_by),
            category_code=case.category_code,
            location=Location(lat=case.lat, lon=case.lon, address=case.address),
            description=case.description,
            work_order_ids=[o.work_order_id for o in handled],
            evidence_urls=evidence[:10],
            round=case.verification_round,
            reporter_id=case.reporter_id,
            handled_by=handled_by[:20],
        )
    )


def _reject(uow: UnitOfWork, case: Record, cause: Event, code: ev.RejectReason, reason: str) -> None:
    case.status = CaseStatus.REJECTED
    case.closed_at = uow.now()
    uow.emit(ev.IncidentRejected.following(cause, DISPATCH, occurred_at=uow.now(), reason_code=code, reason=reason))


_CASES: sa.Table = DispatchCase.__table__  # type: ignore[attr-defined]
_ORDERS: sa.Table = DispatchWorkOrder.__table__  # type: ignore[attr-defined]

_CANDIDATES = sa.select(_CASES).where(
    _CASES.c.category_code == sa.bindparam("category"),
    _CASES.c.status.in_(CaseStatus.OPEN),
    _CASES.c.reported_at >= sa.bindparam("since"),
    _CASES.c.lat.between(sa.bindparam("south"), sa.bindparam("north")),
    _CASES.c.lon.between(sa.bindparam("west"), sa.bindparam("east")),
)
"""Open cases of a category reported since a time, inside a box (built once: it runs for every report)."""


def _find_duplicate(
    uow: UnitOfWork, report: ev.IncidentReported, policy: DispatchSettings
) -> tuple[Record, float] | None:
    since = uow.business_hours_ago(policy.merge_window_hours)
    # only cases inside a box around the report (a little larger than the merge distance) are loaded and measured
    lat, lon = report.location.lat, report.location.lon
    dlat = policy.merge_distance_m * 1.01 / _M_PER_DEGREE
    dlon = dlat / max(math.cos(math.radians(lat)), 0.01)
    box = {"south": lat - dlat, "north": lat + dlat, "west": lon - dlon, "east": lon + dlon}
    # what this batch changed so far is written at the commit: the cases still to be written are looked at in
    # memory, and every candidate is checked again as it stands in memory now
    stored = uow.records_where(DispatchCase, _CANDIDATES, {"category": report.category_code, "since": since, **box})
    pending = uow.inserted(DispatchCase)
    best: tuple[Record, float] | None = None
    for case in {id(c): c for c in (*stored, *pending)}.values():
        if (
            case.incident_id == report.incident_id
            or case.category_code != report.category_code
            or case.status not in CaseStatus.OPEN
            or as_utc(case.reported_at) < since
            or not (box["south"] <= case.lat <= box["north"] and box["west"] <= case.lon <= box["east"])
        ):
            continue
        d = distance_m(case.lat, case.lon, report.location.lat, report.location.lon)
        if d <= policy.merge_distance_m and (best is None or d < best[1]):
            best = (case, d)
    return best


# -- 立案 / 派遣 ------------------------------------------------------------------------------------------


def file_incident(report: ev.IncidentReported, uow: UnitOfWork, policy: DispatchSettings) -> None:
    """立案: reject, merge or file a report; a filed one is dispatched, or verified at once if fixed on the spot."""
    if uow.record(DispatchCase, report.incident_id) is not None:
        return  # the same incident re-reported under another event id: already decided
    loc = report.location
    category: Category | None = CATEGORIES.get(report.category_code)
    grid = grid_at(loc.lat, loc.lon)
    case = uow.insert(
        DispatchCase,
        incident_id=report.incident_id,
        correlation_id=report.correlation_id,
        status=CaseStatus.FILED,
        category_code=report.category_code,
        grid_id=grid.code if grid else None,
        lat=loc.lat,
        lon=loc.lon,
        address=loc.address,
        description=report.description,
        photo_urls=" ".join(str(u) for u in report.photo_urls),
        evidence_urls=" ".join(str(u) for u in report.evidence_urls),
        reporter_id=report.reporter_id,
        severity=report.severity.value,
        priority=category.priority if category else 5,
        big=bool(category and (category.big or report.severity is ev.Severity.MAJOR)),
        handled_on_spot=report.handled_on_spot,
        reported_at=report.occurred_at,
    )
    uow.none_by(DispatchWorkOrder, "incident_id", case.incident_id)  # a case not there before has no orders
    if category is None:
        _reject(
            uow,
            case,
            report,
            ev.RejectReason.UNKNOWN_CATEGORY,
            f"unknown category {report.category_code!r}; known: {', '.join(sorted(CATEGORIES))}",
        )
        return
    if grid is None:
        _reject(
            uow,
            case,
            report,
            ev.RejectReason.OUTSIDE_GRIDS,
            f"location {loc.lat:.5f},{loc.lon:.5f} lies outside every grid of the town",
        )
        return
    if not report.handled_on_spot and (dup := _find_duplicate(uow, report, policy)):
        into, distance = dup
        case.status, case.merged_into, case.closed_at = CaseStatus.MERGED, into.incident_id, uow.now()
        into.duplicates += 1
        uow.emit(
            ev.IncidentMerged.following(
                report,
                DISPATCH,
                occurred_at=uow.now(),
                into_incident_id=into.incident_id,
                distance_m=round(distance, 1),
                category_code=report.category_code,
            )
        )
        return

    case.filed_at = uow.now()
    uow.emit(
        ev.IncidentFiled.following(
            report,
            DISPATCH,
            occurred_at=uow.now(),
            category_code=category.code,
            grid_id=grid.code,
            priority=category.priority,
            severity=report.severity,
            big=case.big,
            handled_on_spot=report.handled_on_spot,
        )
    )
    if report.handled_on_spot:
        _request_verification(uow, case, report, list(report.evidence_urls))
        return
    if case.big:
        for i, dept in enumerate(category.departments):
            _dispatch(uow, case, report, dept, ev.WorkOrderRole.LEAD if i == 0 else ev.WorkOrderRole.SUPPORT, 1)
    else:
        _dispatch(uow, case, report, category.lead, ev.WorkOrderRole.LEAD, 1)


def reroute_work_order(returned: ev.WorkOrderReturned, uow: UnitOfWork, policy: DispatchSettings) -> None:
    """退回: the next candidate department takes the work; after repeated returns, the operations center."""
    case = _case(uow, returned.incident_id)
    order = _order(uow, returned.work_order_id, returned.incident_id)
    if order.status not in OrderStatus.ACTIVE:
        raise UnknownIncident(f"work order {order.work_order_id} is {order.status}; a return is not expected")
    order.status = OrderStatus.RETURNED
    case.return_count += 1
    tried = {o.department_code for o in _orders(uow, case.incident_id)}
    category = CATEGORIES[case.category_code]
    role = ev.WorkOrderRole(order.role)
    candidates = [d for d in category.departments if d not in tried]
    if case.return_count >= policy.max_returns or not candidates:
        reason = (
            f"returned {case.return_count} times"
            if case.return_count >= policy.max_returns
            else "no other department can take it"
        )
        if OPS_CENTER in {o.department_code for o in _orders(uow, case.incident_id) if o.status in OrderStatus.LIVE}:
            return  # the operations center already holds this case
        uow.emit(
            ev.IncidentEscalated.following(
                returned,
                DISPATCH,
                occurred_at=uow.now(),
                reason_code=ev.EscalationReason.REPEATED_RETURNS if candidates else ev.EscalationReason.NO_DEPARTMENT,
                reason=f"{reason}; last: {returned.department_code}: {returned.reason}"[:1000],
                work_order_id=order.work_order_id,
                department_code=order.department_code,
            )
        )
        _dispatch(uow, case, returned, OPS_CENTER, role, order.attempt + 1)
        return
    _dispatch(uow, case, returned, candidates[0], role, order.attempt + 1)


def record_acceptance(accepted: ev.WorkOrderAccepted, uow: UnitOfWork, policy: DispatchSettings) -> None:
    order = _order(uow, accepted.work_order_id, accepted.incident_id)
    if order.status == OrderStatus.DISPATCHED:
        order.status, order.accepted_at = OrderStatus.ACCEPTED, accepted.occurred_at


def record_extension_request(req: ev.ExtensionRequested, uow: UnitOfWork, policy: DispatchSettings) -> None:
    order = _order(uow, req.work_order_id, req.incident_id)
    order.extension_requested_until, order.extension_reason = req.requested_deadline, req.reason


def request_verification(handled: ev.WorkOrderHandled, uow: UnitOfWork, policy: DispatchSettings) -> None:
    """处置 done: once every live work order of the case is handled, the grid worker verifies (核查)."""
    case = _case(uow, handled.incident_id)
    order = _order(uow, handled.work_order_id, handled.incident_id)
    if order.status not in OrderStatus.ACTIVE:
        raise UnknownIncident(f"work order {order.work_order_id} is {order.status}; handling is not expected")
    order.status, order.handled_at = OrderStatus.HANDLED, handled.occurred_at
    order.handled_by = " ".join(p for p in (handled.actor.id, handled.actor.on_behalf_of) if p)
    order.extension_requested_until, order.extension_reason = None, ""  # a pending request lapses
    if any(o.status in OrderStatus.ACTIVE for o in _orders(uow, case.incident_id)):
        return  # a big incident waits for every department
    _request_verification(uow, case, handled, list(handled.evidence_urls))


def close_incident(passed: ev.VerificationPassed, uow: UnitOfWork, policy: DispatchSettings) -> None:
    """核查 passed → 结案. On time when closed by the latest deadline of its work orders."""
    case = _case(uow, passed.incident_id)
    if case.status != CaseStatus.VERIFYING:
        raise UnknownIncident(f"incident {case.incident_id} is {case.status}; not awaiting verification")
    now = uow.now()
    orders = _orders(uow, case.incident_id)
    deadline = max((as_utc(o.deadline) for o in orders), default=None)
    if deadline is not None and deadline > LATEST:  # granted before the range was checked, still in the database
        deadline = LATEST
    for o in orders:
        if o.status == OrderStatus.HANDLED:
            o.status = OrderStatus.CLOSED
    case.status, case.closed_at = CaseStatus.CLOSED, now
    uow.emit(
        ev.IncidentClosed.following(
            passed,
            DISPATCH,
            occurred_at=now,
            category_code=case.category_code,
            grid_id=case.grid_id,
            departments=sorted({o.department_code for o in orders if o.status == OrderStatus.CLOSED}),
            reported_at=as_utc(case.reported_at),
            deadline=deadline,
            on_time=deadline is None or now <= deadline,
            rework_count=case.rework_count,
            return_count=case.return_count,
            handled_on_spot=case.handled_on_spot,
        )
    )


def rework_incident(failed: ev.VerificationFailed, uow: UnitOfWork, policy: DispatchSettings) -> None:
    """核查 failed → 返工: the same department(s) get the work back with the worker's note and a new deadline."""
    case = _case(uow, failed.incident_id)
    if case.status != CaseStatus.VERIFYING:
        raise UnknownIncident(f"incident {case.incident_id} is {case.status}; not awaiting verification")
    case.rework_count += 1
    handled = [o for o in _orders(uow, case.incident_id) if o.status == OrderStatus.HANDLED]
    category = CATEGORIES[case.category_code]
    if not handled:  # fixed on the spot but not well enough: the lead department takes it properly
        _dispatch(uow, case, failed, category.lead, ev.WorkOrderRole.LEAD, 1)
        return
    case.status = CaseStatus.DISPATCHED
    for order in handled:
        order.status = OrderStatus.REWORK
        order.deadline = uow.due_in(category.deadline_hours)
        order.reminded_at = order.escalated_at = None
        uow.emit(
            ev.IncidentReworked.following(
                failed,
                DISPATCH,
                occurred_at=uow.now(),
                work_order_id=order.work_order_id,
                department_code=order.department_code,
                rework_count=case.rework_count,
                note=failed.note,
                deadline=order.deadline,
            )
        )


# -- commands from the operations center ------------------------------------------------------------------


def decide_extension(
    work_order_id: str, grant: bool, new_deadline: datetime | None, reason: str, actor: Actor, uow: UnitOfWork
) -> Event:
    """延期: the operations center grants (to the asked or a given deadline) or refuses a department's request."""
    order = uow.record(DispatchWorkOrder, work_order_id)
    if order is None:
        raise NotFound(f"no work order {work_order_id}")
    if order.extension_requested_until is None:
        raise Rejected(f"work order {work_order_id} has no pending extension request")
    if order.status not in OrderStatus.ACTIVE:
        raise Rejected(f"work order {work_order_id} is {order.status}; nothing to extend")
    case = _case(uow, order.incident_id)
    common: dict[str, Any] = dict(
        incident_id=order.incident_id,
        actor=actor,
        correlation_id=case.correlation_id,
        occurred_at=uow.now(),
        work_order_id=work_order_id,
        department_code=order.department_code,
    )
    event: Event
    if grant:
        deadline = new_deadline or as_utc(order.extension_requested_until)
        try:
            deadline = aware_utc(deadline)
        except ValueError:  # asked for before the range was checked, still in the database
            asked = " as asked for: grant with a new_deadline" if new_deadline is None else ""
            raise Rejected(f"new deadline {deadline.isoformat()} is not {RANGE}{asked}") from None
        if deadline <= as_utc(order.deadline):
            current = as_utc(order.deadline).isoformat()
            raise Rejected(f"new deadline {deadline.isoformat()} is not later than {current}")
        order.deadline, order.reminded_at, order.escalated_at = deadline, None, None
        event = ev.ExtensionGranted(**common, new_deadline=deadline)
    else:
        event = ev.ExtensionRefused(**common, reason=reason)
    order.extension_requested_until, order.extension_reason = None, ""
    uow.emit(event)
    uow.commit()
    return event


# -- watchdog (催办 / 督办) -----------------------------------------------------------------------------------


def _take_step(uow: UnitOfWork, order: Record, column: str, now: datetime) -> bool:
    """Compare-and-set ``column`` (reminded_at / escalated_at) of a late order as the watchdog saw it.

    Two dispatch instances over one database both run the watchdog: of two that saw the same late order, only the
    one whose UPDATE changed the row emits the event. The row must still be active, unmarked and due by the deadline
    read, so a rework or extension committed meanwhile (new deadline, marks cleared) is not reminded stale."""
    result = uow.connection.execute(
        sa.update(DispatchWorkOrder)
        .where(
            col(DispatchWorkOrder.work_order_id) == order.work_order_id,
            col(getattr(DispatchWorkOrder, column)).is_(None),
            col(DispatchWorkOrder.status).in_(OrderStatus.ACTIVE),
            col(DispatchWorkOrder.deadline) == order.deadline,
        )
        .values({column: now})
    )
    return bool(result.rowcount == 1)


_LATE = (
    sa.select(_ORDERS)
    .where(
        _ORDERS.c.status.in_(OrderStatus.ACTIVE),
        _ORDERS.c.deadline < sa.bindparam("now"),
        _ORDERS.c.escalated_at.is_(None),
    )
    .limit(500)
)


def watch_deadlines(uow: UnitOfWork, policy: DispatchSettings) -> int:
    """Remind every active work order past its deadline once, escalate it once when far past. Returns events."""
    now = uow.now()
    late = uow.records_where(DispatchWorkOrder, _LATE, {"now": now})
    emitted = 0
    escalate_after = uow.business_hours(policy.escalate_after_hours)
    for order in late:
        case = _case(uow, order.incident_id)
        deadline = as_utc(order.deadline)
        common: dict[str, Any] = dict(
            incident_id=order.incident_id,
            correlation_id=case.correlation_id,
            occurred_at=now,
            work_order_id=order.work_order_id,
            department_code=order.department_code,
        )
        if order.reminded_at is None and _take_step(uow, order, "reminded_at", now):
            uow.emit(
                ev.OverdueReminded(
                    **common, actor=WATCHDOG, deadline=deadline, overdue_s=(now - deadline).total_seconds()
                )
            )
            emitted += 1
        if now - deadline >= escalate_after and _take_step(uow, order, "escalated_at", now):
            uow.emit(
                ev.IncidentEscalated(
                    **common,
                    actor=WATCHDOG,
                    reason_code=ev.EscalationReason.OVERDUE,
                    reason=f"{order.department_code} is {(now - deadline).total_seconds():.0f} s past its deadline",
                )
            )
            emitted += 1
    uow.commit()
    return emitted


# -- queries --------------------------------------------------------------------------------------------


def _order_public(o: Record, now: datetime) -> WorkOrderPublic:
    return WorkOrderPublic(
        work_order_id=o.work_order_id,
        incident_id=o.incident_id,
        department_code=o.department_code,
        role=o.role,
        attempt=o.attempt,
        status=o.status,
        deadline=as_utc(o.deadline),
        dispatched_at=as_utc(o.dispatched_at),
        overdue=o.status in OrderStatus.ACTIVE and as_utc(o.deadline) < now,
        reminded=o.reminded_at is not None,
        escalated=o.escalated_at is not None,
        extension_requested_until=as_utc(o.extension_requested_until) if o.extension_requested_until else None,
        extension_reason=o.extension_reason,
    )


def get_case(incident_id: str, uow: UnitOfWork) -> CasePublic:
    case = uow.record(DispatchCase, incident_id)
    if case is None:
        raise NotFound(f"no case for incident {incident_id}")
    now = uow.now()
    return CasePublic(
        incident_id=case.incident_id,
        status=case.status,
        category_code=case.category_code,
        grid_id=case.grid_id,
        priority=case.priority,
        big=case.big,
        handled_on_spot=case.handled_on_spot,
        merged_into=case.merged_into,
        duplicates=case.duplicates,
        return_count=case.return_count,
        rework_count=case.rework_count,
        reported_at=as_utc(case.reported_at),
        closed_at=as_utc(case.closed_at) if case.closed_at else None,
        work_orders=[_order_public(o, now) for o in _orders(uow, incident_id)],
    )


_PENDING_EXTENSIONS = sa.select(_ORDERS).where(_ORDERS.c.extension_requested_until.is_not(None))


def pending_extensions(uow: UnitOfWork) -> list[WorkOrderPublic]:
    now = uow.now()
    rows = uow.records_where(DispatchWorkOrder, _PENDING_EXTENSIONS)
    return [_order_public(o, now) for o in rows]


def bind(policy: DispatchSettings) -> Mapping[type[Event], Callable[[Any, UnitOfWork], None]]:
    rules: dict[type[Event], Callable[..., None]] = {
        ev.IncidentReported: file_incident,
        ev.WorkOrderReturned: reroute_work_order,
        ev.WorkOrderAccepted: record_acceptance,
        ev.ExtensionRequested: record_extension_request,
        ev.WorkOrderHandled: request_verification,
        ev.VerificationPassed: close_incident,
        ev.VerificationFailed: rework_incident,
    }
    return {etype: functools.partial(fn, policy=policy) for etype, fn in rules.items()}
