"""intake's HTTP edge: thin routes that validate, call a handler and answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Query, Response

from services.common.api import create_api
from services.common.auth import Principal, Role
from services.common.runtime import Runtime

from . import handlers, open311
from .models import IncidentPublic, ReportAccepted, ReportCreate


def build_api(runtime: Runtime) -> FastAPI:
    Reporter = runtime.allow(Role.GRID_WORKER, Role.SENSOR, Role.OPS_CENTER, Role.ADMIN)
    Reader = runtime.allow(*Role)
    api = create_api(
        "intake",
        title="gridloop intake",
        description="Grid workers (网格员), the 12345 hotline and sensors report incidents; anyone follows them.",
    )

    @api.post(
        "/reports",
        status_code=202,
        response_model=ReportAccepted,
        tags=["reports"],
        responses={
            409: {"description": "client_report_id reused for a different report, or by another caller"},
            422: {"description": "invalid report"},
        },
    )
    async def report(body: ReportCreate, response: Response, who: Principal = Reporter) -> ReportAccepted:
        """Report an incident. A retry with the same client_report_id returns the same incident; only whoever sent
        the report may retry it (anyone else is refused, 409).

        Grid workers report as themselves (source grid_worker), sensors as themselves (source sensor); the
        operations center's hotline desk reports for a 12345 caller (source hotline_12345), recorded as the desk
        on the caller's behalf."""
        handlers.check_reporter(body, who)
        with runtime.uow() as uow:
            accepted = handlers.report_incident(body, uow, who.actor())
        if not accepted.duplicate:
            await runtime.flush_outbox()
        response.headers["Location"] = f"/incidents/{accepted.incident_id}"
        return accepted

    @api.get(
        "/incidents/{incident_id}",
        response_model=IncidentPublic,
        tags=["incidents"],
        responses={404: {"description": "no such incident"}},
    )
    async def incident(incident_id: str, who: Principal = Reader) -> IncidentPublic:
        """Current status, department(s), deadline and the timeline of every transition."""
        with runtime.uow() as uow:
            return handlers.get_incident(incident_id, uow, who)

    @api.get("/incidents", tags=["incidents"])
    async def incidents(
        who: Principal = Reader,
        status: Annotated[str | None, Query(max_length=20, pattern=r"^[a-z_]+$")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    ) -> list[dict[str, object]]:
        """Recent incidents the caller may see, newest first, optionally by status."""
        with runtime.uow() as uow:
            rows = handlers.list_incidents(uow, status, limit, offset, who)
            return [
                {
                    "incident_id": r.incident_id,
                    "status": r.status,
                    "category_code": r.category_code,
                    "grid_id": r.grid_id,
                    "reported_at": r.reported_at,
                }
                for r in rows
            ]

    api.include_router(open311.build_router(runtime), prefix=open311.PREFIX)
    return api
