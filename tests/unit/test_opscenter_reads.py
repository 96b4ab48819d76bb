"""The operations center's lists and map over a large backlog: indexed and bounded, whatever the history.

A read model of some 20 000 open incidents (and their work orders) is written straight into the tables
(tests/readmodel_fill.py). Every statement the lists and the map run is checked with SQLite's ``EXPLAIN QUERY
PLAN``: each reaches the incidents and work orders through an index, never by a full scan; the map's answer stays
under 200 KB at every zoom, its clusters adding up to the open incidents; the overdue list comes a page at a time,
each work order once, also while new work falls due between pages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from schemas.reference import GAOHANG
from services.common.bus import MessageBus
from services.common.db import UnitOfWork, create_tables, make_engine
from services.opscenter import _map, handlers, views
from services.opscenter._map import Box, MapQuery
from services.opscenter.api import GeoJSONResponse
from services.opscenter.kpis import Dimension, Period
from services.opscenter.models import TABLES, OpsWorkOrder
from tests.readmodel_fill import NOW, Filled, fill

TOWN_BOX = Box(121.56, 31.27, 121.63, 31.33)
BOXES = {
    "everywhere": None,
    "the town": TOWN_BOX,
    "a grid cell": Box(121.56, 31.27, 121.5775, 31.29),
    "a street": Box(121.565, 31.275, 121.567, 31.2765),
    "outside the town": Box(0.0, 0.0, 1.0, 1.0),
}
OPEN = ("dispatched", "filed", "handled", "in_progress", "reported", "returned", "rework", "verifying")
PAYLOAD_MAX = 200_000


@dataclass
class Big:
    engine: Engine
    filled: Filled
    bus: MessageBus

    def query(self, handler: Callable[..., Any], *args: Any) -> Any:
        return self.bus.query(handler, *args)

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar_one()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Big]:
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('big') / 'opscenter.sqlite'}")
    filled = fill(engine, 21_200, closed_share=0.0, seed=7)  # 95 % of them open
    assert filled.open >= 20_000 and filled.overdue > 10_000
    yield Big(engine, filled, MessageBus(lambda: UnitOfWork(engine, clock=lambda: NOW), {}))
    engine.dispose()


def _open_in(big: Big, box: Box | None) -> int:
    where = "" if box is None else " AND lat BETWEEN :s AND :n AND lon BETWEEN :w AND :e"
    params = {} if box is None else {"s": box.south, "n": box.north, "w": box.west, "e": box.east}
    statuses = ", ".join(f"'{s}'" for s in OPEN)
    return int(big.scalar(f"SELECT count(*) FROM ops_incident WHERE status IN ({statuses}){where}", **params))


# -- the map ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", sorted(BOXES))
def test_the_map_stays_small_at_every_zoom_and_its_clusters_add_up(big: Big, where: str) -> None:
    box = BOXES[where]
    open_here = _open_in(big, box)
    for zoom in (None, *range(23)):
        answer = big.query(handlers.show_map, MapQuery(zoom, box), GAOHANG)
        size = len(GeoJSONResponse(answer).body)
        assert size < PAYLOAD_MAX, f"{where}, zoom {zoom}: {size} bytes"
        features = answer["features"]
        assert answer["total"] == open_here, (where, zoom)
        if answer["mode"] == "points":
            assert open_here <= _map.POINTS_MAX and (zoom is None or zoom >= _map.CLUSTER_BELOW_ZOOM)
            assert len(features) == open_here
            assert all("incident_id" in f["properties"] for f in features)
            continue
        assert answer["mode"] == "clusters"
        assert len(features) <= (_map.CELLS_ACROSS_MAX + 1) ** 2
        props = [f["properties"] for f in features]
        assert sum(p["count"] for p in props) == open_here, (where, zoom)
        assert all(p["cluster"] and 0 <= p["overdue"] <= p["count"] and p["escalated"] <= p["count"] for p in props)
        for f in features:  # each centroid lies in its cell
            west, south, east, north = f["properties"]["bbox"]
            lon, lat = f["geometry"]["coordinates"]
            assert west - 1e-6 <= lon <= east + 1e-6 and south - 1e-6 <= lat <= north + 1e-6
        if box is None:
            assert sum(p["overdue"] for p in props) == big.filled.overdue_incidents
            assert sum(p["escalated"] for p in props) == big.filled.escalated_open


def test_a_close_look_at_a_few_incidents_gets_them_as_points(big: Big) -> None:
    box = BOXES["a street"]
    assert box is not None
    answer = big.query(handlers.show_map, MapQuery(17, box), GAOHANG)
    assert answer["mode"] == "points" and 0 < len(answer["features"]) <= _map.POINTS_MAX
    for f in answer["features"]:
        lon, lat = f["geometry"]["coordinates"]
        assert box.west <= lon <= box.east and box.south <= lat <= box.north
    late = {f["properties"]["incident_id"] for f in answer["features"] if f["properties"]["overdue"]}
    ids = ", ".join(f"'{f['properties']['incident_id']}'" for f in answer["features"])
    with big.engine.connect() as conn:
        want = set(
            conn.execute(
                sa.text(
                    f"SELECT DISTINCT incident_id FROM ops_work_order WHERE incident_id IN ({ids}) "
                    "AND status IN ('dispatched', 'accepted', 'rework') AND deadline < :now"
                ),
                {"now": NOW.replace(tzinfo=None).isoformat(sep=" ")},
            ).scalars()
        )
    assert late == want and late


def test_the_grids_count_the_open_incidents(big: Big) -> None:
    cells = big.query(handlers.map_grids, GAOHANG)["features"]
    counted = {f["properties"]["grid_id"]: f["properties"]["open"] for f in cells}
    assert set(counted) == set(GAOHANG.grids) and sum(counted.values()) == big.filled.open
    statuses = ", ".join(f"'{s}'" for s in OPEN)
    gh05 = big.scalar(f"SELECT count(*) FROM ops_incident WHERE status IN ({statuses}) AND grid_id = 'gh05'")
    assert counted["gh05"] == gh05 > 0


# -- the lists --------------------------------------------------------------------------------------------------


def test_the_backlog_counts_the_work_owed(big: Big) -> None:
    backlog = big.query(handlers.show_backlog, GAOHANG)
    assert sum(b.open for b in backlog) == big.filled.active
    assert sum(b.overdue for b in backlog) == big.filled.overdue


def test_the_overdue_list_comes_a_page_at_a_time_each_work_order_once_in_order(big: Big) -> None:
    seen: list[views.OverdueOrder] = []
    after: views.OverdueAfter | None = None
    pages = 0
    while True:
        page = big.query(handlers.page_overdue, 1000, after, GAOHANG)
        assert page.total == big.filled.overdue and len(page.items) <= 1000
        seen += page.items
        pages += 1
        if page.next is None:
            break
        after = views.OverdueAfter.parse(page.next.token())
        assert after == page.next and (after.deadline, after.work_order_id) == (
            page.items[-1].deadline,
            page.items[-1].work_order_id,
        )
    assert pages == -(-big.filled.overdue // 1000)
    assert len(seen) == len({o.work_order_id for o in seen}) == big.filled.overdue
    keys = [(o.deadline, o.work_order_id) for o in seen]
    assert keys == sorted(keys) and all(o.overdue_s > 0 for o in seen)
    assert big.query(handlers.list_overdue, 200, GAOHANG) == seen[:200]


def test_a_page_follows_its_cursor_whatever_fell_due_meanwhile(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'ops.sqlite'}")
    fill(engine, 400, closed_share=0.0, seed=3)
    bus = MessageBus(lambda: UnitOfWork(engine, clock=lambda: NOW), {})
    first = bus.query(handlers.page_overdue, 50, None, GAOHANG)
    second_before = bus.query(handlers.page_overdue, 50, first.next, GAOHANG)
    # work falls due ahead of the cursor (before the first page's last deadline) and behind it
    [order] = first.items[:1]
    with engine.begin() as conn:
        table = OpsWorkOrder.__table__  # type: ignore[attr-defined]
        for n, deadline in enumerate((order.deadline - timedelta(days=1), NOW - timedelta(seconds=1))):
            conn.execute(
                sa.insert(table).values(
                    work_order_id=f"NEW-{n}",
                    incident_id=order.incident_id,
                    department_code="city_ops",
                    category_code="flooding",
                    status="dispatched",
                    deadline=deadline,
                    dispatched_at=deadline - timedelta(hours=4),
                )
            )
    second_after = bus.query(handlers.page_overdue, 50, first.next, GAOHANG)
    assert second_after.items == second_before.items  # nothing moved onto, or off, the page asked for
    assert second_after.total == first.total + 2
    rest: list[str] = []
    after = second_after.next
    while after is not None:
        page = bus.query(handlers.page_overdue, 50, after, GAOHANG)
        rest += [o.work_order_id for o in page.items]
        after = page.next
    assert rest[-1] == "NEW-1" and "NEW-0" not in rest  # the one due last comes last; the other is on page one now
    engine.dispose()


# -- every statement through an index --------------------------------------------------------------------------


def _statements(engine: Engine, run: Callable[[], Any]) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        run()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return seen


def _kpis(period: Period, by: Dimension) -> Callable[[Big], Any]:
    return lambda big: big.query(handlers.report_kpis, period, None, by, GAOHANG)


READS: dict[str, Callable[[Big], Any]] = {
    "backlog": lambda big: big.query(handlers.show_backlog, GAOHANG),
    "overdue, first page": lambda big: big.query(handlers.page_overdue, 200, None, GAOHANG),
    "overdue, a later page": lambda big: big.query(
        handlers.page_overdue, 200, views.OverdueAfter(NOW - timedelta(days=100), "GL"), GAOHANG
    ),
    "map, clusters": lambda big: big.query(handlers.show_map, MapQuery(13, TOWN_BOX), GAOHANG),
    "map, clusters of a part": lambda big: big.query(handlers.show_map, MapQuery(16, BOXES["a grid cell"]), GAOHANG),
    "map, points": lambda big: big.query(handlers.show_map, MapQuery(18, BOXES["a street"]), GAOHANG),
    "map, no zoom": lambda big: big.query(handlers.show_map, MapQuery(), GAOHANG),
    "grids": lambda big: big.query(handlers.map_grids, GAOHANG),
    **{f"kpis, {period.value} by {by.value}": _kpis(period, by) for period in Period for by in Dimension},
    "trend": lambda big: big.query(handlers.show_trend, 14, GAOHANG),
}


@pytest.mark.parametrize("read", sorted(READS))
def test_every_statement_of_the_lists_and_the_map_reads_through_an_index(big: Big, read: str) -> None:
    statements = _statements(big.engine, lambda: READS[read](big))
    assert statements
    with big.engine.connect() as conn:
        for sql, params in statements:
            plan = [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params)]
            on_tables = [step for step in plan if " ops_" in f" {step.split(' USING ')[0]}"]
            assert on_tables, plan
            # the open incidents or the work owed through the index that leads with the status (not a range of
            # some time, which spans the history), or one row by its id
            unbounded = [step for step in on_tables if not _bounded(step)]
            assert not unbounded, f"{read}: reads more than the backlog in\n{sql}\n{json.dumps(plan, indent=1)}"


def _bounded(step: str) -> bool:
    found = re.fullmatch(r"SEARCH \S+ USING (?:COVERING )?INDEX \S+ \((.*)\)", step)
    if found is not None:
        return found[1].startswith("status=") or found[1] in ("incident_id=?", "work_order_id=?")
    # a rollup: a dimension's range of days (or one period's first days), in its primary key's order
    rollup = re.fullmatch(r"SEARCH ops_(?:daily|due|stage) USING PRIMARY KEY \((dim=\? AND .*)\)", step)
    return rollup is not None and ("day>" in rollup[1] or "first=" in rollup[1])


def test_the_new_indexes_are_made_on_a_database_made_before_them(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.sqlite'}")
    create_tables(engine, TABLES)
    ours = {i.name for t in TABLES for i in t.indexes if len(i.columns) > 1}
    assert ours == {"ix_ops_incident_status_map", "ix_ops_work_order_owed"}
    with engine.begin() as conn:
        for name in ours:
            conn.exec_driver_sql(f"DROP INDEX {name}")
    create_tables(engine, TABLES)  # what a service does when it starts
    have = {i["name"] for t in ("ops_incident", "ops_work_order") for i in sa.inspect(engine).get_indexes(t)}
    assert ours <= have
    engine.dispose()
