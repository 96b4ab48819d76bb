"""The read benchmark's parts that need no broker: what it reads, how it times and sums up, what it asks of a
read model's database."""

from __future__ import annotations

import json
import sqlite3
from datetime import date
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from fastapi import Depends
from fastapi.routing import APIRoute
from rich.console import Console

from services.bench import _read_db as db
from services.bench._read_report import print_read
from services.bench.read import Endpoint, ReadBench, ReadOptions, Timing, endpoints
from services.opscenter.api import build_api

LAST, MIDDLE = date(2026, 12, 7), date(2026, 6, 8)


class _Runtime:
    """Enough of a Runtime for opscenter's API to be built (no request is sent)."""

    def allow(self, *roles: Any) -> Any:
        return Depends(lambda: None)

    def __getattr__(self, name: str) -> Any:
        return mock.MagicMock(name=name)


def test_every_read_endpoint_of_the_operations_center_is_timed() -> None:
    api = build_api(_Runtime())  # type: ignore[arg-type]
    served = {
        r.path
        for r in api.routes
        if isinstance(r, APIRoute) and "GET" in (r.methods or set()) and r.path.startswith("/api/")
    }
    timed = {e.path.split("?", 1)[0] for e in endpoints(LAST, MIDDLE)}
    assert timed == served


def test_the_kpis_are_read_for_every_period_and_cut_at_the_last_day_and_the_middle() -> None:
    kpis = [e.path for e in endpoints(LAST, MIDDLE) if e.path.startswith("/api/kpis?")]
    assert len(kpis) == 3 * 4 * 2
    for period in ("day", "week", "month"):
        for by in ("department", "category", "grid", "none"):
            for day in (LAST, MIDDLE):
                assert f"/api/kpis?period={period}&by={by}&at={day.isoformat()}" in kpis
    names = [e.name for e in endpoints(LAST, MIDDLE)]
    assert len(set(names)) == len(names)


def test_a_timing_sums_up_its_requests_and_says_whether_all_answered_200() -> None:
    timing = Timing(Endpoint("backlog", "/api/backlog"), ms=[10.0, 30.0, 20.0], statuses={200: 3}, bytes=1234)
    summary = timing.as_dict()
    assert timing.ok
    assert summary == {
        "path": "/api/backlog",
        "n": 3,
        "p50_ms": 20.0,
        "p95_ms": 29.0,
        "p99_ms": 29.8,
        "max_ms": 30.0,
        "server_cpu_ms": None,
        "bytes": 1234,
        "status": {"200": 3},
    }
    assert not Timing(Endpoint("x", "/api/x"), ms=[1.0], statuses={200: 1, 500: 1}).ok


def test_database_urls_are_told_apart_and_a_scratch_database_is_named_on_the_same_server() -> None:
    pg = "postgresql+psycopg://gridloop:secret@127.0.0.1:5433/gridloop"
    assert db.dialect("sqlite:////tmp/x.sqlite") == "sqlite"
    assert db.dialect(pg) == "postgresql"
    with pytest.raises(ValueError, match="not a SQLite or PostgreSQL"):
        db.dialect("mysql://x/y")
    assert db.with_database(pg, "benchread1") == "postgresql+psycopg://gridloop:secret@127.0.0.1:5433/benchread1"
    assert db.libpq(pg) == "postgresql://gridloop:secret@127.0.0.1:5433/gridloop"
    with pytest.raises(ValueError, match="scratch database"):
        db.create_database(pg, 'x"; DROP DATABASE gridloop; --')


def test_a_sqlite_read_models_size_and_processed_marks_are_read(tmp_path: Path) -> None:
    path = tmp_path / "ops.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE processed_event (event_id TEXT PRIMARY KEY)")
        conn.executemany("INSERT INTO processed_event VALUES (?)", [(f"e{i}",) for i in range(1200)])
    url = f"sqlite:///{path}"
    size = db.size(url)
    assert size.total >= path.stat().st_size > 0
    assert size.tables.get("processed_event", 0) > 0
    marks = db.marks(url)
    try:
        asked = [f"e{i}" for i in range(0, 2400, 2)]  # 1200 ids, more than one statement's worth
        assert marks.processed(asked) == {f"e{i}" for i in range(0, 1200, 2)}
        assert marks.processed([]) == set()
    finally:
        marks.close()


def test_the_tables_print_a_result() -> None:
    round_ = {
        "rebuild": {
            "events": 10,
            "seconds": 1.0,
            "events_per_s": 10,
            "peak_rss_mb": 100.0,
            "db_bytes": 2**20,
            "bytes_per_event": 500,
        },
        "endpoints": {"backlog": Timing(Endpoint("backlog", "/api/backlog"), [1.0], {200: 1}, 10).as_dict()},
        "errors": 0,
        "live": {
            "events": 5,
            "sent_rate": 5.0,
            "lag_ms": {"n": 5, "p50": 1.0, "p95": 2.0, "p99": 2.0, "max": 2.0},
            "unfolded": 0,
            "dashboard_refresh_ms": {"n": 1, "p50": 3.0, "p95": 3.0, "p99": 3.0, "max": 3.0},
        },
    }
    result = {
        "incidents": 1,
        "days": 1,
        "seed": 1,
        "history": {
            "events": 10,
            "events_per_incident": 10.0,
            "generate_events_per_s": 1,
            "publish_events_per_s": 1,
            "wall_s": 1.0,
        },
        "databases": {"sqlite": round_},
    }
    console = Console(width=200, record=True)
    print_read(result, console)
    text = console.export_text()
    assert "backlog" in text and "rebuild" in text and "sqlite" in text


def test_a_read_model_filled_before_is_read_as_it_is_and_its_tables_print_without_a_rebuild(tmp_path: Path) -> None:
    options = ReadOptions(read_models=(f"sqlite:///{tmp_path / 'a.sqlite'}", f"sqlite:///{tmp_path / 'b.sqlite'}"))
    targets = ReadBench(options)._targets()
    assert [(t.label, t.filled, t.scratch) for t in targets] == [("sqlite-1", True, None), ("sqlite-2", True, None)]
    round_: dict[str, Any] = {"url": targets[0].url, "rebuild": None, "endpoints": {}, "errors": 0, "live": None}
    result = {"incidents": 1, "days": 1, "seed": 1, "history": None, "databases": {"sqlite-1": round_}}
    console = Console(width=200, record=True)
    print_read(result, console)
    assert "reads on sqlite-1" in console.export_text()


def test_the_result_so_far_is_on_disk_as_each_phase_ends(tmp_path: Path) -> None:
    bench = ReadBench(ReadOptions(out_root=tmp_path))
    bench.out_dir.mkdir(parents=True)
    bench.result = {"bench": "read", "complete": False, "history": {"events": 10}}
    bench._save()
    bench.result["databases"] = {"sqlite": {"endpoints": {"backlog": {"n": 3}}}}
    bench._save()
    saved = json.loads((bench.out_dir / "result.json").read_text())
    assert saved["complete"] is False and saved["databases"]["sqlite"]["endpoints"]["backlog"] == {"n": 3}
    assert "duration_s" in saved
    assert [p.name for p in bench.out_dir.iterdir()] == ["result.json"]  # written aside, then renamed
