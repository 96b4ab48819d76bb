"""Dead letters over the real broker, with intake, dispatch and handling running: every kind of record that cannot
be processed lands on the dead-letter topic with its reason and origin while the pipeline goes on — a record too
large to carry whole with an excerpt, its size and hash — the admin tool lists them, and a replay sends the
original bytes back to their source — dead-lettered again while still bad, applied once the fix is in."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from schemas import Actor, ActorKind, Location, encode_event
from schemas import events as ev
from schemas.reference import GAOHANG
from schemas.topics import DEADLETTER, FEEDBACK, INCIDENTS_REPORTED, LIFECYCLE, WORKORDERS, Topic
from services.admin import deadletters as dl
from tests.kafka_support import (
    BOOTSTRAP,
    Tokens,
    consumer,
    fresh_namespace,
    producer,
    read_until,
    require_broker,
    running,
    service_env,
)

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]
_GRID_CENTERS = [g.center for g in GAOHANG.grids.values()]
_reports = count()


@dataclass
class Loop:
    ns: str
    env: dict[str, str]
    tokens: Tokens

    def topic(self, t: Topic) -> str:
        """The topic's name in this test's own namespace (whatever other tests set the environment to)."""
        return f"{self.ns}.{t.suffix}"

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.env[f'GRIDLOOP_{service.upper()}_HTTP_PORT']}"

    def produce(self, t: Topic, key: bytes | None, value: bytes) -> tuple[int, int]:
        """Send one raw record; (partition, offset) once the broker has it."""
        p = producer()
        try:
            meta = p.send(self.topic(t), key=key, value=value).get(timeout=10)
        finally:
            p.close()
        return meta.partition, meta.offset

    def dead_letter_of(self, t: Topic, partition: int, offset: int, timeout: float = 60) -> dict[str, Any]:
        def origin(v: Any) -> bool:
            return bool(v["source_topic"] == self.topic(t) and (v["partition"], v["offset"]) == (partition, offset))

        record, letter = read_until(self.topic(DEADLETTER), origin, timeout=timeout)
        letter["dlq_offset"] = record.offset
        return dict(letter)

    def good_report_is_dispatched(self) -> str:
        """The pipeline goes on: a good report still becomes a dispatched work order."""
        n = next(_reports)
        lat, lon = _GRID_CENTERS[n % len(_GRID_CENTERS)]
        lat += 0.0007 * (n // len(_GRID_CENTERS))  # never within the 50 m merge distance of an earlier one
        worker = "w-gh01-1"
        body = {
            "category_code": "garbage_sorting",
            "lat": lat,
            "lon": lon,
            "description": "垃圾分类不规范",
            "reporter_id": worker,
            "client_report_id": f"dlq-{uuid.uuid4().hex[:12]}",
        }
        r = httpx.post(
            f"{self.url('intake')}/reports", json=body, headers=Tokens.bearer(self.tokens.workers[worker]), timeout=10
        )
        assert r.status_code == 202, r.text
        incident_id = str(r.json()["incident_id"])
        read_raw(self.topic(WORKORDERS), lambda r: _incident_of(r.value) == incident_id)  # past records not JSON
        return incident_id

    def handling_has_work_order(self, incident_id: str, timeout: float = 60) -> None:
        """handling took the incident's work order off workorders.dispatched: nothing there holds it up."""
        center = httpx.Client(base_url=self.url("handling"), headers=Tokens.bearer(self.tokens.ops_center), timeout=10)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                orders = center.get("/work-orders", params={"limit": 500}).json()
                if any(o["incident_id"] == incident_id for o in orders):
                    return
                time.sleep(0.2)
        finally:
            center.close()
        raise AssertionError(f"handling never got the work order of {incident_id}")

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "GRIDLOOP_TOPIC_NAMESPACE": self.ns, "GRIDLOOP_KAFKA_BOOTSTRAP": BOOTSTRAP}
        done = subprocess.run(
            [sys.executable, "-m", "services.admin", "deadletters", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return done


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    require_broker()
    ns = fresh_namespace("dlq")
    var = tmp_path_factory.mktemp("deadletters")
    env = service_env(ns, var, base_port=28300)
    tokens = Tokens(var)
    with running(env, var, services=["intake", "dispatch", "handling"]):
        yield Loop(ns, env, tokens)


def _incident_of(value: bytes | None) -> str | None:
    try:
        return str(orjson.loads(value or b"")["incident_id"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def read_raw(topic: str, predicate: Callable[[Any], bool], timeout: float = 60) -> Any:
    """The first record of ``topic`` (any bytes) that satisfies ``predicate``."""
    c = consumer(topic)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for batch in c.poll(timeout_ms=500).values():
                for record in batch:
                    if predicate(record):
                        return record
        raise AssertionError(f"nothing matching on {topic} within {timeout:.0f} s")
    finally:
        c.close()


def _report_event(incident_id: str, **kw: Any) -> ev.IncidentReported:
    lat, lon = GAOHANG.grids["gh05"].center
    fields: dict[str, Any] = {
        "incident_id": incident_id,
        "actor": Actor(kind=ActorKind.GRID_WORKER, id="w-gh05-1"),
        "correlation_id": incident_id,
        "source": ev.Source.GRID_WORKER,
        "category_code": "street_vending",  # city_ops leads; never merged with the good reports (garbage_sorting)
        "location": Location(lat=lat, lon=lon),
        "description": "垃圾分类不规范",
        "reporter_id": "w-gh05-1",
        "client_report_id": f"dlq-{incident_id}",
    }
    fields.update(kw)
    return ev.IncidentReported(**fields)


def _accepted(incident_id: str) -> ev.WorkOrderAccepted:
    return ev.WorkOrderAccepted(
        incident_id=incident_id,
        actor=Actor(kind=ActorKind.DEPARTMENT, id="staff-city_ops", department="city_ops"),
        correlation_id=incident_id,
        work_order_id=f"{incident_id}-1",
        department_code="city_ops",
    )


def _future_version() -> bytes:
    data = json.loads(encode_event(_report_event("DLQ-V2")))
    data["schema_version"] = 2
    return orjson.dumps(data)


def _missing_fields() -> bytes:
    data = json.loads(encode_event(_report_event("DLQ-MISSING")))
    for name in ("category_code", "location", "reporter_id"):
        del data[name]
    return orjson.dumps(data)


def _overflowing_timestamp() -> bytes:
    data = json.loads(encode_event(_report_event("DLQ-OVERFLOW")))
    data["occurred_at"] = "0001-01-01T00:00:00+14:00"  # before year 1 in UTC: an OverflowError in decoding
    return orjson.dumps(data)


BINARY = b"\xff\xfe\x00\x80gridloop\xc3\x28 not UTF-8"

KINDS: dict[str, tuple[Topic, Callable[[], bytes], list[str]]] = {
    "bad JSON": (INCIDENTS_REPORTED, lambda: b"{this is not json", ["malformed JSON"]),
    "unknown schema_version": (
        INCIDENTS_REPORTED,
        _future_version,
        ["unknown schema_version 2 (this build reads 1)"],
    ),
    "missing fields": (
        INCIDENTS_REPORTED,
        _missing_fields,
        ["invalid IncidentReported", "category_code: Field required", "location: Field required"],
    ),
    "unknown incident": (
        FEEDBACK,
        lambda: encode_event(_accepted("DLQ-GHOST")),
        ["UnknownIncident", "no work order DLQ-GHOST-1 for incident DLQ-GHOST"],
    ),
    "non-UTF-8 binary": (INCIDENTS_REPORTED, lambda: BINARY, ["malformed JSON"]),
    "overflowing timestamp": (INCIDENTS_REPORTED, _overflowing_timestamp, ["invalid IncidentReported"]),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_record_that_cannot_be_processed_is_dead_lettered_and_the_pipeline_goes_on(loop: Loop, kind: str) -> None:
    topic, make, reasons = KINDS[kind]
    value = make()
    key = f"dlq-{kind.replace(' ', '-')}-{uuid.uuid4().hex[:6]}".encode()
    partition, offset = loop.produce(topic, key, value)

    letter = loop.dead_letter_of(topic, partition, offset)
    assert letter["service"] == "dispatch"
    for reason in reasons:
        assert reason in letter["reason"], letter["reason"]
    assert (letter["source_topic"], letter["partition"], letter["offset"]) == (loop.topic(topic), partition, offset)
    assert letter["key"] == key.decode()
    assert letter["failed_at"]
    read_back = dl.DeadLetter.from_record(letter["dlq_offset"], orjson.dumps(letter))
    assert read_back.original_value() == value  # the original bytes, exactly: replayable
    assert letter["value_encoding"] == ("base64" if kind == "non-UTF-8 binary" else "utf-8")

    loop.good_report_is_dispatched()


def test_the_admin_tool_lists_dead_letters_with_their_origin(loop: Loop) -> None:
    key = f"dlq-list-{uuid.uuid4().hex[:6]}".encode()
    partition, offset = loop.produce(INCIDENTS_REPORTED, key, BINARY)
    letter = loop.dead_letter_of(INCIDENTS_REPORTED, partition, offset)

    listed = loop.admin("list", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = [r for r in json.loads(listed.stdout) if r["offset"] == letter["dlq_offset"]]
    assert row["source_topic"] == loop.topic(INCIDENTS_REPORTED)
    assert (row["source_partition"], row["source_offset"], row["key"]) == (partition, offset, key.decode())
    assert row["service"] == "dispatch" and "malformed JSON" in row["reason"]
    assert row["value_encoding"] == "base64" and row["value_bytes"] == len(BINARY)
    assert row["value_preview"].startswith(f"<{len(BINARY)} bytes> ff fe 00 80")

    table = loop.admin("list", "--limit", "1")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[1].split()[0] == str(letter["dlq_offset"])  # the latest one
    assert f"{loop.topic(INCIDENTS_REPORTED)}[{partition}]@{offset}" in lines[1]
    assert "value (base64): <" in lines[2]

    later = loop.admin("list", "--json", "--since", "2999-01-01T00:00:00Z")
    assert later.returncode == 0 and json.loads(later.stdout) == []


def test_a_replay_resends_the_original_bytes_and_a_record_still_bad_is_dead_lettered_again(loop: Loop) -> None:
    key = f"dlq-replay-{uuid.uuid4().hex[:6]}".encode()
    partition, offset = loop.produce(INCIDENTS_REPORTED, key, BINARY)
    first = loop.dead_letter_of(INCIDENTS_REPORTED, partition, offset)

    dry = loop.admin("replay", "--offset", str(first["dlq_offset"]), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would replay #{first['dlq_offset']} → {loop.topic(INCIDENTS_REPORTED)}[{partition}]" in dry.stdout

    done = loop.admin("replay", "--offset", str(first["dlq_offset"]))
    assert done.returncode == 0, done.stderr
    assert "replayed 1 of 1 dead letters, 0 skipped" in done.stdout

    marker = str(first["dlq_offset"]).encode()
    again = read_raw(
        loop.topic(INCIDENTS_REPORTED),
        lambda r: r.key == key and (dl.REPLAYED_FROM, marker) in [(k, v) for k, v in r.headers or []],
    )
    assert again.value == BINARY and again.partition == partition and again.offset > offset
    assert f"replayed #{first['dlq_offset']} → {loop.topic(INCIDENTS_REPORTED)}[{partition}]@{again.offset}" in (
        done.stdout
    )
    # still bad: dead-lettered again, same reason, pointing at the replayed record
    second = loop.dead_letter_of(INCIDENTS_REPORTED, partition, again.offset)
    assert second["reason"] == first["reason"] and second["value"] == first["value"]
    assert second["dlq_offset"] > first["dlq_offset"]
    loop.good_report_is_dispatched()


def test_a_replayed_record_is_applied_once_the_fix_is_in(loop: Loop) -> None:
    incident_id = f"DLQ-{uuid.uuid4().hex[:10].upper()}"
    accepted = encode_event(_accepted(incident_id))
    partition, offset = loop.produce(FEEDBACK, incident_id.encode(), accepted)
    letter = loop.dead_letter_of(FEEDBACK, partition, offset)
    assert f"no work order {incident_id}-1 for incident {incident_id}" in letter["reason"]

    # the fix: the incident's report arrives (late), and dispatch sends its work order
    report = encode_event(_report_event(incident_id))
    for t in (LIFECYCLE, INCIDENTS_REPORTED):  # as the outbox does: intake must know it before dispatch answers
        loop.produce(t, incident_id.encode(), report)
    _, order = read_until(loop.topic(WORKORDERS), lambda v: v["incident_id"] == incident_id)
    assert (order["work_order_id"], order["department_code"]) == (f"{incident_id}-1", "city_ops")

    center = httpx.Client(base_url=loop.url("dispatch"), headers=Tokens.bearer(loop.tokens.ops_center), timeout=10)

    def order_status() -> str:
        r = center.get(f"/cases/{incident_id}")
        assert r.status_code == 200, r.text
        return str(r.json()["work_orders"][0]["status"])

    assert order_status() == "dispatched"
    done = loop.admin("replay", "--offset", str(letter["dlq_offset"]))
    assert done.returncode == 0, done.stderr + done.stdout

    deadline = time.monotonic() + 60
    while order_status() != "accepted":
        assert time.monotonic() < deadline, "the replayed WorkOrderAccepted was never applied"
        time.sleep(0.2)
    # applied, not dead-lettered again: the only dead letter naming the incident is the first one
    mine = [
        d for d in dl.read_dead_letters(BOOTSTRAP, loop.topic(DEADLETTER)) if incident_id in d.reason + (d.key or "")
    ]
    assert [d.offset for d in mine] == [letter["dlq_offset"]], [(d.service, d.source, d.reason) for d in mine]
    center.close()


HUGE: dict[str, bytes] = {
    "800 KB of binary": bytes(range(256)) * 3200,
    # valid UTF-8, each byte escaped as \u0001 in JSON: 1.08 MB once wrapped whole in a dead letter
    "180 KB of 0x01": b"\x01" * 180 * 1024,
}


@pytest.mark.parametrize("kind", list(HUGE))
def test_a_record_too_large_to_dead_letter_whole_keeps_an_excerpt_and_later_work_orders_go_on(
    loop: Loop, kind: str
) -> None:
    """Wrapped whole, the dead letter was over the producer's 1 MiB: refused, retried for ever, and every later
    work order waited behind it."""
    value = HUGE[kind]
    key = f"dlq-huge-{uuid.uuid4().hex[:6]}".encode()
    partition, offset = loop.produce(WORKORDERS, key, value)

    letter = loop.dead_letter_of(WORKORDERS, partition, offset, timeout=30)
    assert letter["service"] == "handling" and "malformed JSON" in letter["reason"]
    assert (letter["value_bytes"], letter["value_sha256"]) == (len(value), hashlib.sha256(value).hexdigest())
    assert letter["value_truncated"] and letter["key"] == key.decode()
    excerpt = dl.DeadLetter.from_record(letter["dlq_offset"], orjson.dumps(letter)).excerpt()
    assert excerpt and value.startswith(excerpt)

    loop.handling_has_work_order(loop.good_report_is_dispatched())


def test_a_dead_letter_holding_an_excerpt_is_listed_and_replayed_with_the_original_from_its_source(
    loop: Loop,
) -> None:
    value = HUGE["800 KB of binary"]
    key = f"dlq-huge-replay-{uuid.uuid4().hex[:6]}".encode()
    partition, offset = loop.produce(WORKORDERS, key, value)
    first = loop.dead_letter_of(WORKORDERS, partition, offset, timeout=30)

    listed = loop.admin("list", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = [r for r in json.loads(listed.stdout) if r["offset"] == first["dlq_offset"]]
    assert row["truncated"] and row["value_bytes"] == len(value)
    assert row["value_preview"].startswith(f"<{len(value)} bytes> 00 01 02")

    done = loop.admin("replay", "--offset", str(first["dlq_offset"]))
    assert done.returncode == 0, done.stderr + done.stdout
    assert f"{len(value)} bytes" in done.stdout and "replayed 1 of 1 dead letters, 0 skipped" in done.stdout
    marker = str(first["dlq_offset"]).encode()
    again = read_raw(
        loop.topic(WORKORDERS),
        lambda r: r.key == key and (dl.REPLAYED_FROM, marker) in [(k, v) for k, v in r.headers or []],
    )
    assert again.value == value and again.partition == partition
    second = loop.dead_letter_of(WORKORDERS, partition, again.offset, timeout=30)
    assert second["value_sha256"] == first["value_sha256"] and second["dlq_offset"] > first["dlq_offset"]
