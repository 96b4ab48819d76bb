"""A desk's and a grid worker's queue, and a new report's merge candidates, are read through an index made for them,
so a read costs the same after a hundred thousand closed orders as after ten (the planner otherwise may pick a
one-column index and read or sort all of a department's orders, or all of a category's cases, ever made).
Databases made before the index get it at start-up."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine

from schemas import Actor, ActorKind, Location, utcnow
from schemas import events as ev
from services.common.db import UnitOfWork, create_tables, make_engine
from services.dispatch import handlers as dispatch
from services.dispatch.models import TABLES as DISPATCH_TABLES
from services.dispatch.settings import DispatchSettings
from services.handling import handlers as handling
from services.handling.models import TABLES as HANDLING_TABLES
from services.verification import handlers as verification
from services.verification.models import TABLES as VERIFICATION_TABLES


def _plan(engine: Engine, read: Callable[[UnitOfWork], Any], containing: str = "") -> str:
    """SQLite's query plan of the one SELECT ``read`` runs (of those whose text has ``containing``)."""
    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and containing in statement:
            seen.append((statement, params))

    sa_event.listen(engine, "before_cursor_execute", capture)
    try:
        with UnitOfWork(engine) as uow:
            read(uow)
    finally:
        sa_event.remove(engine, "before_cursor_execute", capture)
    [(statement, params)] = seen
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params).all()
    return " | ".join(str(r[-1]) for r in rows)


def test_a_departments_queue_is_read_through_the_queue_index(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'handling.sqlite'}")
    create_tables(engine, HANDLING_TABLES)
    plan = _plan(engine, lambda uow: handling.list_work_orders("city_ops", "dispatched", None, 50, 0, uow))
    assert "USING INDEX ix_handling_work_order_queue (department_code=? AND status=?)" in plan


def test_a_grids_queue_is_read_through_the_queue_index(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'verification.sqlite'}")
    create_tables(engine, VERIFICATION_TABLES)
    plan = _plan(engine, lambda uow: verification.list_verifications(uow, grid_id="gh01", status="pending"))
    assert "USING INDEX ix_verification_task_queue (grid_id=? AND status=?)" in plan


def test_a_reports_merge_candidates_are_read_through_the_category_index(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'dispatch.sqlite'}")
    create_tables(engine, DISPATCH_TABLES)
    worker = Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-1")
    report = ev.IncidentReported(
        incident_id="GL-1",
        actor=worker,
        correlation_id="GL-1",
        occurred_at=utcnow(),
        source="grid_worker",
        category_code="exposed_garbage",
        location=Location(lat=31.275, lon=121.565),
        description="d",
        reporter_id=worker.id,
        client_report_id="r1",
    )
    policy = DispatchSettings()
    plan = _plan(engine, lambda uow: dispatch.file_incident(report, uow, policy), containing="category_code = ?")
    # category, open statuses and the merge window all from the index; not every case of the category ever filed
    assert "USING INDEX ix_dispatch_case_open_by_category (category_code=? AND status=? AND reported_at>?)" in plan


def test_pending_extension_requests_are_read_through_an_index(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'dispatch.sqlite'}")
    create_tables(engine, DISPATCH_TABLES)
    plan = _plan(engine, dispatch.pending_extensions)
    # not every work order ever dispatched, for the few with a request pending
    assert "USING INDEX ix_dispatch_work_order_extension_pending" in plan


def test_a_database_made_before_the_queue_index_gets_it_at_start_up(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'handling.sqlite'}")
    create_tables(engine, HANDLING_TABLES)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_handling_work_order_queue")
    assert "ix_handling_work_order_queue" not in _indexes(engine, "handling_work_order")

    create_tables(engine, HANDLING_TABLES)
    create_tables(engine, HANDLING_TABLES)  # and again: nothing to do

    assert "ix_handling_work_order_queue" in _indexes(engine, "handling_work_order")


def _indexes(engine: Engine, table: str) -> set[str]:
    return {str(i["name"]) for i in sa.inspect(engine).get_indexes(table)}
