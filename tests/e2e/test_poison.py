"""No record can stall the loop: a property over the real broker, with every service running.

Mutated and oversized records — truncated JSON, fields of the wrong type, timestamps that overflow, strings far
over their bounds, binary, no value, a huge key, ~800 KB of binary and 180 KB of 0x01 bytes (1 MB once JSON
escapes them) — are sent into every topic some service consumes, while normal incidents are under way; then the
normal incidents are driven to closed through the public APIs. Every poison record must be on the dead-letter
topic, once for each service that consumes its topic, with a reason, its size and hash; every normal incident
must close. ``GRIDLOOP_POISON_EXAMPLES`` examples (1-3 records each) on top of the fixed ones.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from schemas import Actor, ActorKind, Event, Location, encode_event
from schemas import events as ev
from schemas.reference import GAOHANG
from schemas.topics import DEADLETTER, Topic
from tests.e2e.conftest import Town
from tests.kafka_support import Tokens, consumer, fresh_namespace, producer, require_broker, running, service_env

pytestmark = pytest.mark.kafka

EXAMPLES = int(os.environ.get("GRIDLOOP_POISON_EXAMPLES", "50"))
SERVICES = ("intake", "dispatch", "handling", "verification", "opscenter")


def _consumers() -> dict[str, tuple[Topic, list[str]]]:
    """Every consumed topic (by suffix) and the services that consume it, from each service's agents."""
    found: dict[str, tuple[Topic, list[str]]] = {}
    for service in SERVICES:
        for topic in importlib.import_module(f"services.{service}.agents").CONSUMES:
            found.setdefault(topic.suffix, (topic, []))[1].append(service)
    return found


CONSUMED = _consumers()


def _samples() -> dict[str, list[Event]]:
    """A valid event of each type a consumed topic carries (of an incident nobody reported): what is mutated."""
    now = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
    lat, lon = GAOHANG.grids["gh03"].center
    location = Location(lat=lat, lon=lon, address="华高路 3 号")
    report = ev.IncidentReported(
        incident_id="GL-POISON-1",
        occurred_at=now,
        actor=Actor(kind=ActorKind.GRID_WORKER, id="w-gh03-1"),
        correlation_id="GL-POISON-1",
        source=ev.Source.GRID_WORKER,
        category_code="exposed_garbage",
        location=location,
        description="路边暴露垃圾",
        reporter_id="w-gh03-1",
        client_report_id="poison-1",
    )
    system = Actor.system("dispatch")
    staff = Actor(kind=ActorKind.DEPARTMENT, id="staff-city_ops", department="city_ops")
    dispatched = ev.WorkOrderDispatched.following(
        report,
        system,
        work_order_id="GL-POISON-1-1",
        department_code="city_ops",
        role=ev.WorkOrderRole.LEAD,
        category_code="exposed_garbage",
        grid_id="gh03",
        location=location,
        description=report.description,
        priority=3,
        deadline=now,
        attempt=1,
    )
    accepted = ev.WorkOrderAccepted.following(report, staff, work_order_id="GL-POISON-1-1", department_code="city_ops")
    handled = ev.WorkOrderHandled.following(
        report,
        staff,
        work_order_id="GL-POISON-1-1",
        department_code="city_ops",
        result="已清运",
        evidence_urls=["https://evidence.example/after.jpg"],
    )
    requested = ev.VerificationRequested.following(
        report,
        system,
        verification_id="GL-POISON-1-v1",
        grid_id="gh03",
        worker_id="w-gh03-2",
        category_code="exposed_garbage",
        location=location,
        description=report.description,
        work_order_ids=["GL-POISON-1-1"],
    )
    closed = ev.IncidentClosed.following(
        report,
        system,
        category_code="exposed_garbage",
        grid_id="gh03",
        departments=["city_ops"],
        reported_at=now,
        deadline=now,
        on_time=True,
        rework_count=0,
        return_count=0,
    )
    every = [report, dispatched, accepted, handled, requested, closed]
    return {
        suffix: [e for e in every if topic.value_types and isinstance(e, topic.value_types)]
        for suffix, (topic, _) in CONSUMED.items()
    }


SAMPLES = _samples()
OVERFLOWING = ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"]
OVERSIZED: dict[str, Callable[[int], bytes]] = {
    "800 KB of binary": lambda seed: random.Random(seed).randbytes(800 * 1024),
    "180 KB of 0x01": lambda seed: b"\x01" * (180 * 1024 + seed % 1024),
}


@dataclass(frozen=True)
class Poison:
    suffix: str
    kind: str
    key: bytes
    value: bytes | None


def _fields(draw: st.DrawFn, suffix: str) -> dict[str, Any]:
    return dict(json.loads(encode_event(draw(st.sampled_from(SAMPLES[suffix])))))


@st.composite
def poison(draw: st.DrawFn) -> Poison:
    """One record no consumer can apply, on a consumed topic."""
    suffix = draw(st.sampled_from(sorted(CONSUMED)))
    key = f"GL-POISON-{draw(st.integers(0, 10**6))}".encode()
    kind = draw(
        st.sampled_from(
            [
                "truncated JSON",
                "wrong type",
                "overflowing timestamp",
                "huge string",
                "binary",
                "oversized",
                "no value",
                "huge key",
            ]
        )
    )
    value: bytes | None
    if kind == "truncated JSON":
        raw = encode_event(draw(st.sampled_from(SAMPLES[suffix])))
        value = raw[: draw(st.integers(0, len(raw) - 1))]
    elif kind == "wrong type":
        data = _fields(draw, suffix)
        # never valid for any field: not a string, number, date, list or any model's fields
        data[draw(st.sampled_from(sorted(data)))] = {"poison": [1]}
        value = json.dumps(data).encode()
    elif kind == "overflowing timestamp":
        data = _fields(draw, suffix)
        stamps = sorted(k for k, v in data.items() if k.endswith("_at") or k == "deadline")
        data[draw(st.sampled_from(stamps))] = draw(st.sampled_from(OVERFLOWING))
        value = json.dumps(data).encode()
    elif kind == "huge string":
        data = _fields(draw, suffix)
        data[draw(st.sampled_from(["event_id", "incident_id", "correlation_id"]))] = draw(
            st.sampled_from(["x", "路", "\x01"])
        ) * draw(st.integers(100, 120_000))
        value = json.dumps(data, ensure_ascii=draw(st.booleans())).encode()
    elif kind == "binary":
        value = draw(st.binary(min_size=1, max_size=2000))
    elif kind == "oversized":
        kind = draw(st.sampled_from(sorted(OVERSIZED)))
        value = OVERSIZED[kind](draw(st.integers(0, 2**32)))
    elif kind == "no value":
        value = None
    else:
        key = b"k" * draw(st.integers(2 * 1024, 300 * 1024))
        value = b"{" + b"\x00" * draw(st.integers(0, 100))
    return Poison(suffix, kind, key, value)


@dataclass
class Sent:
    poison: Poison
    topic: str
    partition: int
    offset: int


@pytest.fixture(scope="module")
def plant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Town, str]]:
    require_broker()
    ns = fresh_namespace("poison")
    var = tmp_path_factory.mktemp("poison")
    env = service_env(ns, var, base_port=28400)
    tokens = Tokens(var)
    with running(env, var):
        yield Town(env, tokens), ns


def test_no_record_can_stall_the_loop(plant: tuple[Town, str]) -> None:
    town, ns = plant
    sent: list[Sent] = []
    out = producer()

    def send(p: Poison) -> None:
        meta = out.send(f"{ns}.{p.suffix}", key=p.key, value=p.value).get(timeout=30)
        sent.append(Sent(p, meta.topic, meta.partition, meta.offset))

    # normal incidents under way while the poison comes, each at a spot of its own (never merged)
    spots = [GAOHANG.grids[g].center for g in ("gh01", "gh02", "gh05", "gh06")]
    incidents = [town.report("exposed_garbage", lat, lon) for lat, lon in spots]

    # every consumed topic gets each oversized record and a timestamp that overflows, whatever is drawn below
    for suffix in sorted(CONSUMED):
        for kind, make in OVERSIZED.items():
            send(Poison(suffix, kind, b"GL-POISON-FIXED", make(len(suffix))))
        data = json.loads(encode_event(SAMPLES[suffix][0]))
        data["occurred_at"] = OVERFLOWING[0]
        send(Poison(suffix, "overflowing timestamp", b"GL-POISON-FIXED", json.dumps(data).encode()))

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(st.lists(poison(), min_size=1, max_size=3))
    def send_poison(records: list[Poison]) -> None:
        for p in records:
            send(p)

    try:
        send_poison()
    finally:
        out.close()

    for iid in incidents:
        [order] = town.work_orders(iid)
        town.accept_and_handle(order)
        town.verify(iid, passed=True)
    for iid in incidents:
        assert town.wait_for(iid, status="closed")["status"] == "closed"

    expected = {(s.topic, s.partition, s.offset, service): s for s in sent for service in CONSUMED[s.poison.suffix][1]}
    letters = _dead_letters(f"{ns}.{DEADLETTER.suffix}", set(expected), timeout=60)
    missing = sorted((s.poison.kind, s.topic, k[3]) for k, s in expected.items() if k not in letters)
    assert not missing, f"{len(missing)} of {len(expected)} poison records not dead-lettered: {missing[:10]}"
    for k, s in expected.items():
        letter = letters[k]
        assert letter["reason"], (s.poison.kind, letter)
        value = s.poison.value
        assert letter["value_bytes"] == (None if value is None else len(value))
        assert letter["value_sha256"] == (None if value is None else hashlib.sha256(value).hexdigest())


def _dead_letters(topic: str, wanted: set[tuple[str, int, int, str]], timeout: float) -> dict[Any, dict[str, Any]]:
    """The dead letters of ``topic`` by (source topic, partition, offset, service), read until every one
    ``wanted`` is there or ``timeout`` has passed."""
    found: dict[Any, dict[str, Any]] = {}
    c = consumer(topic)
    deadline = time.monotonic() + timeout
    try:
        while not wanted <= found.keys() and time.monotonic() < deadline:
            for batch in c.poll(timeout_ms=500).values():
                for record in batch:
                    letter = json.loads(record.value)
                    found[(letter["source_topic"], letter["partition"], letter["offset"], letter["service"])] = letter
    finally:
        c.close()
    return found
