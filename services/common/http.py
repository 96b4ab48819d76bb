"""What every service's HTTP API shares: the app (its door, security headers, health, Prometheus metrics), errors
answered as JSON reasons, and the dependency that checks the caller's token."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import make_asgi_app
from pydantic import BaseModel, create_model
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

from . import metrics
from .auth import Role, TokenStore, Unauthenticated, require
from .changes import MAX_WAIT_S
from .edge import Door, SecurityHeaders
from .errors import Forbidden, NotFound, Rejected, Unavailable
from .settings import ServiceSettings, rate_limits

RETRY_AFTER_S = "5"
"""Seconds a client is asked to wait before retrying a 503."""

WaitS = Annotated[
    float,
    Query(
        ge=0,
        le=MAX_WAIT_S,
        description="Long poll: if nothing matches now, wait up to this many seconds for something that does.",
    ),
]
"""A list endpoint's ``wait`` parameter (see ``services.common.changes.long_poll``)."""


def _reason(status: int, reason: str, headers: Mapping[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": reason, **extra}, headers=headers)


class Problem(BaseModel):
    field: str
    problem: str


class ErrorReply(BaseModel):
    """Every refusal or failure: the reason in one line; an invalid request (422) also lists each problem."""

    error: str
    details: list[Problem] | None = None


_ERRORS: dict[str, str] = {
    "400": "malformed request body",
    "401": "no valid token: none, unknown or revoked",
    "403": "the caller may not do this",
    "404": "not found, or not visible to the caller",
    "409": "not allowed in the current state",
    "413": "the request body is over the limit (GRIDLOOP_BODY_LIMIT_BYTES): refused before it was read",
    "422": "invalid request: each problem with its field",
    "429": "too many requests with this token or from this address: come back after Retry-After seconds",
    "503": "database unavailable: nothing was recorded; retry later",
}
_HEADERS: dict[str, dict[str, Any]] = {
    "401": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    "429": {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}},
    "503": {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}},
}
_FASTAPI_422 = "#/components/schemas/HTTPValidationError"


def document_errors(spec: dict[str, Any]) -> dict[str, Any]:
    """Declare, once for every route, the errors create_api's handlers answer, as they answer them.

    A route behind a token may answer 401, 403, 422, 429 and 503 (and 400 and 413 for a body that cannot be parsed
    or is too large) besides what it declares itself (404, 409); each is ``ErrorReply``. FastAPI's own 422 schema,
    which these APIs never send, is replaced everywhere. Routes that answer in another format (Open311's) declare
    their own and are left as they are."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    reply = ErrorReply.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(reply.pop("$defs", {}))
    schemas["ErrorReply"] = reply
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorReply"}}}
    for item in spec.get("paths", {}).values():
        for op in item.values():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses: dict[str, Any] = op["responses"]
            params = op.get("parameters", [])
            if any(p.get("in") == "header" and p.get("name", "").lower() == "authorization" for p in params):
                for status in ("401", "403", "422", "429", "503", *(("400", "413") if "requestBody" in op else ())):
                    responses.setdefault(status, {"description": _ERRORS[status]})
                for status, answer in responses.items():
                    if status in _ERRORS:
                        answer["content"] = content
                        if status in _HEADERS:
                            answer["headers"] = _HEADERS[status]
            elif (responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})).get(
                "$ref"
            ) == _FASTAPI_422:
                responses["422"] = {"description": _ERRORS["422"], "content": content}
    if _FASTAPI_422 not in str(spec.get("paths")):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
    return spec


def allow(auth: TokenStore, *roles: Role) -> Any:
    """A FastAPI dependency: the calling principal, if ``auth`` knows its token and it holds one of ``roles``
    (else 401/403)."""
    return Depends(require(auth, *roles))


def settings_for(service: str) -> ServiceSettings:
    """``service``'s settings as the environment gives them (``GRIDLOOP_<SERVICE>_<NAME>`` included)."""
    kind = create_model(f"{service.title()}ApiSettings", __base__=ServiceSettings)
    kind.SERVICE = service
    return kind()


class _Api(FastAPI):
    """FastAPI with the security headers outermost: around its error handling, so a 500 carries them too."""

    def build_middleware_stack(self) -> ASGIApp:
        docs = (self.docs_url, self.redoc_url, self.swagger_ui_oauth2_redirect_url if self.docs_url else None)
        return SecurityHeaders(super().build_middleware_stack(), docs=[p for p in docs if p])


def create_api(
    service: str,
    *,
    title: str,
    description: str = "",
    version: str = "1.0.0",
    settings: ServiceSettings | None = None,
) -> FastAPI:
    """A service's API with what every one shares: the door (rate limits per token and per address; a body over
    the limit refused before it is read; both before any token is looked at), security headers on every answer,
    health, metrics, errors answered as JSON reasons, and the docs pages unless switched off. Its settings are
    ``settings``, or the environment's for ``service``."""
    s = settings if settings is not None else settings_for(service)
    docs = s.docs_enabled
    api = _Api(
        title=title,
        description=description,
        version=version,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = document_errors(FastAPI.openapi(api))
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]

    @api.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        """FastAPI's and Starlette's own refusals (a body that cannot be parsed, no such path) in the same shape."""
        return _reason(exc.status_code, str(exc.detail), headers=exc.headers)

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
        return _reason(503, str(exc), headers={"Retry-After": RETRY_AFTER_S})

    async def _db_down(_request: Request, exc: Exception) -> JSONResponse:
        reason = "database unavailable: the request was not recorded; retry later"
        return _reason(503, reason, headers={"Retry-After": RETRY_AFTER_S})

    api.add_exception_handler(OperationalError, _db_down)  # cannot connect, locked, read-only, disk full
    api.add_exception_handler(InterfaceError, _db_down)  # the connection was lost

    @api.get("/health", tags=["ops"], summary="Liveness of the service")
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": service}

    api.mount("/metrics", make_asgi_app())
    api.add_middleware(
        Door,
        body_limit=s.body_limit_bytes,
        per_token=rate_limits(s.rate_limit_per_token),
        per_address=rate_limits(s.rate_limit_per_address),
    )
    metrics.instrument(api, service)  # added last, so outermost: the door's refusals are counted too
    return api
