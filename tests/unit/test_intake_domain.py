"""intake's rules as pure functions: plain dataclasses and events, no database, no broker, no unit of work."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import HttpUrl

from schemas import Actor, ActorKind, Event
from schemas import events as ev
from services.intake import domain
from services.intake.domain import Incident

T0 = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
DESK = Actor(kind=ActorKind.OPS_CENTER, id="ops-duty", department="ops_center")
WORKER = Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-1")
SYSTEM = Actor.system("dispatch")


@dataclass
class Sent:
    """A report as a client sends it (the shape of models.ReportCreate)."""

    category_code: str = "exposed_garbage"
    lat: float = 31.285
    lon: float = 121.575
    description: str = "垃圾"
    reporter_id: str = "w-gh01-1"
    client_report_id: str = "r-1"
    source: ev.Source = ev.Source.GRID_WORKER
    address: str = ""
    photo_urls: list[HttpUrl] = field(default_factory=list)
    severity: ev.Severity = ev.Severity.NORMAL
    handled_on_spot: bool = False
    evidence_urls: list[HttpUrl] = field(default_factory=list)


def _reported(report: Sent | None = None, by: Actor | None = None, at: datetime = T0) -> ev.IncidentReported:
    report = report or Sent()
    return domain.report_incident(report, domain.reporting_actor(report, by), at)


# -- who reports as whom -------------------------------------------------------------------------------------------


def test_grid_workers_and_sensors_report_as_themselves() -> None:
    assert domain.reporting_refusal(Sent(), WORKER) is None
    other = domain.reporting_refusal(Sent(reporter_id="w-gh01-2"), WORKER)
    assert other == "a grid_worker reports as itself: source grid_worker, reporter_id w-gh01-1"
    assert domain.reporting_refusal(Sent(source=ev.Source.HOTLINE_12345), WORKER) == other
    sensor = Actor(kind=ActorKind.SENSOR, id="s-7")
    assert domain.reporting_refusal(Sent(source=ev.Source.SENSOR, reporter_id="s-7"), sensor) is None
    assert domain.reporting_refusal(Sent(reporter_id="s-7"), sensor) == (
        "a sensor reports as itself: source sensor, reporter_id s-7"
    )


def test_the_operations_center_reports_12345_calls_and_others_any_channel() -> None:
    call = Sent(source=ev.Source.HOTLINE_12345, reporter_id="13912345678")
    assert domain.reporting_refusal(call, DESK) is None
    assert domain.reporting_refusal(Sent(), DESK) == (
        "the operations center reports 12345 hotline calls (source hotline_12345)"
    )
    app = Actor(kind=ActorKind.CITIZEN, id="fixmystreet")  # an Open311 application
    admin = Actor(kind=ActorKind.SYSTEM, id="root")
    for by in (app, admin):
        assert domain.reporting_refusal(Sent(source=ev.Source.OPEN311, reporter_id="x"), by) is None
        assert domain.reporting_refusal(call, by) is None


def test_a_desk_reporting_for_someone_is_recorded_as_itself_on_their_behalf() -> None:
    call = Sent(source=ev.Source.HOTLINE_12345, reporter_id="13912345678")
    assert domain.reporting_actor(call, DESK) == Actor(
        kind=ActorKind.OPS_CENTER, id="ops-duty", department="ops_center", on_behalf_of="13912345678"
    )
    assert domain.reporting_actor(Sent(), WORKER) == WORKER  # reporting as themselves: nobody's behalf
    assert domain.reporting_actor(call, None) == Actor(kind=ActorKind.CITIZEN, id="13912345678")
    assert domain.reporting_actor(Sent(source=ev.Source.SENSOR, reporter_id="s-1"), None).kind is ActorKind.SENSOR


# -- a report taken once -------------------------------------------------------------------------------------------


def test_a_case_number_is_the_day_and_48_random_bits() -> None:
    ids = {domain.new_incident_id(T0) for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"GL20260601-[0-9A-F]{12}", i) for i in ids)


def test_a_report_becomes_an_event_and_the_incident_it_makes() -> None:
    photo = HttpUrl("https://e.org/p.jpg")
    report = Sent(address="东靖路", photo_urls=[photo], severity=ev.Severity.MAJOR)
    event = _reported(report, DESK.on_behalf(None))
    assert event.incident_id == event.correlation_id and event.incident_id.startswith("GL20260601-")
    assert (event.occurred_at, event.category_code, event.description) == (T0, "exposed_garbage", "垃圾")
    assert event.location.address == "东靖路" and event.photo_urls == [photo]
    assert event.actor.on_behalf_of == "w-gh01-1"
    incident = domain.incident_of(event)
    assert incident == Incident(
        incident_id=event.incident_id,
        client_report_id="r-1",
        reporter_id="w-gh01-1",
        submitted_by="ops_center:ops-duty",
        source="grid_worker",
        category_code="exposed_garbage",
        lat=31.285,
        lon=121.575,
        address="东靖路",
        description="垃圾",
        photo_urls="https://e.org/p.jpg",
        severity="major",
        handled_on_spot=False,
        evidence_urls="",
        status="reported",
        status_at=T0,
        grid_id=None,
        departments="",
        deadline=None,
        overdue=False,
        escalated=False,
        rework_count=0,
        reported_at=T0,
        updated_at=T0,
        closed_at=None,
    )


def test_a_retry_by_its_sender_is_the_same_report() -> None:
    mine = domain.incident_of(_reported(by=WORKER))
    assert domain.retry_refusal(mine, Sent(), WORKER) is None
    assert domain.retry_refusal(mine, Sent(lat=31.2850000004), WORKER) is None  # the same to six decimals
    assert domain.same_report(mine, Sent(lat=31.285004)) is False


def test_a_different_report_under_the_same_id_is_refused_with_its_incident() -> None:
    mine = domain.incident_of(_reported(by=WORKER))
    refused = domain.retry_refusal(mine, Sent(description="something else"), WORKER)
    assert refused == f"client_report_id 'r-1' was already used by 'w-gh01-1' for another report ({mine.incident_id})"


def test_a_client_report_id_is_not_taken_over_by_another_caller() -> None:
    """The desk naming w-gh01-1 as reporter cannot have w-gh01-1's report answered to it, nor the other way round;
    the refusal does not say which incident it is."""
    desk = domain.reporting_actor(Sent(source=ev.Source.HOTLINE_12345), DESK)
    mine = domain.incident_of(_reported(by=WORKER))
    refused = domain.retry_refusal(mine, Sent(source=ev.Source.HOTLINE_12345), desk)
    assert refused is not None and "another caller" in refused and mine.incident_id not in refused
    desks = domain.incident_of(_reported(Sent(source=ev.Source.HOTLINE_12345), DESK))
    assert domain.retry_refusal(desks, Sent(source=ev.Source.HOTLINE_12345), WORKER) is not None
    assert domain.retry_refusal(desks, Sent(source=ev.Source.HOTLINE_12345), desk) is None


def test_a_report_of_an_earlier_version_is_retried_only_by_its_reporter() -> None:
    old = replace(domain.incident_of(_reported(by=WORKER)), submitted_by=None)
    assert domain.sent_by(old) == "grid_worker:w-gh01-1"
    assert domain.retry_refusal(old, Sent(), WORKER) is None
    desk = domain.reporting_actor(Sent(source=ev.Source.HOTLINE_12345), DESK)
    assert "another caller" in (domain.retry_refusal(old, Sent(source=ev.Source.HOTLINE_12345), desk) or "")
    call = replace(old, source="hotline_12345", reporter_id="139", submitted_by=None)
    assert domain.sent_by(call) == "citizen:139"


# -- the reporter's view of the lifecycle --------------------------------------------------------------------------


def _dispatched(
    reported: ev.IncidentReported, deadline: datetime, department: str = "city_ops", **kw: Any
) -> ev.WorkOrderDispatched:
    return ev.WorkOrderDispatched.following(
        reported,
        SYSTEM,
        work_order_id=f"{reported.incident_id}-{department}",
        department_code=department,
        category_code="exposed_garbage",
        grid_id="gh01",
        location=reported.location,
        description="d",
        priority=3,
        deadline=deadline,
        **{"occurred_at": T0 + timedelta(seconds=2), **kw},
    )


def _filed(reported: Event) -> ev.IncidentFiled:
    return ev.IncidentFiled.following(
        reported,
        SYSTEM,
        occurred_at=T0 + timedelta(seconds=1),
        category_code="exposed_garbage",
        grid_id="gh01",
        priority=3,
        severity="normal",
    )


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _closed(reported: ev.IncidentReported, deadline: datetime, **kw: Any) -> ev.IncidentClosed:
    return ev.IncidentClosed.following(
        reported,
        SYSTEM,
        category_code="exposed_garbage",
        grid_id="gh01",
        departments=["city_ops"],
        reported_at=reported.occurred_at,
        deadline=deadline,
        on_time=True,
        rework_count=0,
        return_count=0,
        **{"occurred_at": T0 + timedelta(hours=3), **kw},
    )


def _fold(incident: Incident, *events: Event) -> list[domain.Transition]:
    return [domain.fold(incident, e) for e in events]


def test_lifecycle_folds_into_status_grid_departments_deadline_and_timeline() -> None:
    reported = _reported()
    incident = domain.incident_of(reported)
    due = T0 + timedelta(hours=24)
    order = _dispatched(reported, due, occurred_at=T0 + timedelta(seconds=2))
    lines = _fold(incident, reported, _filed(reported), order)
    assert (incident.status, incident.grid_id, incident.departments, incident.deadline) == (
        "dispatched",
        "gh01",
        "city_ops",
        due,
    )
    assert incident.updated_at == order.occurred_at and incident.status_at == order.occurred_at
    assert [t.type for t in lines] == ["IncidentReported", "IncidentFiled", "WorkOrderDispatched"]
    assert lines[2].detail == f"dispatched to city_ops (lead), due {due.isoformat()}"
    assert (lines[2].event_id, lines[2].incident_id, lines[2].actor_kind, lines[2].actor_id) == (
        order.event_id,
        reported.incident_id,
        "system",
        "dispatch",
    )
    assert lines[0].detail == "" and lines[1].detail == "filed in grid gh01, priority 3"


def test_a_second_department_joins_and_the_later_deadline_holds() -> None:
    reported = _reported()
    incident = domain.incident_of(reported)
    late, early = T0 + timedelta(hours=48), T0 + timedelta(hours=24)
    _fold(incident, _dispatched(reported, late), _dispatched(reported, early, "greening"))
    _fold(incident, _dispatched(reported, early))  # a department already listed is not listed twice
    assert incident.departments == "city_ops greening" and incident.deadline == late
    assert domain.departments_of(incident) == ["city_ops", "greening"]


def test_a_final_status_stays_but_the_timeline_goes_on() -> None:
    reported = _reported()
    incident = domain.incident_of(reported)
    order = _dispatched(reported, T0 + timedelta(hours=24))
    closed = _closed(reported, order.deadline)
    reminder = ev.OverdueReminded.following(
        reported,
        SYSTEM,
        occurred_at=_at(4 * 3600),
        work_order_id=order.work_order_id,
        department_code="city_ops",
        deadline=T0,
        overdue_s=1,
    )
    lines = _fold(incident, order, closed, reminder, _filed(reported))
    assert incident.status == "closed" and incident.closed_at == closed.occurred_at
    assert incident.overdue  # the mark is kept even so
    assert len(lines) == 4 and lines[1].detail == "closed on time"


def test_a_final_status_follows_another_final_one() -> None:
    reported = _reported()
    incident = domain.incident_of(reported)
    rejected = ev.IncidentRejected.following(
        reported, SYSTEM, occurred_at=_at(5), reason_code="outside_grids", reason="outside every grid"
    )
    merged = ev.IncidentMerged.following(reported, SYSTEM, occurred_at=_at(1), into_incident_id="GL1", distance_m=12.4)
    [line] = _fold(incident, rejected)
    assert incident.status == "rejected" and line.detail == "outside every grid"
    [line] = _fold(incident, merged)
    assert incident.status == "merged" and line.detail == "merged into GL1 (12 m away)"


def test_an_event_folded_after_a_later_one_does_not_step_the_status_back() -> None:
    # dispatch's WorkOrderDispatched and handling's WorkOrderAccepted reach the lifecycle log from two producers:
    # a retried send can land the earlier one second
    reported = _reported()
    incident = domain.incident_of(reported)
    order = _dispatched(reported, T0 + timedelta(hours=24), occurred_at=T0 + timedelta(seconds=1))
    staff = Actor(kind=ActorKind.DEPARTMENT, id="staff", department="city_ops")
    accepted = ev.WorkOrderAccepted.following(
        order,
        staff,
        occurred_at=T0 + timedelta(seconds=2),
        work_order_id=order.work_order_id,
        department_code="city_ops",
    )
    lines = _fold(incident, accepted, order)
    assert incident.status == "in_progress" and incident.status_at == accepted.occurred_at
    assert incident.departments == "city_ops" and incident.deadline == order.deadline  # what it brings still counts
    assert incident.updated_at == accepted.occurred_at  # the latest of them
    assert [t.type for t in lines] == ["WorkOrderAccepted", "WorkOrderDispatched"]
    handled = ev.WorkOrderHandled.following(
        order,
        staff,
        occurred_at=T0 + timedelta(seconds=3),
        work_order_id=order.work_order_id,
        department_code="city_ops",
        result="cleaned",
    )
    [line] = _fold(incident, handled)
    assert incident.status == "handled" and line.detail == "city_ops: cleaned"


def test_reminders_escalations_reworks_and_extensions_mark_the_incident() -> None:
    reported = _reported()
    incident = domain.incident_of(reported)
    order = _dispatched(reported, T0 + timedelta(hours=24))
    reminder = ev.OverdueReminded.following(
        reported,
        SYSTEM,
        occurred_at=_at(10),
        work_order_id=order.work_order_id,
        department_code="city_ops",
        deadline=T0,
        overdue_s=61,
    )
    escalated = ev.IncidentEscalated.following(
        reported, SYSTEM, occurred_at=_at(11), reason_code="overdue", reason="overdue", department_code="city_ops"
    )
    lines = _fold(incident, order, reminder, escalated)
    assert incident.overdue and incident.escalated and incident.status == "dispatched"
    assert lines[1].detail == "city_ops overdue by 61 s (催办)"
    assert lines[2].detail == "escalated to the operations center (督办) from city_ops: overdue"
    extended = T0 + timedelta(hours=72)
    granted = ev.ExtensionGranted.following(
        order,
        SYSTEM,
        occurred_at=_at(12),
        work_order_id=order.work_order_id,
        department_code="city_ops",
        new_deadline=extended,
    )
    [line] = _fold(incident, granted)
    assert incident.deadline == extended and not incident.overdue
    assert line.detail == f"city_ops: extension granted until {extended.isoformat()}"
    incident.overdue = True
    again = T0 + timedelta(hours=96)
    rework = ev.IncidentReworked.following(
        order,
        SYSTEM,
        occurred_at=_at(13),
        work_order_id=order.work_order_id,
        department_code="city_ops",
        deadline=again,
        rework_count=1,
        note="still dirty",
    )
    [line] = _fold(incident, rework)
    assert (incident.status, incident.deadline, incident.rework_count, incident.overdue) == ("rework", again, 1, False)
    assert line.detail == "back to city_ops: still dirty"


def test_a_timeline_line_keeps_who_acted_for_whom_and_at_most_2000_characters() -> None:
    reported = _reported(Sent(source=ev.Source.HOTLINE_12345), DESK)
    [line] = _fold(domain.incident_of(reported), reported)
    assert (line.actor_kind, line.actor_id, line.on_behalf_of) == ("ops_center", "ops-duty", "w-gh01-1")
    long = ev.WorkOrderHandled.following(
        reported, SYSTEM, work_order_id="w-1", department_code="city_ops", result="x" * 2000
    )
    [line] = _fold(domain.incident_of(reported), long)
    assert line.detail == ("city_ops: " + "x" * 2000)[:2000]


@pytest.mark.parametrize("big", [False, True])
def test_a_big_case_says_so_in_its_timeline(big: bool) -> None:
    reported = _reported()
    filed = ev.IncidentFiled.following(
        reported, SYSTEM, category_code="exposed_garbage", grid_id="gh01", priority=1, severity="major", big=big
    )  # (a detail needs no time)
    linkage = ", all-network linkage (大事全网联动)"
    assert domain.detail(filed) == "filed in grid gh01, priority 1" + (linkage if big else "")
