"""The operations center's lists, map and KPIs answer the same on PostgreSQL as on SQLite.

One read model (tests/readmodel_fill.py, the same seed) is written into both databases; the backlog, every page of
the overdue list, the map at every zoom (points and clusters) and the grids must be equal. Runs where
GRIDLOOP_TEST_POSTGRES_URL names a PostgreSQL database; in CI its absence is a failure, never a skip.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from schemas.reference import GAOHANG
from services.common.bus import MessageBus
from services.common.db import SHARED_TABLES, UnitOfWork, make_engine
from services.opscenter import handlers, views
from services.opscenter._map import Box, MapQuery
from services.opscenter.kpis import Dimension, Period
from services.opscenter.models import TABLES
from tests.readmodel_fill import NOW, fill

URL = os.environ.get("GRIDLOOP_TEST_POSTGRES_URL", "")

pytestmark = pytest.mark.postgres

Query = Callable[..., Any]


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Query, Query]]:
    if not URL:
        if os.environ.get("CI"):
            pytest.fail("GRIDLOOP_TEST_POSTGRES_URL is not set: CI must run these tests on PostgreSQL")
        pytest.skip("GRIDLOOP_TEST_POSTGRES_URL not set (start one with infra/postgres/pg.sh up)")
    pg = make_engine(URL)
    assert pg.dialect.name == "postgresql"
    lite = make_engine(f"sqlite:///{Path(tmp_path_factory.mktemp('lite')) / 'opscenter.sqlite'}")
    _drop(pg)
    for engine in (pg, lite):
        fill(engine, 3000, closed_share=0.3, seed=11)

    def query(engine: Engine) -> Query:
        return MessageBus(lambda: UnitOfWork(engine, clock=lambda: NOW), {}).query

    yield query(pg), query(lite)
    _drop(pg)
    pg.dispose()
    lite.dispose()


def _drop(engine: Engine) -> None:
    SQLModel.metadata.drop_all(engine, tables=[*SHARED_TABLES, *TABLES])


def _clusters(answer: dict[str, Any]) -> Any:
    """The map's answer, its centroids rounded (the databases average floats in their own order)."""
    out = dict(answer)
    out["features"] = sorted(
        (
            [round(c, 4) for c in f["geometry"]["coordinates"]],
            sorted((k, v) for k, v in f["properties"].items()),
        )
        for f in answer["features"]
    )
    return out


def test_the_lists_and_the_map_are_the_same_on_both(both: tuple[Query, Query]) -> None:
    pg, lite = both
    assert pg(handlers.show_backlog, GAOHANG) == lite(handlers.show_backlog, GAOHANG)
    assert pg(handlers.map_grids, GAOHANG) == lite(handlers.map_grids, GAOHANG)
    after: views.OverdueAfter | None = None
    pages = 0
    while True:
        a, b = pg(handlers.page_overdue, 100, after, GAOHANG), lite(handlers.page_overdue, 100, after, GAOHANG)
        assert (a.items, a.next, a.total) == (b.items, b.next, b.total), f"page {pages}"
        pages += 1
        if a.next is None:
            break
        after = views.OverdueAfter.parse(a.next.token())
    assert pages > 1
    for box in (None, Box(121.56, 31.27, 121.63, 31.33), Box(121.56, 31.27, 121.5775, 31.29)):
        for zoom in (None, 0, 11, 13, 15, 18, 22):
            a = pg(handlers.show_map, MapQuery(zoom, box), GAOHANG)
            b = lite(handlers.show_map, MapQuery(zoom, box), GAOHANG)
            assert _clusters(a) == _clusters(b), (box, zoom)


def test_the_kpis_are_the_same_on_both(both: tuple[Query, Query]) -> None:
    """The rollups' sums, the p90s found in two steps and the work overdue, for every period and cut, on days
    across the year of the filled read model."""
    pg, lite = both
    for days_back in (0, 40, 150, 300):
        at = GAOHANG.local_day(NOW - timedelta(days=days_back))
        for period in Period:
            for by in Dimension:
                want = lite(handlers.report_kpis, period, at, by, GAOHANG).model_dump()
                assert pg(handlers.report_kpis, period, at, by, GAOHANG).model_dump() == want, (at, period, by)
