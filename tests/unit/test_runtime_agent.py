"""The faust entrypoint, driven with faust's test_context(): decode → bus → outbox, or dead-letter."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from schemas import Actor, Location, encode_event
from schemas import events as ev
from services.common.db import OutboxRecord, ProcessedEvent, UnitOfWork
from services.common.settings import Tuning
from services.dispatch.app import build
from services.dispatch.settings import DispatchSettings


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    # no linger: a test context closes as soon as its records are handed over
    rt = build(DispatchSettings(var_dir=tmp_path, http_port=18105, tuning=Tuning(batch_linger_s=0)))
    rt.init_db()
    letters: list[tuple[str, str]] = []
    flushes: list[int] = []

    async def dead_letter(message: Any, reason: str, *, kind: str) -> None:
        letters.append((kind, reason))

    async def flush_outbox() -> None:
        flushes.append(1)

    monkeypatch.setattr(rt, "dead_letter", dead_letter)
    monkeypatch.setattr(rt, "flush_outbox", flush_outbox)
    rt.letters, rt.flushes = letters, flushes  # type: ignore[attr-defined]
    return rt


def _report() -> ev.IncidentReported:
    return ev.IncidentReported(
        incident_id="GL-1",
        actor=Actor(kind="grid_worker", id="w-gh01-1"),
        correlation_id="GL-1",
        source="grid_worker",
        category_code="exposed_garbage",
        location=Location(lat=31.275, lon=121.565),
        description="d",
        reporter_id="w-gh01-1",
        client_report_id="r-1",
    )


async def test_agent_applies_once_and_dead_letters_bad_records(runtime: Any) -> None:
    agent = runtime.app.agents["dispatch-consumer"]
    report = encode_event(_report())
    async with agent.test_context() as ctx:
        await ctx.put(report)
        await ctx.put(report)  # redelivered
        await ctx.put(b"{broken json")
        await ctx.put(b'{"schema_version": 9, "type": "IncidentReported"}')
        ghost = ev.WorkOrderAccepted(
            incident_id="ghost",
            actor=Actor.system("x"),
            correlation_id="c",
            work_order_id="ghost-1",
            department_code="city_ops",
        )
        await ctx.put(encode_event(ghost))
    with UnitOfWork(runtime.engine) as uow:
        types = [r.type for r in uow.session.exec(select(OutboxRecord)).all()]
        assert types == ["IncidentFiled", "WorkOrderDispatched"]
        assert len(uow.session.exec(select(ProcessedEvent)).all()) == 1
    kinds = [k for k, _ in runtime.letters]
    assert kinds == ["decode", "decode", "poison"]
    assert "malformed JSON" in runtime.letters[0][1]
    assert "unknown schema_version 9" in runtime.letters[1][1]
    assert "ghost" in runtime.letters[2][1]
    assert runtime.flushes == [1]


def _report_n(n: int) -> ev.IncidentReported:
    # far enough apart not to be merged as one incident reported twice
    return _report().model_copy(
        update={
            "incident_id": f"GL-B{n}",
            "correlation_id": f"GL-B{n}",
            "client_report_id": f"r-b{n}",
            "location": Location(lat=31.275 + 0.002 * n, lon=121.565),
        }
    )


class _Message:
    def __init__(self, value: bytes, offset: int) -> None:
        self.topic, self.partition, self.offset, self.key, self.value = (
            "gridloop.incidents.reported",
            0,
            offset,
            b"k",
            value,
        )


async def test_a_batch_is_applied_in_one_transaction_and_flushed_once(
    runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits: list[int] = []
    real = UnitOfWork.commit

    def commit(self: UnitOfWork) -> None:
        commits.append(1)
        real(self)

    monkeypatch.setattr(UnitOfWork, "commit", commit)
    reports = [encode_event(_report_n(n)) for n in range(5)]
    messages = [_Message(v, i) for i, v in enumerate([*reports, reports[0], b"{broken json"])]
    await runtime.process_batch(messages)
    assert commits == [1]
    assert runtime.flushes == [1]
    assert [k for k, _ in runtime.letters] == ["decode"]
    with UnitOfWork(runtime.engine) as uow:
        assert len(uow.session.exec(select(ProcessedEvent)).all()) == 5  # the redelivered copy changed nothing
        types = [r.type for r in uow.session.exec(select(OutboxRecord)).all()]
        assert types.count("IncidentFiled") == 5 and types.count("WorkOrderDispatched") == 5


async def test_a_poison_record_in_a_batch_is_set_aside_and_the_rest_applied(runtime: Any) -> None:
    ghost = ev.WorkOrderAccepted(
        incident_id="ghost",
        actor=Actor.system("x"),
        correlation_id="c",
        work_order_id="ghost-1",
        department_code="city_ops",
    )
    values = [encode_event(_report_n(1)), encode_event(ghost), encode_event(_report_n(2))]
    await runtime.process_batch([_Message(v, i) for i, v in enumerate(values)])
    assert [k for k, _ in runtime.letters] == ["poison"]
    assert "ghost" in runtime.letters[0][1]
    with UnitOfWork(runtime.engine) as uow:
        ids = sorted(p.event_id for p in uow.session.exec(select(ProcessedEvent)).all())
    assert len(ids) == 2  # both reports, each once, although the batch was first rolled back


def test_an_event_is_claimed_once_within_a_transaction_and_across_them(runtime: Any) -> None:
    report = _report_n(7)
    with UnitOfWork(runtime.engine) as uow:
        assert uow.claim(report)
        assert not uow.claim(report)  # a copy later in the same batch
        uow.commit()
    with UnitOfWork(runtime.engine) as uow:
        assert not uow.claim(report)  # redelivered after the commit
    with UnitOfWork(runtime.engine) as uow:
        assert uow.claim(_report_n(8))
        # not committed: rolled back with the unit, so the event is claimable again
    with UnitOfWork(runtime.engine) as uow:
        assert len(uow.session.exec(select(ProcessedEvent)).all()) == 1


async def test_the_agent_takes_records_in_batches(runtime: Any) -> None:
    seen: list[int] = []
    done = asyncio.Event()
    real = runtime.process_batch

    async def process_batch(messages: Any) -> None:
        seen.append(len(messages))
        await real(messages)
        if sum(seen) >= 20:
            done.set()

    runtime.process_batch = process_batch
    agent = runtime.app.agents["dispatch-consumer"]
    async with agent.test_context() as ctx:
        # delivered together, as a fetch from the broker delivers them: what is waiting joins one batch
        for n in range(20):
            await ctx.put(encode_event(_report_n(n)), wait=False)
        await asyncio.wait_for(done.wait(), timeout=10)
    with UnitOfWork(runtime.engine) as uow:
        assert len(uow.session.exec(select(ProcessedEvent)).all()) == 20
    assert sum(seen) == 20 and max(seen) > 1, seen


def test_a_batch_claim_returns_what_was_not_applied_before_in_order_each_once(runtime: Any) -> None:
    a, b, c = _report_n(11), _report_n(12), _report_n(13)
    with UnitOfWork(runtime.engine) as uow:
        assert uow.claim(b)
        uow.commit()
    with UnitOfWork(runtime.engine) as uow:
        assert [e.event_id for e in uow.claim_all([c, a, b, c, a])] == [c.event_id, a.event_id]
        assert uow.claim_all([]) == []
        uow.commit()
    with UnitOfWork(runtime.engine) as uow:
        assert uow.claim_all([a, b, c]) == []
        assert not uow.claim(a)


@pytest.mark.parametrize("level", ["warning", "info"])
def test_worker_leaves_the_root_logger_at_the_level_asked(runtime: Any, level: str) -> None:
    # faust's own worker sets the root logger to DEBUG at warning and above (for its terminal spinner), so every
    # library's debug line would be built and handled for the life of the service
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        worker = runtime.app.conf.Worker(runtime.app, loglevel=level)
        worker._setup_logging()
        assert root.level == logging.getLevelName(level.upper())
        assert not logging.getLogger("aiokafka.conn").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def test_worker_starts_with_the_start_up_objects_frozen_out_of_the_collector(
    runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Modules, models, compiled schemas: hundreds of thousands of objects that live as long as the process. Left to
    # the collector, each full collection walks them all — a pause of 150-330 ms in the middle of the stream.
    import gc

    frozen_at_main: list[int] = []
    assert gc.get_freeze_count() == 0
    try:
        _start_worker(runtime, monkeypatch, lambda: frozen_at_main.append(gc.get_freeze_count()))
    finally:
        gc.unfreeze()
    assert len(frozen_at_main) == 1
    assert frozen_at_main[0] > 10_000


@pytest.mark.parametrize(
    ("setting", "loop_type"), [(None, "uvloop.Loop"), ("aio", "asyncio.unix_events._UnixSelectorEventLoop")]
)
def test_worker_runs_on_the_event_loop_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str | None, loop_type: str
) -> None:
    # faust reads --loop when it is first imported, long before a service starts its worker: the option alone left
    # every service on the standard library's loop whatever GRIDLOOP_TUNING__EVENT_LOOP said
    made: list[str] = []

    def main() -> None:  # what the worker's loop will be: made here as faust's worker makes it
        loop = asyncio.get_event_loop_policy().new_event_loop()
        made.append(f"{type(loop).__module__}.{type(loop).__qualname__}")
        loop.close()

    _start_worker_with(tmp_path, monkeypatch, "GRIDLOOP_TUNING__EVENT_LOOP", setting, main)
    assert made == [loop_type]


@pytest.mark.parametrize(("setting", "interval"), [(None, 0.001), ("0.0005", 0.0005)])
def test_worker_starts_with_the_switch_interval_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str | None, interval: float
) -> None:
    # the loop thread lets go of the GIL on every database call; at Python's 5 ms it could wait that long to take it
    # back from faust's consumer thread
    import sys

    seen: list[float] = []
    _start_worker_with(
        tmp_path,
        monkeypatch,
        "GRIDLOOP_TUNING__SWITCH_INTERVAL_S",
        setting,
        lambda: seen.append(sys.getswitchinterval()),
    )
    assert seen == [pytest.approx(interval)]


async def test_a_stopping_worker_marks_what_its_relay_sent(runtime: Any) -> None:
    class Publisher:
        started = True
        sent: list[str] = []

        async def send_all(self, records: Any) -> None:
            self.sent.extend(topic for topic, *_ in records)

    runtime.relay.publisher = Publisher()
    with runtime.uow() as uow:
        uow.emit(_report())
        uow.commit()
    assert await runtime.relay.flush() == 1
    assert runtime.relay.pending() == 1  # sent, marked by the next claim or at the stop
    await runtime.app.on_before_shutdown.send()
    assert runtime.relay.pending() == 0 and runtime.relay.unmarked == 0


def _start_worker_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str | None, main: Any
) -> None:
    """A dispatch worker built with ``variable`` set to ``value`` (None: unset), started up to ``main`` as
    :func:`_start_worker` does, without freezing the start-up objects."""
    from services.common import process

    if value is not None:
        monkeypatch.setenv(variable, value)
    rt = build(DispatchSettings(var_dir=tmp_path, http_port=18105))
    monkeypatch.setattr(process, "_freeze_startup_objects", lambda: None)
    _start_worker(rt, monkeypatch, main)


def _start_worker(rt: Any, monkeypatch: pytest.MonkeyPatch, main: Any) -> None:
    """``rt.run()`` up to the worker's start, which calls ``main`` instead: no broker wait, no port check; the
    command line and the event loop policy it sets are put back afterwards."""
    import sys

    from services.common import admin, process

    monkeypatch.setattr(admin, "wait_for_topics", lambda *a, **k: None)
    monkeypatch.setattr(process, "_require_free_port", lambda *a: None)
    monkeypatch.setattr(rt.app, "main", main)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    saved, interval = asyncio.get_event_loop_policy(), sys.getswitchinterval()
    try:
        rt.run()
    finally:
        asyncio.set_event_loop_policy(saved)
        sys.setswitchinterval(interval)


@pytest.mark.parametrize("linger", [None, "5"])
async def test_the_publisher_lingers_as_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, linger: str | None
) -> None:
    import services.common.kafka as kafka

    if linger is not None:
        monkeypatch.setenv("GRIDLOOP_TUNING__KAFKA_LINGER_MS", linger)
    made: list[dict[str, Any]] = []

    class Producer:
        def __init__(self, **options: Any) -> None:
            made.append(options)

        async def start(self) -> None:
            pass

    monkeypatch.setattr(kafka, "AIOKafkaProducer", Producer)
    rt = build(DispatchSettings(var_dir=tmp_path, http_port=18105))
    await rt.publisher.start()
    # by default a record is sent at once (the outbox hands over a whole batch): no 2-5 ms of waiting per hop
    assert len(made) == 1 and made[0]["linger_ms"] == (int(linger) if linger else 0)
    assert made[0]["acks"] == "all" and made[0]["enable_idempotence"] is True


async def test_a_lingering_consumer_applies_what_arrives_meanwhile_in_the_same_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record alone in the channel is held ``batch_linger_s`` for more; what arrives meanwhile joins its batch.
    Without the linger the two are applied apart."""
    batches: dict[float, list[int]] = {}
    for linger in (0.0, 0.5):
        rt = build(DispatchSettings(var_dir=tmp_path / str(linger), tuning=Tuning(batch_linger_s=linger)))
        rt.init_db()
        seen = batches[linger] = []
        done = asyncio.Event()

        async def process_batch(messages: Any, seen: list[int] = seen, done: asyncio.Event = done) -> None:
            seen.append(len(messages))
            if sum(seen) >= 2:
                done.set()

        monkeypatch.setattr(rt, "process_batch", process_batch)
        async with rt.app.agents["dispatch-consumer"].test_context() as ctx:
            await ctx.put(encode_event(_report_n(1)), wait=False)
            await asyncio.sleep(0.1)  # the first record is in the agent's hands by now
            await ctx.put(encode_event(_report_n(2)), wait=False)
            await asyncio.wait_for(done.wait(), timeout=10)
    assert batches == {0.0: [1, 1], 0.5: [2]}


async def test_a_consumer_whose_flow_stops_applies_the_batch_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a shutdown or a rebalance faust suspends the flow: records still queued are skipped (they come again
    later), and the worker waits for every record handed to the agent to be acked. A batch held for more must
    then be applied with what it has; waiting for a record that never comes hung the worker's shutdown."""
    rt = build(DispatchSettings(var_dir=tmp_path, tuning=Tuning(batch_linger_s=0.5)))
    rt.init_db()
    seen: list[int] = []
    applied = asyncio.Event()

    async def process_batch(messages: Any) -> None:
        seen.append(len(messages))
        applied.set()

    monkeypatch.setattr(rt, "process_batch", process_batch)
    async with rt.app.agents["dispatch-consumer"].test_context() as ctx:
        await ctx.put(encode_event(_report_n(1)), wait=False)
        await asyncio.sleep(0.1)  # the first record is held, lingering for more
        await ctx.put(encode_event(_report_n(2)), wait=False)  # one more waits in the channel
        rt.app.flow_control.suspend()
        try:
            await asyncio.wait_for(applied.wait(), timeout=5)
        finally:
            rt.app.flow_control.resume()
    assert seen[0] == 1, seen  # the held record, alone: the one queued behind it was skipped


@pytest.mark.parametrize("service", ["intake", "dispatch", "handling", "verification", "opscenter"])
def test_a_stopping_worker_does_not_wait_for_the_records_its_agent_holds(tmp_path: Path, service: str) -> None:
    """faust's default waits, at a shutdown, until every record handed to an agent is acked, with no end: a record
    that is never applied (the agent stopped, or held for more records) kept a worker from stopping. Unacked, a
    record is not committed, and the next consumer gets it again (skipped by event id if it was applied)."""
    import importlib

    app = importlib.import_module(f"services.{service}.app")
    settings = importlib.import_module(f"services.{service}.settings")
    kind = next(v for k, v in vars(settings).items() if k.endswith("Settings") and k != "ServiceSettings")
    rt = app.build(kind(var_dir=tmp_path))
    assert rt.app.conf.stream_wait_empty is False


def test_the_loop_s_consumers_linger_for_the_rest_of_a_burst(tmp_path: Path) -> None:
    from services.handling.settings import HandlingSettings
    from services.intake.settings import IntakeSettings
    from services.verification.settings import VerificationSettings

    lingers = {
        s.service: s.tuning.batch_linger_s
        for s in (
            DispatchSettings(var_dir=tmp_path),
            HandlingSettings(var_dir=tmp_path),
            VerificationSettings(var_dir=tmp_path),
            IntakeSettings(var_dir=tmp_path),
        )
    }
    assert lingers == {"dispatch": 0.02, "handling": 0.02, "verification": 0.02, "intake": 0.25}
    assert IntakeSettings(var_dir=tmp_path).tuning.batch_max == 64  # its batches hold up the reports it answers


def test_an_instance_of_several_rechecks_its_held_long_polls(tmp_path: Path) -> None:
    alone = build(DispatchSettings(var_dir=tmp_path, http_port=18105))
    paired = build(DispatchSettings(var_dir=tmp_path, http_port=18105, instance="b"))
    assert (alone.changes.recheck_s, paired.changes.recheck_s) == (0.0, 1.0)


def _worker_consumer(rt: Any) -> Any:
    """The aiokafka consumer the worker's consumer thread would start with (made, not connected)."""
    consumer: Any = rt.app.consumer
    return consumer._new_consumer_thread()._create_worker_consumer(rt.app.transport)


@pytest.mark.parametrize(
    ("env", "expected"), [({}, (1, 1500)), ({"GRIDLOOP_TUNING__FETCH_MIN_BYTES": "65536"}, (65536, 1500))]
)
async def test_the_worker_consumer_fetches_as_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: tuple[int, int]
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rt = build(DispatchSettings(var_dir=tmp_path, http_port=18105))
    consumer = _worker_consumer(rt)
    try:
        assert (consumer._fetch_min_bytes, consumer._fetch_max_wait_ms) == expected
    finally:
        await consumer.stop()


async def test_the_operations_center_fetches_bigger_batches_than_the_loop(tmp_path: Path) -> None:
    """opscenter folds the lifecycle log into its views: it asks the broker to gather records. intake, which answers
    reports on the loop's path, and dispatch do not."""
    from services.intake.app import build as build_intake
    from services.intake.settings import IntakeSettings
    from services.opscenter.app import build as build_opscenter
    from services.opscenter.settings import OpsCenterSettings

    fetched = {}
    for name, rt in (
        ("dispatch", build(DispatchSettings(var_dir=tmp_path))),
        ("intake", build_intake(IntakeSettings(var_dir=tmp_path))),
        ("opscenter", build_opscenter(OpsCenterSettings(var_dir=tmp_path))),
    ):
        consumer = _worker_consumer(rt)
        fetched[name] = consumer._fetch_min_bytes
        await consumer.stop()
    assert fetched == {"dispatch": 1, "intake": 1, "opscenter": 256 * 1024}


class _SizeLimitedPublisher:
    """A publisher whose producer refuses, as aiokafka does, any record bigger than ``limit`` bytes."""

    started = True

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sent: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]] = []
        self.refused = 0

    async def send_all(self, records: Any) -> None:
        from aiokafka.errors import MessageSizeTooLargeError

        for topic, key, value, headers in records:
            size = len(key or b"") + len(value) + sum(len(k) + len(v) for k, v in headers)
            if size > self.limit:
                self.refused += 1
                raise MessageSizeTooLargeError(f"The message is {size} bytes when serialized")
            self.sent.append((topic, key, value, headers))


def _plain_runtime(tmp_path: Path) -> Any:
    rt = build(DispatchSettings(var_dir=tmp_path, http_port=18105, tuning=Tuning(batch_linger_s=0)))
    rt.init_db()
    return rt


def _unsendable(rt: Any, outcome: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "gridloop_dead_letters_unsendable_total", {"service": rt.name, "outcome": outcome}
    )
    return value or 0.0


async def test_a_huge_record_is_dead_lettered_within_the_producer_s_limit(tmp_path: Path) -> None:
    """~800 KB of binary on workorders.dispatched: a dead letter wrapping it whole was refused by the producer
    (1 MiB at most), the refusal was taken for an outage and retried for ever, and every later record waited."""
    rt = _plain_runtime(tmp_path)
    rt.publisher = _SizeLimitedPublisher(limit=1024 * 1024)
    huge = _Message(bytes(range(256)) * 3200, 5)
    await asyncio.wait_for(rt.process(huge), timeout=10)
    [(topic, _key, value, _headers)] = rt.publisher.sent
    body = json.loads(value)
    assert topic.endswith(".deadletter") and "malformed JSON" in body["reason"]
    assert (body["offset"], body["value_bytes"]) == (5, len(huge.value))
    assert body["value_sha256"] == hashlib.sha256(huge.value).hexdigest()


async def test_a_dead_letter_refused_as_too_large_is_sent_again_without_the_record_never_retried(
    tmp_path: Path,
) -> None:
    rt = _plain_runtime(tmp_path)
    rt.publisher = _SizeLimitedPublisher(limit=2048)  # a dead-letter topic that takes small records only
    before = _unsendable(rt, "reduced"), _unsendable(rt, "lost")
    await asyncio.wait_for(rt.dead_letter(_Message(b"{" + b"x" * 10_000, 3), "malformed JSON", kind="decode"), 10)
    assert rt.publisher.refused == 1
    [(_topic, _key, value, _headers)] = rt.publisher.sent
    body = json.loads(value)
    assert body["value"] == "" and body["key"] is None and body["value_truncated"] and body["value_bytes"] == 10_001
    assert body["reason"] == "malformed JSON" and body["offset"] == 3
    assert (_unsendable(rt, "reduced"), _unsendable(rt, "lost")) == (before[0] + 1, before[1])


async def test_a_dead_letter_refused_even_without_the_record_is_counted_lost_and_the_stream_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rt = _plain_runtime(tmp_path)
    rt.publisher = _SizeLimitedPublisher(limit=10)
    lost = _unsendable(rt, "lost")
    with caplog.at_level(logging.ERROR, logger="gridloop"):
        await asyncio.wait_for(rt.dead_letter(_Message(b"{", 11), "malformed JSON", kind="decode"), timeout=10)
    assert rt.publisher.refused == 2 and rt.publisher.sent == []
    assert _unsendable(rt, "lost") == lost + 1
    assert any("gridloop.incidents.reported[0]@11" in r.getMessage() for r in caplog.records)


def _overflowing_report() -> bytes:
    data = json.loads(encode_event(_report_n(99)))
    data["occurred_at"] = "0001-01-01T00:00:00+14:00"  # before year 1 once turned to UTC
    return json.dumps(data).encode()


def _applied(runtime: Any) -> int:
    with UnitOfWork(runtime.engine) as uow:
        return len(uow.session.exec(select(ProcessedEvent)).all())


async def test_a_timestamp_that_overflows_is_dead_lettered_and_the_rest_of_its_batch_applied(runtime: Any) -> None:
    """Decoding it raised OverflowError, not a DecodeError: the agent crashed, faust restarted it, the batch came
    again and crashed it again, and the six valid reports of the same burst never got a case."""
    values = [encode_event(_report_n(n)) for n in range(6)]
    values.insert(3, _overflowing_report())
    await asyncio.wait_for(runtime.process_batch([_Message(v, i) for i, v in enumerate(values)]), timeout=10)
    assert _applied(runtime) == 6
    [(kind, reason)] = runtime.letters
    assert kind == "decode" and reason.startswith("invalid IncidentReported")
    await asyncio.wait_for(runtime.process(_Message(_overflowing_report(), 9)), timeout=10)  # alone, the same
    assert [k for k, _ in runtime.letters] == ["decode", "decode"]


async def test_the_consumer_goes_on_after_a_record_that_overflows(runtime: Any) -> None:
    agent = runtime.app.agents["dispatch-consumer"]
    async with agent.test_context() as ctx:
        for n in range(3):
            await asyncio.wait_for(ctx.put(encode_event(_report_n(n))), timeout=10)
        await asyncio.wait_for(ctx.put(_overflowing_report()), timeout=10)
        for n in range(3, 6):
            await asyncio.wait_for(ctx.put(encode_event(_report_n(n))), timeout=10)
    assert _applied(runtime) == 6 and [k for k, _ in runtime.letters] == ["decode"]


@pytest.mark.parametrize(
    "error",
    [RecursionError("maximum recursion depth exceeded"), MemoryError(), SystemError("bad argument")],
    ids=lambda e: type(e).__name__,
)
async def test_whatever_decoding_raises_the_record_is_dead_lettered_and_its_batch_applied(
    runtime: Any, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """Not only a DecodeError: any exception from decoding sets the record aside with the reason."""
    from schemas import decode_event as real
    from services.common import consumer

    bad = b'{"poison": true}'

    def decode_event(raw: Any) -> Any:
        if raw == bad:
            raise error
        return real(raw)

    monkeypatch.setattr(consumer, "decode_event", decode_event)
    values = [encode_event(_report_n(1)), bad, encode_event(_report_n(2))]
    await asyncio.wait_for(runtime.process_batch([_Message(v, i) for i, v in enumerate(values)]), timeout=10)
    assert _applied(runtime) == 2
    [(kind, reason)] = runtime.letters
    assert kind == "decode" and reason.startswith(f"undecodable record: {type(error).__name__}")


@pytest.mark.parametrize(
    "error",
    [
        OverflowError("date value out of range"),
        OSError(75, "Value too large for defined data type"),
        TimeoutError("timed out"),
        ConnectionResetError("reset"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_whatever_a_handler_raises_the_record_is_dead_lettered_not_retried_for_ever(
    runtime: Any, error: Exception
) -> None:
    """Only the database's own outage (OperationalError, InterfaceError) is waited out: anything else a handler
    raises on a record would be raised again at every retry, holding up every later record for ever."""
    real = runtime.bus.handlers[ev.IncidentReported]

    def handler(event: Any, uow: Any) -> None:
        if event.incident_id == "GL-B2":
            raise error
        real(event, uow)

    runtime.bus.handlers[ev.IncidentReported] = handler
    values = [encode_event(_report_n(n)) for n in range(1, 5)]
    await asyncio.wait_for(runtime.process_batch([_Message(v, i) for i, v in enumerate(values)]), timeout=15)
    assert _applied(runtime) == 3
    [(kind, reason)] = runtime.letters
    assert kind == "error" and type(error).__name__ in reason
