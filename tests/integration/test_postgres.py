"""The same rules on PostgreSQL: the unit of work, idempotency marks and the outbox behave as on SQLite.

Runs where GRIDLOOP_TEST_POSTGRES_URL names a PostgreSQL database (CI starts one with infra/postgres/pg.sh);
in CI its absence is a failure, never a skip.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import SQLModel, select

from schemas import Actor, ActorKind, Event, Location, decode_event
from schemas import events as ev
from services.common.bus import MessageBus
from services.common.db import SHARED_TABLES, OutboxRecord, ProcessedEvent, UnitOfWork, create_tables, make_engine
from services.common.outbox import OutboxRelay
from services.dispatch import handlers
from services.dispatch.models import TABLES
from services.dispatch.settings import DispatchSettings
from services.opscenter.agents import fold as ops_fold
from services.opscenter.handlers import preload as ops_preload
from services.opscenter.models import TABLES as OPS_TABLES
from services.opscenter.models import OpsIncident, OpsWorkOrder

URL = os.environ.get("GRIDLOOP_TEST_POSTGRES_URL", "")

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg() -> Iterator[Engine]:
    if not URL:
        if os.environ.get("CI"):
            pytest.fail("GRIDLOOP_TEST_POSTGRES_URL is not set: CI must run these tests on PostgreSQL")
        pytest.skip("GRIDLOOP_TEST_POSTGRES_URL not set (start one with infra/postgres/pg.sh up)")
    engine = make_engine(URL)
    assert engine.dialect.name == "postgresql"
    tables = [*SHARED_TABLES, *TABLES]
    SQLModel.metadata.drop_all(engine, tables=tables)
    create_tables(engine, TABLES)
    yield engine
    SQLModel.metadata.drop_all(engine, tables=tables)
    engine.dispose()


def _report(n: int) -> ev.IncidentReported:
    return ev.IncidentReported(
        incident_id=f"PG-{n}",
        actor=Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-1"),
        correlation_id=f"PG-{n}",
        source="grid_worker",
        category_code="exposed_garbage",
        location=Location(lat=31.275 + n * 0.001, lon=121.565),
        description="垃圾",
        reporter_id="w-gh01-1",
        client_report_id=f"r{n}",
    )


def test_loop_on_postgres_is_idempotent_and_fills_the_outbox(pg: Engine) -> None:
    bus = MessageBus(lambda: UnitOfWork(pg), handlers.bind(DispatchSettings()))
    report = _report(1)
    out = bus.handle(report)
    assert [e.type for e in out] == ["IncidentFiled", "WorkOrderDispatched"]
    assert bus.handle(report) == []
    order = out[1]
    assert isinstance(order, ev.WorkOrderDispatched)
    handled = ev.WorkOrderHandled.following(
        order,
        Actor(kind=ActorKind.DEPARTMENT, id="s"),
        work_order_id=order.work_order_id,
        department_code="city_ops",
        result="清理完毕",
    )
    [req] = bus.handle(handled)
    assert isinstance(req, ev.VerificationRequested)
    passed = ev.VerificationPassed.following(
        req, Actor(kind=ActorKind.GRID_WORKER, id=req.worker_id), verification_id=req.verification_id
    )
    [closed] = bus.handle(passed)
    assert isinstance(closed, ev.IncidentClosed) and closed.on_time
    with UnitOfWork(pg) as uow:
        outbox = uow.session.exec(select(OutboxRecord).order_by(OutboxRecord.id)).all()  # type: ignore[arg-type]
        assert [r.type for r in outbox] == [
            "IncidentFiled",
            "WorkOrderDispatched",
            "VerificationRequested",
            "IncidentClosed",
        ]
        assert len(uow.session.exec(select(ProcessedEvent)).all()) == 3
        case = handlers.get_case("PG-1", uow)
        assert case.status == "closed" and case.closed_at is not None
        assert case.reported_at.tzinfo is not None


def test_a_redelivered_event_is_claimed_once_on_postgres(pg: Engine) -> None:
    """The one-event claim reads the INSERT's rowcount: a redelivery must find the mark, not pass for new."""
    report = _report(9)
    with UnitOfWork(pg) as uow:
        assert uow.claim(report) is True
        uow.commit()
    with UnitOfWork(pg) as uow:
        assert uow.claim(report) is False


def test_concurrent_delivery_applies_once_on_postgres(pg: Engine) -> None:
    """Two consumers racing on one event: the primary key on processed_event lets exactly one win."""
    bus = MessageBus(lambda: UnitOfWork(pg), handlers.bind(DispatchSettings()))
    report = _report(2)
    barrier = threading.Barrier(4)
    results: list[int] = []

    def deliver() -> None:
        barrier.wait()
        results.append(len(bus.handle(report)))

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 0, 0, 2]
    with pg.connect() as conn:
        assert conn.execute(sa.text("select count(*) from outbox")).scalar_one() == 2


def test_concurrent_twin_reports_make_one_incident_on_postgres(pg: Engine) -> None:
    """Four intake instances take the same client report id at once: the unique index keeps one incident, the
    others insert nothing and answer with it as a retry; one IncidentReported waits in the outbox."""
    from services.intake import handlers as intake
    from services.intake.models import TABLES as INTAKE_TABLES
    from services.intake.models import ReportCreate

    create_tables(pg, INTAKE_TABLES)
    try:
        cmd = ReportCreate.model_validate(
            dict(
                category_code="exposed_garbage",
                lat=31.285,
                lon=121.575,
                description="垃圾",
                reporter_id="w-gh01-1",
                client_report_id="twin-1",
            )
        )
        barrier = threading.Barrier(4)
        answers: list[tuple[str, bool]] = []

        bus = MessageBus(lambda: UnitOfWork(pg), {})

        def report() -> None:
            barrier.wait()
            accepted, _ = bus.execute(intake.report_incident, cmd)
            answers.append((accepted.incident_id, accepted.duplicate))

        threads = [threading.Thread(target=report) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({incident for incident, _ in answers}) == 1, answers
        assert sorted(duplicate for _, duplicate in answers) == [False, True, True, True]
        with pg.connect() as conn:
            twins = sa.text("select count(*) from intake_incident where client_report_id = 'twin-1'")
            assert conn.execute(twins).scalar_one() == 1
            assert conn.execute(sa.text("select count(*) from outbox")).scalar_one() == 1
    finally:
        SQLModel.metadata.drop_all(pg, tables=list(INTAKE_TABLES))


def test_concurrent_batches_apply_each_event_once_on_postgres(pg: Engine) -> None:
    """Two consumers applying overlapping batches: the claims wait on each other's rows, never double-apply."""
    bus = MessageBus(lambda: UnitOfWork(pg), handlers.bind(DispatchSettings()))
    reports = [_report(n) for n in (11, 12, 13)]
    barrier = threading.Barrier(2)
    results: list[int] = []

    retried: list[str] = []

    def deliver(batch: list[ev.IncidentReported]) -> None:
        barrier.wait()
        for _ in range(5):  # as the runtime does: a deadlock between two batches is transient, retried
            try:
                results.append(len(bus.handle_batch(batch)))
                return
            except OperationalError as exc:
                retried.append(type(exc.orig).__name__)

    threads = [
        threading.Thread(target=deliver, args=(reports,)),
        threading.Thread(target=deliver, args=(list(reversed(reports[1:])),)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and sum(results) == 6  # IncidentFiled + WorkOrderDispatched per report, once
    assert set(retried) <= {"DeadlockDetected"}
    with pg.connect() as conn:
        assert conn.execute(sa.text("select count(*) from outbox")).scalar_one() == 6
        assert conn.execute(sa.text("select count(*) from processed_event")).scalar_one() == 3


def test_the_operations_centers_fold_on_postgres_matches_its_fold_on_sqlite(pg: Engine, tmp_path: Path) -> None:
    """The read model's records (inserted, read back in batches, changed column by column) on PostgreSQL."""
    loop = MessageBus(lambda: UnitOfWork(pg), handlers.bind(DispatchSettings()))
    reports = [_report(n) for n in (21, 22, 23)]
    events: list[Event] = []
    for report in reports:
        events += [report, *loop.handle(report)]
    orders = [e for e in events if isinstance(e, ev.WorkOrderDispatched)]
    staff = Actor(kind=ActorKind.DEPARTMENT, id="s")
    for order in orders:
        accepted = ev.WorkOrderAccepted.following(
            order, staff, work_order_id=order.work_order_id, department_code=order.department_code
        )
        handled = ev.WorkOrderHandled.following(
            order, staff, work_order_id=order.work_order_id, department_code=order.department_code, result="清理完毕"
        )
        events += [accepted, handled, *loop.handle(handled)]
    for request in [e for e in events if isinstance(e, ev.VerificationRequested)]:
        passed = ev.VerificationPassed.following(
            request, Actor(kind=ActorKind.GRID_WORKER, id=request.worker_id), verification_id=request.verification_id
        )
        events += [passed, *loop.handle(passed)]
    assert sum(isinstance(e, ev.IncidentClosed) for e in events) == 3

    def fold_into(engine: Engine) -> list[tuple[object, ...]]:
        # a fresh read model (the loop above marked its events processed in the same database)
        SQLModel.metadata.drop_all(engine, tables=[*SHARED_TABLES, *OPS_TABLES])
        create_tables(engine, OPS_TABLES)
        bus = MessageBus(lambda: UnitOfWork(engine), {c: ops_fold for c in ev.EVENT_TYPES.values()}, ops_preload)
        for start in range(0, len(events), 4):  # in batches, as the consumer folds
            bus.handle_batch(events[start : start + 4])
        with engine.connect() as conn:
            rows = [
                *conn.execute(sa.select(OpsIncident.__table__).order_by("incident_id")),  # type: ignore[attr-defined]
                *conn.execute(sa.select(OpsWorkOrder.__table__).order_by("work_order_id")),  # type: ignore[attr-defined]
                *(
                    row
                    for table in ROLLUPS
                    for row in conn.execute(sa.select(table).order_by(*table.primary_key.columns))
                ),
            ]
        return [tuple(r) for r in rows]

    sqlite = make_engine(f"sqlite:///{tmp_path / 'ops.sqlite'}")
    try:
        on_sqlite = fold_into(sqlite)
    finally:
        sqlite.dispose()
    on_postgres = fold_into(pg)
    SQLModel.metadata.drop_all(pg, tables=list(OPS_TABLES))
    assert [(r[0], r[7]) for r in on_postgres[:3]] == [("PG-21", "closed"), ("PG-22", "closed"), ("PG-23", "closed")]
    assert any(r[0] == "none" for r in on_postgres)  # the whole town's rollups are there too, and compared
    assert [_naive_utc(r) for r in on_postgres] == [_naive_utc(r) for r in on_sqlite]


ROLLUPS: tuple[sa.Table, ...] = tuple(t for t in OPS_TABLES if t.name in ("ops_daily", "ops_due", "ops_stage"))


def _naive_utc(row: tuple[object, ...]) -> tuple[object, ...]:
    """A row with its times as naive UTC (SQLite hands them back naive, PostgreSQL aware)."""
    return tuple(v.astimezone(UTC).replace(tzinfo=None) if isinstance(v, datetime) and v.tzinfo else v for v in row)


class _Publisher:
    def __init__(self, sent: list[tuple[str, str]]) -> None:
        self.sent = sent

    async def send_all(self, records: Sequence[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]]) -> None:
        await asyncio.sleep(0.002)
        self.sent.extend((topic, decode_event(value).event_id) for topic, _k, value, _h in records)


def _emit(engine: Engine, incidents: Sequence[int]) -> list[tuple[str, str]]:
    """Commit one outbox record per entry of ``incidents``; returns their (incident id, event id), in order."""
    events = [_report(i) for i in incidents]
    with UnitOfWork(engine) as uow:
        for e in events:
            uow.emit(e)
        uow.commit()
    return [(e.incident_id, e.event_id) for e in events]


async def test_two_relays_on_postgres_publish_each_record_once_and_in_order(pg: Engine) -> None:
    second = make_engine(URL)
    sent: list[tuple[str, str]] = []
    relays = [OutboxRelay(e, _Publisher(sent), batch=5) for e in (pg, second)]  # type: ignore[arg-type]
    try:
        emitted = _emit(pg, [n % 4 for n in range(30)])  # four incidents, interleaved
        flushes = [asyncio.ensure_future(r.flush()) for r in relays]
        await asyncio.sleep(0.005)
        emitted += _emit(second, [n % 4 for n in range(30)])  # committed while both relays are at work
        counts = await asyncio.gather(*flushes)
        for _ in range(10):  # what waited behind the other relay's lease: the next timer tick
            if not relays[0].pending():
                break
            counts += await asyncio.gather(*(r.flush() for r in relays))
    finally:
        second.dispose()
    assert sum(counts) == len(emitted) and relays[0].pending() == 0
    assert max(Counter(sent).values()) == 1 and len(sent) == 2 * len(emitted)
    lifecycle = [e for t, e in sent if t.endswith("lifecycle")]
    incident_of = dict((e, i) for i, e in emitted)
    for incident in {i for i, _ in emitted}:  # each incident's records in the order they were committed
        assert [e for e in lifecycle if incident_of[e] == incident] == [e for i, e in emitted if i == incident]


def test_concurrent_claims_on_postgres_never_overlap(pg: Engine) -> None:
    _emit(pg, range(40))  # forty incidents: nothing holds a record back but another claim
    relays = [OutboxRelay(pg, _Publisher([]), batch=7) for _ in range(4)]  # type: ignore[arg-type]
    barrier = threading.Barrier(len(relays))
    claimed: list[list[int]] = []

    def claim(relay: OutboxRelay) -> None:
        barrier.wait()
        claimed.append([r[0] for r in relay.claim()[1]])

    threads = [threading.Thread(target=claim, args=(r,)) for r in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(i for batch in claimed for i in batch) == list(range(1, 29)), claimed  # 4 × 7, none twice
    assert all(len(batch) == 7 and batch == sorted(batch) for batch in claimed)


def test_published_records_and_old_marks_are_pruned_on_postgres(pg: Engine) -> None:
    from tests.unit.test_retention import check_pruning

    check_pruning(pg)
