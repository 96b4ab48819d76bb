"""intake's handlers and store: what they load and save, on a test database. The rules themselves are tested as
pure functions in test_intake_domain.py."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import select

from schemas import Actor, ActorKind, Event, decode_event
from schemas import events as ev
from services.common.auth import Principal, Role
from services.common.bus import MessageBus
from services.common.db import OutboxRecord, UnitOfWork, create_tables, insert_unless_taken
from services.common.errors import Forbidden, NotFound, Rejected, Unavailable, UnknownIncident
from services.intake import domain, handlers, store
from services.intake.models import TABLES, IncidentPublic, ReportAccepted, ReportCreate

from .conftest import FakeClock


@pytest.fixture
def engine(make_db: Callable[[tuple[sa.Table, ...]], Engine]) -> Engine:
    return make_db(TABLES)


def _cmd(**kw: object) -> ReportCreate:
    body: dict[str, object] = dict(
        category_code="exposed_garbage",
        lat=31.285,
        lon=121.575,
        description="垃圾",
        reporter_id="w-gh01-1",
        client_report_id="r-1",
    )
    body.update(kw)
    return ReportCreate.model_validate(body)


def _outbox(engine: Engine) -> list[OutboxRecord]:
    with UnitOfWork(engine) as uow:
        return list(uow.session.exec(select(OutboxRecord)).all())


def _bus(engine: Engine, clock: Callable[[], datetime] | None = None) -> MessageBus:
    return MessageBus(lambda: UnitOfWork(engine, clock=clock) if clock else UnitOfWork(engine), handlers.HANDLERS)


def _sent(
    engine: Engine, clock: FakeClock | None, cmd: ReportCreate, by: Actor | None = None
) -> tuple[ReportAccepted, list[Event]]:
    """A report taken as the API takes it (a command through the bus, committed), and what it emitted."""
    return _bus(engine, clock).execute(partial(handlers.report_incident, by=by), cmd)


def _report(engine: Engine, clock: FakeClock | None, cmd: ReportCreate, by: Actor | None = None) -> ReportAccepted:
    return _sent(engine, clock, cmd, by)[0]


def _view(engine: Engine, incident_id: str, who: Principal | None = None) -> IncidentPublic:
    return _bus(engine).query(handlers.get_incident, incident_id, who)


def test_report_queues_one_incident_reported(engine: Engine, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRIDLOOP_TOPIC_NAMESPACE", raising=False)  # tests over Kafka set their own
    accepted = _report(engine, clock, _cmd())
    assert accepted.status == "reported" and not accepted.duplicate
    [record] = _outbox(engine)
    event = decode_event(record.payload)
    assert isinstance(event, ev.IncidentReported)
    assert event.incident_id == accepted.incident_id == event.correlation_id
    assert event.actor == Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-1")
    assert record.topics.split(",") == ["gridloop.incidents.reported", "gridloop.incidents.lifecycle"]


def test_same_client_report_id_returns_the_same_incident(engine: Engine, clock: FakeClock) -> None:
    first = _report(engine, clock, _cmd())
    again, emitted = _sent(engine, clock, _cmd())
    assert again.incident_id == first.incident_id and again.duplicate and emitted == []
    assert len(_outbox(engine)) == 1
    with pytest.raises(Rejected, match="already used"):
        _report(engine, clock, _cmd(description="something else"))
    # another reporter may use the same id
    assert _report(engine, clock, _cmd(reporter_id="w-gh02-1")).incident_id != first.incident_id


DESK = Actor(kind=ActorKind.OPS_CENTER, id="ops-duty", department="ops_center")
WORKER = Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-1")


def test_a_desk_reporting_for_a_worker_is_recorded_as_itself_on_their_behalf(engine: Engine, clock: FakeClock) -> None:
    _, (event,) = _sent(engine, clock, _cmd(source="hotline_12345"), DESK)
    assert isinstance(event, ev.IncidentReported)
    assert event.actor == Actor(
        kind=ActorKind.OPS_CENTER, id="ops-duty", department="ops_center", on_behalf_of="w-gh01-1"
    )
    assert event.reporter_id == "w-gh01-1"
    _, (event,) = _sent(engine, clock, _cmd(client_report_id="r-2"), WORKER)  # a worker: recorded as themselves
    assert event.actor == WORKER and event.actor.on_behalf_of is None


def test_a_report_as_someone_else_is_refused_and_nothing_recorded(engine: Engine, clock: FakeClock) -> None:
    with pytest.raises(Forbidden, match="reports as itself"):
        _report(engine, clock, _cmd(reporter_id="w-gh01-2"), WORKER)
    with pytest.raises(Forbidden, match="12345 hotline calls"):
        _report(engine, clock, _cmd(), DESK)
    assert _outbox(engine) == []


def test_a_client_report_id_is_not_taken_over_by_another_caller(engine: Engine, clock: FakeClock) -> None:
    """The desk naming w-gh01-1 as reporter cannot have w-gh01-1's report answered to it by retrying their
    client_report_id, nor have its own report answered to w-gh01-1: either way a 409 with the reason."""
    mine = _report(engine, clock, _cmd(), WORKER)
    with pytest.raises(Rejected, match="another caller") as refused:
        _report(engine, clock, _cmd(source="hotline_12345"), DESK)
    assert mine.incident_id not in str(refused.value)
    # the worker's own retry is still answered with their incident
    assert _report(engine, clock, _cmd(), WORKER).incident_id == mine.incident_id

    call = _cmd(source="hotline_12345", client_report_id="r-9")
    desks = _report(engine, clock, call, DESK)  # the other way round: the desk first
    admin = Actor(kind=ActorKind.SYSTEM, id="root")  # who may report on any channel, but did not send this one
    with pytest.raises(Rejected, match="another caller"):
        _report(engine, clock, call, admin)
    again = _report(engine, clock, call, DESK)  # the desk's own retry is answered with its incident
    assert again.incident_id == desks.incident_id and again.duplicate
    assert len(_outbox(engine)) == 2


def test_a_report_taken_before_the_caller_was_kept_is_retried_only_by_its_reporter(engine: Engine) -> None:
    """A report of an earlier version does not say who sent it: the reporter may retry it, nobody else."""
    mine = _report(engine, None, _cmd(), WORKER)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE intake_incident SET submitted_by = NULL"))
    assert _report(engine, None, _cmd(), WORKER).incident_id == mine.incident_id
    with pytest.raises(Rejected, match="another caller"):
        _report(engine, None, _cmd(source="hotline_12345"), DESK)


def test_on_the_spot_needs_evidence_and_a_grid_worker() -> None:
    with pytest.raises(ValueError, match="evidence"):
        _cmd(handled_on_spot=True)
    with pytest.raises(ValueError, match="grid worker"):
        _cmd(handled_on_spot=True, evidence_urls=["https://e.org/a.jpg"], source="hotline_12345")
    assert _cmd(handled_on_spot=True, evidence_urls=["https://e.org/a.jpg"]).handled_on_spot


def _reported_and_fold(engine: Engine, clock: FakeClock) -> tuple[str, Event, MessageBus]:
    """A report taken by intake's API, its IncidentReported as the lifecycle log carries it, and intake's fold."""
    incident_id = _report(engine, clock, _cmd()).incident_id
    [record] = _outbox(engine)
    return incident_id, decode_event(record.payload), _bus(engine, clock)


def _dispatched(reported: Event, deadline: datetime, **kw: Any) -> ev.WorkOrderDispatched:
    """Dispatch's first work order of the reported incident, to city_ops."""
    return ev.WorkOrderDispatched.following(
        reported,
        Actor.system("dispatch"),
        work_order_id=f"{reported.incident_id}-1",
        department_code="city_ops",
        category_code="exposed_garbage",
        grid_id="gh01",
        location=reported.location,  # type: ignore[attr-defined]
        description="d",
        priority=3,
        deadline=deadline,
        **kw,
    )


def test_lifecycle_folds_into_status_and_timeline(engine: Engine, clock: FakeClock) -> None:
    """The fold through the bus: loaded, changed and written back; a redelivery changes nothing; a batch (one
    preload, one commit) folds the same as one event at a time."""
    incident_id, reported, bus = _reported_and_fold(engine, clock)
    system = Actor.system("dispatch")
    filed = ev.IncidentFiled.following(
        reported, system, category_code="exposed_garbage", grid_id="gh01", priority=3, severity="normal"
    )
    order = _dispatched(reported, clock.advance(hours=24))
    for event in (reported, filed, order, order):  # the last one is a redelivery
        bus.handle(event)
    view = _view(engine, incident_id)
    assert view.status == "dispatched" and view.grid_id == "gh01" and view.departments == ["city_ops"]
    assert view.deadline == order.deadline
    assert [t.type for t in view.timeline] == ["IncidentReported", "IncidentFiled", "WorkOrderDispatched"]
    closed = ev.IncidentClosed.following(
        reported,
        system,
        category_code="exposed_garbage",
        grid_id="gh01",
        departments=["city_ops"],
        reported_at=reported.occurred_at,
        deadline=order.deadline,
        on_time=True,
        rework_count=0,
        return_count=0,
    )
    late_reminder = ev.OverdueReminded.following(
        reported,
        system,
        work_order_id=order.work_order_id,
        department_code="city_ops",
        deadline=order.deadline,
        overdue_s=1,
    )
    batched = MessageBus(lambda: UnitOfWork(engine, clock=clock), handlers.HANDLERS, preload=handlers.preload)
    batched.handle_batch([closed, late_reminder, closed])
    view = _view(engine, incident_id)
    assert view.status == "closed" and view.closed_at is not None and view.overdue  # a terminal status stays
    assert [t.type for t in view.timeline][3:] == ["IncidentClosed", "OverdueReminded"]


def test_a_report_another_intake_took_is_folded_from_its_event(engine: Engine, clock: FakeClock) -> None:
    """An IncidentReported this database never took (another instance's) makes the incident when folded."""
    reported = ev.IncidentReported(
        incident_id="GL20260601-000000000009",
        actor=WORKER,
        correlation_id="GL20260601-000000000009",
        source="grid_worker",
        category_code="exposed_garbage",
        location={"lat": 31.285, "lon": 121.575},
        description="垃圾",
        reporter_id="w-gh01-1",
        client_report_id="elsewhere-1",
    )
    _bus(engine, clock).handle(reported)
    view = _view(engine, reported.incident_id)
    assert (view.status, view.description, view.reported_at) == ("reported", "垃圾", reported.occurred_at)
    assert [t.event_id for t in view.timeline] == [reported.event_id]


def test_the_timeline_shows_who_acted_on_whose_behalf(engine: Engine, clock: FakeClock) -> None:
    incident_id = _report(engine, clock, _cmd(source="hotline_12345"), DESK).incident_id
    [record] = _outbox(engine)
    _bus(engine, clock).handle(decode_event(record.payload))
    [reported] = _view(engine, incident_id).timeline
    assert (reported.actor_kind, reported.actor_id, reported.on_behalf_of) == ("ops_center", "ops-duty", "w-gh01-1")


def test_a_database_of_an_earlier_version_gets_the_new_columns(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE intake_incident DROP COLUMN status_at"))
    create_tables(engine, TABLES)
    assert "status_at" in {c["name"] for c in sa.inspect(engine).get_columns("intake_incident")}


def test_unknown_incident(engine: Engine) -> None:
    ghost = ev.WorkOrderAccepted(
        incident_id="nope", actor=Actor.system("x"), correlation_id="c", work_order_id="w", department_code="city_ops"
    )
    with pytest.raises(UnknownIncident):
        _bus(engine).handle(ghost)
    with pytest.raises(NotFound):
        _view(engine, "nope")


def _twin_commits_first(
    engine: Engine, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, twin: ReportCreate
) -> list[str]:
    """Another intake instance on the same database: it commits ``twin`` just before our insert."""
    statement = insert_unless_taken
    raced: list[str] = []

    def insert_after_the_twin(table: sa.Table, dialect: str, *index_elements: str) -> object:
        if not raced:
            monkeypatch.setattr(store, "insert_unless_taken", statement)  # the twin inserts for real
            raced.append(_report(engine, clock, twin).incident_id)
        return statement(table, dialect, *index_elements)

    monkeypatch.setattr(store, "insert_unless_taken", insert_after_the_twin)
    return raced


def test_a_concurrent_twin_report_answers_as_a_duplicate(
    engine: Engine, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two instances take the same client_report_id at once: the unique constraint keeps one incident, and the
    loser answers with it (duplicate) instead of failing on its commit."""
    raced = _twin_commits_first(engine, clock, monkeypatch, _cmd())
    accepted, emitted = _sent(engine, clock, _cmd())
    assert emitted == []  # the loser's event is not reported as emitted
    assert raced and accepted.incident_id == raced[0] and accepted.duplicate
    assert accepted.status == "reported"
    [record] = _outbox(engine)  # one incident, one IncidentReported
    assert decode_event(record.payload).incident_id == raced[0]
    assert _view(engine, raced[0]).incident_id == raced[0]


def test_a_concurrent_different_report_with_the_same_id_is_refused(
    engine: Engine, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    raced = _twin_commits_first(engine, clock, monkeypatch, _cmd(description="something else"))
    with pytest.raises(Rejected, match="already used"):
        _report(engine, clock, _cmd())
    assert raced
    assert len(_outbox(engine)) == 1


def test_a_case_number_already_taken_is_drawn_again(
    engine: Engine, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Case numbers are random: a report that draws one another report holds draws again (it failed before)."""
    first = _report(engine, clock, _cmd())
    draws = iter([first.incident_id, "GL20260601-000000000001"])
    monkeypatch.setattr(domain, "new_incident_id", lambda now: next(draws))
    second, emitted = _sent(engine, clock, _cmd(client_report_id="r-2", description="另一处垃圾"))
    assert [e.incident_id for e in emitted] == ["GL20260601-000000000001"]
    assert second.incident_id == "GL20260601-000000000001" and not second.duplicate
    assert [decode_event(r.payload).incident_id for r in _outbox(engine)] == [first.incident_id, second.incident_id]
    assert _view(engine, first.incident_id).description == "垃圾"  # the first report untouched
    assert _view(engine, second.incident_id).description == "另一处垃圾"


def test_no_free_case_number_after_a_few_draws_is_unavailable(
    engine: Engine, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _report(engine, clock, _cmd())
    monkeypatch.setattr(domain, "new_incident_id", lambda now: first.incident_id)
    with pytest.raises(Unavailable, match=f"{domain.ID_DRAWS} draws"):
        _report(engine, clock, _cmd(client_report_id="r-2"))
    assert len(_outbox(engine)) == 1


# -- who sees a reporter's contact -----------------------------------------------------------------------------


def _principal(role: Role, subject: str, **kw: Any) -> Principal:
    return Principal(token_id=f"t-{subject}", role=role, subject=subject, **kw)


CALLER = "13912345678"
"""A 12345 caller's phone number: the hotline desk reports the call with it as reporter_id."""


def _dispatched_call(engine: Engine, clock: FakeClock, actor: Actor | None) -> str:
    """A 12345 call reported (by the desk, or by a gateway naming the caller as actor), filed in gh01, dispatched
    to city_ops."""
    cmd = _cmd(source="hotline_12345", reporter_id=CALLER, client_report_id="call-1", description="路口垃圾")
    incident_id = _report(engine, clock, cmd, actor).incident_id
    [record] = _outbox(engine)
    reported = decode_event(record.payload)
    filed = ev.IncidentFiled.following(
        reported,
        Actor.system("dispatch"),
        category_code="exposed_garbage",
        grid_id="gh01",
        priority=3,
        severity="normal",
    )
    bus = _bus(engine, clock)
    for event in (reported, filed, _dispatched(reported, clock.advance(hours=24))):
        bus.handle(event)
    return incident_id


@pytest.mark.parametrize(
    "actor",
    [Actor(kind=ActorKind.OPS_CENTER, id="duty-desk", department="ops_center"), None],
    ids=["desk", "caller-as-actor"],
)
def test_a_12345_callers_number_is_shown_to_the_operations_center_only(
    engine: Engine, clock: FakeClock, actor: Actor | None
) -> None:
    incident_id = _dispatched_call(engine, clock, actor)
    staff = [
        _principal(Role.DEPARTMENT, "staff-7", department="city_ops"),
        _principal(Role.GRID_WORKER, "w-gh01-2", grids=("gh01",)),
    ]
    bus = _bus(engine)
    for who in staff:
        view = _view(engine, incident_id, who)
        assert view.source == "hotline_12345" and view.reporter_id is None, who.role
        assert CALLER not in view.model_dump_json(), who.role  # nor as the actor of the report
        [listed] = bus.query(handlers.list_incidents, None, 10, 0, who)
        assert listed.incident_id == incident_id
    for who in (_principal(Role.OPS_CENTER, "duty-desk"), _principal(Role.ADMIN, "root")):
        assert _view(engine, incident_id, who).reporter_id == CALLER


def test_who_sees_an_incident_and_who_finds_it_listed(engine: Engine, clock: FakeClock) -> None:
    """A department sees the incidents it held a work order of (not one whose code merely contains its own), a
    grid worker those of their grids and their own reports; anyone else is answered as for an unknown one."""
    incident_id = _dispatched_call(engine, clock, None)
    bus = _bus(engine)
    seeing = [
        _principal(Role.DEPARTMENT, "staff-7", department="city_ops"),
        _principal(Role.GRID_WORKER, "w-gh01-2", grids=("gh01",)),
        _principal(Role.OPS_CENTER, "duty-desk"),
    ]
    for who in seeing:
        assert [r.incident_id for r in bus.query(handlers.list_incidents, "dispatched", 10, 0, who)] == [incident_id]
        assert bus.query(handlers.list_incidents, "closed", 10, 0, who) == []
    blind = [
        _principal(Role.DEPARTMENT, "staff-8", department="city"),  # "city" is in "city_ops", yet not its own
        _principal(Role.DEPARTMENT, "staff-9", department="greening"),
        _principal(Role.GRID_WORKER, "w-gh02-1", grids=("gh02",)),
        _principal(Role.SENSOR, "s-1"),
    ]
    for who in blind:
        assert bus.query(handlers.list_incidents, None, 10, 0, who) == [], who
        with pytest.raises(NotFound, match=f"no incident {incident_id}"):
            _view(engine, incident_id, who)
    [listed] = bus.query(handlers.list_incidents, None, 10, 0, None)
    assert listed.model_dump() == {
        "incident_id": incident_id,
        "status": "dispatched",
        "category_code": "exposed_garbage",
        "grid_id": "gh01",
        "reported_at": listed.reported_at,
    }


def test_a_grid_workers_own_id_stays_visible_to_the_staff_of_the_case(engine: Engine, clock: FakeClock) -> None:
    incident_id, reported, bus = _reported_and_fold(engine, clock)
    for event in (reported, _dispatched(reported, clock.advance(hours=24))):
        bus.handle(event)
    view = _view(engine, incident_id, _principal(Role.DEPARTMENT, "staff-7", department="city_ops"))
    assert view.reporter_id == "w-gh01-1" and view.timeline[0].actor_id == "w-gh01-1"
