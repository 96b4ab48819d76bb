"""handling's HTTP edge for department staff: their queue of work orders and the actions on them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import FastAPI, Query

from schemas import DeliveryStatus, WorkOrderStatus
from services.common import visibility
from services.common.api import WaitS, create_api
from services.common.auth import Principal, Role
from services.common.batch import BatchOutcome
from services.common.changes import key_for, long_poll
from services.common.errors import Forbidden
from services.common.runtime import Runtime

from . import handlers
from .models import (
    AcceptWorkOrder,
    AcceptWorkOrders,
    DepartmentCommand,
    HandleWorkOrder,
    HandleWorkOrders,
    RequestExtension,
    ReturnWorkOrder,
    WebhookDeliveryPublic,
    WorkOrderAction,
    WorkOrderPublic,
)

C = TypeVar("C", bound=DepartmentCommand)
R = TypeVar("R")

Code = Annotated[str | None, Query(max_length=40, pattern=r"^[a-z0-9_]+$")]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000)]
_ORDER_STATUS = rf"^({'|'.join(WorkOrderStatus)})$"
_DELIVERY_STATUS = rf"^({'|'.join(DeliveryStatus)})$"
_UNSEEN: dict[int | str, dict[str, str]] = {
    404: {"description": "no such work order, or another department's (answered alike)"}
}
_ACTION_ERRORS: dict[int | str, dict[str, str]] = {
    403: {"description": "the body names another person or office than the token's"},
    **_UNSEEN,
    409: {"description": "not allowed in the work order's current state"},
    422: {"description": "invalid request"},
}


def _as_caller(body: C, who: Principal) -> C:
    """The command as the calling department staff member gives it (the token decides who and which office)."""
    if body.department_code not in (None, who.department) or body.actor_id not in (None, who.subject):
        raise Forbidden(f"you act as {who.subject} of {who.department}; the body names someone else")
    return body.model_copy(update={"actor_id": who.subject, "department_code": who.department})


def build_api(runtime: Runtime) -> FastAPI:
    Staff = runtime.allow(Role.DEPARTMENT)
    Reader = runtime.allow(Role.DEPARTMENT, Role.OPS_CENTER, Role.ADMIN)
    Center = runtime.allow(Role.OPS_CENTER, Role.ADMIN)
    api = create_api(
        "handling",
        title="gridloop handling",
        description="Departments' work orders: 签收 accept, 退回 return, 延期 ask for more time, 处置 handle.",
    )
    many = functools.partial(api.post, status_code=202, response_model=BatchOutcome, tags=["work orders"])
    one = functools.partial(
        api.post, status_code=202, response_model=WorkOrderAction, tags=["work orders"], responses=_ACTION_ERRORS
    )

    async def act(handler: Callable[..., R], body: C, who: Principal, *args: str) -> R:
        """A department's action: as the caller, through the bus (committed, its events published)."""
        return await runtime.command(handler, *args, _as_caller(body, who))

    @api.get("/work-orders", response_model=list[WorkOrderPublic], tags=["work orders"])
    async def work_orders(
        who: Principal = Reader,
        department: Code = None,
        status: Annotated[str | None, Query(pattern=_ORDER_STATUS)] = None,
        overdue: bool | None = None,
        limit: Limit = 100,
        offset: Offset = 0,
        wait: WaitS = 0.0,
    ) -> list[WorkOrderPublic]:
        """A department's queue, earliest deadline first. Department staff see only their own office's.

        With ``wait``, an empty answer waits up to that many seconds for a work order to arrive (a long poll: the
        desk gets new work the moment it lands, without polling for it)."""
        if who.role is Role.DEPARTMENT:
            if department not in (None, who.department):
                raise Forbidden(f"{who.subject} works for {who.department}, not {department}")
            department = who.department
        read = functools.partial(runtime.query, handlers.list_work_orders, department, status, overdue, limit, offset)
        return await long_poll(runtime.changes, key_for(handlers.WORK_ORDERS, department), wait, read)

    @api.get("/work-orders/{work_order_id}", response_model=WorkOrderPublic, tags=["work orders"], responses=_UNSEEN)
    async def work_order(work_order_id: str, who: Principal = Reader) -> WorkOrderPublic:
        order = await runtime.read(handlers.get_work_order, work_order_id)
        if not visibility.sees_work_order(who, order.department_code):
            raise visibility.unseen("work order", work_order_id)
        return order

    @many("/work-orders/accept")
    async def accept_many(body: AcceptWorkOrders, who: Principal = Staff) -> BatchOutcome:
        """批量签收: take several dispatched work orders in one request.

        Each is accepted or refused (404, 409, with the reason) as the one-order action would — another office's
        as an unknown one; the refused ones change nothing and the others are taken together."""
        return await act(handlers.accept_work_orders, body, who)

    @many("/work-orders/handle")
    async def handle_many(body: HandleWorkOrders, who: Principal = Staff) -> BatchOutcome:
        """批量处置: report several work orders done, each with its own result and evidence.

        Each is handled or refused (404, 409, with the reason) as the one-order action would."""
        return await act(handlers.handle_work_orders, body, who)

    @one("/work-orders/{work_order_id}/accept")
    async def accept(
        work_order_id: str, who: Principal = Staff, body: AcceptWorkOrder | None = None
    ) -> WorkOrderAction:
        """签收: take a dispatched work order."""
        return await act(handlers.accept_work_order, body or AcceptWorkOrder(), who, work_order_id)

    @one("/work-orders/{work_order_id}/return")
    async def return_(work_order_id: str, body: ReturnWorkOrder, who: Principal = Staff) -> WorkOrderAction:
        """退回: not this department's work; the center routes it to another."""
        return await act(handlers.return_work_order, body, who, work_order_id)

    @one("/work-orders/{work_order_id}/extension")
    async def extension(work_order_id: str, body: RequestExtension, who: Principal = Staff) -> WorkOrderAction:
        """延期: ask the operations center for a later deadline; the decision comes back on the work order."""
        return await act(handlers.request_extension, body, who, work_order_id)

    @one("/work-orders/{work_order_id}/handle")
    async def handle(work_order_id: str, body: HandleWorkOrder, who: Principal = Staff) -> WorkOrderAction:
        """处置: report the work done, with evidence; the grid worker verifies it."""
        return await act(handlers.handle_work_order, body, who, work_order_id)

    @api.get("/webhook-deliveries", response_model=list[WebhookDeliveryPublic], tags=["ops"])
    async def webhook_deliveries(
        who: Principal = Center,
        status: Annotated[str | None, Query(pattern=_DELIVERY_STATUS)] = None,
        department: Code = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> list[WebhookDeliveryPublic]:
        """Pushes to departments' own systems, newest first: pending, delivered, or failed (given up)."""
        return await runtime.read(handlers.list_webhook_deliveries, status, department, limit, offset)

    return api
