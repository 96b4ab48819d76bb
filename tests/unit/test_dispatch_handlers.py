"""dispatch's handlers and store through the message bus on a real SQLite database, no broker: what is loaded and
saved, read and written at once, across units of work and batches. The rules alone: test_dispatch_domain.py."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends
from sqlalchemy.engine import Engine

from schemas import GAOHANG, LATEST, Actor, ActorKind, Event, Location
from schemas import events as ev
from services.common.auth import Role, TokenStore, require
from services.common.bus import MessageBus
from services.common.db import UnitOfWork, make_engine
from services.common.errors import NotFound, Rejected, UnknownIncident
from services.common.runtime import Runtime
from services.dispatch import handlers
from services.dispatch.agents import PRELOAD
from services.dispatch.api import build_api
from services.dispatch.models import TABLES
from services.dispatch.settings import DispatchSettings
from services.dispatch.store import DispatchStore

from .conftest import FakeClock

WORKER = Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-1")
OPS = Actor(kind=ActorKind.OPS_CENTER, id="ops-1")
IN_GH01 = (31.275, 121.565)


class Loop:
    """dispatch's bus with helpers to play the other services' part."""

    def __init__(self, engine: Engine, clock: FakeClock, policy: DispatchSettings, time_scale: float = 1.0) -> None:
        self.engine, self.clock, self.policy, self.time_scale = engine, clock, policy, time_scale
        self.bus = MessageBus(self.uow, handlers.bind(policy))
        self.n = 0

    def uow(self) -> UnitOfWork:
        return UnitOfWork(self.engine, clock=self.clock, time_scale=self.time_scale)

    def report(self, category: str = "exposed_garbage", at: tuple[float, float] = IN_GH01, **kw: Any) -> list[Event]:
        self.n += 1
        iid = f"GL-{self.n}"
        fields: dict[str, Any] = {"actor": WORKER, "reporter_id": "w-gh01-1", **kw}
        event = ev.IncidentReported(
            incident_id=iid,
            correlation_id=iid,
            occurred_at=self.clock(),
            source="grid_worker",
            category_code=category,
            location=Location(lat=at[0], lon=at[1]),
            description="d",
            client_report_id=f"r{self.n}",
            **fields,
        )
        return self.bus.handle(event)

    def dept(self, cls: type[Event], order: ev.WorkOrderDispatched | ev.IncidentReworked, **kw: Any) -> list[Event]:
        actor = Actor(kind=ActorKind.DEPARTMENT, id="staff", department=order.department_code)
        event = cls.following(
            order,
            actor,
            occurred_at=self.clock(),
            work_order_id=order.work_order_id,
            department_code=order.department_code,
            **kw,
        )
        return self.bus.handle(event)

    def command(self, handler: Callable[..., Any], *args: Any) -> tuple[Any, list[Event]]:
        """Run a command (the watchdog, the operations center's decision) as the API and the timer do."""
        return self.bus.execute(handler, *args)

    def watch(self) -> list[Event]:
        return self.command(handlers.watch_deadlines, self.policy)[1]

    def verify(self, req: ev.VerificationRequested, passed: bool, note: str = "ok") -> list[Event]:
        actor = Actor(kind=ActorKind.GRID_WORKER, id=req.worker_id)
        cls = ev.VerificationPassed if passed else ev.VerificationFailed
        return self.bus.handle(
            cls.following(req, actor, occurred_at=self.clock(), verification_id=req.verification_id, note=note)
        )


@pytest.fixture
def loop(make_db: Callable[[tuple[sa.Table, ...]], Engine], clock: FakeClock) -> Loop:
    return Loop(make_db(TABLES), clock, DispatchSettings(max_returns=2, escalate_after_hours=24))


def only(events: list[Event], cls: type[Any]) -> Any:
    found = [e for e in events if isinstance(e, cls)]
    assert len(found) == 1, f"expected one {cls.__name__} in {[e.type for e in events]}"
    return found[0]


def test_report_is_filed_and_dispatched_to_the_lead_department(loop: Loop, clock: FakeClock) -> None:
    out = loop.report("exposed_garbage")
    assert [e.type for e in out] == ["IncidentFiled", "WorkOrderDispatched"]
    filed, order = out[0], out[1]
    assert isinstance(filed, ev.IncidentFiled) and filed.grid_id == "gh01" and filed.priority == 3
    assert isinstance(order, ev.WorkOrderDispatched)
    assert order.department_code == "city_ops" and order.role is ev.WorkOrderRole.LEAD
    assert order.deadline == clock() + timedelta(hours=24)
    assert order.correlation_id == order.incident_id and order.actor.id == "dispatch"


def test_nearby_report_of_same_category_is_merged(loop: Loop, clock: FakeClock) -> None:
    first = only(loop.report("illegal_parking", (31.2800, 121.5700)), ev.IncidentFiled)
    clock.advance(minutes=30)
    merged = only(loop.report("illegal_parking", (31.2801, 121.5701)), ev.IncidentMerged)
    assert merged.into_incident_id == first.incident_id and merged.distance_m < 50
    assert merged.category_code == "illegal_parking"  # the merges counter is labelled with it
    # another category at the same spot, or the same category far away, is a new case
    assert only(loop.report("exposed_garbage", (31.2801, 121.5701)), ev.IncidentFiled)
    assert only(loop.report("illegal_parking", (31.2900, 121.5700)), ev.IncidentFiled)
    # outside the time window it is new as well
    clock.advance(hours=25)
    assert only(loop.report("illegal_parking", (31.2800, 121.5700)), ev.IncidentFiled)


def test_filing_a_report_reads_no_work_orders(loop: Loop) -> None:
    # a case that was not there before has none: the numbering of its orders starts without a query
    statements: list[str] = []
    sa.event.listen(loop.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    orders = [e for e in loop.report("safety_hazard") if isinstance(e, ev.WorkOrderDispatched)]
    assert [o.work_order_id for o in orders] == ["GL-1-1", "GL-1-2", "GL-1-3"]
    reads = [s for s in statements if s.lstrip().upper().startswith("SELECT") and "dispatch_work_order" in s]
    assert reads == []
    assert any(s.lstrip().upper().startswith("INSERT INTO DISPATCH_WORK_ORDER") for s in statements)


def test_big_incident_is_verified_only_when_every_department_handled(loop: Loop) -> None:
    orders = [e for e in loop.report("flooding") if isinstance(e, ev.WorkOrderDispatched)]
    assert loop.dept(ev.WorkOrderHandled, orders[0], result="pumped") == []
    req = only(loop.dept(ev.WorkOrderHandled, orders[1], result="drain cleared"), ev.VerificationRequested)
    assert sorted(req.work_order_ids) == sorted(o.work_order_id for o in orders)


def test_straight_close_on_time(loop: Loop, clock: FakeClock) -> None:
    order = only(loop.report(), ev.WorkOrderDispatched)
    assert loop.dept(ev.WorkOrderAccepted, order) == []
    clock.advance(hours=3)
    req = only(loop.dept(ev.WorkOrderHandled, order, result="cleaned"), ev.VerificationRequested)
    assert req.worker_id == "w-gh01-2" and req.grid_id == "gh01"  # not the reporter
    closed = only(loop.verify(req, passed=True), ev.IncidentClosed)
    assert closed.on_time and closed.rework_count == 0 and closed.departments == ["city_ops"]
    assert closed.deadline == order.deadline


def test_failed_verification_sends_the_work_back(loop: Loop, clock: FakeClock) -> None:
    order = only(loop.report(), ev.WorkOrderDispatched)
    req = only(loop.dept(ev.WorkOrderHandled, order, result="cleaned"), ev.VerificationRequested)
    clock.advance(hours=1)
    rework = only(loop.verify(req, passed=False, note="still dirty"), ev.IncidentReworked)
    assert (rework.work_order_id, rework.department_code, rework.rework_count) == (order.work_order_id, "city_ops", 1)
    assert rework.note == "still dirty" and rework.deadline == clock() + timedelta(hours=24)
    req2 = only(loop.dept(ev.WorkOrderHandled, rework, result="cleaned again"), ev.VerificationRequested)
    assert req2.round == 2 and req2.verification_id != req.verification_id
    closed = only(loop.verify(req2, passed=True), ev.IncidentClosed)
    assert closed.rework_count == 1


def test_return_reroutes_then_escalates_after_repeated_returns(loop: Loop) -> None:
    first = only(loop.report("illegal_signage"), ev.WorkOrderDispatched)
    assert first.department_code == "civic_creation"
    second = only(loop.dept(ev.WorkOrderReturned, first, reason="not ours"), ev.WorkOrderDispatched)
    assert (second.department_code, second.attempt) == ("env_rectification", 2)
    out = loop.dept(ev.WorkOrderReturned, second, reason="not ours either")
    escalated = only(out, ev.IncidentEscalated)
    assert escalated.reason_code is ev.EscalationReason.REPEATED_RETURNS
    third = only(out, ev.WorkOrderDispatched)
    assert third.department_code == "ops_center" and third.attempt == 3


def test_a_verification_names_the_reporter_and_whoever_did_the_work(loop: Loop) -> None:
    """So that neither verifies it: the reporter who fixed it on the spot, the department staff who handled it."""
    spot = only(loop.report(handled_on_spot=True, evidence_urls=["https://e.org/a.jpg"]), ev.VerificationRequested)
    assert (spot.reporter_id, spot.handled_by, spot.worker_id) == ("w-gh01-1", ["w-gh01-1"], "w-gh01-2")
    order = only(loop.verify(spot, passed=False, note="not fixed"), ev.WorkOrderDispatched)
    again = only(loop.dept(ev.WorkOrderHandled, order, result="cleaned"), ev.VerificationRequested)
    assert (again.reporter_id, again.handled_by, again.worker_id) == ("w-gh01-1", ["w-gh01-1", "staff"], "w-gh01-2")
    order = only(loop.report(at=(31.2760, 121.5660)), ev.WorkOrderDispatched)
    req = only(loop.dept(ev.WorkOrderHandled, order, result="cleaned"), ev.VerificationRequested)
    assert (req.reporter_id, req.handled_by) == ("w-gh01-1", ["staff"])
    # fixed on the spot by the grid's other worker: asked of the first
    w2 = Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-2")
    spot = only(
        loop.report(actor=w2, reporter_id="w-gh01-2", handled_on_spot=True, evidence_urls=["https://e.org/b.jpg"]),
        ev.VerificationRequested,
    )
    assert (spot.reporter_id, spot.handled_by, spot.worker_id) == ("w-gh01-2", ["w-gh01-2"], "w-gh01-1")


def test_watchdog_reminds_then_escalates_once(loop: Loop, clock: FakeClock) -> None:
    order = only(loop.report(), ev.WorkOrderDispatched)

    assert loop.watch() == []
    clock.advance(hours=25)
    reminded = only(loop.watch(), ev.OverdueReminded)
    assert reminded.work_order_id == order.work_order_id and reminded.overdue_s == pytest.approx(3600)
    assert loop.watch() == []  # once: the mark is stored
    clock.advance(hours=24)
    escalated = only(loop.watch(), ev.IncidentEscalated)
    assert escalated.reason_code is ev.EscalationReason.OVERDUE and escalated.to == "ops_center"
    assert loop.watch() == []
    assert loop.command(handlers.watch_deadlines, loop.policy) == (0, [])


@pytest.mark.parametrize("time_scale", [1e-5, 1e-9, 1e-12])
def test_a_time_scale_that_puts_deadlines_past_the_range_sets_them_at_its_end(
    make_db: Callable[[tuple[sa.Table, ...]], Engine], clock: FakeClock, time_scale: float
) -> None:
    """24 business hours at 1e-5 end in the 2300s, past what an event may carry; at 1e-9 past the calendar, and at
    1e-12 they are longer than a timedelta holds."""
    loop = Loop(make_db(TABLES), clock, DispatchSettings(), time_scale=time_scale)
    order = only(loop.report(), ev.WorkOrderDispatched)
    assert order.deadline == LATEST
    req = only(loop.dept(ev.WorkOrderHandled, order, result="cleaned"), ev.VerificationRequested)
    rework = only(loop.verify(req, passed=False, note="still dirty"), ev.IncidentReworked)
    assert rework.deadline == LATEST
    clock.advance(days=400)
    assert loop.watch() == []
    req = only(loop.dept(ev.WorkOrderHandled, rework, result="cleaned again"), ev.VerificationRequested)
    closed = only(loop.verify(req, passed=True), ev.IncidentClosed)
    assert closed.on_time and closed.deadline == LATEST


def test_a_deadline_stored_past_the_range_closes_on_time_at_the_ranges_end(loop: Loop, clock: FakeClock) -> None:
    """A deadline granted before the range was checked may still be in the database when the incident closes."""
    order = only(loop.report(), ev.WorkOrderDispatched)
    req = only(loop.dept(ev.WorkOrderHandled, order, result="cleaned"), ev.VerificationRequested)
    with loop.uow() as uow:
        DispatchStore(uow).order(order.work_order_id, order.incident_id).deadline = datetime(9999, 12, 31, tzinfo=UTC)
        uow.commit()
    closed = only(loop.verify(req, passed=True), ev.IncidentClosed)
    assert closed.on_time and closed.deadline == LATEST


def test_extension_granted_moves_the_deadline_and_rearms_the_watchdog(loop: Loop, clock: FakeClock) -> None:
    order = only(loop.report(), ev.WorkOrderDispatched)
    with pytest.raises(Rejected, match="no pending extension"):
        loop.command(handlers.decide_extension, order.work_order_id, True, None, "", OPS)
    asked = order.deadline + timedelta(hours=48)
    loop.dept(ev.ExtensionRequested, order, requested_deadline=asked, reason="need a permit")
    granted, emitted = loop.command(handlers.decide_extension, order.work_order_id, True, None, "", OPS)
    assert isinstance(granted, ev.ExtensionGranted) and granted.new_deadline == asked
    assert granted.actor == OPS and emitted == [granted]
    with loop.uow() as uow:
        assert handlers.get_case(order.incident_id, uow).work_orders[0].deadline == asked
    assert loop.bus.query(handlers.pending_extensions) == []  # decided: no longer pending
    clock.advance(hours=30)
    assert loop.watch() == []
    with pytest.raises(NotFound):
        loop.command(handlers.decide_extension, "nope", True, None, "", OPS)


def test_extension_refused(loop: Loop) -> None:
    order = only(loop.report(), ev.WorkOrderDispatched)
    loop.dept(ev.ExtensionRequested, order, requested_deadline=order.deadline + timedelta(hours=1), reason="r")
    with loop.uow() as uow:
        [pending] = handlers.pending_extensions(uow)
    assert (pending.work_order_id, pending.extension_reason) == (order.work_order_id, "r")
    refused, _ = loop.command(handlers.decide_extension, order.work_order_id, False, None, "do it now", OPS)
    assert isinstance(refused, ev.ExtensionRefused) and refused.reason == "do it now"
    with loop.uow() as uow:
        assert handlers.get_case(order.incident_id, uow).work_orders[0].deadline == order.deadline


class CenterRuntime:
    """What dispatch's API uses of its Runtime: the loop's bus for commands and reads, tokens, the town."""

    def __init__(self, loop: Loop, auth: TokenStore) -> None:
        self.bus, self.auth, self.town = loop.bus, auth, GAOHANG

    def allow(self, *roles: Role) -> Any:
        return Depends(require(self.auth, *roles))

    async def command(self, handler: Callable[..., Any], *args: Any) -> Any:
        return self.bus.execute(handler, *args)[0]

    def query(self, handler: Callable[..., Any], *args: Any) -> Any:
        return self.bus.query(handler, *args)

    async def read(self, handler: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(self.bus.query, handler, *args)  # off the loop, as the runtime reads


def decide_over_http(loop: Loop, tmp_path: Path, work_order_id: str, body: dict[str, Any]) -> httpx.Response:
    auth = TokenStore(make_engine(f"sqlite:///{tmp_path / 'auth.sqlite'}"))
    token = auth.issue(Role.OPS_CENTER, "ops-duty")[0]

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_api(cast(Runtime, CenterRuntime(loop, auth))))
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://dispatch.test", headers=headers) as client:
            return await client.post(f"/work-orders/{work_order_id}/extension", json=body)

    try:
        return asyncio.run(post())
    finally:
        auth.engine.dispose()


OUT_OF_RANGE = "timestamps must be from 2000-01-01T00:00:00Z to 2100-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("new_deadline", "says"),
    [
        ("0001-01-01T00:00:00Z", OUT_OF_RANGE),
        ("0001-01-01T00:00:00+08:00", OUT_OF_RANGE),  # before year 1 in UTC
        ("9999-12-31T23:59:59Z", OUT_OF_RANGE),
        ("9999-12-31T23:59:59-14:00", OUT_OF_RANGE),  # after year 9999 in UTC
        ("2026-06-30T00:00:00", "timestamps must carry a timezone"),
    ],
)
def test_an_extension_granted_to_a_deadline_out_of_range_is_refused_with_the_reason(
    loop: Loop, tmp_path: Path, new_deadline: str, says: str
) -> None:
    order = only(loop.report(), ev.WorkOrderDispatched)
    loop.dept(ev.ExtensionRequested, order, requested_deadline=order.deadline + timedelta(hours=1), reason="r")
    r = decide_over_http(loop, tmp_path, order.work_order_id, {"grant": True, "new_deadline": new_deadline})
    assert r.status_code == 422, r.text
    [problem] = r.json()["details"]
    assert problem["field"] == "new_deadline"
    assert says in problem["problem"], problem
    with loop.uow() as uow:
        assert handlers.get_case(order.incident_id, uow).work_orders[0].deadline == order.deadline


def test_a_deadline_asked_for_before_the_range_was_checked_is_granted_only_to_a_deadline_in_range(
    loop: Loop, tmp_path: Path
) -> None:
    order = only(loop.report(), ev.WorkOrderDispatched)
    loop.dept(ev.ExtensionRequested, order, requested_deadline=order.deadline + timedelta(hours=1), reason="r")
    far = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)  # in the database from before
    with loop.uow() as uow:
        DispatchStore(uow).order(order.work_order_id, order.incident_id).extension_requested_until = far
        uow.commit()
    r = decide_over_http(loop, tmp_path, order.work_order_id, {"grant": True})
    assert r.status_code == 409, r.text
    assert "9999-12-31T23:59:59+00:00 is not from 2000-01-01T00:00:00Z to 2100-01-01T00:00:00Z" in r.json()["error"]
    asked = (order.deadline + timedelta(hours=48)).isoformat()
    r = decide_over_http(loop, tmp_path, order.work_order_id, {"grant": True, "new_deadline": asked})
    assert (r.status_code, r.json()["decision"]) == (200, "ExtensionGranted")


def test_redelivered_event_changes_nothing(loop: Loop) -> None:
    order = only(loop.report(), ev.WorkOrderDispatched)
    handled = ev.WorkOrderHandled.following(
        order,
        Actor(kind=ActorKind.DEPARTMENT, id="s"),
        work_order_id=order.work_order_id,
        department_code="city_ops",
        result="r",
    )
    assert only(loop.bus.handle(handled), ev.VerificationRequested)
    assert loop.bus.handle(handled) == []
    with loop.uow() as uow:
        assert handlers.get_case(order.incident_id, uow).status == "verifying"


def test_events_for_unknown_incidents_are_poison(loop: Loop) -> None:
    ghost = ev.WorkOrderAccepted(
        incident_id="nope", actor=WORKER, correlation_id="c", work_order_id="nope-1", department_code="city_ops"
    )
    with pytest.raises(UnknownIncident):
        loop.bus.handle(ghost)
    passed = ev.VerificationPassed(incident_id="nope", actor=WORKER, correlation_id="c", verification_id="v")
    with pytest.raises(UnknownIncident):
        loop.bus.handle(passed)


def test_concurrent_delivery_applies_once(loop: Loop) -> None:
    """Two consumers racing on one event (e.g. during a rebalance): exactly one applies it."""
    import threading

    report = ev.IncidentReported(
        incident_id="RACE",
        actor=WORKER,
        correlation_id="RACE",
        source="grid_worker",
        category_code="flooding",
        location=Location(lat=IN_GH01[0], lon=IN_GH01[1]),
        description="d",
        reporter_id="w",
        client_report_id="r",
    )
    barrier = threading.Barrier(4)
    results: list[int] = []

    def deliver() -> None:
        barrier.wait()
        results.append(len(loop.bus.handle(report)))

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 0, 0, 3]  # filed + two work orders, once


def _dispatch_state(engine: Engine) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[str, str]]]:
    from sqlmodel import Session, select

    from services.common.db import OutboxRecord
    from services.dispatch.models import DispatchCase, DispatchWorkOrder

    with Session(engine) as s:
        cases = sorted(
            (c.incident_id, c.status, c.merged_into, c.duplicates, c.verification_round, c.rework_count, c.return_count)
            for c in s.exec(select(DispatchCase))
        )
        orders = sorted(
            (o.work_order_id, o.incident_id, o.department_code, o.status, o.attempt)
            for o in s.exec(select(DispatchWorkOrder))
        )
        emitted = sorted((r.type, r.incident_id) for r in s.exec(select(OutboxRecord)))
    return cases, orders, emitted


def test_a_history_applied_in_batches_ends_as_applied_one_at_a_time(
    make_db: Callable[[tuple[sa.Table, ...]], Engine], clock: FakeClock
) -> None:
    """The consumer applies what is waiting as one batch, with the batch's rows preloaded and one flush at the
    commit: merges within a batch, big incidents, returns, rework and closing must end exactly as one by one."""
    policy = DispatchSettings(max_returns=2, escalate_after_hours=24)
    loop = Loop(make_db(TABLES), clock, policy)
    applied: list[Event] = []
    handle = loop.bus.handle

    def record(event: Event) -> list[Event]:
        applied.append(event)
        return handle(event)

    loop.bus.handle = record  # type: ignore[method-assign]
    parking = only(loop.report("illegal_parking", (31.2800, 121.5700)), ev.WorkOrderDispatched)
    only(loop.report("illegal_parking", (31.2801, 121.5701)), ev.IncidentMerged)  # into the first
    garbage = only(loop.report("exposed_garbage", (31.2801, 121.5701)), ev.WorkOrderDispatched)
    flooding = [e for e in loop.report("flooding") if isinstance(e, ev.WorkOrderDispatched)]
    spot = only(loop.report(handled_on_spot=True, evidence_urls=["https://e.test/a.jpg"]), ev.VerificationRequested)
    signage = only(loop.report("illegal_signage", (31.2850, 121.5750)), ev.WorkOrderDispatched)
    loop.dept(ev.WorkOrderAccepted, parking)
    loop.verify(only(loop.dept(ev.WorkOrderHandled, parking, result="moved"), ev.VerificationRequested), True)
    failed = only(loop.dept(ev.WorkOrderHandled, garbage, result="cleaned"), ev.VerificationRequested)
    rework = only(loop.verify(failed, passed=False, note="still dirty"), ev.IncidentReworked)
    loop.verify(only(loop.dept(ev.WorkOrderHandled, rework, result="again"), ev.VerificationRequested), True)
    assert loop.dept(ev.WorkOrderHandled, flooding[0], result="pumped") == []
    loop.verify(only(loop.dept(ev.WorkOrderHandled, flooding[1], result="cleared"), ev.VerificationRequested), True)
    loop.verify(spot, passed=False, note="not fixed")
    rerouted = only(loop.dept(ev.WorkOrderReturned, signage, reason="not ours"), ev.WorkOrderDispatched)
    loop.dept(ev.WorkOrderReturned, rerouted, reason="not ours either")
    expected = _dispatch_state(loop.engine)
    assert [c[1] for c in expected[0]].count("closed") == 3 and ("IncidentMerged", "GL-1") not in expected[2]

    for size in (2, 3, 5, len(applied)):
        engine = make_db(TABLES)
        bus = MessageBus(functools.partial(UnitOfWork, engine, clock=clock), handlers.bind(policy), PRELOAD)
        for i in range(0, len(applied), size):
            bus.handle_batch(applied[i : i + size])
        assert _dispatch_state(engine) == expected, size


def test_a_batch_reads_its_cases_and_work_orders_in_three_queries(
    make_db: Callable[[tuple[sa.Table, ...]], Engine], clock: FakeClock
) -> None:
    """The preload reads what the batch's handlers then ask for one by one: they read nothing more."""
    loop = Loop(make_db(TABLES), clock, DispatchSettings())
    garbage = only(loop.report("exposed_garbage"), ev.WorkOrderDispatched)
    flooding = [e for e in loop.report("flooding") if isinstance(e, ev.WorkOrderDispatched)]
    staff = Actor(kind=ActorKind.DEPARTMENT, id="staff")
    batch: list[Event] = [
        ev.WorkOrderAccepted.following(
            garbage, staff, work_order_id=garbage.work_order_id, department_code=garbage.department_code
        ),
        *(
            ev.WorkOrderHandled.following(o, staff, work_order_id=o.work_order_id, department_code="x", result="r")
            for o in (garbage, *flooding)
        ),
    ]
    statements: list[str] = []
    sa.event.listen(loop.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    bus = MessageBus(loop.uow, handlers.bind(loop.policy), PRELOAD)
    emitted = bus.handle_batch(batch)
    assert [e.type for e in emitted] == ["VerificationRequested", "VerificationRequested"]
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 3, "\n".join(selects)


def test_the_merge_candidates_are_the_stored_ones_in_the_box_and_those_added_in_this_unit(loop: Loop) -> None:
    from services.dispatch import domain

    first = only(loop.report("illegal_parking", (31.2800, 121.5700)), ev.IncidentFiled)
    loop.report("illegal_parking", (31.3000, 121.6000))  # far: outside the box
    loop.report("exposed_garbage", (31.2800, 121.5700))  # another category
    with loop.uow() as uow:
        store = DispatchStore(uow)
        here = ev.IncidentReported.following(
            first,
            WORKER,
            source="grid_worker",
            category_code="illegal_parking",
            location=Location(lat=31.2800, lon=121.5700),
            description="d",
            reporter_id="w",
            client_report_id="x",
        )
        pending = domain.open_case(here.model_copy(update={"incident_id": "NEW"}), GAOHANG)
        store.add_case(pending)
        search = domain.merge_search(pending, GAOHANG, loop.policy, store.moment())
        assert search is not None
        assert sorted(c.incident_id for c in store.merge_candidates(search)) == [first.incident_id, "NEW"]
