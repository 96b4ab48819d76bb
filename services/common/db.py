"""Database plumbing every service shares: the engine, the processed-event and outbox tables, the unit of work.

Each service owns its database (a SQLite file by default, PostgreSQL where configured). A message is handled
inside one unit of work: the idempotency mark, the state change and the events to publish (the outbox) are
committed together or not at all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, overload

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel

from schemas import Event, encode_event, topics_for, utcnow
from schemas.clock import Moment

from ._records import Mapped, Record, RecordStore, Rows

Clock = Callable[[], datetime]
T = TypeVar("T")


class ProcessedEvent(SQLModel, table=True):
    """Every event a service has applied, so a redelivered one changes nothing."""

    __tablename__ = "processed_event"
    event_id: str = Field(primary_key=True, max_length=64)
    type: str = Field(max_length=40)
    processed_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))


class Numbered(SQLModel):
    """The columns a table whose rows the database numbers starts with: a service's log, the outbox."""

    id: int | None = Field(default=None, primary_key=True)
    """None until the row is inserted."""


class OutboxRecord(Numbered, table=True):
    """An event committed with the state change that caused it, waiting to be published to Kafka."""

    __tablename__ = "outbox"
    event_id: str = Field(max_length=64)
    incident_id: str = Field(max_length=64, index=True)
    """Indexed: a relay looks for an earlier record of the same incident under another relay's lease."""
    type: str = Field(max_length=40)
    topics: str = Field(max_length=200)
    payload: bytes = Field(sa_type=sa.LargeBinary)
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))
    published_at: datetime | None = Field(default=None, index=True, sa_type=sa.DateTime(timezone=True))
    claimed_by: str | None = Field(default=None, max_length=100)
    """The relay sending this record now (instances of one service may share the database); None: nobody."""
    claimed_until: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    """When that relay's lease ends: past it, another relay takes the record (the claimer may have died)."""


SHARED_TABLES: tuple[sa.Table, ...] = (ProcessedEvent.__table__, OutboxRecord.__table__)  # type: ignore[attr-defined]


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get their folder, WAL and a busy timeout."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa_event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def create_tables(engine: Engine, tables: Iterable[sa.Table]) -> None:
    tables = tuple(tables)
    create_missing(engine, (*SHARED_TABLES, *tables))
    add_missing_columns(engine, (*SHARED_TABLES, *tables))
    for table in (*SHARED_TABLES, *tables):  # and the indexes a later version added (create_all skips existing
        for index in table.indexes:  # tables)
            _create_index(engine, table, index)


def create_missing(engine: Engine, tables: Sequence[sa.Table]) -> None:
    """Create those of ``tables`` that do not exist yet. Processes starting together on a new database (every
    service opens the shared token store) may race: whoever loses finds the table there, and that is no error."""
    try:
        SQLModel.metadata.create_all(engine, tables=list(tables))
    except sa.exc.DBAPIError:  # another process made one of them between the look and the CREATE: look again
        SQLModel.metadata.create_all(engine, tables=list(tables))


def _create_index(engine: Engine, table: sa.Table, index: sa.Index) -> None:
    """Create ``index`` if it is missing; two instances starting together on one database may both try."""
    try:
        index.create(engine, checkfirst=True)
    except sa.exc.DBAPIError:
        if index.name not in {i["name"] for i in sa.inspect(engine).get_indexes(table.name)}:
            raise


def add_missing_columns(engine: Engine, tables: Iterable[sa.Table]) -> None:
    """Bring a table made by an earlier version up to date: add the nullable columns it lacks.

    Only additive, nullable columns are handled (the outbox's lease, say); two instances starting together on
    one database may both try, and the loser finds the column there."""
    for table in tables:
        have = {c["name"] for c in sa.inspect(engine).get_columns(table.name)}
        for column in table.columns:
            if column.name in have or not column.nullable:
                continue
            kind = column.type.compile(dialect=engine.dialect)
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"
            try:
                with engine.begin() as conn:
                    conn.execute(sa.text(ddl))
            except sa.exc.DBAPIError:
                if column.name not in {c["name"] for c in sa.inspect(engine).get_columns(table.name)}:
                    raise


_PROCESSED: sa.Table = ProcessedEvent.__table__  # type: ignore[attr-defined]


def columns_by_key(table: sa.Table, *names: str) -> Any:
    """A read of some columns of one row by its primary key (bound as ``id``), for :meth:`UnitOfWork.row`: built
    once, for a path run per request that needs a few columns, not the row as an ORM object."""
    (key,) = table.primary_key.columns
    return sa.select(*(table.c[name] for name in names)).where(key == sa.bindparam("id"))


@functools.cache
def _insert(table: sa.Table) -> Any:
    """The insert :meth:`UnitOfWork.append`-ed rows are written with (built once per table: it runs per message)."""
    return sa.insert(table)


@functools.cache
def insert_unless_taken(table: sa.Table, dialect: str, *index_elements: str) -> Any:
    """``INSERT … ON CONFLICT DO NOTHING`` into ``table`` for ``dialect`` (a conflict on ``index_elements``, or on
    any unique index if none is named), built once: its rowcount says whether the row went in (1) or was taken
    (0). SQLAlchemy keeps an INSERT's rowcount only when asked; on PostgreSQL it read -1 otherwise."""
    from sqlalchemy.dialects import postgresql, sqlite

    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(table).on_conflict_do_nothing(index_elements=list(index_elements) or None)
    return statement.execution_options(preserve_rowcount=True)


@functools.cache
def insert_adding(table: sa.Table, dialect: str) -> Any:
    """``INSERT … ON CONFLICT (primary key) DO UPDATE`` that adds a new row's other columns to the row already
    there (counters kept as sums: a row of deltas), for ``dialect``, built once."""
    from sqlalchemy.dialects import postgresql, sqlite

    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(table)
    keys = [c.name for c in table.primary_key.columns]
    added = {c.name: table.c[c.name] + statement.excluded[c.name] for c in table.columns if c.name not in keys}
    return statement.on_conflict_do_update(index_elements=keys, set_=added)


@functools.cache
def _claim_statements(dialect: str) -> tuple[Any, Any]:
    """The idempotency mark (built once per dialect: it runs per message), and the same returning the ids it did
    mark (for a batch)."""
    one = insert_unless_taken(_PROCESSED, dialect, "event_id")
    return one, one.returning(_PROCESSED.c.event_id)


def timestamp() -> sa.DateTime:
    """The column type of every timestamp a service stores: with its time zone (all are UTC)."""
    return sa.DateTime(timezone=True)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes: read them as the UTC they were stored as."""
    from datetime import UTC

    return value if value.tzinfo else value.replace(tzinfo=UTC)


class UnitOfWork:
    """One transaction: claim the message, change state, queue events; ``commit`` makes all of it durable.

    The transaction is one connection's: claims, records, appended rows and prebuilt reads are Core statements on
    :attr:`connection`. An ORM :attr:`session` is made only for a path that asks for one, joined to the same
    transaction (a consumed batch or a department's action never pays for the ORM's session machinery)."""

    def __init__(
        self,
        engine: Engine,
        clock: Clock = utcnow,
        time_scale: float = 1.0,
        on_commit: Callable[[set[str]], None] | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.time_scale = time_scale
        self.on_commit = on_commit
        """Told, after each commit, the keys :meth:`touch` named (long polls waiting on them wake)."""
        self.touched: set[str] = set()
        self.emitted: list[Event] = []
        self.info: dict[str, Any] = {}
        """What a handler keeps for the rest of the unit (the next handler of a batch, say); emptied per unit."""
        self._entered = False
        self._connection: Connection | None = None
        self._session: Session | None = None
        self._appended: dict[sa.Table, list[dict[str, Any]]] = {}
        self._records = RecordStore()
        self._before_commit: list[Callable[[], None]] = []

    @property
    def connection(self) -> Connection:
        """The unit's connection (checked out when first asked for); its transaction is the unit's."""
        if self._connection is None:
            if not self._entered:
                raise RuntimeError("unit of work used outside `with`")
            self._connection = self.engine.connect()
        return self._connection

    @property
    def session(self) -> Session:
        """An ORM session in the unit's transaction (made when first asked for; a commit ends it, and a later
        use makes another: objects read before the commit are detached, with what they loaded)."""
        if self._session is None:
            connection = self.connection
            if not connection.in_transaction():
                connection.begin()
            # the unit commits; the session flushes into the transaction and may roll it back, never commit it
            self._session = Session(bind=connection, expire_on_commit=False, join_transaction_mode="rollback_only")
        return self._session

    def __enter__(self) -> Self:
        self._entered = True
        self.emitted = []
        self.touched = set()
        self._reset()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._end_session()
        if self._connection is not None:
            self._connection.close()  # anything not committed is rolled back
            self._connection = None
        self._entered = False
        self._reset()

    def _end_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def _reset(self) -> None:
        self.info = {}
        self._appended = {}
        self._records = RecordStore()
        self._before_commit = []

    def now(self) -> datetime:
        return self.clock()

    def moment(self) -> Moment:
        """Now, with the configured time scale: what a rule is given to decide at and count deadlines from."""
        return Moment(self.now(), self.time_scale)

    def business_hours(self, hours: float) -> timedelta:
        """A span of business time as wall-clock time under the configured time scale (see schemas.Moment)."""
        return Moment(self.now(), self.time_scale).business_hours(hours)

    def claim(self, event: Event) -> bool:
        """Mark ``event`` as processed; False if it already was (a redelivery).

        One ``INSERT … ON CONFLICT DO NOTHING`` in the unit's transaction: a concurrent consumer of the same event
        waits for this transaction (PostgreSQL: for the row; SQLite: for the write lock) and then finds the mark,
        so exactly one of them applies it."""
        one, _ = _claim_statements(self.engine.dialect.name)
        row = {"event_id": event.event_id, "type": event.type, "processed_at": self.now()}
        return bool(self.connection.execute(one, row).rowcount)

    def claim_all(self, events: Sequence[Event]) -> list[Event]:
        """:meth:`claim` for a batch, in one statement: returns the events not applied before, in order, each
        once (a copy later in the batch is dropped too)."""
        first: dict[str, Event] = {}
        for event in events:
            first.setdefault(event.event_id, event)
        if not first:
            return []
        _, returning = _claim_statements(self.engine.dialect.name)
        now = self.now()
        rows = [{"event_id": e.event_id, "type": e.type, "processed_at": now} for e in first.values()]
        marked = set(self.connection.execute(returning, rows).scalars())
        return [e for event_id, e in first.items() if event_id in marked]

    def row(self, statement: Any, key: Any) -> sa.Row[Any] | None:
        """The row a :func:`columns_by_key` statement reads for ``key`` (attributes named as its columns)."""
        return self.connection.execute(statement, {"id": key}).one_or_none()

    # -- records: rows as plain attributes, for a path that reads and changes many rows per batch (see _records)

    def fetch(self, model: Mapped, keys: Iterable[Any]) -> None:
        """Read the rows of ``model`` with these primary keys as records, in one statement, for :meth:`record`."""
        self._records.fetch(self.connection, model, keys)

    def fetch_by(self, model: Mapped, column: str, keys: Iterable[Any]) -> None:
        """Read the rows of ``model`` whose ``column`` (one that never changes) holds one of ``keys`` as records,
        in one statement, for :meth:`records_by`."""
        self._records.fetch_by(self.connection, model, column, keys)

    @overload
    def record(self, model: Rows[T], key: Any) -> T | None: ...
    @overload
    def record(self, model: type[SQLModel], key: Any) -> Record | None: ...
    def record(self, model: Mapped, key: Any) -> Any:
        """The row of ``model`` with this primary key as a record (read now unless :meth:`fetch` did), or None.
        Change its attributes in place: the commit writes the columns that changed."""
        return self._records.get(self.connection, model, key)

    @overload
    def records_by(self, model: Rows[T], column: str, key: Any) -> list[T]: ...
    @overload
    def records_by(self, model: type[SQLModel], column: str, key: Any) -> list[Record]: ...
    def records_by(self, model: Mapped, column: str, key: Any) -> list[Any]:
        """The rows of ``model`` whose ``column`` holds ``key``, as records (with those :meth:`insert` added)."""
        return self._records.by(self.connection, model, column, key)

    @overload
    def records_where(self, model: Rows[T], statement: Any, params: dict[str, Any] | None = None) -> list[T]: ...
    @overload
    def records_where(
        self, model: type[SQLModel], statement: Any, params: dict[str, Any] | None = None
    ) -> list[Record]: ...
    def records_where(self, model: Mapped, statement: Any, params: dict[str, Any] | None = None) -> list[Any]:
        """The rows a select of ``model``'s whole table returns, as records; a row this unit holds already is
        answered as it stands in memory (the select reads the table, where this unit's changes are not yet)."""
        return self._records.where(self.connection, model, statement, params or {})

    def changed(self, model: Rows[T]) -> list[tuple[T | None, T]]:
        """The rows of ``model`` this unit changed or added and has not written yet, each as (the row as it was
        read, or None if added; the row now): what a summary kept beside the rows must follow."""
        return self._records.changed(model)  # type: ignore[no-any-return]

    def before_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` at each commit of this unit, first (its writes join the transaction)."""
        self._before_commit.append(callback)

    @overload
    def inserted(self, model: Rows[T]) -> list[T]: ...
    @overload
    def inserted(self, model: type[SQLModel]) -> list[Record]: ...
    def inserted(self, model: Mapped) -> list[Any]:
        """The records of ``model`` this unit inserted, not written yet (a select does not see them)."""
        return self._records.inserted(model)

    def none_by(self, model: Mapped, column: str, key: Any) -> None:
        """Tell :meth:`records_by` that no row of ``model`` has ``key`` in ``column`` yet (their parent was just
        inserted in this unit), so it answers from what :meth:`insert` adds without reading the table."""
        self._records.none_by(model, column, key)

    @overload
    def insert(self, model: Rows[T], **values: Any) -> T: ...
    @overload
    def insert(self, model: type[SQLModel], **values: Any) -> Record: ...
    def insert(self, model: Mapped, **values: Any) -> Any:
        """A new row of ``model`` as a record (columns not given take their defaults), written at the commit."""
        return self._records.insert(model, values)

    def add(self, model: Rows[T], row: T) -> T:
        """A new row of ``model``, made by the domain (every column a field of ``row``), written at the commit;
        later changes to ``row`` in this unit are written with it."""
        return self._records.add(model, row)  # type: ignore[no-any-return]

    def emit(self, event: Event) -> None:
        """Queue ``event`` for publishing; it is sent only once the transaction commits.

        The outbox row is :meth:`append`-ed: nothing in a unit of work reads it back."""
        self.append(
            OutboxRecord,
            event_id=event.event_id,
            incident_id=event.incident_id,
            type=event.type,
            topics=",".join(t.name for t in topics_for(event)),
            payload=encode_event(event),
            created_at=self.now(),
        )
        self.emitted.append(event)

    def append(self, model: type[SQLModel], **values: Any) -> None:
        """A new row of ``model`` that nothing in this unit reads back (a log line, a fact, an outbox record):
        written at commit, in the order appended, with one statement per table instead of an ORM object."""
        table: sa.Table = model.__table__  # type: ignore[attr-defined]
        self._appended.setdefault(table, []).append(values)

    def touch(self, *keys: str) -> None:
        """Name what this unit changed that someone may be waiting for (see ``services.common.changes``)."""
        self.touched.update(keys)

    def commit(self) -> None:
        connection = self.connection
        for callback in self._before_commit:
            callback()
        if self._session is not None:
            self._session.flush()
        self._records.write(connection)
        if self._appended:
            appended, self._appended = self._appended, {}
            for table, rows in appended.items():
                connection.execute(_insert(table), rows)
        connection.commit()
        self._end_session()
        if self.touched:
            touched, self.touched = self.touched, set()
            if self.on_commit is not None:
                self.on_commit(touched)

    def rollback(self) -> None:
        """Undo everything since the last commit (the unit can go on: a retry, say)."""
        self._end_session()
        if self._connection is not None:
            self._connection.rollback()
        self._reset()


__all__ = [
    "SHARED_TABLES",
    "Clock",
    "IntegrityError",
    "Mapped",
    "OutboxRecord",
    "ProcessedEvent",
    "Record",
    "Rows",
    "UnitOfWork",
    "add_missing_columns",
    "as_utc",
    "columns_by_key",
    "create_missing",
    "create_tables",
    "insert_adding",
    "insert_unless_taken",
    "make_engine",
    "timestamp",
]
