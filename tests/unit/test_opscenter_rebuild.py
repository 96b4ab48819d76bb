"""The rebuild's parts that need no broker: the replay's unit of work and batches, the fold's gate, the swap."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from schemas import Actor, ActorKind, Event, Location
from schemas import events as ev
from services.common.auth import Role, TokenStore
from services.common.bus import MessageBus
from services.common.db import UnitOfWork, make_engine
from services.common.replay import Applier, Record, ReplayUnitOfWork, absolute_url, shown_url, split
from services.opscenter.handlers import bind, preload
from services.opscenter.models import TABLES
from services.opscenter.store import OpsStore, fresh_read_model, holds_read_model, log_positions
from services.opscenter.swap import FoldGate

MakeDb = Callable[[tuple[sa.Table, ...]], Engine]
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
TOPIC = "t.incidents.lifecycle"


def _report(n: int) -> ev.IncidentReported:
    iid = f"GL-{n}"
    return ev.IncidentReported(
        incident_id=iid,
        occurred_at=T0 + timedelta(minutes=n),
        actor=Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-1"),
        correlation_id=iid,
        source="grid_worker",
        category_code="exposed_garbage",
        location=Location(lat=31.275, lon=121.565),
        description="垃圾",
        reporter_id="w-gh01-1",
        client_report_id=f"r{n}",
    )


def _filed(report: ev.IncidentReported) -> ev.IncidentFiled:
    return ev.IncidentFiled.following(
        report,
        Actor.system("dispatch"),
        occurred_at=report.occurred_at + timedelta(minutes=1),
        category_code=report.category_code,
        grid_id="gh01",
        priority=3,
        severity="normal",
    )


def _count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(f"select count(*) from {table}")).scalar_one())


@pytest.fixture
def model(make_db: MakeDb) -> Engine:
    return make_db(TABLES)


def _bus(engine: Engine, save: Callable[[UnitOfWork], None] | None = None) -> MessageBus:
    return MessageBus(lambda: ReplayUnitOfWork(engine, with_commit=save), bind_town(), preload)


def bind_town() -> Any:
    from schemas.reference import GAOHANG

    return bind(GAOHANG)


# -- the replay's unit of work -----------------------------------------------------------------------------------


def test_a_replay_batch_claims_each_event_once_and_writes_the_marks_at_its_commit(model: Engine) -> None:
    reports = [_report(n) for n in range(3)]
    _bus(model).handle_batch(reports[:1])
    with ReplayUnitOfWork(model) as unit:
        fresh = unit.claim_all([*reports, reports[2]])  # one applied already, one twice in the batch
        assert [e.event_id for e in fresh] == [reports[1].event_id, reports[2].event_id]
        assert _count(model, "processed_event") == 1  # not written yet: nothing holds the write lock
        unit.commit()
    assert _count(model, "processed_event") == 3


def test_a_replay_batch_that_fails_writes_neither_its_marks_nor_its_position(model: Engine) -> None:
    def save(unit: UnitOfWork) -> None:
        OpsStore(unit).save_positions(TOPIC, {0: 7})

    with pytest.raises(RuntimeError), ReplayUnitOfWork(model, with_commit=save) as unit:
        unit.claim_all([_report(1)])
        raise RuntimeError("a handler failed")
    assert _count(model, "processed_event") == 0 and log_positions(model) == {}


def test_a_mark_written_meanwhile_fails_the_batch_rather_than_applying_an_event_twice(model: Engine) -> None:
    report = _report(1)
    with ReplayUnitOfWork(model) as unit:
        assert unit.claim_all([report]) == [report]
        _bus(model).handle(report)  # someone else applies it between the look and the commit
        with pytest.raises(sa.exc.IntegrityError):
            unit.commit()
    assert _count(model, "processed_event") == 1 and _count(model, "ops_incident") == 1


# -- batches, and the fallback one at a time ---------------------------------------------------------------------


def _applier(engine: Engine) -> Applier:
    handlers = dict(bind_town())
    fold = handlers[ev.IncidentFiled]

    def refuse_a_poison(event: Event, uow: UnitOfWork) -> None:
        if event.incident_id == "GL-2":
            raise ValueError("a handler bug")
        fold(event, uow)

    handlers[ev.IncidentFiled] = refuse_a_poison
    return Applier(engine, lambda units: MessageBus(units, handlers, preload), _save)


def _save(unit: UnitOfWork, positions: Any) -> None:
    OpsStore(unit).save_positions(TOPIC, positions)


def test_a_batch_is_applied_at_once_with_where_it_ends(model: Engine) -> None:
    records = [Record(0, offset, _report(offset)) for offset in range(5)]
    assert _applier(model).apply(records, {0: 0, 1: 9}, {0: 5, 1: 9}) == 0
    assert _count(model, "ops_incident") == 5
    assert log_positions(model) == {TOPIC: {0: 5, 1: 9}}


def test_a_batch_with_an_event_no_handler_can_apply_is_applied_one_at_a_time_without_it(model: Engine) -> None:
    reports = [_report(n) for n in range(4)]
    events: list[Event] = [*reports, *(_filed(r) for r in reports)]
    records = [Record(n % 2, 10 + n, e) for n, e in enumerate(events)]
    set_aside = _applier(model).apply(records, {0: 10, 1: 11}, {0: 20, 1: 21})
    assert set_aside == 1
    with model.connect() as conn:
        statuses: dict[str, str] = dict(conn.execute(sa.text("select incident_id, status from ops_incident")).all())
    assert statuses == {"GL-0": "filed", "GL-1": "filed", "GL-2": "reported", "GL-3": "filed"}
    assert _count(model, "processed_event") == 7  # the one set aside is not marked: the live one dead-letters it
    assert log_positions(model) == {TOPIC: {0: 20, 1: 21}}  # past it, as far as the batch was read


def test_a_batch_of_records_that_all_were_set_aside_still_moves_the_position(model: Engine) -> None:
    assert _applier(model).apply([], {0: 3}, {0: 8}) == 0
    assert log_positions(model) == {TOPIC: {0: 8}}


def test_partitions_are_dealt_round_robin_to_at_most_as_many_workers() -> None:
    assert split([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert split([1, 0], 8) == [[0], [1]]
    assert split([0], 0) == [[0]]


# -- the target ---------------------------------------------------------------------------------------------------


def test_a_target_holds_a_read_model_once_it_has_a_row_of_it(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'm.sqlite'}")
    assert not holds_read_model(engine)
    fresh_read_model(engine)
    assert not holds_read_model(engine)
    with UnitOfWork(engine) as unit:
        OpsStore(unit).save_positions(TOPIC, {0: 1})
        unit.commit()
    assert not holds_read_model(engine)  # the rebuild's bookkeeping is not the model
    _bus(engine).handle(_report(1))
    assert holds_read_model(engine)


def test_urls_handed_to_the_service_name_an_absolute_file_and_are_shown_without_password(tmp_path: Path) -> None:
    assert absolute_url("sqlite:///var/db/x.sqlite") == f"sqlite:///{Path.cwd() / 'var/db/x.sqlite'}"
    assert absolute_url("sqlite:////tmp/x.sqlite") == "sqlite:////tmp/x.sqlite"
    assert shown_url("postgresql+psycopg://u:secret@h:5433/d") == "postgresql+psycopg://u:***@h:5433/d"


# -- the fold's gate -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Message:
    topic: str
    partition: int
    offset: int


async def test_a_pause_waits_for_the_batch_in_hand_then_holds_the_next_until_resumed() -> None:
    gate = FoldGate()
    applied: list[int] = []
    release = asyncio.Event()

    async def slow(messages: Sequence[Any]) -> None:
        await release.wait()
        applied.extend(m.offset for m in messages)

    async def quick(messages: Sequence[Any]) -> None:
        applied.extend(m.offset for m in messages)

    first = asyncio.create_task(gate.through([_Message(TOPIC, 0, 4)], slow))
    await asyncio.sleep(0)
    pausing = asyncio.create_task(gate.pause(30))
    await asyncio.sleep(0.01)
    assert not pausing.done()  # the batch in hand is being applied
    release.set()
    hold = await pausing
    assert applied == [4] and gate.folded == {TOPIC: {0: 5}}
    second = asyncio.create_task(gate.through([_Message(TOPIC, 1, 9)], quick))
    await asyncio.sleep(0.01)
    assert applied == [4] and not second.done()  # held
    with pytest.raises(Exception, match="held already"):
        await gate.pause(30)
    gate.resume(hold.hold_id)
    await asyncio.wait_for(second, 1)
    await first
    assert applied == [4, 9] and gate.folded == {TOPIC: {0: 5, 1: 10}}


async def test_a_hold_nobody_comes_back_to_ends_on_its_own() -> None:
    gate = FoldGate()
    hold = await gate.pause(0.05)
    gate.check(hold.hold_id)
    done: list[int] = []

    async def apply(messages: Sequence[Any]) -> None:
        done.append(1)

    await asyncio.wait_for(gate.through([_Message(TOPIC, 0, 0)], apply), 2)
    assert done == [1]
    with pytest.raises(Exception, match="no such hold"):
        gate.check(hold.hold_id)
    with pytest.raises(Exception, match="no such hold"):
        gate.check("another")


# -- the swap, in the service -------------------------------------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Any]:
    from services.opscenter.app import build
    from services.opscenter.settings import OpsCenterSettings

    runtime = build(OpsCenterSettings(var_dir=tmp_path / "live"))
    runtime.init_db()
    yield runtime
    runtime.engine.dispose()


def _rebuilt(tmp_path: Path, name: str, position: int) -> str:
    url = f"sqlite:///{tmp_path / name}"
    engine = make_engine(url)
    fresh_read_model(engine)
    with ReplayUnitOfWork(engine, with_commit=lambda u: _save_lifecycle(u, position)) as unit:
        unit.commit()
    _bus(engine).handle(_report(1))
    engine.dispose()
    return url


def _save_lifecycle(unit: UnitOfWork, position: int) -> None:
    from schemas.topics import LIFECYCLE

    OpsStore(unit).save_positions(LIFECYCLE.name, {0: position, 1: position})


async def _admin(service: Any, tmp_path: Path) -> httpx.AsyncClient:
    from services.opscenter.api import build_api

    token, _ = TokenStore(make_engine(service.settings.auth_database_url)).issue(Role.ADMIN, "admin")
    transport = httpx.ASGITransport(app=build_api(service))
    return httpx.AsyncClient(transport=transport, base_url="http://ops", headers={"Authorization": f"Bearer {token}"})


async def test_the_service_swaps_to_a_rebuilt_model_that_got_as_far_and_opens_it_again_after_a_restart(
    service: Any, tmp_path: Path
) -> None:
    from schemas.topics import LIFECYCLE
    from services.opscenter.app import build

    behind = _rebuilt(tmp_path, "behind.sqlite", 5)
    ahead = _rebuilt(tmp_path, "ahead.sqlite", 12)
    service.gate.folded = {LIFECYCLE.name: {0: 10, 1: 3}}
    async with await _admin(service, tmp_path) as admin:
        no_hold = await admin.post("/admin/read-model/swap", json={"hold_id": "x", "database_url": ahead})
        assert no_hold.status_code == 409
        hold = (await admin.post("/admin/fold/pause", json={"hold_s": 30})).json()
        assert hold["positions"] == {LIFECYCLE.name: {"0": 10, "1": 3}}
        refused = await admin.post("/admin/read-model/swap", json={"hold_id": hold["hold_id"], "database_url": behind})
        assert refused.status_code == 409 and "partition 0: 5 < 10" in refused.json()["error"]
        empty = f"sqlite:///{tmp_path / 'empty.sqlite'}"
        unusable = await admin.post("/admin/read-model/swap", json={"hold_id": hold["hold_id"], "database_url": empty})
        assert unusable.status_code == 422
        assert service.gate.held()  # every refusal left the hold as it was
        swapped = await admin.post("/admin/read-model/swap", json={"hold_id": hold["hold_id"], "database_url": ahead})
        assert swapped.status_code == 200, swapped.text
        state = (await admin.get("/admin/read-model")).json()
    assert state["database"] == ahead and state["held"] is False
    assert str(service.engine.url) == ahead and log_positions(service.engine) == {}  # now the live one
    assert service.read_model_file.read_text().strip() == ahead
    from services.opscenter.settings import OpsCenterSettings

    again = build(OpsCenterSettings(var_dir=tmp_path / "live"))
    assert str(again.engine.url) == ahead
    again.engine.dispose()


async def test_only_an_administrator_may_hold_the_fold(service: Any, tmp_path: Path) -> None:
    from services.opscenter.api import build_api

    token, _ = TokenStore(make_engine(service.settings.auth_database_url)).issue(Role.OPS_CENTER, "duty")
    transport = httpx.ASGITransport(app=build_api(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://ops") as client:
        answer = await client.post("/admin/fold/pause", json={}, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 403 and not service.gate.held()


# -- events: a field they do not have -------------------------------------------------------------------------------


def test_an_event_answers_a_field_it_lacks_as_pydantic_does() -> None:
    report = _report(1)
    assert getattr(report, "work_order_id", None) is None
    with pytest.raises(AttributeError, match="'IncidentReported' object has no attribute 'work_order_id'"):
        report.work_order_id  # type: ignore[attr-defined]  # noqa: B018
    for kind in ev.EVENT_TYPES.values():
        assert kind.__private_attributes__ == {} and kind.model_config.get("extra") == "forbid"


async def test_one_of_several_instances_swaps_nothing(tmp_path: Path) -> None:
    from services.common.errors import Rejected
    from services.opscenter.app import build
    from services.opscenter.settings import OpsCenterSettings
    from services.opscenter.swap import swap_in

    runtime = build(OpsCenterSettings(var_dir=tmp_path / "live", instance="a"))
    hold = await runtime.gate.pause(30)
    with pytest.raises(Rejected, match="several instances"):
        await swap_in(runtime, hold.hold_id, _rebuilt(tmp_path, "ahead.sqlite", 12))
    assert str(runtime.engine.url).endswith("opscenter.sqlite") and runtime.gate.held()
    runtime.engine.dispose()


async def test_a_swap_to_a_database_that_is_not_there_is_refused_without_making_it(
    service: Any, tmp_path: Path
) -> None:
    async with await _admin(service, tmp_path) as admin:
        hold = (await admin.post("/admin/fold/pause", json={"hold_s": 30})).json()
        missing = tmp_path / "nowhere" / "rebuilt.sqlite"
        answer = await admin.post(
            "/admin/read-model/swap", json={"hold_id": hold["hold_id"], "database_url": f"sqlite:///{missing}"}
        )
        assert answer.status_code == 422 and "no database file" in answer.json()["error"]
        garbled = await admin.post(
            "/admin/read-model/swap", json={"hold_id": hold["hold_id"], "database_url": "nodb://u:secret@h/x"}
        )
        assert garbled.status_code == 422 and "secret" not in garbled.text
    assert not missing.parent.exists() and service.gate.held()
