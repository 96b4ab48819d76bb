"""The operations center's rules, on plain rows: no database, no broker, no unit of work."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from types import MappingProxyType
from typing import Any

from schemas import Actor, ActorKind, Event, IncidentStatus, Location, WorkOrderStatus
from schemas import events as ev
from schemas.reference import GAOHANG, Category, Department, Grid, Town
from services.opscenter import _map, domain, views
from services.opscenter.domain import Incident, Tally, WorkOrder
from services.opscenter.kpis import P90, Dimension, Period, kpi_report, p90_bucket

T0 = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)

TOWN = Town(
    "test",
    "测试镇",
    "Test town",
    MappingProxyType({"roads": Department("roads", "路政", "Roads"), "parks": Department("parks", "绿化", "Parks")}),
    MappingProxyType(
        {
            "pothole": Category("pothole", "坑洼", "Pothole", "road", ("roads", "parks"), 2, 24.0, public=True),
        }
    ),
    MappingProxyType({"g1": Grid.box("g1", "一格", "Cell one", 10.0, 20.0, 11.0, 21.0, ("w1",))}),
)
"""A town of one grid cell, two departments and one category."""

WORKER = Actor(kind=ActorKind.GRID_WORKER, id="w1")
STAFF = Actor(kind=ActorKind.DEPARTMENT, id="s", department="roads")


def _at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def _report(lat: float = 10.5, lon: float = 20.5, iid: str = "GL-1") -> ev.IncidentReported:
    return ev.IncidentReported(
        incident_id=iid,
        actor=WORKER,
        correlation_id=iid,
        occurred_at=T0,
        source="grid_worker",
        category_code="pothole",
        location=Location(lat=lat, lon=lon, address="1 Main St"),
        description="d",
        reporter_id="w1",
        client_report_id=f"r-{iid}",
    )


def _incident(**kw: Any) -> Incident:
    fields: dict[str, Any] = {
        "incident_id": "GL-1",
        "category_code": "pothole",
        "status": IncidentStatus.REPORTED,
        "reported_at": T0,
    }
    return Incident(**{**fields, **kw})


def _order(**kw: Any) -> WorkOrder:
    fields: dict[str, Any] = {
        "work_order_id": "GL-1-1",
        "incident_id": "GL-1",
        "department_code": "roads",
        "category_code": "pothole",
        "grid_id": "g1",
        "status": WorkOrderStatus.DISPATCHED,
        "deadline": _at(24),
        "dispatched_at": T0,
    }
    return WorkOrder(**{**fields, **kw})


def _dispatched(order_id: str = "GL-1-1", department: str = "roads", deadline_h: float = 24) -> ev.WorkOrderDispatched:
    return ev.WorkOrderDispatched.following(
        _report(),
        Actor.system("dispatch"),
        occurred_at=T0,
        work_order_id=order_id,
        department_code=department,
        category_code="pothole",
        grid_id="g1",
        location=Location(lat=10.5, lon=20.5),
        description="d",
        priority=2,
        deadline=_at(deadline_h),
    )


def _on_order(cls: type[Event], hours: float, order_id: str = "GL-1-1", **kw: Any) -> Any:
    return cls.following(
        _report(), STAFF, occurred_at=_at(hours), work_order_id=order_id, department_code="roads", **kw
    )


# -- 上报: a report opens the incident ---------------------------------------------------------------------


def test_a_report_opens_the_incident_in_the_towns_grid() -> None:
    incident = domain.open_incident(_report(), TOWN)
    assert incident is not None
    assert (incident.grid_id, incident.status, incident.reported_at) == ("g1", "reported", T0)
    assert (incident.lat, incident.lon, incident.address, incident.source) == (10.5, 20.5, "1 Main St", "grid_worker")
    outside = domain.open_incident(_report(lat=50.0), TOWN)
    assert outside is not None and outside.grid_id is None
    # the grid comes from the town it is given, not from Gaohang's
    gaohang = domain.open_incident(_report(lat=31.275, lon=121.565), GAOHANG)
    assert gaohang is not None and gaohang.grid_id is not None
    assert domain.open_incident(_report(lat=31.275, lon=121.565), TOWN).grid_id is None  # type: ignore[union-attr]


def test_only_a_report_opens_an_incident_the_others_wait_for_it() -> None:
    rejected = ev.IncidentRejected.following(
        _report(), Actor.system("dispatch"), reason_code="unknown_category", reason="r"
    )
    assert domain.open_incident(rejected, TOWN) is None
    assert domain.released_by(_report()) == ("incident_id", "GL-1")
    assert domain.released_by(_dispatched()) == ("work_order_id", "GL-1-1")
    assert domain.released_by(rejected) is None


def test_a_work_orders_events_wait_for_its_dispatch() -> None:
    accepted = _on_order(ev.WorkOrderAccepted, 1)
    assert domain.work_order_of(accepted) == "GL-1-1"
    assert domain.waits_for_order(accepted, None)
    assert not domain.waits_for_order(accepted, _order())
    for cls, kw in (
        (ev.WorkOrderReturned, {"reason": "r"}),
        (ev.WorkOrderHandled, {"result": "r"}),
        (ev.IncidentReworked, {"rework_count": 1, "note": "n", "deadline": _at(30)}),
        (ev.ExtensionGranted, {"new_deadline": _at(30)}),
        (ev.OverdueReminded, {"deadline": _at(1), "overdue_s": 1.0}),
    ):
        assert domain.waits_for_order(_on_order(cls, 1, **kw), None), cls
    escalated = ev.IncidentEscalated.following(
        _report(), Actor.system("dispatch"), reason_code="overdue", reason="r", work_order_id="GL-1-1"
    )
    assert not domain.waits_for_order(escalated, None)  # it marks the incident, with or without its work order
    assert domain.work_order_of(_report()) is None


# -- the status follows the loop until it is final ------------------------------------------------------


def test_the_status_after_each_event_of_the_open_loop() -> None:
    incident, order = _incident(), _order()
    filed = ev.IncidentFiled.following(
        _report(), Actor.system("dispatch"), category_code="pothole", grid_id="g1", priority=2, severity="normal"
    )
    domain.fold(filed, incident, None)
    assert (incident.status, incident.filed_at) == (IncidentStatus.FILED, filed.occurred_at)
    domain.fold(_dispatched(), incident, None)
    assert incident.status == "dispatched"
    domain.fold(_on_order(ev.WorkOrderAccepted, 1), incident, order)
    assert incident.status == "in_progress"
    domain.fold(_on_order(ev.WorkOrderReturned, 2, reason="r"), incident, order)
    assert incident.status == "in_progress"  # a return leaves the status as it was
    domain.fold(_on_order(ev.WorkOrderHandled, 3, result="r"), incident, order)
    assert incident.status == "handled"


def test_a_final_status_is_never_reopened() -> None:
    for final, event in (
        ("rejected", ev.IncidentRejected.following(_report(), WORKER, reason_code="unknown_category", reason="r")),
        ("merged", ev.IncidentMerged.following(_report(), WORKER, into_incident_id="GL-0", distance_m=3.0)),
    ):
        incident = _incident()
        domain.fold(event, incident, None)
        assert incident.status == final
        assert (incident.rejected_at if final == "rejected" else incident.merged_at) == event.occurred_at
        domain.fold(_on_order(ev.WorkOrderAccepted, 5), incident, _order())
        assert incident.status == final


# -- 派遣: a dispatch adds its work order once ---------------------------------------------------------


def test_a_dispatch_adds_the_work_order_and_its_department_once_and_the_latest_deadline() -> None:
    incident = _incident()
    first = domain.fold(_dispatched("GL-1-1", "roads", 24), incident, None).order
    assert first is not None and (first.status, first.deadline, first.dispatched_at) == ("dispatched", _at(24), T0)
    assert (incident.departments, incident.deadline) == ("roads", _at(24))
    again = domain.fold(_dispatched("GL-1-1", "roads", 48), incident, first)
    assert again.order is None and incident.deadline == _at(24)  # known already: nothing changes
    second = domain.fold(_dispatched("GL-1-2", "parks", 12), incident, None).order
    assert second is not None and incident.departments == "roads parks" and incident.deadline == _at(24)
    domain.fold(_dispatched("GL-1-3", "roads", 30), incident, None)
    assert (incident.departments, incident.deadline) == ("roads parks", _at(30))


# -- 签收, 处置, 退回, 返工, 延期, 催办, 督办 ----------------------------------------------------------------------


def test_accept_and_handle_are_timed_once_from_the_dispatch() -> None:
    incident, order = _incident(), _order()
    assert domain.fold(_on_order(ev.WorkOrderAccepted, 1), incident, order).stages == [("accept", 3600.0)]
    assert domain.fold(_on_order(ev.WorkOrderAccepted, 2), incident, order).stages == []
    assert (order.status, order.accepted_at) == ("accepted", _at(1))
    assert domain.fold(_on_order(ev.WorkOrderHandled, 3, result="r"), incident, order).stages == [("handle", 10800.0)]
    assert domain.fold(_on_order(ev.WorkOrderHandled, 5, result="r"), incident, order).stages == []
    assert (order.status, order.handled_at) == ("handled", _at(3))


def test_a_return_counts_against_the_incident() -> None:
    incident, order = _incident(), _order()
    domain.fold(_on_order(ev.WorkOrderReturned, 1, reason="r"), incident, order)
    assert (order.status, order.returned_at, incident.return_count) == ("returned", _at(1), 1)


def test_a_new_deadline_clears_the_reminder_and_the_escalation() -> None:
    incident, order = _incident(deadline=_at(24)), _order()
    domain.fold(_on_order(ev.OverdueReminded, 25, deadline=_at(24), overdue_s=3600.0), incident, order)
    escalated = ev.IncidentEscalated.following(
        _report(), Actor.system("dispatch"), reason_code="overdue", reason="r", work_order_id="GL-1-1"
    )
    domain.fold(escalated, incident, order)
    assert order.reminded and order.escalated and incident.escalated
    domain.fold(_on_order(ev.ExtensionGranted, 26, new_deadline=_at(48)), incident, order)
    assert (order.deadline, incident.deadline, order.reminded, order.escalated) == (_at(48), _at(48), False, False)
    order.reminded = order.escalated = True
    domain.fold(_on_order(ev.IncidentReworked, 27, rework_count=2, note="n", deadline=_at(40)), incident, order)
    assert (order.status, order.deadline, order.reminded, order.escalated) == ("rework", _at(40), False, False)
    assert incident.deadline == _at(48) and incident.rework_count == 2 and incident.status == "rework"
    domain.fold(_on_order(ev.IncidentReworked, 28, rework_count=1, note="n", deadline=_at(60)), incident, order)
    assert incident.rework_count == 2 and incident.deadline == _at(60)  # never fewer reworks; the later deadline


def test_an_escalation_without_its_work_order_marks_the_incident() -> None:
    incident = _incident()
    escalated = ev.IncidentEscalated.following(_report(), Actor.system("dispatch"), reason_code="overdue", reason="r")
    domain.fold(escalated, incident, None)
    assert incident.escalated


# -- 核查 and 结案 -------------------------------------------------------------------------------------------


def _requested(hours: float) -> ev.VerificationRequested:
    return ev.VerificationRequested.following(
        _report(),
        Actor.system("verification"),
        occurred_at=_at(hours),
        verification_id="v1",
        grid_id="g1",
        worker_id="w1",
        category_code="pothole",
        location=Location(lat=10.5, lon=20.5),
        description="d",
    )


def test_verification_is_timed_from_its_request() -> None:
    incident = _incident()
    assert domain.fold(_requested(4), incident, None).stages == []
    assert (incident.status, incident.verifying_since) == ("verifying", _at(4))
    for cls, kw in ((ev.VerificationFailed, {"note": "n"}), (ev.VerificationPassed, {})):
        decided = cls.following(_report(), WORKER, occurred_at=_at(5), verification_id="v1", **kw)
        assert domain.fold(decided, _incident(verifying_since=_at(4)), None).stages == [("verify", 3600.0)]
        assert domain.fold(decided, _incident(), None).stages == []  # never requested: no span


def test_a_closure_closes_the_incident_and_its_handled_work_orders() -> None:
    incident = _incident(status=IncidentStatus.VERIFYING, rework_count=3)
    handled, returned = _order(status=WorkOrderStatus.HANDLED), _order(work_order_id="GL-1-2", status="returned")
    closed = ev.IncidentClosed.following(
        _report(),
        Actor.system("verification"),
        occurred_at=_at(6),
        category_code="pothole",
        grid_id="g1",
        departments=["roads"],
        reported_at=T0,
        deadline=_at(24),
        on_time=True,
        rework_count=1,
        return_count=0,
    )
    assert domain.closes_orders(closed) and not domain.closes_orders(_report())
    folded = domain.fold(closed, incident, None, [handled, returned])
    assert folded.stages == [("close", 6 * 3600.0)]
    assert (incident.status, incident.closed_at, incident.on_time) == ("closed", _at(6), True)
    assert (incident.deadline, incident.rework_count) == (_at(24), 1)  # as the closure decided them
    assert (handled.status, returned.status) == ("closed", "returned")


def test_a_row_adds_its_share_to_the_towns_days_and_takes_it_back_when_it_changes() -> None:
    tally = Tally(TOWN)
    incident = _incident(grid_id="g1", filed_at=_at(0.5), deadline=_at(20))  # T0 is 16:00 in Shanghai
    tally.incident(incident)
    today, tomorrow = date(2026, 6, 1), date(2026, 6, 2)
    assert tally.daily[(today, "grid", "g1")]["reported"] == 1
    assert tally.daily[(today, "department", "roads")]["filed"] == 1  # the category's lead department
    assert tally.due == {(tomorrow, domain.OPEN, dim, key): 1 for dim, key in _keys("roads", "g1")}
    closed = _incident(grid_id="g1", filed_at=_at(0.5), deadline=_at(20), closed_at=_at(9), on_time=True)
    closed.departments = "roads parks"
    tally.incident(incident, -1)
    tally.incident(closed)
    assert not any(tally.due.values())  # closed on its deadline day: due there because it closed there
    assert tally.daily[(today, "none", domain.TOTAL)]["reported"] == 1
    assert tally.daily[(tomorrow, "department", "parks")]["closed"] == 1  # every department that worked on it
    assert tally.daily[(tomorrow, "department", "roads")]["due_closed"] == 1
    assert tally.daily[(tomorrow, "none", domain.TOTAL)]["close_s"] == 9 * 3600.0
    tally.event(_on_order(ev.WorkOrderHandled, 2, result="done"), closed)
    assert tally.daily[(today, "department", "roads")]["handled"] == 1


def test_a_duration_bucket_holds_it_within_two_hundredths() -> None:
    for seconds in (0.5, 1.0, 59.9, 3600.0, 86400.0 * 3.3, 1e7):
        middle = domain.bucket_value(domain.bucket(seconds))
        assert abs(middle - seconds) / seconds < 0.022, seconds
    assert domain.bucket_value(domain.bucket(0.0)) == 0.0
    assert domain.bucket(100.0) < domain.bucket(105.0) < domain.bucket(108.0)


def _keys(department: str, grid: str) -> list[tuple[str, str]]:
    return [("department", department), ("category", "pothole"), ("grid", grid), ("none", domain.TOTAL)]


class TallyReads:
    """The rollups a :class:`Tally` holds, summed as the store sums its tables (the KPIs' fake repository)."""

    def __init__(self, tally: Tally, active: list[WorkOrder]) -> None:
        self.tally, self.active = tally, active

    def daily_sums(self, dim: str, start: date, split: date, end: date) -> list[tuple[str, bool, dict[str, float]]]:
        sums: dict[tuple[str, bool], dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for (day, d, key), counters in self.tally.daily.items():
            if d == dim and start <= day < end:
                for name, v in counters.items():
                    sums[(key, day >= split)][name] += v
        return [(key, side, dict(v)) for (key, side), v in sums.items()]

    def still_due(self, dim: str, start: date, split: date, end: date) -> list[tuple[str, bool, int]]:
        out: dict[tuple[str, bool], int] = defaultdict(int)
        for (deadline, closed, d, key), n in self.tally.due.items():
            current = deadline >= split
            if d == dim and start <= deadline < end and closed >= (end if current else split):
                out[(key, current)] += n
        return [(key, side, n) for (key, side), n in out.items()]

    def stage_p90(self, dim: str, span: str, previous: date, current: date) -> list[P90]:
        histograms: dict[tuple[str, bool, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for (day, d, key, stage, b), n in self.tally.stages.items():
            first = domain.first_day(span, day)
            if d == dim and first in (previous, current):
                histograms[(key, first == current, stage)][b] += n
        kept = {k: {b: n for b, n in h.items() if n} for k, h in histograms.items()}
        return [(*k, p90_bucket(h)) for k, h in kept.items() if h]

    def overdue_open(self, dim: str, now: datetime) -> list[tuple[str, int]]:
        out: dict[str, int] = defaultdict(int)
        for o in self.active:
            if o.deadline < now:
                out[{"department": o.department_code, "category": o.category_code}.get(dim, domain.TOTAL)] += 1
        return list(out.items())


# -- KPIs and views: arithmetic over typed rows -----------------------------------------------------------


def test_kpis_count_a_case_closed_early_as_due_and_cut_by_the_towns_departments() -> None:
    tally = Tally(TOWN)
    early = _incident(filed_at=_at(0.5), closed_at=_at(3), on_time=True, deadline=_at(60), departments="roads parks")
    late = _incident(incident_id="GL-2", filed_at=_at(0.5), deadline=_at(2))  # due today, still open
    order = _order(accepted_at=_at(1), handled_at=_at(2))
    for row in (early, late):
        tally.incident(row)
    tally.order(order)
    tally.event(_on_order(ev.WorkOrderHandled, 2, result="done"), early)
    report = kpi_report(TallyReads(tally, [order]), Period.DAY, date(2026, 6, 1), Dimension.DEPARTMENT, _at(7), TOWN)
    assert report.start == datetime(2026, 5, 31, 16, tzinfo=UTC)  # the town's midnight
    k = report.total.current
    assert (k.reported, k.filed, k.closed, k.closed_on_time, k.due, k.handled) == (2, 2, 1, 1, 2, 1)
    assert (k.closure_rate, k.on_time_rate, k.rework_rate, k.accurate_dispatch_rate) == (0.5, 0.5, 0.0, 1.0)
    assert k.time_to_close is not None and k.time_to_close.mean_s == 3 * 3600.0
    assert k.time_to_close.p90_s is not None and abs(k.time_to_close.p90_s - 3 * 3600.0) < 0.022 * 3 * 3600.0
    by = {r.key: r for r in report.rows}
    assert by["roads"].name_zh == "路政" and by["parks"].current.closed == 1  # every department that worked on it
    assert by["roads"].current.reported == 2  # reports count for the category's lead department
    assert k.overdue_open == 0  # the order is owed, but not past its deadline
    later = kpi_report(TallyReads(tally, [order]), Period.DAY, date(2026, 6, 2), Dimension.NONE, _at(30), TOWN)
    assert later.total.current.overdue_open == 1 and later.total.previous.closed == 1  # 环比: yesterday beside


def test_the_backlog_and_the_grids_are_the_towns() -> None:
    backlog = views.backlog({"roads": (2, 1), "elsewhere": (5, 5)}, TOWN)
    assert [(b.department_code, b.open, b.overdue) for b in backlog] == [("roads", 2, 1), ("parks", 0, 0)]
    grids = _map.grids_geojson({"g1": 1, None: 1}, TOWN)["features"]
    assert [(g["properties"]["grid_id"], g["properties"]["open"]) for g in grids] == [("g1", 1)]
    [point] = _map.points_geojson([_incident()], {"GL-1"}, TOWN, _map.MapQuery())["features"]
    assert point["properties"]["overdue"] and point["properties"]["category_zh"] == "坑洼"
