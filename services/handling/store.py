"""The only door to handling's tables: work orders and webhook deliveries, as the domain's typed rows.

The consumer's path reads a batch's work orders in two queries (:meth:`HandlingStore.preload`) and changes them in
place (the unit of work writes the changed columns at the commit). A department's action reads the few columns it
needs with a statement built once and writes with a compare-and-set (:meth:`HandlingStore.take`). The queue and
the deliveries are read with the selects they always were.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from schemas import ORDER_ACTIVE, DeliveryStatus, Event
from schemas import events as ev
from services.common.db import Rows, UnitOfWork, columns_by_key
from services.common.errors import Rejected

from .domain import OrderHead, Step, WebhookDelivery, WorkOrder
from .models import HandlingWebhookDelivery, HandlingWorkOrder

ORDERS = Rows(HandlingWorkOrder, WorkOrder)
DELIVERIES = Rows(HandlingWebhookDelivery, WebhookDelivery)

_ORDER = ORDERS.table
_DELIVERY = DELIVERIES.table

_HEAD = columns_by_key(_ORDER, *(f.name for f in dataclasses.fields(OrderHead)))
"""What a department action reads of its work order, built once: the columns its rules and its event need, not
the whole row (which cost more than the rest of the action)."""


@functools.cache
def _take_statement(columns: tuple[str, ...]) -> Any:
    """The compare-and-set of :meth:`HandlingStore.take` writing ``columns``, built once per action (it runs per
    action)."""
    return (
        sa.update(_ORDER)
        .where(
            _ORDER.c.work_order_id == sa.bindparam("id"),
            _ORDER.c.status == sa.bindparam("was"),
            _ORDER.c.extension_status == sa.bindparam("was_extension"),
        )
        .values({column: sa.bindparam(f"new_{column}") for column in columns})
    )


_DUE = (
    sa.select(_DELIVERY)
    .where(_DELIVERY.c.status == DeliveryStatus.PENDING, _DELIVERY.c.next_attempt_at <= sa.bindparam("now"))
    .order_by(_DELIVERY.c.next_attempt_at, _DELIVERY.c.id)
    .limit(sa.bindparam("limit"))
)
_LEASE = (
    sa.update(_DELIVERY)
    .where(
        _DELIVERY.c.id == sa.bindparam("delivery"),
        _DELIVERY.c.status == DeliveryStatus.PENDING,
        _DELIVERY.c.next_attempt_at <= sa.bindparam("now"),
    )
    .values(next_attempt_at=sa.bindparam("until"))
)
_DELIVERY_COLUMNS = tuple(c.name for c in _DELIVERY.columns if c.name != "id")


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes: read them as the UTC they were stored as."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class HandlingStore:
    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    # -- the consumer's path: whole rows, changed in place

    def preload(self, events: Sequence[Event]) -> None:
        """A batch's work orders read in two queries, rather than one or two per event."""
        self.uow.fetch(ORDERS, (w for e in events if (w := getattr(e, "work_order_id", None))))
        self.uow.fetch_by(ORDERS, "incident_id", (e.incident_id for e in events if isinstance(e, ev.IncidentClosed)))

    def order(self, work_order_id: str) -> WorkOrder | None:
        return self.uow.record(ORDERS, work_order_id)

    def orders_of(self, incident_id: str) -> list[WorkOrder]:
        return self.uow.records_by(ORDERS, "incident_id", incident_id)

    def add_order(self, order: WorkOrder) -> WorkOrder:
        return self.uow.add(ORDERS, order)

    def add_delivery(self, delivery: WebhookDelivery) -> None:
        """Outbox-style: written at the commit with the change that caused it; nothing in this unit reads it back
        (one insert per batch, not a row kept in memory)."""
        self.uow.append(HandlingWebhookDelivery, **{name: getattr(delivery, name) for name in _DELIVERY_COLUMNS})

    # -- a department's action: a few columns, and a compare-and-set

    def order_head(self, work_order_id: str) -> OrderHead | None:
        row = self.uow.row(_HEAD, work_order_id)
        if row is None:
            return None
        return OrderHead(**{**row._mapping, "deadline": _aware(row.deadline)})

    def take(self, order: OrderHead, step: Step) -> None:
        """Write the step's changes to the order — if it is still as it was read when this unit of work writes it.

        Two instances of handling share one database: two requests for the same order (a client retrying on the
        other instance while the first try is still served, two staff at once) both read it, say, ``dispatched``.
        The compare-and-set changes the row only if no one changed it since; of the two, one applies and the
        other is refused (409) as if it had come second."""
        columns = tuple(sorted(step.changes))
        params = {f"new_{column}": step.changes[column] for column in columns}
        params.update(id=order.work_order_id, was=order.status, was_extension=order.extension_status)
        if self.uow.connection.execute(_take_statement(columns), params).rowcount != 1:
            raise Rejected(f"work order {order.work_order_id} was changed meanwhile; {step.action} refused")

    # -- reads for the API

    def queue(
        self,
        now: datetime,
        department: str | None = None,
        status: str | None = None,
        overdue: bool | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[WorkOrder]:
        """A department's queue: earliest deadline first (overdue as :func:`domain.overdue` decides it, in SQL)."""
        c = _ORDER.c
        q = sa.select(_ORDER)
        if department:
            q = q.where(c.department_code == department)
        if status:
            q = q.where(c.status == status)
        if overdue is not None:
            late = sa.and_(c.status.in_(ORDER_ACTIVE), c.deadline < now)
            q = q.where(late if overdue else sa.not_(late))
        q = q.order_by(c.deadline, c.work_order_id).offset(offset).limit(limit)
        return self.uow.records_where(ORDERS, q)

    def deliveries(
        self, status: str | None = None, department: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[WebhookDelivery]:
        """Webhook deliveries, newest first."""
        q = sa.select(_DELIVERY)
        if status:
            q = q.where(_DELIVERY.c.status == status)
        if department:
            q = q.where(_DELIVERY.c.department_code == department)
        return self.uow.records_where(DELIVERIES, q.order_by(_DELIVERY.c.id.desc()).offset(offset).limit(limit))

    # -- the deliverer

    def due_deliveries(self, now: datetime, limit: int) -> list[WebhookDelivery]:
        """Pending deliveries whose time has come, earliest first."""
        return self.uow.records_where(DELIVERIES, _DUE, {"now": now, "limit": limit})

    def lease(self, delivery_id: int, now: datetime, until: datetime) -> bool:
        """Put a due delivery off until ``until`` while it is sent; False if another sender took it first."""
        params = {"delivery": delivery_id, "now": now, "until": until}
        return bool(self.uow.connection.execute(_LEASE, params).rowcount == 1)

    def delivery(self, delivery_id: int) -> WebhookDelivery | None:
        return self.uow.record(DELIVERIES, delivery_id)


__all__ = ["DELIVERIES", "ORDERS", "HandlingStore"]
