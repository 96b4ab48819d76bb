"""intake's HTTP edge: thin routes that validate, send a command or a query through the bus and answer."""

from __future__ import annotations

from functools import partial
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
        accepted = await runtime.command(partial(handlers.report_incident, by=who.actor()), body)
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
        return await runtime.read(handlers.get_incident, incident_id, who)

    @api.get("/incidents", tags=["incidents"])
    async def incidents(
        who: Principal = Reader,
        status: Annotated[str | None, Query(max_length=20, pattern=r"^[a-z_]+$")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    ) -> list[dict[str, object]]:
        """Recent incidents the caller may see, newest first, optionally by status."""
        return [r.model_dump() for r in await runtime.read(handlers.list_incidents, status, limit, offset, who)]

    api.include_router(open311.build_router(runtime), prefix=open311.PREFIX)
    return api
