"""The KPIs from the rollups equal a scan of every row on a generated year of history (20 000 incidents), for
every period and dimension, on days across the year; folded one batch size or another, the rollups are the same."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from schemas import Event
from schemas.reference import GAOHANG
from services.bench.history import lifecycle
from services.common.bus import MessageBus
from services.common.db import UnitOfWork
from services.opscenter.handlers import bind, preload
from services.opscenter.kpis import Dimension, Period, kpi_report
from services.opscenter.models import TABLES
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
