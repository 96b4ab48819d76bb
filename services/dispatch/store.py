"""The one door to dispatch's tables: cases and work orders as typed rows of the domain.

A consumed batch reads its cases and work orders in three queries (:meth:`DispatchStore.preload`); the handlers
then ask for them one by one and are answered from memory. Changed rows are written at the commit (only the columns
that changed). The statements a busy path runs are built once, here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from schemas import CASE_OPEN, ORDER_ACTIVE, Event, Moment
from services.common.db import Rows, UnitOfWork
from services.common.errors import UnknownIncident

from .domain import Case, MergeSearch, WorkOrder
from .models import DispatchCase, DispatchWorkOrder

CASES = Rows(DispatchCase, Case)
ORDERS = Rows(DispatchWorkOrder, WorkOrder)

_CASES = CASES.table
_ORDERS = ORDERS.table

_CANDIDATES = sa.select(_CASES).where(
    _CASES.c.category_code == sa.bindparam("category"),
    _CASES.c.status.in_(CASE_OPEN),
    _CASES.c.reported_at >= sa.bindparam("since"),
    _CASES.c.lat.between(sa.bindparam("south"), sa.bindparam("north")),
    _CASES.c.lon.between(sa.bindparam("west"), sa.bindparam("east")),
)
"""Open cases of a category reported since a time, inside a box (built once: it runs for every report)."""

_LATE = (
    sa.select(_ORDERS)
    .where(
        _ORDERS.c.status.in_(ORDER_ACTIVE),
        _ORDERS.c.deadline < sa.bindparam("now"),
        _ORDERS.c.escalated_at.is_(None),
    )
    .limit(500)
)

_PENDING_EXTENSIONS = sa.select(_ORDERS).where(_ORDERS.c.extension_requested_until.is_not(None))


@functools.cache
def _take_step(mark: str) -> Any:
    """Set ``mark`` (reminded_at / escalated_at) of an order still active, unmarked and due by the deadline read."""
    return (
        sa.update(_ORDERS)
        .where(
            _ORDERS.c.work_order_id == sa.bindparam("_id"),
            _ORDERS.c[mark].is_(None),
            _ORDERS.c.status.in_(ORDER_ACTIVE),
            _ORDERS.c.deadline == sa.bindparam("_deadline"),
        )
        .values({mark: sa.bindparam("_now")})
    )


def preload(events: Sequence[Event], uow: UnitOfWork) -> None:
    """The bus's preload for a consumed batch (see :meth:`DispatchStore.preload`)."""
    DispatchStore(uow).preload(events)


class DispatchStore:
    """dispatch's cases and work orders in one unit of work."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    def moment(self) -> Moment:
        return self.uow.moment()

    def preload(self, events: Sequence[Event]) -> None:
        """A batch's cases and work orders read in three queries, rather than several per event."""
        uow = self.uow
        incident_ids = {e.incident_id for e in events}
        uow.fetch(CASES, incident_ids)
        uow.fetch(ORDERS, (w for e in events if (w := getattr(e, "work_order_id", None))))
        uow.fetch_by(ORDERS, "incident_id", incident_ids)

    # -- cases ----------------------------------------------------------------------------------------------

    def find_case(self, incident_id: str) -> Case | None:
        return self.uow.record(CASES, incident_id)

    def case(self, incident_id: str) -> Case:
        """The case of an incident an event names (an unknown one is a message never to apply)."""
        case = self.uow.record(CASES, incident_id)
        if case is None:
            raise UnknownIncident(f"no case for incident {incident_id}")
        return case

    def case_with_orders(self, incident_id: str) -> tuple[Case, list[WorkOrder]]:
        """The case of an incident an event names, and its work orders, oldest first."""
        return self.case(incident_id), self.orders_of(incident_id)

    def add_case(self, case: Case) -> None:
        """A new case: written at the commit. It has no work orders yet, so asking for them reads nothing."""
        self.uow.add(CASES, case)
        self.uow.none_by(ORDERS, "incident_id", case.incident_id)

    def merge_candidates(self, search: MergeSearch) -> list[Case]:
        """The cases a report may be a duplicate of: those stored in the search's box, and those this unit added
        and has not written yet (the select does not see them). The domain checks each as it stands in memory."""
        params = {
            "category": search.category_code,
            "since": search.since,
            "south": search.south,
            "north": search.north,
            "west": search.west,
            "east": search.east,
        }
        stored = self.uow.records_where(CASES, _CANDIDATES, params)
        pending = self.uow.inserted(CASES)
        return list({id(c): c for c in (*stored, *pending)}.values())

    # -- work orders ----------------------------------------------------------------------------------------

    def find_order(self, work_order_id: str) -> WorkOrder | None:
        return self.uow.record(ORDERS, work_order_id)

    def order(self, work_order_id: str, incident_id: str) -> WorkOrder:
        """The work order an event names, of the incident it names."""
        order = self.uow.record(ORDERS, work_order_id)
        if order is None or order.incident_id != incident_id:
            raise UnknownIncident(f"no work order {work_order_id} for incident {incident_id}")
        return order

    def orders_of(self, incident_id: str) -> list[WorkOrder]:
        """The case's work orders, oldest first (read once per unit of work: a handler may ask twice)."""
        orders = self.uow.records_by(ORDERS, "incident_id", incident_id)
        return sorted(orders, key=lambda o: (o.dispatched_at, o.work_order_id))

    def add_orders(self, orders: Sequence[WorkOrder]) -> None:
        for order in orders:
            self.uow.add(ORDERS, order)

    def late_orders(self, now: datetime) -> list[tuple[WorkOrder, Case]]:
        """Active work orders past their deadline and not escalated yet (at most 500 a look), with their cases."""
        late = self.uow.records_where(ORDERS, _LATE, {"now": now})
        return [(order, self.case(order.incident_id)) for order in late]

    def take_step(self, order: WorkOrder, mark: str, now: datetime) -> bool:
        """Compare-and-set ``mark`` (reminded_at / escalated_at) of a late order as the watchdog saw it.

        Two dispatch instances over one database both run the watchdog: of two that saw the same late order, only
        the one whose UPDATE changed the row emits the event. The row must still be active, unmarked and due by the
        deadline read, so a rework or extension committed meanwhile (new deadline, marks cleared) is not reminded
        stale."""
        params = {"_id": order.work_order_id, "_deadline": order.deadline, "_now": now}
        result = self.uow.connection.execute(_take_step(mark), params)
        return bool(result.rowcount == 1)

    def pending_extensions(self) -> list[WorkOrder]:
        return self.uow.records_where(ORDERS, _PENDING_EXTENSIONS)
