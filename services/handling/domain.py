"""handling's rules: a department's work orders (部门处置), as typed state and plain functions.

- **派遣.** A work order arrives from dispatch as ``WorkOrderDispatched`` and lands in its department's queue,
  ``dispatched``; one already known changes nothing (a repeat under a new event id).
- **签收.** The department accepts it: dispatched → accepted.
- **退回.** The department returns it, not its work: dispatched or accepted → returned; the center routes the work
  elsewhere.
- **延期.** Once accepted, or sent back for rework, the department asks for a later deadline: one request at a time,
  for a deadline later than the current one and not already past. The operations center decides; the decision
  comes back (granted: the new deadline; refused: the reason, as the latest note).
- **处置.** Accepted or rework → handled, with the result and the evidence for the verifier. A request for more time
  still pending lapses: the work was done in time after all.
- **返工.** Verification failed: the work comes back with the verifier's note and a new deadline.
- **结案.** A closed incident closes its handled work orders (an incident fixed on the spot had none).
- **Overdue.** Work the department still owes (:data:`schemas.ORDER_ACTIVE`) past its deadline is overdue.
- **Webhooks.** A department with its own system gets every new work order and rework pushed: a delivery is
  recorded with the change and sent later; a failed attempt is retried after 1 s, 2 s, 4 s … up to a cap, and
  given up after the last attempt.

An action of department staff reads the few columns of its work order it needs (:class:`OrderHead`); the rules
decide a :class:`Step` (the columns to write, the event, the status to answer) or refuse with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import HttpUrl

from schemas import (
    ORDER_ACTIVE,
    Actor,
    ActorKind,
    DeliveryStatus,
    Event,
    ExtensionStatus,
    WorkOrderState,
    WorkOrderStatus,
    encode_event,
    row_of,
)
from schemas import events as ev


@dataclass(kw_only=True)
class WorkOrder(WorkOrderState):
    """A department's work order as handling works it (a row of ``handling_work_order``)."""

    correlation_id: str
    coordinator: str | None
    category_code: str
    grid_id: str
    lat: float
    lon: float
    address: str
    description: str
    photo_urls: str
    """Space-separated, as stored."""
    priority: int
    rework_count: int = 0
    last_note: str = ""
    """The latest word from the center: the verifier's 返工 note, or why an extension was refused."""
    extension_status: str = ExtensionStatus.NONE
    requested_deadline: datetime | None = None
    result: str = ""
    evidence_urls: str = ""
    """Space-separated, as stored."""


@dataclass
class WebhookDelivery:
    """A push of one event to a department's own system (a row of ``handling_webhook_delivery``)."""

    id: int | None
    work_order_id: str
    department_code: str
    url: str
    event_id: str
    event_type: str
    payload: str
    """The event as JSON, exactly as published on Kafka."""
    attempts: int
    next_attempt_at: datetime
    status: str
    last_error: str
    created_at: datetime
    delivered_at: datetime | None


@dataclass(frozen=True, slots=True)
class OrderHead:
    """What a department's action reads of its work order: the columns its rules and its event need."""

    work_order_id: str
    incident_id: str
    correlation_id: str
    department_code: str
    status: str
    extension_status: str
    deadline: datetime


@dataclass(frozen=True, slots=True)
class Step:
    """What an action does to its work order: the columns it writes, the event it emits, the status it answers."""

    action: str
    """The action in words, for a refusal ("accepting", "handling", …)."""
    changes: dict[str, Any]
    event: Event
    status: str


class Refused(Exception):
    """An action the rules refuse in the work order's state; the message says why."""


@dataclass(frozen=True, slots=True)
class WebhookJob:
    """One claimed delivery, detached from the database while it is sent."""

    id: int
    url: str
    payload: str
    event_id: str
    event_type: str
    attempt: int
    """Which attempt this is, from 1."""


def urls(text: str) -> list[str]:
    """The URLs a column stores space-separated."""
    return [u for u in text.split() if u]


def _joined(items: Iterable[object]) -> str:
    return " ".join(str(u) for u in items)


def overdue(status: str, deadline: datetime, now: datetime) -> bool:
    """Work the department still owes, past its deadline."""
    return status in ORDER_ACTIVE and deadline < now


# -- events from the center -------------------------------------------------------------------------------


def receive_work_order(dispatched: ev.WorkOrderDispatched) -> WorkOrder:
    """派遣: the new work order, as it lands in the department's queue."""
    return row_of(
        WorkOrder,
        dispatched,
        role=dispatched.role.value,
        photo_urls=_joined(dispatched.photo_urls),
        status=WorkOrderStatus.DISPATCHED,
        dispatched_at=dispatched.occurred_at,
    )


def rework_work_order(order: WorkOrder, reworked: ev.IncidentReworked) -> None:
    """返工: verification failed; the work comes back with the verifier's note and a new deadline."""
    order.status = WorkOrderStatus.REWORK
    order.deadline = reworked.deadline
    order.rework_count = reworked.rework_count
    order.last_note = reworked.note


def grant_extension(order: WorkOrder, granted: ev.ExtensionGranted) -> None:
    """延期 granted: the new deadline."""
    order.deadline = granted.new_deadline
    order.extension_status = ExtensionStatus.GRANTED


def refuse_extension(order: WorkOrder, refused: ev.ExtensionRefused) -> None:
    """延期 refused: the old deadline stands, and the reason is the latest note."""
    order.extension_status = ExtensionStatus.REFUSED
    order.last_note = refused.reason


def close_work_orders(orders: Iterable[WorkOrder]) -> None:
    """结案: the incident's handled work orders are closed; the others (returned ones, say) stay as they are."""
    for order in orders:
        if order.status == WorkOrderStatus.HANDLED:
            order.status = WorkOrderStatus.CLOSED


# -- actions of department staff --------------------------------------------------------------------------


def department_actor(order: OrderHead, actor_id: str) -> Actor:
    """The staff member ``actor_id`` acting for the work order's department."""
    return Actor(kind=ActorKind.DEPARTMENT, id=actor_id, department=order.department_code)


def _require(order: OrderHead, allowed: tuple[str, ...], action: str) -> None:
    """The order must be in one of ``allowed`` states for ``action``."""
    if order.status not in allowed:
        raise Refused(f"work order {order.work_order_id} is {order.status}; {action} needs it {' or '.join(allowed)}")


def _common(order: OrderHead, actor: Actor, now: datetime) -> dict[str, Any]:
    """The fields every event of a department's action has: the incident's, the order's, who and when."""
    return dict(
        incident_id=order.incident_id,
        actor=actor,
        correlation_id=order.correlation_id,
        occurred_at=now,
        work_order_id=order.work_order_id,
        department_code=order.department_code,
    )


def accept_work_order(order: OrderHead, actor: Actor, now: datetime) -> Step:
    """签收: dispatched → accepted."""
    _require(order, (WorkOrderStatus.DISPATCHED,), "accepting")
    accepted = WorkOrderStatus.ACCEPTED
    return Step(
        "accepting",
        {"status": accepted, "accepted_at": now},
        ev.WorkOrderAccepted(**_common(order, actor, now)),
        accepted,
    )


def return_work_order(order: OrderHead, actor: Actor, now: datetime, reason: str) -> Step:
    """退回: dispatched or accepted → returned; the center routes the work elsewhere."""
    _require(order, (WorkOrderStatus.DISPATCHED, WorkOrderStatus.ACCEPTED), "returning")
    returned = WorkOrderStatus.RETURNED
    event = ev.WorkOrderReturned(**_common(order, actor, now), reason=reason)
    return Step("returning", {"status": returned}, event, returned)


def request_extension(order: OrderHead, actor: Actor, now: datetime, requested_deadline: datetime, reason: str) -> Step:
    """延期: from accepted or rework, one request at a time, for a deadline later than the current one and not past."""
    action = "asking for an extension"
    _require(order, (WorkOrderStatus.ACCEPTED, WorkOrderStatus.REWORK), action)
    if order.extension_status == ExtensionStatus.REQUESTED:
        raise Refused(f"work order {order.work_order_id} already has an extension request pending")
    if requested_deadline <= order.deadline:
        raise Refused(
            f"requested deadline {requested_deadline.isoformat()} is not later than the current deadline "
            f"{order.deadline.isoformat()}"
        )
    if requested_deadline <= now:
        raise Refused(f"requested deadline {requested_deadline.isoformat()} is already past")
    changes = {"extension_status": ExtensionStatus.REQUESTED, "requested_deadline": requested_deadline}
    event = ev.ExtensionRequested(**_common(order, actor, now), requested_deadline=requested_deadline, reason=reason)
    return Step(action, changes, event, order.status)


def handle_work_order(
    order: OrderHead, actor: Actor, now: datetime, result: str, evidence_urls: Sequence[HttpUrl]
) -> Step:
    """处置: accepted or rework → handled, with the result and evidence for the verifier."""
    _require(order, (WorkOrderStatus.ACCEPTED, WorkOrderStatus.REWORK), "handling")
    handled = WorkOrderStatus.HANDLED
    changes: dict[str, Any] = dict(status=handled, handled_at=now, result=result, evidence_urls=_joined(evidence_urls))
    if order.extension_status == ExtensionStatus.REQUESTED:  # done in time after all: the request lapses
        changes.update(extension_status=ExtensionStatus.NONE, requested_deadline=None)
    event = ev.WorkOrderHandled(**_common(order, actor, now), result=result, evidence_urls=list(evidence_urls))
    return Step("handling", changes, event, handled)


# -- webhook deliveries -----------------------------------------------------------------------------------


def webhook_delivery(
    order: WorkOrder, event: Event, webhooks: Mapping[str, str], now: datetime
) -> WebhookDelivery | None:
    """The push of ``event`` to the order's department's own system, if it has one (due at once)."""
    url = webhooks.get(order.department_code)
    if not url:
        return None
    return WebhookDelivery(
        id=None,
        work_order_id=order.work_order_id,
        department_code=order.department_code,
        url=url,
        event_id=event.event_id,
        event_type=event.type,
        payload=encode_event(event).decode(),
        attempts=0,
        next_attempt_at=now,
        status=DeliveryStatus.PENDING,
        last_error="",
        created_at=now,
        delivered_at=None,
    )


def webhook_job(delivery: WebhookDelivery) -> WebhookJob:
    """A due delivery, to be sent as its next attempt."""
    return WebhookJob(
        id=delivery.id or 0,
        url=delivery.url,
        payload=delivery.payload,
        event_id=delivery.event_id,
        event_type=delivery.event_type,
        attempt=delivery.attempts + 1,
    )


def webhook_lease(now: datetime, timeout_s: float) -> datetime:
    """Until when a claimed delivery is another sender's to leave alone: past two timeouts and a margin, the
    sender is taken for dead and the delivery is due again."""
    return now + timedelta(seconds=timeout_s * 2 + 30)


def webhook_backoff(attempts: int, cap_s: float) -> timedelta:
    """The wait after ``attempts`` failed attempts: 1 s, 2 s, 4 s … up to ``cap_s``. Wall-clock time."""
    return timedelta(seconds=min(2.0 ** min(max(attempts - 1, 0), 30), cap_s))


def record_webhook_attempt(
    delivery: WebhookDelivery, error: str | None, now: datetime, max_attempts: int, backoff_cap_s: float
) -> str:
    """Count an attempt: delivered, retried after a backoff, or given up after the last attempt. Returns the status."""
    delivery.attempts += 1
    if error is None:
        delivery.status, delivery.delivered_at, delivery.next_attempt_at = DeliveryStatus.DELIVERED, now, now
    else:
        delivery.last_error = error[:1000]
        if delivery.attempts >= max_attempts:
            delivery.status, delivery.next_attempt_at = DeliveryStatus.FAILED, now
        else:
            delivery.next_attempt_at = now + webhook_backoff(delivery.attempts, backoff_cap_s)
    return delivery.status


__all__ = [
    "OrderHead",
    "Refused",
    "Step",
    "WebhookDelivery",
    "WebhookJob",
    "WorkOrder",
    "accept_work_order",
    "close_work_orders",
    "department_actor",
    "grant_extension",
    "handle_work_order",
    "overdue",
    "receive_work_order",
    "record_webhook_attempt",
    "refuse_extension",
    "request_extension",
    "return_work_order",
    "rework_work_order",
    "urls",
    "webhook_backoff",
    "webhook_delivery",
    "webhook_job",
    "webhook_lease",
]
