"""The way out of a service: what its units of work committed to the outbox table, published to Kafka.

A unit of work writes the events it emits into the outbox in its own transaction, so a change and its events are
durable together. :class:`OutboxRelay` sends committed records in order, each by one relay of the instances
sharing the database, and marks them published; :class:`Outbox` is a process's use of it: a flush after every
commit that emitted something, coalesced (one at a time, a call made meanwhile asking for one more round), that
no caller waits on for longer than ``wait_s``, and the timer that publishes what a flush left.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import zlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from schemas import utcnow

from . import metrics
from .db import OutboxRecord
from .kafka import Publisher
from .retry import forever

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)
gridloop_log = logging.getLogger("gridloop")


_OUTBOX: sa.Table = OutboxRecord.__table__  # type: ignore[attr-defined]
_CLAIM_LOCK = zlib.crc32(b"gridloop.outbox.claim")
"""The PostgreSQL advisory lock that makes claims on one database take turns."""


class OutboxRelay:
    """Publishes committed outbox records in order and marks them sent. At least once: consumers dedupe.

    Two instances of one service may share the database, each with its relay. So that a record is sent by one
    of them, a relay first claims a batch — a lease: ``claimed_by`` and ``claimed_until`` set in one short
    transaction — then sends what it claimed and marks it published. A relay that dies holding a lease leaves
    its records to whichever relay comes after the lease ends. Records of one incident go out in order: a record
    is not claimed while an earlier one of its incident is under another relay's live lease.

    Works on the outbox table with Core statements (no ORM objects): it runs after every consumed record that
    emitted events, so its cost is paid per message. For the same reason what a flush sent is marked published
    in the transaction of the next claim (the next flush, or the outbox timer's within its interval), not in a
    transaction of its own: a claim marks before it looks, so this relay's next records of an incident are
    never held back by its own records already sent. A crash between the send and that mark sends the records
    again once their lease ends; consumers skip them by event id."""

    lease_s: float = 15.0
    """How long a claim holds: well above a send (acks=all), short enough that a dead relay's records are not
    held up for long."""

    def __init__(
        self,
        engine: Engine,
        publisher: Publisher,
        batch: int = 500,
        *,
        lease_s: float | None = None,
        owner: str | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.batch = batch
        if lease_s is not None:
            self.lease_s = lease_s
        self.owner = owner or f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(3)}"
        self.clock = clock
        self._claims = itertools.count(1)
        self._lock = asyncio.Lock()
        self._sent: list[int] = []
        """Records the broker has (acks=all), not marked published yet: the next claim marks them."""
        t = _OUTBOX.c
        c = _OUTBOX.alias("candidate").c
        e = _OUTBOX.alias("earlier").c
        held_before = (
            sa.select(e.id)
            .where(
                e.incident_id == c.incident_id,
                e.id < c.id,
                e.published_at.is_(None),
                e.claimed_until >= sa.bindparam("now"),
            )
            .exists()
        )
        claimable = (
            sa.select(c.id)
            .where(
                c.published_at.is_(None),
                sa.or_(c.claimed_until.is_(None), c.claimed_until < sa.bindparam("now")),
                ~held_before,
            )
            .order_by(c.id)
            .limit(batch)
        )
        # a plain UPDATE … WHERE id IN (subquery). SQLite runs one writer at a time, and the statement reads after
        # taking the write lock; on PostgreSQL claims take turns on an advisory lock, and the conditions repeated
        # on the updated row skip one claimed meanwhile all the same
        self._claim = (
            sa.update(_OUTBOX)
            .where(t.id.in_(claimable.scalar_subquery()))
            .where(t.published_at.is_(None))
            .where(sa.or_(t.claimed_until.is_(None), t.claimed_until < sa.bindparam("now")))
            .values(claimed_by=sa.bindparam("token"), claimed_until=sa.bindparam("until"))
            .returning(t.id, t.incident_id, t.type, t.topics, t.payload)  # in no particular order: sorted after
        )
        self._any_pending = sa.select(t.id).where(t.published_at.is_(None)).limit(1)
        self._mark = sa.update(_OUTBOX).where(t.id.in_(sa.bindparam("ids", expanding=True)))
        self._release = (
            sa.update(_OUTBOX)
            .where(t.claimed_by == sa.bindparam("token"), t.published_at.is_(None))
            .values(claimed_by=None, claimed_until=None)
        )

    def pending(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(_OUTBOX).where(_OUTBOX.c.published_at.is_(None))
                ).scalar_one()
            )

    def claim(self) -> tuple[str, list[Any]]:
        """Mark what this relay sent since the last claim published, and lease the next batch of records nobody
        is sending, in one transaction; returns the claim's token and its records, in order."""
        token = f"{self.owner}/{next(self._claims)}"
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # one claim at a time: the next one sees this one's leases (it runs after the commit)
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_CLAIM_LOCK)))
            now = self.clock()
            self._mark_sent(conn, now)
            params = {"now": now, "token": token, "until": now + timedelta(seconds=self.lease_s)}
            rows = sorted(conn.execute(self._claim, params).all(), key=lambda r: r[0])
        self._sent.clear()  # only once committed: a failed claim leaves them to the next one
        return token, rows

    def _mark_sent(self, conn: Any, now: datetime) -> int:
        """Mark what was sent since the last mark published, in ``conn``'s transaction; returns how many."""
        if self._sent:
            conn.execute(self._mark.values(published_at=now), {"ids": self._sent})
        return len(self._sent)

    @property
    def unmarked(self) -> int:
        """Records sent and not marked published yet (the next claim marks them)."""
        return len(self._sent)

    async def flush(self, *, expected: bool = False) -> int:
        """Publish everything pending that no other relay is sending; returns how many records went out.

        ``expected``: the caller just committed records, so the read that spares an idle flush its write
        transaction is skipped."""
        sent = 0
        async with self._lock:
            if not expected and not self._sent:
                with self.engine.connect() as conn:
                    if conn.execute(self._any_pending).first() is None:
                        return 0  # the usual case of the timer: a read, no write transaction
            while True:
                token, rows = self.claim()
                if not rows:
                    return sent
                try:
                    await self.publisher.send_all(
                        [
                            (topic, incident_id.encode(), payload, [("type", kind.encode())])
                            for _id, incident_id, kind, topics, payload in rows
                            for topic in topics.split(",")
                        ]
                    )
                except BaseException:
                    self._give_back(token)
                    raise
                # to be marked only now the broker has every record (acks=all), by the next claim: a crash before
                # it means the records go out again once the lease ends, and consumers skip them by event id
                self._sent.extend(r[0] for r in rows)
                sent += len(rows)
                metrics.observe_outbox([r[4] for r in rows])
                if len(rows) < self.batch:
                    # drained, as far as this relay may go: anything committed meanwhile is flushed by whoever
                    # committed it, and what waited behind another relay's lease by the next timer tick
                    return sent

    async def settle(self) -> int:
        """Mark what was sent and is not marked yet, in a transaction of its own (a service that stops: its
        records would otherwise go out again once their lease ends). Returns how many were marked."""
        async with self._lock:
            if not self._sent:
                return 0
            with self.engine.begin() as conn:
                marked = self._mark_sent(conn, self.clock())
            self._sent.clear()
            return marked

    def _give_back(self, token: str) -> None:
        """End a claim whose records were not sent, so the next flush (here or elsewhere) need not wait out the
        lease. Best effort: the database may be what failed, and then the lease ends by itself."""
        try:
            with self.engine.begin() as conn:
                conn.execute(self._release, {"token": token})
        except Exception as exc:
            log.debug("outbox claim %s not given back (%s); its lease ends by itself", token, exc)


class Outbox:
    """A process's outbox: flushed after each commit that emitted events, and on a timer."""

    wait_s: float = 2.0
    """How long a caller of :meth:`flush` waits for the broker; the flush itself goes on."""

    def __init__(self, service: str, relay: OutboxRelay, publisher: Publisher) -> None:
        self.service = service
        self.relay = relay
        self.publisher = publisher
        """Shared with the dead letters: one producer per process."""
        self._publisher_ready = asyncio.Lock()
        self._flushing: asyncio.Task[None] | None = None
        self._flush_wanted = False
        self._flush_expected = False

    async def ensure_publisher(self) -> None:
        if self.publisher.started:
            return  # the common case, on every flush: no lock, no retry machinery
        async with self._publisher_ready:
            async for attempt in forever("Kafka producer"):
                with attempt:
                    await self.publisher.start()

    async def flush(self, *, expected: bool = True) -> None:
        """Publish the outbox now, waiting at most ``wait_s``. ``expected``: records were just committed
        (False for the timer's look, which skips the write transaction when nothing waits).

        What is in the outbox is already durable: a caller (an API request, the consumer) must not hang on a
        broker that is down. The flush goes on in the background — one at a time, a call made meanwhile asking
        for one more round — connecting with backoff, and the outbox timer keeps trying."""
        self._flush_wanted = True
        self._flush_expected = self._flush_expected or expected
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush_while_wanted())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.wait_s):
                await asyncio.shield(self._flushing)

    async def _flush_while_wanted(self) -> None:
        while self._flush_wanted:
            self._flush_wanted = False
            expected, self._flush_expected = self._flush_expected, False
            try:
                await self.ensure_publisher()
                sent = await self.relay.flush(expected=expected)
                if sent:
                    metrics.OUTBOX_PUBLISHED.labels(self.service).inc(sent)
            except Exception as exc:  # the records stay in the outbox; the timer tries again
                gridloop_log.warning("outbox not flushed yet (%s: %s); will retry", type(exc).__name__, exc)
                with contextlib.suppress(Exception):  # the database may be what failed
                    metrics.OUTBOX_PENDING.labels(self.service).set(self.relay.pending())
                return

    def attach(self, app: faust.App, interval_s: float) -> None:
        """Declare on ``app`` the timer that publishes, every ``interval_s``, what a flush left, and the mark, at a
        stop, of what was sent."""

        @app.timer(interval_s)  # type: ignore[untyped-decorator]
        async def relay_outbox() -> None:
            await self.flush(expected=False)
            with contextlib.suppress(Exception):  # the database may be down: the flush has logged it
                # read, not assumed: rows may wait behind another instance's lease
                metrics.OUTBOX_PENDING.labels(self.service).set(self.relay.pending())

        @app.on_before_shutdown.connect  # type: ignore[arg-type]
        async def mark_what_was_sent(_app: Any, *_: Any, **__: Any) -> None:
            try:
                await self.relay.settle()
            except Exception as exc:  # the records go out again once their lease ends; consumers skip them
                gridloop_log.warning("sent outbox records not marked at shutdown (%s: %s)", type(exc).__name__, exc)
