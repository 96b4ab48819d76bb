"""The chaos audit on hand-made lifecycle histories: real duplicates are caught, redeliveries are not taken for
them, lost incidents are caught, services' databases are compared with the log. And the two races the chaos run
found between the instances of a pair (dispatch's watchdog reminding a late order twice, handling accepting an
order twice) stay fixed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from schemas import Actor, ActorKind, Event, Location, encode_event
from schemas import events as ev
from services.chaos.audit import LogEvent, ServiceState, audit_log, check_states, find_duplicates, transition_key
from services.chaos.cluster import _URL_PORT, _assignment_pairs, describe_parts
from services.chaos.load import Verifiers, plan_reports
from services.common.bus import MessageBus
from services.common.db import OutboxRecord, UnitOfWork
from services.common.errors import Rejected
from services.dispatch import handlers as dispatch
from services.dispatch.models import TABLES as DISPATCH_TABLES
from services.dispatch.settings import DispatchSettings
from services.dispatch.store import DispatchStore
from services.handling import handlers as handling
from services.handling.models import TABLES as HANDLING_TABLES
from services.handling.models import AcceptWorkOrder, HandleWorkOrder, RequestExtension, ReturnWorkOrder
from services.handling.settings import HandlingSettings

from .conftest import FakeClock

T0 = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
WORKER = Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-1")
DEPT = Actor(kind=ActorKind.DEPARTMENT, id="staff@city_ops", department="city_ops")
SYSTEM = Actor.system("dispatch")
WATCHDOG = Actor.system("dispatch-watchdog")
HERE = Location(lat=31.275, lon=121.565)


def rec(event: Event) -> LogEvent:
    """A lifecycle record of ``event``, as the relay publishes it."""
    return LogEvent.decode(encode_event(event))


class History:
    """One incident's events, built the way the services build them."""

    def __init__(self, incident_id: str = "GL-1") -> None:
        self.id = incident_id
        self.reported = ev.IncidentReported(
            incident_id=incident_id,
            actor=WORKER,
            correlation_id=incident_id,
            occurred_at=T0,
            source="grid_worker",
            category_code="exposed_garbage",
            location=HERE,
            description="garbage",
            reporter_id="w-gh01-1",
            client_report_id=f"c-{incident_id}",
        )
        self.deadline = T0 + timedelta(hours=24)

    def filed(self) -> ev.IncidentFiled:
        return ev.IncidentFiled.following(
            self.reported, SYSTEM, category_code="exposed_garbage", grid_id="gh01", priority=3, severity="normal"
        )

    def dispatched(self, n: int = 1) -> ev.WorkOrderDispatched:
        return ev.WorkOrderDispatched.following(
            self.reported,
            SYSTEM,
            work_order_id=f"{self.id}-{n}",
            department_code="city_ops",
            category_code="exposed_garbage",
            grid_id="gh01",
            location=HERE,
            description="garbage",
            priority=3,
            deadline=self.deadline,
        )

    def order_event(self, cls: type[Event], n: int = 1, **kw: Any) -> Event:
        return cls.following(self.reported, DEPT, work_order_id=f"{self.id}-{n}", department_code="city_ops", **kw)

    def handled(self, n: int = 1) -> Event:
        return self.order_event(ev.WorkOrderHandled, n, result="done")

    def verification(self, round_: int = 1) -> ev.VerificationRequested:
        return ev.VerificationRequested.following(
            self.reported,
            SYSTEM,
            verification_id=f"{self.id}-v{round_}",
            grid_id="gh01",
            worker_id="w-gh01-2",
            category_code="exposed_garbage",
            location=HERE,
            description="garbage",
            round=round_,
        )

    def passed(self, round_: int = 1) -> Event:
        return ev.VerificationPassed.following(self.reported, WORKER, verification_id=f"{self.id}-v{round_}")

    def failed(self, round_: int = 1) -> Event:
        return ev.VerificationFailed.following(self.reported, WORKER, verification_id=f"{self.id}-v{round_}", note="no")

    def reworked(self, count: int = 1, n: int = 1) -> Event:
        return ev.IncidentReworked.following(
            self.reported,
            SYSTEM,
            work_order_id=f"{self.id}-{n}",
            department_code="city_ops",
            rework_count=count,
            note="again",
            deadline=self.deadline + timedelta(hours=24 * count),
        )

    def reminded(self, deadline: datetime | None = None) -> Event:
        return ev.OverdueReminded.following(
            self.reported,
            WATCHDOG,
            work_order_id=f"{self.id}-1",
            department_code="city_ops",
            deadline=deadline or self.deadline,
            overdue_s=5,
        )

    def closed(self) -> ev.IncidentClosed:
        return ev.IncidentClosed.following(
            self.reported,
            SYSTEM,
            category_code="exposed_garbage",
            grid_id="gh01",
            departments=["city_ops"],
            reported_at=T0,
            deadline=self.deadline,
            on_time=True,
            rework_count=0,
            return_count=0,
        )

    def rejected(self) -> Event:
        return ev.IncidentRejected.following(self.reported, SYSTEM, reason_code="outside_grids", reason="outside")

    def full_loop(self) -> list[Event]:
        return [
            self.reported,
            self.filed(),
            self.dispatched(),
            self.order_event(ev.WorkOrderAccepted),
            self.handled(),
            self.verification(),
            self.passed(),
            self.closed(),
        ]


def audit(events: Sequence[Event | LogEvent], accepted: list[str]) -> Any:
    return audit_log([e if isinstance(e, LogEvent) else rec(e) for e in events], accepted)


# -- the audit of the log -------------------------------------------------------------------------------------


def test_a_clean_loop_has_nothing_lost_or_duplicated() -> None:
    h = History()
    result = audit(h.full_loop(), [h.id])
    assert (result.incidents, result.terminal, result.lost, result.duplicate_transitions) == (1, 1, [], 0)
    assert result.redeliveries == 0 and result.unexpected_incidents == []
    assert result.terminal_by_type == {"IncidentClosed": 1}


def test_the_same_event_delivered_twice_is_a_redelivery_not_a_duplicate() -> None:
    h = History()
    events: list[Event | LogEvent] = list(h.full_loop())
    events.insert(3, events[2])  # WorkOrderDispatched published by both relays of the pair
    events.append(events[-1])  # and the closure, again, at the end
    result = audit(events, [h.id])
    assert result.duplicate_transitions == 0
    assert (result.redeliveries, result.redelivered_events, result.records, result.events) == (2, 2, 10, 8)
    assert result.conflicting_redeliveries == []


def test_a_repeated_transition_under_another_event_id_is_a_duplicate() -> None:
    h = History()
    late = h.reminded()
    twin = late.model_copy(update={"event_id": "another-id"})  # a second watchdog reminding the same deadline
    result = audit([*h.full_loop()[:4], late, twin, *h.full_loop()[4:]], [h.id])
    assert result.duplicate_transitions == 1
    (dup,) = result.duplicates
    assert dup.extra == ["another-id"] and dup.types == ["OverdueReminded", "OverdueReminded"]
    assert result.lost == []


@pytest.mark.parametrize(
    "extra",
    [
        lambda h: h.filed(),
        lambda h: h.dispatched(),
        lambda h: h.order_event(ev.WorkOrderAccepted),
        lambda h: h.verification(),
        lambda h: h.failed(),  # a second decision on the same verification
        lambda h: h.closed(),
        lambda h: h.rejected(),  # a second terminal event of another kind
        lambda h: h.handled(),  # handled twice with no rework in between
    ],
    ids=["filed", "dispatched", "accepted", "verification", "decision", "closed", "terminal", "handled"],
)
def test_every_kind_of_duplicate_is_caught(extra: Callable[[History], Event]) -> None:
    h = History()
    events = h.full_loop()
    result = audit([*events, extra(h)], [h.id])
    assert result.duplicate_transitions == 1, [d.describe() for d in result.duplicates]
    assert transition_key(rec(events[0])) == ("IncidentReported", h.id)


def test_rework_allows_the_work_to_be_handled_and_reminded_again() -> None:
    h = History()
    events = [
        h.reported,
        h.filed(),
        h.dispatched(),
        h.order_event(ev.WorkOrderAccepted),
        h.reminded(),
        h.handled(),
        h.verification(1),
        h.failed(1),
        h.reworked(1),
        h.reminded(h.deadline + timedelta(hours=24)),  # a new deadline: a new reminder is due
        h.handled(),
        h.verification(2),
        h.passed(2),
        h.closed(),
    ]
    result = audit(events, [h.id])
    assert result.duplicate_transitions == 0, [d.describe() for d in result.duplicates]
    assert result.terminal == 1


def test_a_third_handling_after_one_rework_is_a_duplicate() -> None:
    h = History()
    events = [*h.full_loop()[:5], h.reworked(1), h.handled(), h.handled()]
    result = audit(events, [h.id])
    assert result.duplicate_transitions == 1


def test_two_incidents_made_of_one_report_are_a_duplicate() -> None:
    h = History("GL-1")
    twin = h.reported.model_copy(update={"incident_id": "GL-2", "correlation_id": "GL-2", "event_id": "twin"})
    result = audit([*h.full_loop(), twin], [h.id])
    assert result.duplicate_transitions == 1
    assert [d.key[0] for d in result.duplicates] == ["report"]
    assert result.unexpected_incidents == ["GL-2"]


def test_lost_incidents_are_caught() -> None:
    done, stuck, vanished = History("GL-1"), History("GL-2"), History("GL-3")
    events = [*done.full_loop(), *stuck.full_loop()[:5]]
    result = audit(events, [done.id, stuck.id, vanished.id])
    assert result.missing_from_log == ["GL-3"]
    assert result.not_terminal == ["GL-2"]
    assert result.lost == ["GL-2", "GL-3"]
    assert (result.incidents, result.terminal) == (3, 1)


def test_an_incident_no_one_was_told_about_is_reported_apart() -> None:
    h = History()
    result = audit(h.full_loop(), [])
    assert result.unexpected_incidents == [h.id] and result.lost == []


def test_an_event_id_reused_for_other_content_is_flagged() -> None:
    h = History()
    filed = h.filed()
    forged = filed.model_copy(update={"priority": 1})
    result = audit([h.reported, filed, forged], [h.id])
    assert result.conflicting_redeliveries == [filed.event_id]
    assert result.duplicate_transitions == 0


def test_steps_that_may_recur_are_counted_against_what_reopens_them() -> None:
    h = History()
    ask = [h.deadline + timedelta(hours=n) for n in (10, 20)]
    events = [
        h.reported,
        h.order_event(ev.ExtensionRequested, requested_deadline=ask[0], reason="permit"),
        h.order_event(ev.ExtensionRefused, reason="no"),
        h.order_event(ev.ExtensionRequested, requested_deadline=ask[1], reason="permit, really"),
        h.order_event(ev.ExtensionRefused, reason="still no"),
    ]
    assert find_duplicates([rec(e) for e in events]) == []
    third = h.order_event(ev.ExtensionRefused, reason="no, thrice")
    (dup,) = find_duplicates([rec(e) for e in [*events, third]])
    assert dup.extra == [third.event_id]


# -- services' databases against the log -------------------------------------------------------------------------


def test_service_states_that_match_the_log_agree() -> None:
    h = History()
    records = [rec(e) for e in h.full_loop()]
    ids = {r.event_id for r in records}
    state = ServiceState(
        processed=ids,
        outbox=[],
        tables={
            "intake_incident": [{"incident_id": h.id, "status": "closed"}],
            "intake_transition": [{"event_id": i} for i in ids],
        },
    )
    assert check_states(records, {"intake": state}) == {"intake": []}


def test_service_states_that_missed_an_event_or_kept_an_outbox_row_disagree() -> None:
    h = History()
    records = [rec(e) for e in h.full_loop()]
    closed = records[-1].event_id
    handling = ServiceState(
        processed={r.event_id for r in records if r.type == "WorkOrderDispatched"},  # never applied the closure
        outbox=[(records[4].event_id, True), ("never-sent", False)],
        tables={"handling_work_order": [{"work_order_id": f"{h.id}-1", "incident_id": h.id, "status": "handled"}]},
    )
    problems = check_states(records, {"handling": handling})["handling"]
    text = " | ".join(problems)
    assert "1 outbox rows never published" in text
    assert "outbox events missing from the log" in text
    assert f"events never applied (e.g. {closed})" in text
    assert "work orders of closed incidents still open" in text


# -- the plan ----------------------------------------------------------------------------------------------------


def test_an_item_is_acted_on_by_one_at_a_time_and_cancelled_when_the_load_stops() -> None:
    import asyncio

    async def scenario() -> None:
        crew = Verifiers(None, None, 7)  # type: ignore[arg-type]
        started: list[str] = []
        release = asyncio.Event()

        async def act(key: str) -> None:
            started.append(key)
            try:
                await release.wait()
            finally:
                crew.busy.discard(key)

        crew.take("v1", lambda: act("v1"))
        crew.take("v1", lambda: act("v1"))  # listed again while someone acts on it
        crew.take("v2", lambda: act("v2"))
        await asyncio.sleep(0)
        assert started == ["v1", "v2"] and crew.busy == {"v1", "v2"}
        release.set()
        await asyncio.sleep(0)
        assert crew.busy == set()
        crew.take("v1", lambda: act("v1"))  # free again: a later poll may take it (a rework's new task)
        release.clear()
        await asyncio.sleep(0)
        assert started == ["v1", "v2", "v1"]
        stop = asyncio.Event()
        stop.set()
        await crew.pause(stop)
        running = set(crew.tasks)
        crew.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        assert running and all(t.cancelled() for t in running) and crew.busy == set()

    asyncio.run(scenario())


def test_the_report_plan_reports_in_the_town_it_is_given() -> None:
    from schemas import GAOHANG, Town

    grid = next(iter(GAOHANG.grids.values()))
    category = next(iter(GAOHANG.categories.values()))
    town = Town("t", "测试镇", "Test", GAOHANG.departments, {category.code: category}, {grid.code: grid})
    plans = plan_reports(200, seed=3, town=town)
    assert {p.body["category_code"] for p in plans} == {category.code, "abandoned_spaceship"}
    assert {p.body["address"].split(" chaos")[0] for p in plans} == {grid.name_zh}


def test_the_report_plan_is_deterministic_and_mixed() -> None:
    plans = plan_reports(400, seed=3)
    assert plans == plan_reports(400, seed=3)
    kinds = {p.expect for p in plans}
    assert kinds == {"filed", "rejected", "merge", "on_spot"}
    assert len({p.body["client_report_id"] for p in plans}) == 400


# -- the races the chaos run found --------------------------------------------------------------------------------


def test_two_watchdogs_over_one_database_remind_a_late_order_once(
    make_db: Callable[[tuple[sa.Table, ...]], Engine], clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instances a and b of dispatch both run the watchdog on the shared database. b reads the late order, then a
    reminds and escalates it and commits before b writes: b must emit nothing."""
    engine = make_db(DISPATCH_TABLES)
    policy = DispatchSettings(escalate_after_hours=2)

    def uow() -> UnitOfWork:
        return UnitOfWork(engine, clock=clock)

    h = History()
    bus = MessageBus(uow, dispatch.bind(policy))
    report = h.reported.model_copy(update={"occurred_at": clock()})
    assert any(isinstance(e, ev.WorkOrderDispatched) for e in bus.handle(report))
    clock.advance(hours=30)

    emitted_by_a: list[Event] = []
    real_late_orders = DispatchStore.late_orders

    def late_orders_while_a_runs(store: DispatchStore, now: datetime) -> Any:
        seen = real_late_orders(store, now)
        monkeypatch.setattr(DispatchStore, "late_orders", real_late_orders)
        emitted_by_a.extend(bus.execute(dispatch.watch_deadlines, policy)[1])
        return seen

    monkeypatch.setattr(DispatchStore, "late_orders", late_orders_while_a_runs)
    _, emitted_by_b = bus.execute(dispatch.watch_deadlines, policy)
    assert sorted(e.type for e in emitted_by_a) == ["IncidentEscalated", "OverdueReminded"]
    assert emitted_by_b == []
    assert bus.execute(dispatch.watch_deadlines, policy) == (0, [])  # and neither reminds it again later


@pytest.mark.parametrize(
    ("first", "second"),
    [("accept", "accept"), ("handle", "handle"), ("accept", "return"), ("handle", "extension")],
)
def test_two_instances_of_handling_apply_racing_actions_on_one_order_once(
    make_db: Callable[[tuple[sa.Table, ...]], Engine],
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    first: str,
    second: str,
) -> None:
    """A department's request and its retry (or a colleague's) reach instances a and b of handling at once: b reads
    the order, a applies its action and commits, then b writes. b must be refused (409), not emit a second event."""
    engine = make_db(HANDLING_TABLES)

    def uow() -> UnitOfWork:
        return UnitOfWork(engine, clock=clock)

    h = History()
    order = h.dispatched().model_copy(update={"occurred_at": clock(), "deadline": clock() + timedelta(hours=8)})
    MessageBus(uow, handling.bind(HandlingSettings())).handle(order)
    wo = order.work_order_id
    staff = {"actor_id": "staff@city_ops", "department_code": "city_ops"}
    commands: dict[str, tuple[Any, Any]] = {
        "accept": (handling.accept_work_order, AcceptWorkOrder(**staff)),
        "handle": (handling.handle_work_order, HandleWorkOrder(result="done", **staff)),
        "return": (handling.return_work_order, ReturnWorkOrder(reason="not ours", **staff)),
        "extension": (
            handling.request_extension,
            RequestExtension(requested_deadline=clock() + timedelta(days=3), reason="permit", **staff),
        ),
    }
    bus = MessageBus(uow, {})  # a command commits through the bus
    if first == "handle":
        bus.execute(handling.accept_work_order, wo, AcceptWorkOrder(**staff))

    real_order_for = handling._order_for
    emitted_by_a: list[Event] = []

    def order_for_while_a_acts(u: UnitOfWork, work_order_id: str, cmd: Any) -> Any:
        read = real_order_for(u, work_order_id, cmd)  # b has read the order…
        monkeypatch.setattr(handling, "_order_for", real_order_for)
        fn, a_cmd = commands[first]  # …when a applies its action and commits
        emitted_by_a.extend(bus.execute(fn, wo, a_cmd)[1])
        return read

    monkeypatch.setattr(handling, "_order_for", order_for_while_a_acts)
    fn, cmd = commands[second]
    b = uow()
    with pytest.raises(Rejected, match="changed meanwhile"):
        MessageBus(lambda: b, {}).execute(fn, wo, cmd)
    assert b.emitted == [] and len(emitted_by_a) == 1
    with Session(engine) as s:
        outbox = [r.type for r in s.exec(select(OutboxRecord).order_by(col(OutboxRecord.id))).all()]
    assert outbox == (["WorkOrderAccepted"] if first == "handle" else []) + [emitted_by_a[0].type]


# -- reading consumer groups ---------------------------------------------------------------------------------------


def test_a_described_member_gives_its_partitions_and_the_port_of_its_instance() -> None:
    member = {
        "member_assignment": {
            "assigned_partitions": [{"topic": "ns.verification", "partitions": [3, 4, 5]}],
            "user_data": b"...",
        },
        "member_metadata": '\x00\x04{"assignment":{"actives":{}},"url":"http://vm:8416","topic_groups":{}}',
    }
    assert _assignment_pairs(member["member_assignment"]) == [("ns.verification", p) for p in (3, 4, 5)]
    found = _URL_PORT.search(str(member["member_metadata"]))
    assert found is not None and found.group(1) == "8416"
    assert describe_parts([("ns.incidents.lifecycle", 2), ("ns.incidents.lifecycle", 0), ("ns.verification", 1)]) == (
        "incidents.lifecycle[0,2] verification[1]"
    )


def test_the_command_line_hands_every_option_to_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from services.chaos import __main__ as cli
    from services.chaos.runner import Options

    seen: list[Options] = []

    def fake_run(options: Options, out: object) -> tuple[None, str]:
        seen.append(options)
        return None, "{}"

    monkeypatch.setattr(cli, "run_chaos", fake_run)
    args = "--incidents 50 --seed 7 --no-pairs --kills 2 --broker-kills 0 --together --first-kill-at 0.5"
    args += " --last-kill-at 0.3 --base-port 18000 --kafka-port 18092 --time-scale 60 --session-timeout 7"
    args += f" --broker-down 1 --recovery-timeout 20 --drain-timeout 30 --var-dir {tmp_path}"
    result = CliRunner().invoke(cli.app, ["run", *args.split()])
    assert result.exit_code == 1, result.output  # the fake run has no result
    assert seen == [
        Options(
            incidents=50,
            seed=7,
            pairs=False,
            kills_per_service=2,
            broker_kills=0,
            together=True,
            base_port=18000,
            kafka_port=18092,
            var_dir=tmp_path,
            time_scale=60.0,
            session_timeout_s=7.0,
            broker_down_s=1.0,
            recovery_timeout_s=20.0,
            drain_timeout_s=30.0,
            first_kill_at=0.5,
            last_kill_at=0.5,
        )
    ]
    assert CliRunner().invoke(cli.app, ["run", "--incidents", "20", "--max", "10"]).exit_code == 2
    seen.clear()
    CliRunner().invoke(cli.app, ["run"])
    assert seen == [Options()]
