"""handling's service layer: load from the store, ask the rules (:mod:`.domain`), save and emit.

Event handlers keep the bus's ``(event, uow)`` signature (bound with the settings by :func:`bind`); commands and
queries take their arguments, then ``uow``, for ``runtime.command`` / ``runtime.query`` (the bus commits).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from schemas import Actor, Event
from schemas import events as ev
from services.common import visibility
from services.common.batch import BatchOutcome, act_on_each
from services.common.changes import keys_for
from services.common.db import UnitOfWork
from services.common.errors import Forbidden, NotFound, Rejected, UnknownIncident

from . import domain, models
from .domain import OrderHead, Step, WebhookJob, WorkOrder
from .settings import HandlingSettings
from .store import HandlingStore

WORK_ORDERS = "work-orders"
"""The long-poll key of a department's queue (``work-orders:<department>``)."""


# -- events from the center ------------------------------------------------------------------------------


def _known_order(store: HandlingStore, work_order_id: str, incident_id: str) -> WorkOrder:
    """The work order an event from the center names; one this service never received is a poison message."""
    order = store.order(work_order_id)
    if order is None or order.incident_id != incident_id:
        raise UnknownIncident(f"no work order {work_order_id} for incident {incident_id}")
    return order


def _changed(uow: UnitOfWork, order: WorkOrder) -> None:
    """Wake the desks waiting on the order's department's queue."""
    uow.touch(*keys_for(WORK_ORDERS, order.department_code))


def _push(store: HandlingStore, policy: HandlingSettings, order: WorkOrder, event: Event, now: datetime) -> None:
    """Queue the push of ``event`` to the department's own system, if it has one."""
    if (delivery := domain.webhook_delivery(order, event, policy.webhooks, now)) is not None:
        store.add_delivery(delivery)


def receive_work_order(dispatched: ev.WorkOrderDispatched, uow: UnitOfWork, policy: HandlingSettings) -> None:
    """派遣: a new work order lands in the department's queue; one already known changes nothing."""
    store = HandlingStore(uow)
    if store.order(dispatched.work_order_id) is not None:
        return
    order = store.add_order(domain.receive_work_order(dispatched))
    _changed(uow, order)
    _push(store, policy, order, dispatched, uow.now())


def rework_work_order(reworked: ev.IncidentReworked, uow: UnitOfWork, policy: HandlingSettings) -> None:
    """返工: the work comes back to the department (and to its own system)."""
    store = HandlingStore(uow)
    order = _known_order(store, reworked.work_order_id, reworked.incident_id)
    domain.rework_work_order(order, reworked)
    _changed(uow, order)
    _push(store, policy, order, reworked, uow.now())


def grant_extension(granted: ev.ExtensionGranted, uow: UnitOfWork, policy: HandlingSettings) -> None:
    order = _known_order(HandlingStore(uow), granted.work_order_id, granted.incident_id)
    domain.grant_extension(order, granted)
    _changed(uow, order)


def refuse_extension(refused: ev.ExtensionRefused, uow: UnitOfWork, policy: HandlingSettings) -> None:
    order = _known_order(HandlingStore(uow), refused.work_order_id, refused.incident_id)
    domain.refuse_extension(order, refused)
    _changed(uow, order)


def close_work_orders(closed: ev.IncidentClosed, uow: UnitOfWork, policy: HandlingSettings) -> None:
    """结案. An incident fixed on the spot had no work orders: nothing to do."""
    domain.close_work_orders(HandlingStore(uow).orders_of(closed.incident_id))


def preload(events: Sequence[Event], uow: UnitOfWork) -> None:
    HandlingStore(uow).preload(events)


def bind(policy: HandlingSettings) -> Mapping[type[Event], Callable[[Any, UnitOfWork], None]]:
    rules: dict[type[Event], Callable[..., None]] = {
        ev.WorkOrderDispatched: receive_work_order,
        ev.IncidentReworked: rework_work_order,
        ev.ExtensionGranted: grant_extension,
        ev.ExtensionRefused: refuse_extension,
        ev.IncidentClosed: close_work_orders,
    }
    return {etype: functools.partial(fn, policy=policy) for etype, fn in rules.items()}


# -- commands from department staff -----------------------------------------------------------------------

Decide = Callable[[OrderHead, Actor, datetime], Step]
"""A rule of :mod:`.domain` deciding a department's action on its work order, its command's words bound."""


def _order_for(uow: UnitOfWork, work_order_id: str, cmd: models.DepartmentCommand) -> tuple[OrderHead, Actor]:
    """The order a department acts on: another department's is answered as an unknown one (404, not 403, which
    would tell that it exists and whose it is)."""
    order = HandlingStore(uow).order_head(work_order_id)
    if order is None or cmd.department_code != order.department_code:
        raise visibility.unseen("work order", work_order_id)
    if cmd.actor_id is None:
        raise Forbidden(f"work order {work_order_id}: who of {order.department_code} acts on it?")
    return order, domain.department_actor(order, cmd.actor_id)


def _act(work_order_id: str, cmd: models.DepartmentCommand, uow: UnitOfWork, decide: Decide) -> models.WorkOrderAction:
    """One department action: read the order, ask the rule, write it if unchanged since, emit. A refusal raises
    before anything is written (as :func:`act_on_each` needs)."""
    order, actor = _order_for(uow, work_order_id, cmd)
    try:
        step = decide(order, actor, uow.now())
    except domain.Refused as refused:
        raise Rejected(str(refused)) from None
    HandlingStore(uow).take(order, step)
    uow.emit(step.event)
    return models.WorkOrderAction(work_order_id=work_order_id, status=step.status)


def accept_work_order(work_order_id: str, cmd: models.DepartmentCommand, uow: UnitOfWork) -> models.WorkOrderAction:
    """签收."""
    return _act(work_order_id, cmd, uow, domain.accept_work_order)


def return_work_order(work_order_id: str, cmd: models.ReturnWorkOrder, uow: UnitOfWork) -> models.WorkOrderAction:
    """退回."""
    return _act(work_order_id, cmd, uow, functools.partial(domain.return_work_order, reason=cmd.reason))


def request_extension(work_order_id: str, cmd: models.RequestExtension, uow: UnitOfWork) -> models.WorkOrderAction:
    """延期."""
    rule = functools.partial(domain.request_extension, requested_deadline=cmd.requested_deadline, reason=cmd.reason)
    return _act(work_order_id, cmd, uow, rule)


def handle_work_order(work_order_id: str, cmd: models.HandleWorkOrder, uow: UnitOfWork) -> models.WorkOrderAction:
    """处置."""
    rule = functools.partial(domain.handle_work_order, result=cmd.result, evidence_urls=cmd.evidence_urls)
    return _act(work_order_id, cmd, uow, rule)


def accept_work_orders(cmd: models.AcceptWorkOrders, uow: UnitOfWork) -> BatchOutcome:
    """批量签收: each order as :func:`accept_work_order` would take it; the refused ones change nothing."""
    return act_on_each(cmd.work_order_ids, lambda work_order_id: accept_work_order(work_order_id, cmd, uow).status)


def handle_work_orders(cmd: models.HandleWorkOrders, uow: UnitOfWork) -> BatchOutcome:
    """批量处置: each item as :func:`handle_work_order` would take it; the refused ones change nothing."""
    items = {item.work_order_id: item for item in cmd.items}

    def one(work_order_id: str) -> str:
        item = items[work_order_id]
        single = models.HandleWorkOrder.model_construct(
            actor_id=cmd.actor_id,
            department_code=cmd.department_code,
            result=item.result,
            evidence_urls=item.evidence_urls,
        )
        return handle_work_order(work_order_id, single, uow).status

    return act_on_each(items, one)


# -- queries --------------------------------------------------------------------------------------------


def work_order_public(order: WorkOrder, now: datetime) -> models.WorkOrderPublic:
    """A work order as the API shows it: its URLs as lists, and whether it is overdue ``now``."""
    return models.WorkOrderPublic.model_validate(
        {
            **vars(order),
            "photo_urls": domain.urls(order.photo_urls),
            "evidence_urls": domain.urls(order.evidence_urls),
            "overdue": domain.overdue(order.status, order.deadline, now),
        }
    )


def get_work_order(work_order_id: str, uow: UnitOfWork) -> models.WorkOrderPublic:
    order = HandlingStore(uow).order(work_order_id)
    if order is None:
        raise visibility.unseen("work order", work_order_id)
    return work_order_public(order, uow.now())


def list_work_orders(
    department: str | None,
    status: str | None,
    overdue: bool | None,
    limit: int,
    offset: int,
    uow: UnitOfWork,
) -> list[models.WorkOrderPublic]:
    """A department's queue: earliest deadline first."""
    now = uow.now()
    return [
        work_order_public(o, now) for o in HandlingStore(uow).queue(now, department, status, overdue, limit, offset)
    ]


def list_webhook_deliveries(
    status: str | None, department: str | None, limit: int, offset: int, uow: UnitOfWork
) -> list[models.WebhookDeliveryPublic]:
    """Webhook deliveries, newest first."""
    rows = HandlingStore(uow).deliveries(status, department, limit, offset)
    return [models.WebhookDeliveryPublic.model_validate(r, from_attributes=True) for r in rows]


# -- webhook deliveries --------------------------------------------------------------------------------


WEBHOOKS_PER_TICK = 50
"""Deliveries one tick of the deliverer claims at most."""


def claim_due_webhooks(policy: HandlingSettings, uow: UnitOfWork) -> list[WebhookJob]:
    """Pending deliveries whose time has come, leased so no other tick or instance sends them meanwhile."""
    store, now = HandlingStore(uow), uow.now()
    jobs = [domain.webhook_job(d) for d in store.due_deliveries(now, WEBHOOKS_PER_TICK)]
    if not jobs:
        return []
    lease = domain.webhook_lease(now, policy.webhook_timeout_s)
    return [job for job in jobs if store.lease(job.id, now, lease)]


def record_webhook_attempt(delivery_id: int, error: str | None, policy: HandlingSettings, uow: UnitOfWork) -> str:
    """Count an attempt (see :func:`domain.record_webhook_attempt`). Returns the delivery's status."""
    delivery = HandlingStore(uow).delivery(delivery_id)
    if delivery is None:
        raise NotFound(f"no webhook delivery {delivery_id}")
    return domain.record_webhook_attempt(
        delivery, error, uow.now(), policy.webhook_max_attempts, policy.webhook_backoff_max_s
    )
