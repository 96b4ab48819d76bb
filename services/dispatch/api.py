"""dispatch's HTTP edge for the operations center (城运中心): cases, work orders, extension decisions."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from schemas import Actor, ActorKind
from services.common.api import create_api
from services.common.auth import Principal, Role
from services.common.errors import Forbidden
from services.common.runtime import Runtime

from . import handlers
from .models import CasePublic, ExtensionDecision, WorkOrderPublic

_NO_SUCH_CASE: dict[int | str, dict[str, Any]] = {404: {"description": "no such case"}}


def build_api(runtime: Runtime) -> FastAPI:
    Center = runtime.allow(Role.OPS_CENTER, Role.ADMIN)
    Decider = runtime.allow(Role.OPS_CENTER)
    api = create_api(
        "dispatch",
        title="gridloop dispatch",
        description="立案 and 派遣: cases, their work orders, and the operations center's extension decisions.",
    )

    @api.get("/cases/{incident_id}", response_model=CasePublic, tags=["cases"], responses=_NO_SUCH_CASE)
    async def case(incident_id: str, who: Principal = Center) -> CasePublic:
        return await runtime.read(handlers.get_case, incident_id)

    @api.get("/extensions", response_model=list[WorkOrderPublic], tags=["extensions"])
    async def extensions(who: Principal = Center) -> list[WorkOrderPublic]:
        """Work orders whose department asked for more time (延期), waiting for a decision."""
        return await runtime.read(handlers.pending_extensions)

    @api.post(
        "/work-orders/{work_order_id}/extension",
        tags=["extensions"],
        responses={
            404: {"description": "no such work order"},
            409: {"description": "no pending request, or nothing to extend"},
        },
    )
    async def decide(work_order_id: str, body: ExtensionDecision, who: Principal = Decider) -> dict[str, str]:
        """The operations center grants or refuses an extension (only it may)."""
        if body.actor_id not in (None, who.subject):
            raise Forbidden(f"you are {who.subject}; the body names {body.actor_id}")
        actor = Actor(kind=ActorKind.OPS_CENTER, id=who.subject, department=runtime.town.ops_center)
        event = await runtime.command(
            handlers.decide_extension, work_order_id, body.grant, body.new_deadline, body.reason, actor
        )
        return {"work_order_id": work_order_id, "decision": event.type}

    return api
