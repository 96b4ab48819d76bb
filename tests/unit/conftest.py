from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.common.db import create_tables, make_engine


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 6, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> datetime:
        self.now += timedelta(**kwargs)
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_db(tmp_path: Path) -> Iterator[Callable[[tuple[sa.Table, ...]], Engine]]:
    engines: list[Engine] = []

    def _make(tables: tuple[sa.Table, ...]) -> Engine:
        engine = make_engine(f"sqlite:///{tmp_path / f'db{len(engines)}.sqlite'}")
        create_tables(engine, tables)
        engines.append(engine)
        return engine

    yield _make
    for e in engines:
        e.dispose()
