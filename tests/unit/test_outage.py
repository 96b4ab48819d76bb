"""Broker or database down, without a broker: intake never accepts a report it cannot make durable, and never
loses one it has accepted.

With Kafka down a report is committed to intake's database with its outbox record, answered 202 at once, and
published when the broker is back. With the database down nothing can be recorded: the API answers 503 with the
reason. A consumer retries a database that is down (with backoff) but parks a record whose handler fails for
good on the dead-letter topic rather than retrying it for ever.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import col, select

from schemas import Actor, Location, decode_event, encode_event
from schemas import events as ev
from schemas.topics import topics_for
from services.common.auth import Role
from services.common.db import OutboxRecord, UnitOfWork
from services.common.runtime import Runtime
from services.intake.agents import CONSUMES, HANDLERS
from services.intake.api import build_api
from services.intake.models import TABLES, IntakeIncident
from services.intake.settings import IntakeSettings


class FlakyPublisher:
    """A Publisher whose broker is down until ``up`` is set: connecting and sending fail (or hang) meanwhile."""

    def __init__(self, *, hang: bool = False) -> None:
        self.up = False
        self.hang = hang
        self.started = False
        self.sent: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]] = []
        self.attempts = 0

    async def _broker(self) -> None:
        self.attempts += 1
        if self.up:
            return
        if self.hang:  # a broker that stopped answering: each request waits for its timeout
            await asyncio.sleep(3)
            raise KafkaTimeoutError("request timed out")
        raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9092)]")

    async def start(self) -> None:
        await self._broker()
        self.started = True

    async def stop(self) -> None:
        self.started = False

    async def send_all(self, records: Sequence[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]]) -> None:
        await self._broker()
        self.sent.extend(records)


class Intake:
    def __init__(self, runtime: Runtime, client: httpx.AsyncClient, token: str, db_dir: Path) -> None:
        self.runtime, self.client, self.token, self.db_dir = runtime, client, token, db_dir
        self.n = 0

    async def report(self) -> httpx.Response:
        self.n += 1
        body = {
            "category_code": "exposed_garbage",
            "lat": 31.2851,
            "lon": 121.5752 + self.n * 0.001,
            "description": "路边暴露垃圾",
            "reporter_id": "w-gh01-1",
            "client_report_id": f"outage-{self.n}",
        }
        return await self.client.post("/reports", json=body, headers={"Authorization": f"Bearer {self.token}"})

    def outbox(self) -> list[OutboxRecord]:
        with UnitOfWork(self.runtime.engine) as uow:
            return list(uow.session.exec(select(OutboxRecord).order_by(col(OutboxRecord.id))).all())


@pytest.fixture
async def intake(tmp_path: Path) -> AsyncIterator[Intake]:
    db_dir = tmp_path / "intake-db"
    settings = IntakeSettings(
        var_dir=tmp_path,
        database_url=f"sqlite:///{db_dir / 'intake.sqlite'}",
        auth_database_url=f"sqlite:///{tmp_path / 'auth' / 'auth.sqlite'}",
        kafka_bootstrap="127.0.0.1:1",
    )
    runtime = Runtime(settings, TABLES, HANDLERS, consumes=CONSUMES)
    runtime.init_db()
    publisher = FlakyPublisher()
    runtime.publisher = runtime.relay.publisher = publisher  # type: ignore[assignment]
    token, _ = runtime.auth.issue(Role.GRID_WORKER, "w-gh01-1")
    transport = httpx.ASGITransport(app=build_api(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://intake") as client:
        yield Intake(runtime, client, token, db_dir)
    runtime.engine.dispose()


def _publisher(intake: Intake) -> FlakyPublisher:
    assert isinstance(intake.runtime.publisher, FlakyPublisher)
    return intake.runtime.publisher


# -- Kafka down -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hang", [False, True], ids=["refused", "hanging"])
async def test_with_kafka_down_a_report_is_accepted_kept_in_the_outbox_and_published_when_it_is_back(
    intake: Intake, hang: bool
) -> None:
    publisher = _publisher(intake)
    publisher.hang = hang
    started = time.monotonic()
    r = await intake.report()
    assert r.status_code == 202, r.text
    assert time.monotonic() - started < intake.runtime.flush_wait_s + 2, "the answer must not wait for the broker"
    incident_id = r.json()["incident_id"]
    [pending] = intake.outbox()
    assert (pending.incident_id, pending.type, pending.published_at) == (incident_id, "IncidentReported", None)
    assert publisher.sent == []

    publisher.up, publisher.hang = True, False
    deadline = time.monotonic() + 30
    while intake.runtime.relay.pending():  # the outbox timer's job, run by hand
        assert time.monotonic() < deadline, "the outbox was never published"
        await intake.runtime.flush_outbox()
        await asyncio.sleep(0.05)
    assert sorted(topic for topic, *_ in publisher.sent) == sorted(t.name for t in topics_for("IncidentReported"))
    for _, key, value, headers in publisher.sent:
        event = decode_event(value)
        assert (key, event.incident_id, headers) == (incident_id.encode(), incident_id, [("type", b"IncidentReported")])
    [published] = intake.outbox()
    assert published.published_at is not None


async def test_the_relay_keeps_what_it_could_not_send_and_sends_it_once_when_the_broker_is_back(
    intake: Intake,
) -> None:
    publisher = _publisher(intake)
    publisher.up = True
    await intake.runtime.flush_outbox()  # connected once: later failures are sends, not connects
    publisher.up = False
    for _ in range(3):
        assert (await intake.report()).status_code == 202
    relay = intake.runtime.relay
    with pytest.raises(KafkaConnectionError):
        await relay.flush()
    assert relay.pending() == 3 and publisher.sent == []
    publisher.up = True
    assert await relay.flush() == 3
    assert await relay.flush() == 0
    assert relay.pending() == 0
    ids = [decode_event(v).incident_id for _, _, v, _ in publisher.sent]
    assert len(ids) == 6 and len(set(ids)) == 3  # every report, each to its topic and the lifecycle log, once


async def test_while_the_broker_is_down_the_outbox_flush_logs_and_retries(
    intake: Intake, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = _publisher(intake)
    with caplog.at_level(logging.WARNING, logger="gridloop"):
        assert (await intake.report()).status_code == 202
        deadline = time.monotonic() + 10
        while publisher.attempts < 3:  # retried with backoff in the background
            assert time.monotonic() < deadline, f"only {publisher.attempts} attempts"
            await asyncio.sleep(0.05)
    assert any("Kafka producer unavailable" in r.getMessage() for r in caplog.records)
    assert any("KafkaConnectionError" in r.getMessage() for r in caplog.records)
    publisher.up = True
    deadline = time.monotonic() + 30
    while intake.runtime.relay.pending():
        assert time.monotonic() < deadline
        await intake.runtime.flush_outbox()
        await asyncio.sleep(0.05)


# -- database down ---------------------------------------------------------------------------------------


def _database_gone(intake: Intake) -> None:
    """The database's folder disappears (a lost volume): no connection can be opened any more."""
    intake.runtime.engine.dispose()
    shutil.rmtree(intake.db_dir)


async def test_with_the_database_down_a_report_is_refused_with_503_and_a_reason(intake: Intake) -> None:
    publisher = _publisher(intake)
    publisher.up = True
    _database_gone(intake)
    r = await intake.report()
    assert r.status_code == 503, r.text
    assert r.json()["error"].startswith("database unavailable")
    assert r.headers.get("Retry-After")
    r = await intake.client.get("/incidents/GL20260601-00000000", headers={"Authorization": f"Bearer {intake.token}"})
    assert r.status_code == 503 and "database unavailable" in r.json()["error"]
    assert publisher.sent == []  # nothing was accepted, so nothing is published

    # back: the client's retry of the same report is accepted once
    intake.db_dir.mkdir()
    intake.runtime.init_db()
    intake.n -= 1
    r = await intake.report()
    assert r.status_code == 202, r.text
    assert len(intake.outbox()) == 1


async def test_with_the_token_store_down_the_answer_is_503_not_401(intake: Intake) -> None:
    intake.runtime.auth.engine.dispose()
    shutil.rmtree(Path(str(intake.runtime.auth.engine.url.database)).parent)
    intake.runtime.auth._cache.clear()
    r = await intake.report()
    assert r.status_code == 503, r.text
    assert "database unavailable" in r.json()["error"]


# -- consumers -------------------------------------------------------------------------------------------


def _reported(incident_id: str = "GL-OUT-1") -> bytes:
    report = ev.IncidentReported(
        incident_id=incident_id,
        actor=Actor(kind="grid_worker", id="w-gh01-1"),
        correlation_id=incident_id,
        source="grid_worker",
        category_code="exposed_garbage",
        location=Location(lat=31.275, lon=121.565),
        description="d",
        reporter_id="w-gh01-1",
        client_report_id="r-1",
    )
    return encode_event(report)


class Message:
    """What the faust agent hands over: a consumed record."""

    def __init__(self, value: bytes) -> None:
        self.topic, self.partition, self.offset = "gridloop.incidents.lifecycle", 0, 7
        self.key, self.value = b"k", value


async def test_a_consumer_retries_while_the_database_is_down_and_applies_the_record_when_it_is_back(
    intake: Intake, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = intake.runtime
    letters: list[str] = []

    async def dead_letter(message: Any, reason: str, *, kind: str) -> None:
        letters.append(reason)

    monkeypatch.setattr(runtime, "dead_letter", dead_letter)
    real = runtime.bus.handle
    failures = {"left": 3}

    def handle(event: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("INSERT ...", {}, Exception("database is locked"))
        return real(event)

    monkeypatch.setattr(runtime.bus, "handle", handle)
    with caplog.at_level(logging.WARNING, logger="gridloop"):
        await asyncio.wait_for(runtime.process(Message(_reported())), timeout=30)
    assert failures["left"] == 0 and letters == []
    assert any("database unavailable" in r.getMessage() for r in caplog.records)
    with UnitOfWork(runtime.engine) as uow:
        assert uow.session.get(IntakeIncident, "GL-OUT-1") is not None


async def test_a_handler_that_fails_for_good_on_the_database_is_dead_lettered_not_retried_for_ever(
    intake: Intake, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = intake.runtime
    letters: list[tuple[str, str]] = []

    async def dead_letter(message: Any, reason: str, *, kind: str) -> None:
        letters.append((kind, reason))

    def handle(event: Any) -> Any:
        raise IntegrityError("INSERT ...", {}, Exception("UNIQUE constraint failed: intake_incident.client_report_id"))

    monkeypatch.setattr(runtime, "dead_letter", dead_letter)
    monkeypatch.setattr(runtime.bus, "handle", handle)
    await asyncio.wait_for(runtime.process(Message(_reported())), timeout=10)
    [(kind, reason)] = letters
    assert kind == "error" and "IntegrityError" in reason and "UNIQUE constraint failed" in reason
