"""Rows as plain attribute records, written back with Core statements: for a fold that touches many rows per batch.

The ORM's unit of work costs, per row, an instrumented object to build, every attribute set tracked and a flush
that works out what changed. A read model folded from a busy log pays that for every event. A :class:`Record`
is the row's columns as plain attributes; the :class:`RecordStore` remembers each as read and, at the commit,
inserts the new ones and updates the changed columns of the others, one statement per table and column set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC
from types import SimpleNamespace
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel


class Record(SimpleNamespace):
    """One row: its columns as attributes. Change them in place; the unit of work writes what changed."""


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Rows(Generic[T]):
    """A table read and written as rows of a typed ``kind``: a plain (not slotted) dataclass of a service's domain
    whose fields are the table's columns, every one of them. A service's store names its tables so; the records
    it hands out are then of that type, with every timestamp aware (SQLite hands back naive ones)."""

    model: type[SQLModel]
    kind: type[T]

    @property
    def table(self) -> sa.Table:
        return self.model.__table__  # type: ignore[attr-defined,no-any-return]


Mapped = Rows[Any] | type[SQLModel]
"""A table as a store names it: typed rows, or the model alone (its rows are then of :class:`Record`)."""


def _table(mapped: Mapped) -> sa.Table:
    if isinstance(mapped, Rows):
        return mapped.table
    return mapped.__table__  # type: ignore[attr-defined,no-any-return]


@functools.cache
def _datetimes(table: sa.Table) -> tuple[str, ...]:
    return tuple(c.name for c in table.columns if isinstance(c.type, sa.DateTime))


@functools.cache
def _update(table: sa.Table) -> Any:
    """Set some columns of the row whose key is bound as ``_key`` (the columns are the parameters' other names)."""
    (key,) = table.primary_key.columns
    return sa.update(table).where(key == sa.bindparam("_key"))


@functools.cache
def _defaults(table: sa.Table) -> dict[str, Any]:
    """Every column's value in a new row that does not give it: its scalar default, else None."""
    return {
        c.name: getattr(c.default, "arg", None) if c.default is not None and c.default.is_scalar else None
        for c in table.columns
    }


class _Table:
    """What one unit of work read, added and grouped of one table."""

    def __init__(self, table: sa.Table, kind: type[Any]) -> None:
        self.table = table
        self.kind = kind
        self.datetimes = _datetimes(table)
        (self.key,) = (c.name for c in table.primary_key.columns)
        self.rows: dict[Any, Any] = {}
        self.as_read: dict[Any, dict[str, Any]] = {}
        self.new: list[Any] = []
        self.absent: set[Any] = set()
        self.groups: dict[str, dict[Any, list[Any]]] = {}

    def keep(self, values: dict[str, Any]) -> Any:
        """The record of a row just read (the one already kept, if this unit read or added it before)."""
        key = values[self.key]
        record = self.rows.get(key)
        if record is None:
            for name in self.datetimes:
                if (value := values[name]) is not None and value.tzinfo is None:
                    values[name] = value.replace(tzinfo=UTC)
            record = self.rows[key] = self.kind(**values)
            self.as_read[key] = values
        return record

    def changes(self) -> dict[tuple[str, ...], list[tuple[Any, ...]]]:
        """The updates to send, by the columns they set (each the values of those columns, then the row's key);
        the changed rows count as read as they are now."""
        out: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for key, before in self.as_read.items():
            now = vars(self.rows[key])
            changed = tuple(name for name, value in now.items() if before.get(name) != value)
            if changed:
                out.setdefault(changed, []).append((*(now[name] for name in changed), key))
                self.as_read[key] = dict(now)
        return out


class RecordStore:
    """The records of one unit of work, by table."""

    def __init__(self) -> None:
        self._tables: dict[sa.Table, _Table] = {}

    def _of(self, model: Mapped) -> _Table:
        table = _table(model)
        state = self._tables.get(table)
        if state is None:
            state = self._tables[table] = _Table(table, model.kind if isinstance(model, Rows) else Record)
        return state

    def fetch(self, connection: Connection, model: Mapped, keys: Iterable[Any]) -> None:
        """Read the rows with these keys (those not read yet) in one statement; a key with no row is absent."""
        state = self._of(model)
        rows, absent = state.rows, state.absent  # (``set - dict.keys()`` would copy every key held, at each call)
        wanted = {k for k in keys if k not in rows and k not in absent}
        if not wanted:
            return
        key = state.table.c[state.key]
        for row in connection.execute(sa.select(state.table).where(key.in_(wanted))).mappings():
            state.keep(dict(row))
            wanted.discard(row[state.key])
        state.absent |= wanted

    def fetch_by(self, connection: Connection, model: Mapped, column: str, keys: Iterable[Any]) -> None:
        """Read every row whose ``column`` holds one of ``keys`` (those not asked for yet) in one statement."""
        state = self._of(model)
        groups = state.groups.setdefault(column, {})
        wanted = {k for k in keys if k not in groups}
        if not wanted:
            return
        for key in wanted:
            groups[key] = []
        for row in connection.execute(sa.select(state.table).where(state.table.c[column].in_(wanted))).mappings():
            groups[row[column]].append(state.keep(dict(row)))
        for record in state.new:  # added in this unit (not in the table yet) before its group was asked for
            if (value := getattr(record, column)) in wanted:
                groups[value].append(record)

    def where(self, connection: Connection, model: Mapped, statement: Any, params: dict[str, Any]) -> list[Any]:
        """The records of the rows a select of the whole table returns (those already kept as they are now)."""
        state = self._of(model)
        return [state.keep(dict(row)) for row in connection.execute(statement, params).mappings()]

    def inserted(self, model: Mapped) -> list[Any]:
        return list(self._of(model).new)

    def changed(self, model: Mapped) -> list[tuple[Any, Any]]:
        """The rows this unit changed or added and has not written yet: (the row as read, or None if new; the
        row now)."""
        state = self._of(model)
        out: list[tuple[Any, Any]] = []
        for key, before in state.as_read.items():
            record = state.rows[key]
            if vars(record) != before:
                out.append((state.kind(**before), record))
        out += ((None, record) for record in state.new)
        return out

    def none_by(self, model: Mapped, column: str, key: Any) -> None:
        self._of(model).groups.setdefault(column, {}).setdefault(key, [])

    def get(self, connection: Connection, model: Mapped, key: Any) -> Any:
        state = self._of(model)
        if key not in state.rows and key not in state.absent:
            self.fetch(connection, model, (key,))
        return state.rows.get(key)

    def by(self, connection: Connection, model: Mapped, column: str, key: Any) -> list[Any]:
        self.fetch_by(connection, model, column, (key,))
        return list(self._of(model).groups[column][key])

    def insert(self, model: Mapped, values: dict[str, Any]) -> Any:
        state = self._of(model)
        return self.add(model, state.kind(**{**_defaults(state.table), **values}))

    def add(self, model: Mapped, record: Any) -> Any:
        state = self._of(model)
        key = getattr(record, state.key)
        if key in state.rows:
            raise ValueError(f"{state.table.name} {key!r} is already there")
        state.rows[key] = record
        state.absent.discard(key)
        state.new.append(record)
        for column, groups in state.groups.items():
            if (group := groups.get(getattr(record, column))) is not None:
                group.append(record)
        return record

    def write(self, connection: Connection) -> None:
        """Insert the new records and update the changed columns of the others; then they count as read."""
        for state in self._tables.values():
            table = state.table
            for names, rows in state.changes().items():
                if connection.dialect.name == "sqlite":
                    _send(connection, _sqlite_update(table, names, connection.dialect), rows)
                else:
                    keyed = [{**dict(zip(names, row[:-1], strict=True)), "_key": row[-1]} for row in rows]
                    connection.execute(_update(table), keyed)
            if state.new:
                values = [dict(vars(r)) for r in state.new]
                if connection.dialect.name == "sqlite":
                    names = tuple(c.name for c in table.columns)
                    rows = [tuple(v[name] for name in names) for v in values]
                    _send(connection, _sqlite_insert(table, names, connection.dialect), rows)
                else:
                    connection.execute(sa.insert(table), values)
                state.as_read.update((v[state.key], v) for v in values)
                state.new = []


_Statement = tuple[str, tuple[tuple[int, Callable[[Any], Any]], ...]]
"""A statement's text and the conversions of its parameters (their place, SQLAlchemy's conversion of the column's
type), for :func:`_send`."""


def _send(connection: Connection, statement: _Statement, rows: list[tuple[Any, ...]]) -> None:
    """``statement`` for each of ``rows``, as one executemany straight through the driver: SQLAlchemy's handling of
    each row's parameters costs more than SQLite's own work for a row. The values are converted as SQLAlchemy
    converts them (timestamps to its text, say)."""
    text, conversions = statement
    if conversions:
        converted: list[Any] = []
        for row in rows:
            values = list(row)
            for place, convert in conversions:
                values[place] = convert(values[place])
            converted.append(tuple(values))
        rows = converted
    connection.exec_driver_sql(text, rows)


def _conversions(table: sa.Table, names: Sequence[str], dialect: Any) -> tuple[tuple[int, Callable[[Any], Any]], ...]:
    out = []
    for place, name in enumerate(names):
        convert = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        if convert is not None:
            out.append((place, convert))
    return tuple(out)


@functools.cache
def _sqlite_update(table: sa.Table, names: tuple[str, ...], dialect: Any) -> _Statement:
    """Set ``names`` of the row whose key is the last parameter, on SQLite."""
    quote = dialect.identifier_preparer.quote
    (key,) = (c.name for c in table.primary_key.columns)
    sets = ", ".join(f"{quote(name)} = ?" for name in names)
    text = f"UPDATE {quote(table.name)} SET {sets} WHERE {quote(key)} = ?"
    return text, _conversions(table, (*names, key), dialect)


@functools.cache
def _sqlite_insert(table: sa.Table, names: tuple[str, ...], dialect: Any) -> _Statement:
    """Insert a row of ``names`` (every column), on SQLite."""
    quote = dialect.identifier_preparer.quote
    text = f"INSERT INTO {quote(table.name)} ({', '.join(map(quote, names))}) VALUES ({', '.join('?' * len(names))})"
    return text, _conversions(table, names, dialect)


__all__ = ["Mapped", "Record", "RecordStore", "Rows"]
