"""dispatch's handlers: load the case and its work orders from the store, ask the rules (``domain``), store what
they made and emit what they decided.

Event handlers keep the bus's ``(event, uow)`` shape once :func:`bind` gave them the policy and the town; command
handlers (the operations center's decision, the watchdog) and reads take their arguments, then ``uow``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from schemas import GAOHANG, Actor, Event, Town
from schemas import events as ev
from services.common.db import UnitOfWork
from services.common.errors import NotFound, Rejected, UnknownIncident

from . import domain
from .domain import Decision, Policy, WorkOrder
from .models import CasePublic, WorkOrderPublic
from .store import DispatchStore
from .store import preload as preload


@contextmanager
def _as_service_errors() -> Iterator[None]:
    """The rules' refusals as the service's errors: an event out of turn is never applied (dead-lettered), a
    command the rules refuse is answered 409."""
    try:
        yield
    except domain.NotExpected as exc:
        raise UnknownIncident(str(exc)) from None
    except domain.NotAllowed as exc:
        raise Rejected(str(exc)) from None


def _save(store: DispatchStore, decision: Decision, uow: UnitOfWork) -> None:
    store.add_orders(decision.orders)
    for event in decision.events:
        uow.emit(event)


# -- events ---------------------------------------------------------------------------------------------------


def file_incident(report: ev.IncidentReported, uow: UnitOfWork, policy: Policy, town: Town = GAOHANG) -> None:
    """立案: reject, merge or file a report; a filed one is dispatched, or verified at once if fixed on the spot."""
    store = DispatchStore(uow)
    if store.find_case(report.incident_id) is not None:
        return  # the same incident re-reported under another event id: already decided
    moment = store.moment()
    case = domain.open_case(report, town)
    search = domain.merge_search(case, town, policy, moment)
    candidates = store.merge_candidates(search) if search else []
    decision = domain.file_incident(case, report, candidates, town, policy, moment)
    store.add_case(case)
    _save(store, decision, uow)


def reroute_work_order(returned: ev.WorkOrderReturned, uow: UnitOfWork, policy: Policy, town: Town = GAOHANG) -> None:
    """退回: the next candidate department takes the work; after repeated returns, the operations center."""
    store = DispatchStore(uow)
    case, orders = store.case_with_orders(returned.incident_id)
    order = store.order(returned.work_order_id, returned.incident_id)
    with _as_service_errors():
        decision = domain.reroute_work_order(case, orders, order, returned, town, policy, store.moment())
    _save(store, decision, uow)


def record_acceptance(accepted: ev.WorkOrderAccepted, uow: UnitOfWork, policy: Policy, town: Town = GAOHANG) -> None:
    domain.record_acceptance(DispatchStore(uow).order(accepted.work_order_id, accepted.incident_id), accepted)


def record_extension_request(req: ev.ExtensionRequested, uow: UnitOfWork, policy: Policy, town: Town = GAOHANG) -> None:
    domain.record_extension_request(DispatchStore(uow).order(req.work_order_id, req.incident_id), req)


def request_verification(handled: ev.WorkOrderHandled, uow: UnitOfWork, policy: Policy, town: Town = GAOHANG) -> None:
    """处置 done: once every live work order of the case is handled, the grid worker verifies (核查)."""
    store = DispatchStore(uow)
    case, orders = store.case_with_orders(handled.incident_id)
    order = store.order(handled.work_order_id, handled.incident_id)
    with _as_service_errors():
        decision = domain.handle_work_order(case, orders, order, handled, town, store.moment())
    _save(store, decision, uow)


def close_incident(passed: ev.VerificationPassed, uow: UnitOfWork, policy: Policy, town: Town = GAOHANG) -> None:
    """核查 passed → 结案."""
    store = DispatchStore(uow)
    case, orders = store.case_with_orders(passed.incident_id)
    with _as_service_errors():
        decision = domain.close_incident(case, orders, passed, store.moment())
    _save(store, decision, uow)


def rework_incident(failed: ev.VerificationFailed, uow: UnitOfWork, policy: Policy, town: Town = GAOHANG) -> None:
    """核查 failed → 返工."""
    store = DispatchStore(uow)
    case, orders = store.case_with_orders(failed.incident_id)
    with _as_service_errors():
        decision = domain.rework_incident(case, orders, failed, town, store.moment())
    _save(store, decision, uow)


def bind(policy: Policy, town: Town = GAOHANG) -> Mapping[type[Event], Callable[[Any, UnitOfWork], None]]:
    """The event handlers for the bus, given the policy and the town they decide by."""
    rules: dict[type[Event], Callable[..., None]] = {
        ev.IncidentReported: file_incident,
        ev.WorkOrderReturned: reroute_work_order,
        ev.WorkOrderAccepted: record_acceptance,
        ev.ExtensionRequested: record_extension_request,
        ev.WorkOrderHandled: request_verification,
        ev.VerificationPassed: close_incident,
        ev.VerificationFailed: rework_incident,
    }
    return {etype: functools.partial(fn, policy=policy, town=town) for etype, fn in rules.items()}


# -- commands -------------------------------------------------------------------------------------------------


def decide_extension(
    work_order_id: str, grant: bool, new_deadline: datetime | None, reason: str, actor: Actor, uow: UnitOfWork
) -> Event:
    """延期: the operations center grants or refuses a department's request."""
    store = DispatchStore(uow)
    order = store.find_order(work_order_id)
    if order is None:
        raise NotFound(f"no work order {work_order_id}")
    case = store.case(order.incident_id)
    with _as_service_errors():
        event = domain.decide_extension(case, order, grant, new_deadline, reason, actor, store.moment())
    uow.emit(event)
    return event


def watch_deadlines(policy: Policy, uow: UnitOfWork) -> int:
    """催办 / 督办 every late work order (each step once, over every instance); returns the events emitted."""
    store = DispatchStore(uow)
    moment = store.moment()
    emitted = 0
    for order, case in store.late_orders(moment.now):
        for step in domain.overdue_steps(order, case, policy, moment):
            if store.take_step(order, step.mark, moment.now):
                uow.emit(step.event)
                emitted += 1
    return emitted


# -- reads ------------------------------------------------------------------------------------------------------


def _order_public(order: WorkOrder, now: datetime) -> WorkOrderPublic:
    return WorkOrderPublic.model_validate(
        {
            **vars(order),
            "overdue": domain.overdue(order, now),
            "reminded": order.reminded_at is not None,
            "escalated": order.escalated_at is not None,
        }
    )


def get_case(incident_id: str, uow: UnitOfWork) -> CasePublic:
    store = DispatchStore(uow)
    case = store.find_case(incident_id)
    if case is None:
        raise NotFound(f"no case for incident {incident_id}")
    now = uow.now()
    orders = [_order_public(o, now) for o in store.orders_of(incident_id)]
    return CasePublic.model_validate({**vars(case), "work_orders": orders})


def pending_extensions(uow: UnitOfWork) -> list[WorkOrderPublic]:
    now = uow.now()
    return [_order_public(o, now) for o in DispatchStore(uow).pending_extensions()]
