"""The same rules on PostgreSQL: the unit of work, idempotency marks and the outbox behave as on SQLite.

Runs where GRIDLOOP_TEST_POSTGRES_URL names a PostgreSQL database (CI starts one with infra/postgres/pg.sh);
in CI its absence is a failure, never a skip.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel, select

from schemas import Actor, ActorKind, Location
from schemas import events as ev
from services.common.bus import MessageBus
from services.common.db import SHARED_TABLES, OutboxRecord, ProcessedEvent, UnitOfWork, create_tables, make_engine
from services.dispatch import handlers
from services.dispatch.models import TABLES
from services.dispatch.settings import DispatchSettings

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
