"""A large read model of the operations center, written straight into its tables (no Kafka, no fold), for the
tests of its lists and map at scale, and to time them:

    .venv/bin/python -m tests.readmodel_fill --incidents 200000 [--database-url sqlite:///var/db/ops-200k.sqlite]

prints p50/p95/p99 of every KPI, list and map read (the handler in a read-only unit of work and the JSON encoding
of its answer, without HTTP), in wall time and in the CPU time of the thread that ran it (what a busy host does
not inflate), as a table and a JSON last line. ``--reads-only`` times a database filled before. Speed is measured
here, never asserted in a test.

The history: incidents reported evenly over a year before ``now``, in the town's grid cells; 85 % closed, 3 %
rejected, 2 % merged and the rest open at every step of the loop. A filed incident has a work order (a big one two,
of two departments), closed with it, or still owed with its category's deadline (most of the open ones overdue by
now, a third of those escalated), or handled and waiting for the check. Work is accepted a minute to a day after
its dispatch, and handled before its incident closes. The KPIs' rollups are the fold's own (``domain.Tally`` over
each row written, added to the rollup tables by the store as the fold's commit adds them): a year of 1 000 000
incidents is the density of a large district.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.engine import Engine

from schemas import ORDER_ACTIVE, IncidentStatus, WorkOrderStatus
from schemas.reference import GAOHANG, Town
from services.common.bus import MessageBus
from services.common.db import UnitOfWork, create_tables, make_engine
from services.opscenter import handlers, views
from services.opscenter._map import Box, MapQuery
from services.opscenter.domain import Incident, WorkOrder
from services.opscenter.kpis import Dimension, Period
from services.opscenter.models import TABLES, OpsIncident, OpsWorkOrder
from services.opscenter.store import OpsStore

NOW = datetime(2026, 11, 24, 9, 30, tzinfo=UTC)
_HANDLED = (WorkOrderStatus.HANDLED, WorkOrderStatus.CLOSED)
_OPEN_STEPS = (
    (IncidentStatus.REPORTED, 0.05),
    (IncidentStatus.FILED, 0.05),
    (IncidentStatus.DISPATCHED, 0.40),
    (IncidentStatus.IN_PROGRESS, 0.25),
    (IncidentStatus.HANDLED, 0.10),
    (IncidentStatus.VERIFYING, 0.10),
    (IncidentStatus.REWORK, 0.05),
)
_ORDER_OF = {
    IncidentStatus.DISPATCHED: WorkOrderStatus.DISPATCHED,
    IncidentStatus.IN_PROGRESS: WorkOrderStatus.ACCEPTED,
    IncidentStatus.HANDLED: WorkOrderStatus.HANDLED,
    IncidentStatus.VERIFYING: WorkOrderStatus.HANDLED,
    IncidentStatus.REWORK: WorkOrderStatus.REWORK,
}


@dataclass(frozen=True)
class Filled:
    """What :func:`fill` wrote, counted as it wrote it."""

    incidents: int
    open: int
    orders: int
    active: int
    overdue: int
    """Work orders still owed and past their deadline at ``now``."""
    overdue_incidents: int
    escalated_open: int


def fill(
    engine: Engine,
    incidents: int,
    *,
    now: datetime = NOW,
    closed_share: float = 0.85,
    seed: int = 1,
    town: Town = GAOHANG,
    chunk: int = 20_000,
    rollups: bool = True,
) -> Filled:
    """Write ``incidents`` incidents and their work orders into the (empty) read model at ``engine``, with what
    they add to the KPIs' rollups (unless not ``rollups``)."""
    create_tables(engine, TABLES)
    rnd = random.Random(seed)
    categories, grids = list(town.categories.values()), list(town.grids.values())
    steps, weights = zip(*_OPEN_STEPS, strict=True)
    year = timedelta(days=365).total_seconds()
    inc_rows: list[dict[str, Any]] = []
    ord_rows: list[dict[str, Any]] = []
    n_open = n_orders = n_active = n_overdue = n_overdue_inc = n_escalated = 0

    def flush() -> None:
        with UnitOfWork(engine) as uow:
            conn = uow.connection
            if inc_rows:
                conn.execute(sa.insert(OpsIncident.__table__), inc_rows)  # type: ignore[attr-defined]
            if ord_rows:
                conn.execute(sa.insert(OpsWorkOrder.__table__), ord_rows)  # type: ignore[attr-defined]
            if rollups:  # what the rows add, written by the store at the commit as the fold's are
                tally = OpsStore(uow).tally(town)
                for i in inc_rows:
                    tally.incident(Incident(**i))
                for o in ord_rows:
                    tally.order(WorkOrder(**o))
            uow.commit()
        inc_rows.clear()
        ord_rows.clear()

    for n in range(incidents):
        reported = now - timedelta(seconds=rnd.random() * year)
        cat, grid = rnd.choice(categories), rnd.choice(grids)
        lat, lon = rnd.uniform(grid.south, grid.north), rnd.uniform(grid.west, grid.east)
        iid = f"GL{reported:%Y%m%d}-{n:012X}"
        fate = rnd.random()
        status: IncidentStatus
        if fate < closed_share:
            status = IncidentStatus.CLOSED
        elif fate < closed_share + 0.03:
            status = IncidentStatus.REJECTED
        elif fate < closed_share + 0.05:
            status = IncidentStatus.MERGED
        else:
            status = rnd.choices(steps, weights)[0]
        filed = reported + timedelta(minutes=rnd.uniform(1, 30))
        big = cat.big or rnd.random() < 0.05
        depts = list(cat.departments[: 2 if big else 1])
        deadline = filed + timedelta(hours=cat.deadline_hours)
        row: dict[str, Any] = {
            "incident_id": iid,
            "source": "grid_worker",
            "category_code": cat.code,
            "grid_id": grid.code,
            "lat": lat,
            "lon": lon,
            "status": status.value,
            "big": big and len(depts) > 1,
            "departments": " ".join(depts),
            "reported_at": reported,
            "deadline": None,
            "on_time": None,
            "filed_at": None,
            "rejected_at": None,
            "merged_at": None,
            "closed_at": None,
            "escalated": False,
        }
        if status is IncidentStatus.REJECTED:
            row["rejected_at"] = filed
        elif status is IncidentStatus.MERGED:
            row["merged_at"] = filed
        elif status is not IncidentStatus.REPORTED:
            row["filed_at"] = filed
            row["deadline"] = deadline
        closed = None
        if status is IncidentStatus.CLOSED:
            closed = min(filed + timedelta(hours=rnd.uniform(1, 2 * cat.deadline_hours)), now)
            row.update(closed_at=closed, on_time=closed <= deadline)
        order_status = _ORDER_OF.get(status, WorkOrderStatus.CLOSED if status is IncidentStatus.CLOSED else None)
        late = False
        if order_status is not None:
            for k, dept in enumerate(depts, 1):
                accepted = filed + timedelta(seconds=math.exp(rnd.uniform(math.log(60), math.log(86400))))
                end = closed or now
                handled = accepted + (end - accepted) * rnd.uniform(0.2, 0.9)
                owed = order_status in ORDER_ACTIVE
                past = owed and deadline < now
                late |= past
                escalate = past and rnd.random() < 1 / 3
                ord_rows.append(
                    {
                        "work_order_id": f"{iid}-{k}",
                        "incident_id": iid,
                        "department_code": dept,
                        "category_code": cat.code,
                        "grid_id": grid.code,
                        "status": order_status.value,
                        "deadline": deadline,
                        "dispatched_at": filed,
                        "accepted_at": min(accepted, end) if order_status != "dispatched" else None,
                        "handled_at": handled if order_status in _HANDLED and accepted < end else None,
                        "reminded": past,
                        "escalated": escalate,
                    }
                )
                row["escalated"] = row["escalated"] or escalate
                n_orders += 1
                n_active += owed
                n_overdue += past
        if status not in (IncidentStatus.CLOSED, IncidentStatus.REJECTED, IncidentStatus.MERGED):
            n_open += 1
            n_overdue_inc += late
            n_escalated += row["escalated"]
        inc_rows.append(row)
        if len(inc_rows) >= chunk:
            flush()
    flush()
    return Filled(incidents, n_open, n_orders, n_active, n_overdue, n_overdue_inc, n_escalated)


# -- timing ----------------------------------------------------------------------------------------------------


def reads(now: datetime = NOW, town: Town = GAOHANG) -> dict[str, Callable[[MessageBus], Any]]:
    """Every KPI, list and map read of the dashboard, as the API runs it: the KPIs of each period and cut on the
    day of ``now`` (with its snapshot of the work overdue) and in the middle of the year."""
    town_box = Box(121.56, 31.27, 121.63, 31.33)
    one_grid = Box(121.56, 31.27, 121.5775, 31.29)
    tiny = Box(121.565, 31.275, 121.567, 31.2765)
    days = {"last": town.local_day(now), "mid": town.local_day(now - timedelta(days=182))}

    def kpis(period: Period, by: Dimension, label: str) -> Callable[[MessageBus], Any]:
        return lambda bus: bus.query(handlers.report_kpis, period, days[label], by, town)

    return {
        **{
            f"kpis {period.value} by {by.value} @{label}": kpis(period, by, label)
            for label in days
            for period in Period
            for by in Dimension
        },
        "trend 14 days": lambda bus: bus.query(handlers.show_trend, 14, town),
        "backlog": lambda bus: bus.query(handlers.show_backlog, town),
        "overdue (first page of 200)": lambda bus: bus.query(handlers.page_overdue, 200, None, town),
        "overdue (page 50 of 200)": lambda bus: bus.query(
            handlers.page_overdue, 200, views.OverdueAfter(now - timedelta(days=200), "GL"), town
        ),
        "map/incidents (no zoom)": lambda bus: bus.query(handlers.show_map, MapQuery(), town),
        "map/incidents zoom 11": lambda bus: bus.query(handlers.show_map, MapQuery(11, None), town),
        "map/incidents zoom 13, town": lambda bus: bus.query(handlers.show_map, MapQuery(13, town_box), town),
        "map/incidents zoom 15, a grid": lambda bus: bus.query(handlers.show_map, MapQuery(15, one_grid), town),
        "map/incidents zoom 18, a street": lambda bus: bus.query(handlers.show_map, MapQuery(18, tiny), town),
        "map/grids": lambda bus: bus.query(handlers.map_grids, town),
    }


def _encoded(value: Any) -> int:
    """The size of an answer as the API encodes it."""
    if isinstance(value, list):
        value = [v.model_dump(mode="json") for v in value]
    elif isinstance(value, views.OverduePage):
        value = [v.model_dump(mode="json") for v in value.items]
    elif isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return len(json.dumps(value, ensure_ascii=False).encode())


def _percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile of sorted values."""
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def time_reads(engine: Engine, runs: int, now: datetime = NOW, only: str = "") -> dict[str, dict[str, float]]:
    """p50/p95/p99 (ms) of the wall time and of the thread's CPU time, and the answer's size, of every read (those
    whose name holds ``only``), ``runs`` times each after one warm-up."""
    bus = MessageBus(lambda: UnitOfWork(engine, clock=lambda: now), {})
    out: dict[str, dict[str, float]] = {}
    for name, read in reads(now).items():
        if only not in name:
            continue
        size = _encoded(read(bus))
        wall, cpu = [], []
        for _ in range(runs):
            t0, c0 = time.perf_counter(), time.thread_time()
            _encoded(read(bus))
            cpu.append((time.thread_time() - c0) * 1000)
            wall.append((time.perf_counter() - t0) * 1000)
        wall.sort()
        cpu.sort()
        out[name] = {
            **{f"p{q}_ms": round(_percentile(wall, q), 2) for q in (50, 95, 99)},
            "max_ms": round(wall[-1], 2),
            **{f"cpu_p{q}_ms": round(_percentile(cpu, q), 2) for q in (50, 95, 99)},
            "bytes": size,
        }
    return out


def _fill_fast(url: str, incidents: int, now: datetime) -> None:
    """:func:`fill` with a large SQLite page cache and no waiting for the disk (a million incidents' rows and
    indexes are written in random key order: with the default 2 MB cache each insert reads pages back)."""
    engine = make_engine(url)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _cache(conn: Any, _record: Any) -> None:
            conn.execute("PRAGMA cache_size=-1048576")
            conn.execute("PRAGMA synchronous=OFF")

    t0 = time.perf_counter()
    filled = fill(engine, incidents, now=now)
    print(f"filled {filled} in {time.perf_counter() - t0:.1f} s", flush=True)
    engine.dispose()


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--incidents", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--database-url", default="", help="an empty database (default: a temporary SQLite file)")
    parser.add_argument("--reads-only", action="store_true", help="time the reads of a database filled before")
    parser.add_argument("--only", default="", help="time only the reads whose name holds this")
    parser.add_argument(
        "--now", default=NOW.isoformat(), help="the history's end, an ISO time or 'now' (to serve it to opscenter)"
    )
    args = parser.parse_args()
    now = datetime.now(UTC).replace(microsecond=0) if args.now == "now" else datetime.fromisoformat(args.now)
    with tempfile.TemporaryDirectory(prefix="gridloop-readmodel-") as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'opscenter.sqlite'}"
        if not args.reads_only:
            _fill_fast(url, args.incidents, now)
        engine = make_engine(url)
        load = os.getloadavg()[0]
        figures = time_reads(engine, args.runs, now, only=args.only)
        width = max(map(len, figures))
        heads = ("p50", "p95", "p99", "max", "cpu p50", "cpu p95", "cpu p99")
        keys = ("p50_ms", "p95_ms", "p99_ms", "max_ms", "cpu_p50_ms", "cpu_p95_ms", "cpu_p99_ms")
        print(f"{'read (ms)':<{width}}  " + "  ".join(f"{h:>8}" for h in heads) + f"  {'bytes':>8}")
        for name, f in figures.items():
            print(f"{name:<{width}}  " + "  ".join(f"{f[k]:>8.2f}" for k in keys) + f"  {int(f['bytes']):>8}")
        loads = (round(load, 2), round(os.getloadavg()[0], 2))
        summary = {"incidents": args.incidents, "database": engine.dialect.name, "load": loads, "reads": figures}
        print(json.dumps(summary))
        engine.dispose()


if __name__ == "__main__":
    main()
