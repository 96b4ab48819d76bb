"""The simulator's pure parts: the seeded report mix and the per-department table computed from timelines."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.events import Severity, Source
from schemas.reference import GAOHANG, distance_m
from services.intake.models import ReportCreate
from services.simulator.actors import (
    DESK,
    Department,
    Urls,
    World,
    order_key,
    principals,
    reporter_subject,
    staff,
)
from services.simulator.report import department_in, department_of_actor, summarize
from services.simulator.town import (
    CATEGORY_WEIGHTS,
    DUPLICATE_MAX_M,
    UNKNOWN_CATEGORIES,
    PlannedReport,
    ReportKind,
    generate_reports,
)

N = 1000


@pytest.fixture(scope="module")
def mix() -> list[PlannedReport]:
    return generate_reports(N, seed=7)


def share(reports: list[PlannedReport], predicate: Any) -> float:
    return sum(1 for p in reports if predicate(p)) / len(reports)


# -- the report mix ---------------------------------------------------------------------------------------------


def test_same_seed_same_mix_other_seed_other_mix(mix: list[PlannedReport]) -> None:
    again = generate_reports(N, seed=7)
    assert [p.payload() for p in again] == [p.payload() for p in mix]
    other = generate_reports(N, seed=8)
    assert [p.payload() for p in other] != [p.payload() for p in mix]


def test_every_report_validates_and_ids_are_unique(mix: list[PlannedReport]) -> None:
    for p in mix:
        assert ReportCreate.model_validate(p.payload()) == p.report
    keys = Counter((p.report.reporter_id, p.report.client_report_id) for p in mix)
    assert max(keys.values()) == 1
    assert len({p.report.client_report_id for p in mix}) == N
    assert generate_reports(3, seed=1, run_id="demo42")[2].report.client_report_id == "demo42-00002"


def test_kinds_in_roughly_the_intended_proportions(mix: list[PlannedReport]) -> None:
    kinds = Counter(p.kind for p in mix)
    assert 0.015 <= kinds[ReportKind.DUPLICATE] / N <= 0.045
    assert 0.01 <= (kinds[ReportKind.OUTSIDE] + kinds[ReportKind.UNKNOWN_CATEGORY]) / N <= 0.035
    assert kinds[ReportKind.OUTSIDE] > 0 and kinds[ReportKind.UNKNOWN_CATEGORY] > 0
    assert 0.055 <= kinds[ReportKind.ON_SPOT] / N <= 0.105
    assert 0.015 <= share(mix, lambda p: p.report.severity is Severity.MAJOR) <= 0.045
    assert 0.08 <= share(mix, lambda p: p.report.source is Source.HOTLINE_12345) <= 0.30
    assert 0.03 <= share(mix, lambda p: p.report.source is Source.SENSOR) <= 0.10
    assert share(mix, lambda p: p.report.source is Source.GRID_WORKER) >= 0.6


def test_categories_favour_the_daily_load(mix: list[PlannedReport]) -> None:
    counts = Counter(p.report.category_code for p in mix if p.kind is not ReportKind.UNKNOWN_CATEGORY)
    common = (
        "exposed_garbage",
        "garbage_sorting",
        "illegal_parking",
        "shared_bikes",
        "street_vending",
        "illegal_signage",
    )
    fewer = (
        "illegal_construction",
        "group_renting",
        "river_pollution",
        "greenery_damage",
        "public_toilet",
        "idle_land",
    )
    rare = ("safety_hazard", "flooding")
    assert set(CATEGORY_WEIGHTS) == set(GAOHANG.categories)
    assert set(counts) <= set(GAOHANG.categories)
    assert sum(counts[c] for c in common) / N >= 0.6
    assert 0.1 <= sum(counts[c] for c in fewer) / N <= 0.35
    assert 0 < sum(counts[c] for c in rare) / N <= 0.04
    assert min(counts[c] for c in common) > max(counts[c] for c in rare)
    assert all(counts[c] > 0 for c in GAOHANG.categories)


def test_rejected_kinds_are_really_unfileable(mix: list[PlannedReport]) -> None:
    for p in mix:
        inside = GAOHANG.grid_at(p.report.lat, p.report.lon) is not None
        if p.kind is ReportKind.OUTSIDE:
            assert not inside and p.report.category_code in GAOHANG.categories
        elif p.kind is ReportKind.UNKNOWN_CATEGORY:
            assert inside and p.report.category_code in UNKNOWN_CATEGORIES
            assert p.report.category_code not in GAOHANG.categories
        else:
            assert inside and p.report.category_code in GAOHANG.categories
        assert p.kind.expected == {"duplicate": "merged", "outside": "rejected", "unknown_category": "rejected"}.get(
            p.kind.value, "filed"
        )


def test_duplicates_lie_within_50_m_of_a_recent_open_original(mix: list[PlannedReport]) -> None:
    dups = [p for p in mix if p.kind is ReportKind.DUPLICATE]
    assert dups
    for p in dups:
        assert p.duplicate_of is not None and p.duplicate_of < p.index
        original = mix[p.duplicate_of]
        assert original.kind is ReportKind.NORMAL
        assert 5 <= p.index - original.index <= 25
        assert original.report.category_code == p.report.category_code
        d = distance_m(original.report.lat, original.report.lon, p.report.lat, p.report.lon)
        assert d <= DUPLICATE_MAX_M + 0.5 < 50
        assert p.report.reporter_id != original.report.reporter_id
        assert not p.report.handled_on_spot


def test_on_spot_reports_come_from_the_grid_worker_with_evidence(mix: list[PlannedReport]) -> None:
    on_spot = [p for p in mix if p.report.handled_on_spot]
    assert on_spot and all(p.kind is ReportKind.ON_SPOT for p in on_spot)
    for p in on_spot:
        assert p.report.source is Source.GRID_WORKER and p.report.evidence_urls
        worker_grid = GAOHANG.grid_of_worker(p.report.reporter_id)
        assert worker_grid is not None and worker_grid.contains(p.report.lat, p.report.lon)
        assert all(str(u).startswith("https://") for u in p.report.evidence_urls)
        assert not GAOHANG.categories[p.report.category_code].big


def test_grid_workers_report_in_their_own_grid_and_descriptions_are_chinese(mix: list[PlannedReport]) -> None:
    for p in mix:
        r = p.report
        if r.source is Source.GRID_WORKER and p.kind in (ReportKind.NORMAL, ReportKind.ON_SPOT):
            grid = GAOHANG.grid_of_worker(r.reporter_id)
            assert grid is not None and grid.contains(r.lat, r.lon)
        assert any("\u4e00" <= ch <= "\u9fff" for ch in r.description)
        if r.severity is Severity.MAJOR:
            assert p.kind is ReportKind.NORMAL


# -- the table from timelines -------------------------------------------------------------------------------------

T0 = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def entry(
    kind: str, detail: str = "", actor_kind: str = "system", actor_id: str = "dispatch", t: float = 0
) -> dict[str, Any]:
    return {
        "event_id": f"{kind}-{t}",
        "type": kind,
        "occurred_at": at(t),
        "actor_kind": actor_kind,
        "actor_id": actor_id,
        "detail": detail,
    }


def incident(
    incident_id: str,
    status: str,
    timeline: list[dict[str, Any]],
    *,
    deadline: float | None = None,
    closed_at: float | None = None,
    on_spot: bool = False,
) -> dict[str, Any]:
    return {
        "incident_id": incident_id,
        "status": status,
        "handled_on_spot": on_spot,
        "timeline": timeline,
        "deadline": at(deadline) if deadline is not None else None,
        "closed_at": at(closed_at) if closed_at is not None else None,
    }


def dispatched(dept: str, t: float, role: str = "lead") -> dict[str, Any]:
    return entry("WorkOrderDispatched", f"dispatched to {dept} ({role}), due {at(t + 24)}", t=t)


def dept(kind: str, detail: str, who: str, t: float) -> dict[str, Any]:
    return entry(kind, detail, actor_kind="department", actor_id=who, t=t)


def hand_made() -> list[dict[str, Any]]:
    reported = entry("IncidentReported", actor_kind="grid_worker", actor_id="w-gh01-1")
    filed = entry("IncidentFiled", "filed in grid gh01, priority 3", t=0.1)
    return [
        # A: city_ops takes it, late (reminded, escalated), closed late
        incident(
            "A",
            "closed",
            [
                reported,
                filed,
                dispatched("city_ops", 0.2),
                dept("WorkOrderAccepted", "", "li1@city_ops", 1),
                entry("OverdueReminded", "city_ops overdue by 1 s (催办)", actor_id="dispatch-watchdog", t=25),
                entry(
                    "IncidentEscalated",
                    "escalated to the operations center (督办): city_ops is 6 s past its deadline",
                    actor_id="dispatch-watchdog",
                    t=30,
                ),
                dept("WorkOrderHandled", "city_ops: 已清运暴露垃圾", "li1@city_ops", 31),
                entry("VerificationRequested", "verification by w-gh01-2", t=31.5),
                entry("VerificationPassed", "ok", actor_kind="grid_worker", actor_id="w-gh01-2", t=32),
                entry("IncidentClosed", "closed late", t=32.1),
            ],
            deadline=24.2,
            closed_at=32.1,
        ),
        # B: public_safety returns, city_ops takes it, asks for more time (granted), verification fails once
        # (rework), then closes on time
        incident(
            "B",
            "closed",
            [
                reported,
                filed,
                dispatched("public_safety", 0.2),
                dept("WorkOrderReturned", "returned by public_safety: 不属于本部门职责", "wang2@public_safety", 1),
                dispatched("city_ops", 1.1),
                dept("WorkOrderAccepted", "", "zhao1@city_ops", 2),
                dept("ExtensionRequested", f"city_ops asks until {at(40)}: 需协调", "zhao1@city_ops", 3),
                entry(
                    "ExtensionGranted",
                    f"extension granted until {at(40)}",
                    actor_kind="ops_center",
                    actor_id="duty1@ops_center",
                    t=4,
                ),
                dept("WorkOrderHandled", "city_ops: 已劝离", "zhao1@city_ops", 10),
                entry("VerificationRequested", "verification by w-gh01-2", t=10.5),
                entry("VerificationFailed", "仍有问题", actor_kind="grid_worker", actor_id="w-gh01-2", t=11),
                entry("IncidentReworked", "back to city_ops: 仍有问题", t=11.1),
                dept("WorkOrderHandled", "city_ops: 返工：已重新处置", "zhao1@city_ops", 15),
                entry("VerificationRequested", "verification by w-gh01-2", t=15.5),
                entry("VerificationPassed", "ok", actor_kind="grid_worker", actor_id="w-gh01-2", t=16),
                entry("IncidentClosed", "closed on time", t=16.1),
            ],
            deadline=40,
            closed_at=16.1,
        ),
        # C: big incident, three departments; an extension refused; closed on time (no detail: from deadline)
        incident(
            "C",
            "closed",
            [
                reported,
                entry("IncidentFiled", "filed in grid gh02, priority 1, all-network linkage (大事全网联动)", t=0.1),
                dispatched("work_safety", 0.2),
                dispatched("public_safety", 0.2, "support"),
                dispatched("planning", 0.2, "support"),
                dept("WorkOrderAccepted", "", "chen1@planning", 0.5),
                dept("WorkOrderAccepted", "", "chen2@work_safety", 0.6),
                dept("WorkOrderAccepted", "", "liu1@public_safety", 0.7),
                dept("ExtensionRequested", f"planning asks until {at(50)}: 设备", "chen1@planning", 1),
                entry(
                    "ExtensionRefused",
                    "extension refused: 时限内可以完成",
                    actor_kind="ops_center",
                    actor_id="duty2@ops_center",
                    t=2,
                ),
                dept("WorkOrderHandled", "work_safety: 已清除", "chen2@work_safety", 5),
                dept("WorkOrderHandled", "planning: 已清除", "chen1@planning", 6),
                dept("WorkOrderHandled", "public_safety: 已清除", "liu1@public_safety", 7),
                entry("VerificationPassed", "ok", actor_kind="grid_worker", actor_id="w-gh02-1", t=8),
                entry("IncidentClosed", "", t=8.1),
            ],
            deadline=24.2,
            closed_at=8.1,
        ),
        # D: fixed on the spot, closed on time, no department involved
        incident(
            "D",
            "closed",
            [
                reported,
                entry("IncidentFiled", "filed in grid gh03, priority 4", t=0.1),
                entry("VerificationPassed", "ok", actor_kind="grid_worker", actor_id="w-gh03-2", t=2),
                entry("IncidentClosed", "closed on time", t=2.1),
            ],
            closed_at=2.1,
            on_spot=True,
        ),
        # E, F: merged, rejected
        incident("E", "merged", [reported, entry("IncidentMerged", "merged into A (12 m away)", t=0.1)]),
        incident("F", "rejected", [reported, entry("IncidentRejected", "unknown category 'noise_complaint'", t=0.1)]),
        # G: returned twice, escalated to the operations center, still open (accepted there, acceptance
        # without a signature: the pending order's department)
        incident(
            "G",
            "in_progress",
            [
                reported,
                filed,
                dispatched("city_ops", 0.2),
                dept("WorkOrderReturned", "returned by city_ops: 非本部门", "li2@city_ops", 1),
                dispatched("env_rectification", 1.1),
                dept("WorkOrderReturned", "returned by env_rectification: 非本部门", "li3@env_rectification", 2),
                entry(
                    "IncidentEscalated",
                    "escalated to the operations center (督办): returned 2 times; last: env_rectification: 非本部门",
                    t=2.1,
                ),
                dispatched("ops_center", 2.2),
                dept("WorkOrderAccepted", "", "someone", 3),
            ],
        ),
    ]


def test_department_table_from_hand_made_timelines() -> None:
    summary = summarize(hand_made())
    d = summary.departments

    city = d["city_ops"]
    assert (city.received, city.accepted, city.returned) == (3, 2, 1)
    assert (city.extensions_asked, city.extensions_granted) == (1, 1)
    assert (city.handled, city.rework, city.reminders, city.escalations) == (3, 1, 1, 1)
    assert (city.closed, city.on_time) == (2, 1)

    ps = d["public_safety"]
    assert (ps.received, ps.accepted, ps.returned, ps.handled, ps.closed, ps.on_time) == (2, 1, 1, 1, 1, 1)

    pl = d["planning"]
    assert (pl.received, pl.accepted, pl.extensions_asked, pl.extensions_granted) == (1, 1, 1, 0)
    assert (pl.closed, pl.on_time) == (1, 1)
    ws = d["work_safety"]
    assert (ws.received, ws.accepted, ws.handled, ws.closed, ws.on_time) == (1, 1, 1, 1, 1)

    env = d["env_rectification"]
    assert (env.received, env.returned, env.escalations, env.closed) == (1, 1, 1, 0)
    ops = d["ops_center"]
    assert (ops.received, ops.accepted, ops.closed) == (1, 1, 0)
    assert all(
        r.received == 0
        for code, r in d.items()
        if code not in {"city_ops", "public_safety", "planning", "work_safety", "env_rectification", "ops_center"}
    )

    total = summary.department_total()
    assert (total.received, total.accepted, total.returned, total.closed, total.on_time) == (9, 6, 3, 5, 4)
    assert (total.reminders, total.escalations, total.rework) == (1, 2, 1)

    t = summary.totals
    assert (t.reported, t.filed, t.rejected, t.merged, t.closed, t.on_time) == (7, 5, 1, 1, 4, 3)
    assert (t.on_spot, t.big, t.reworked, t.escalated, t.overdue, t.open) == (1, 1, 1, 2, 1, 1)
    assert t.on_time_rate == pytest.approx(0.75)
    assert summary.stuck == [("G", "in_progress")]


def test_closed_on_time_falls_back_to_deadline_vs_closed_at() -> None:
    late = incident(
        "L",
        "closed",
        [
            dispatched("city_ops", 0),
            dept("WorkOrderHandled", "city_ops: done", "x@city_ops", 30),
            entry("IncidentClosed", "", t=31),
        ],
        deadline=24,
        closed_at=31,
    )
    summary = summarize([late])
    assert (summary.totals.closed, summary.totals.on_time) == (1, 0)
    assert (summary.departments["city_ops"].closed, summary.departments["city_ops"].on_time) == (1, 0)


def test_department_parsing() -> None:
    assert department_in("dispatched to city_ops (lead), due 2025-06-01T08:00:24+00:00") == "city_ops"
    assert department_in("escalated to the operations center (督办): returned 2 times; last: planning: x") == "planning"
    assert department_in("escalated to the operations center (督办): x") is None
    assert department_in("returned by ops_center: 无") == "ops_center"
    assert department_of_actor("zhang1@river_chief") == "river_chief"
    assert department_of_actor("forest_chief") == "forest_chief"
    assert department_of_actor("w-gh01-1") is None
    assert department_of_actor(staff("city_ops", random.Random(1))) == "city_ops"


# -- a department's desk: its plans, without the network -----------------------------------------------------------


def desk(code: str, seed: int = 7) -> Department:
    world = World(reports=[], urls=Urls("http://i", "http://d", "http://h", "http://v"), seed=seed, business_hour_s=1.0)
    return Department(code, world, api=None, clock=lambda: 0.0)  # type: ignore[arg-type]


def order(n: int, status: str = "dispatched", deadline_in_s: float = 24.0, **extra: Any) -> dict[str, Any]:
    deadline = datetime.now(UTC) + timedelta(seconds=deadline_in_s)
    return {
        "work_order_id": f"GL-{n}-1",
        "incident_id": f"GL-{n}",
        "category_code": "exposed_garbage",
        "status": status,
        "deadline": deadline.isoformat(),
        "extension_status": "none",
        **extra,
    }


def test_departments_return_some_new_work_but_the_operations_center_never() -> None:
    city = desk("city_ops")
    actions = Counter(city.plan(o, order_key(o), 0.0).action for o in (order(n) for n in range(2000)))
    assert set(actions) == {"accept", "return"}
    assert 0.05 <= actions["return"] / 2000 <= 0.11
    for category, most in (("street_vending", 8 * 0.08), ("illegal_signage", 1.5)):
        o = order(1, category_code=category)
        assert 0.1 <= city.plan(o, order_key(o), 0.0).due <= most + 0.5
    center = desk(GAOHANG.ops_center)
    assert {center.plan(o, order_key(o), 0.0).action for o in (order(n) for n in range(500))} == {"accept"}


def test_accepted_work_is_handled_mostly_before_the_deadline_some_late_some_after_asking_more_time() -> None:
    city = desk("city_ops")
    on_time = late = extension = 0
    for n in range(2000):
        o = order(n, "accepted", deadline_in_s=24.0)
        job = city.plan(o, order_key(o), 0.0)
        if job.action == "extension":
            extension += 1
            continue
        assert job.action == "handle" and job.due > 0
        if job.due < 24.0 - 1.5:
            on_time += 1
        else:
            assert 24.0 + 0.9 <= job.due <= 24.0 + 9.1  # 1–9 business hours late: reminded, maybe escalated
            late += 1
    assert 0.03 <= extension / 2000 <= 0.08
    assert 0.07 <= late / 2000 <= 0.14
    assert on_time / 2000 >= 0.8


def test_rework_is_handled_quickly_and_never_late_and_past_deadlines_at_once() -> None:
    city = desk("city_ops")
    for n in range(300):
        o = order(n, "rework", deadline_in_s=24.0)
        job = city.plan(o, order_key(o), 0.0)
        assert job.action == "handle" and job.due <= 24.0 * 0.3 + 0.01
    overdue = order(1, "rework", deadline_in_s=-3.0)
    assert city.plan(overdue, order_key(overdue), 0.0).due <= 1.0


def test_everyone_who_calls_has_a_principal_and_reports_go_out_under_the_reporters_own_token(
    mix: list[PlannedReport],
) -> None:
    people = principals(mix)
    subjects = {p.subject for p in people}
    assert len(subjects) == len(people)
    assert {w for grid in GAOHANG.grids.values() for w in grid.workers} <= subjects
    assert DESK in subjects and {p.role for p in people if p.subject == DESK} == {"ops_center"}
    for code in GAOHANG.departments:
        clerks = [p for p in people if p.role == "department" and p.department == code]
        assert len(clerks) == 2 and all(department_of_actor(p.subject) == code for p in clerks)
    for p in mix:
        who = reporter_subject(p.report)
        if p.report.source is Source.HOTLINE_12345:
            assert who == DESK
        else:
            assert who == p.report.reporter_id and who in subjects
