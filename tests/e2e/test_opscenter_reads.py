"""A slow read of the operations center delays neither the live fold nor its other requests: over the real broker.

opscenter runs as its own process (tests/e2e/_slow_opscenter.py) with one read made slow: the KPIs' holds its
unit of work open for 4 s. While one is under way, lifecycle events are published to the log, and the time until
each is folded into the read model (seen in its database) is measured, as is another request's answer. Both stay
well under the slow read's duration: the read runs in a read thread, not on the event loop that consumes the log
and answers requests (with the read on the loop, each event would wait for the rest of the 4 s).
"""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from schemas import Actor, ActorKind, Location, encode_event
from schemas import events as ev
from schemas.reference import GAOHANG
from schemas.topics import LIFECYCLE
from services.supervisor import Service, ServiceGroup
from tests.kafka_support import Tokens, fresh_namespace, producer, require_broker, service_env

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
SLOW_S = 4.0


@dataclass(frozen=True, slots=True)
class _SlowOpscenter(Service):
    """opscenter, started through the module that makes its KPIs' read slow."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tests.e2e._slow_opscenter"]


@dataclass
class Slow:
    url: str
    token: str
    db: Path
    mark: Path


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slow]:
    require_broker()
    ns = fresh_namespace("slowread")
    var = tmp_path_factory.mktemp("slowread")
    mark = var / "slow-read-began"
    env = service_env(
        ns,
        var,
        base_port=28500,
        GRIDLOOP_TEST_SLOW_READ_S=str(SLOW_S),
        GRIDLOOP_TEST_SLOW_READ_MARK=str(mark),
        PYTHONPATH=str(ROOT),
    )
    token = Tokens(var).ops_center
    group = ServiceGroup(var / "logs")
    (var / "logs").mkdir(exist_ok=True)
    service = _SlowOpscenter("opscenter")
    try:
        group.start(service, env)
        group.wait_healthy(180)
        yield Slow(service.url(env), token, var / "db" / "opscenter.sqlite", mark)
    finally:
        group.stop()


def _report(incident_id: str) -> bytes:
    lat, lon = GAOHANG.grids["gh05"].center
    return encode_event(
        ev.IncidentReported(
            incident_id=incident_id,
            actor=Actor(kind=ActorKind.GRID_WORKER, id="w-gh05-1"),
            correlation_id=incident_id,
            occurred_at=datetime.now(UTC),
            source="grid_worker",
            category_code="exposed_garbage",
            location=Location(lat=lat, lon=lon),
            description="路边暴露垃圾",
            reporter_id="w-gh05-1",
            client_report_id=incident_id,
        )
    )


def _folded(db: Path, incident_id: str) -> bool:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT 1 FROM ops_incident WHERE incident_id = ?", (incident_id,)).fetchone()
    except sqlite3.OperationalError:  # the table is not there yet
        return False
    return row is not None


def _publish_and_time_the_fold(db: Path, incident_id: str, timeout: float) -> float:
    """Publish the report of ``incident_id`` to the lifecycle log; seconds until opscenter has folded it."""
    out = producer()
    try:
        out.send(LIFECYCLE.name, key=incident_id.encode(), value=_report(incident_id)).get(timeout=30)
        sent = time.monotonic()
    finally:
        out.close()
    while not _folded(db, incident_id):
        if time.monotonic() - sent > timeout:
            raise AssertionError(f"{incident_id} was not folded within {timeout:.0f} s")
        time.sleep(0.02)
    return time.monotonic() - sent


def test_a_slow_read_delays_neither_the_fold_nor_other_requests(slow: Slow) -> None:
    # the consumer has joined its group and folds: a first event goes through before anything is measured
    _publish_and_time_the_fold(slow.db, "GL-SLOWREAD-0", timeout=90)
    auth = Tokens.bearer(slow.token)
    answered: dict[str, float] = {}

    def slow_read() -> None:
        started = time.monotonic()
        r = httpx.get(f"{slow.url}/api/kpis", params={"period": "month", "by": "grid"}, headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        answered["kpis"] = time.monotonic() - started

    reader = threading.Thread(target=slow_read)
    reader.start()
    deadline = time.monotonic() + 10
    while not slow.mark.exists():
        assert time.monotonic() < deadline, "the slow read never began"
        time.sleep(0.01)
    began = time.monotonic()

    lags = [_publish_and_time_the_fold(slow.db, f"GL-SLOWREAD-{n}", timeout=60) for n in (1, 2)]
    started = time.monotonic()
    grids = httpx.get(f"{slow.url}/api/map/grids", headers=auth, timeout=60)
    other = time.monotonic() - started
    measured_by = time.monotonic() - began
    reader.join(60)

    assert max(lags) < SLOW_S / 2, f"the fold took {lags} s while a read ran"
    assert other < SLOW_S / 2, f"another request took {other:.2f} s while a read ran"
    assert grids.status_code == 200 and sum(f["properties"]["open"] for f in grids.json()["features"]) == 3
    # and all of it while the slow read was under way
    assert answered.get("kpis", 0.0) >= SLOW_S and measured_by < SLOW_S, (answered, measured_by)
