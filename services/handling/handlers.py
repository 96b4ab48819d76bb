"""handling's rules, as plain functions ``verb_noun(event_or_command, uow, ...)``.

A work order arrives from dispatch (派遣) as ``dispatched``. Its department 签收 accepts it or 退回 returns it
(from dispatched or accepted); once accepted, or sent back for 返工 rework, the department asks for 延期 more time
(one request at a time, decided by the operations center) or reports it 处置 handled. A closed incident (结案)
closes its handled work orders. Departments with their own systems get new work orders and rework pushed to a
webhook: a delivery row is written in the same unit of work and sent later by the deliverer, with backoff.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select

from schemas import Actor, ActorKind, Event, encode_event
from schemas import events as ev
from services.common import visibility
from services.common.batch import BatchOutcome, act_on_each
from services.common.changes import keys_for
from services.common.db import Record, UnitOfWork, as_utc, columns_by_key
from services.common.errors import Forbidden, NotFound, Rejected, UnknownIncident

from .models import (
    AcceptWorkOrder,
    AcceptWorkOrders,
    DeliveryStatus,
    DepartmentCommand,
    ExtensionStatus,
    HandleWorkOrder,
    HandleWorkOrders,
    HandlingWebhookDelivery,
    HandlingWorkOrder,
    OrderStatus,
    RequestExtension,
    ReturnWorkOrder,
    WebhookDeliveryPublic,
    WorkOrderAction,
    WorkOrderPublic,
)
from .settings import HandlingSettings

# -- helpers ------------------------------------------------------------------------------------------


WORK_ORDERS = "work-orders"
"""The long-poll key of a department's queue (``work-orders:<department>``)."""


def _known_order(uow: UnitOfWork, work_order_id: str, incident_id: str) -> Record:
    """The work order an event from the center names; one this service never received is a poison message."""
    order = uow.record(HandlingWorkOrder, work_order_id)
    if order is None or order.incident_id != incident_id:
        raise UnknownIncident(f"no work order {work_order_id} for incident {incident_id}")
    return order


def _urls(text: str) -> list[str]:
    return [u for u in text.split() if u]


def _queue_webhook(uow: UnitOfWork, policy: HandlingSettings, order: Record, event: Event) -> None:
    """Outbox-style: the push is recorded with the state change; the deliverer sends it later."""
    url = policy.webhooks.get(order.department_code)
    if not url:
        return
    now = uow.now()
    uow.append(  # nothing in this unit reads it back
        HandlingWebhookDelivery,
        work_order_id=order.work_order_id,
        department_code=order.department_code,
        url=url,
        event_id=event.event_id,
        event_type=event.type,
        payload=encode_event(event).decode(),
        next_attempt_at=now,
        created_at=now,
    )


# -- events from the center ------------------------------------------------------------------------------


def receive_work_order(dispatched: ev.WorkOrderDispatched, uow: UnitOfWork, policy: HandlingSettings) -> None:
    """派遣: a new work order lands in the department's queue; one already known changes nothing."""
    if uow.record(HandlingWorkOrder, dispatched.work_order_id) is not None:
        return
    loc = dispatched.location
    order = uow.insert(
        HandlingWorkOrder,
        work_order_id=dispatched.work_order_id,
        incident_id=dispatched.incident_id,
        correlation_id=dispatched.correlation_id,
        department_code=dispatched.department_code,
        role=dispatched.role.value,
        coordinator=dispatched.coordinator,
        category_code=dispatched.category_code,
        grid_id=dispatched.grid_id,
        lat=loc.lat,
        lon=loc.lon,
        address=loc.address,
        description=dispatched.description,
        photo_urls=" ".join(str(u) for u in dispatched.photo_urls),
        priority=dispatched.priority,
        attempt=dispatched.attempt,
        status=OrderStatus.DISPATCHED,
        deadline=dispatched.deadline,
        dispatched_at=dispatched.occurred_at,
    )
    uow.touch(*keys_for(WORK_ORDERS, order.department_code))
    _queue_webhook(uow, policy, order, dispatched)


def rework_work_order(reworked: ev.IncidentReworked, uow: UnitOfWork, policy: HandlingSettings) -> None:
    """返工: verification failed; the work comes back with the verifier's note and a new deadline."""
    order = _known_order(uow, reworked.work_order_id, reworked.incident_id)
    order.status = OrderStatus.REWORK
    order.deadline = reworked.deadline
    order.rework_count = reworked.rework_count
    order.last_note = reworked.note
    uow.touch(*keys_for(WORK_ORDERS, order.department_code))
    _queue_webhook(uow, policy, order, reworked)


def grant_extension(granted: ev.ExtensionGranted, uow: UnitOfWork, policy: HandlingSettings) -> None:
    order = _known_order(uow, granted.work_order_id, granted.incident_id)
    order.deadline = granted.new_deadline
    order.extension_status = ExtensionStatus.GRANTED
    uow.touch(*keys_for(WORK_ORDERS, order.department_code))


def refuse_extension(refused: ev.ExtensionRefused, uow: UnitOfWork, policy: HandlingSettings) -> None:
    order = _known_order(uow, refused.work_order_id, refused.incident_id)
    order.extension_status = ExtensionStatus.REFUSED
    order.last_note = refused.reason
    uow.touch(*keys_for(WORK_ORDERS, order.department_code))


def close_work_orders(closed: ev.IncidentClosed, uow: UnitOfWork, policy: HandlingSettings) -> None:
    """结案: the incident's handled work orders are closed. An incident fixed on the spot had none: nothing to do."""
    for order in uow.records_by(HandlingWorkOrder, "incident_id", closed.incident_id):
        if order.status == OrderStatus.HANDLED:
            order.status = OrderStatus.CLOSED


# -- commands from department staff -----------------------------------------------------------------------


_ORDER: sa.Table = HandlingWorkOrder.__table__  # type: ignore[attr-defined]
_HEAD = columns_by_key(
    _ORDER,
    "work_order_id",
    "incident_id",
    "correlation_id",
    "department_code",
    "status",
    "extension_status",
    "deadline",
)
"""What a department action reads of its work order, built once: the columns its rules and its event need, not
the whole row as an ORM object (which cost more than the rest of the action)."""

OrderHead = sa.Row[Any]
"""A work order as :data:`_HEAD` reads it."""


def _order_for(uow: UnitOfWork, work_order_id: str, cmd: DepartmentCommand) -> tuple[OrderHead, Actor]:
    """The order a department acts on: another department's is answered as an unknown one (404, not 403, which
    would tell that it exists and whose it is)."""
    order = uow.row(_HEAD, work_order_id)
    if order is None or cmd.department_code != order.department_code:
        raise visibility.unseen("work order", work_order_id)
    if cmd.actor_id is None:
        raise Forbidden(f"work order {work_order_id}: who of {order.department_code} acts on it?")
    return order, Actor(kind=ActorKind.DEPARTMENT, id=cmd.actor_id, department=order.department_code)


@functools.cache
def _take_statement(columns: tuple[str, ...]) -> Any:
    """The compare-and-set of :func:`_take` writing ``columns``, built once per action (it runs per action)."""
    return (
        sa.update(_ORDER)
        .where(
            _ORDER.c.work_order_id == sa.bindparam("id"),
            _ORDER.c.status == sa.bindparam("was"),
            _ORDER.c.extension_status == sa.bindparam("was_extension"),
        )
        .values({column: sa.bindparam(f"new_{column}") for column in columns})
    )


def _require(order: OrderHead, allowed: tuple[str, ...], action: str) -> None:
    """The order must be in one of ``allowed`` states for ``action``."""
    if order.status not in allowed:
        raise Rejected(f"work order {order.work_order_id} is {order.status}; {action} needs it {' or '.join(allowed)}")


def _take(uow: UnitOfWork, order: OrderHead, action: str, **changes: Any) -> None:
    """Write ``changes`` to the order — if it is still as it was read when this unit of work writes it.

    Two instances of handling share one database: two requests for the same order (a client retrying on the other
    instance while the first try is still served, two staff at once) both read it, say, ``dispatched``. The
    compare-and-set changes the row only if no one changed it since; of the two, one applies and the other is
    refused (409) as if it had come second."""
    columns = tuple(sorted(changes))
    params = {f"new_{column}": changes[column] for column in columns}
    params.update(id=order.work_order_id, was=order.status, was_extension=order.extension_status)
    if uow.connection.execute(_take_statement(columns), params).rowcount != 1:
        raise Rejected(f"work order {order.work_order_id} was changed meanwhile; {action} refused")


def _common(order: OrderHead, actor: Actor, uow: UnitOfWork) -> dict[str, Any]:
    return dict(
        incident_id=order.incident_id,
        actor=actor,
        correlation_id=order.correlation_id,
        occurred_at=uow.now(),
        work_order_id=order.work_order_id,
        department_code=order.department_code,
    )


def _accept(work_order_id: str, cmd: DepartmentCommand, uow: UnitOfWork) -> str:
    order, actor = _order_for(uow, work_order_id, cmd)
    _require(order, (OrderStatus.DISPATCHED,), "accepting")
    _take(uow, order, "accepting", status=OrderStatus.ACCEPTED, accepted_at=uow.now())
    uow.emit(ev.WorkOrderAccepted(**_common(order, actor, uow)))
    return OrderStatus.ACCEPTED


def accept_work_order(work_order_id: str, cmd: AcceptWorkOrder, uow: UnitOfWork) -> WorkOrderAction:
    """签收: dispatched → accepted."""
    status = _accept(work_order_id, cmd, uow)
    uow.commit()
    return WorkOrderAction(work_order_id=work_order_id, status=status)


def accept_work_orders(cmd: AcceptWorkOrders, uow: UnitOfWork) -> BatchOutcome:
    """批量签收: each order as :func:`accept_work_order` would take it; the refused ones change nothing."""
    done = act_on_each(cmd.work_order_ids, lambda work_order_id: _accept(work_order_id, cmd, uow))
    uow.commit()
    return done


def return_work_order(work_order_id: str, cmd: ReturnWorkOrder, uow: UnitOfWork) -> WorkOrderAction:
    """退回: dispatched or accepted → returned; the center routes the work elsewhere."""
    order, actor = _order_for(uow, work_order_id, cmd)
    _require(order, (OrderStatus.DISPATCHED, OrderStatus.ACCEPTED), "returning")
    _take(uow, order, "returning", status=OrderStatus.RETURNED)
    uow.emit(ev.WorkOrderReturned(**_common(order, actor, uow), reason=cmd.reason))
    uow.commit()
    return WorkOrderAction(work_order_id=work_order_id, status=OrderStatus.RETURNED)


def request_extension(work_order_id: str, cmd: RequestExtension, uow: UnitOfWork) -> WorkOrderAction:
    """延期: from accepted or rework, one request at a time, for a deadline later than the current one."""
    order, actor = _order_for(uow, work_order_id, cmd)
    _require(order, (OrderStatus.ACCEPTED, OrderStatus.REWORK), "asking for an extension")
    if order.extension_status == ExtensionStatus.REQUESTED:
        raise Rejected(f"work order {work_order_id} already has an extension request pending")
    deadline = as_utc(order.deadline)
    if cmd.requested_deadline <= deadline:
        raise Rejected(
            f"requested deadline {cmd.requested_deadline.isoformat()} is not later than the current deadline "
            f"{deadline.isoformat()}"
        )
    if cmd.requested_deadline <= uow.now():
        raise Rejected(f"requested deadline {cmd.requested_deadline.isoformat()} is already past")
    _take(
        uow,
        order,
        "asking for an extension",
        extension_status=ExtensionStatus.REQUESTED,
        requested_deadline=cmd.requested_deadline,
    )
    uow.emit(
        ev.ExtensionRequested(
            **_common(order, actor, uow), requested_deadline=cmd.requested_deadline, reason=cmd.reason
        )
    )
    uow.commit()
    return WorkOrderAction(work_order_id=work_order_id, status=order.status)


def _handle(work_order_id: str, cmd: HandleWorkOrder, uow: UnitOfWork) -> str:
    order, actor = _order_for(uow, work_order_id, cmd)
    _require(order, (OrderStatus.ACCEPTED, OrderStatus.REWORK), "handling")
    changes: dict[str, Any] = dict(
        status=OrderStatus.HANDLED,
        handled_at=uow.now(),
        result=cmd.result,
        evidence_urls=" ".join(str(u) for u in cmd.evidence_urls),
    )
    if order.extension_status == ExtensionStatus.REQUESTED:  # done in time after all: the request lapses
        changes.update(extension_status=ExtensionStatus.NONE, requested_deadline=None)
    _take(uow, order, "handling", **changes)
    uow.emit(ev.WorkOrderHandled(**_common(order, actor, uow), result=cmd.result, evidence_urls=cmd.evidence_urls))
    return OrderStatus.HANDLED


def handle_work_order(work_order_id: str, cmd: HandleWorkOrder, uow: UnitOfWork) -> WorkOrderAction:
    """处置: accepted or rework → handled, with the result and evidence for the verifier."""
    status = _handle(work_order_id, cmd, uow)
    uow.commit()
    return WorkOrderAction(work_order_id=work_order_id, status=status)


def handle_work_orders(cmd: HandleWorkOrders, uow: UnitOfWork) -> BatchOutcome:
    """批量处置: each item as :func:`handle_work_order` would take it; the refused ones change nothing."""
    items = {item.work_order_id: item for item in cmd.items}

    def one(work_order_id: str) -> str:
        item = items[work_order_id]
        single = HandleWorkOrder.model_construct(
            actor_id=cmd.actor_id,
            department_code=cmd.department_code,
            result=item.result,
            evidence_urls=item.evidence_urls,
        )
        return _handle(work_order_id, single, uow)

    done = act_on_each(items, one)
    uow.commit()
    return done


# -- queries --------------------------------------------------------------------------------------------


def _order_public(o: HandlingWorkOrder | sa.Row[Any], now: datetime) -> WorkOrderPublic:
    deadline = as_utc(o.deadline)
    return WorkOrderPublic(
        work_order_id=o.work_order_id,
        incident_id=o.incident_id,
        department_code=o.department_code,
        role=o.role,
        coordinator=o.coordinator,
        category_code=o.category_code,
        grid_id=o.grid_id,
        lat=o.lat,
        lon=o.lon,
        address=o.address,
        description=o.description,
        photo_urls=_urls(o.photo_urls),
        priority=o.priority,
        attempt=o.attempt,
        status=o.status,
        deadline=deadline,
        overdue=o.status in OrderStatus.ACTIVE and deadline < now,
        dispatched_at=as_utc(o.dispatched_at),
        accepted_at=as_utc(o.accepted_at) if o.accepted_at else None,
        handled_at=as_utc(o.handled_at) if o.handled_at else None,
        rework_count=o.rework_count,
        last_note=o.last_note,
        extension_status=o.extension_status,
        requested_deadline=as_utc(o.requested_deadline) if o.requested_deadline else None,
        result=o.result,
        evidence_urls=_urls(o.evidence_urls),
    )


def get_work_order(work_order_id: str, uow: UnitOfWork) -> WorkOrderPublic:
    order = uow.session.get(HandlingWorkOrder, work_order_id)
    if order is None:
        raise visibility.unseen("work order", work_order_id)
    return _order_public(order, uow.now())


def list_work_orders(
    uow: UnitOfWork,
    department: str | None = None,
    status: str | None = None,
    overdue: bool | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[WorkOrderPublic]:
    """A department's queue: earliest deadline first. Read as rows, not ORM objects: a queue is polled far more
    often than it changes, and nothing here is written."""
    now = uow.now()
    c = _ORDER.c
    q = sa.select(_ORDER)
    if department:
        q = q.where(c.department_code == department)
    if status:
        q = q.where(c.status == status)
    if overdue is not None:
        late = sa.and_(c.status.in_(OrderStatus.ACTIVE), c.deadline < now)
        q = q.where(late if overdue else sa.not_(late))
    q = q.order_by(c.deadline, c.work_order_id).offset(offset).limit(limit)
    return [_order_public(o, now) for o in uow.connection.execute(q)]


def list_webhook_deliveries(
    uow: UnitOfWork, status: str | None = None, department: str | None = None, limit: int = 100, offset: int = 0
) -> list[WebhookDeliveryPublic]:
    """Webhook deliveries, newest first."""
    q = select(HandlingWebhookDelivery)
    if status:
        q = q.where(HandlingWebhookDelivery.status == status)
    if department:
        q = q.where(HandlingWebhookDelivery.department_code == department)
    rows = uow.session.exec(q.order_by(col(HandlingWebhookDelivery.id).desc()).offset(offset).limit(limit)).all()
    return [
        WebhookDeliveryPublic(
            id=r.id or 0,
            work_order_id=r.work_order_id,
            department_code=r.department_code,
            url=r.url,
            event_id=r.event_id,
            event_type=r.event_type,
            attempts=r.attempts,
            status=r.status,
            next_attempt_at=as_utc(r.next_attempt_at),
            last_error=r.last_error,
            created_at=as_utc(r.created_at),
            delivered_at=as_utc(r.delivered_at) if r.delivered_at else None,
        )
        for r in rows
    ]


# -- webhook deliveries --------------------------------------------------------------------------------


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


def webhook_backoff(attempts: int, policy: HandlingSettings) -> timedelta:
    """The wait after ``attempts`` failed attempts: 1 s, 2 s, 4 s … up to the cap. Wall-clock time."""
    return timedelta(seconds=min(2.0 ** min(max(attempts - 1, 0), 30), policy.webhook_backoff_max_s))


def claim_due_webhooks(uow: UnitOfWork, policy: HandlingSettings, limit: int = 50) -> list[WebhookJob]:
    """Pending deliveries whose time has come, leased so no other tick or instance sends them meanwhile."""
    now = uow.now()
    rows = uow.session.exec(
        select(HandlingWebhookDelivery)
        .where(
            HandlingWebhookDelivery.status == DeliveryStatus.PENDING,
            col(HandlingWebhookDelivery.next_attempt_at) <= now,
        )
        .order_by(col(HandlingWebhookDelivery.next_attempt_at), col(HandlingWebhookDelivery.id))
        .limit(limit)
    ).all()
    jobs = [
        WebhookJob(
            id=r.id or 0,
            url=r.url,
            payload=r.payload,
            event_id=r.event_id,
            event_type=r.event_type,
            attempt=r.attempts + 1,
        )
        for r in rows
    ]
    if not jobs:
        return []
    lease = now + timedelta(seconds=policy.webhook_timeout_s * 2 + 30)
    claimed: list[WebhookJob] = []
    for job in jobs:
        result = uow.connection.execute(
            sa.update(HandlingWebhookDelivery)
            .where(
                col(HandlingWebhookDelivery.id) == job.id,
                col(HandlingWebhookDelivery.status) == DeliveryStatus.PENDING,
                col(HandlingWebhookDelivery.next_attempt_at) <= now,
            )
            .values(next_attempt_at=lease)
        )
        if result.rowcount == 1:
            claimed.append(job)
    uow.commit()
    return claimed


def record_webhook_attempt(delivery_id: int, error: str | None, uow: UnitOfWork, policy: HandlingSettings) -> str:
    """Count an attempt: delivered, retried after a backoff, or given up after the last attempt. Returns the status."""
    row = uow.session.get(HandlingWebhookDelivery, delivery_id)
    if row is None:
        raise NotFound(f"no webhook delivery {delivery_id}")
    now = uow.now()
    row.attempts += 1
    if error is None:
        row.status, row.delivered_at, row.next_attempt_at = DeliveryStatus.DELIVERED, now, now
    else:
        row.last_error = error[:1000]
        if row.attempts >= policy.webhook_max_attempts:
            row.status, row.next_attempt_at = DeliveryStatus.FAILED, now
        else:
            row.next_attempt_at = now + webhook_backoff(row.attempts, policy)
    uow.commit()
    return row.status


def preload(events: Sequence[Event], uow: UnitOfWork) -> None:
    """A batch's work orders read in two queries, rather than one or two per event."""
    uow.fetch(HandlingWorkOrder, (w for e in events if (w := getattr(e, "work_order_id", None))))
    uow.fetch_by(HandlingWorkOrder, "incident_id", (e.incident_id for e in events if isinstance(e, ev.IncidentClosed)))


def bind(policy: HandlingSettings) -> Mapping[type[Event], Callable[[Any, UnitOfWork], None]]:
    rules: dict[type[Event], Callable[..., None]] = {
        ev.WorkOrderDispatched: receive_work_order,
        ev.IncidentReworked: rework_work_order,
        ev.ExtensionGranted: grant_extension,
        ev.ExtensionRefused: refuse_extension,
        ev.IncidentClosed: close_work_orders,
    }
    return {etype: functools.partial(fn, policy=policy) for etype, fn in rules.items()}
