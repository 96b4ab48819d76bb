"""The Prometheus metrics without a broker: domain counters fed by the outbox, the HTTP middleware, redeliveries,
handling's open/overdue gauges read from its database, the operations center's stage histogram and consumer lag,
and the whole exposition accepted by ``promtool check metrics``."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from sqlalchemy.engine import Engine

from schemas import ORDER_ACTIVE, Actor, Event, Location, WorkOrderStatus, encode_event
from schemas import events as ev
from services.common import metrics
from services.common.bus import MessageBus
from services.common.db import UnitOfWork, create_tables, make_engine
from services.common.http import create_api
from services.common.kafka import Publisher
from services.common.outbox import OutboxRelay
from services.handling.models import TABLES as HANDLING_TABLES
from services.handling.models import HandlingWorkOrder
from services.opscenter import metrics as ops_metrics

NOW = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
DISPATCH = Actor.system("dispatch")
HERE = Location(lat=31.2710, lon=121.5610)


# -- helpers ----------------------------------------------------------------------------------------------


def value(name: str, **labels: str) -> float:
    """A sample of the default registry (0 when the series does not exist yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """Sample values of the default registry before and after a block, so tests do not depend on each other."""

    def __init__(self, *series: tuple[str, dict[str, str]]) -> None:
        self.series = series
        self.before = [value(name, **labels) for name, labels in series]

    def __call__(self) -> list[float]:
        return [value(name, **labels) - b for (name, labels), b in zip(self.series, self.before, strict=True)]


def common(incident_id: str = "GL-M-1", actor: Actor = DISPATCH) -> dict[str, Any]:
    return {"incident_id": incident_id, "actor": actor, "correlation_id": incident_id, "occurred_at": NOW}


def reported(category: str = "exposed_garbage", incident_id: str = "GL-M-1") -> ev.IncidentReported:
    return ev.IncidentReported(
        **common(incident_id, Actor(kind="grid_worker", id="w-gh01-1")),
        source=ev.Source.HOTLINE_12345,
        category_code=category,
        location=HERE,
        description="垃圾满溢",
        reporter_id="c-1",
        client_report_id=f"r-{incident_id}",
    )


def filed(incident_id: str, category: str) -> ev.IncidentFiled:
    return ev.IncidentFiled(
        **common(incident_id),
        category_code=category,
        grid_id="gh01",
        priority=3,
        severity=ev.Severity.NORMAL,
    )


def dispatched(department: str = "city_ops", category: str = "exposed_garbage") -> ev.WorkOrderDispatched:
    return ev.WorkOrderDispatched(
        **common(),
        work_order_id="GL-M-1-1",
        department_code=department,
        category_code=category,
        grid_id="gh01",
        location=HERE,
        description="垃圾满溢",
        priority=3,
        deadline=NOW + timedelta(hours=24),
    )


def closed(category: str = "exposed_garbage", on_time: bool = True) -> ev.IncidentClosed:
    return ev.IncidentClosed(
        **common(),
        category_code=category,
        grid_id="gh01",
        departments=["city_ops"],
        reported_at=NOW - timedelta(hours=3),
        deadline=NOW + timedelta(hours=21),
        on_time=on_time,
        rework_count=0,
        return_count=0,
    )


def department_action(cls: Any, department: str, **extra: Any) -> Event:
    event: Event = cls(**common(), work_order_id="GL-M-1-1", department_code=department, **extra)
    return event


class FakePublisher(Publisher):
    """Takes every record at once, as a broker that is up would."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1:9", client_id="test")
        self.sent: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]] = []

    async def send_all(self, records: Sequence[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]]) -> None:
        self.sent.extend(records)


def promtool_or_skip() -> str:
    """promtool's path; missing, the test fails on CI (CI=true) and is skipped elsewhere."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool is not installed (Debian package `prometheus`)", pytrace=False)
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    return path


def promtool_check_metrics(exposition: bytes) -> None:
    result = subprocess.run(
        [promtool_or_skip(), "check", "metrics"], input=exposition, capture_output=True, timeout=60, check=False
    )
    problems = (result.stdout + result.stderr).decode(errors="replace").strip()
    assert result.returncode == 0 and not problems, f"promtool check metrics (exit {result.returncode}):\n{problems}"


# -- domain counters ---------------------------------------------------------------------------------------


def test_observe_published_counts_each_event_in_its_series() -> None:
    delta = Delta(
        ("gridloop_incidents_reported_total", {"category": "exposed_garbage", "source": "hotline_12345"}),
        ("gridloop_work_orders_dispatched_total", {"department": "city_ops", "category": "exposed_garbage"}),
        ("gridloop_incidents_closed_total", {"category": "exposed_garbage", "on_time": "false"}),
        ("gridloop_incidents_closed_total", {"category": "exposed_garbage", "on_time": "true"}),
        ("gridloop_incidents_rejected_total", {"reason": "outside_grids"}),
        ("gridloop_work_orders_returned_total", {"department": "planning"}),
        ("gridloop_work_orders_handled_total", {"department": "city_ops"}),
        ("gridloop_reworks_total", {"department": "city_ops"}),
        ("gridloop_overdue_reminders_total", {"department": "river_chief"}),
        ("gridloop_escalations_total", {"reason": "repeated_returns"}),
    )
    metrics.observe_published(reported())
    metrics.observe_published(reported())
    metrics.observe_published(dispatched())
    metrics.observe_published(closed(on_time=False))
    metrics.observe_published(
        ev.IncidentRejected(**common(), reason_code=ev.RejectReason.OUTSIDE_GRIDS, reason="outside every grid")
    )
    metrics.observe_published(department_action(ev.WorkOrderReturned, "planning", reason="不属于本部门"))
    metrics.observe_published(department_action(ev.WorkOrderHandled, "city_ops", result="已清运"))
    metrics.observe_published(
        department_action(ev.IncidentReworked, "city_ops", rework_count=1, note="仍有垃圾", deadline=NOW)
    )
    metrics.observe_published(department_action(ev.OverdueReminded, "river_chief", deadline=NOW, overdue_s=60.0))
    metrics.observe_published(
        ev.IncidentEscalated(**common(), reason_code=ev.EscalationReason.REPEATED_RETURNS, reason="returned twice")
    )
    assert delta() == [2, 1, 1, 0, 1, 1, 1, 1, 1, 1]


def test_events_without_a_domain_counter_count_nothing() -> None:
    before = generate_latest().decode()
    metrics.observe_published(department_action(ev.WorkOrderAccepted, "city_ops"))
    after = generate_latest().decode()

    def domain(text: str) -> list[str]:
        names = (
            "gridloop_incidents_",
            "gridloop_work_orders_",
            "gridloop_reworks_",
            "gridloop_overdue_",
            "gridloop_esc",
        )
        return [line for line in text.splitlines() if line.startswith(names) and "_created" not in line]

    assert domain(after) == domain(before)


def test_labels_stay_in_the_reference_vocabularies() -> None:
    delta = Delta(
        ("gridloop_incidents_reported_total", {"category": "other", "source": "hotline_12345"}),
        ("gridloop_work_orders_dispatched_total", {"department": "other", "category": "other"}),
    )
    metrics.observe_published(reported(category="ufo_landing"))
    metrics.observe_published(dispatched(department="moon_office", category="ufo_landing"))
    assert delta() == [1, 1]
    assert value("gridloop_incidents_reported_total", category="ufo_landing", source="hotline_12345") == 0


def test_a_merge_counts_under_the_category_it_names() -> None:
    # dispatch names the report's category, which is the case's (it merges only into a case of its category)
    delta = Delta(
        ("gridloop_incidents_merged_total", {"category": "illegal_parking"}),
        ("gridloop_incidents_merged_total", {"category": "other"}),
    )
    merged = ev.IncidentMerged(
        **common("GL-M-DUP"), into_incident_id="GL-M-OPEN", distance_m=12.5, category_code="illegal_parking"
    )
    metrics.observe_published(merged)
    metrics.observe_outbox([encode_event(merged)])
    metrics.observe_published(ev.IncidentMerged(**common("GL-M-DUP2"), into_incident_id="GL-M-OLD", distance_m=3))
    assert delta() == [2, 1]


async def test_the_outbox_relay_counts_what_it_publishes_once(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'outbox.sqlite'}")
    create_tables(engine, ())
    with UnitOfWork(engine) as uow:
        uow.emit(reported(category="flooding", incident_id="GL-M-OUT"))
        uow.emit(closed(category="flooding", on_time=True))
        uow.commit()
    delta = Delta(
        ("gridloop_incidents_reported_total", {"category": "flooding", "source": "hotline_12345"}),
        ("gridloop_incidents_closed_total", {"category": "flooding", "on_time": "true"}),
    )
    publisher = FakePublisher()
    relay = OutboxRelay(engine, publisher)
    assert await relay.flush() == 2
    assert await relay.flush() == 0  # nothing pending: nothing counted again
    assert delta() == [1, 1]
    assert len(publisher.sent) == 4  # each event to its own topic and the lifecycle log
    engine.dispose()


def test_observe_outbox_never_raises_on_a_bad_record() -> None:
    delta = Delta(("gridloop_incidents_reported_total", {"category": "public_toilet", "source": "hotline_12345"}))
    metrics.observe_outbox([b"{not json", b"", encode_event(reported(category="public_toilet"))])
    assert delta() == [1]


# -- technical ---------------------------------------------------------------------------------------------


def test_a_redelivered_event_counts_as_a_duplicate(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'bus.sqlite'}")
    create_tables(engine, ())
    applied: list[str] = []
    bus = MessageBus(lambda: UnitOfWork(engine), {ev.IncidentReported: lambda e, uow: applied.append(e.event_id)})
    event = reported()
    delta = Delta(("gridloop_duplicate_events_total", {"service": metrics.current_service()}))
    bus.handle(event)
    bus.handle(event)
    bus.handle(event)
    assert applied == [event.event_id]
    assert delta() == [2]
    engine.dispose()


async def test_http_requests_are_counted_by_route_template() -> None:
    api = create_api("metricstest", title="metrics test")

    @api.get("/things/{thing_id}")
    async def thing(thing_id: str) -> dict[str, str]:
        return {"thing_id": thing_id}

    route = "/things/{thing_id}"
    delta = Delta(
        ("gridloop_http_requests_total", {"service": "metricstest", "method": "GET", "route": route, "status": "200"}),
        ("gridloop_http_requests_total", {"service": "metricstest", "method": "POST", "route": route, "status": "405"}),
        (
            "gridloop_http_requests_total",
            {"service": "metricstest", "method": "GET", "route": "unmatched", "status": "404"},
        ),
        (
            "gridloop_http_requests_total",
            {"service": "metricstest", "method": "GET", "route": "/metrics", "status": "200"},
        ),
        ("gridloop_http_request_duration_seconds_count", {"service": "metricstest", "method": "GET", "route": route}),
    )
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for n in range(3):
            assert (await client.get(f"/things/t{n}")).status_code == 200
        assert (await client.post("/things/t1")).status_code == 405
        assert (await client.get("/no/such/path")).status_code == 404
        scrape = await client.get("/metrics", follow_redirects=True)
        assert scrape.status_code == 200
    assert delta() == [3, 1, 1, 1, 3]
    assert 'route="/things/t1"' not in scrape.text  # raw paths never become label values
    # the service's series exist from the start, so the first dead letter shows in increase()
    for kind in metrics.DEAD_LETTER_KINDS:
        assert REGISTRY.get_sample_value("gridloop_dead_letters_total", {"service": "metricstest", "kind": kind}) == 0


# -- handling's open / overdue gauges --------------------------------------------------------------------------


def _order(n: int, department: str, status: str, deadline: datetime) -> HandlingWorkOrder:
    return HandlingWorkOrder(
        work_order_id=f"GL-W-{n}",
        incident_id=f"GL-W-{n}",
        correlation_id=f"GL-W-{n}",
        department_code=department,
        role="lead",
        category_code="exposed_garbage",
        grid_id="gh01",
        lat=31.271,
        lon=121.561,
        status=status,
        deadline=deadline,
        dispatched_at=deadline - timedelta(hours=24),
    )


@pytest.fixture
def work_orders(tmp_path: Path) -> Iterator[Engine]:
    """A handling database: city_ops owes 3 (2 overdue), planning owes 1 (on time), an unknown office owes 1."""
    engine = make_engine(f"sqlite:///{tmp_path / 'handling.sqlite'}")
    create_tables(engine, HANDLING_TABLES)
    late, early = NOW - timedelta(hours=2), NOW + timedelta(hours=5)
    rows = [
        _order(1, "city_ops", WorkOrderStatus.DISPATCHED, late),
        _order(2, "city_ops", WorkOrderStatus.ACCEPTED, early),
        _order(3, "city_ops", WorkOrderStatus.REWORK, late),
        _order(4, "city_ops", WorkOrderStatus.HANDLED, late),  # handled: no longer owed
        _order(5, "city_ops", WorkOrderStatus.CLOSED, late),
        _order(6, "planning", WorkOrderStatus.ACCEPTED, early),
        _order(7, "planning", WorkOrderStatus.RETURNED, late),  # returned: the center re-routes it
        _order(8, "moon_office", WorkOrderStatus.DISPATCHED, late),
    ]
    with UnitOfWork(engine) as uow:
        for row in rows:
            uow.session.add(row)
        uow.commit()
    yield engine
    engine.dispose()


def test_the_handling_collector_counts_open_and_overdue_work_by_department(work_orders: Engine) -> None:
    registry = CollectorRegistry()
    table = HandlingWorkOrder.__table__  # type: ignore[attr-defined]
    registry.register(metrics.WorkOrderBacklogCollector(work_orders, table, ORDER_ACTIVE, clock=lambda: NOW))

    def gauge(name: str, department: str) -> float | None:
        return registry.get_sample_value(name, {"department": department})

    assert gauge("gridloop_work_orders_open", "city_ops") == 3
    assert gauge("gridloop_work_orders_overdue", "city_ops") == 2
    assert gauge("gridloop_work_orders_open", "planning") == 1
    assert gauge("gridloop_work_orders_overdue", "planning") == 0
    assert gauge("gridloop_work_orders_open", "other") == 1
    assert gauge("gridloop_work_orders_overdue", "other") == 1
    assert gauge("gridloop_work_orders_open", "river_chief") == 0  # every department is reported
    assert gauge("gridloop_work_orders_open", "moon_office") is None
    promtool_check_metrics(generate_latest(registry))


def test_the_gauges_follow_the_clock(work_orders: Engine) -> None:
    registry = CollectorRegistry()
    clock = [NOW]
    table = HandlingWorkOrder.__table__  # type: ignore[attr-defined]
    registry.register(metrics.WorkOrderBacklogCollector(work_orders, table, ORDER_ACTIVE, clock=lambda: clock[0]))
    assert registry.get_sample_value("gridloop_work_orders_overdue", {"department": "planning"}) == 0
    clock[0] = NOW + timedelta(hours=6)
    assert registry.get_sample_value("gridloop_work_orders_overdue", {"department": "planning"}) == 1
    assert registry.get_sample_value("gridloop_work_orders_overdue", {"department": "city_ops"}) == 3


def test_registering_again_replaces_the_collector(work_orders: Engine, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics.register_work_order_gauges(work_orders, HandlingWorkOrder, ORDER_ACTIVE, registry=registry)
    empty = make_engine(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    create_tables(empty, HANDLING_TABLES)
    metrics.register_work_order_gauges(empty, HandlingWorkOrder, ORDER_ACTIVE, registry=registry)
    assert registry.get_sample_value("gridloop_work_orders_open", {"department": "city_ops"}) == 0
    empty.dispose()


def test_an_unreadable_database_reports_nothing_and_does_not_fail_the_scrape(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'no-tables.sqlite'}")
    registry = CollectorRegistry()
    metrics.register_work_order_gauges(engine, HandlingWorkOrder, ORDER_ACTIVE, registry=registry)
    text = generate_latest(registry).decode()
    assert "gridloop_work_orders_open{" not in text
    engine.dispose()


def test_handling_registers_its_gauges(tmp_path: Path) -> None:
    from services.handling.app import build
    from services.handling.settings import HandlingSettings

    runtime = build(HandlingSettings(var_dir=tmp_path, http_port=18102))
    runtime.init_db()
    assert REGISTRY.get_sample_value("gridloop_work_orders_open", {"department": "city_ops"}) == 0
    assert REGISTRY.get_sample_value("gridloop_work_orders_overdue", {"department": "ops_center"}) == 0
    runtime.engine.dispose()


# -- the operations center ---------------------------------------------------------------------------------


def test_observe_stage_feeds_the_stage_histogram() -> None:
    delta = Delta(
        ("gridloop_stage_duration_seconds_count", {"stage": "handle"}),
        ("gridloop_stage_duration_seconds_sum", {"stage": "handle"}),
        ("gridloop_stage_duration_seconds_bucket", {"stage": "handle", "le": "3600.0"}),
        ("gridloop_stage_duration_seconds_bucket", {"stage": "handle", "le": "86400.0"}),
    )
    ops_metrics.observe_stage("handle", 5400.0)  # 1.5 h
    ops_metrics.observe_stage("handle", -2.0)  # clocks disagreeing: 0
    ops_metrics.observe_stage("teleport", 1.0)  # not a stage: ignored
    assert delta() == [2, 5400.0, 1, 2]
    assert REGISTRY.get_sample_value("gridloop_stage_duration_seconds_count", {"stage": "teleport"}) is None
    for stage in ops_metrics.STAGES:  # exported from the start
        assert REGISTRY.get_sample_value("gridloop_stage_duration_seconds_count", {"stage": stage}) is not None


def test_consumer_groups_follow_the_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRIDLOOP_TOPIC_NAMESPACE", "town7")
    assert ops_metrics.consumer_groups() == [
        "town7-intake",
        "town7-dispatch",
        "town7-handling",
        "town7-verification",
        "town7-opscenter",
    ]


class CountingLag(ops_metrics.ConsumerLagCollector):
    """A lag collector whose broker is a function."""

    def __init__(self, answer: Any, **kw: Any) -> None:
        super().__init__("127.0.0.1:9", ["g-intake", "g-dispatch"], **kw)
        self.answer = answer
        self.calls = 0

    def read(self) -> dict[tuple[str, str], int]:
        self.calls += 1
        result: dict[tuple[str, str], int] = self.answer()
        return result


def test_consumer_lag_is_exported_and_cached() -> None:
    collector = CountingLag(lambda: {("g-intake", "t.lifecycle"): 7, ("g-dispatch", "t.reported"): 0}, cache_s=60)
    registry = CollectorRegistry()
    registry.register(collector)
    assert registry.get_sample_value("gridloop_consumer_lag", {"group": "g-intake", "topic": "t.lifecycle"}) == 7
    assert registry.get_sample_value("gridloop_consumer_lag", {"group": "g-dispatch", "topic": "t.reported"}) == 0
    assert collector.calls == 1  # the second scrape used the cache
    promtool_check_metrics(generate_latest(registry))


def test_consumer_lag_on_a_broker_error_reports_nothing_and_counts_it() -> None:
    def broken() -> dict[tuple[str, str], int]:
        raise OSError("connection refused")

    collector = CountingLag(broken, retry_s=60)
    registry = CollectorRegistry()
    registry.register(collector)
    errors = Delta(("gridloop_consumer_lag_errors_total", {}))
    assert "gridloop_consumer_lag{" not in generate_latest(registry).decode()
    assert "gridloop_consumer_lag{" not in generate_latest(registry).decode()
    assert errors() == [1]
    assert collector.calls == 1  # the broker is not asked again before retry_s


def test_consumer_lag_never_makes_a_scrape_wait_longer_than_its_timeout() -> None:
    release = threading.Event()

    def hanging() -> dict[tuple[str, str], int]:
        release.wait(10)
        return {("g-intake", "t.lifecycle"): 1}

    collector = CountingLag(hanging, timeout_s=0.2, retry_s=0)
    errors = Delta(("gridloop_consumer_lag_errors_total", {}))
    started = time.monotonic()
    assert list(collector.collect()) == []
    assert list(collector.collect()) == []  # still waiting on the broker: not waited for again
    assert time.monotonic() - started < 1.5
    assert errors() == [1]
    release.set()
    deadline = time.monotonic() + 5
    while collector.lags() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert collector.lags() == {("g-intake", "t.lifecycle"): 1}  # the late answer is used once it comes


def test_consumer_lag_of_an_unreachable_broker() -> None:
    collector = ops_metrics.ConsumerLagCollector("127.0.0.1:1", ["g"], timeout_s=0.5)
    errors = Delta(("gridloop_consumer_lag_errors_total", {}))
    started = time.monotonic()
    assert list(collector.collect()) == []
    assert time.monotonic() - started < 3
    assert errors() == [1]
    collector.close()


# -- the exposition ----------------------------------------------------------------------------------------


async def test_every_metric_passes_promtool(work_orders: Engine) -> None:
    """Everything a service exports (one series of each kind at least) is valid and follows the conventions."""
    metrics.observe_outbox(
        encode_event(e)
        for e in (
            reported(),
            dispatched(),
            closed(),
            ev.IncidentRejected(**common(), reason_code=ev.RejectReason.UNKNOWN_CATEGORY, reason="unknown"),
            ev.IncidentMerged(**common("GL-M-9"), into_incident_id="GL-M-1", distance_m=1),
            department_action(ev.WorkOrderReturned, "planning", reason="x"),
            department_action(ev.WorkOrderHandled, "city_ops", result="x"),
            department_action(ev.IncidentReworked, "city_ops", rework_count=1, note="x", deadline=NOW),
            department_action(ev.OverdueReminded, "city_ops", deadline=NOW, overdue_s=1),
            ev.IncidentEscalated(**common(), reason_code=ev.EscalationReason.OVERDUE, reason="x"),
        )
    )
    ops_metrics.observe_stage("close", 7200)
    api = create_api("promtooltest", title="t")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://test") as client:
        await client.get("/health")
    collector = metrics.register_work_order_gauges(work_orders, HandlingWorkOrder, ORDER_ACTIVE)
    try:
        exposition = generate_latest()
    finally:
        REGISTRY.unregister(collector)
    text = exposition.decode()
    for name in (
        "gridloop_incidents_reported_total",
        "gridloop_incidents_rejected_total",
        "gridloop_incidents_merged_total",
        "gridloop_work_orders_dispatched_total",
        "gridloop_work_orders_returned_total",
        "gridloop_work_orders_handled_total",
        "gridloop_reworks_total",
        "gridloop_overdue_reminders_total",
        "gridloop_escalations_total",
        "gridloop_incidents_closed_total",
        "gridloop_http_requests_total",
        "gridloop_http_request_duration_seconds_bucket",
        "gridloop_dead_letters_total",
        "gridloop_duplicate_events_total",
        "gridloop_outbox_published_total",
        "gridloop_outbox_pending",
        "gridloop_work_orders_open",
        "gridloop_work_orders_overdue",
        "gridloop_stage_duration_seconds_bucket",
    ):
        assert f"\n{name}{{" in text, f"{name} missing from the exposition"
    promtool_check_metrics(exposition)
