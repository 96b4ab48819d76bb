"""A synthetic history of a town: months of incidents' lifecycle events, as the services would have logged them,
and their publication on a lifecycle topic — what the read side is measured on (``python -m services.bench read``).

- :func:`lifecycle` yields the events of ``incidents`` incidents reported over ``days`` days, in the order a live
  log carries them (by the time they occurred). Each event is one of the project's own event classes, built as
  the service that emits it builds it; see :mod:`._story` for the mix (about 8.3 events an incident, 85 % closed;
  the others rejected, merged, or open at every stage, overdue ones reminded and escalated).
- Reports follow the town's day (Asia/Shanghai): few at night, most in office hours, fewer at weekends.
- The same seed and start give the same events, ids included. Memory stays bounded whatever the count: the
  incidents are drawn in order of report, and only the events still to come of those under way are held.
- :func:`publish` writes events to Kafka as the services do (keyed by incident id, the default partitioner,
  acks=all, idempotent), in large batches.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import random
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from schemas import Event, Town, aware_utc, encode_event, utcnow
from schemas.reference import GAOHANG
from schemas.topics import LIFECYCLE

from ._story import Stories

LOCAL = ZoneInfo("Asia/Shanghai")
"""The town's time zone: its day sets when incidents are reported."""
HOUR_WEIGHTS = (
    0.2, 0.12, 0.08, 0.08, 0.1, 0.2, 0.5, 1.0, 1.6, 1.9, 2.0, 1.9,
    1.4, 1.6, 1.9, 1.9, 1.8, 1.5, 1.2, 1.0, 0.8, 0.6, 0.4, 0.3,
)  # fmt: skip
"""How many reports come in each local hour of a weekday, relatively."""
WEEKEND_WEIGHT = 0.7
"""…and on Saturday and Sunday."""

BATCH_BYTES = 512 * 1024
"""How much one produce batch holds (a partition's records go out together)."""
IN_FLIGHT = 64
"""How many batches may wait for the broker's answer at once."""


def lifecycle(
    incidents: int,
    *,
    seed: int = 1,
    start: datetime | None = None,
    days: int = 365,
    town: Town = GAOHANG,
) -> Iterator[Event]:
    """The lifecycle events of ``incidents`` incidents of ``town`` reported over ``days`` days from ``start``
    (default: ``days`` days before now, so the history ends now), in the order they occurred (events of the same
    moment in the order their service emits them). Events that would occur after the history's end are left
    out: the incidents they belong to are still open when it ends."""
    if incidents < 0:
        raise ValueError(f"incidents must be 0 or more, not {incidents}")
    if days <= 0:
        raise ValueError(f"days must be more than 0, not {days}")
    span = timedelta(days=days)
    begin = aware_utc(start) if start is not None else utcnow().replace(microsecond=0) - span
    end = begin + span
    stories = Stories(random.Random(f"gridloop-history/{seed}"), town, end)
    times = report_times(incidents, begin, end, random.Random(f"gridloop-history/{seed}/times"))
    return _merged(stories, times, end)


def _merged(stories: Stories, times: Iterable[datetime], end: datetime) -> Iterator[Event]:
    """Each incident's events drawn as it is reported, merged into one stream by the time they occur."""
    pending: list[tuple[datetime, int, Event]] = []
    order = itertools.count()
    for reported_at in times:
        while pending and pending[0][0] < reported_at:
            yield heapq.heappop(pending)[2]
        for event in stories.draw(reported_at):
            if event.occurred_at < end:
                heapq.heappush(pending, (event.occurred_at, next(order), event))
    while pending:
        yield heapq.heappop(pending)[2]


def report_times(count: int, start: datetime, end: datetime, rng: random.Random) -> Iterator[datetime]:
    """``count`` report times from ``start`` to ``end``, in order, spread as the town's days go: each hour gets
    its share of the reports (:data:`HOUR_WEIGHTS`, :data:`WEEKEND_WEIGHT`), each report a random moment of the
    hour its rank falls in (stratified, so the count is exact and no list of them is built)."""
    if count == 0:
        return
    slots: list[datetime] = []
    cumulative: list[float] = []
    total = 0.0
    t = start.replace(minute=0, second=0, microsecond=0)
    while t < end:
        slot_start, slot_end = max(t, start), min(t + timedelta(hours=1), end)
        local = slot_start.astimezone(LOCAL)
        weight = HOUR_WEIGHTS[local.hour] * (WEEKEND_WEIGHT if local.weekday() >= 5 else 1.0)
        total += weight * (slot_end - slot_start) / timedelta(hours=1)
        slots.append(slot_start)
        cumulative.append(total)
        t += timedelta(hours=1)
    slots.append(end)
    k = 0
    for i in range(count):
        q = (i + rng.random()) / count * total
        k = bisect.bisect_right(cumulative, q, lo=k)
        if k >= len(cumulative):  # rounding at the very end
            k = len(cumulative) - 1
        below = cumulative[k - 1] if k else 0.0
        share = (q - below) / (cumulative[k] - below) if cumulative[k] > below else 0.0
        yield slots[k] + (slots[k + 1] - slots[k]) * min(max(share, 0.0), 1.0)


# -- publishing --------------------------------------------------------------------------------------------------


def publish(
    events: Iterable[Event],
    bootstrap: str,
    *,
    topic: str | None = None,
    security: Mapping[str, Any] | None = None,
) -> int:
    """Write ``events`` to ``topic`` (default: the lifecycle log of the namespace in force when called) as the
    services do — keyed by incident id (so one incident's events stay in
    one partition, in order), the default partitioner, a ``type`` header, acks=all, idempotent — in large
    batches, one per partition at a time. Returns how many were written once the broker has them all.
    ``security``: the Kafka client's credentials (as ``ServiceSettings.kafka_client_options`` gives them)."""
    return asyncio.run(_publish(events, bootstrap, topic or LIFECYCLE.name, dict(security or {})))


async def _publish(events: Iterable[Event], bootstrap: str, topic: str, security: dict[str, Any]) -> int:
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="gridloop-bench-history",
        acks="all",
        enable_idempotence=True,
        max_batch_size=BATCH_BYTES,
        max_request_size=2 * BATCH_BYTES,
        request_timeout_ms=60_000,
        **security,
    )
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        if not partitions:
            raise RuntimeError(f"topic {topic} has no partitions")
        partitioner = DefaultPartitioner()
        batches = {p: producer.create_batch() for p in partitions}
        in_flight: deque[asyncio.Future[Any]] = deque()
        sent = 0
        for event in events:
            key = event.incident_id.encode()
            partition = partitioner(key, partitions, partitions)
            value, headers = encode_event(event), [("type", event.type.encode())]
            if batches[partition].append(key=key, value=value, timestamp=None, headers=headers) is None:
                in_flight.append(await producer.send_batch(batches[partition], topic, partition=partition))
                batches[partition] = producer.create_batch()
                if batches[partition].append(key=key, value=value, timestamp=None, headers=headers) is None:
                    raise ValueError(f"event {event.event_id} is larger than a batch ({BATCH_BYTES} bytes)")
                while len(in_flight) > IN_FLIGHT:
                    await in_flight.popleft()
            sent += 1
        for partition, batch in batches.items():
            if batch.record_count():
                in_flight.append(await producer.send_batch(batch, topic, partition=partition))
        while in_flight:
            await in_flight.popleft()
        return sent
    finally:
        await producer.stop()


__all__ = ["HOUR_WEIGHTS", "LOCAL", "WEEKEND_WEIGHT", "lifecycle", "publish", "report_times"]
