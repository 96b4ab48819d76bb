"""dispatch's rules (指挥中心), pure: a case and its work orders, the report or feedback, the town, the policy and
the moment in; the changed state, the new work orders and the events out.

- 立案: a report is filed only if its category is known and it lies inside a grid (else 不予立案, rejected). A report
  of the same category close to an open case reported recently is merged into it (not for a fix on the spot).
- 派遣: the category's lead department gets a work order with the category's deadline; a big incident (by category
  or a major-severity flag) engages every listed department at once, the operations center coordinating
  (大事全网联动). A report fixed on the spot (自行处置) goes straight to 核查.
- 退回: a returned order goes to the next candidate department; after repeated returns, or with no candidate left,
  the operations center takes it (escalated).
- 延期: a department asks for a later deadline; the operations center grants it (to the asked or a given deadline,
  later than the current one) or refuses it. Handling the order lets a pending request lapse.
- 核查: when every live work order of the case is handled, a grid worker of the case's grid verifies, one who
  neither reported the incident nor did the work.
- 结案 when the check passes (on time if by the latest deadline of its orders); 返工 when it fails: the same
  department(s) get the work back with a new deadline (the lead department, for a fix on the spot).
- 催办 / 督办: an active work order past its deadline is reminded once, and escalated once when far past it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from schemas import (
    CASE_OPEN,
    LATEST,
    ORDER_ACTIVE,
    ORDER_LIVE,
    RANGE,
    Actor,
    Event,
    IncidentStatus,
    Location,
    Moment,
    Town,
    WorkOrderState,
    WorkOrderStatus,
    aware_utc,
)
from schemas import events as ev
from schemas.reference import distance_m

E = TypeVar("E", bound=Event)

DISPATCH = Actor.system("dispatch")
WATCHDOG = Actor.system("dispatch-watchdog")

_M_PER_DEGREE = 111_195.0
"""Metres per degree of latitude (and of longitude at the equator) on the sphere ``distance_m`` uses."""


class Policy(Protocol):
    """The policy values the rules read (dispatch's settings are one)."""

    @property
    def merge_distance_m(self) -> float: ...
    @property
    def merge_window_hours(self) -> float: ...
    @property
    def max_returns(self) -> int: ...
    @property
    def escalate_after_hours(self) -> float: ...


class NotExpected(ValueError):
    """An event the case's state does not expect (the service treats it as a message it can never apply)."""


class NotAllowed(ValueError):
    """A command the rules refuse in the state the case is in."""


@dataclass
class Case:
    """One incident as dispatch follows it (the ``dispatch_case`` row)."""

    incident_id: str
    correlation_id: str
    status: str
    """An :class:`IncidentStatus`."""
    category_code: str
    grid_id: str | None
    lat: float
    lon: float
    reporter_id: str
    reported_at: datetime
    address: str = ""
    description: str = ""
    photo_urls: str = ""
    evidence_urls: str = ""
    severity: str = "normal"
    priority: int = 3
    big: bool = False
    handled_on_spot: bool = False
    merged_into: str | None = None
    duplicates: int = 0
    return_count: int = 0
    rework_count: int = 0
    verification_round: int = 0
    filed_at: datetime | None = None
    closed_at: datetime | None = None


@dataclass
class WorkOrder(WorkOrderState):
    """One department's share of a case (the ``dispatch_work_order`` row)."""

    handled_by: str | None = None
    """Who handled it (the staff member, and whom they acted for), space-separated: they never verify it."""
    reminded_at: datetime | None = None
    escalated_at: datetime | None = None
    extension_requested_until: datetime | None = None
    extension_reason: str = ""


@dataclass
class Decision:
    """What a rule decided beyond the state it changed in place: work orders to store and events to emit."""

    events: list[Event] = field(default_factory=list)
    orders: list[WorkOrder] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class MergeSearch:
    """Where a report's duplicates may be: open cases of its category reported since ``since``, inside a box around
    it a little larger than the merge distance (the store reads only those; the distance decides)."""

    category_code: str
    since: datetime
    south: float
    north: float
    west: float
    east: float

    def covers(self, case: Case) -> bool:
        return (
            case.category_code == self.category_code
            and case.status in CASE_OPEN
            and case.reported_at >= self.since
            and self.south <= case.lat <= self.north
            and self.west <= case.lon <= self.east
        )


@dataclass(frozen=True, slots=True)
class Step:
    """One step of the watchdog on a late work order: the mark it sets (``reminded_at`` or ``escalated_at``) and
    the event it emits, if this instance is the one that sets the mark."""

    mark: str
    event: Event


# -- 立案 / 派遣 ------------------------------------------------------------------------------------------


def open_case(report: ev.IncidentReported, town: Town) -> Case:
    """The case of a report as received: filed, unless :func:`file_incident` decides otherwise."""
    loc = report.location
    category = town.categories.get(report.category_code)
    grid = town.grid_at(loc.lat, loc.lon)
    return Case(
        incident_id=report.incident_id,
        correlation_id=report.correlation_id,
        status=IncidentStatus.FILED,
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


def merge_search(case: Case, town: Town, policy: Policy, moment: Moment) -> MergeSearch | None:
    """Where the case's duplicates may be; None for a case never merged (rejected, or fixed on the spot)."""
    if case.handled_on_spot or case.category_code not in town.categories or case.grid_id is None:
        return None
    dlat = policy.merge_distance_m * 1.01 / _M_PER_DEGREE
    dlon = dlat / max(math.cos(math.radians(case.lat)), 0.01)
    return MergeSearch(
        category_code=case.category_code,
        since=moment.hours_ago(policy.merge_window_hours),
        south=case.lat - dlat,
        north=case.lat + dlat,
        west=case.lon - dlon,
        east=case.lon + dlon,
    )


def find_duplicate(
    case: Case, candidates: Iterable[Case], town: Town, policy: Policy, moment: Moment
) -> tuple[Case, float] | None:
    """The open case of the same category, reported within the merge window, nearest to ``case`` within the merge
    distance (with that distance), or None. ``candidates`` may hold any cases: each is checked as it stands."""
    search = merge_search(case, town, policy, moment)
    if search is None:
        return None
    best: tuple[Case, float] | None = None
    for other in candidates:
        if other.incident_id == case.incident_id or not search.covers(other):
            continue
        d = distance_m(other.lat, other.lon, case.lat, case.lon)
        if d <= policy.merge_distance_m and (best is None or d < best[1]):
            best = (other, d)
    return best


def file_incident(
    case: Case, report: ev.IncidentReported, candidates: Iterable[Case], town: Town, policy: Policy, moment: Moment
) -> Decision:
    """立案: reject, merge or file the report's case (from :func:`open_case`); a filed one is dispatched, or
    verified at once if fixed on the spot. ``candidates``: the cases :func:`merge_search` may find it a duplicate
    of."""
    category = town.categories.get(case.category_code)
    if category is None:
        known = ", ".join(sorted(town.categories))
        reason = f"unknown category {report.category_code!r}; known: {known}"
        return _reject(case, report, ev.RejectReason.UNKNOWN_CATEGORY, reason, moment)
    if case.grid_id is None:
        reason = f"location {case.lat:.5f},{case.lon:.5f} lies outside every grid of the town"
        return _reject(case, report, ev.RejectReason.OUTSIDE_GRIDS, reason, moment)
    if dup := find_duplicate(case, candidates, town, policy, moment):
        into, distance = dup
        case.status, case.merged_into, case.closed_at = IncidentStatus.MERGED, into.incident_id, moment.now
        into.duplicates += 1
        merged = _follow(
            ev.IncidentMerged,
            report,
            moment,
            into_incident_id=into.incident_id,
            distance_m=round(distance, 1),
            category_code=report.category_code,
        )
        return Decision([merged])

    case.filed_at = moment.now
    decision = Decision(
        [
            _follow(
                ev.IncidentFiled,
                report,
                moment,
                category_code=category.code,
                grid_id=case.grid_id,
                priority=category.priority,
                severity=report.severity,
                big=case.big,
                handled_on_spot=report.handled_on_spot,
            )
        ]
    )
    orders: list[WorkOrder] = []  # a case just filed has none
    if case.handled_on_spot:
        _request_verification(decision, case, orders, report, list(report.evidence_urls), town, moment)
    else:
        chain = departments_of(case, town)
        departments = chain if case.big else chain[:1]
        for i, dept in enumerate(departments):
            role = ev.WorkOrderRole.LEAD if i == 0 else ev.WorkOrderRole.SUPPORT
            _dispatch(decision, case, orders, report, dept, role, 1, town, moment)
    return decision


def departments_of(case: Case, town: Town) -> tuple[str, ...]:
    """The departments that may take the case, in turn: the one the town's routing rules name for its category
    and place (the category's lead when none does), then the category's others in order."""
    category = town.categories[case.category_code]
    grid = town.grids.get(case.grid_id) if case.grid_id else None
    first = town.route(category.code, case.lat, case.lon, grid) or category.lead
    return (first, *(d for d in category.departments if d != first))


def reroute_work_order(
    case: Case,
    orders: list[WorkOrder],
    order: WorkOrder,
    returned: ev.WorkOrderReturned,
    town: Town,
    policy: Policy,
    moment: Moment,
) -> Decision:
    """退回: the next candidate department takes the work; after repeated returns, the operations center.
    ``orders``: the case's work orders, oldest first (``order`` among them)."""
    if order.status not in ORDER_ACTIVE:
        raise NotExpected(f"work order {order.work_order_id} is {order.status}; a return is not expected")
    order.status = WorkOrderStatus.RETURNED
    case.return_count += 1
    decision = Decision()
    tried = {o.department_code for o in orders}
    role = ev.WorkOrderRole(order.role)
    candidates = [d for d in departments_of(case, town) if d not in tried]
    if case.return_count < policy.max_returns and candidates:
        _dispatch(decision, case, orders, returned, candidates[0], role, order.attempt + 1, town, moment)
        return decision
    if town.ops_center in {o.department_code for o in orders if o.status in ORDER_LIVE}:
        return decision  # the operations center already holds this case
    reason = (
        f"returned {case.return_count} times"
        if case.return_count >= policy.max_returns
        else "no other department can take it"
    )
    decision.events.append(
        _follow(
            ev.IncidentEscalated,
            returned,
            moment,
            reason_code=ev.EscalationReason.REPEATED_RETURNS if candidates else ev.EscalationReason.NO_DEPARTMENT,
            reason=f"{reason}; last: {returned.department_code}: {returned.reason}"[:1000],
            work_order_id=order.work_order_id,
            department_code=order.department_code,
        )
    )
    _dispatch(decision, case, orders, returned, town.ops_center, role, order.attempt + 1, town, moment)
    return decision


def record_acceptance(order: WorkOrder, accepted: ev.WorkOrderAccepted) -> None:
    """签收: a dispatched order is accepted (a late acceptance of an order already further on changes nothing)."""
    if order.status == WorkOrderStatus.DISPATCHED:
        order.status, order.accepted_at = WorkOrderStatus.ACCEPTED, accepted.occurred_at


def record_extension_request(order: WorkOrder, req: ev.ExtensionRequested) -> None:
    """延期 asked for: the request waits for the operations center's decision."""
    order.extension_requested_until, order.extension_reason = req.requested_deadline, req.reason


def handle_work_order(
    case: Case, orders: list[WorkOrder], order: WorkOrder, handled: ev.WorkOrderHandled, town: Town, moment: Moment
) -> Decision:
    """处置 done: once every live work order of the case is handled, the grid worker verifies (核查)."""
    if order.status not in ORDER_ACTIVE:
        raise NotExpected(f"work order {order.work_order_id} is {order.status}; handling is not expected")
    order.status, order.handled_at = WorkOrderStatus.HANDLED, handled.occurred_at
    order.handled_by = " ".join(p for p in (handled.actor.id, handled.actor.on_behalf_of) if p)
    order.extension_requested_until, order.extension_reason = None, ""  # a pending request lapses
    decision = Decision()
    if any(o.status in ORDER_ACTIVE for o in orders):
        return decision  # a big incident waits for every department
    _request_verification(decision, case, orders, handled, list(handled.evidence_urls), town, moment)
    return decision


def close_incident(case: Case, orders: Sequence[WorkOrder], passed: ev.VerificationPassed, moment: Moment) -> Decision:
    """核查 passed → 结案. On time when closed by the latest deadline of its work orders."""
    _expect_verification(case)
    deadline = max((o.deadline for o in orders), default=None)
    if deadline is not None and deadline > LATEST:  # granted before the range was checked, still in the database
        deadline = LATEST
    for o in orders:
        if o.status == WorkOrderStatus.HANDLED:
            o.status = WorkOrderStatus.CLOSED
    case.status, case.closed_at = IncidentStatus.CLOSED, moment.now
    closed = _follow(
        ev.IncidentClosed,
        passed,
        moment,
        category_code=case.category_code,
        grid_id=case.grid_id,
        departments=sorted({o.department_code for o in orders if o.status == WorkOrderStatus.CLOSED}),
        reported_at=case.reported_at,
        deadline=deadline,
        on_time=deadline is None or moment.now <= deadline,
        rework_count=case.rework_count,
        return_count=case.return_count,
        handled_on_spot=case.handled_on_spot,
    )
    return Decision([closed])


def rework_incident(
    case: Case, orders: list[WorkOrder], failed: ev.VerificationFailed, town: Town, moment: Moment
) -> Decision:
    """核查 failed → 返工: the same department(s) get the work back with the worker's note and a new deadline."""
    _expect_verification(case)
    case.rework_count += 1
    decision = Decision()
    handled = [o for o in orders if o.status == WorkOrderStatus.HANDLED]
    category = town.categories[case.category_code]
    if not handled:  # fixed on the spot but not well enough: the lead department takes it properly
        _dispatch(decision, case, orders, failed, departments_of(case, town)[0], ev.WorkOrderRole.LEAD, 1, town, moment)
        return decision
    case.status = IncidentStatus.DISPATCHED
    for order in handled:
        order.status = WorkOrderStatus.REWORK
        order.deadline = moment.due_in(category.deadline_hours)
        order.reminded_at = order.escalated_at = None
        decision.events.append(
            _follow(
                ev.IncidentReworked,
                failed,
                moment,
                work_order_id=order.work_order_id,
                department_code=order.department_code,
                rework_count=case.rework_count,
                note=failed.note,
                deadline=order.deadline,
            )
        )
    return decision


# -- the operations center's decisions ----------------------------------------------------------------------


def decide_extension(
    case: Case,
    order: WorkOrder,
    grant: bool,
    new_deadline: datetime | None,
    reason: str,
    actor: Actor,
    moment: Moment,
) -> Event:
    """延期: the operations center grants (to the asked or a given deadline) or refuses a department's request."""
    if order.extension_requested_until is None:
        raise NotAllowed(f"work order {order.work_order_id} has no pending extension request")
    if order.status not in ORDER_ACTIVE:
        raise NotAllowed(f"work order {order.work_order_id} is {order.status}; nothing to extend")
    common: dict[str, Any] = dict(
        incident_id=order.incident_id,
        actor=actor,
        correlation_id=case.correlation_id,
        occurred_at=moment.now,
        work_order_id=order.work_order_id,
        department_code=order.department_code,
    )
    event: Event
    if grant:
        deadline = new_deadline or order.extension_requested_until
        try:
            deadline = aware_utc(deadline)
        except ValueError:  # asked for before the range was checked, still in the database
            asked = " as asked for: grant with a new_deadline" if new_deadline is None else ""
            raise NotAllowed(f"new deadline {deadline.isoformat()} is not {RANGE}{asked}") from None
        if deadline <= order.deadline:
            raise NotAllowed(f"new deadline {deadline.isoformat()} is not later than {order.deadline.isoformat()}")
        order.deadline, order.reminded_at, order.escalated_at = deadline, None, None
        event = ev.ExtensionGranted(**common, new_deadline=deadline)
    else:
        event = ev.ExtensionRefused(**common, reason=reason)
    order.extension_requested_until, order.extension_reason = None, ""
    return event


# -- watchdog (催办 / 督办) -----------------------------------------------------------------------------------


def overdue(order: WorkOrder, now: datetime) -> bool:
    """Work the department still owes, past its deadline."""
    return order.status in ORDER_ACTIVE and order.deadline < now


def overdue_steps(order: WorkOrder, case: Case, policy: Policy, moment: Moment) -> list[Step]:
    """催办 an overdue order once; 督办 (escalate to the operations center) once when it is far past its deadline."""
    now, deadline = moment.now, order.deadline
    if not overdue(order, now):
        return []
    common: dict[str, Any] = dict(
        incident_id=order.incident_id,
        correlation_id=case.correlation_id,
        occurred_at=now,
        work_order_id=order.work_order_id,
        department_code=order.department_code,
        actor=WATCHDOG,
    )
    late_s = (now - deadline).total_seconds()
    steps = []
    if order.reminded_at is None:
        steps.append(Step("reminded_at", ev.OverdueReminded(**common, deadline=deadline, overdue_s=late_s)))
    if order.escalated_at is None and now - deadline >= moment.business_hours(policy.escalate_after_hours):
        reason = f"{order.department_code} is {late_s:.0f} s past its deadline"
        escalated = ev.IncidentEscalated(**common, reason_code=ev.EscalationReason.OVERDUE, reason=reason)
        steps.append(Step("escalated_at", escalated))
    return steps


# -- the steps the rules share ------------------------------------------------------------------------------


def _dispatch(
    decision: Decision,
    case: Case,
    orders: list[WorkOrder],
    cause: Event,
    department: str,
    role: ev.WorkOrderRole,
    attempt: int,
    town: Town,
    moment: Moment,
) -> None:
    """派遣 one work order of ``case`` to ``department`` (numbered after the case's ``orders``, which it joins)."""
    category = town.categories[case.category_code]
    order = WorkOrder(
        work_order_id=f"{case.incident_id}-{len(orders) + 1}",
        incident_id=case.incident_id,
        department_code=department,
        role=role.value,
        attempt=attempt,
        status=WorkOrderStatus.DISPATCHED,
        deadline=moment.due_in(category.deadline_hours),
        dispatched_at=moment.now,
    )
    orders.append(order)
    decision.orders.append(order)
    case.status = IncidentStatus.DISPATCHED
    decision.events.append(
        _follow(
            ev.WorkOrderDispatched,
            cause,
            moment,
            work_order_id=order.work_order_id,
            department_code=department,
            role=role,
            coordinator=town.ops_center if case.big else None,
            category_code=case.category_code,
            grid_id=case.grid_id,
            location=Location(lat=case.lat, lon=case.lon, address=case.address),
            description=case.description,
            photo_urls=[u for u in case.photo_urls.split() if u],
            priority=case.priority,
            deadline=order.deadline,
            attempt=attempt,
        )
    )


def verifier(case: Case, handled_by: Sequence[str], town: Town) -> str:
    """The grid's worker who verifies: one who neither reported the incident nor did the work (a fix on the spot
    is never asked of the worker who made it). The roster gives every grid of the town workers enough for one."""
    workers = town.grids[case.grid_id].workers if case.grid_id else ()
    others = [w for w in workers if w != case.reporter_id and w not in handled_by]
    return (others or list(workers) or [case.reporter_id])[0]


def _request_verification(
    decision: Decision,
    case: Case,
    orders: Sequence[WorkOrder],
    cause: Event,
    evidence: list[Any],
    town: Town,
    moment: Moment,
) -> None:
    case.status = IncidentStatus.VERIFYING
    case.verification_round += 1
    assert case.grid_id is not None
    handled = [o for o in orders if o.status == WorkOrderStatus.HANDLED]
    handled_by = [case.reporter_id] if case.handled_on_spot else []
    for person in (p for o in handled for p in (o.handled_by or "").split()):
        if person not in handled_by:
            handled_by.append(person)
    decision.events.append(
        _follow(
            ev.VerificationRequested,
            cause,
            moment,
            verification_id=f"{case.incident_id}-v{case.verification_round}",
            grid_id=case.grid_id,
            worker_id=verifier(case, handled_by, town),
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


def _reject(case: Case, cause: Event, code: ev.RejectReason, reason: str, moment: Moment) -> Decision:
    """不予立案: the case is kept, rejected, with the reason."""
    case.status, case.closed_at = IncidentStatus.REJECTED, moment.now
    return Decision([_follow(ev.IncidentRejected, cause, moment, reason_code=code, reason=reason)])


def _follow(kind: type[E], cause: Event, moment: Moment, **fields: Any) -> E:
    """The event ``kind`` dispatch emits now, following ``cause``."""
    return kind.following(cause, DISPATCH, occurred_at=moment.now, **fields)


def _expect_verification(case: Case) -> None:
    if case.status != IncidentStatus.VERIFYING:
        raise NotExpected(f"incident {case.incident_id} is {case.status}; not awaiting verification")
