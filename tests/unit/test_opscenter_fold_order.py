"""The read model is the same whatever the order in which two producers' copies reach the lifecycle log."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from schemas import Actor, ActorKind, Event, Location
from schemas import events as ev
from services.common.bus import MessageBus
from services.common.db import UnitOfWork
from services.dispatch import handlers as dispatch
from services.dispatch.models import TABLES as DISPATCH_TABLES
from services.dispatch.settings import DispatchSettings
from services.opscenter.agents import fold
from services.opscenter.handlers import preload
from services.opscenter.models import OPS_DAILY, OpsDue, OpsIncident, OpsParked, OpsStage, OpsWorkOrder
from services.opscenter.models import TABLES as OPS_TABLES

MakeDb = Callable[[tuple[sa.Table, ...]], Engine]


def _report(iid: str, category: str = "exposed_garbage") -> ev.IncidentReported:
    return ev.IncidentReported(
        incident_id=iid,
        actor=Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-1"),
        correlation_id=iid,
        source="grid_worker",
        category_code=category,
        location=Location(lat=31.275, lon=121.565),
        description="d",
        reporter_id="w-gh01-1",
        client_report_id=f"r-{iid}",
    )


def _fold_all(engine: Engine, events: list[Event], batch: int = 1) -> None:
    """Fold one event at a time, or in batches of ``batch`` as the consumer does (with the batch's preload)."""
    bus = MessageBus(lambda: UnitOfWork(engine), {c: fold for c in ev.EVENT_TYPES.values()}, preload)
    if batch == 1:
        for e in events:
            bus.handle(e)
        return
    for i in range(0, len(events), batch):
        bus.handle_batch(events[i : i + batch])


def _rollups(s: Session) -> list[tuple[Any, ...]]:
    """Every rollup row that holds something (a row whose share was taken back holds zeros), sums rounded."""
    rows = []
    for table in (OPS_DAILY, OpsDue.__table__, OpsStage.__table__):  # type: ignore[attr-defined]
        for row in s.connection().execute(sa.select(table)).mappings():
            if any(v for k, v in row.items() if isinstance(v, int | float) and k != "bucket"):
                rows.append((table.name, *(round(v, 6) if isinstance(v, float) else v for v in row.values())))
    return sorted(rows, key=repr)


def _state(
    engine: Engine,
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]], list[tuple[Any, ...]], int]:
    with UnitOfWork(engine) as uow:
        s = uow.session
        incidents = sorted((i.incident_id, i.status, str(i.category_code)) for i in s.exec(select(OpsIncident)))
        orders = sorted(
            (o.work_order_id, o.status, str(o.accepted_at is not None)) for o in s.exec(select(OpsWorkOrder))
        )
        facts = _rollups(s)
        parked = len(s.exec(select(OpsParked)).all())
    return incidents, orders, facts, parked


def test_a_rejection_ahead_of_its_report_is_folded_when_the_report_comes(make_db: MakeDb) -> None:
    report = _report("GL-R1", category="no_such_category")
    rejected = ev.IncidentRejected.following(
        report, Actor.system("dispatch"), reason_code="unknown_category", reason="unknown category"
    )
    in_order, reversed_ = make_db(OPS_TABLES), make_db(OPS_TABLES)
    _fold_all(in_order, [report, rejected])
    _fold_all(reversed_, [rejected, report])
    assert _state(reversed_) == _state(in_order)
    together = make_db(OPS_TABLES)
    _fold_all(together, [rejected, report], batch=2)
    assert _state(together) == _state(in_order)
    incidents, _, _, parked = _state(reversed_)
    assert incidents == [("GL-R1", "rejected", "no_such_category")] and parked == 0
    with UnitOfWork(reversed_) as uow:
        (total,) = uow.session.connection().execute(sa.select(OPS_DAILY).where(OPS_DAILY.c.dim == "none")).all()
    assert (total.reported, total.rejected, total.filed) == (1, 1, 0)


def test_every_order_of_one_incidents_events_gives_the_same_read_model(make_db: MakeDb) -> None:
    """Dispatch's real events for a report, plus the department's acceptance, folded in every order in which
    the work order's events keep their own producer's order."""
    dispatch_db = make_db(DISPATCH_TABLES)
    bus = MessageBus(lambda: UnitOfWork(dispatch_db), dispatch.bind(DispatchSettings()))
    report = _report("GL-O1")
    filed, dispatched = bus.handle(report)
    assert isinstance(dispatched, ev.WorkOrderDispatched)
    accepted = ev.WorkOrderAccepted.following(
        dispatched,
        Actor(kind=ActorKind.DEPARTMENT, id="d", department=dispatched.department_code),
        work_order_id=dispatched.work_order_id,
        department_code=dispatched.department_code,
    )
    expected = _state(_fold_into(make_db, [report, filed, dispatched, accepted]))
    assert expected[1] == [(dispatched.work_order_id, "accepted", "True")]
    for order in itertools.permutations([report, filed, dispatched, accepted]):
        if order.index(filed) > order.index(dispatched):
            continue  # one producer (dispatch): its copies keep their order
        for batch in (1, 2, 4):  # one at a time, in pairs, all in one batch
            assert _state(_fold_into(make_db, list(order), batch)) == expected, ([e.type for e in order], batch)


def _fold_into(make_db: MakeDb, events: list[Event], batch: int = 1) -> Engine:
    engine = make_db(OPS_TABLES)
    _fold_all(engine, events, batch)
    return engine


def test_a_whole_loop_folded_in_batches_of_any_size_ends_as_one_by_one(make_db: MakeDb) -> None:
    """Closing within the batch that dispatched, accepted and handled the work order closes that order too."""
    dispatch_db = make_db(DISPATCH_TABLES)
    bus = MessageBus(lambda: UnitOfWork(dispatch_db), dispatch.bind(DispatchSettings()))
    report = _report("GL-W1")
    filed, dispatched = bus.handle(report)
    assert isinstance(dispatched, ev.WorkOrderDispatched)
    staff = Actor(kind=ActorKind.DEPARTMENT, id="d", department=dispatched.department_code)
    order = {"work_order_id": dispatched.work_order_id, "department_code": dispatched.department_code}
    accepted = ev.WorkOrderAccepted.following(dispatched, staff, **order)
    handled = ev.WorkOrderHandled.following(dispatched, staff, **order, result="done")
    (requested,) = bus.handle(handled)
    assert isinstance(requested, ev.VerificationRequested)
    worker = Actor(kind=ActorKind.GRID_WORKER, id=requested.worker_id)
    passed = ev.VerificationPassed.following(requested, worker, verification_id=requested.verification_id)
    (closed,) = bus.handle(passed)
    history = [report, filed, dispatched, accepted, handled, requested, passed, closed]
    expected = _state(_fold_into(make_db, history))
    assert expected[0] == [("GL-W1", "closed", "exposed_garbage")]
    assert expected[1] == [(dispatched.work_order_id, "closed", "True")]
    for batch in range(2, len(history) + 1):
        assert _state(_fold_into(make_db, history, batch)) == expected, batch
