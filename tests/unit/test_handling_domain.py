"""handling's rules as plain functions: typed work orders and deliveries, events in, steps and changes out.

No database, no broker, no unit of work: each rule is given the state, the message and the time."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from pydantic import HttpUrl

from schemas import Actor, ActorKind, DeliveryStatus, Event, ExtensionStatus, Location, WorkOrderStatus
from schemas import events as ev
from services.handling import domain
from services.handling.domain import OrderHead, Refused, WebhookDelivery, WorkOrder

T0 = datetime(2025, 6, 2, 1, 0, tzinfo=UTC)
HOOK = "http://city-ops.example.test/gridloop"
STAFF = Actor(kind=ActorKind.DEPARTMENT, id="cityops-zhang", department="city_ops")


def dispatched(**fields: Any) -> ev.WorkOrderDispatched:
    values: dict[str, Any] = dict(
        incident_id="GL-1",
        actor=Actor.system("dispatch"),
        correlation_id="corr-GL-1",
        occurred_at=T0,
        work_order_id="GL-1-1",
        department_code="city_ops",
        category_code="exposed_garbage",
        grid_id="gh06",
        location=Location(lat=31.285, lon=121.575, address="东靖路 1 号"),
        description="garbage by the road",
        photo_urls=["https://img.example.test/1.jpg", "https://img.example.test/2.jpg"],
        priority=2,
        attempt=2,
        deadline=T0 + timedelta(hours=24),
    )
    values.update(fields)
    return ev.WorkOrderDispatched(**values)


def order(**fields: Any) -> WorkOrder:
    return dataclasses.replace(domain.receive_work_order(dispatched()), **fields)


def head(status: str = WorkOrderStatus.DISPATCHED, extension: str = ExtensionStatus.NONE) -> OrderHead:
    return OrderHead(
        work_order_id="GL-1-1",
        incident_id="GL-1",
        correlation_id="corr-GL-1",
        department_code="city_ops",
        status=status,
        extension_status=extension,
        deadline=T0 + timedelta(hours=24),
    )


def follow(cls: type[Event], **fields: Any) -> Any:
    return cls.following(dispatched(), Actor.system("dispatch"), occurred_at=T0 + timedelta(hours=2), **fields)


# -- 派遣, 返工, 延期 decided, 结案 -------------------------------------------------------------------------------


def test_a_dispatched_work_order_lands_dispatched_with_every_column_of_the_event() -> None:
    o = domain.receive_work_order(dispatched())
    assert (o.work_order_id, o.incident_id, o.correlation_id, o.department_code) == (
        "GL-1-1",
        "GL-1",
        "corr-GL-1",
        "city_ops",
    )
    assert (o.role, o.coordinator, o.category_code, o.grid_id, o.priority, o.attempt) == (
        "lead",
        None,
        "exposed_garbage",
        "gh06",
        2,
        2,
    )
    assert (o.lat, o.lon, o.address, o.description) == (31.285, 121.575, "东靖路 1 号", "garbage by the road")
    assert o.photo_urls == "https://img.example.test/1.jpg https://img.example.test/2.jpg"
    assert (o.status, o.extension_status, o.deadline, o.dispatched_at) == (
        "dispatched",
        "none",
        T0 + timedelta(hours=24),
        T0,
    )
    assert (o.accepted_at, o.handled_at, o.requested_deadline, o.rework_count, o.last_note) == (None, None, None, 0, "")
    assert (o.result, o.evidence_urls) == ("", "")
    assert domain.urls(o.photo_urls) == ["https://img.example.test/1.jpg", "https://img.example.test/2.jpg"]


def test_rework_brings_the_work_back_with_the_note_and_a_new_deadline() -> None:
    o = order(status=WorkOrderStatus.HANDLED)
    deadline = T0 + timedelta(hours=30)
    rework = follow(
        ev.IncidentReworked,
        work_order_id="GL-1-1",
        department_code="city_ops",
        rework_count=2,
        note="still garbage behind the bin",
        deadline=deadline,
    )
    domain.rework_work_order(o, rework)
    assert (o.status, o.deadline, o.rework_count, o.last_note) == (
        "rework",
        deadline,
        2,
        "still garbage behind the bin",
    )


def test_a_granted_extension_moves_the_deadline_and_a_refused_one_leaves_the_reason() -> None:
    o = order(status=WorkOrderStatus.ACCEPTED, extension_status=ExtensionStatus.REQUESTED)
    later = T0 + timedelta(hours=40)
    domain.grant_extension(
        o, follow(ev.ExtensionGranted, work_order_id="GL-1-1", department_code="city_ops", new_deadline=later)
    )
    assert (o.extension_status, o.deadline, o.status) == ("granted", later, "accepted")

    o = order(status=WorkOrderStatus.ACCEPTED, extension_status=ExtensionStatus.REQUESTED)
    domain.refuse_extension(
        o, follow(ev.ExtensionRefused, work_order_id="GL-1-1", department_code="city_ops", reason="finish it today")
    )
    assert (o.extension_status, o.last_note, o.deadline) == ("refused", "finish it today", T0 + timedelta(hours=24))


def test_closure_closes_only_the_handled_work_orders() -> None:
    orders = [order(work_order_id=f"GL-1-{n}", status=s) for n, s in enumerate(WorkOrderStatus)]
    domain.close_work_orders(orders)
    assert [o.status for o in orders] == ["dispatched", "accepted", "returned", "closed", "rework", "closed"]
    domain.close_work_orders([])  # fixed on the spot: no work orders


@pytest.mark.parametrize(
    ("status", "deadline", "late"),
    [
        ("dispatched", T0 - timedelta(seconds=1), True),
        ("accepted", T0 - timedelta(hours=1), True),
        ("rework", T0 - timedelta(hours=1), True),
        ("rework", T0, False),  # due now is not late yet
        ("accepted", T0 + timedelta(hours=1), False),
        ("handled", T0 - timedelta(hours=1), False),  # done: owed no more
        ("returned", T0 - timedelta(hours=1), False),
        ("closed", T0 - timedelta(hours=1), False),
    ],
)
def test_overdue_is_owed_work_past_its_deadline(status: str, deadline: datetime, late: bool) -> None:
    assert domain.overdue(status, deadline, T0) is late


# -- actions of department staff --------------------------------------------------------------------------


def test_accept_takes_a_dispatched_order_and_emits_in_the_incidents_correlation() -> None:
    step = domain.accept_work_order(head(), STAFF, T0)
    assert (step.action, step.changes, step.status) == (
        "accepting",
        {"status": "accepted", "accepted_at": T0},
        "accepted",
    )
    event = step.event
    assert isinstance(event, ev.WorkOrderAccepted)
    assert (event.incident_id, event.correlation_id, event.work_order_id, event.department_code) == (
        "GL-1",
        "corr-GL-1",
        "GL-1-1",
        "city_ops",
    )
    assert (event.actor, event.occurred_at) == (STAFF, T0)
    assert domain.department_actor(head(), "cityops-zhang") == STAFF


@pytest.mark.parametrize("status", ["accepted", "returned", "handled", "rework", "closed"])
def test_accept_needs_a_dispatched_order(status: str) -> None:
    with pytest.raises(Refused, match=rf"^work order GL-1-1 is {status}; accepting needs it dispatched$"):
        domain.accept_work_order(head(status), STAFF, T0)


@pytest.mark.parametrize("status", ["dispatched", "accepted"])
def test_return_from_dispatched_or_accepted(status: str) -> None:
    step = domain.return_work_order(head(status), STAFF, T0, "not ours: river bank")
    assert (step.action, step.changes, step.status) == ("returning", {"status": "returned"}, "returned")
    assert isinstance(step.event, ev.WorkOrderReturned) and step.event.reason == "not ours: river bank"


@pytest.mark.parametrize("status", ["returned", "handled", "rework", "closed"])
def test_return_is_refused_otherwise(status: str) -> None:
    with pytest.raises(Refused, match=f"is {status}; returning needs it dispatched or accepted"):
        domain.return_work_order(head(status), STAFF, T0, "no")


@pytest.mark.parametrize("status", ["accepted", "rework"])
def test_an_extension_is_asked_for_a_later_deadline_from_accepted_or_rework(status: str) -> None:
    later = T0 + timedelta(hours=48)
    step = domain.request_extension(head(status), STAFF, T0, later, "needs a truck")
    assert (step.action, step.status) == ("asking for an extension", status)  # the order's status stays
    assert step.changes == {"extension_status": "requested", "requested_deadline": later}
    assert isinstance(step.event, ev.ExtensionRequested)
    assert (step.event.requested_deadline, step.event.reason, step.event.correlation_id) == (
        later,
        "needs a truck",
        "corr-GL-1",
    )


@pytest.mark.parametrize("extension", ["none", "granted", "refused"])
def test_an_extension_may_be_asked_again_once_decided(extension: str) -> None:
    step = domain.request_extension(head("accepted", extension), STAFF, T0, T0 + timedelta(hours=48), "r")
    assert step.changes["extension_status"] == "requested"


def test_extension_request_rules() -> None:
    later = T0 + timedelta(hours=48)
    for status in ("dispatched", "returned", "handled", "closed"):
        with pytest.raises(Refused, match=f"is {status}; asking for an extension needs it accepted or rework"):
            domain.request_extension(head(status), STAFF, T0, later, "r")
    with pytest.raises(Refused, match="already has an extension request pending"):
        domain.request_extension(head("accepted", "requested"), STAFF, T0, later, "r")
    with pytest.raises(Refused, match="not later than the current deadline 2025-06-03T01:00:00"):
        domain.request_extension(head("accepted"), STAFF, T0, T0 + timedelta(hours=24), "r")
    # overdue: a deadline later than the old one but already past is no use
    with pytest.raises(Refused, match="already past"):
        domain.request_extension(head("accepted"), STAFF, later, later, "r")
    with pytest.raises(Refused, match="already past"):
        domain.request_extension(head("accepted"), STAFF, later + timedelta(hours=1), later, "r")


@pytest.mark.parametrize("status", ["accepted", "rework"])
def test_handle_records_the_result_and_evidence(status: str) -> None:
    evidence = [HttpUrl("https://img.example.test/after.jpg"), HttpUrl("https://img.example.test/b.jpg")]
    step = domain.handle_work_order(head(status), STAFF, T0, "cleared", evidence)
    assert (step.action, step.status) == ("handling", "handled")
    assert step.changes == {
        "status": "handled",
        "handled_at": T0,
        "result": "cleared",
        "evidence_urls": "https://img.example.test/after.jpg https://img.example.test/b.jpg",
    }
    assert isinstance(step.event, ev.WorkOrderHandled)
    assert (step.event.result, step.event.evidence_urls) == ("cleared", evidence)


def test_handling_in_time_lets_a_pending_extension_request_lapse() -> None:
    step = domain.handle_work_order(head("accepted", "requested"), STAFF, T0, "done", [])
    assert (step.changes["extension_status"], step.changes["requested_deadline"]) == ("none", None)
    assert "extension_status" not in domain.handle_work_order(head("accepted", "refused"), STAFF, T0, "x", []).changes


@pytest.mark.parametrize("status", ["dispatched", "returned", "handled", "closed"])
def test_handle_needs_an_accepted_order_or_rework(status: str) -> None:
    with pytest.raises(Refused, match=f"is {status}; handling needs it accepted or rework"):
        domain.handle_work_order(head(status), STAFF, T0, "done", [])


# -- webhook deliveries -----------------------------------------------------------------------------------


def test_a_push_goes_only_to_a_department_with_a_webhook() -> None:
    event = dispatched()
    delivery = domain.webhook_delivery(order(), event, {"city_ops": HOOK}, T0)
    assert delivery is not None
    assert (delivery.id, delivery.work_order_id, delivery.department_code, delivery.url) == (
        None,
        "GL-1-1",
        "city_ops",
        HOOK,
    )
    assert (delivery.event_id, delivery.event_type, delivery.status, delivery.attempts) == (
        event.event_id,
        "WorkOrderDispatched",
        "pending",
        0,
    )
    assert (delivery.next_attempt_at, delivery.created_at, delivery.delivered_at, delivery.last_error) == (
        T0,
        T0,
        None,
        "",
    )
    assert orjson.loads(delivery.payload) == orjson.loads(event.model_dump_json())
    assert domain.webhook_delivery(order(), event, {"water": HOOK}, T0) is None
    assert domain.webhook_delivery(order(), event, {"city_ops": ""}, T0) is None


def _delivery(**fields: Any) -> WebhookDelivery:
    made = domain.webhook_delivery(order(), dispatched(), {"city_ops": HOOK}, T0)
    assert made is not None
    return dataclasses.replace(made, id=7, **fields)


def test_a_due_delivery_is_sent_as_its_next_attempt_and_leased_meanwhile() -> None:
    job = domain.webhook_job(_delivery(attempts=2))
    assert (job.id, job.url, job.event_type, job.attempt) == (7, HOOK, "WorkOrderDispatched", 3)
    assert domain.webhook_lease(T0, 5.0) == T0 + timedelta(seconds=40)


def test_backoff_doubles_up_to_the_cap() -> None:
    waits = [domain.webhook_backoff(n, 300.0).total_seconds() for n in range(0, 12)]
    assert waits == [1, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert domain.webhook_backoff(10_000, 300.0).total_seconds() == 300  # no overflow however many


def test_an_attempt_is_delivered_retried_after_a_backoff_or_given_up() -> None:
    d = _delivery()
    assert domain.record_webhook_attempt(d, "HTTP 500: busy", T0, 3, 300.0) == DeliveryStatus.PENDING
    assert (d.attempts, d.next_attempt_at, d.last_error) == (1, T0 + timedelta(seconds=1), "HTTP 500: busy")
    assert domain.record_webhook_attempt(d, "x" * 2000, T0, 3, 300.0) == "pending"
    assert (d.attempts, d.next_attempt_at, len(d.last_error)) == (2, T0 + timedelta(seconds=2), 1000)
    assert domain.record_webhook_attempt(d, "HTTP 503: down", T0, 3, 300.0) == "failed"
    assert (d.attempts, d.next_attempt_at, d.delivered_at) == (3, T0, None)

    d = _delivery(attempts=1, last_error="HTTP 500: busy")
    assert domain.record_webhook_attempt(d, None, T0, 3, 300.0) == "delivered"
    assert (d.status, d.attempts, d.delivered_at, d.next_attempt_at) == ("delivered", 2, T0, T0)
