"""Kafka plumbing: a durable publisher (acks=all, idempotent), the outbox relay and the dead-letter writer."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import logging
import os
import secrets
import socket
import zlib
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError
from sqlalchemy.engine import Engine

from schemas import Event, encode_event, topics_for, utcnow
from schemas.topics import DEADLETTER

from . import metrics
from .db import OutboxRecord

log = logging.getLogger(__name__)


class Publisher:
    """One idempotent producer per process; every send waits for all in-sync replicas."""

    def __init__(self, bootstrap: str, client_id: str, *, linger_ms: int = 0, **security: Any) -> None:
        self.bootstrap = bootstrap
        self.client_id = client_id
        self.linger_ms = linger_ms
        self.security = security
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        """Connect (created here: aiokafka needs the running loop); a no-op once connected."""
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=self.linger_ms,
            request_timeout_ms=15000,
            **self.security,
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer

    async def stop(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    @property
    def started(self) -> bool:
        return self._producer is not None

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("publisher not started")
        return self._producer

    async def send_all(self, records: Sequence[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]]) -> None:
        """Send every (topic, key, value, headers) and wait until the broker has them all."""
        futures = [
            await self.producer.send(topic, value=value, key=key, headers=headers or None)
            for topic, key, value, headers in records
        ]
        await asyncio.gather(*futures)

    async def publish(self, events: Sequence[Event]) -> None:
        """Publish events directly (no outbox): each to its own topic and to the lifecycle log."""
        await self.send_all(
            [
                (t.name, e.incident_id.encode(), encode_event(e), [("type", e.type.encode())])
                for e in events
                for t in topics_for(e)
            ]
        )


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


TOO_LARGE: tuple[type[Exception], ...] = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)
"""What the producer (over its ``max_request_size``, 1 MiB) or the broker (over ``message.max.bytes``) answers a
record too large: sent again, it is refused again. Never retried."""

EXCERPT_BYTES = 16 * 1024
"""A dead letter keeps the original value whole up to this many bytes, else its first this many (an excerpt).

Events as the services write them take a few KiB, so a record refused for what it says stays replayable from its
dead letter for ever, also once its source topic has dropped it (after a week; the lifecycle log keeps
everything); a larger one is replayed from its source topic while the topic holds it. JSON escaping grows an
excerpt six times at most (``\\u0001``): a dead letter stays far below the producer's 1 MiB."""
KEY_KEPT = 1024
"""Bytes of the original key a dead letter keeps (keys are incident ids, 64 characters at most)."""
REASON_KEPT = 2000
"""Characters of the reason a dead letter keeps (an exception's message may quote what it failed on)."""
_MINIMAL_REASON = 200


def dead_letter_record(
    *,
    service: str,
    reason: str,
    source_topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    failed_at: datetime | None = None,
    minimal: bool = False,
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """The (key, value, headers) of a dead letter: where the record is, why it could not be processed, its size
    and SHA-256, and the record itself — whole if it is small (as events are), else an excerpt; then a replay
    reads the original from its source topic (``value_truncated``, ``key_truncated``).

    ``minimal``: none of the record, only where it is, its size and hash, and the reason cut short — for a
    dead-letter topic that refuses the usual one."""
    kept_key = None if minimal or key is None else key[:KEY_KEPT]
    text, encoding, kept = (None, "utf-8", 0) if value is None else _excerpt(value, 0 if minimal else EXCERPT_BYTES)
    limit = _MINIMAL_REASON if minimal else REASON_KEPT
    body: dict[str, Any] = {
        "reason": reason if len(reason) <= limit else reason[: limit - 1] + "…",
        "service": service,
        "source_topic": source_topic,
        "partition": partition,
        "offset": offset,
        "key": kept_key.decode(errors="replace") if kept_key is not None else None,
        "key_truncated": key is not None and (kept_key is None or len(kept_key) < len(key)),
        "value": text,
        "value_encoding": encoding,
        "value_bytes": None if value is None else len(value),
        "value_sha256": None if value is None else hashlib.sha256(value).hexdigest(),
        "value_truncated": value is not None and kept < len(value),
        "failed_at": (failed_at or utcnow()).isoformat(),
    }
    dl_key = f"{source_topic}/{partition}/{offset}".encode()
    headers = [
        ("reason", reason[:_MINIMAL_REASON].encode()),
        ("source_topic", source_topic.encode()),
        ("service", service.encode()),
    ]
    return dl_key, orjson.dumps(body), headers


def _excerpt(value: bytes, limit: int) -> tuple[str, str, int]:
    """``value``, or its first ``limit`` bytes, as text: (text, "utf-8" or "base64", bytes kept). A cut through
    a UTF-8 character is moved back to the character's start, so that text stays text."""
    cut = value[:limit]
    for trim in range(4 if len(value) > limit else 1):
        kept = cut[: len(cut) - trim]
        try:
            return kept.decode(), "utf-8", len(kept)
        except UnicodeDecodeError:
            continue
    return base64.b64encode(cut).decode(), "base64", len(cut)


async def send_dead_letter(publisher: Publisher, **fields: Any) -> None:
    key, value, headers = dead_letter_record(**fields)
    await publisher.send_all([(DEADLETTER.name, key, value, headers)])
    log.warning(
        "dead-lettered %s[%s]@%s: %s", fields["source_topic"], fields["partition"], fields["offset"], fields["reason"]
    )
