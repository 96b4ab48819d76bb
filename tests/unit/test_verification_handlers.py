"""verification's handlers over a SQLite database, without a broker: what they load and save, what they emit and
how a refusal of the rules is answered. The rules themselves are tested in ``test_verification_domain``."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy.engine import Engine

from schemas import GAOHANG, Actor, ActorKind, Event, Location, Town, VerificationStatus
from schemas import events as ev
from schemas.reference import Grid
from services.common.bus import MessageBus
from services.common.db import UnitOfWork, create_tables, make_engine
from services.common.errors import Forbidden, NotFound, PoisonMessage, Rejected
from services.verification import handlers
from services.verification.agents import PRELOAD, bind
from services.verification.domain import Rules
from services.verification.handlers import Caller
from services.verification.models import TABLES, FailRequest, PassRequest, PassVerifications
from services.verification.store import VerificationStore

T0 = datetime(2024, 5, 6, 9, 0, tzinfo=UTC)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'verification.sqlite'}")
    create_tables(engine, TABLES)
    yield engine
    engine.dispose()


@pytest.fixture
def bus(engine: Engine) -> MessageBus:
    return MessageBus(lambda: UnitOfWork(engine), bind(GAOHANG), PRELOAD)  # as the service has it


RULES = Rules(GAOHANG)


def requested(verification_id: str = "GL20240506-AB12CD34-v1", **fields: Any) -> ev.VerificationRequested:
    values: dict[str, Any] = dict(
        incident_id="GL20240506-AB12CD34",
        actor=Actor.system("dispatch"),
        correlation_id="GL20240506-AB12CD34",
        occurred_at=T0,
        verification_id=verification_id,
        grid_id="gh01",
        worker_id="w-gh01-2",
        category_code="exposed_garbage",
        location=Location(lat=31.275, lon=121.565, address="华高路 1 号"),
        description="garbage by the gate",
        work_order_ids=["GL20240506-AB12CD34-1"],
        evidence_urls=["https://example.org/after.jpg"],
        round=1,
    )
    values.update(fields)
    return ev.VerificationRequested(**values)


def command(engine: Engine, handler: Any, *args: Any) -> tuple[Any, list[Event]]:
    """A command as the service runs it (``Runtime.command``): through the bus, committed unless it raises."""
    return MessageBus(lambda: UnitOfWork(engine), {}).execute(handler, *args)


def decide_pass(
    engine: Engine, verification_id: str, worker_id: str, note: str = "", caller: Caller = Caller()
) -> tuple[Any, list[Event]]:
    cmd = PassRequest(worker_id=worker_id, note=note)
    return command(engine, handlers.pass_verification, verification_id, cmd, caller, RULES)


def decide_fail(
    engine: Engine, verification_id: str, worker_id: str, note: str, caller: Caller = Caller()
) -> tuple[Any, list[Event]]:
    cmd = FailRequest(worker_id=worker_id, note=note)
    return command(engine, handlers.fail_verification, verification_id, cmd, caller, RULES)


def pass_many(engine: Engine, cmd: PassVerifications, caller: Caller = Caller()) -> tuple[Any, list[Event]]:
    return command(engine, handlers.pass_verifications, cmd, caller, RULES)


def task(engine: Engine, verification_id: str) -> Any:
    with UnitOfWork(engine) as uow:
        return handlers.get_verification(verification_id, None, uow)


# -- tasks from VerificationRequested ------------------------------------------------------------------


def test_request_opens_a_pending_task(engine: Engine, bus: MessageBus) -> None:
    event = requested()
    assert bus.handle(event) == []

    t = task(engine, event.verification_id)
    assert t.status == VerificationStatus.PENDING
    assert (t.incident_id, t.correlation_id, t.grid_id, t.worker_id) == (
        "GL20240506-AB12CD34",
        "GL20240506-AB12CD34",
        "gh01",
        "w-gh01-2",
    )
    assert (t.category_code, t.lat, t.lon, t.address) == ("exposed_garbage", 31.275, 121.565, "华高路 1 号")
    assert t.description == "garbage by the gate"
    assert t.work_order_ids == ["GL20240506-AB12CD34-1"]
    assert t.evidence_urls == ["https://example.org/after.jpg"]
    assert t.round == 1
    assert t.requested_at == T0
    assert (t.decided_at, t.decided_by, t.note) == (None, None, "")


def test_redelivered_request_changes_nothing(engine: Engine, bus: MessageBus) -> None:
    event = requested()
    bus.handle(event)
    bus.handle(event)  # the same record delivered again
    # the same verification asked for again under a new event id, with other details
    bus.handle(requested(description="something else", worker_id="w-gh01-1"))

    with UnitOfWork(engine) as uow:
        tasks = handlers.list_verifications(uow)
    assert len(tasks) == 1
    assert (tasks[0].description, tasks[0].worker_id) == ("garbage by the gate", "w-gh01-2")


def test_a_batch_reads_its_tasks_at_once_and_applies_as_one_at_a_time_would(engine: Engine, bus: MessageBus) -> None:
    """One batch: a task already open asked for again, a new one, and the new one repeated under another event id."""
    bus.handle(requested())
    batch = [
        requested(description="something else"),
        requested("GL20240506-AB12CD34-v2", round=2),
        requested("GL20240506-AB12CD34-v2", round=2, worker_id="w-gh01-1"),
    ]
    assert bus.handle_batch(batch) == []
    with UnitOfWork(engine) as uow:
        tasks = handlers.list_verifications(uow)
    assert [(t.verification_id, t.description, t.worker_id) for t in tasks] == [
        ("GL20240506-AB12CD34-v1", "garbage by the gate", "w-gh01-2"),
        ("GL20240506-AB12CD34-v2", "garbage by the gate", "w-gh01-2"),
    ]


def test_request_for_an_already_decided_task_does_not_reopen_it(engine: Engine, bus: MessageBus) -> None:
    bus.handle(requested())
    decide_pass(engine, "GL20240506-AB12CD34-v1", "w-gh01-2")
    bus.handle(requested())
    assert task(engine, "GL20240506-AB12CD34-v1").status == VerificationStatus.PASSED


def test_request_for_an_unknown_grid_is_poison(bus: MessageBus) -> None:
    with pytest.raises(PoisonMessage, match="unknown grid"):
        bus.handle(requested(grid_id="nowhere"))


def test_outcomes_coming_back_on_the_topic_are_ignored(engine: Engine, bus: MessageBus) -> None:
    bus.handle(requested())
    _, (passed,) = decide_pass(engine, "GL20240506-AB12CD34-v1", "w-gh01-2")
    assert not bus.handles(passed)
    assert bus.handle(passed) == []


# -- pass ------------------------------------------------------------------------------------------


def test_pass_emits_verification_passed_and_decides_the_task(engine: Engine, bus: MessageBus) -> None:
    request = requested()
    bus.handle(request)

    decided, emitted = decide_pass(engine, request.verification_id, "w-gh01-2", note="clean now")

    assert (decided.verification_id, decided.status) == (request.verification_id, "passed")
    assert len(emitted) == 1
    event = emitted[0]
    assert isinstance(event, ev.VerificationPassed)
    assert event.verification_id == request.verification_id
    assert event.incident_id == request.incident_id
    assert event.correlation_id == request.correlation_id
    assert event.causation_id == request.event_id
    assert event.actor == Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-2")
    assert event.note == "clean now"

    t = task(engine, request.verification_id)
    assert (t.status, t.decided_by, t.note) == ("passed", "w-gh01-2", "clean now")
    assert t.decided_at is not None and t.decided_at.tzinfo is not None


def test_pass_is_published_through_the_outbox(engine: Engine, bus: MessageBus) -> None:
    from sqlmodel import Session, select

    from services.common.db import OutboxRecord

    bus.handle(requested())
    _, (event,) = decide_pass(engine, "GL20240506-AB12CD34-v1", "w-gh01-2")
    with Session(engine) as s:
        rows = s.exec(select(OutboxRecord)).all()
    assert [(r.event_id, r.type, r.incident_id) for r in rows] == [
        (event.event_id, "VerificationPassed", "GL20240506-AB12CD34")
    ]
    assert rows[0].topics.split(",")[0].endswith(".verification")


@pytest.mark.parametrize("decide", [decide_pass, decide_fail])
def test_a_decision_the_rules_refuse_is_forbidden_and_changes_nothing(
    engine: Engine, bus: MessageBus, decide: Any
) -> None:
    bus.handle(requested())  # asked of w-gh01-2
    with pytest.raises(Forbidden, match="assigned to w-gh01-2"):
        decide(engine, "GL20240506-AB12CD34-v1", "w-gh01-1", "looks fine")
    with pytest.raises(Forbidden, match="assigned to w-gh01-2"):  # nor an administrator for them
        decide(engine, "GL20240506-AB12CD34-v1", "w-gh01-1", "x", Caller(actor=Actor.system("admin")))
    cmd = PassVerifications(verification_ids=["GL20240506-AB12CD34-v1"], worker_id="w-gh01-1")
    done, emitted = pass_many(engine, cmd, Caller(grids=("gh01",)))
    assert [(r.code, r.status) for r in done.results] == [(403, None)] and emitted == []
    assert task(engine, "GL20240506-AB12CD34-v1").status == "pending"
    decided, (event,) = decide_pass(engine, "GL20240506-AB12CD34-v1", "w-gh01-2")
    assert decided.status == "passed" and event.actor.id == "w-gh01-2"


def test_the_rules_given_are_the_ones_decided_by(engine: Engine, bus: MessageBus) -> None:
    """The service's verifier policy reaches the rules (which are tested in test_verification_domain)."""
    bus.handle(requested("by-w1", reporter_id="w-gh01-1"))  # asked of w-gh01-2

    def decide(rules: Rules, worker_id: str) -> str:
        cmd = PassRequest(worker_id=worker_id)
        decided, _ = command(engine, handlers.pass_verification, "by-w1", cmd, Caller(), rules)
        return str(decided.status)

    with pytest.raises(Forbidden, match="w-gh01-1 reported"):
        decide(Rules(GAOHANG, "grid"), "w-gh01-1")
    with pytest.raises(Forbidden, match="assigned to w-gh01-2"):
        decide(Rules(GAOHANG, "assigned"), "w-gh01-1")
    assert decide(Rules(GAOHANG, "grid"), "w-gh01-2") == "passed"


def test_the_towns_grids_are_the_ones_a_request_is_opened_in(engine: Engine) -> None:
    tiny = Town(
        "tiny", "小镇", "Tiny", {}, {}, {"zz01": Grid.box("zz01", "一格", "Cell", 30.0, 120.0, 30.1, 120.1, ())}
    )
    bus = MessageBus(lambda: UnitOfWork(engine), bind(tiny), PRELOAD)
    bus.handle(requested("in-tiny", grid_id="zz01"))
    assert task(engine, "in-tiny").grid_id == "zz01"
    with pytest.raises(PoisonMessage, match="unknown grid 'gh01'"):
        bus.handle(requested())


def test_pass_note_is_optional() -> None:
    assert PassRequest(worker_id="w-gh01-2").note == ""


# -- fail ------------------------------------------------------------------------------------------


def test_fail_emits_verification_failed_with_the_note(engine: Engine, bus: MessageBus) -> None:
    request = requested(round=2, verification_id="GL20240506-AB12CD34-v2")
    bus.handle(request)

    decided, emitted = decide_fail(engine, request.verification_id, "w-gh01-2", "  still piled up  ")

    assert (decided.verification_id, decided.status) == (request.verification_id, "failed")
    (event,) = emitted
    assert isinstance(event, ev.VerificationFailed)
    assert (event.incident_id, event.correlation_id, event.causation_id) == (
        request.incident_id,
        request.correlation_id,
        request.event_id,
    )
    assert event.actor == Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-2")
    assert event.verification_id == request.verification_id
    assert event.note == "still piled up"

    t = task(engine, request.verification_id)
    assert (t.status, t.decided_by, t.note, t.round) == ("failed", "w-gh01-2", "still piled up", 2)


@pytest.mark.parametrize("note", ["", "   ", "x" * 1001])
def test_fail_needs_a_note_of_at_most_1000_characters(note: str) -> None:
    with pytest.raises(ValidationError):
        FailRequest(worker_id="w-gh01-2", note=note)


def test_requests_forbid_unknown_fields_and_bound_their_values() -> None:
    with pytest.raises(ValidationError):
        PassRequest.model_validate({"worker_id": "w-gh01-2", "verdict": "ok"})
    with pytest.raises(ValidationError):
        PassRequest(worker_id="w-gh01-2", note="x" * 1001)
    with pytest.raises(ValidationError):
        PassRequest(worker_id="")
    with pytest.raises(ValidationError):
        FailRequest(worker_id="w gh01 2", note="bad id")


# -- who and when ------------------------------------------------------------------------------------


@pytest.mark.parametrize("decide", [decide_pass, decide_fail])
def test_a_worker_of_another_grid_is_forbidden(engine: Engine, bus: MessageBus, decide: Any) -> None:
    bus.handle(requested())
    with pytest.raises(Forbidden, match="gh01"):
        decide(engine, "GL20240506-AB12CD34-v1", "w-gh02-1", "looks fine")
    with pytest.raises(Forbidden):
        decide(engine, "GL20240506-AB12CD34-v1", "someone-else", "looks fine")
    t = task(engine, "GL20240506-AB12CD34-v1")
    assert (t.status, t.decided_by) == ("pending", None)


@pytest.mark.parametrize("decide", [decide_pass, decide_fail])
def test_a_task_outside_the_workers_grids_answers_as_an_unknown_one(
    engine: Engine, bus: MessageBus, decide: Any
) -> None:
    """A 403 would tell that the task exists and, from who may decide it, in which grid: a worker of another grid
    is answered as for an id that names nothing; and so is a read of it."""
    bus.handle(requested())
    refusals = []
    for verification_id in ("GL20240506-AB12CD34-v1", "GL20240506-NOSUCH-v1"):
        with pytest.raises(NotFound) as refused:
            decide(engine, verification_id, "w-gh02-1", "x", Caller(grids=("gh02",)))
        with UnitOfWork(engine) as uow, pytest.raises(NotFound) as unread:
            handlers.get_verification(verification_id, ("gh02",), uow)
        assert str(unread.value) == str(refused.value)
        refusals.append(str(refused.value).replace(verification_id, "?"))
    assert refusals[0] == refusals[1]
    with UnitOfWork(engine) as uow:
        assert handlers.get_verification("GL20240506-AB12CD34-v1", ("gh02", "gh01"), uow).grid_id == "gh01"
    assert task(engine, "GL20240506-AB12CD34-v1").status == "pending"


@pytest.mark.parametrize("first", [decide_pass, decide_fail])
@pytest.mark.parametrize("second", [decide_pass, decide_fail])
def test_a_decided_task_is_rejected(engine: Engine, bus: MessageBus, first: Any, second: Any) -> None:
    bus.handle(requested())
    first(engine, "GL20240506-AB12CD34-v1", "w-gh01-2", "first")
    before = task(engine, "GL20240506-AB12CD34-v1")
    with pytest.raises(Rejected, match="already"):
        second(engine, "GL20240506-AB12CD34-v1", "w-gh01-2", "second")
    assert task(engine, "GL20240506-AB12CD34-v1") == before


@pytest.mark.parametrize("decide", [decide_pass, decide_fail])
def test_an_unknown_verification_is_not_found(engine: Engine, decide: Any) -> None:
    with pytest.raises(NotFound):
        decide(engine, "no-such-task", "w-gh01-2", "x")
    with pytest.raises(NotFound), UnitOfWork(engine) as uow:
        handlers.get_verification("no-such-task", None, uow)


def test_a_rejected_decision_emits_nothing(engine: Engine, bus: MessageBus) -> None:
    from sqlmodel import Session, select

    from services.common.db import OutboxRecord

    bus.handle(requested())
    decide_pass(engine, "GL20240506-AB12CD34-v1", "w-gh01-2")
    for attempt in (decide_pass, decide_fail):
        with pytest.raises(Rejected):
            attempt(engine, "GL20240506-AB12CD34-v1", "w-gh01-2", "again")
    with Session(engine) as s:
        assert [r.type for r in s.exec(select(OutboxRecord)).all()] == ["VerificationPassed"]


def test_an_administrator_deciding_for_the_worker_is_recorded_as_itself_on_their_behalf(
    engine: Engine, bus: MessageBus
) -> None:
    bus.handle(requested())  # asked of w-gh01-2
    admin = Actor(kind=ActorKind.SYSTEM, id="admin")
    _, (event,) = decide_pass(engine, "GL20240506-AB12CD34-v1", "w-gh01-2", "seen on the camera", Caller(actor=admin))
    assert event.actor == Actor(kind=ActorKind.SYSTEM, id="admin", on_behalf_of="w-gh01-2")
    t = task(engine, "GL20240506-AB12CD34-v1")
    assert (t.status, t.decided_by, t.decided_on_behalf_of) == ("passed", "admin", "w-gh01-2")


def test_a_worker_deciding_is_recorded_as_themselves(engine: Engine, bus: MessageBus) -> None:
    bus.handle(requested())
    worker = Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-2")
    _, (event,) = decide_fail(engine, "GL20240506-AB12CD34-v1", "w-gh01-2", "no", Caller(("gh01",), worker))
    assert event.actor == worker and event.actor.on_behalf_of is None
    t = task(engine, "GL20240506-AB12CD34-v1")
    assert (t.decided_by, t.decided_on_behalf_of) == ("w-gh01-2", None)


# -- the queue -------------------------------------------------------------------------------------


def test_queue_by_worker_grid_and_status_oldest_first(engine: Engine, bus: MessageBus) -> None:
    bus.handle(requested("c-v1", incident_id="c", correlation_id="c", occurred_at=T0 + timedelta(minutes=2)))
    bus.handle(requested("a-v1", incident_id="a", correlation_id="a", occurred_at=T0))
    bus.handle(
        requested(
            "b-v1", incident_id="b", correlation_id="b", occurred_at=T0 + timedelta(minutes=1), worker_id="w-gh01-1"
        )
    )
    bus.handle(
        requested(
            "d-v1",
            incident_id="d",
            correlation_id="d",
            occurred_at=T0,
            grid_id="gh02",
            worker_id="w-gh02-1",
            location=Location(lat=31.275, lon=121.58),
        )
    )
    decide_fail(engine, "c-v1", "w-gh01-2", "not done")

    def ids(**filters: Any) -> list[str]:
        with UnitOfWork(engine) as uow:
            return [t.verification_id for t in handlers.list_verifications(uow, **filters)]

    assert ids() == ["a-v1", "d-v1", "b-v1", "c-v1"]
    assert ids(worker_id="w-gh01-2") == ["a-v1", "c-v1"]
    assert ids(worker_id="w-gh01-2", status="pending") == ["a-v1"]
    assert ids(grid_id="gh01") == ["a-v1", "b-v1", "c-v1"]
    assert ids(grid_id="gh02") == ["d-v1"]
    assert ids(status="failed") == ["c-v1"]
    assert ids(limit=2, offset=1) == ["d-v1", "b-v1"]


def test_a_new_task_wakes_whoever_waits_on_its_grid_once_committed(engine: Engine) -> None:
    woken: list[set[str]] = []
    bus = MessageBus(lambda: UnitOfWork(engine, on_commit=woken.append), bind(GAOHANG))
    bus.handle(requested())
    assert woken == [{"verifications:gh01", "verifications:*"}]
    bus.handle(requested())  # redelivered: nothing changed, nobody woken
    assert len(woken) == 1


def test_of_two_decisions_at_once_the_later_is_refused(
    engine: Engine, bus: MessageBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # both read the task pending (two instances of verification on one database, a worker deciding twice from two
    # devices); the first decision lands, the second finds the row no longer pending and changes nothing
    bus.handle(requested("V-1"))
    read = VerificationStore.task

    def read_then_lose_the_race(store: VerificationStore, verification_id: str) -> Any:
        seen = read(store, verification_id)
        assert seen is not None and seen.status == VerificationStatus.PENDING
        monkeypatch.setattr(VerificationStore, "task", read)  # the other worker's decision reads for real
        decided, _ = decide_fail(engine, "V-1", "w-gh01-2", "still there")
        assert decided.status == VerificationStatus.FAILED
        return seen

    monkeypatch.setattr(VerificationStore, "task", read_then_lose_the_race)
    with UnitOfWork(engine) as late:
        with pytest.raises(Rejected, match="decided meanwhile"):
            handlers.pass_verification("V-1", PassRequest(worker_id="w-gh01-2"), Caller(), RULES, late)
        assert late.emitted == []
    decided_task = task(engine, "V-1")
    assert (decided_task.status, decided_task.decided_by, decided_task.note) == (
        VerificationStatus.FAILED,
        "w-gh01-2",
        "still there",
    )


# -- passing several at once (批量核查) ---------------------------------------------------------------------


def test_passing_many_decides_each_as_one_would_and_refuses_the_rest_alone(engine: Engine, bus: MessageBus) -> None:
    mine = [requested(f"GL-{n}-v1", incident_id=f"GL-{n}", correlation_id=f"GL-{n}") for n in (1, 2, 3)]
    other = requested("GL-4-v1", incident_id="GL-4", correlation_id="GL-4", grid_id="gh02")
    for r in (*mine, other):
        bus.handle(r)
    decide_fail(engine, "GL-3-v1", "w-gh01-2", "still there")
    ids = ["GL-1-v1", "GL-2-v1", "GL-3-v1", "GL-4-v1", "GL-404-v1"]
    done, emitted = pass_many(engine, PassVerifications(verification_ids=ids, worker_id="w-gh01-2"))
    assert (done.done, done.refused) == (2, 3)
    assert [(r.id, r.status, r.code) for r in done.results] == [
        ("GL-1-v1", "passed", None),
        ("GL-2-v1", "passed", None),
        ("GL-3-v1", None, 409),
        ("GL-4-v1", None, 403),
        ("GL-404-v1", None, 404),
    ]
    assert [(type(e), e.verification_id, e.causation_id) for e in emitted] == [  # type: ignore[attr-defined]
        (ev.VerificationPassed, "GL-1-v1", mine[0].event_id),
        (ev.VerificationPassed, "GL-2-v1", mine[1].event_id),
    ]
    assert [task(engine, i).status for i in ids[:4]] == ["passed", "passed", "failed", "pending"]


def test_a_worker_passes_many_only_in_their_own_grids(engine: Engine, bus: MessageBus) -> None:
    bus.handle(requested("GL-1-v1", incident_id="GL-1", correlation_id="GL-1"))
    cmd = PassVerifications(verification_ids=["GL-1-v1"], worker_id="w-gh02-1")
    done, _ = pass_many(engine, cmd, Caller(grids=("gh02",)))
    assert [(r.code, r.status, r.error) for r in done.results] == [(404, None, "no verification GL-1-v1")]
    assert task(engine, "GL-1-v1").status == "pending"


@pytest.mark.parametrize("ids", [[], ["a", "a"], [f"v{n}" for n in range(101)], ["no spaces"]])
def test_a_batch_of_verifications_names_each_once_and_at_most_a_hundred(ids: list[str]) -> None:
    with pytest.raises(ValidationError):
        PassVerifications(verification_ids=ids)
