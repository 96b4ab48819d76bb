"""opscenter's HTTP edge: KPIs (JSON and CSV), backlog, overdue work, trend, GeoJSON for the map, the dashboard."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from services.common.api import create_api
from services.common.auth import Principal, Role
from services.common.runtime import Runtime

from . import handlers, views
from ._map import Box, MapQuery
from .kpis import Dimension, KpiReport, Period, to_csv_rows
from .swap import MAX_HOLD_S, OpsCenterRuntime, UnusableDatabase, swap_in

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True, slots=True)
class KpiQuery:
    period: Period
    at: date | None
    by: Dimension


def kpi_query(
    period: Period = Period.DAY,
    at: Annotated[date | None, Query(ge=date(1970, 1, 1), le=date(2999, 12, 31))] = None,
    by: Dimension = Dimension.DEPARTMENT,
) -> KpiQuery:
    """Which KPIs: the period (day, week, month) containing the town's day ``at`` (default today), cut by a
    dimension."""
    return KpiQuery(period, at, by)


class GeoJSONResponse(JSONResponse):
    media_type = "application/geo+json"


_PAGE_HEADERS = {
    "X-Next-Cursor": {"description": "the cursor of the next page (absent on the last)", "schema": {"type": "string"}},
    "Link": {"description": 'the next page\'s address, rel="next" (absent on the last)', "schema": {"type": "string"}},
    "X-Total-Count": {"description": "how many work orders are overdue in all", "schema": {"type": "integer"}},
}


class PauseFold(BaseModel):
    hold_s: float = Field(default=60.0, gt=0, le=MAX_HOLD_S)
    """How long the fold may stay held: it resumes on its own after that."""


class HeldFold(BaseModel):
    hold_id: str
    hold_s: float
    positions: dict[str, dict[int, int]]
    """Topic → partition → the offset after the last record folded: where a rebuild must get before the swap."""


class ResumeFold(BaseModel):
    hold_id: str = Field(min_length=1, max_length=64)


_HELD: dict[int | str, dict[str, str]] = {
    409: {"description": "the fold is held for another swap, not held under this id, or the rebuilt model is behind"}
}
"""What the fold's hold and the swap answer besides success (422, for an unusable model, is every route's)."""


class SwapReadModel(BaseModel):
    hold_id: str = Field(min_length=1, max_length=64)
    database_url: str = Field(min_length=1, max_length=2000)
    """The rebuilt read model's database (SQLAlchemy URL; a SQLite file's path absolute)."""


class ReadModelState(BaseModel):
    database: str
    """The database the service folds into and reads (its password hidden)."""
    held: bool
    positions: dict[str, dict[int, int]]


def build_api(runtime: Runtime) -> FastAPI:
    Center = runtime.allow(Role.OPS_CENTER, Role.ADMIN)
    api = create_api(
        "opscenter",
        title="gridloop operations center",
        description="城运中心: closure KPIs by department, category and grid; overdue work; the live map.",
    )

    async def report(q: KpiQuery) -> KpiReport:
        return await runtime.read(handlers.report_kpis, q.period, q.at, q.by, runtime.town)

    @api.get("/api/kpis", response_model=KpiReport, tags=["kpis"])
    async def kpis(who: Principal = Center, q: KpiQuery = Depends(kpi_query)) -> KpiReport:
        """KPIs for the period containing the town's day ``at`` (default today) and the previous one (环比)."""
        return await report(q)

    @api.get(
        "/api/kpis.csv",
        tags=["kpis"],
        response_class=Response,
        responses={200: {"content": {"text/csv": {}}, "description": "the same KPIs as CSV"}},
    )
    async def kpis_csv(who: Principal = Center, q: KpiQuery = Depends(kpi_query)) -> Response:
        buf = io.StringIO()
        csv.writer(buf).writerows(to_csv_rows(await report(q)))
        name = f"gridloop-kpis-{q.by.value}-{q.period.value}-{(q.at or date.today()).isoformat()}.csv"
        return Response(
            "\ufeff" + buf.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @api.get("/api/backlog", response_model=list[views.Backlog], tags=["work"])
    async def backlog(who: Principal = Center) -> list[views.Backlog]:
        """Open and overdue work orders per department, now."""
        return await runtime.read(handlers.show_backlog, runtime.town)

    @api.get(
        "/api/overdue",
        response_model=list[views.OverdueOrder],
        tags=["work"],
        responses={200: {"headers": _PAGE_HEADERS}},
    )
    async def overdue(
        request: Request,
        response: Response,
        who: Principal = Center,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
        cursor: Annotated[str | None, Query(max_length=200, description="X-Next-Cursor of the page before")] = None,
    ) -> list[views.OverdueOrder]:
        """超期未处置: work orders past their deadline, most overdue first, a page of ``limit`` at a time.

        The next page is asked for with ``cursor`` set to the ``X-Next-Cursor`` header of this one (also given as
        a ``Link`` with ``rel="next"``); the last page has none. ``X-Total-Count`` says how many are overdue."""
        try:
            after = views.OverdueAfter.parse(cursor) if cursor is not None else None
        except ValueError as exc:
            raise HTTPException(422, f"invalid request: cursor: {exc}") from None
        page = await runtime.read(handlers.page_overdue, limit, after, runtime.town)
        response.headers["X-Total-Count"] = str(page.total)
        if page.next is not None:
            token = page.next.token()
            response.headers["X-Next-Cursor"] = token
            url = request.url.remove_query_params("cursor").include_query_params(cursor=token)
            response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
        return page.items

    @api.get("/api/trend", response_model=list[views.TrendPoint], tags=["kpis"])
    async def trend(who: Principal = Center, days: Annotated[int, Query(ge=1, le=366)] = 14) -> list[views.TrendPoint]:
        """Incidents reported and closed per day of the town."""
        return await runtime.read(handlers.show_trend, days, runtime.town)

    @api.get("/api/map/incidents", tags=["map"], response_class=GeoJSONResponse)
    async def map_incidents(
        who: Principal = Center,
        zoom: Annotated[int | None, Query(ge=0, le=22, description="the map's zoom (Web Mercator)")] = None,
        bbox: Annotated[str | None, Query(max_length=200, description="west,south,east,north in degrees")] = None,
    ) -> GeoJSONResponse:
        """GeoJSON of the open incidents in ``bbox`` (default: everywhere) (风险一张图): each a point where at most
        400 are in view and ``zoom`` is 12 or more (or not given); else clusters of a grid whose cells follow the
        zoom, each with ``count``, ``overdue``, ``escalated``, ``big`` and its cell's ``bbox``. ``mode`` says which,
        ``total`` how many open incidents they hold."""
        try:
            box = Box.parse(bbox) if bbox is not None else None
        except ValueError as exc:
            raise HTTPException(422, f"invalid request: bbox: {exc}") from None
        return GeoJSONResponse(await runtime.read(handlers.show_map, MapQuery(zoom, box), runtime.town))

    @api.get("/api/map/grids", tags=["map"], response_class=GeoJSONResponse)
    async def map_grids(who: Principal = Center) -> GeoJSONResponse:
        """GeoJSON polygons of the grid cells with their open incidents."""
        return GeoJSONResponse(await runtime.read(handlers.map_grids, runtime.town))

    # -- swapping a rebuilt read model in (python -m services.opscenter rebuild --swap) ---------------------

    Admin = runtime.allow(Role.ADMIN)

    def gated() -> OpsCenterRuntime:
        if not isinstance(runtime, OpsCenterRuntime):
            raise HTTPException(404, "this service swaps no read model")
        return runtime

    @api.get("/admin/read-model", response_model=ReadModelState, tags=["admin"])
    async def read_model(who: Principal = Admin) -> ReadModelState:
        """The database the read model is in, whether the fold is held, and how far it got."""
        ops = gated()
        shown = ops.engine.url.render_as_string(hide_password=True)
        return ReadModelState(database=shown, held=ops.gate.held(), positions=ops.gate.folded)

    @api.post("/admin/fold/pause", response_model=HeldFold, tags=["admin"], responses=_HELD)
    async def pause_fold(body: PauseFold, who: Principal = Admin) -> HeldFold:
        """Hold the live fold for a swap (the batch being applied is committed first); 409 if it is held."""
        ops = gated()
        hold = await ops.gate.pause(body.hold_s)
        return HeldFold(hold_id=hold.hold_id, hold_s=body.hold_s, positions=ops.gate.folded)

    @api.post("/admin/fold/resume", tags=["admin"], responses=_HELD)
    async def resume_fold(body: ResumeFold, who: Principal = Admin) -> dict[str, bool]:
        """Let the held fold go on, on the model it had (the swap is given up); 409 for no such hold."""
        gated().gate.resume(body.hold_id)
        return {"resumed": True}

    @api.post("/admin/read-model/swap", response_model=ReadModelState, tags=["admin"], responses=_HELD)
    async def swap_read_model(body: SwapReadModel, who: Principal = Admin) -> ReadModelState:
        """Fold into, and read, the rebuilt model from now on (see ``services/opscenter/swap.py``): 409 without
        the hold, or if the rebuilt model is behind the live fold; 422 if it cannot be opened or was not rebuilt."""
        ops = gated()
        try:
            swapped = await swap_in(ops, body.hold_id, body.database_url)
        except UnusableDatabase as exc:
            raise HTTPException(422, str(exc)) from None
        return ReadModelState(database=swapped.database, held=False, positions={"rebuilt": swapped.positions})

    @api.get("/", include_in_schema=False, response_model=None)
    async def dashboard() -> Any:
        index = STATIC / "index.html"
        if not index.exists():
            return JSONResponse({"error": "dashboard assets are not built"}, status_code=404)
        return FileResponse(index, media_type="text/html; charset=utf-8")

    if STATIC.exists():
        api.mount("/static", StaticFiles(directory=STATIC), name="static")
    return api
