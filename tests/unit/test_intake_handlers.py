from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta
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
from services.common.errors import NotFound, Rejected, UnknownIncident
from services.intake import handlers
from services.intake.models import TABLES, ReportCreate

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


def test_report_queues_one_incident_reported(engine: Engine, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRIDLOOP_TOPIC_NAMESPACE", raising=False)  # tests over Kafka set their own
    with UnitOfWork(engine, clock=clock) as uow:
        accepted = handlers.report_incident(_cmd(), uow)
    assert accepted.status == "reported" and not accepted.duplicate
    [record] = _outbox(engine)
    event = decode_event(record.payload)
    assert isinstance(event, ev.IncidentReported)
    assert event.incident_id == accepted.incident_id == event.correlation_id
    assert event.actor == Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-1")
    assert record.topics.split(",") == ["gridloop.incidents.reported", "gridloop.incidents.lifecycle"]


def test_same_client_report_id_returns_the_same_incident(engine: Engine, clock: FakeClock) -> None:
    with UnitOfWork(engine, clock=clock) as uow:
        first = handlers.report_incident(_cmd(), uow)
    with UnitOfWork(engine, clock=clock) as uow:
        again = handlers.report_incident(_cmd(), uow)
    assert again.incident_id == first.incident_id and again.duplicate
    assert len(_outbox(engine)) == 1
    with UnitOfWork(engine, clock=clock) as uow, pytest.raises(Rejected, match="already used"):
        handlers.report_incident(_cmd(description="something else"), uow)
    with UnitOfWork(engine, clock=clock) as uow:  # another reporter may use the same id
        assert handlers.report_incident(_cmd(reporter_id="w-gh02-1"), uow).incident_id != first.incident_id


DESK = Actor(kind=ActorKind.OPS_CENTER, id="ops-duty", department="ops_center")
WORKER = Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-1")


def test_a_desk_reporting_for_a_worker_is_recorded_as_itself_on_their_behalf(engine: Engine, clock: FakeClock) -> None:
    with UnitOfWork(engine, clock=clock) as uow:
        handlers.report_incident(_cmd(source="hotline_12345"), uow, DESK)
        (event,) = uow.emitted
    assert isinstance(event, ev.IncidentReported)
    assert event.actor == Actor(
        kind=ActorKind.OPS_CENTER, id="ops-duty", department="ops_center", on_behalf_of="w-gh01-1"
    )
    assert event.reporter_id == "w-gh01-1"
    with UnitOfWork(engine, clock=clock) as uow:  # a worker reporting is recorded as themselves
        handlers.report_incident(_cmd(client_report_id="r-2"), uow, WORKER)
        (event,) = uow.emitted
    assert event.actor == WORKER and event.actor.on_behalf_of is None


def test_a_client_report_id_is_not_taken_over_by_another_caller(engine: Engine, clock: FakeClock) -> None:
    """The desk naming w-gh01-1 as reporter cannot have w-gh01-1's report answered to it by retrying their
    client_report_id, nor have its own report answered to w-gh01-1: either way a 409 with the reason."""
    with UnitOfWork(engine, clock=clock) as uow:
        mine = handlers.report_incident(_cmd(), uow, WORKER)
    with UnitOfWork(engine, clock=clock) as uow, pytest.raises(Rejected, match="another caller") as refused:
        handlers.report_incident(_cmd(source="hotline_12345"), uow, DESK)
    assert mine.incident_id not in str(refused.value)
    with UnitOfWork(engine, clock=clock) as uow:  # the worker's own retry is still answered with their incident
        assert handlers.report_incident(_cmd(), uow, WORKER).incident_id == mine.incident_id

    with UnitOfWork(engine, clock=clock) as uow:  # the other way round: the desk first
        desks = handlers.report_incident(_cmd(source="hotline_12345", client_report_id="r-9"), uow, DESK)
    with UnitOfWork(engine, clock=clock) as uow, pytest.raises(Rejected, match="another caller"):
        handlers.report_incident(_cmd(source="hotline_12345", client_report_id="r-9"), uow, WORKER)
    with UnitOfWork(engine, clock=clock) as uow:  # the desk's own retry is answered with its incident
        again = handlers.report_incident(_cmd(source="hotline_12345", client_report_id="r-9"), uow, DESK)
    assert again.incident_id == desks.incident_id and again.duplicate
    assert len(_outbox(engine)) == 2


def test_a_report_taken_before_the_caller_was_kept_is_retried_only_by_its_reporter(engine: Engine) -> None:
    """A report of an earlier version does not say who sent it: the reporter may retry it, nobody else."""
    with UnitOfWork(engine) as uow:
        mine = handlers.report_incident(_cmd(), uow, WORKER)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE intake_incident SET submitted_by = NULL"))
    with UnitOfWork(engine) as uow:
        assert handlers.report_incident(_cmd(), uow, WORKER).incident_id == mine.incident_id
    with UnitOfWork(engine) as uow, pytest.raises(Rejected, match="another caller"):
        handlers.report_incident(_cmd(source="hotline_12345"), uow, DESK)


def test_on_the_spot_needs_evidence_and_a_grid_worker() -> None:
    with pytest.raises(ValueError, match="evidence"):
        _cmd(handled_on_spot=True)
    with pytest.raises(ValueError, match="grid worker"):
        _cmd(handled_on_spot=True, evidence_urls=["https://e.org/a.jpg"], source="hotline_12345")
    assert _cmd(handled_on_spot=True, evidence_urls=["https://e.org/a.jpg"]).handled_on_spot


def _reported_and_fold(engine: Engine, clock: FakeClock) -> tuple[str, Event, MessageBus]:
    """A report taken by intake's API, its IncidentReported as the lifecycle log carries it, and intake's fold."""
    with UnitOfWork(engine, clock=clock) as uow:
        incident_id = handlers.report_incident(_cmd(), uow).incident_id
    [record] = _outbox(engine)
    bus = MessageBus(lambda: UnitOfWork(engine, clock=clock), handlers.HANDLERS)
    return incident_id, decode_event(record.payload), bus


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
    incident_id, reported, bus = _reported_and_fold(engine, clock)
    system = Actor.system("dispatch")
    filed = ev.IncidentFiled.following(
        reported, system, category_code="exposed_garbage", grid_id="gh01", priority=3, severity="normal"
    )
    order = _dispatched(reported, clock.advance(hours=24))
    for event in (reported, filed, order, order):  # the last one is a redelivery
        bus.handle(event)
    with UnitOfWork(engine) as uow:
        view = handlers.get_incident(incident_id, uow)
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
    bus.handle(closed)
    bus.handle(late_reminder)
    with UnitOfWork(engine) as uow:
        view = handlers.get_incident(incident_id, uow)
    assert view.status == "closed" and view.closed_at is not None  # a terminal status stays


def test_an_event_folded_after_a_later_one_does_not_step_the_status_back(engine: Engine, clock: FakeClock) -> None:
    # dispatch's WorkOrderDispatched and handling's WorkOrderAccepted reach the lifecycle log from two producers:
    # a retried send can land the earlier one second
    incident_id, reported, bus = _reported_and_fold(engine, clock)
    at = reported.occurred_at
    order = _dispatched(reported, at + timedelta(hours=24), occurred_at=at + timedelta(seconds=1))
    staff = Actor(kind=ActorKind.DEPARTMENT, id="staff", department="city_ops")

    def answer(cls: type[Event], seconds: int, **kw: Any) -> Event:
        return cls.following(
            order,
            staff,
            occurred_at=at + timedelta(seconds=seconds),
            work_order_id=order.work_order_id,
            department_code="city_ops",
            **kw,
        )

    accepted = answer(ev.WorkOrderAccepted, 2)
    handled = answer(ev.WorkOrderHandled, 3, result="cleaned")
    for event in (reported, accepted, order):
        bus.handle(event)
    with UnitOfWork(engine) as uow:
        view = handlers.get_incident(incident_id, uow)
    assert view.status == "in_progress" and view.departments == ["city_ops"] and view.deadline == order.deadline
    assert [t.type for t in view.timeline] == ["IncidentReported", "WorkOrderDispatched", "WorkOrderAccepted"]
    bus.handle(handled)
    with UnitOfWork(engine) as uow:
        assert handlers.get_incident(incident_id, uow).status == "handled"


def test_the_timeline_shows_who_acted_on_whose_behalf(engine: Engine, clock: FakeClock) -> None:
    with UnitOfWork(engine, clock=clock) as uow:
        incident_id = handlers.report_incident(_cmd(source="hotline_12345"), uow, DESK).incident_id
    [record] = _outbox(engine)
    MessageBus(lambda: UnitOfWork(engine, clock=clock), handlers.HANDLERS).handle(decode_event(record.payload))
    with UnitOfWork(engine) as uow:
        [reported] = handlers.get_incident(incident_id, uow).timeline
    assert (reported.actor_kind, reported.actor_id, reported.on_behalf_of) == ("ops_center", "ops-duty", "w-gh01-1")


def test_a_database_of_an_earlier_version_gets_the_new_columns(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE intake_incident DROP COLUMN status_at"))
    create_tables(engine, TABLES)
    assert "status_at" in {c["name"] for c in sa.inspect(engine).get_columns("intake_incident")}


def test_unknown_incident(engine: Engine) -> None:
    bus = MessageBus(lambda: UnitOfWork(engine), handlers.HANDLERS)
    ghost = ev.WorkOrderAccepted(
        incident_id="nope", actor=Actor.system("x"), correlation_id="c", work_order_id="w", department_code="city_ops"
    )
    with pytest.raises(UnknownIncident):
        bus.handle(ghost)
    with UnitOfWork(engine) as uow, pytest.raises(NotFound):
        handlers.get_incident("nope", uow)


def _twin_commits_first(
    engine: Engine, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, twin: ReportCreate
) -> list[str]:
    """Another intake instance on the same database: it commits ``twin`` just before our insert."""
    statement = insert_unless_taken
    raced: list[str] = []

    def insert_after_the_twin(table: sa.Table, dialect: str, *index_elements: str) -> object:
        if not raced:
            monkeypatch.setattr(handlers, "insert_unless_taken", statement)  # the twin inserts for real
            with UnitOfWork(engine, clock=clock) as other:
                raced.append(handlers.report_incident(twin, other).incident_id)
        return statement(table, dialect, *index_elements)

    monkeypatch.setattr(handlers, "insert_unless_taken", insert_after_the_twin)
    return raced


def test_a_concurrent_twin_report_answers_as_a_duplicate(
    engine: Engine, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two instances take the same client_report_id at once: the unique constraint keeps one incident, and the
    loser answers with it (duplicate) instead of failing on its commit."""
    raced = _twin_commits_first(engine, clock, monkeypatch, _cmd())
    with UnitOfWork(engine, clock=clock) as uow:
        accepted = handlers.report_incident(_cmd(), uow)
        assert uow.emitted == []  # the loser's event is not reported as emitted
    assert raced and accepted.incident_id == raced[0] and accepted.duplicate
    assert accepted.status == "reported"
    [record] = _outbox(engine)  # one incident, one IncidentReported
    assert decode_event(record.payload).incident_id == raced[0]
    with UnitOfWork(engine, clock=clock) as uow:
        assert handlers.get_incident(raced[0], uow).incident_id == raced[0]


def test_a_concurrent_different_report_with_the_same_id_is_refused(
    engine: Engine, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    raced = _twin_commits_first(engine, clock, monkeypatch, _cmd(description="something else"))
    with UnitOfWork(engine, clock=clock) as uow, pytest.raises(Rejected, match="already used"):
        handlers.report_incident(_cmd(), uow)
    assert raced
    assert len(_outbox(engine)) == 1


def test_a_case_number_is_the_day_and_48_random_bits(clock: FakeClock) -> None:
    ids = {handlers.new_incident_id(clock()) for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(rf"GL{clock():%Y%m%d}-[0-9A-F]{{12}}", i) for i in ids)


def test_a_case_number_already_taken_is_drawn_again(
    engine: Engine, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Case numbers are random: a report that draws one another report holds draws again (it failed before)."""
    with UnitOfWork(engine, clock=clock) as uow:
        first = handlers.report_incident(_cmd(), uow)
    draws = iter([first.incident_id, "GL20260601-000000000001"])
    monkeypatch.setattr(handlers, "new_incident_id", lambda now: next(draws))
    with UnitOfWork(engine, clock=clock) as uow:
        second = handlers.report_incident(_cmd(client_report_id="r-2", description="另一处垃圾"), uow)
        assert [e.incident_id for e in uow.emitted] == ["GL20260601-000000000001"]
    assert second.incident_id == "GL20260601-000000000001" and not second.duplicate
    assert [decode_event(r.payload).incident_id for r in _outbox(engine)] == [first.incident_id, second.incident_id]
    with UnitOfWork(engine) as uow:
        assert handlers.get_incident(first.incident_id, uow).description == "垃圾"  # the first report untouched
        assert handlers.get_incident(second.incident_id, uow).description == "另一处垃圾"


# -- who sees a reporter's contact -----------------------------------------------------------------------------


def _principal(role: Role, subject: str, **kw: Any) -> Principal:
    return Principal(token_id=f"t-{subject}", role=role, subject=subject, **kw)


CALLER = "13912345678"
"""A 12345 caller's phone number: the hotline desk reports the call with it as reporter_id."""


def _dispatched_call(engine: Engine, clock: FakeClock, actor: Actor | None) -> str:
    """A 12345 call reported (by the desk, or by a gateway naming the caller as actor), filed in gh01, dispatched
    to city_ops."""
    cmd = _cmd(source="hotline_12345", reporter_id=CALLER, client_report_id="call-1", description="路口垃圾")
    with UnitOfWork(engine, clock=clock) as uow:
        incident_id = handlers.report_incident(cmd, uow, actor).incident_id
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
    bus = MessageBus(lambda: UnitOfWork(engine, clock=clock), handlers.HANDLERS)
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
    with UnitOfWork(engine) as uow:
        for who in staff:
            view = handlers.get_incident(incident_id, uow, who)
            assert view.source == "hotline_12345" and view.reporter_id is None, who.role
            assert CALLER not in view.model_dump_json(), who.role  # nor as the actor of the report
            [listed] = handlers.list_incidents(uow, None, 10, 0, who)
            assert listed.incident_id == incident_id
        for who in (_principal(Role.OPS_CENTER, "duty-desk"), _principal(Role.ADMIN, "root")):
            assert handlers.get_incident(incident_id, uow, who).reporter_id == CALLER


def test_a_grid_workers_own_id_stays_visible_to_the_staff_of_the_case(engine: Engine, clock: FakeClock) -> None:
    incident_id, reported, bus = _reported_and_fold(engine, clock)
    for event in (reported, _dispatched(reported, clock.advance(hours=24))):
        bus.handle(event)
    with UnitOfWork(engine) as uow:
        view = handlers.get_incident(incident_id, uow, _principal(Role.DEPARTMENT, "staff-7", department="city_ops"))
    assert view.reporter_id == "w-gh01-1" and view.timeline[0].actor_id == "w-gh01-1"
