"""Replaying a log into a read model: some partitions of a topic, from given offsets, decoded and applied through
a service's bus in large batches, each batch's transaction also recording how far it got.

What a service's rebuild is made of (``python -m services.opscenter rebuild``):

- :class:`ReplayUnitOfWork` is the unit of work of a replay into a database that only the replay writes. Its
  claims (the idempotency marks) are looked up when the batch starts and written at its commit, so a batch is
  folded without holding SQLite's write lock: replay workers on disjoint partitions fold side by side and take
  turns only to write. Its commit also writes where the replay got (``with_commit``), in the same
  transaction.
- :func:`replay` reads the partitions with aiokafka (its record parsing is compiled), decodes each record as the
  live consumer does, and applies a batch at a time through ``MessageBus.handle_batch`` — the bus, handlers and
  preload of the live service. A batch that fails is applied again one event at a time, as the live consumer
  does: an event no handler can apply is skipped and counted (the live service dead-letters it), a record no
  consumer can decode too. A database that cannot be reached is waited for.
- :class:`Progress` is what the workers share with whoever watches them: where each partition is, how many
  records were applied and skipped, and where to stop.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine, make_url
from tenacity import Retrying, retry_if_exception_type, wait_exponential

from schemas import DecodeError, Event, decode_event

from .bus import MessageBus
from .db import ProcessedEvent, UnitOfWork
from .retry import TRANSIENT

log = logging.getLogger("gridloop")

_PROCESSED: sa.Table = ProcessedEvent.__table__  # type: ignore[attr-defined]
_LOOKUP_CHUNK = 5000
"""Event ids looked up per statement (SQLite allows 32 766 parameters to one statement)."""
FOLLOW = -1
"""A partition's stop offset while the replay follows the log (it has no end yet)."""


class ReplayUnitOfWork(UnitOfWork):
    """A unit of work for a replay into a database nobody else writes while it runs.

    :meth:`claim_all` reads which events are applied already and keeps the marks of the others to write at the
    commit; a mark written meanwhile by someone else makes the commit fail (a unique key), and the bus's caller
    applies the batch again one event at a time, claiming each as the live consumer does. The single-event
    :meth:`claim` is the live one. At each commit, after what the handlers' own commit callbacks compute, the
    marks are written and ``with_commit(unit)`` is called: what it writes (where the replay got) joins the
    transaction. On SQLite the write lock is taken by a transaction's first write: the fold, and whatever a
    handler computes at the commit, run without it, so replay workers take turns only to write."""

    def __init__(self, engine: Engine, *, with_commit: Callable[[UnitOfWork], None] | None = None) -> None:
        super().__init__(engine)
        self.with_commit = with_commit
        self._claims: list[tuple[str, str]] = []
        self._writes_bookkeeping = False

    def _reset(self) -> None:
        super()._reset()
        self._claims = []
        self._writes_bookkeeping = False

    def claim_all(self, events: Sequence[Event]) -> list[Event]:
        first: dict[str, Event] = {}
        for event in events:
            first.setdefault(event.event_id, event)
        ids = list(first)
        key = _PROCESSED.c.event_id
        taken: set[str] = set()
        sqlite = self.connection.dialect.name == "sqlite"
        for start in range(0, len(ids), _LOOKUP_CHUNK):
            chunk = ids[start : start + _LOOKUP_CHUNK]
            if sqlite:  # straight through the driver: SQLAlchemy's expanding IN costs more than the lookup
                marks = f"SELECT event_id FROM {_PROCESSED.name} WHERE event_id IN ({', '.join('?' * len(chunk))})"
                taken.update(row[0] for row in self.connection.exec_driver_sql(marks, tuple(chunk)))
            else:
                taken.update(self.connection.execute(sa.select(key).where(key.in_(chunk))).scalars())
        fresh = [event for event_id, event in first.items() if event_id not in taken]
        self._claims += ((e.event_id, e.type) for e in fresh)
        return fresh

    def commit(self) -> None:
        if not self._writes_bookkeeping:  # the last of the commit's callbacks (a handler's come first)
            self._writes_bookkeeping = True
            self.before_commit(self._write_bookkeeping)
        super().commit()

    def _write_bookkeeping(self) -> None:
        if self._claims:
            claims, self._claims = self._claims, []
            _write_claims(self.connection, claims, self.now())
        if self.with_commit is not None:
            self.with_commit(self)


def _write_claims(connection: Connection, claims: Sequence[tuple[str, str]], now: datetime) -> None:
    """The marks of a batch, as one executemany: on SQLite straight through the driver, the time converted once
    (SQLAlchemy's per-row parameter handling costs more than SQLite's insert itself)."""
    dialect = connection.dialect
    if dialect.name != "sqlite":
        rows = [{"event_id": event_id, "type": kind, "processed_at": now} for event_id, kind in claims]
        connection.execute(sa.insert(_PROCESSED), rows)
        return
    stamp = _stamp(dialect)(now)
    columns = ", ".join(dialect.identifier_preparer.quote(c) for c in ("event_id", "type", "processed_at"))
    statement = f"INSERT INTO {_PROCESSED.name} ({columns}) VALUES (?, ?, ?)"
    connection.exec_driver_sql(statement, [(event_id, kind, stamp) for event_id, kind in claims])


def _stamp(dialect: Any) -> Callable[[datetime], Any]:
    """How ``processed_at`` is written for ``dialect`` (SQLAlchemy's own conversion of the column's type)."""
    column_type = _PROCESSED.c.processed_at.type
    process = column_type.dialect_impl(dialect).bind_processor(dialect)
    return process if process is not None else (lambda value: value)


def tune_for_replay(engine: Engine, *, cache_mb: int = 64) -> None:
    """Make ``engine``'s SQLite connections write a replay cheaply: a larger page cache (``cache_mb``, the bound
    on what it holds in memory) and no fsync at commits. A process killed midway loses nothing committed (the
    write-ahead log is the operating system's); a machine that loses power may corrupt the file, and the replay
    is then started again. Nothing for another database."""
    if engine.dialect.name != "sqlite":
        return

    @sa_event.listens_for(engine, "connect")
    def _pragmas(conn: Any, _record: Any) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA synchronous=OFF")
        cur.execute(f"PRAGMA cache_size=-{cache_mb * 1024}")
        cur.execute("PRAGMA temp_store=MEMORY")
        cur.close()


def settle(engine: Engine) -> None:
    """Once a replay into ``engine`` is done: fold SQLite's write-ahead log into the file (the service that opens
    it next starts with a short one), and let go of the engine's connections."""
    try:
        if engine.dialect.name == "sqlite":
            with engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        engine.dispose()


def absolute_url(database_url: str) -> str:
    """``database_url`` with a SQLite file's path made absolute (handed to a service that runs elsewhere)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        url = url.set(database=os.path.abspath(url.database))
    return url.render_as_string(hide_password=False)


def sqlite_file(database_url: str) -> Path | None:
    """The file a SQLite URL names (None for another database, or SQLite in memory)."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def shown_url(database_url: str) -> str:
    """``database_url`` as it may be shown or logged: its password hidden."""
    return make_url(database_url).render_as_string(hide_password=True)


# -- what the workers share -----------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a replay's partitions are and what it did, in shared memory: written by the workers (each its own
    partitions and its own counters), read by whoever shows the progress or decides when to stop."""

    partitions: int
    workers: int
    context: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        ctx = self.context or mp.get_context()
        self.positions = ctx.Array("q", self.partitions, lock=False)
        """The next offset to read, per partition (what the database records once its batch is committed)."""
        self.stops = ctx.Array("q", [FOLLOW] * self.partitions, lock=False)
        """Where each partition ends: FOLLOW while the log is followed."""
        self.applied = ctx.Array("q", self.workers, lock=False)
        """Records applied per worker (those already applied before count too: their claims skip them)."""
        self.skipped = ctx.Array("q", self.workers, lock=False)
        """Records set aside per worker: undecodable, or no handler could apply them."""
        self.peak_rss_kb = ctx.Array("q", self.workers, lock=False)
        """The largest resident set of each worker process, in KiB (as it ends; 0 for one inside this process)."""
        self.stopping = ctx.Event()
        """Set to stop at the end of the current batch (what is committed stays: the replay resumes there)."""

    def position(self) -> dict[int, int]:
        return {p: int(self.positions[p]) for p in range(self.partitions)}

    def total_applied(self) -> int:
        return sum(self.applied[:])

    def total_skipped(self) -> int:
        return sum(self.skipped[:])


# -- applying a batch -----------------------------------------------------------------------------------------

Positions = Mapping[int, int]
"""Partition → the next offset to read."""


@dataclass(frozen=True, slots=True)
class Record:
    partition: int
    offset: int
    event: Event


class Applier:
    """Applies batches through a bus (``bus_for`` builds it on :class:`ReplayUnitOfWork` units), each with where
    it ends written in its transaction by ``save(unit, positions)``."""

    def __init__(self, engine: Engine, bus_for: Callable[[Callable[[], UnitOfWork]], MessageBus], save: Saver):
        self.save = save
        self._positions: dict[int, int] = {}
        self.bus = bus_for(lambda: ReplayUnitOfWork(engine, with_commit=self.write_position))

    def write_position(self, unit: UnitOfWork) -> None:
        if self._positions:
            self.save(unit, self._positions)

    def apply(self, records: Sequence[Record], start: Positions, reached: Positions) -> int:
        """Apply ``records`` (read from ``start`` up to ``reached``) in one transaction that also records
        ``reached``; if it fails, one at a time, each committed with where it ends. Returns how many were set
        aside."""
        self._positions = dict(reached)
        try:
            if records:
                self._retrying(lambda: self.bus.handle_batch([r.event for r in records]))
            else:
                self._retrying(lambda: self.bus.execute(_nothing))
            return 0
        except Exception as exc:
            if isinstance(exc, TRANSIENT):
                raise
            log.info("batch of %d not applied at once (%s: %s); one at a time", len(records), type(exc).__name__, exc)
        return self._one_at_a_time(records, start, reached)

    def _one_at_a_time(self, records: Sequence[Record], start: Positions, reached: Positions) -> int:
        failed = 0
        done = dict(start)
        for record in records:
            done[record.partition] = record.offset + 1
            self._positions = dict(done)
            try:
                self._retrying(lambda r=record: self.bus.handle(r.event))  # type: ignore[misc]
            except TRANSIENT:
                raise
            except Exception as exc:
                failed += 1
                log.warning(
                    "offset %d of partition %d (%s %s) not applied, set aside: %s: %s",
                    record.offset,
                    record.partition,
                    record.event.type,
                    record.event.event_id,
                    type(exc).__name__,
                    exc,
                )
        self._positions = dict(reached)
        self._retrying(lambda: self.bus.execute(_nothing))  # where the batch ends, past any record set aside
        return failed

    @staticmethod
    def _retrying(action: Callable[[], object]) -> None:
        for attempt in Retrying(
            retry=retry_if_exception_type(TRANSIENT),
            wait=wait_exponential(multiplier=0.2, max=5),
            before_sleep=lambda s: log.warning(
                "database unavailable (%s); retry %d", s.outcome.exception() if s.outcome else "?", s.attempt_number
            ),
            reraise=True,
        ):
            with attempt:
                action()


Saver = Callable[[UnitOfWork, Positions], None]


def _nothing(uow: UnitOfWork) -> None:
    """A command that changes nothing: its commit writes the position alone."""


# -- reading ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """Where a replay reads: the broker, the topic, and the Kafka client's credentials."""

    bootstrap: str
    topic: str
    security: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Batching:
    size: int = 10_000
    """Records applied in one transaction, at most."""
    linger_s: float = 0.5
    """How long a smaller batch waits for more before it is applied (following the log's end)."""
    fetch_bytes: int = 8 * 1024 * 1024
    """What one fetch asks of each partition (aiokafka's max_partition_fetch_bytes)."""


async def replay(
    source: Source,
    partitions: Sequence[int],
    applier: Applier,
    progress: Progress,
    worker: int = 0,
    batching: Batching = Batching(),
    *,
    keep_going: Callable[[], bool] = lambda: True,
) -> None:
    """Read ``partitions`` of the source's topic from ``progress.positions`` and apply them a batch at a time, until
    each reaches its stop offset (``progress.stops``; FOLLOW: not yet), ``progress.stopping`` is set, or
    ``keep_going()`` answers False. Counts into ``progress`` slot ``worker``."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    if all(progress.stops[p] != FOLLOW and progress.positions[p] >= progress.stops[p] for p in partitions):
        return  # nothing to read (an empty partition, a rebuild resumed at the end)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=source.bootstrap,
        client_id="gridloop-replay",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=batching.fetch_bytes,
        fetch_max_bytes=max(batching.fetch_bytes * len(partitions), 52428800),
        fetch_max_wait_ms=200,
        **source.security,
    )
    await consumer.start()
    await asyncio.sleep(0)  # its coordinator's task starts (one cancelled before it ran fails the consumer's stop)
    try:
        reading = {p: TopicPartition(source.topic, p) for p in partitions}
        consumer.assign(list(reading.values()))
        for p, tp in reading.items():
            consumer.seek(tp, int(progress.positions[p]))
        reached = {p: int(progress.positions[p]) for p in partitions}
        batch: list[Record] = []
        since = time.monotonic()

        def ended(p: int) -> bool:
            stop = int(progress.stops[p])
            return stop != FOLLOW and reached[p] >= stop

        def flush() -> None:
            nonlocal batch, since
            skipped = applier.apply(batch, {p: int(progress.positions[p]) for p in partitions}, reached)
            for p, offset in reached.items():
                progress.positions[p] = offset
            progress.applied[worker] += len(batch) - skipped
            progress.skipped[worker] += skipped
            batch, since = [], time.monotonic()

        while not progress.stopping.is_set() and keep_going():
            if all(ended(p) for p in partitions):
                if batch or any(reached[p] != progress.positions[p] for p in partitions):
                    flush()
                return
            done = [tp for p, tp in reading.items() if ended(p)]
            if done:
                consumer.pause(*done)
            active = [tp for p, tp in reading.items() if not ended(p)]
            fetched = await consumer.getmany(*active, timeout_ms=200, max_records=batching.size - len(batch))
            for tp, records in fetched.items():
                p = tp.partition
                stop = int(progress.stops[p])
                for record in records:
                    if stop != FOLLOW and record.offset >= stop:
                        break
                    try:
                        event = decode_event(record.value)
                    except DecodeError as exc:
                        progress.skipped[worker] += 1
                        log.warning("offset %d of partition %d set aside: %s", record.offset, p, exc.reason)
                    except Exception as exc:  # whatever a record does in decoding, the replay goes on without it
                        progress.skipped[worker] += 1
                        log.warning("offset %d of partition %d set aside: %s: %s", record.offset, p, type(exc), exc)
                    else:
                        batch.append(Record(p, record.offset, event))
                    reached[p] = record.offset + 1
            full = len(batch) >= batching.size
            quiet = not fetched and (batch or _moved(reached, progress))
            if full or quiet or (batch and time.monotonic() - since >= batching.linger_s):
                flush()
        if batch:
            flush()
    finally:
        await consumer.stop()


def _moved(reached: Mapping[int, int], progress: Progress) -> bool:
    """Whether a partition was read past what is committed (records set aside only): its position is written."""
    return any(progress.positions[p] != offset for p, offset in reached.items())


def split(partitions: Iterable[int], workers: int) -> list[list[int]]:
    """``partitions`` dealt to at most ``workers`` workers, round robin (none left empty)."""
    parts = sorted(partitions)
    n = max(1, min(workers, len(parts)))
    return [parts[i::n] for i in range(n)]


__all__ = [
    "FOLLOW",
    "Applier",
    "Batching",
    "Positions",
    "Progress",
    "Record",
    "ReplayUnitOfWork",
    "Saver",
    "Source",
    "absolute_url",
    "replay",
    "settle",
    "shown_url",
    "split",
    "sqlite_file",
    "tune_for_replay",
]
