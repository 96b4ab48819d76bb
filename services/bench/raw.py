"""The raw limit: Kafka produce → consume hops per second on this machine, with the pipeline's client library.

A producer configured like the pipeline's publisher (aiokafka, acks=all, idempotent, the services' linger) sends real
encoded events (an IncidentReported and a WorkOrderDispatched, alternately: the pipeline's message size) to one
6-partition topic of the bench's namespace, keyed by incident id; an aiokafka consumer in another process reads
them. A hop is one record produced and consumed; the rate is records consumed per second between the first send
and the last receipt. Producer and consumer each get their own process, as each service has its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import struct
import time
import warnings
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil  # type: ignore[import-untyped]

from schemas import GAOHANG, Actor, ActorKind, Location, encode_event
from schemas import events as ev

from .stats import percentile

RAW_TOPIC_SUFFIX = "bench.raw"


def raw_partitions() -> int:
    """As many partitions as each topic of the loop is created with."""
    from schemas.topics import INCIDENTS_REPORTED
    from services.common.admin import partitions_for

    return partitions_for(INCIDENTS_REPORTED)


def sample_events() -> list[bytes]:
    """An IncidentReported and the WorkOrderDispatched it leads to, encoded as the pipeline encodes them."""
    now = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
    incident = f"GL{now:%Y%m%d}-1A2B3C4D"
    grid = next(iter(GAOHANG.grids.values()))
    category = next(c for c in GAOHANG.categories.values() if not c.big)
    worker = grid.workers[0]
    lat, lon = grid.center
    location = Location(lat=round(lat, 5), lon=round(lon, 5))
    reported = ev.IncidentReported(
        incident_id=incident,
        occurred_at=now,
        actor=Actor(kind=ActorKind.GRID_WORKER, id=worker),
        correlation_id=incident,
        source=ev.Source.GRID_WORKER,
        category_code=category.code,
        location=location,
        description=f"bench {category.code} #123456",
        reporter_id=worker,
        client_report_id="bench-1718000000-123456",
    )
    dispatched = ev.WorkOrderDispatched.following(
        reported,
        Actor.system("dispatch"),
        occurred_at=now,
        work_order_id=f"{incident}-1",
        department_code=category.lead,
        role=ev.WorkOrderRole.LEAD,
        category_code=category.code,
        grid_id=grid.code,
        location=location,
        description=reported.description,
        priority=3,
        deadline=now + timedelta(hours=24),
        attempt=1,
    )
    return [encode_event(reported), encode_event(dispatched)]


@dataclass
class RawResult:
    hops_per_s: float
    produced: int
    consumed: int
    seconds: float
    message_bytes: float
    produce_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    partitions: int = 0
    client_cpu_s: float | None = None
    """CPU seconds of the producer and the consumer process while they ran."""
    broker_cpu_s: float | None = None
    """CPU seconds of the broker from the first send until the consumer stopped (None: its pid was not known)."""

    @property
    def cpu_ms_per_hop(self) -> float | None:
        """Client and broker CPU per record produced and consumed: what one hop costs this machine."""
        if self.client_cpu_s is None or self.broker_cpu_s is None or not self.consumed:
            return None
        return (self.client_cpu_s + self.broker_cpu_s) * 1000 / self.consumed

    def as_dict(self) -> dict[str, Any]:
        out = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in self.__dict__.items()}
        per_hop = self.cpu_ms_per_hop
        out["cpu_ms_per_hop"] = None if per_hop is None else round(per_hop, 4)
        return out


def create_raw_topic(bootstrap: str, name: str) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

    from services.common.admin import admin_client

    admin = admin_client(bootstrap)
    partitions = raw_partitions()
    try:
        with contextlib.suppress(TopicAlreadyExistsError):
            admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        _wait_for_leaders(admin, name, partitions)
    finally:
        admin.close()


def _wait_for_leaders(admin: Any, name: str, count: int, timeout_s: float = 60.0) -> None:
    """Until every partition of ``name`` has a leader: a broker just started answers the creation before its
    metadata lists the topic, and a measurement begun then spends its first seconds on retries."""
    deadline = time.monotonic() + timeout_s
    while True:
        described = admin.describe_topics([name])
        partitions = [p for t in described if t.get("error_code") == 0 for p in t.get("partitions", ())]
        if len(partitions) == count and all(p.get("leader_id", -1) >= 0 for p in partitions):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {name}: partitions without a leader after {timeout_s:.0f} s")
        time.sleep(0.2)


# -- the two processes ---------------------------------------------------------------------------------------


async def _produce(bootstrap: str, topic: str, seconds: float, count: int, window: int) -> dict[str, float]:
    from aiokafka import AIOKafkaProducer

    from services.common.settings import ServiceSettings

    values = sample_events()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="gridloop-bench-raw",
        acks="all",
        enable_idempotence=True,
        linger_ms=ServiceSettings().tuning.kafka_linger_ms,  # GRIDLOOP_TUNING__KAFKA_LINGER_MS, as the services read it
        request_timeout_ms=15000,
    )
    await producer.start()
    pending: deque[asyncio.Future[Any]] = deque()
    sent = 0
    started = time.time()
    cpu_started = time.process_time()
    try:
        while (count and sent < count) or (not count and time.time() - started < seconds):
            key = f"GL20260601-{sent:08X}".encode()
            headers = [("type", b"bench"), ("t", struct.pack("!d", time.time()))]
            pending.append(await producer.send(topic, value=values[sent % len(values)], key=key, headers=headers))
            sent += 1
            while len(pending) > window:
                await pending.popleft()
        while pending:
            await pending.popleft()
    finally:
        await producer.stop()
    cpu_s = time.process_time() - cpu_started
    return {"produced": sent, "started": started, "finished": time.time(), "cpu_s": cpu_s}


async def _consume(bootstrap: str, topic: str, idle_s: float, ready: Any, stop: Any) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="gridloop-bench-raw-reader",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    parts = [TopicPartition(topic, p) for p in range(raw_partitions())]
    consumer.assign(parts)
    await consumer.seek_to_beginning(*parts)
    ready.set()
    cpu_started = time.process_time()
    consumed, first, last = 0, 0.0, 0.0
    latencies: list[float] = []
    quiet_since = time.time()
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            now = time.time()
            if not batches:
                if stop.is_set() and now - quiet_since > idle_s:
                    break
                continue
            quiet_since = now
            for records in batches.values():
                for record in records:
                    consumed += 1
                    if consumed % 10 == 1:  # a sample is enough for the hop latency
                        sent_at = next((struct.unpack("!d", v)[0] for k, v in record.headers if k == "t"), None)
                        if sent_at is not None:
                            latencies.append((now - sent_at) * 1000)
            first = first or now
            last = now
    finally:
        await consumer.stop()
    cpu_s = time.process_time() - cpu_started
    return {"consumed": consumed, "first": first, "last": last, "latencies": latencies, "cpu_s": cpu_s}


def _consumer_main(bootstrap: str, topic: str, idle_s: float, ready: Any, stop: Any, out: Any) -> None:
    out.put(asyncio.run(_consume(bootstrap, topic, idle_s, ready, stop)))


def _producer_main(bootstrap: str, topic: str, seconds: float, count: int, window: int, out: Any) -> None:
    out.put(asyncio.run(_produce(bootstrap, topic, seconds, count, window)))


def _cpu_s(pid: int | None) -> float | None:
    """User and system CPU seconds of process ``pid`` so far (None if there is none)."""
    if pid is None:
        return None
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def measure_raw(
    bootstrap: str,
    topic: str,
    *,
    seconds: float = 15.0,
    count: int = 0,
    window: int = 20000,
    broker_pid: int | None = None,
) -> RawResult:
    """Produce for ``seconds`` (or exactly ``count`` records) while another process consumes; the hop rate, and
    what it cost in CPU: the two clients', and the broker's if its pid is given."""
    create_raw_topic(bootstrap, topic)
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    produced_q, consumed_q = ctx.Queue(), ctx.Queue()
    reader = ctx.Process(target=_consumer_main, args=(bootstrap, topic, 3.0, ready, stop, consumed_q), daemon=True)
    reader.start()
    if not ready.wait(60):
        reader.kill()
        raise RuntimeError("the raw consumer did not start within 60 s")
    writer = ctx.Process(target=_producer_main, args=(bootstrap, topic, seconds, count, window, produced_q))
    broker_before = _cpu_s(broker_pid)
    writer.start()
    produced = produced_q.get(timeout=seconds + 300 if not count else 900)
    writer.join(30)
    stop.set()
    consumed = consumed_q.get(timeout=120)
    broker_after = _cpu_s(broker_pid)
    reader.join(30)
    span = max(consumed["last"] - produced["started"], 1e-6)
    sizes = [len(v) for v in sample_events()]
    return RawResult(
        hops_per_s=consumed["consumed"] / span,
        produced=int(produced["produced"]),
        consumed=int(consumed["consumed"]),
        seconds=span,
        message_bytes=sum(sizes) / len(sizes),
        produce_per_s=produced["produced"] / max(produced["finished"] - produced["started"], 1e-6),
        p50_ms=percentile(consumed["latencies"], 50),
        p99_ms=percentile(consumed["latencies"], 99),
        partitions=raw_partitions(),
        client_cpu_s=produced["cpu_s"] + consumed["cpu_s"],
        broker_cpu_s=None if broker_before is None or broker_after is None else broker_after - broker_before,
    )
