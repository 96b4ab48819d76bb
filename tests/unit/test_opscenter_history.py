"""The KPIs from the rollups equal a scan of every row on a generated year of history (20 000 incidents), for
every period and dimension, on days across the year; folded one batch size or another, the rollups are the same.
The p90's bucket found in SQL is the one the histogram's rows give in Python, for every period of the year."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import date, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from schemas import Event
from schemas.reference import GAOHANG
from services.bench.history import lifecycle
from services.common.bus import MessageBus
from services.common.db import UnitOfWork
from services.opscenter.domain import first_day
from services.opscenter.handlers import bind, preload
from services.opscenter.kpis import P90, Dimension, Period, kpi_report, p90_bucket
from services.opscenter.models import TABLES, OpsStage
from services.opscenter.store import ReadModel
from tests import kpi_reference

MakeDb = Callable[[tuple[sa.Table, ...]], Engine]


@pytest.fixture(scope="module")
def history() -> list[Event]:
    return list(lifecycle(20_000, seed=11, days=365))


def test_a_year_of_kpis_from_the_rollups_equals_a_scan_of_every_row(history: list[Event], make_db: MakeDb) -> None:
    engine = make_db(TABLES)
    bus = MessageBus(lambda: UnitOfWork(engine), bind(GAOHANG), preload)
    for start in range(0, len(history), 2000):
        bus.handle_batch(history[start : start + 2000])
    now = max(e.occurred_at for e in history)
    last = GAOHANG.local_day(now)
    with engine.connect() as conn:
        rows = kpi_reference.load(conn, history)
        reads = ReadModel(conn)
        for at in (last, last - timedelta(days=45), last - timedelta(days=200)):
            for period in Period:
                for by in Dimension:
                    report = kpi_report(reads, period, at, by, now, GAOHANG)
                    assert report.total.current.reported > 0
                    assert kpi_reference.differences(report, rows, now, GAOHANG) == [], (at, period, by)
        first, checked = GAOHANG.local_day(min(e.occurred_at for e in history)), 0
        for span in ("day", "week", "month"):
            for dim in Dimension:
                every = 11 if span == "day" else 5  # some days, every week and month
                starts = sorted({first_day(span, first + timedelta(days=d)) for d in range(0, 370, every)})
                for previous, current in itertools.pairwise(starts):
                    got = reads.stage_p90(dim.value, span, previous, current)
                    assert sorted(got) == _p90_in_python(conn, dim.value, span, previous, current)
                    checked += len(got)
        assert checked > 3_000


def _p90_in_python(conn: sa.Connection, dim: str, span: str, previous: date, current: date) -> list[P90]:
    """Each histogram's p90 bucket (``kpis.p90_bucket``) from its rows as the table holds them."""
    g = OpsStage.__table__.c  # type: ignore[attr-defined]
    rows = conn.execute(
        sa.select(g.key, g.first, g.stage, g.bucket, g.n).where(
            g.dim == dim, g.span == span, g.first.in_((previous, current)), g.n != 0
        )
    )
    histograms: dict[tuple[str, bool, str], dict[int, int]] = {}
    for key, first, stage, b, n in rows:
        histograms.setdefault((key, first == current, stage), {})[b] = n
    return sorted((*k, p90_bucket(h)) for k, h in histograms.items())


@pytest.mark.parametrize(
    "histogram",
    [
        {5: 1},
        {-200: 3, 10: 1},
        {1: 5, 2: 4, 3: 1},  # the rank (9 of 10) reached exactly at bucket 2
        {1: 5, 2: 3, 3: 2},
        {1: 1, 2: -1},  # taken back to nothing: the first bucket
        {1: 2, 2: -1, 3: 1, 4: -1},
        {1: -2, 2: 1},  # more taken back than added (never so in a fold): the last bucket
        {b: b % 7 + 1 for b in range(-30, 300)},
    ],
)
def test_the_p90_bucket_found_in_sql_is_the_nearest_rank_one(make_db: MakeDb, histogram: dict[int, int]) -> None:
    engine = make_db(TABLES)
    previous, current = date(2026, 5, 1), date(2026, 6, 1)
    rows = [
        {"dim": "grid", "span": "month", "first": first, "key": key, "stage": "close", "bucket": b, "n": n * weight}
        for first, weight in ((previous, 1), (current, 2), (date(2026, 7, 1), 3))
        for key in ("gh01", "gh02")
        for b, n in histogram.items()
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(OpsStage.__table__), rows)  # type: ignore[attr-defined]
        got = sorted(ReadModel(conn).stage_p90("grid", "month", previous, current))
    want = p90_bucket({b: n for b, n in histogram.items() if n})
    assert got == [(key, side, "close", want) for key in ("gh01", "gh02") for side in (False, True)]
