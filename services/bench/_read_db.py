"""What the read benchmark asks of a read model's database besides its API: a scratch PostgreSQL database of its
own (so a benchmark never drops a test's or a demo's tables), how many bytes the read model takes, and when the
live fold marked events processed (the ``processed_event`` mark is written in the transaction that folds the
event: once it is visible, so is the event's effect).

Read-only on the read model, through the drivers themselves (sqlite3, psycopg): the benchmark sits beside the
service, as ``services.chaos`` does for its audit.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

_CHUNK = 500
"""Event ids asked about in one statement."""


def dialect(url: str) -> str:
    """``sqlite`` or ``postgresql``, from a SQLAlchemy URL; ValueError for any other."""
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme in ("sqlite", "postgresql", "postgres"):
        return "postgresql" if scheme == "postgres" else scheme
    raise ValueError(f"not a SQLite or PostgreSQL database URL: {url!r}")


def sqlite_path(url: str) -> Path:
    path = url.split("///", 1)[-1]
    if not path or path == ":memory:":
        raise ValueError(f"the read benchmark needs a SQLite file, not {url!r}")
    return Path(path)


def libpq(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL (``postgresql+psycopg://…``) as psycopg takes it."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql"))


def with_database(url: str, name: str) -> str:
    """``url`` naming database ``name`` on the same server."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def _connect_pg(url: str) -> Any:
    import psycopg

    return psycopg.connect(libpq(url), autocommit=True)


def create_database(server_url: str, name: str) -> str:
    """A new, empty PostgreSQL database ``name`` on the server of ``server_url`` (dropped first if it is there);
    returns its URL."""
    _check_name(name)
    with contextlib.closing(_connect_pg(server_url)) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    _check_name(name)
    with contextlib.closing(_connect_pg(server_url)) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _check_name(name: str) -> None:
    if not name.replace("_", "").isalnum() or not name.islower():
        raise ValueError(f"not a scratch database name: {name!r}")


@dataclass(frozen=True, slots=True)
class Size:
    """The bytes a database takes, in all and per table (indexes included)."""

    total: int
    tables: dict[str, int]


def size(url: str) -> Size:
    """How many bytes the database at ``url`` takes: a SQLite file (with its write-ahead log), or a PostgreSQL
    database's tables with their indexes and TOAST."""
    if dialect(url) == "sqlite":
        path = sqlite_path(url)
        total = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as conn:
            try:
                rows = conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall()
            except sqlite3.OperationalError:  # a SQLite built without the dbstat table
                rows = []
        return Size(total, {str(name): int(bytes_) for name, bytes_ in rows})
    with contextlib.closing(_connect_pg(url)) as conn:
        rows = conn.execute(
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
    tables = {str(name): int(bytes_) for name, bytes_ in rows}
    return Size(sum(tables.values()), tables)


def incidents(url: str) -> int:
    """How many incidents the read model at ``url`` holds (a model filled before the run says its own size)."""
    if dialect(url) == "sqlite":
        with contextlib.closing(sqlite3.connect(f"file:{sqlite_path(url)}?mode=ro", uri=True, timeout=30)) as conn:
            return int(conn.execute("SELECT count(*) FROM ops_incident").fetchone()[0])
    with contextlib.closing(_connect_pg(url)) as conn:
        return int(conn.execute("SELECT count(*) FROM ops_incident").fetchone()[0])


class Marks(Protocol):
    """Which of some events the read model has marked processed."""

    def processed(self, event_ids: Iterable[str]) -> set[str]: ...

    def close(self) -> None: ...


class _SqliteMarks:
    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, check_same_thread=False)

    def processed(self, event_ids: Iterable[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(event_ids):
            marks = ",".join("?" * len(chunk))
            rows = self._conn.execute(f"SELECT event_id FROM processed_event WHERE event_id IN ({marks})", chunk)
            found.update(r[0] for r in rows)
        return found

    def close(self) -> None:
        self._conn.close()


class _PostgresMarks:
    def __init__(self, url: str) -> None:
        self._conn = _connect_pg(url)

    def processed(self, event_ids: Iterable[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(event_ids):
            rows = self._conn.execute("SELECT event_id FROM processed_event WHERE event_id = ANY(%s)", (chunk,))
            found.update(r[0] for r in rows)
        return found

    def close(self) -> None:
        self._conn.close()


def marks(url: str) -> Marks:
    """A read-only look at the processed marks of the database at ``url``."""
    if dialect(url) == "sqlite":
        return _SqliteMarks(sqlite_path(url))
    return _PostgresMarks(url)


def _chunks(ids: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for event_id in ids:
        chunk.append(event_id)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


__all__ = [
    "Marks",
    "Size",
    "create_database",
    "dialect",
    "drop_database",
    "incidents",
    "libpq",
    "marks",
    "size",
    "sqlite_path",
    "with_database",
]
