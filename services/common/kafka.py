"""Kafka plumbing: a durable publisher (acks=all, idempotent), the outbox relay and the dead-letter writer."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer
from sqlalchemy.engine import Engine

from schemas import Event, encode_event, topics_for, utcnow
from schemas.topics import DEADLETTER

from . import metrics
from .db import OutboxRecord

log = logging.getLogger(__name__)


class Publisher:
    """One idempotent producer per process; every send waits for all in-sync replicas."""

    def __init__(self, bootstrap: str, client_id: str, **security: Any) -> None:
        self.bootstrap = bootstrap
        self.client_id = client_id
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
            linger_ms=2,
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


class OutboxRelay:
    """Publishes committed outbox records in order and marks them sent. At least once: consumers dedupe.

    Works on the outbox table with Core statements (no ORM objects): it runs after every consumed record that
    emitted events, so its cost is paid per message."""

    def __init__(self, engine: Engine, publisher: Publisher, batch: int = 500) -> None:
        self.engine = engine
        self.publisher = publisher
        self.batch = batch
        self._lock = asyncio.Lock()
        t = _OUTBOX.c
        self._select = (
            sa.select(t.id, t.incident_id, t.type, t.topics, t.payload)
            .where(t.published_at.is_(None))
            .order_by(t.id)
            .limit(batch)
        )
        self._mark = sa.update(_OUTBOX).where(t.id.in_(sa.bindparam("ids", expanding=True)))

    def pending(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(_OUTBOX).where(_OUTBOX.c.published_at.is_(None))
                ).scalar_one()
            )

    async def flush(self) -> int:
        """Publish everything pending; returns how many records went out."""
        sent = 0
        async with self._lock:
            while True:
                with self.engine.connect() as conn:
                    rows = conn.execute(self._select).all()
                if not rows:
                    return sent
                await self.publisher.send_all(
                    [
                        (topic, incident_id.encode(), payload, [("type", kind.encode())])
                        for _id, incident_id, kind, topics, payload in rows
                        for topic in topics.split(",")
                    ]
                )
                # marked only once the broker has every record (acks=all): a crash before this line means the
                # records go out again, and consumers skip them by event id
                with self.engine.begin() as conn:
                    conn.execute(self._mark.values(published_at=utcnow()), {"ids": [r[0] for r in rows]})
                sent += len(rows)
                metrics.observe_outbox([r[4] for r in rows])
                if len(rows) < self.batch:
                    return sent  # drained; anything committed meanwhile is flushed by whoever committed it


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
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """The (key, value, headers) of a dead letter: the original record and why it could not be processed."""
    text: str | None
    encoding = "utf-8"
    try:
        text = value.decode() if value is not None else None
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(value or b"").decode(), "base64"
    body: dict[str, Any] = {
        "reason": reason,
        "service": service,
        "source_topic": source_topic,
        "partition": partition,
        "offset": offset,
        "key": key.decode(errors="replace") if key is not None else None,
        "value": text,
        "value_encoding": encoding,
        "failed_at": (failed_at or utcnow()).isoformat(),
    }
    dl_key = f"{source_topic}/{partition}/{offset}".encode()
    headers = [
        ("reason", reason[:200].encode()),
        ("source_topic", source_topic.encode()),
        ("service", service.encode()),
    ]
    return dl_key, orjson.dumps(body), headers


async def send_dead_letter(publisher: Publisher, **fields: Any) -> None:
    key, value, headers = dead_letter_record(**fields)
    await publisher.send_all([(DEADLETTER.name, key, value, headers)])
    log.warning(
        "dead-lettered %s[%s]@%s: %s", fields["source_topic"], fields["partition"], fields["offset"], fields["reason"]
    )
