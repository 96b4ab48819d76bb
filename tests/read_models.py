"""Reading a whole read model, to compare two of them table by table (a live one and a rebuilt one, say).

Two models folded from one log in different batches hold the same rows up to what the batching cannot help:
- a rollup's row that one fold added to and took from again (a case due, then closed) is there with zeros, where
  the other, which saw both in one batch, never wrote it: a row whose every column but its key is zero is no row;
- a sum of durations added up in another order may differ in its last bit: floats are compared to the
  microsecond (every time is)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import SQLModel

import services.opscenter.models  # noqa: F401  (its tables in the metadata)
from services.common.db import make_engine

BOOKKEEPING = {"ops_log_position": None, "processed_event": ("processed_at",)}
"""What two read models folded from one log may differ in: the rebuild's position (a whole table), and when each
applied an event (a column)."""


def read_model_rows(database_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Table → every row (bookkeeping left out), in a canonical order, datetimes as UTC, for every table of the
    project's models the database holds."""
    engine = make_engine(database_url)
    try:
        present = set(sa.inspect(engine).get_table_names())
        out: dict[str, list[tuple[Any, ...]]] = {}
        with engine.connect() as conn:
            for name, table in sorted(SQLModel.metadata.tables.items()):
                if name not in present or (name in BOOKKEEPING and BOOKKEEPING[name] is None):
                    continue
                skip = set(BOOKKEEPING.get(name) or ())
                columns = [c for c in table.columns if c.name not in skip]
                values = [i for i, c in enumerate(columns) if not c.primary_key]
                rows = [tuple(_plain(v) for v in row) for row in conn.execute(sa.select(*columns))]
                out[name] = sorted((r for r in rows if not _all_zero(r, values)), key=repr)
        return out
    finally:
        engine.dispose()


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, float):
        return round(value, 6)
    return value


def _all_zero(row: tuple[Any, ...], values: list[int]) -> bool:
    return bool(values) and all(
        isinstance(row[i], int | float) and not isinstance(row[i], bool) and row[i] == 0 for i in values
    )


def differences(a: dict[str, list[tuple[Any, ...]]], b: dict[str, list[tuple[Any, ...]]]) -> list[str]:
    """What differs between two read models' rows, table by table (a few rows of each difference)."""
    out: list[str] = []
    for name in sorted(set(a) | set(b)):
        rows_a, rows_b = set(a.get(name, [])), set(b.get(name, []))
        if rows_a != rows_b:
            only_a, only_b = sorted(rows_a - rows_b, key=repr)[:3], sorted(rows_b - rows_a, key=repr)[:3]
            out.append(
                f"{name}: {len(rows_a - rows_b)} rows only in the first {only_a}, "
                f"{len(rows_b - rows_a)} only in the second {only_b}"
            )
        elif len(a.get(name, [])) != len(b.get(name, [])):
            out.append(f"{name}: the same rows, counted {len(a[name])} and {len(b[name])} times")
    return out


def count(database_url: str, table: str) -> int:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(table):
                return 0
            return int(conn.execute(sa.select(sa.func.count()).select_from(sa.table(table))).scalar_one())
    finally:
        engine.dispose()


def wait_for_count(database_url: str, table: str, want: int, timeout: float = 120.0) -> int:
    """Until ``table`` holds ``want`` rows (fails after ``timeout`` with what it holds)."""
    deadline = time.monotonic() + timeout
    while (seen := count(database_url, table)) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"{table} of {database_url} holds {seen} rows, not {want}, after {timeout:.0f} s")
        time.sleep(0.25)
    return seen


__all__ = ["BOOKKEEPING", "count", "differences", "read_model_rows", "wait_for_count"]
