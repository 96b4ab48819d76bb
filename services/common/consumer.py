"""A service's consumer: the one faust agent that applies what the service consumes.

A consumed record is decoded and applied through the message bus in one unit of work (idempotent on event id,
state and outbox committed together), records already delivered together applied in one transaction; then the
outbox is flushed and the records acked. Records that can never be applied (bad JSON, unknown schema version,
missing fields, unknown incident, a handler bug) go to the dead-letter topic with the reason; the stream goes on.
A database that is down is retried with backoff, never skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from schemas import DecodeError, Event, decode_event
from schemas.topics import Topic

from . import metrics
from ._fetch import FetchingApp
from .bus import MessageBus
from .errors import PoisonMessage
from .kafka import TOO_LARGE, Publisher, send_dead_letter
from .outbox import Outbox
from .retry import TRANSIENT, forever
from .settings import Tuning

log = logging.getLogger("gridloop")


class Consumer:
    """Applies consumed records through ``bus`` and publishes what they caused through ``outbox``.

    Its steps (:meth:`process_batch`, :meth:`dead_letter`, :meth:`flush_outbox` ...) are looked up on the object
    as it runs: an object that extends it (the service's :class:`~services.common.runtime.Runtime`), or a test,
    may replace one for the agent too."""

    def __init__(self, name: str, bus: MessageBus, outbox: Outbox, tuning: Tuning) -> None:
        self.name = name
        self.bus = bus
        self.outbox = outbox
        self.tuning = tuning
        self._children: dict[tuple[Any, ...], Any] = {}

    @property
    def publisher(self) -> Publisher:
        """The process's producer: the outbox's, and the dead letters'."""
        return self.outbox.publisher

    @publisher.setter
    def publisher(self, publisher: Publisher) -> None:
        self.outbox.publisher = publisher

    def attach(self, app: FetchingApp, topics: Sequence[Topic]) -> None:
        """Declare on ``app`` the agent that consumes ``topics`` (none: no agent), fetching as tuned."""
        tuning = self.tuning
        app.fetch = (tuning.fetch_min_bytes, tuning.fetch_max_wait_ms)
        if not topics:
            return
        channel = app.topic(*(t.name for t in topics), key_type=bytes, value_type=bytes)

        @app.agent(channel, concurrency=1, name=f"{self.name}-consumer")  # type: ignore[untyped-decorator]
        async def consume(stream: Any) -> None:
            # Natural batching: records already delivered to this agent join the batch, and it is applied as
            # soon as nothing more is waiting — no timer, so no latency added when the stream is quiet, and
            # bigger batches (cheaper per record) when it is busy. Acks are manual: an offset is committed
            # only after its record's effects are.
            # A consumer whose latency matters less (a read model) may linger a moment for more records.
            # Once faust suspends the flow (a shutdown, a rebalance) the records still queued are skipped, to
            # come again later: a batch is then applied with what it holds, never kept waiting for more.
            manual = stream.noack()
            empty = manual.channel.empty
            flowing = app.flow_control.is_active
            batch_max, linger_s = tuning.batch_max, tuning.batch_linger_s
            batch: list[Any] = []
            lingered = False
            async for event in manual.events():
                batch.append(event)
                room = len(batch) < batch_max and flowing()
                if room and not empty():
                    continue
                if room and linger_s and not lingered:
                    lingered = True
                    await asyncio.sleep(linger_s)
                    if not empty() and flowing():
                        continue
                await self.process_batch([e.message for e in batch])
                for e in batch:
                    await manual.ack(e)
                batch.clear()
                lingered = False

    async def ensure_publisher(self) -> None:
        await self.outbox.ensure_publisher()

    async def flush_outbox(self, *, expected: bool = True) -> None:
        """Publish the outbox now, waiting at most the outbox's ``wait_s`` (see :meth:`Outbox.flush`)."""
        await self.outbox.flush(expected=expected)

    async def process(self, message: Any) -> None:
        """Apply one consumed record (a faust Message: topic, partition, offset, key, value)."""
        event = await self._decode(message)
        if event is not None:
            await self._process_event(message, event)

    async def _decode(self, message: Any) -> Event | None:
        """The record's event, counted; None if it cannot be decoded (then it is dead-lettered)."""
        try:
            event = decode_event(message.value)
        except DecodeError as exc:
            await self.dead_letter(message, exc.reason, kind="decode")
            return None
        except Exception as exc:  # whatever a record does in decoding, the stream goes on without it
            await self.dead_letter(message, f"undecodable record: {type(exc).__name__}: {exc}", kind="decode")
            return None
        self._metric(metrics.EVENTS_CONSUMED, message.topic, event.type).inc()
        return event

    def _metric(self, metric: Any, *labels: str) -> Any:
        """``metric``'s child for this service and ``labels``, looked up once, not per record."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.name, *labels)
        return child

    async def _process_event(self, message: Any, event: Event) -> None:
        if not self.bus.handles(event):
            return
        try:
            emitted = await self.apply(event)
        except PoisonMessage as exc:
            await self.dead_letter(message, f"{type(exc).__name__}: {exc}", kind="poison")
            return
        except Exception as exc:  # a bug must not stop the town's pipeline: park the record, keep going
            log.exception("handler failed on %s %s", event.type, event.event_id)
            await self.dead_letter(message, f"handler error {type(exc).__name__}: {exc}", kind="error")
            return
        if emitted:
            await self.flush_outbox()

    async def process_batch(self, messages: Sequence[Any]) -> None:
        """Apply consumed records in one transaction and publish what they caused with one flush.

        A record that cannot be decoded is dead-lettered on its own. If applying the batch fails (a poison
        record, a handler bug) the transaction is rolled back and the records are applied one at a time, so only
        the bad one is set aside."""
        if len(messages) == 1:
            await self.process(messages[0])
            return
        decoded: list[tuple[Any, Event]] = []
        for message in messages:
            event = await self._decode(message)
            if event is not None and self.bus.handles(event):
                decoded.append((message, event))
        if not decoded:
            return
        events = [event for _, event in decoded]
        started = time.perf_counter()
        try:
            emitted = await self._apply_batch(events)
        except Exception as exc:
            log.info("batch of %d not applied at once (%s: %s); one at a time", len(events), type(exc).__name__, exc)
            metrics.BATCH_FALLBACKS.labels(self.name).inc()
            for message, event in decoded:
                await self._process_event(message, event)
            return
        metrics.BATCH_SIZE.labels(self.name).observe(len(events))
        share = (time.perf_counter() - started) / len(events)
        for event in events:
            self._metric(metrics.HANDLE_SECONDS, event.type).observe(share)
        if emitted:
            await self.flush_outbox()

    async def _apply_batch(self, events: Sequence[Event]) -> list[Event]:
        try:
            return self.bus.handle_batch(events)
        except TRANSIENT as exc:
            log.warning("database unavailable (%s); retrying", exc)
        async for attempt in forever("database", TRANSIENT):
            with attempt:
                return self.bus.handle_batch(events)
        raise AssertionError("unreachable")

    async def apply(self, event: Event) -> list[Event]:
        """Run the bus for ``event``, retrying while the database is unreachable."""
        started = time.perf_counter()
        try:  # the common case first, without the retry machinery's cost per message
            emitted = self.bus.handle(event)
        except TRANSIENT as exc:
            log.warning("database unavailable (%s); retrying", exc)
        else:
            self._metric(metrics.HANDLE_SECONDS, event.type).observe(time.perf_counter() - started)
            return emitted
        async for attempt in forever("database", TRANSIENT):
            with attempt:
                started = time.perf_counter()
                emitted = self.bus.handle(event)
                self._metric(metrics.HANDLE_SECONDS, event.type).observe(time.perf_counter() - started)
                return emitted
        raise AssertionError("unreachable")

    async def dead_letter(self, message: Any, reason: str, *, kind: str) -> None:
        """Send ``message`` to the dead-letter topic with ``reason``, retrying while the broker is unreachable.

        A dead letter the producer or the broker refuses as too large is never retried (it would be refused for
        ever, and every later record would wait behind it): it is sent again without any of the record — where
        it is, its size and hash, the reason — and if even that is refused, it is logged and counted as lost.
        The record itself stays on its source topic either way."""
        metrics.DEAD_LETTERS.labels(self.name, kind).inc()
        fields: dict[str, Any] = {
            "service": self.name,
            "reason": reason,
            "source_topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "key": message.key,
            "value": message.value,
        }
        await self.ensure_publisher()
        try:
            await self._send_dead_letter(fields)
            return
        except TOO_LARGE as exc:
            refused = exc
        where = f"{message.topic}[{message.partition}]@{message.offset}"
        try:
            await self._send_dead_letter({**fields, "minimal": True})
        except TOO_LARGE as exc:
            metrics.DEAD_LETTERS_UNSENDABLE.labels(self.name, "lost").inc()
            log.error("dead letter of %s not sent, refused as too large (%s): %s", where, exc, reason)
        else:
            metrics.DEAD_LETTERS_UNSENDABLE.labels(self.name, "reduced").inc()
            log.error("dead letter of %s refused as too large (%s); sent without the record", where, refused)

    async def _send_dead_letter(self, fields: dict[str, Any]) -> None:
        async for attempt in forever("dead-letter topic"):
            with attempt:
                await send_dead_letter(self.publisher, **fields)
