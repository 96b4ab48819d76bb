"""The synthetic history the read benchmark runs on: valid events of the project's own classes, in log order,
the same for the same seed, and a town's year as the operations center's real fold reads it."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from schemas import Event, IncidentStatus, decode_event, encode_event
from schemas import events as ev
from schemas.reference import GAOHANG
from services.bench.history import LOCAL, lifecycle, report_times
from services.common.bus import MessageBus
from services.common.db import UnitOfWork
from services.opscenter import handlers
from services.opscenter.models import TABLES as OPS_TABLES

START = datetime(2025, 3, 1, tzinfo=UTC)


def _history(incidents: int, seed: int = 1, days: int = 365) -> list[Event]:
    return list(lifecycle(incidents, seed=seed, start=START, days=days))


def test_every_event_is_one_of_the_projects_own_and_comes_back_from_the_wire_the_same() -> None:
    events = _history(300)
    assert events
    for event in events:
        assert type(event) in ev.EVENT_TYPES.values()
        assert decode_event(encode_event(event)) == event


def test_the_events_come_in_the_order_they_occurred_within_the_history() -> None:
    events = _history(300, days=30)
    times = [e.occurred_at for e in events]
    assert times == sorted(times)
    assert times[0] >= START and times[-1] < START + timedelta(days=30)
    assert len({e.event_id for e in events}) == len(events)


def test_the_same_seed_gives_the_same_history_and_another_seed_another() -> None:
    first = [encode_event(e) for e in _history(200, seed=5)]
    assert first == [encode_event(e) for e in _history(200, seed=5)]
    other = [encode_event(e) for e in _history(200, seed=6)]
    assert other != first
    assert not {e.event_id for e in _history(200, seed=5)} & {e.event_id for e in _history(200, seed=6)}


def test_each_incident_begins_with_its_report_and_each_work_order_with_its_dispatch() -> None:
    reported: set[str] = set()
    dispatched: set[str] = set()
    for event in _history(500):
        if isinstance(event, ev.IncidentReported):
            assert event.incident_id not in reported
            assert event.correlation_id == event.incident_id and event.causation_id is None
            reported.add(event.incident_id)
            continue
        assert event.incident_id in reported, f"{event.type} before the report of {event.incident_id}"
        assert event.correlation_id == event.incident_id
        if isinstance(event, ev.WorkOrderDispatched):
            assert event.work_order_id.startswith(f"{event.incident_id}-")
            dispatched.add(event.work_order_id)
        elif (order := getattr(event, "work_order_id", None)) is not None:
            assert order in dispatched, f"{event.type} before the dispatch of {order}"


def test_closures_are_judged_as_dispatch_judges_them() -> None:
    """On time when closed by the latest deadline its work orders have then (a rework or a granted extension
    moves its order's)."""
    deadlines: dict[str, dict[str, datetime]] = {}
    verified: set[str] = set()
    closed = 0
    for event in _history(800):
        if isinstance(event, ev.WorkOrderDispatched | ev.IncidentReworked):
            deadlines.setdefault(event.incident_id, {})[event.work_order_id] = event.deadline
        elif isinstance(event, ev.ExtensionGranted):
            deadlines[event.incident_id][event.work_order_id] = event.new_deadline
        elif isinstance(event, ev.VerificationPassed):
            verified.add(event.incident_id)
        elif isinstance(event, ev.IncidentClosed):
            closed += 1
            assert event.incident_id in verified
            assert event.deadline == max(deadlines.get(event.incident_id, {}).values(), default=None)
            assert event.on_time == (event.deadline is None or event.occurred_at <= event.deadline)
    assert closed > 600


def test_verifiers_are_workers_of_the_grid_who_neither_reported_nor_did_the_work() -> None:
    requests = [e for e in _history(500) if isinstance(e, ev.VerificationRequested)]
    assert requests
    for request in requests:
        assert request.worker_id in GAOHANG.grids[request.grid_id].workers
        assert request.worker_id not in request.handled_by
        assert request.worker_id != request.reporter_id


def test_reports_follow_the_towns_day_and_their_count_is_exact() -> None:
    end = START + timedelta(days=28)
    times = list(report_times(5000, START, end, random.Random(3)))
    assert len(times) == 5000
    assert times == sorted(times) and times[0] >= START and times[-1] < end
    hours = Counter(t.astimezone(LOCAL).hour for t in times)
    assert sum(hours[h] for h in range(9, 12)) > 5 * sum(hours[h] for h in range(2, 5))


def test_the_history_is_drawn_as_it_is_read() -> None:
    """A billion incidents' first events come at once: nothing is drawn ahead of what is read."""
    first = list(itertools.islice(lifecycle(10**9, seed=2, start=START), 50))
    assert len(first) == 50
    assert all(e.occurred_at < START + timedelta(hours=1) for e in first)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="incidents"):
        lifecycle(-1)
    with pytest.raises(ValueError, match="days"):
        lifecycle(10, days=0)
    with pytest.raises(ValueError, match="timezone"):
        lifecycle(10, start=datetime(2025, 1, 1))


@pytest.fixture
def ops_db(make_db: Callable[[tuple[sa.Table, ...]], Engine]) -> Engine:
    return make_db(OPS_TABLES)


def test_the_operations_centers_fold_reads_a_year_of_it_as_a_town_would_have_lived_it(ops_db: Engine) -> None:
    incidents = 2000
    bus = MessageBus(lambda: UnitOfWork(ops_db), handlers.bind(GAOHANG), handlers.preload)
    events = 0
    kinds: Counter[tuple[str, str]] = Counter()  # (incident, event type) → how many
    stream = lifecycle(incidents, seed=11, start=START)
    while batch := list(itertools.islice(stream, 500)):  # applied in batches, as the live consumer applies them
        bus.handle_batch(batch)
        events += len(batch)
        kinds.update((e.incident_id, e.type) for e in batch)

    with ops_db.connect() as c:
        assert c.execute(sa.text("SELECT count(*) FROM ops_parked")).scalar_one() == 0
        statuses: dict[str, int] = dict(
            c.execute(sa.text("SELECT status, count(*) FROM ops_incident GROUP BY status")).all()
        )
        assert sum(statuses.values()) == incidents
        folded = c.execute(sa.text("SELECT count(*) FROM processed_event")).scalar_one()
        closed = c.execute(
            sa.text(
                "SELECT i.incident_id, i.handled_on_spot,"
                " (SELECT count(*) FROM ops_work_order o WHERE o.incident_id = i.incident_id)"
                " FROM ops_incident i WHERE i.status = 'closed'"
            )
        ).all()

    assert folded == events
    assert 7.5 <= events / incidents <= 9.5
    assert 0.8 <= statuses[IncidentStatus.CLOSED] / incidents <= 0.9
    for status in (IncidentStatus.REJECTED, IncidentStatus.MERGED):
        assert statuses.get(status, 0) > 0.005 * incidents
    open_ = {s for s in statuses if s not in (IncidentStatus.CLOSED, IncidentStatus.REJECTED, IncidentStatus.MERGED)}
    assert {IncidentStatus.DISPATCHED, IncidentStatus.IN_PROGRESS, IncidentStatus.VERIFYING} <= open_
    assert IncidentStatus.REWORK in open_
    assert len(closed) == statuses[IncidentStatus.CLOSED]
    for incident_id, on_spot, orders in closed:
        assert kinds[(incident_id, "VerificationPassed")] >= 1, incident_id
        assert on_spot or (orders >= 1 and kinds[(incident_id, "WorkOrderHandled")] >= 1), incident_id
    overdue = Counter(kind for (_, kind), n in kinds.items() for _ in range(n))
    on_spot_closed = sum(1 for row in closed if row[1])
    assert overdue["OverdueReminded"] > 0 and overdue["IncidentEscalated"] > 0
    assert on_spot_closed > 0.05 * incidents
