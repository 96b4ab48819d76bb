"""The Open311 wire: the two formats (``.json``, ``.xml``), errors as the spec shapes them, W3C datetimes.

GeoReport v2 (http://wiki.open311.org/GeoReport_v2) names the format by the resource's extension. XML is the
spec's required format; JSON is its Spark-convention mapping (a list of items for the plural roots, an object for
``discovery`` and ``service_definition``). Both are UTF-8. Every error, whatever raised it (a rule of the
gateway, FastAPI's own parameter validation, an unreachable database), is answered as the spec's list of
``{code, description}`` with HTTP 400, 403 or 404 — never FastAPI's 422 or gridloop's ``{"error": ...}``.

Datetimes are written in Asia/Shanghai time (UTC+08:00, no daylight saving) to the second, e.g.
``2026-11-24T08:15:00+08:00``; they are read in any W3C form that carries a timezone (``Z`` or ``±hh:mm``), or as
a bare date, taken as that day's midnight in Shanghai, and from 2000 to 2100 as every gridloop timestamp
(``schemas.EARLIEST`` … ``schemas.LATEST``, UTC): another is refused with 400 and the reason.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import orjson
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from schemas import aware_utc
from services.common.auth import Unauthenticated
from services.common.db import as_utc
from services.common.edge import BodyTooLarge
from services.common.errors import Forbidden, NotFound, Rejected, Unavailable

from .store import DatabaseUnavailable

log = logging.getLogger("gridloop.open311")

Format = Literal["json", "xml"]
FORMATS: tuple[Format, ...] = ("json", "xml")
JSON_TYPE = "application/json; charset=utf-8"
XML_TYPE = "text/xml; charset=utf-8"
XML_DECLARATION = '<?xml version="1.0" encoding="utf-8"?>\n'

SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")
"""Every datetime gridloop writes to Open311 clients is in Shanghai time (China has no daylight saving)."""

MAX_SPAN = timedelta(days=90)
"""The longest start_date … end_date range a query may ask for, and the default range (the last 90 days)."""

# A list under one of these tags holds items of the paired tag (the Spark convention's plural ⇊ / item ↴).
_ITEM_TAG = {
    "services": "service",
    "service_requests": "request",
    "service_request_updates": "request_update",
    "attributes": "attribute",
    "values": "value",
    "endpoints": "endpoint",
    "formats": "format",
    "errors": "error",
}
NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
"""Characters XML 1.0 cannot carry at all, escaped or not."""
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_SPACED_OFFSET = re.compile(r"^(\d{4}-?\d{2}-?\d{2}T[\d:.,]+) (\d{2}:?\d{2})$")


class Open311Error(Exception):
    """An answer in the spec's error format: HTTP ``status``, and one ``(code, description)`` per problem."""

    def __init__(self, status: int, *descriptions: str, code: int | None = None) -> None:
        super().__init__("; ".join(descriptions))
        self.status = status
        self.errors = [(code or status, d) for d in descriptions]


def bad_request(*descriptions: str) -> Open311Error:
    return Open311Error(400, *descriptions)


# -- formats ---------------------------------------------------------------------------------------------------


def parse_format(fmt: str) -> Format:
    if fmt == "json":
        return "json"
    if fmt == "xml":
        return "xml"
    raise bad_request(f"unsupported format {fmt[:20]!r}: ask for .xml or .json")


def format_of(request: Request) -> Format:
    """The format an answer (an error too) to ``request`` is written in: the resource's extension, else XML."""
    fmt = request.path_params.get("fmt")
    if fmt is None:
        fmt = request.url.path.rsplit(".", 1)[-1] if "." in request.url.path.rsplit("/", 1)[-1] else ""
    return "json" if fmt == "json" else "xml"


def render(fmt: Format, root: str, data: list[Any] | Mapping[str, Any], status: int = 200) -> Response:
    """``data`` as JSON, or as XML under ``root`` (a list's items take the singular tag of ``root``)."""
    if fmt == "json":
        return Response(orjson.dumps(data), status_code=status, media_type=JSON_TYPE)
    element = ET.Element(root)
    _fill(element, data)
    text = XML_DECLARATION + ET.tostring(element, encoding="unicode") + "\n"
    return Response(text.encode("utf-8"), status_code=status, media_type=XML_TYPE)


def _fill(element: ET.Element, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, list):
        tag = _ITEM_TAG[element.tag]
        for item in value:
            _fill(ET.SubElement(element, tag), item)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _fill(ET.SubElement(element, key), item)
    elif isinstance(value, bool):
        element.text = "true" if value else "false"
    else:
        element.text = NOT_XML.sub("", str(value))


def error_response(fmt: Format, status: int, errors: list[tuple[int, str]]) -> Response:
    return render(fmt, "errors", [{"code": code, "description": text} for code, text in errors], status)


# -- datetimes -------------------------------------------------------------------------------------------------


def w3c(value: datetime | None) -> str | None:
    """``value`` as a W3C datetime in Shanghai time, to the second (None stays None); in its own offset when
    it is too late to be written in Shanghai time."""
    if value is None:
        return None
    moment = as_utc(value).replace(microsecond=0)
    try:
        return moment.astimezone(SHANGHAI).isoformat()
    except OverflowError:  # past the calendar's end in Shanghai: a deadline stored before the range was checked
        return moment.isoformat()


def parse_w3c(name: str, raw: str) -> datetime:
    """A W3C datetime argument, as UTC; a bare date is that day's midnight in Shanghai."""
    text = raw.strip()
    unescaped = _SPACED_OFFSET.match(text)  # a '+' left unescaped in a query string arrives as a space
    if unescaped:
        text = f"{unescaped[1]}+{unescaped[2]}"
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise bad_request(
            f"{name} must be a W3C datetime such as 2026-11-24T08:15:00+08:00, not {raw[:40]!r}"
        ) from None
    if _DATE_ONLY.match(text):
        value = value.replace(tzinfo=SHANGHAI)
    if value.tzinfo is None or value.utcoffset() is None:
        raise bad_request(f"{name} must carry a timezone (Z or ±hh:mm), e.g. 2026-11-24T08:15:00+08:00")
    try:
        return aware_utc(value)
    except ValueError as exc:
        raise bad_request(f"{name}: {exc}") from None


def window(start_raw: str | None, end_raw: str | None, now: datetime) -> tuple[datetime, datetime | None]:
    """The requested_datetime range of a query: at most 90 days; the last 90 days unless told otherwise."""
    start = parse_w3c("start_date", start_raw) if start_raw else None
    end = parse_w3c("end_date", end_raw) if end_raw else None
    if start is not None and end is not None:
        if end < start:
            raise bad_request("end_date is before start_date")
        if end - start > MAX_SPAN:
            raise bad_request("start_date … end_date may not span more than 90 days")
        return start, end
    if start is not None:
        return start, start + MAX_SPAN
    if end is not None:
        return end - MAX_SPAN, end
    return as_utc(now).astimezone(UTC) - MAX_SPAN, None


# -- errors from anywhere in a route, in the spec's shape --------------------------------------------------------


def _problems(exc: RequestValidationError | ValidationError) -> list[str]:
    found = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "path"))
        found.append(f"{where}: {err['msg']}" if where else str(err["msg"]))
    return found or ["invalid request"]


def as_error(exc: Exception) -> tuple[int, list[tuple[int, str]]] | None:
    """The spec's status and errors for ``exc``, or None when it is not an error this gateway answers."""
    match exc:
        case Open311Error(status=status, errors=errors):
            return status, errors
        case RequestValidationError() | ValidationError():
            return 400, [(400, p) for p in _problems(exc)]
        case Unauthenticated() | Forbidden():
            return 403, [(403, str(exc) or "forbidden")]
        case NotFound():
            return 404, [(404, str(exc) or "not found")]
        case Rejected():
            return 400, [(409, str(exc))]
        case Unavailable():
            return 400, [(503, str(exc) or "service unavailable; retry later")]
        case DatabaseUnavailable():
            return 400, [(503, "database unavailable: nothing was recorded; retry later")]
        case BodyTooLarge(detail=detail):  # a multipart form streamed past the API's body limit
            return 413, [(413, str(detail))]
        case HTTPException(status_code=status, detail=detail):
            status = status if status in (403, 404) else 400
            return status, [(status, str(detail))]
    return None


class Open311Route(APIRoute):
    """A route whose every failure is answered in the spec's error format, in the format the resource asked for.

    FastAPI raises its own validation errors inside the route handler, so catching them here scopes the
    conversion (422 → 400) to the Open311 routes; the rest of intake keeps gridloop's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def spec_errors(request: Request) -> Response:
            try:
                return await handle(request)
            except Exception as exc:
                known = as_error(exc)
                if known is None:  # a bug: logged in full; the client gets the spec's "general service error"
                    log.exception("Open311 %s %s failed", request.method, request.url.path)
                    known = 400, [(500, "general service error: the request failed inside gridloop; tell us")]
                status, errors = known
                return error_response(format_of(request), status, errors)

        return spec_errors


__all__ = [
    "FORMATS",
    "JSON_TYPE",
    "MAX_SPAN",
    "NOT_XML",
    "SHANGHAI",
    "XML_TYPE",
    "Format",
    "Open311Error",
    "Open311Route",
    "bad_request",
    "error_response",
    "format_of",
    "parse_format",
    "parse_w3c",
    "render",
    "w3c",
    "window",
]
