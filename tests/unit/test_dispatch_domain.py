"""dispatch's rules as pure functions: plain cases and work orders, a town, a policy and a moment; no database."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

import pytest

from schemas import GAOHANG, LATEST, Actor, ActorKind, Event, Location, Moment, Town
from schemas import events as ev
from schemas.reference import Category, Department, Grid, distance_m
from services.dispatch import domain
from services.dispatch.domain import Case, Decision, WorkOrder

NOW = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
WORKER = Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-1")
OPS = Actor(kind=ActorKind.OPS_CENTER, id="ops-1")
STAFF = Actor(kind=ActorKind.DEPARTMENT, id="staff", department="city_ops")
IN_GH01 = (31.275, 121.565)


@dataclass(frozen=True)
class Policy:
    merge_distance_m: float = 50.0
    merge_window_hours: float = 24.0
    max_returns: int = 2
    escalate_after_hours: float = 24.0


POLICY = Policy()


def at(hours: float = 0, time_scale: float = 1.0) -> Moment:
    return Moment(NOW + timedelta(hours=hours), time_scale)


def report(
    category: str = "exposed_garbage", where: tuple[float, float] = IN_GH01, n: int = 1, **kw: Any
) -> ev.IncidentReported:
    fields: dict[str, Any] = {"actor": WORKER, "reporter_id": "w-gh01-1", "occurred_at": NOW, **kw}
    return ev.IncidentReported(
        incident_id=f"GL-{n}",
        correlation_id=f"GL-{n}",
        source="grid_worker",
        category_code=category,
        location=Location(lat=where[0], lon=where[1]),
        description="d",
        client_report_id=f"r{n}",
        **fields,
    )


@dataclass
class Filed:
    """A case filed by the rules, with its work orders, as a store would hold them."""

    case: Case
    orders: list[WorkOrder]
    events: list[Event]


def file(
    r: ev.IncidentReported,
    candidates: tuple[Case, ...] = (),
    town: Town = GAOHANG,
    moment: Moment | None = None,
) -> Filed:
    case = domain.open_case(r, town)
    decision = domain.file_incident(case, r, candidates, town, POLICY, moment or at())
    return Filed(case, decision.orders, decision.events)


def columns(row: object, *names: str) -> tuple[Any, ...]:
    return tuple(getattr(row, name) for name in names)


def only(events: list[Event], cls: type[Any]) -> Any:
    found = [e for e in events if isinstance(e, cls)]
    assert len(found) == 1, f"expected one {cls.__name__} in {[e.type for e in events]}"
    return found[0]


def handle(filed: Filed, order: WorkOrder, by: Actor = STAFF, moment: Moment | None = None) -> Decision:
    moment = moment or at()
    handled = ev.WorkOrderHandled.following(
        filed.events[0],
        by,
        occurred_at=moment.now,
        work_order_id=order.work_order_id,
        department_code=order.department_code,
        result="done",
    )
    decision = domain.handle_work_order(filed.case, filed.orders, order, handled, GAOHANG, moment)
    filed.orders += decision.orders
    return decision


def verify(filed: Filed, req: ev.VerificationRequested, passed: bool, moment: Moment | None = None) -> Decision:
    actor = Actor(kind=ActorKind.GRID_WORKER, id=req.worker_id)
    if passed:
        ok = ev.VerificationPassed.following(req, actor, verification_id=req.verification_id, note="ok")
        return domain.close_incident(filed.case, filed.orders, ok, moment or at())
    failed = ev.VerificationFailed.following(req, actor, verification_id=req.verification_id, note="still dirty")
    decision = domain.rework_incident(filed.case, filed.orders, failed, GAOHANG, moment or at())
    filed.orders += decision.orders
    return decision


def give_back(filed: Filed, order: WorkOrder, reason: str = "not ours", town: Town = GAOHANG) -> Decision:
    returned = ev.WorkOrderReturned.following(
        filed.events[0], STAFF, work_order_id=order.work_order_id, department_code=order.department_code, reason=reason
    )
    decision = domain.reroute_work_order(filed.case, filed.orders, order, returned, town, POLICY, at())
    filed.orders += decision.orders
    return decision


# -- 立案 / 派遣 ------------------------------------------------------------------------------------------


def test_a_report_is_filed_and_dispatched_to_the_lead_department() -> None:
    filed = file(report("exposed_garbage"))
    assert [e.type for e in filed.events] == ["IncidentFiled", "WorkOrderDispatched"]
    order = only(filed.events, ev.WorkOrderDispatched)
    filing = only(filed.events, ev.IncidentFiled)
    assert (filing.grid_id, filing.priority, filing.big) == ("gh01", 3, False)
    assert order.department_code == "city_ops" and order.role is ev.WorkOrderRole.LEAD
    assert order.deadline == NOW + timedelta(hours=24) and order.coordinator is None
    assert order.correlation_id == order.incident_id and order.actor.id == "dispatch"
    assert filed.case.status == "dispatched" and filed.case.filed_at == NOW
    [row] = filed.orders
    assert (row.work_order_id, row.status, row.deadline, row.attempt) == ("GL-1-1", "dispatched", order.deadline, 1)


@pytest.mark.parametrize(
    ("category", "where", "code", "says"),
    [
        ("no_such_thing", IN_GH01, ev.RejectReason.UNKNOWN_CATEGORY, "unknown category 'no_such_thing'; known: "),
        ("exposed_garbage", (31.10, 121.50), ev.RejectReason.OUTSIDE_GRIDS, "31.10000,121.50000 lies outside"),
    ],
)
def test_rejected_reports(category: str, where: tuple[float, float], code: ev.RejectReason, says: str) -> None:
    filed = file(report(category, where))
    rejected = only(filed.events, ev.IncidentRejected)
    assert rejected.reason_code is code and says in rejected.reason
    assert (filed.case.status, filed.case.closed_at, filed.orders) == ("rejected", NOW, [])


def test_the_known_categories_are_the_towns() -> None:
    """The town is the rules' reference data: a category another town does not have is rejected there."""
    gh01 = GAOHANG.grids["gh01"]
    small = Town(
        "small",
        "小镇",
        "Small",
        MappingProxyType({"roads": Department("roads", "路政", "Roads"), "hq": Department("hq", "中心", "HQ")}),
        MappingProxyType({"pothole": Category("pothole", "坑洼", "Pothole", "roads", ("roads",), 2, 10, public=True)}),
        MappingProxyType({"s1": Grid.box("s1", "一", "One", gh01.south, gh01.west, gh01.north, gh01.east, ("a", "b"))}),
        ops_center="hq",
    )
    rejected = only(file(report("exposed_garbage"), town=small).events, ev.IncidentRejected)
    assert rejected.reason.endswith("known: pothole")
    filed = file(report("pothole"), town=small)
    order = only(filed.events, ev.WorkOrderDispatched)
    assert (order.department_code, order.grid_id, order.deadline) == ("roads", "s1", NOW + timedelta(hours=10))
    back = give_back(filed, filed.orders[0], town=small)
    assert only(back.events, ev.WorkOrderDispatched).department_code == "hq"  # the town's operations center


def test_a_big_incident_engages_every_department_with_the_ops_center_coordinating() -> None:
    filed = file(report("safety_hazard"))
    assert only(filed.events, ev.IncidentFiled).big
    orders = [e for e in filed.events if isinstance(e, ev.WorkOrderDispatched)]
    assert [o.department_code for o in orders] == ["work_safety", "public_safety", "planning"]
    assert [o.role for o in orders] == [ev.WorkOrderRole.LEAD, ev.WorkOrderRole.SUPPORT, ev.WorkOrderRole.SUPPORT]
    assert {o.coordinator for o in orders} == {"ops_center"}
    assert [o.work_order_id for o in filed.orders] == ["GL-1-1", "GL-1-2", "GL-1-3"]
    # a major-severity report of an ordinary category is big too
    major = file(report("illegal_construction", severity="major"))
    assert len([e for e in major.events if isinstance(e, ev.WorkOrderDispatched)]) == 2


def test_a_time_scale_shrinks_deadlines() -> None:
    filed = file(report("flooding"), moment=at(time_scale=3600))
    assert {o.deadline for o in filed.orders} == {NOW + timedelta(seconds=4)}  # 4 business hours


@pytest.mark.parametrize("time_scale", [1e-5, 1e-9, 1e-12])
def test_a_deadline_past_the_range_is_set_at_its_end(time_scale: float) -> None:
    filed = file(report(), moment=at(time_scale=time_scale))
    assert only(filed.events, ev.WorkOrderDispatched).deadline == LATEST


# -- merging duplicates -----------------------------------------------------------------------------------------


def open_case_at(where: tuple[float, float], category: str = "illegal_parking", n: int = 1, **kw: Any) -> Case:
    return replace(file(report(category, where, n=n)).case, **kw)


def test_a_nearby_report_of_the_same_category_is_merged_into_the_nearest_open_case() -> None:
    first = open_case_at((31.2800, 121.5700))
    nearer = open_case_at((31.28008, 121.57008), n=3)
    filed = file(report("illegal_parking", (31.2801, 121.5701), n=2), candidates=(first, nearer))
    merged = only(filed.events, ev.IncidentMerged)
    assert merged.into_incident_id == "GL-3" and merged.distance_m < 50 and merged.category_code == "illegal_parking"
    assert (filed.case.status, filed.case.merged_into, filed.case.closed_at) == ("merged", "GL-3", NOW)
    assert (nearer.duplicates, first.duplicates, filed.orders) == (1, 0, [])


@pytest.mark.parametrize(
    ("why", "candidate"),
    [
        ("another category", {"category_code": "exposed_garbage"}),
        ("closed", {"status": "closed"}),
        ("merged itself", {"status": "merged"}),
        ("reported before the window", {"reported_at": NOW - timedelta(hours=24, seconds=1)}),
        ("far", {"lat": 31.2900}),
        ("the report itself", {"incident_id": "GL-2"}),
    ],
)
def test_a_report_is_not_merged_into(why: str, candidate: dict[str, Any]) -> None:
    case = open_case_at((31.2800, 121.5700), **candidate)
    filed = file(report("illegal_parking", (31.2801, 121.5701), n=2), candidates=(case,))
    assert only(filed.events, ev.IncidentFiled), why
    assert case.duplicates == 0


def test_the_merge_window_is_counted_in_business_hours() -> None:
    case = open_case_at((31.2800, 121.5700), reported_at=NOW - timedelta(seconds=23))
    moment = at(time_scale=3600)  # 24 business hours are 24 s
    assert domain.find_duplicate(
        file(report("illegal_parking", (31.2801, 121.5701), n=2)).case, (case,), GAOHANG, POLICY, moment
    )
    case.reported_at = NOW - timedelta(seconds=25)
    assert not domain.find_duplicate(file(report("illegal_parking", n=2)).case, (case,), GAOHANG, POLICY, moment)


def test_a_report_fixed_on_the_spot_is_never_merged() -> None:
    case = open_case_at((31.2800, 121.5700))
    r = report("illegal_parking", (31.2800, 121.5700), n=2, handled_on_spot=True)
    assert domain.merge_search(domain.open_case(r, GAOHANG), GAOHANG, POLICY, at()) is None
    assert only(file(r, candidates=(case,)).events, ev.VerificationRequested)


@pytest.mark.parametrize(
    ("bearing", "metres", "merged"),
    [(90, 49.0, True), (90, 51.0, False), (0, 49.5, True), (45, 49.5, True), (135, 50.5, False)],
)
def test_the_merge_distance_holds_in_every_direction(bearing: float, metres: float, merged: bool) -> None:
    """The store reads the candidates inside the search's box: it must not cut off a case in reach."""
    lat0, lon0 = 31.2800, 121.5700
    first = open_case_at((lat0, lon0))
    r = 6_371_000.0
    dlat = math.degrees(metres * math.cos(math.radians(bearing)) / r)
    dlon = math.degrees(metres * math.sin(math.radians(bearing)) / (r * math.cos(math.radians(lat0))))
    where = (lat0 + dlat, lon0 + dlon)
    assert abs(distance_m(lat0, lon0, *where) - metres) < 0.5
    case = domain.open_case(report("illegal_parking", where, n=2), GAOHANG)
    search = domain.merge_search(case, GAOHANG, POLICY, at())
    assert search is not None and (search.covers(first) or not merged)
    assert bool(domain.find_duplicate(case, (first,), GAOHANG, POLICY, at())) is merged


# -- 处置 / 核查 / 结案 / 返工 -------------------------------------------------------------------------------------


def test_a_straight_close_is_on_time() -> None:
    filed = file(report())
    [order] = filed.orders
    req = only(handle(filed, order, moment=at(3)).events, ev.VerificationRequested)
    assert req.worker_id == "w-gh01-2" and req.grid_id == "gh01" and req.round == 1  # not the reporter
    assert (order.status, order.handled_at, order.handled_by) == ("handled", NOW + timedelta(hours=3), "staff")
    assert filed.case.status == "verifying"
    closed = only(verify(filed, req, passed=True, moment=at(4)).events, ev.IncidentClosed)
    assert closed.on_time and closed.rework_count == 0 and closed.departments == ["city_ops"]
    assert closed.deadline == order.deadline and closed.reported_at == NOW
    assert (filed.case.status, filed.case.closed_at, order.status) == ("closed", NOW + timedelta(hours=4), "closed")


def test_a_late_close_is_not_on_time() -> None:
    filed = file(report())
    req = only(handle(filed, filed.orders[0]).events, ev.VerificationRequested)
    assert not only(verify(filed, req, passed=True, moment=at(30)).events, ev.IncidentClosed).on_time


def test_a_deadline_stored_past_the_range_closes_on_time_at_the_ranges_end() -> None:
    filed = file(report())
    req = only(handle(filed, filed.orders[0]).events, ev.VerificationRequested)
    filed.orders[0].deadline = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    closed = only(verify(filed, req, passed=True).events, ev.IncidentClosed)
    assert closed.on_time and closed.deadline == LATEST


def test_a_big_incident_is_verified_only_when_every_department_handled() -> None:
    filed = file(report("flooding"))
    first, second = filed.orders
    assert handle(filed, first).events == []
    assert filed.case.status == "dispatched"
    req = only(handle(filed, second).events, ev.VerificationRequested)
    assert sorted(req.work_order_ids) == [first.work_order_id, second.work_order_id]


def test_handling_lets_a_pending_extension_request_lapse() -> None:
    filed = file(report())
    order = filed.orders[0]
    order.extension_requested_until, order.extension_reason = NOW + timedelta(days=3), "permit"
    handle(filed, order)
    assert columns(order, "extension_requested_until", "extension_reason") == (None, "")


def test_a_failed_verification_sends_the_work_back() -> None:
    filed = file(report())
    [order] = filed.orders
    req = only(handle(filed, order).events, ev.VerificationRequested)
    order.reminded_at = order.escalated_at = NOW
    rework = only(verify(filed, req, passed=False, moment=at(1)).events, ev.IncidentReworked)
    assert (rework.work_order_id, rework.department_code, rework.rework_count) == (order.work_order_id, "city_ops", 1)
    assert rework.note == "still dirty" and rework.deadline == NOW + timedelta(hours=25)
    assert columns(order, "status", "deadline", "reminded_at", "escalated_at") == (
        "rework",
        rework.deadline,
        None,
        None,
    )
    assert filed.case.status == "dispatched"
    req2 = only(handle(filed, order).events, ev.VerificationRequested)
    assert req2.round == 2 and req2.verification_id == "GL-1-v2" != req.verification_id
    assert only(verify(filed, req2, passed=True).events, ev.IncidentClosed).rework_count == 1


def test_a_fix_on_the_spot_goes_straight_to_verification() -> None:
    filed = file(report(handled_on_spot=True, evidence_urls=["https://example.org/after.jpg"]))
    assert [e.type for e in filed.events] == ["IncidentFiled", "VerificationRequested"]
    req = only(filed.events, ev.VerificationRequested)
    assert [str(u) for u in req.evidence_urls] == ["https://example.org/after.jpg"] and filed.orders == []
    closed = only(verify(filed, req, passed=True).events, ev.IncidentClosed)
    assert closed.handled_on_spot and closed.on_time and closed.departments == [] and closed.deadline is None


def test_a_fix_on_the_spot_that_fails_verification_is_dispatched_to_the_lead() -> None:
    filed = file(report(handled_on_spot=True, evidence_urls=["https://e.org/a.jpg"]))
    req = only(filed.events, ev.VerificationRequested)
    order = only(verify(filed, req, passed=False).events, ev.WorkOrderDispatched)
    assert (order.department_code, order.work_order_id, filed.case.rework_count) == ("city_ops", "GL-1-1", 1)


def test_a_verification_names_the_reporter_and_whoever_did_the_work() -> None:
    """So that neither verifies it: the reporter who fixed it on the spot, the department staff who handled it."""
    filed = file(report(handled_on_spot=True, evidence_urls=["https://e.org/a.jpg"]))
    spot = only(filed.events, ev.VerificationRequested)
    assert (spot.reporter_id, spot.handled_by, spot.worker_id) == ("w-gh01-1", ["w-gh01-1"], "w-gh01-2")
    verify(filed, spot, passed=False)
    again = only(handle(filed, filed.orders[0]).events, ev.VerificationRequested)
    assert (again.reporter_id, again.handled_by, again.worker_id) == ("w-gh01-1", ["w-gh01-1", "staff"], "w-gh01-2")
    filed = file(report())
    for_someone = STAFF.on_behalf("chief")
    req = only(handle(filed, filed.orders[0], by=for_someone).events, ev.VerificationRequested)
    assert (req.reporter_id, req.handled_by) == ("w-gh01-1", ["staff", "chief"])
    # fixed on the spot by the grid's other worker: asked of the first
    w2 = Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-2")
    filed = file(report(actor=w2, reporter_id="w-gh01-2", handled_on_spot=True, evidence_urls=["https://e.org/b.jpg"]))
    spot = only(filed.events, ev.VerificationRequested)
    assert (spot.reporter_id, spot.handled_by, spot.worker_id) == ("w-gh01-2", ["w-gh01-2"], "w-gh01-1")


def test_the_verifier_is_one_of_the_grid_who_neither_reported_nor_handled() -> None:
    case = file(report()).case
    assert domain.verifier(case, ["w-gh01-2"], GAOHANG) == "w-gh01-3"
    assert domain.verifier(case, ["w-gh01-2", "w-gh01-3"], GAOHANG) == "w-gh01-1"  # every worker involved: the first
    assert domain.verifier(case, [], GAOHANG) == "w-gh01-2"
    case.grid_id = None
    assert domain.verifier(case, [], GAOHANG) == "w-gh01-1"  # no grid: the reporter


@pytest.mark.parametrize("status", ["filed", "dispatched", "closed"])
def test_a_verification_outcome_is_expected_only_while_verifying(status: str) -> None:
    filed = file(report())
    req = only(handle(filed, filed.orders[0]).events, ev.VerificationRequested)
    filed.case.status = status
    with pytest.raises(domain.NotExpected, match=f"incident GL-1 is {status}; not awaiting verification"):
        verify(filed, req, passed=True)
    with pytest.raises(domain.NotExpected):
        verify(filed, req, passed=False)


@pytest.mark.parametrize("status", ["handled", "returned", "closed"])
def test_handling_or_returning_an_order_no_longer_owed_is_not_expected(status: str) -> None:
    filed = file(report())
    order = filed.orders[0]
    order.status = status
    with pytest.raises(domain.NotExpected, match=f"work order GL-1-1 is {status}; handling is not expected"):
        handle(filed, order)
    with pytest.raises(domain.NotExpected, match="a return is not expected"):
        give_back(filed, order)


def test_acceptance_moves_only_a_dispatched_order() -> None:
    filed = file(report())
    order = filed.orders[0]
    accepted = ev.WorkOrderAccepted.following(
        filed.events[0], STAFF, occurred_at=NOW + timedelta(hours=1), work_order_id="GL-1-1", department_code="city_ops"
    )
    domain.record_acceptance(order, accepted)
    assert (order.status, order.accepted_at) == ("accepted", NOW + timedelta(hours=1))
    order.status = "handled"
    domain.record_acceptance(order, accepted)
    assert order.status == "handled"


# -- 退回 -------------------------------------------------------------------------------------------------------


def test_a_return_reroutes_then_escalates_after_repeated_returns() -> None:
    filed = file(report("illegal_signage"))
    first = filed.orders[0]
    assert first.department_code == "civic_creation"
    second = only(give_back(filed, first).events, ev.WorkOrderDispatched)
    assert (second.department_code, second.attempt, second.work_order_id) == ("env_rectification", 2, "GL-1-2")
    assert (first.status, filed.case.return_count) == ("returned", 1)
    out = give_back(filed, filed.orders[1], reason="not ours either").events
    escalated = only(out, ev.IncidentEscalated)
    assert escalated.reason_code is ev.EscalationReason.REPEATED_RETURNS
    assert escalated.reason == "returned 2 times; last: env_rectification: not ours either"
    third = only(out, ev.WorkOrderDispatched)
    assert third.department_code == "ops_center" and third.attempt == 3


def test_a_return_while_the_ops_center_holds_the_case_dispatches_nothing_more() -> None:
    filed = file(report("safety_hazard"))  # three departments at once
    filed.case.return_count = 1
    filed.orders.append(replace(filed.orders[0], work_order_id="GL-1-4", department_code="ops_center"))
    assert give_back(filed, filed.orders[1]).events == []
    assert (filed.orders[1].status, filed.case.return_count, len(filed.orders)) == ("returned", 2, 4)


def test_a_return_with_no_candidate_left_goes_to_the_ops_center() -> None:
    filed = file(report("garbage_sorting"))  # one department only
    out = give_back(filed, filed.orders[0], reason="wrong").events
    assert only(out, ev.IncidentEscalated).reason_code is ev.EscalationReason.NO_DEPARTMENT
    assert only(out, ev.IncidentEscalated).reason.startswith("no other department can take it; last: city_ops")
    assert only(out, ev.WorkOrderDispatched).department_code == "ops_center"


# -- 延期 -------------------------------------------------------------------------------------------------------


def asked(hours: float = 48) -> tuple[Filed, WorkOrder]:
    filed = file(report())
    order = filed.orders[0]
    order.extension_requested_until, order.extension_reason = order.deadline + timedelta(hours=hours), "permit"
    order.reminded_at = order.escalated_at = NOW
    return filed, order


def test_an_extension_granted_moves_the_deadline_and_rearms_the_watchdog() -> None:
    filed, order = asked()
    wanted = order.extension_requested_until
    granted = domain.decide_extension(filed.case, order, True, None, "", OPS, at(1))
    assert isinstance(granted, ev.ExtensionGranted) and granted.new_deadline == wanted and granted.actor == OPS
    assert (granted.correlation_id, granted.department_code, granted.occurred_at) == ("GL-1", "city_ops", at(1).now)
    assert (order.deadline, order.reminded_at, order.escalated_at) == (wanted, None, None)
    assert (order.extension_requested_until, order.extension_reason) == (None, "")
    with pytest.raises(domain.NotAllowed, match="no pending extension"):
        domain.decide_extension(filed.case, order, True, None, "", OPS, at())


def test_an_extension_granted_to_another_deadline() -> None:
    filed, order = asked()
    other = order.deadline + timedelta(hours=5)
    granted = domain.decide_extension(filed.case, order, True, other, "", OPS, at())
    assert isinstance(granted, ev.ExtensionGranted) and granted.new_deadline == order.deadline == other


def test_an_extension_refused_keeps_the_deadline() -> None:
    filed, order = asked()
    deadline = order.deadline
    refused = domain.decide_extension(filed.case, order, False, None, "do it now", OPS, at())
    assert isinstance(refused, ev.ExtensionRefused) and refused.reason == "do it now"
    assert (order.deadline, order.extension_requested_until, order.reminded_at) == (deadline, None, NOW)


def test_an_extension_is_granted_only_to_a_later_deadline_in_range() -> None:
    filed, order = asked()
    with pytest.raises(domain.NotAllowed, match="is not later than"):
        domain.decide_extension(filed.case, order, True, order.deadline, "", OPS, at())
    order.extension_requested_until = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)  # asked for before the check
    with pytest.raises(domain.NotAllowed, match=r"9999-12-31T23:59:59\+00:00 is not from .* as asked for"):
        domain.decide_extension(filed.case, order, True, None, "", OPS, at())
    assert order.extension_requested_until is not None  # still pending


@pytest.mark.parametrize("status", ["handled", "returned", "closed"])
def test_nothing_is_extended_of_an_order_no_longer_owed(status: str) -> None:
    filed, order = asked()
    order.status = status
    with pytest.raises(domain.NotAllowed, match=f"is {status}; nothing to extend"):
        domain.decide_extension(filed.case, order, True, None, "", OPS, at())


# -- 催办 / 督办 ----------------------------------------------------------------------------------------------------


def test_the_watchdog_reminds_then_escalates_an_overdue_order() -> None:
    filed = file(report())
    order = filed.orders[0]
    assert domain.overdue_steps(order, filed.case, POLICY, at(24)) == []  # due, not past
    [remind] = domain.overdue_steps(order, filed.case, POLICY, at(25))
    assert remind.mark == "reminded_at" and isinstance(remind.event, ev.OverdueReminded)
    assert remind.event.overdue_s == pytest.approx(3600) and remind.event.actor.id == "dispatch-watchdog"
    order.reminded_at = at(25).now
    assert domain.overdue_steps(order, filed.case, POLICY, at(47.9)) == []  # once
    [escalate] = domain.overdue_steps(order, filed.case, POLICY, at(48))
    assert escalate.mark == "escalated_at" and isinstance(escalate.event, ev.IncidentEscalated)
    assert escalate.event.reason_code is ev.EscalationReason.OVERDUE and escalate.event.to == "ops_center"
    assert escalate.event.reason == "city_ops is 86400 s past its deadline"
    order.escalated_at = at(48).now
    assert domain.overdue_steps(order, filed.case, POLICY, at(100)) == []


def test_an_order_found_far_past_its_deadline_is_reminded_and_escalated_at_once() -> None:
    filed = file(report())
    steps = domain.overdue_steps(filed.orders[0], filed.case, POLICY, at(60))
    assert [s.mark for s in steps] == ["reminded_at", "escalated_at"]


@pytest.mark.parametrize("status", ["handled", "returned", "closed"])
def test_an_order_no_longer_owed_is_never_overdue(status: str) -> None:
    filed = file(report())
    filed.orders[0].status = status
    assert not domain.overdue(filed.orders[0], at(100).now)
    assert domain.overdue_steps(filed.orders[0], filed.case, POLICY, at(100)) == []
