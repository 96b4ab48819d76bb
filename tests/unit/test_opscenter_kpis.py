"""KPIs from a hand-checked scenario: the real dispatch rules make the events, opscenter folds them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from schemas import Actor, ActorKind, Event, Location
from schemas import events as ev
from schemas.reference import GAOHANG
from services.common.bus import MessageBus
from services.common.db import UnitOfWork
from services.dispatch import handlers as dispatch
from services.dispatch.models import TABLES as DISPATCH_TABLES
from services.dispatch.settings import DispatchSettings
from services.opscenter import handlers
from services.opscenter.handlers import fold_event
from services.opscenter.kpis import Dimension, KpiReport, Period, to_csv_rows, window
from services.opscenter.models import TABLES as OPS_TABLES
from tests import kpi_reference

from .conftest import FakeClock

START = datetime(2026, 5, 31, 16, 0, tzinfo=UTC)  # midnight of 1 June in Gaohang: the scenario takes 23 h of the day


class Scenario:
    """Plays reporters, departments and verifiers against dispatch; every event is folded into opscenter."""

    def __init__(self, dispatch_db: Engine, ops_db: Engine, clock: FakeClock) -> None:
        self.clock = clock
        self.dispatch = MessageBus(lambda: UnitOfWork(dispatch_db, clock=clock), dispatch.bind(DispatchSettings()))
        self.ops_db = ops_db
        self.ops = MessageBus(lambda: UnitOfWork(ops_db, clock=clock), {c: self._fold for c in ev.EVENT_TYPES.values()})
        self.n = 0
        self.events: list[Event] = []

    def _fold(self, event: Event, uow: UnitOfWork) -> None:
        fold_event(event, uow, GAOHANG)

    def kpis(self, at: date, by: Dimension, period: Period = Period.DAY) -> KpiReport:
        """The KPIs as the API answers them (now is the scenario's clock)."""
        return self.ops.query(handlers.report_kpis, period, at, by, GAOHANG)

    def _publish(self, event: Event) -> list[Event]:
        out = self.dispatch.handle(event)
        for e in (event, *out):
            self.ops.handle(e)
            self.events.append(e)
        return out

    def report(self, category: str, lat: float, lon: float = 121.565) -> list[Event]:
        self.n += 1
        iid = f"K-{self.n}"
        return self._publish(
            ev.IncidentReported(
                incident_id=iid,
                actor=Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-1"),
                correlation_id=iid,
                occurred_at=self.clock(),
                source="grid_worker",
                category_code=category,
                location=Location(lat=lat, lon=lon),
                description="d",
                reporter_id="w-gh01-1",
                client_report_id=iid,
            )
        )

    def dept(self, cls: type[Event], order: Any, **kw: Any) -> list[Event]:
        actor = Actor(kind=ActorKind.DEPARTMENT, id="staff", department=order.department_code)
        return self._publish(
            cls.following(
                order,
                actor,
                occurred_at=self.clock(),
                work_order_id=order.work_order_id,
                department_code=order.department_code,
                **kw,
            )
        )

    def verify(self, req: Any, passed: bool) -> list[Event]:
        cls = ev.VerificationPassed if passed else ev.VerificationFailed
        return self._publish(
            cls.following(
                req,
                Actor(kind=ActorKind.GRID_WORKER, id=req.worker_id),
                occurred_at=self.clock(),
                verification_id=req.verification_id,
                note="n",
            )
        )

    def close(self, order: Any, *, handle_after_h: float, rework: bool = False) -> None:
        self.dept(ev.WorkOrderAccepted, order)
        self.clock.advance(hours=handle_after_h)
        [req] = self.dept(ev.WorkOrderHandled, order, result="done")
        if rework:
            [again] = self.verify(req, passed=False)
            [req] = self.dept(ev.WorkOrderHandled, again, result="done again")
        self.verify(req, passed=True)


def one(events: list[Event], cls: type[Any]) -> Any:
    [found] = [e for e in events if isinstance(e, cls)]
    return found


@pytest.fixture
def scenario(make_db: Callable[[tuple[sa.Table, ...]], Engine]) -> Scenario:
    s = Scenario(make_db(DISPATCH_TABLES), make_db(OPS_TABLES), FakeClock(START))
    # 10 reported: 2 rejected, 1 merged, 7 filed and closed (5 on time, 2 late), 1 rework, 1 return
    s.report("no_such_category", 31.275)
    s.report("exposed_garbage", 31.10)  # outside every grid
    orders = [one(s.report("exposed_garbage", 31.271 + i * 0.002), ev.WorkOrderDispatched) for i in range(5)]
    orders += [one(s.report("illegal_parking", 31.281 + i * 0.002), ev.WorkOrderDispatched) for i in range(2)]
    s.report("exposed_garbage", 31.27101)  # next to the first garbage case: merged
    returned = orders[0]
    orders[0] = one(s.dept(ev.WorkOrderReturned, returned, reason="not ours"), ev.WorkOrderDispatched)
    for i, order in enumerate(orders[:5]):
        s.close(order, handle_after_h=1, rework=(i == 1))
    for order in orders[5:]:
        s.close(order, handle_after_h=9)  # illegal parking is due in 8 h: late
    return s


def test_hand_computed_kpis(scenario: Scenario) -> None:
    report = scenario.kpis(date(2026, 6, 1), Dimension.DEPARTMENT)
    k = report.total.current
    assert (k.reported, k.filed, k.rejected, k.merged) == (10, 7, 2, 1)
    assert (k.dispatched, k.returned, k.handled, k.reworks) == (8, 1, 8, 1)
    assert (k.closed, k.closed_on_time, k.due, k.overdue_open) == (7, 5, 7, 0)
    assert k.closure_rate == 1.0
    assert k.on_time_rate == round(5 / 7, 4)
    assert k.rework_rate == 0.125
    assert k.accurate_dispatch_rate == 0.875
    assert k.time_to_close is not None and k.time_to_close.count == 7
    assert report.total.previous.reported == 0 and report.total.previous.closure_rate is None
    rows = {r.key: r for r in report.rows}
    parking = rows["public_safety"].current
    assert (parking.reported, parking.dispatched, parking.closed, parking.closed_on_time) == (2, 2, 2, 0)
    assert parking.on_time_rate == 0.0 and rows["public_safety"].name_zh == "平安办"
    city = rows["city_ops"].current
    # exposed garbage goes to city_ops first; the one it returned went on to civic_creation, which closed it
    assert (city.dispatched, city.returned) == (5, 1)
    assert rows["civic_creation"].current.dispatched == 1


def test_by_category_and_grid_add_up_to_the_total(scenario: Scenario) -> None:
    for by in (Dimension.CATEGORY, Dimension.GRID):
        report = scenario.kpis(date(2026, 6, 1), by)
        for field in ("reported", "filed", "closed", "dispatched", "handled"):
            assert sum(getattr(r.current, field) for r in report.rows) == getattr(report.total.current, field)


def test_periods_and_the_previous_one() -> None:
    cur, prev = window(Period.WEEK, date(2026, 6, 3))  # a Wednesday
    assert (cur.start.date(), cur.end.date(), prev.start.date()) == (
        date(2026, 6, 1),
        date(2026, 6, 8),
        date(2026, 5, 25),
    )
    cur, prev = window(Period.MONTH, date(2026, 1, 15))
    assert (cur.start.date(), cur.end.date(), prev.start.date()) == (
        date(2026, 1, 1),
        date(2026, 2, 1),
        date(2025, 12, 1),
    )


def test_next_day_sees_yesterday_as_previous(scenario: Scenario) -> None:
    report = scenario.kpis(date(2026, 6, 2), Dimension.NONE)
    assert report.total.previous.closed == 7 and report.total.current.closed == 0 and report.rows == []


def test_overdue_open_and_views(scenario: Scenario) -> None:
    late = one(scenario.report("street_vending", 31.300), ev.WorkOrderDispatched)
    scenario.clock.advance(hours=9)
    now = scenario.clock()
    report = scenario.kpis(GAOHANG.local_day(now), Dimension.DEPARTMENT)
    assert report.total.current.overdue_open == 1
    assert {r.key: r.current.overdue_open for r in report.rows}["city_ops"] == 1
    ops = scenario.ops
    [row] = ops.query(handlers.list_overdue, 200, GAOHANG)
    assert row.work_order_id == late.work_order_id and row.overdue_s == pytest.approx(3600)
    assert row.deadline.tzinfo is not None and (row.lat, row.lon) == (31.300, 121.565)
    backlog = {b.department_code: b for b in ops.query(handlers.show_backlog, GAOHANG)}
    assert (backlog["city_ops"].open, backlog["city_ops"].overdue) == (1, 1)
    points = ops.query(handlers.map_incidents, GAOHANG)["features"]
    assert [p["properties"]["overdue"] for p in points] == [True]
    grids = ops.query(handlers.map_grids, GAOHANG)["features"]
    assert len(grids) == 12 and sum(g["properties"]["open"] for g in grids) == 1
    trend = ops.query(handlers.show_trend, 3, GAOHANG)  # now is 08:00 the next day
    assert [(t.date, t.reported, t.closed) for t in trend] == [
        ("2026-05-31", 0, 0),
        ("2026-06-01", 11, 7),
        ("2026-06-02", 0, 0),
    ]


def test_csv_has_a_row_per_key_and_period(scenario: Scenario) -> None:
    report = scenario.kpis(date(2026, 6, 1), Dimension.DEPARTMENT)
    rows = to_csv_rows(report)
    assert rows[0][:3] == ["period", "start", "key"]
    assert len(rows) == 1 + 2 * (len(report.rows) + 1)
    total = next(r for r in rows if r[2] == "all" and r[0] == "current")
    assert total[rows[0].index("closure_rate")] == "1.0"


def test_folding_twice_changes_nothing(scenario: Scenario) -> None:
    event = ev.IncidentReported(
        incident_id="K-1",
        actor=Actor(kind=ActorKind.GRID_WORKER, id="w"),
        correlation_id="K-1",
        source="grid_worker",
        category_code="x",
        location=Location(lat=31.3, lon=121.6),
        description="d",
        reporter_id="w",
        client_report_id="r",
        occurred_at=START + timedelta(minutes=1),
    )
    scenario.ops.handle(event)
    scenario.ops.handle(event)
    report = scenario.kpis(date(2026, 6, 1), Dimension.NONE)
    assert report.total.current.reported == 10  # K-1 already existed: a second report of it is not counted


def test_the_rollups_agree_with_a_scan_of_every_row(scenario: Scenario) -> None:
    late = one(scenario.report("street_vending", 31.300), ev.WorkOrderDispatched)
    scenario.clock.advance(hours=30)  # past its deadline, still open: due, and overdue now
    scenario.dept(ev.WorkOrderAccepted, late)
    with scenario.ops_db.connect() as conn:
        history = kpi_reference.load(conn, scenario.events)
    now = scenario.clock()
    for at in (date(2026, 5, 31), date(2026, 6, 1), date(2026, 6, 2), GAOHANG.local_day(now)):
        for period in Period:
            for by in Dimension:
                report = scenario.kpis(at, by, period)
                assert kpi_reference.differences(report, history, now, GAOHANG) == [], (at, period, by)
