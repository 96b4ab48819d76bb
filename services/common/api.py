"""What every service's HTTP API shares: health, Prometheus metrics, and errors answered as JSON reasons."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import make_asgi_app
from sqlalchemy.exc import OperationalError

from . import metrics
from .auth import Unauthenticated
from .errors import Forbidden, NotFound, Rejected, Unavailable


def _reason(status: int, reason: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": reason, **extra})


def create_api(service: str, *, title: str, description: str = "", version: str = "1.0.0") -> FastAPI:
    api = FastAPI(title=title, description=description, version=version)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"field": ".".join(str(p) for p in err["loc"] if p != "body"), "problem": err["msg"]}
            for err in exc.errors()
        ]
        summary = "; ".join(f"{d['field'] or '(body)'}: {d['problem']}" for d in details)
        return _reason(422, f"invalid request: {summary}", details=details)

    @api.exception_handler(NotFound)
    async def _not_found(_request: Request, exc: NotFound) -> JSONResponse:
        return _reason(404, str(exc) or "not found")

    @api.exception_handler(Unauthenticated)
    async def _unauthenticated(_request: Request, exc: Unauthenticated) -> JSONResponse:
        response = _reason(401, str(exc))
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @api.exception_handler(Forbidden)
    async def _forbidden(_request: Request, exc: Forbidden) -> JSONResponse:
        return _reason(403, str(exc) or "forbidden")

    @api.exception_handler(Rejected)
    async def _rejected(_request: Request, exc: Rejected) -> JSONResponse:
        return _reason(409, str(exc))

    @api.exception_handler(Unavailable)
    async def _unavailable(_request: Request, exc: Unavailable) -> JSONResponse:
        return _reason(503, str(exc))

    @api.exception_handler(OperationalError)
    async def _db_down(_request: Request, exc: OperationalError) -> JSONResponse:
        return _reason(503, "database unavailable: the request was not recorded; retry later")

    @api.get("/health", tags=["ops"], summary="Liveness of the service")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": service}

    api.mount("/metrics", make_asgi_app())
    metrics.instrument(api, service)
    return api
