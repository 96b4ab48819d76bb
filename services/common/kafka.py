"""Kafka plumbing: a durable publisher (acks=all, idempotent) and the dead letter's record (the outbox relay is in
``outbox.py``)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError

from schemas import Event, encode_event, topics_for, utcnow
from schemas.topics import DEADLETTER

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
