"""handling's rules without a broker: work orders from the center, department actions, webhook deliveries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import orjson
import pytest
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from schemas import Actor, ActorKind, Event, Location, WorkOrderStatus, decode_event
from schemas import events as ev
from services.common.bus import MessageBus
from services.common.changes import Changes
from services.common.db import OutboxRecord, UnitOfWork, create_tables, make_engine
from services.common.errors import NotFound, Rejected, UnknownIncident
from services.common.runtime import Runtime
from services.handling import handlers
from services.handling.agents import deliver_due_webhooks, webhook_client
from services.handling.api import build_api
from services.handling.models import (
    TABLES,
    AcceptWorkOrder,
    AcceptWorkOrders,
    HandleWorkOrder,
    HandleWorkOrders,
    HandlingWebhookDelivery,
    HandlingWorkOrder,
    RequestExtension,
    ReturnWorkOrder,
    WorkOrderPublic,
)
from services.handling.settings import HandlingSettings

T0 = datetime(2025, 6, 2, 1, 0, tzinfo=UTC)
HOOK = "http://city-ops.example.test/gridloop"

Action = Callable[[str, Any, UnitOfWork], Any]
T = TypeVar("T")


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class World:
    """One handling service's database, bus and clock."""

    def __init__(self, engine: Engine, policy: HandlingSettings, clock: Clock) -> None:
        self.engine, self.policy, self.clock = engine, policy, clock
        self.changes = Changes()
        self.bus = MessageBus(self.uow, handlers.bind(policy), handlers.preload)  # as the service has it

    def uow(self) -> UnitOfWork:
        return UnitOfWork(self.engine, clock=self.clock, on_commit=self.changes.notify)

    def order(self, work_order_id: str = "GL-1-1") -> HandlingWorkOrder:
        with Session(self.engine) as s:
            row = s.get(HandlingWorkOrder, work_order_id)
            assert row is not None
            return row

    def deliveries(self) -> list[HandlingWebhookDelivery]:
        with Session(self.engine) as s:
            return list(s.exec(select(HandlingWebhookDelivery).order_by(col(HandlingWebhookDelivery.id))).all())

    def outbox(self) -> list[Event]:
        with Session(self.engine) as s:
            rows = s.exec(select(OutboxRecord).order_by(col(OutboxRecord.id))).all()
            return [decode_event(r.payload) for r in rows]

    def act(self, fn: Action, cmd: Any, work_order_id: str = "GL-1-1") -> str:
        done, _ = self.bus.execute(fn, work_order_id, cmd)
        return str(done.status)

    def query(self, fn: Callable[..., T], *args: Any) -> T:
        return self.bus.query(fn, *args)

    async def command(self, fn: Callable[..., T], *args: Any) -> T:
        return self.bus.execute(fn, *args)[0]


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def policy(tmp_path: Path) -> HandlingSettings:
    return HandlingSettings(var_dir=tmp_path, webhooks={"city_ops": HOOK}, webhook_max_attempts=4)


@pytest.fixture
def world(tmp_path: Path, policy: HandlingSettings, clock: Clock) -> Iterator[World]:
    engine = make_engine(f"sqlite:///{tmp_path / 'handling.sqlite'}")
    create_tables(engine, TABLES)
    yield World(engine, policy, clock)
    engine.dispose()


def _center() -> Actor:
    return Actor.system("dispatch")


def dispatched(
    work_order_id: str = "GL-1-1", department: str = "city_ops", incident_id: str = "GL-1", **fields: Any
) -> ev.WorkOrderDispatched:
    values: dict[str, Any] = dict(
        incident_id=incident_id,
        actor=_center(),
        correlation_id=f"corr-{incident_id}",
        occurred_at=T0,
        work_order_id=work_order_id,
        department_code=department,
        category_code="exposed_garbage",
        grid_id="gh06",
        location=Location(lat=31.285, lon=121.575, address="东靖路 1 号"),
        description="garbage by the road",
        photo_urls=["https://img.example.test/1.jpg"],
        priority=3,
        deadline=T0 + timedelta(hours=24),
    )
    values.update(fields)
    return ev.WorkOrderDispatched(**values)


WHO: dict[str, Any] = {"actor_id": "cityops-zhang", "department_code": "city_ops"}


def accept(department: str = "city_ops") -> AcceptWorkOrder:
    return AcceptWorkOrder(actor_id="cityops-zhang", department_code=department)


def handle(**fields: Any) -> HandleWorkOrder:
    values: dict[str, Any] = dict(
        actor_id="cityops-zhang",
        department_code="city_ops",
        result="cleared",
        evidence_urls=["https://img.example.test/after.jpg"],
    )
    values.update(fields)
    return HandleWorkOrder(**values)


def extension(until: datetime, department: str = "city_ops") -> RequestExtension:
    return RequestExtension(
        actor_id="cityops-zhang", department_code=department, requested_deadline=until, reason="needs a truck"
    )


def returned(department: str = "city_ops") -> ReturnWorkOrder:
    return ReturnWorkOrder(actor_id="cityops-zhang", department_code=department, reason="not ours: river bank")


def follow(cause: Event, cls: type[Event], **fields: Any) -> Event:
    return cls.following(cause, _center(), occurred_at=T0 + timedelta(hours=2), **fields)


def reworked(cause: Event, deadline: datetime, n: int = 1, work_order_id: str = "GL-1-1") -> Event:
    return follow(
        cause,
        ev.IncidentReworked,
        work_order_id=work_order_id,
        department_code="city_ops",
        rework_count=n,
        note="still garbage behind the bin",
        deadline=deadline,
    )


# -- events from the center ---------------------------------------------------------------------------


def test_a_dispatched_work_order_lands_in_the_queue(world: World) -> None:
    event = dispatched()
    assert world.bus.handle(event) == []
    o = world.order()
    assert (o.incident_id, o.correlation_id, o.department_code, o.status) == (
        "GL-1",
        "corr-GL-1",
        "city_ops",
        "dispatched",
    )
    assert (o.role, o.coordinator, o.category_code, o.grid_id, o.priority, o.attempt) == (
        "lead",
        None,
        "exposed_garbage",
        "gh06",
        3,
        1,
    )
    assert (o.lat, o.lon, o.address, o.extension_status) == (31.285, 121.575, "东靖路 1 号", "none")
    assert o.photo_urls == "https://img.example.test/1.jpg"
    public = world.query(handlers.get_work_order, "GL-1-1")
    assert public.deadline == T0 + timedelta(hours=24) and public.deadline.tzinfo is not None
    assert public.dispatched_at == T0 and public.overdue is False


def test_a_redelivered_or_repeated_dispatch_changes_nothing(world: World) -> None:
    event = dispatched()
    world.bus.handle(event)
    world.bus.handle(event)  # same event id
    world.bus.handle(dispatched(department="env_rectification", priority=1))  # same work order, new event id
    o = world.order()
    assert (o.department_code, o.priority) == ("city_ops", 3)
    assert len(world.deliveries()) == 1


def test_rework_extension_decisions_and_closure_follow_the_center(world: World, clock: Clock) -> None:
    first = dispatched()
    world.bus.handle(first)
    world.act(handlers.accept_work_order, accept())
    world.act(handlers.handle_work_order, handle())

    new_deadline = T0 + timedelta(hours=30)
    world.bus.handle(reworked(first, new_deadline))
    o = world.order()
    assert (o.status, o.rework_count, o.last_note) == ("rework", 1, "still garbage behind the bin")
    assert world.query(handlers.get_work_order, "GL-1-1").deadline == new_deadline

    world.act(handlers.request_extension, extension(T0 + timedelta(hours=40)))
    world.bus.handle(
        follow(
            first,
            ev.ExtensionGranted,
            work_order_id="GL-1-1",
            department_code="city_ops",
            new_deadline=T0 + timedelta(hours=40),
        )
    )
    public = world.query(handlers.get_work_order, "GL-1-1")
    assert (public.extension_status, public.deadline) == ("granted", T0 + timedelta(hours=40))

    world.act(handlers.request_extension, extension(T0 + timedelta(hours=50)))  # allowed again once decided
    world.bus.handle(
        follow(
            first, ev.ExtensionRefused, work_order_id="GL-1-1", department_code="city_ops", reason="no: finish it today"
        )
    )
    o = world.order()
    assert (o.extension_status, o.last_note) == ("refused", "no: finish it today")
    assert world.query(handlers.get_work_order, "GL-1-1").deadline == T0 + timedelta(hours=40)

    world.act(handlers.handle_work_order, handle(result="cleared again"))
    closed = follow(
        first,
        ev.IncidentClosed,
        category_code="exposed_garbage",
        grid_id="gh06",
        departments=["city_ops"],
        reported_at=T0,
        deadline=T0 + timedelta(hours=40),
        on_time=True,
        rework_count=1,
        return_count=0,
    )
    world.bus.handle(closed)
    assert world.order().status == "closed"


def _closed(incident_id: str = "GL-1", **fields: Any) -> Event:
    values: dict[str, Any] = dict(
        incident_id=incident_id,
        actor=_center(),
        correlation_id=f"corr-{incident_id}",
        category_code="exposed_garbage",
        grid_id="gh06",
        departments=["civic_creation"],
        reported_at=T0,
        deadline=None,
        on_time=True,
        rework_count=0,
        return_count=0,
    )
    values.update(fields)
    return ev.IncidentClosed(**values)


def test_closure_touches_only_handled_work_orders(world: World) -> None:
    world.bus.handle(dispatched("GL-1-1"))
    world.bus.handle(dispatched("GL-1-2", department="civic_creation", attempt=2))
    world.act(handlers.return_work_order, returned(), "GL-1-1")
    world.act(handlers.accept_work_order, accept("civic_creation"), "GL-1-2")
    world.act(handlers.handle_work_order, handle(department_code="civic_creation"), "GL-1-2")
    world.bus.handle(_closed(return_count=1))
    assert (world.order("GL-1-1").status, world.order("GL-1-2").status) == ("returned", "closed")


def test_a_batch_reads_its_work_orders_at_once_and_applies_as_one_at_a_time_would(world: World) -> None:
    """One batch: a work order dispatched twice (a new event id), another's rework, and two closures — one of an
    incident whose order is handled, one of an incident whose order this same batch dispatched."""
    first = dispatched("GL-1-1")
    world.bus.handle(first)
    world.bus.handle(dispatched("GL-2-1", incident_id="GL-2"))
    world.act(handlers.accept_work_order, accept(), "GL-2-1")
    world.act(handlers.handle_work_order, handle(), "GL-2-1")
    fresh = dispatched("GL-3-1", incident_id="GL-3")
    batch = [
        reworked(first, T0 + timedelta(hours=30)),
        fresh,
        dispatched("GL-3-1", incident_id="GL-3", department="env_rectification"),  # same order, new event id
        _closed("GL-2"),
        _closed("GL-3"),
    ]
    assert world.bus.handle_batch(batch) == []
    assert (world.order("GL-1-1").status, world.order("GL-1-1").rework_count) == ("rework", 1)
    assert world.order("GL-2-1").status == "closed"
    o = world.order("GL-3-1")
    assert (o.status, o.department_code) == ("dispatched", "city_ops")  # not handled: closure leaves it
    assert [(d.work_order_id, d.event_type) for d in world.deliveries()] == [
        ("GL-1-1", "WorkOrderDispatched"),
        ("GL-2-1", "WorkOrderDispatched"),
        ("GL-1-1", "IncidentReworked"),
        ("GL-3-1", "WorkOrderDispatched"),  # once: the repeat changed nothing
    ]


def test_closure_of_an_incident_without_work_orders_is_not_an_error(world: World) -> None:
    """An incident fixed on the spot (小事一格解决) is closed without ever reaching a department."""
    world.bus.handle(_closed("GL-9", departments=[], handled_on_spot=True))


@pytest.mark.parametrize("kind", ["rework", "granted", "refused"])
@pytest.mark.parametrize(
    ("work_order_id", "incident_id"),
    [("GL-1-7", "GL-1"), ("GL-1-1", "GL-2")],
    ids=["unknown work order", "known work order under another incident"],
)
def test_an_event_about_an_unknown_work_order_is_poison(
    world: World, kind: str, work_order_id: str, incident_id: str
) -> None:
    world.bus.handle(dispatched("GL-1-1", incident_id="GL-1"))
    cause = dispatched(work_order_id, incident_id=incident_id)
    make: dict[str, Callable[[], Event]] = {
        "rework": lambda: reworked(cause, T0 + timedelta(hours=30), work_order_id=work_order_id),
        "granted": lambda: follow(
            cause,
            ev.ExtensionGranted,
            work_order_id=work_order_id,
            department_code="city_ops",
            new_deadline=T0 + timedelta(hours=40),
        ),
        "refused": lambda: follow(
            cause, ev.ExtensionRefused, work_order_id=work_order_id, department_code="city_ops", reason="no"
        ),
    }
    with pytest.raises(UnknownIncident):
        world.bus.handle(make[kind]())
    o = world.order("GL-1-1")
    assert (o.status, o.extension_status, o.rework_count) == ("dispatched", "none", 0)


# -- department actions --------------------------------------------------------------------------------


def test_accept_emits_work_order_accepted_in_the_incidents_correlation(world: World, clock: Clock) -> None:
    world.bus.handle(dispatched())
    clock.advance(minutes=5)
    done, (event,) = world.bus.execute(handlers.accept_work_order, "GL-1-1", accept())
    assert (done.work_order_id, done.status) == ("GL-1-1", "accepted")
    assert isinstance(event, ev.WorkOrderAccepted)
    assert (event.incident_id, event.correlation_id, event.work_order_id, event.department_code) == (
        "GL-1",
        "corr-GL-1",
        "GL-1-1",
        "city_ops",
    )
    assert (event.actor.kind, event.actor.id, event.actor.department) == (
        ActorKind.DEPARTMENT,
        "cityops-zhang",
        "city_ops",
    )
    assert event.occurred_at == clock.now
    assert [e.event_id for e in world.outbox()] == [event.event_id]
    o = world.order()
    assert o.status == "accepted" and o.accepted_at is not None
    with pytest.raises(Rejected, match="accepted"):
        world.act(handlers.accept_work_order, accept())


@pytest.mark.parametrize(
    ("fn", "cmd"),
    [
        (handlers.accept_work_order, accept("env_rectification")),
        (handlers.return_work_order, returned("env_rectification")),
        (handlers.request_extension, extension(T0 + timedelta(hours=48), "env_rectification")),
        (handlers.handle_work_order, handle(department_code="env_rectification")),
    ],
)
def test_another_departments_order_is_not_found_as_an_unknown_one(world: World, fn: Any, cmd: Any) -> None:
    world.bus.handle(dispatched())
    if fn is not handlers.accept_work_order:
        world.act(handlers.accept_work_order, accept())
    status = world.order().status
    with pytest.raises(NotFound, match=r"^no work order GL-1-1$"):
        world.act(fn, cmd)
    with pytest.raises(NotFound, match=r"^no work order GL-404-1$"):
        world.act(fn, cmd, "GL-404-1")
    assert world.order().status == status and len(world.outbox()) == (0 if status == "dispatched" else 1)


@pytest.mark.parametrize("accept_first", [False, True])
def test_return_from_dispatched_or_accepted(world: World, accept_first: bool) -> None:
    world.bus.handle(dispatched())
    if accept_first:
        world.act(handlers.accept_work_order, accept())
    assert world.act(handlers.return_work_order, returned()) == "returned"
    event = world.outbox()[-1]
    assert isinstance(event, ev.WorkOrderReturned) and event.reason == "not ours: river bank"
    with pytest.raises(Rejected, match="returned"):  # the other actions' refusals: test_handling_domain
        world.act(handlers.accept_work_order, accept())


def test_return_needs_a_reason_and_is_refused_once_handled(world: World) -> None:
    with pytest.raises(ValidationError):
        ReturnWorkOrder(actor_id="a", department_code="city_ops", reason="  ")
    world.bus.handle(dispatched())
    world.act(handlers.accept_work_order, accept())
    world.act(handlers.handle_work_order, handle())
    with pytest.raises(Rejected):
        world.act(handlers.return_work_order, returned())


def test_an_extension_request_is_kept_and_sent(world: World, clock: Clock) -> None:
    """The rules are test_handling_domain's; here: the time they are asked at, the request kept, the event sent."""
    world.bus.handle(dispatched())
    later = T0 + timedelta(hours=48)
    world.act(handlers.accept_work_order, accept())
    clock.advance(hours=60)  # overdue: a deadline later than the old one but already past is no use
    with pytest.raises(Rejected, match="past"):
        world.act(handlers.request_extension, extension(later))
    clock.now = T0 + timedelta(hours=1)

    assert world.act(handlers.request_extension, extension(later)) == "accepted"
    event = world.outbox()[-1]
    assert isinstance(event, ev.ExtensionRequested)
    assert (event.requested_deadline, event.reason, event.correlation_id) == (later, "needs a truck", "corr-GL-1")
    o = world.order()
    assert o.extension_status == "requested" and o.requested_deadline == later.replace(tzinfo=None)
    with pytest.raises(Rejected, match="pending"):
        world.act(handlers.request_extension, extension(later + timedelta(hours=1)))


def test_extension_request_needs_an_aware_deadline_and_a_reason() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        RequestExtension(
            actor_id="a", department_code="city_ops", requested_deadline=datetime(2025, 6, 3, 12), reason="r"
        )
    with pytest.raises(ValidationError):
        RequestExtension(actor_id="a", department_code="city_ops", requested_deadline=T0, reason="")
    cmd = RequestExtension.model_validate(
        {
            "actor_id": "a",
            "department_code": "city_ops",
            "reason": "r",
            "requested_deadline": "2025-06-03T18:00:00+08:00",
        }
    )
    assert cmd.requested_deadline == datetime(2025, 6, 3, 10, tzinfo=UTC)


def test_handle_from_accepted_or_rework_only(world: World, clock: Clock) -> None:
    first = dispatched()
    world.bus.handle(first)
    with pytest.raises(Rejected, match="dispatched"):
        world.act(handlers.handle_work_order, handle())
    world.act(handlers.accept_work_order, accept())
    clock.advance(hours=3)
    assert world.act(handlers.handle_work_order, handle()) == "handled"
    event = world.outbox()[-1]
    assert isinstance(event, ev.WorkOrderHandled)
    assert (event.result, [str(u) for u in event.evidence_urls]) == ("cleared", ["https://img.example.test/after.jpg"])
    public = world.query(handlers.get_work_order, "GL-1-1")
    assert (public.status, public.result, public.handled_at) == ("handled", "cleared", clock.now)
    assert public.evidence_urls == ["https://img.example.test/after.jpg"]
    with pytest.raises(Rejected, match="handled"):
        world.act(handlers.handle_work_order, handle())
    with pytest.raises(Rejected, match="handled"):
        world.act(handlers.request_extension, extension(T0 + timedelta(hours=48)))

    world.bus.handle(reworked(first, T0 + timedelta(hours=30)))
    assert world.act(handlers.handle_work_order, handle(result="cleared behind the bin too")) == "handled"


def test_handle_validates_result_and_evidence() -> None:
    with pytest.raises(ValidationError):
        handle(result="")
    with pytest.raises(ValidationError):
        handle(evidence_urls=["ftp://img.example.test/a.jpg"])
    with pytest.raises(ValidationError):
        handle(evidence_urls=[f"https://img.example.test/{i}.jpg" for i in range(11)])
    with pytest.raises(ValidationError):
        HandleWorkOrder.model_validate({"actor_id": "a", "department_code": "city_ops", "result": "x", "extra": 1})
    assert handle(evidence_urls=[]).evidence_urls == []


# -- queries ----------------------------------------------------------------------------------------------


def test_the_queue_filters_and_orders_by_deadline(world: World, clock: Clock) -> None:
    world.bus.handle(dispatched("GL-1-1", deadline=T0 + timedelta(hours=24)))
    world.bus.handle(dispatched("GL-2-1", incident_id="GL-2", deadline=T0 + timedelta(hours=2)))
    world.bus.handle(dispatched("GL-3-1", incident_id="GL-3", deadline=T0 + timedelta(hours=8)))
    world.bus.handle(dispatched("GL-4-1", incident_id="GL-4", department="river_chief"))
    world.act(handlers.accept_work_order, accept(), "GL-3-1")
    world.act(handlers.handle_work_order, handle(), "GL-3-1")
    clock.advance(hours=10)

    def queue(
        department: str | None = None, status: str | None = None, overdue: bool | None = None, **page: int
    ) -> list[WorkOrderPublic]:
        return world.query(
            handlers.list_work_orders, department, status, overdue, page.get("limit", 100), page.get("offset", 0)
        )

    assert [(o.work_order_id, o.overdue) for o in queue("city_ops")] == [
        ("GL-2-1", True),
        ("GL-3-1", False),
        ("GL-1-1", False),
    ]
    assert [o.work_order_id for o in queue("city_ops", overdue=True)] == ["GL-2-1"]
    assert [o.work_order_id for o in queue("city_ops", overdue=False)] == ["GL-3-1", "GL-1-1"]
    assert [o.work_order_id for o in queue(status="handled")] == ["GL-3-1"]
    assert [o.work_order_id for o in queue(limit=2, offset=1)] == ["GL-3-1", "GL-1-1"]
    with pytest.raises(NotFound):
        world.query(handlers.get_work_order, "nope")


# -- webhooks ---------------------------------------------------------------------------------------------


def test_webhook_deliveries_are_queued_only_for_departments_with_a_webhook(world: World) -> None:
    first = dispatched()
    world.bus.handle(first)
    world.bus.handle(dispatched("GL-2-1", incident_id="GL-2", department="river_chief"))
    world.act(handlers.accept_work_order, accept())
    world.act(handlers.handle_work_order, handle())
    rework = reworked(first, T0 + timedelta(hours=30))
    world.bus.handle(rework)
    world.bus.handle(
        follow(first, ev.ExtensionRefused, work_order_id="GL-1-1", department_code="city_ops", reason="no")
    )
    rows = world.deliveries()
    assert [(r.work_order_id, r.department_code, r.url, r.event_type, r.status, r.attempts) for r in rows] == [
        ("GL-1-1", "city_ops", HOOK, "WorkOrderDispatched", "pending", 0),
        ("GL-1-1", "city_ops", HOOK, "IncidentReworked", "pending", 0),
    ]
    assert decode_event(rows[0].payload) == first
    assert decode_event(rows[1].payload) == rework
    world.bus.handle(rework)  # redelivered: no second push
    assert len(world.deliveries()) == 2


class Receiver:
    """A department's system: answers the scripted status codes (or raises), records what it got."""

    def __init__(self, *script: int | Exception) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.script.pop(0) if self.script else 200
        if isinstance(step, Exception):
            raise step
        return httpx.Response(step, text="busy" if step >= 400 else "ok")

    def deliver(self, world: World) -> int:
        async def run() -> int:
            async with webhook_client(world.policy, httpx.MockTransport(self)) as client:
                return await deliver_due_webhooks(world.command, world.policy, client)

        return asyncio.run(run())


def test_the_deliverer_pushes_the_event_json(world: World) -> None:
    event = dispatched()
    world.bus.handle(event)
    receiver = Receiver(200)
    assert receiver.deliver(world) == 1
    (request,) = receiver.requests
    assert (request.method, str(request.url)) == ("POST", HOOK)
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-gridloop-event-id"] == event.event_id
    assert request.headers["x-gridloop-event-type"] == "WorkOrderDispatched"
    assert orjson.loads(request.content) == orjson.loads(event.model_dump_json())
    (row,) = world.deliveries()
    assert (row.status, row.attempts, row.last_error) == ("delivered", 1, "")
    assert receiver.deliver(world) == 0  # nothing left to send
    assert len(receiver.requests) == 1


def test_the_deliverer_backs_off_then_delivers(world: World, clock: Clock) -> None:
    world.bus.handle(dispatched())
    receiver = Receiver(500, httpx.ConnectError("connection refused"), 503, 200)
    for expected_wait in (1, 2, 4):
        assert receiver.deliver(world) == 1
        (row,) = world.deliveries()
        assert row.status == "pending"
        wait = (row.next_attempt_at.replace(tzinfo=UTC) - clock.now).total_seconds()
        assert wait == expected_wait
        clock.advance(seconds=wait - 0.1)
        assert receiver.deliver(world) == 0  # not due yet
        clock.advance(seconds=0.1)
    assert "503" in world.deliveries()[0].last_error
    assert receiver.deliver(world) == 1
    (row,) = world.deliveries()
    assert (row.status, row.attempts, len(receiver.requests)) == ("delivered", 4, 4)
    assert [r.headers["x-gridloop-attempt"] for r in receiver.requests] == ["1", "2", "3", "4"]


def test_the_deliverer_gives_up_after_the_last_attempt(world: World, clock: Clock) -> None:
    world.bus.handle(dispatched())
    receiver = Receiver(*[500] * 10)
    for _ in range(10):
        receiver.deliver(world)
        clock.advance(seconds=600)
    (row,) = world.deliveries()
    assert (row.status, row.attempts, len(receiver.requests)) == ("failed", 4, 4)
    assert row.last_error.startswith("HTTP 500")
    failed = world.query(handlers.list_webhook_deliveries, "failed", None, 100, 0)
    assert [(d.status, d.attempts, d.delivered_at) for d in failed] == [("failed", 4, None)]
    assert failed[0].next_attempt_at.tzinfo is not None
    assert world.query(handlers.list_webhook_deliveries, "pending", None, 100, 0) == []


def test_a_claimed_delivery_is_not_sent_twice(world: World) -> None:
    world.bus.handle(dispatched())
    (job,), _ = world.bus.execute(handlers.claim_due_webhooks, world.policy)
    assert world.bus.execute(handlers.claim_due_webhooks, world.policy) == ([], [])
    assert world.bus.execute(handlers.record_webhook_attempt, job.id, None, world.policy) == ("delivered", [])


def test_webhooks_setting_reads_json_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRIDLOOP_HANDLING_WEBHOOKS", '{"city_ops": "https://ops.example.test/hook"}')
    assert HandlingSettings(var_dir=tmp_path).webhooks == {"city_ops": "https://ops.example.test/hook"}
    monkeypatch.setenv("GRIDLOOP_HANDLING_WEBHOOKS", '{"city_ops": "ftp://ops.example.test/hook"}')
    with pytest.raises(ValidationError):
        HandlingSettings(var_dir=tmp_path)
    monkeypatch.delenv("GRIDLOOP_HANDLING_WEBHOOKS")
    s = HandlingSettings(var_dir=tmp_path)
    assert (s.webhooks, s.webhook_max_attempts, s.http_port, s.service) == ({}, 8, 8102, "handling")


# -- HTTP edge --------------------------------------------------------------------------------------------


OPS_TOKEN: list[str] = []


class FakeRuntime:
    """The runtime as the API sees it, with the real command and query (through the world's bus)."""

    command = Runtime.command
    query = Runtime.query

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(self.bus.query, fn, *args)  # off the loop, as the runtime reads

    def __init__(self, world: World) -> None:
        import tempfile

        from fastapi import Depends

        from services.common.auth import Role, TokenStore, require
        from services.common.db import make_engine

        self.bus = world.bus
        self.changes = world.changes
        self.flushed = 0
        self.auth = TokenStore(make_engine(f"sqlite:///{tempfile.mkdtemp()}/auth.sqlite"))
        self.token = self.auth.issue(Role.DEPARTMENT, "cityops-zhang", department="city_ops")[0]
        OPS_TOKEN[:] = [self.auth.issue(Role.OPS_CENTER, "ops-duty")[0]]
        self.allow = lambda *roles: Depends(require(self.auth, *roles))

    async def flush_outbox(self) -> None:
        self.flushed += 1


def test_a_desk_waiting_on_its_empty_queue_gets_a_new_work_order_as_soon_as_it_lands(world: World) -> None:
    """The long poll: ``wait`` holds an empty answer until the department's queue changes, or until it runs out."""

    async def session() -> None:
        runtime = FakeRuntime(world)
        transport = httpx.ASGITransport(app=build_api(cast(Runtime, runtime)))
        headers = {"Authorization": f"Bearer {runtime.token}"}
        params = {"status": "dispatched", "wait": "10"}
        async with httpx.AsyncClient(transport=transport, base_url="http://handling.test", headers=headers) as client:
            r = await client.get("/work-orders", params={**params, "wait": "0.2"})
            assert r.status_code == 200 and r.json() == []  # nothing came: empty when the wait runs out
            waiting = asyncio.create_task(client.get("/work-orders", params=params))
            await asyncio.sleep(0.2)
            world.bus.handle(dispatched("GL-9-1", department="water", incident_id="GL-9"))  # another office's
            await asyncio.sleep(0.2)
            assert not waiting.done()
            started = time.monotonic()
            world.bus.handle(dispatched())
            r = await asyncio.wait_for(waiting, 5)
            assert time.monotonic() - started < 5
            assert [o["work_order_id"] for o in r.json()] == ["GL-1-1"]
            r = await client.get("/work-orders", params={**params, "wait": "31"})
            assert r.status_code == 422 and "wait" in r.text  # at most 30 s

    asyncio.run(session())


def test_the_api_answers_actions_and_errors(world: World) -> None:
    world.bus.handle(dispatched())
    runtime = FakeRuntime(world)
    asyncio.run(_api_session(runtime))
    assert runtime.flushed == 3


async def _api_session(runtime: FakeRuntime) -> None:
    transport = httpx.ASGITransport(app=build_api(cast(Runtime, runtime)))
    headers = {"Authorization": f"Bearer {runtime.token}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://handling.test", headers=headers) as client:
        await _api_calls(client)


async def _api_calls(client: httpx.AsyncClient) -> None:
    who = {"actor_id": "cityops-zhang", "department_code": "city_ops"}

    r = await client.get("/work-orders", params={"department": "city_ops"})
    assert r.status_code == 200, r.text
    assert [o["work_order_id"] for o in r.json()] == ["GL-1-1"]
    assert (await client.get("/work-orders", params={"status": "bogus"})).status_code == 422
    assert (await client.get("/work-orders", params={"limit": 501})).status_code == 422
    assert (await client.get("/work-orders/GL-404-1")).status_code == 404

    r = await client.post("/work-orders/GL-1-1/accept", json={**who, "department_code": "river_chief"})
    assert r.status_code == 403
    assert (await client.post("/work-orders/GL-1-1/accept", json={**who, "extra": 1})).status_code == 422
    r = await client.post("/work-orders/GL-1-1/accept", json=who)
    assert (r.status_code, r.json()) == (202, {"work_order_id": "GL-1-1", "status": "accepted"})
    r = await client.post("/work-orders/GL-1-1/accept", json=who)
    assert r.status_code == 409 and "accepted" in r.json()["error"]
    r = await client.post(
        "/work-orders/GL-1-1/extension", json={**who, "requested_deadline": "2025-06-04T12:00:00", "reason": "r"}
    )
    assert r.status_code == 422
    r = await client.post(
        "/work-orders/GL-1-1/extension",
        json={**who, "requested_deadline": "2099-06-04T12:00:00+08:00", "reason": "truck"},
    )
    assert (r.status_code, r.json()["status"]) == (202, "accepted")
    r = await client.post("/work-orders/GL-1-1/handle", json={**who, "result": "done", "evidence_urls": ["x"]})
    assert r.status_code == 422
    r = await client.post("/work-orders/GL-1-1/handle", json={**who, "result": "done"})
    assert (r.status_code, r.json()["status"]) == (202, "handled")
    r = await client.post("/work-orders/GL-1-1/return", json={**who, "reason": "x"})
    assert r.status_code == 409
    assert (await client.post("/work-orders/GL-404-1/return", json={**who, "reason": "x"})).status_code == 404

    r = await client.get("/work-orders/GL-1-1")
    assert (r.json()["status"], r.json()["extension_status"], r.json()["overdue"]) == ("handled", "none", False)
    assert (await client.get("/webhook-deliveries")).status_code == 403  # department staff: not theirs to see
    client.headers["Authorization"] = f"Bearer {OPS_TOKEN[0]}"
    r = await client.get("/webhook-deliveries", params={"status": "pending"})
    assert [d["event_type"] for d in r.json()] == ["WorkOrderDispatched"]
    assert (await client.get("/webhook-deliveries", params={"status": "lost"})).status_code == 422


def test_another_departments_work_order_answers_as_an_unknown_one(world: World) -> None:
    """A 403 would tell that the order exists and, from who may act on it, which office owns it: a department
    asking for another's gets what it gets for an id that names nothing, status and body alike."""
    world.bus.handle(dispatched("GL-2-1", department="water", incident_id="GL-2"))
    runtime = FakeRuntime(world)  # city_ops staff
    bodies = {
        "accept": None,
        "return": {"reason": "不属本部门职责"},
        "extension": {"requested_deadline": "2099-06-04T12:00:00+08:00", "reason": "r"},
        "handle": {"result": "done"},
    }

    def alike(r: httpx.Response, unknown: httpx.Response) -> None:
        assert r.status_code == unknown.status_code == 404
        assert r.json() == orjson.loads(unknown.content.replace(b"GL-404-1", b"GL-2-1"))

    async def session() -> None:
        transport = httpx.ASGITransport(app=build_api(cast(Runtime, runtime)))
        headers = {"Authorization": f"Bearer {runtime.token}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://handling.test", headers=headers) as c:
            alike(await c.get("/work-orders/GL-2-1"), await c.get("/work-orders/GL-404-1"))
            for action, body in bodies.items():
                alike(
                    await c.post(f"/work-orders/GL-2-1/{action}", json=body),
                    await c.post(f"/work-orders/GL-404-1/{action}", json=body),
                )
            r = await c.post("/work-orders/accept", json={"work_order_ids": ["GL-2-1", "GL-404-1"]})
            theirs, unknown = r.json()["results"]
            assert (theirs["code"], theirs["error"]) == (unknown["code"], unknown["error"].replace("GL-404", "GL-2"))
            assert theirs["code"] == 404

    asyncio.run(session())
    assert world.order("GL-2-1").status == "dispatched" and runtime.flushed == 0  # nothing emitted, nothing sent


def test_of_two_actions_on_one_order_at_once_the_later_is_refused(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # two instances of handling on one database: both read the order dispatched; the return lands first, so the
    # accept finds the order changed and neither changes it nor emits anything
    world.bus.handle(dispatched())
    read = handlers._order_for

    def read_then_lose_the_race(*args: Any) -> Any:
        order, actor = read(*args)
        assert order.status == WorkOrderStatus.DISPATCHED
        monkeypatch.setattr(handlers, "_order_for", read)  # the other instance reads for real
        assert world.act(handlers.return_work_order, returned()) == WorkOrderStatus.RETURNED
        return order, actor

    monkeypatch.setattr(handlers, "_order_for", read_then_lose_the_race)
    with pytest.raises(Rejected, match="changed meanwhile"):
        world.bus.execute(handlers.accept_work_order, "GL-1-1", accept())
    assert world.order().status == WorkOrderStatus.RETURNED
    assert [e.type for e in world.outbox()] == ["WorkOrderReturned"]


# -- actions on several work orders (批量签收, 批量处置) ---------------------------------------------------


def test_accepting_many_takes_each_as_one_would_and_refuses_the_rest_alone(world: World) -> None:
    world.bus.handle(dispatched("GL-1-1", incident_id="GL-1"))
    world.bus.handle(dispatched("GL-2-1", incident_id="GL-2"))
    world.bus.handle(dispatched("GL-3-1", department="water", incident_id="GL-3"))
    world.act(handlers.accept_work_order, accept(), "GL-2-1")  # taken before
    ids = ["GL-1-1", "GL-2-1", "GL-3-1", "GL-404-1"]
    before = len(world.outbox())
    done, emitted = world.bus.execute(handlers.accept_work_orders, AcceptWorkOrders(work_order_ids=ids, **WHO))
    assert (done.done, done.refused) == (1, 3)
    assert [(r.id, r.status, r.code) for r in done.results] == [
        ("GL-1-1", "accepted", None),
        ("GL-2-1", None, 409),
        ("GL-3-1", None, 404),  # another office's: as an unknown one
        ("GL-404-1", None, 404),
    ]
    assert all(r.error for r in done.results[1:])
    assert [(type(e), e.work_order_id) for e in emitted] == [(ev.WorkOrderAccepted, "GL-1-1")]  # type: ignore[attr-defined]
    assert [e.event_id for e in world.outbox()[before:]] == [emitted[0].event_id]
    assert world.order("GL-1-1").status == "accepted"
    assert world.order("GL-3-1").status == "dispatched"


def test_handling_many_records_each_result_and_evidence(world: World) -> None:
    for n in (1, 2, 3):
        world.bus.handle(dispatched(f"GL-{n}-1", incident_id=f"GL-{n}"))
    for n in (1, 2):
        world.act(handlers.accept_work_order, accept(), f"GL-{n}-1")
    items = [
        {"work_order_id": "GL-1-1", "result": "swept", "evidence_urls": ["https://e.example/1.jpg"]},
        {"work_order_id": "GL-2-1", "result": "bins moved"},
        {"work_order_id": "GL-3-1", "result": "not accepted yet"},
    ]
    done, emitted = world.bus.execute(handlers.handle_work_orders, HandleWorkOrders(items=items, **WHO))  # type: ignore[arg-type]
    assert [(r.id, r.status, r.code) for r in done.results] == [
        ("GL-1-1", "handled", None),
        ("GL-2-1", "handled", None),
        ("GL-3-1", None, 409),
    ]
    assert [(e.work_order_id, e.result, [str(u) for u in e.evidence_urls]) for e in emitted] == [  # type: ignore[attr-defined]
        ("GL-1-1", "swept", ["https://e.example/1.jpg"]),
        ("GL-2-1", "bins moved", []),
    ]
    assert (world.order("GL-1-1").result, world.order("GL-1-1").evidence_urls) == ("swept", "https://e.example/1.jpg")
    assert world.order("GL-3-1").status == "dispatched"


@pytest.mark.parametrize(
    "body",
    [
        {"work_order_ids": []},
        {"work_order_ids": ["GL-1-1", "GL-1-1"]},
        {"work_order_ids": [f"GL-{n}-1" for n in range(101)]},
        {"work_order_ids": ["bad id"]},
    ],
)
def test_a_batch_names_each_order_once_and_at_most_a_hundred(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AcceptWorkOrders(**body)


def test_a_batch_handles_each_order_once() -> None:
    with pytest.raises(ValidationError, match="more than once"):
        HandleWorkOrders(items=[{"work_order_id": "GL-1-1", "result": "a"}] * 2)  # type: ignore[list-item]


def test_the_api_acts_on_many_orders_in_one_request(world: World) -> None:
    world.bus.handle(dispatched("GL-1-1", incident_id="GL-1"))
    world.bus.handle(dispatched("GL-2-1", department="water", incident_id="GL-2"))
    runtime = FakeRuntime(world)

    async def session() -> None:
        transport = httpx.ASGITransport(app=build_api(cast(Runtime, runtime)))
        headers = {"Authorization": f"Bearer {runtime.token}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://handling.test", headers=headers) as c:
            r = await c.post("/work-orders/accept", json={"work_order_ids": ["GL-1-1", "GL-2-1"]})
            assert r.status_code == 202, r.text
            assert (r.json()["done"], [x["code"] for x in r.json()["results"]]) == (1, [None, 404])
            r = await c.post("/work-orders/accept", json={"work_order_ids": ["GL-1-1"], "department_code": "water"})
            assert r.status_code == 403  # the body names another office than the token's
            r = await c.post("/work-orders/accept", json={"work_order_ids": "GL-1-1"})
            assert r.status_code == 422 and "work_order_ids" in r.json()["error"]
            r = await c.post("/work-orders/handle", json={"items": [{"work_order_id": "GL-1-1", "result": "ok"}]})
            assert (r.status_code, r.json()["results"][0]["status"]) == (202, "handled")
            r = await c.get("/work-orders/GL-1-1")
            assert (r.json()["status"], r.json()["result"]) == ("handled", "ok")

    asyncio.run(session())
    assert runtime.flushed == 2


@pytest.mark.parametrize(
    "deadline",
    [
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+08:00",  # before year 1 in UTC
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59-14:00",  # after year 9999 in UTC
        "2101-01-01T00:00:00+08:00",
    ],
)
def test_an_extension_to_a_deadline_out_of_range_is_refused_with_the_reason(world: World, deadline: str) -> None:
    world.bus.handle(dispatched())
    runtime = FakeRuntime(world)

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_api(cast(Runtime, runtime)))
        headers = {"Authorization": f"Bearer {runtime.token}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://handling.test", headers=headers) as client:
            await client.post("/work-orders/GL-1-1/accept", json=WHO)
            return await client.post(
                "/work-orders/GL-1-1/extension", json={**WHO, "requested_deadline": deadline, "reason": "truck"}
            )

    r = asyncio.run(ask())
    assert r.status_code == 422, r.text
    [problem] = r.json()["details"]
    assert problem["field"] == "requested_deadline"
    assert "timestamps must be from 2000-01-01T00:00:00Z to 2100-01-01T00:00:00Z" in problem["problem"]
    assert world.order().extension_status == "none" and not isinstance(world.outbox()[-1], ev.ExtensionRequested)
