"""handling's HTTP edge for department staff: their queue of work orders and the actions on them."""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Query

from services.common.api import create_api
from services.common.runtime import Runtime

from . import handlers
from .models import (
    AcceptWorkOrder,
    DeliveryStatus,
    HandleWorkOrder,
    OrderStatus,
    RequestExtension,
    ReturnWorkOrder,
    WebhookDeliveryPublic,
    WorkOrderAction,
    WorkOrderPublic,
)

_CODE = r"^[a-z0-9_]+$"
_ORDER_STATUS = rf"^({'|'.join(OrderStatus.ALL)})$"
_DELIVERY_STATUS = rf"^({'|'.join(DeliveryStatus.ALL)})$"
_ACTION_ERRORS: dict[int | str, dict[str, str]] = {
    403: {"description": "the work order belongs to another department"},
    404: {"description": "no such work order"},
    409: {"description": "not allowed in the work order's current state"},
    422: {"description": "invalid request"},
}


def build_api(runtime: Runtime) -> FastAPI:
    api = create_api(
        "handling",
        title="gridloop handling",
        description="Departments' work orders: 签收 accept, 退回 return, 延期 ask for more time, 处置 handle.",
    )

    @api.get("/work-orders", response_model=list[WorkOrderPublic], tags=["work orders"])
    async def work_orders(
        department: Annotated[str | None, Query(max_length=40, pattern=_CODE)] = None,
        status: Annotated[str | None, Query(pattern=_ORDER_STATUS)] = None,
        overdue: bool | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[WorkOrderPublic]:
        """A department's queue, earliest deadline first."""
        with runtime.uow() as uow:
            return handlers.list_work_orders(uow, department, status, overdue, limit, offset)

    @api.get(
        "/work-orders/{work_order_id}",
        response_model=WorkOrderPublic,
        tags=["work orders"],
        responses={404: {"description": "no such work order"}},
    )
    async def work_order(work_order_id: str) -> WorkOrderPublic:
        with runtime.uow() as uow:
            return handlers.get_work_order(work_order_id, uow)

    @api.post(
        "/work-orders/{work_order_id}/accept",
        status_code=202,
        response_model=WorkOrderAction,
        tags=["work orders"],
        responses=_ACTION_ERRORS,
    )
    async def accept(work_order_id: str, body: AcceptWorkOrder) -> WorkOrderAction:
        """签收: take a dispatched work order."""
        with runtime.uow() as uow:
            done = handlers.accept_work_order(work_order_id, body, uow)
        await runtime.flush_outbox()
        return done

    @api.post(
        "/work-orders/{work_order_id}/return",
        status_code=202,
        response_model=WorkOrderAction,
        tags=["work orders"],
        responses=_ACTION_ERRORS,
    )
    async def return_(work_order_id: str, body: ReturnWorkOrder) -> WorkOrderAction:
        """退回: not this department's work; the center routes it to another."""
        with runtime.uow() as uow:
            done = handlers.return_work_order(work_order_id, body, uow)
        await runtime.flush_outbox()
        return done

    @api.post(
        "/work-orders/{work_order_id}/extension",
        status_code=202,
        response_model=WorkOrderAction,
        tags=["work orders"],
        responses=_ACTION_ERRORS,
    )
    async def extension(work_order_id: str, body: RequestExtension) -> WorkOrderAction:
        """延期: ask the operations center for a later deadline; the decision comes back on the work order."""
        with runtime.uow() as uow:
            done = handlers.request_extension(work_order_id, body, uow)
        await runtime.flush_outbox()
        return done

    @api.post(
        "/work-orders/{work_order_id}/handle",
        status_code=202,
        response_model=WorkOrderAction,
        tags=["work orders"],
        responses=_ACTION_ERRORS,
    )
    async def handle(work_order_id: str, body: HandleWorkOrder) -> WorkOrderAction:
        """处置: report the work done, with evidence; the grid worker verifies it."""
        with runtime.uow() as uow:
            done = handlers.handle_work_order(work_order_id, body, uow)
        await runtime.flush_outbox()
        return done

    @api.get("/webhook-deliveries", response_model=list[WebhookDeliveryPublic], tags=["ops"])
    async def webhook_deliveries(
        status: Annotated[str | None, Query(pattern=_DELIVERY_STATUS)] = None,
        department: Annotated[str | None, Query(max_length=40, pattern=_CODE)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[WebhookDeliveryPublic]:
        """Pushes to departments' own systems, newest first: pending, delivered, or failed (given up)."""
        with runtime.uow() as uow:
            return handlers.list_webhook_deliveries(uow, status, department, limit, offset)

    return api
