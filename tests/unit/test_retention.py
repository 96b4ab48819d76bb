"""Retention: published outbox records and idempotency marks past redelivery are pruned; nothing else is."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from schemas import topics
from services.common.db import SHARED_TABLES, OutboxRecord, ProcessedEvent, create_tables, make_engine
from services.common.retention import MARGIN, Pruned, Pruner, mark_horizons, redelivery_horizon
from services.dispatch.app import build
from services.dispatch.settings import DispatchSettings

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def test_a_record_may_be_read_again_until_its_whole_segment_is_past_retention() -> None:
    # retention.ms deletes whole segments: a record written just after its segment opened can outlive the
    # retention by up to segment.ms (Kafka's default: seven days)
    assert redelivery_horizon(topics.WORKORDERS) == timedelta(days=14)
    assert redelivery_horizon(topics.LIFECYCLE) is None  # kept for ever
    assert redelivery_horizon(topics.INCIDENTS_CLOSED) is None  # compacted: the latest closure stays
    short = topics.Topic("x", "x", (), config={"retention.ms": "3600000", "segment.ms": "600000"})
    assert redelivery_horizon(short) == timedelta(minutes=70)


def test_marks_of_events_from_topics_kept_for_ever_are_kept_for_ever() -> None:
    # handling: work orders come on a topic kept a week, closures on a compacted one
    handled = ["WorkOrderDispatched", "IncidentReworked", "IncidentClosed"]
    assert mark_horizons((topics.WORKORDERS, topics.INCIDENTS_CLOSED), handled) == {
        "WorkOrderDispatched": timedelta(days=14) + MARGIN,
        "IncidentReworked": timedelta(days=14) + MARGIN,
    }
    # the read models fold the lifecycle log, which is kept for ever: none of their marks may go
    assert mark_horizons((topics.LIFECYCLE,), ["IncidentReported", "IncidentClosed"]) == {}
    # a type this service handles but consumes from no topic (a command, say) is kept
    assert mark_horizons((topics.WORKORDERS,), ["VerificationPassed"]) == {}


def _fill(engine: Engine) -> None:
    outbox: sa.Table = OutboxRecord.__table__  # type: ignore[attr-defined]
    processed: sa.Table = ProcessedEvent.__table__  # type: ignore[attr-defined]
    rows: list[dict[str, Any]] = []
    for n, (published, created) in enumerate(
        [(NOW - 3 * DAY, NOW - 3 * DAY)] * 5  # published long ago: go
        + [(NOW - 2 * 3600 * timedelta(seconds=1), NOW - 3 * DAY)]  # published two hours ago: kept a day
        + [(None, NOW - 30 * DAY)] * 2  # never published (the broker was down): kept until they are
    ):
        rows.append(
            dict(
                event_id=f"e{n}",
                incident_id=f"GL-{n}",
                type="WorkOrderDispatched",
                topics="t",
                payload=b"{}",
                created_at=created,
                published_at=published,
            )
        )
    marks = (
        [dict(event_id=f"old-{n}", type="IncidentReported", processed_at=NOW - 20 * DAY) for n in range(5)]
        + [dict(event_id="young", type="IncidentReported", processed_at=NOW - 3 * DAY)]
        + [dict(event_id="closed-old", type="IncidentClosed", processed_at=NOW - 400 * DAY)]
    )
    with engine.begin() as conn:
        conn.execute(sa.insert(outbox), rows)
        conn.execute(sa.insert(processed), marks)


def _drain(pruner: Pruner) -> Pruned:
    """Every batch that may go, as the service's timer deletes them."""
    outbox = marks = 0
    while (done := pruner.step(NOW)) is not None:
        outbox, marks = outbox + done.outbox, marks + done.marks
    return Pruned(outbox=outbox, marks=marks)


def check_pruning(engine: Engine) -> None:
    """Shared with the PostgreSQL tests."""
    _fill(engine)
    pruner = Pruner(engine, {"IncidentReported": 15 * DAY}, outbox_keep=DAY, batch=2)
    first = pruner.step(NOW)
    assert first is not None and (first.outbox, first.marks) == (2, 0)  # one batch at a time, the outbox first
    done = _drain(pruner)
    assert (done.outbox, done.marks) == (3, 5)
    with engine.connect() as conn:
        left = {r[0]: r[1] for r in conn.execute(sa.text("SELECT event_id, published_at FROM outbox"))}
        marks = {r[0] for r in conn.execute(sa.text("SELECT event_id FROM processed_event"))}
    assert sorted(left) == ["e5", "e6", "e7"]
    assert [left["e6"], left["e7"]] == [None, None]
    assert marks == {"young", "closed-old"}
    assert pruner.step(NOW) is None
    assert (_drain(pruner).outbox, _drain(pruner).marks) == (0, 0)


def test_pruning_deletes_only_what_can_no_longer_be_needed(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'r.sqlite'}")
    create_tables(engine, ())
    assert {t.name for t in SHARED_TABLES} == {"outbox", "processed_event"}
    check_pruning(engine)


async def test_a_service_prunes_on_its_timer_and_counts_what_it_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client import REGISTRY

    from services.common import runtime as runtime_module

    rt = build(DispatchSettings(var_dir=tmp_path, http_port=18106, outbox_keep_s=3600))
    rt.init_db()
    # dispatch consumes reports, feedback and verification outcomes: all kept a week on their topics
    assert rt.pruner.marks["IncidentReported"] == timedelta(days=14) + MARGIN
    assert rt.pruner.outbox_keep == timedelta(hours=1)
    _fill(rt.engine)
    monkeypatch.setattr(runtime_module, "utcnow", lambda: NOW)

    def counted(table: str) -> float:
        return REGISTRY.get_sample_value("gridloop_rows_pruned_total", {"service": "dispatch", "table": table}) or 0.0

    before = counted("outbox"), counted("processed_event")
    done = await rt.prune()
    assert (done.outbox, done.marks) == (6, 5)  # the one published two hours ago goes too: kept an hour here
    assert (counted("outbox") - before[0], counted("processed_event") - before[1]) == (6, 5)
