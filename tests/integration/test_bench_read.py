"""The read benchmark end to end at a tiny size, over the real broker: a history published to a topic of its own,
the read model rebuilt and served, every read endpoint answered 200, the live fold's lag measured; the result's
shape as its last line gives it (no figure is judged: speed is the benchmark's to measure)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from services.bench.read import endpoints
from tests.kafka_support import PORT_OFFSET, require_broker

pytestmark = pytest.mark.kafka

BASE_PORT = 28500


@pytest.mark.timeout(900)
def test_bench_read_rebuilds_a_small_history_and_every_read_answers(tmp_path: Path) -> None:
    bootstrap = require_broker()
    env = {**os.environ, "GRIDLOOP_LOG_LEVEL": "warning"}
    env.pop("GRIDLOOP_TOPIC_NAMESPACE", None)
    command = [
        sys.executable,
        "-m",
        "services.bench",
        "read",
        "--incidents",
        "300",
        "--repeats",
        "2",
        "--live-s",
        "4",
        "--live-rate",
        "50",
        "--refresh-s",
        "1",
        "--bootstrap",
        bootstrap,
        "--base-port",
        str(BASE_PORT + PORT_OFFSET),
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert result["bench"] == "read" and result["incidents"] == 300
    history = result["history"]
    assert history["events"] > 300 * 7
    assert history["generate_events_per_s"] > 0 and history["publish_events_per_s"] > 0
    expected = {"sqlite", "postgresql"} if os.environ.get("GRIDLOOP_TEST_POSTGRES_URL") else {"sqlite"}
    assert set(result["databases"]) == expected
    reads = {e.name: e.path for e in endpoints(*_days(result))}
    for label, round_ in result["databases"].items():
        rebuilt = round_["rebuild"]
        assert rebuilt["events"] >= history["events"], label
        assert rebuilt["db_bytes"] > 0 and rebuilt["bytes_per_event"] > 0 and rebuilt["peak_rss_mb"] > 0
        assert {name: t["path"] for name, t in round_["endpoints"].items()} == reads
        for name, timing in round_["endpoints"].items():
            assert timing["status"] == {"200": 2}, (label, name, timing)
            assert timing["bytes"] > 0 and timing["p50_ms"] <= timing["p99_ms"] <= timing["max_ms"]
        assert round_["errors"] == 0
        live = round_["live"]
        assert live["events"] == 200 and live["unfolded"] == 0, live
        assert live["lag_ms"]["n"] == 200 and live["lag_ms"]["p50"] is not None
        assert live["dashboard_refreshes"] >= 1 and live["dashboard_errors"] == 0
    assert list(tmp_path.glob("*/result.json")), "the result is kept on disk"


def _days(result: dict[str, Any]) -> tuple[date, date]:
    """The days the run read its KPIs at (the history's last and middle), from the paths it reports."""
    paths = [t["path"] for t in next(iter(result["databases"].values()))["endpoints"].values()]
    days = sorted({date.fromisoformat(p.rsplit("at=", 1)[1]) for p in paths if "at=" in p})
    return days[-1], days[0]
