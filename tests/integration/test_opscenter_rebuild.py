"""The operations center's rebuild over the real broker, on a synthetic history of a few thousand incidents:

- folded live by the running service and rebuilt from the log, the two read models hold the same rows, table by
  table;
- a rebuild killed midway and run again gives the rows of one never interrupted;
- a rebuild following the log while the service folds it is swapped into the running service with nothing lost
  and nothing counted twice, events still arriving;
- the same on PostgreSQL (where GRIDLOOP_TEST_POSTGRES_URL names a server).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from schemas import Event
from schemas.topics import LIFECYCLE
from services.bench.history import lifecycle, publish
from services.common.db import make_engine
from services.opscenter.rebuild import Options, run
from services.opscenter.store import log_positions
from tests.kafka_support import BOOTSTRAP, Tokens, fresh_namespace, producer, require_broker, running, service_env
from tests.read_models import count, differences, read_model_rows, wait_for_count

pytestmark = pytest.mark.kafka

BASE_PORT = 28600
QUIET = Options(progress=False)


def _live_url(var: Path) -> str:
    return f"sqlite:///{var / 'db' / 'opscenter.sqlite'}"


def _history(incidents: int, seed: int) -> list[Event]:
    return list(lifecycle(incidents, seed=seed, days=120))


def _publish_slowly(events: Sequence[Event], chunks: int, pause_s: float) -> threading.Thread:
    """Publish ``events`` in ``chunks`` pieces, ``pause_s`` apart, from a thread (events arriving meanwhile)."""
    size = -(-len(events) // chunks)

    def go() -> None:
        for start in range(0, len(events), size):
            publish(events[start : start + size], BOOTSTRAP)
            time.sleep(pause_s)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def _rebuild_command(url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "services.opscenter", "rebuild", "--database-url", url, "--quiet", *extra]


def _cli_env(ns: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "GRIDLOOP_KAFKA_BOOTSTRAP": BOOTSTRAP, "GRIDLOOP_TOPIC_NAMESPACE": ns, **extra}


def test_the_rebuilt_read_model_holds_the_rows_of_the_live_one(tmp_path: Path) -> None:
    require_broker()
    ns = fresh_namespace("rbeq")
    var = tmp_path / "live"
    env = service_env(ns, var, base_port=BASE_PORT)
    events = _history(3000, seed=7)
    with running(env, var, services=["opscenter"]):
        assert publish(events, BOOTSTRAP) == len(events)
        raw = producer()  # two records no consumer can decode: the live one dead-letters them
        try:
            raw.send(LIFECYCLE.name, key=b"GL-X", value=b"not an event")
            raw.send(LIFECYCLE.name, key=b"GL-Y", value=b'{"type": "IncidentReported"}')
            raw.flush()
        finally:
            raw.close()
        wait_for_count(_live_url(var), "processed_event", len({e.event_id for e in events}))
    rebuilt = f"sqlite:///{tmp_path / 'rebuilt.sqlite'}"
    outcome = run(BOOTSTRAP, rebuilt, options=Options(workers=2, batch=2000, progress=False))
    assert (outcome.applied, outcome.skipped, outcome.stopped) == (len(events), 2, False)
    live, again = read_model_rows(_live_url(var)), read_model_rows(rebuilt)
    assert live["ops_incident"] and live["ops_work_order"]
    assert not differences(live, again), differences(live, again)


def test_a_rebuild_killed_midway_resumes_to_the_rows_an_uninterrupted_one_gives(tmp_path: Path) -> None:
    require_broker()
    ns = fresh_namespace("rbkill")
    events = _history(3000, seed=11)
    publish(events, BOOTSTRAP)
    url = f"sqlite:///{tmp_path / 'killed.sqlite'}"
    engine = make_engine(url)
    cli = subprocess.Popen(
        _rebuild_command(url, "--batch", "500", "--workers", "2"),
        env=_cli_env(ns),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while sum(_positions(engine).values()) < 2000:
            assert cli.poll() is None, f"the rebuild ended before it was killed: {cli.communicate()[1]!r}"
            assert time.monotonic() < deadline, "the rebuild recorded no position"
            time.sleep(0.02)
        os.killpg(cli.pid, signal.SIGKILL)
        cli.wait(10)
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
    time.sleep(0.5)  # a worker still writing sees its parent gone and stops after its batch
    killed_at = _positions(engine)
    assert 0 < sum(killed_at.values()) < len(events), f"killed at {killed_at} of {len(events)}"
    engine.dispose()

    resumed = run(BOOTSTRAP, url, options=Options(batch=500, progress=False))
    assert resumed.resumed and not resumed.stopped
    assert resumed.started_at == killed_at
    assert sum(resumed.positions.values()) == len(events)
    fresh = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    run(BOOTSTRAP, fresh, options=QUIET)
    a, b = read_model_rows(url), read_model_rows(fresh)
    assert not differences(a, b), differences(a, b)


def _positions(engine: sa.engine.Engine) -> dict[int, int]:
    try:
        return log_positions(engine).get(LIFECYCLE.name, {})
    except sa.exc.OperationalError:  # the file is being made
        return {}


def test_a_rebuild_that_stopped_after_some_records_goes_on_from_there(tmp_path: Path) -> None:
    require_broker()
    fresh_namespace("rbstop")
    events = _history(800, seed=13)
    publish(events, BOOTSTRAP)
    url = f"sqlite:///{tmp_path / 'stopped.sqlite'}"
    first = run(BOOTSTRAP, url, options=Options(workers=1, batch=1000, stop_after=2500, progress=False))
    assert first.stopped and 2500 <= first.applied < len(events)
    second = run(BOOTSTRAP, url, options=Options(workers=1, batch=1000, progress=False))
    assert second.started_at == first.positions and first.applied + second.applied == len(events)
    fresh = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    run(BOOTSTRAP, fresh, options=QUIET)
    a, b = read_model_rows(url), read_model_rows(fresh)
    assert not differences(a, b), differences(a, b)


def test_a_following_rebuild_is_swapped_into_the_running_service_losing_and_doubling_nothing(
    tmp_path: Path,
) -> None:
    require_broker()
    ns = fresh_namespace("rbswap")
    var = tmp_path / "live"
    env = service_env(ns, var, base_port=BASE_PORT)
    tokens = Tokens(var)
    history = _history(4000, seed=5)
    third = len(history) // 3
    before, during, after = history[:third], history[third : 2 * third], history[2 * third :]
    rebuilt = f"sqlite:///{tmp_path / 'rebuilt.sqlite'}"
    with running(env, var, services=["opscenter"]) as group:
        base = group.urls["opscenter"]
        publish(before, BOOTSTRAP)
        wait_for_count(_live_url(var), "processed_event", len(before))
        arriving = _publish_slowly(during, chunks=8, pause_s=0.5)  # the log grows while the rebuild follows it
        swap = subprocess.run(
            _rebuild_command(rebuilt, "--batch", "1000", "--swap", base, "--hold-s", "60"),
            env=_cli_env(ns, GRIDLOOP_ADMIN_TOKEN=tokens.admin),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert swap.returncode == 0, swap.stderr
        assert "swapped in" in swap.stderr
        arriving.join(120)
        publish(after, BOOTSTRAP)
        wait_for_count(rebuilt, "processed_event", len(history))  # the service folds into the rebuilt model now
        state = httpx.get(f"{base}/admin/read-model", headers=Tokens.bearer(tokens.admin), timeout=10).json()
        assert state["database"] == rebuilt and state["held"] is False
        assert (var / "db" / "opscenter.read-model").read_text().strip() == rebuilt
        time.sleep(1.0)  # anything applied twice would show in a moment
    left_behind = count(_live_url(var), "processed_event")
    assert len(before) < left_behind < len(history)  # it folded some of what arrived, then stopped at the swap
    assert log_positions(make_engine(rebuilt)) == {}  # the live one now: its consumer group's offsets rule
    fresh = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    run(BOOTSTRAP, fresh, options=QUIET)
    a, b = read_model_rows(rebuilt), read_model_rows(fresh)
    assert not differences(a, b), differences(a, b)


# -- PostgreSQL ------------------------------------------------------------------------------------------------------

PG_URL = os.environ.get("GRIDLOOP_TEST_POSTGRES_URL", "")


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of its own (made and dropped here: other tests use the server's default one)."""
    if not PG_URL:
        if os.environ.get("CI"):
            pytest.fail("GRIDLOOP_TEST_POSTGRES_URL is not set: CI must run these tests on PostgreSQL")
        pytest.skip("GRIDLOOP_TEST_POSTGRES_URL not set (start one with infra/postgres/pg.sh up)")
    server = make_engine(PG_URL).execution_options(isolation_level="AUTOCOMMIT")
    name = f"gridloop_rebuild_{uuid.uuid4().hex[:8]}"
    with server.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.engine.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with server.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        server.dispose()


@pytest.mark.postgres
def test_a_rebuild_into_postgresql_holds_the_rows_of_one_into_sqlite(pg_database: str, tmp_path: Path) -> None:
    require_broker()
    fresh_namespace("rbpg")
    events = _history(1500, seed=17)
    publish(events, BOOTSTRAP)
    stopped = run(BOOTSTRAP, pg_database, options=Options(workers=2, batch=1000, stop_after=4000, progress=False))
    assert stopped.stopped
    resumed = run(BOOTSTRAP, pg_database, options=Options(workers=2, batch=1000, progress=False))
    assert resumed.resumed and stopped.applied + resumed.applied == len(events)
    sqlite = f"sqlite:///{tmp_path / 'rebuilt.sqlite'}"
    run(BOOTSTRAP, sqlite, options=QUIET)
    a, b = read_model_rows(pg_database), read_model_rows(sqlite)
    assert a["ops_incident"] and not differences(a, b), differences(a, b)
