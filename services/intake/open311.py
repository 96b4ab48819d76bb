"""Open311 GeoReport v2 gateway (http://wiki.open311.org/GeoReport_v2), part of intake, mounted at ``/open311/v2``.

Citizens' apps (FixMyStreet and the like) discover the service list, post service requests and follow them.
A posted request becomes a gridloop incident through intake's own ``report_incident`` (source ``open311``,
reported by the client application the api_key was issued to), so it runs the whole loop: filed or rejected,
dispatched, handled, verified, closed. The incident id is the ``service_request_id``; requests are ``realtime``.

Where the spec leaves room, gridloop chooses:

- ``api_key`` is required to post, as a field of the posted form where the spec puts it: a token of role
  ``open311`` issued with ``python -m services.admin tokens issue --role open311 --subject <app-name>``. Missing,
  unknown, revoked, expired or another role's token: 403. In the URL (``?api_key=``) it is refused (403) without
  reading the form: proxies and servers log URLs. Reading needs no key. ``jurisdiction_id`` is ignored (one
  jurisdiction).
- Location: ``lat`` and ``long`` are required. gridloop places an incident in its grid cell by coordinates and has
  no geocoder, so ``address_string`` or ``address_id`` alone is refused (400); ``address_string`` given with
  coordinates is kept as the incident's address. A point outside the town's grid cells is accepted and then
  rejected by dispatch like any report: the request is closed, and ``status_notes`` says why.
- ``description``: the spec's limit is 4000 characters, gridloop keeps 2000. Longer than 4000 is refused as the
  spec says; from 2001 to 4000 it is refused too (400, saying gridloop keeps 2000) rather than cut short. Without
  a description the service name stands in for it. Answers to the service's attributes are appended to it on
  lines of their own (the department reads them on the work order) and count towards the 2000.
- ``media_url``: one http(s) URL, kept as the incident's photo. Contact fields (email, device_id, account_id,
  first_name, last_name, phone) are accepted but not stored: the reporter of record is the client application.
- A retried identical POST (same client application, account_id/device_id/email, content and Shanghai calendar
  day) returns the same service_request_id: the incident's client report id is a hash of all of that.
- ``GET requests`` lists the incidents of public services (``Category.public``), whatever channel reported them;
  an incident of any other service (a 群租 flat, a hazard inside a warehouse) is absent from every listing and
  answered 404 by id or token, as an unknown one — posted through Open311 too (its ``service_notice`` says so).
  gridloop's closed, rejected and merged are ``closed``, every other status ``open``. ``updated_datetime`` of a
  closed request is its closing time; ``expected_datetime`` is the deadline; ``agency_responsible`` names the
  department(s) it was dispatched to. Nothing identifies the reporter or the staff who acted, and no words of staff
  are shown: ``status_notes`` is a fixed phrase of the status, a request not posted through Open311 shows the
  service's name for its description and no address or photo (``services.common.visibility``).
- FixMyStreet's ``GET servicerequestupdates`` extension gives one update per timeline transition of a public
  request, its label as the description, with FixMyStreet's statuses (open, investigating, action_scheduled,
  in_progress, internal_referral, fixed, no_further_action, duplicate).
- POST answers 200 with the spec's one-element list, for a new request and a retried one alike.
"""

from __future__ import annotations

import hashlib
import math
import re
from datetime import datetime
from typing import Annotated, Any, NoReturn
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.routing import APIRoute
from pydantic import HttpUrl, TypeAdapter, ValidationError

from schemas import Town
from schemas.events import Source
from services.common.auth import Principal, Role, Unauthenticated
from services.common.db import UnitOfWork
from services.common.runtime import Runtime

from . import _open311_catalog as catalog
from . import _open311_views as views
from . import handlers
from ._open311_wire import (
    FORMATS,
    JSON_TYPE,
    NOT_XML,
    SHANGHAI,
    XML_TYPE,
    Open311Error,
    Open311Route,
    bad_request,
    parse_format,
    render,
    window,
)
from .models import ReportAccepted, ReportCreate

PREFIX = "/open311/v2"
SPECIFICATION = "http://wiki.open311.org/GeoReport_v2"
DESCRIPTION_LIMIT = 4000
"""The spec's limit of a description."""
IDS_LIMIT = 800
CODES_LIMIT = 200
"""Bounds of GET requests' lists. The HTTP server (uvicorn over h11) is sure to take a request head of up to 16 KiB;
a longer one it may refuse, depending on how the bytes arrive (400, the connection closed — often reset while the
client is still sending). A character may take 12 bytes percent-encoded: with these bounds, the longest query the
document allows (about 13 KiB) still fits."""
KEPT_LIMIT = 2000
"""What gridloop keeps of a description (IncidentReported.description)."""
ADDRESS_LIMIT = 200
CONTACT_FIELDS = ("email", "device_id", "account_id", "first_name", "last_name", "phone")
_BODY_LIMIT = 256 * 1024
_ATTRIBUTE = re.compile(r"^attribute\[([^\[\]]+)\](\[\])?$")
_URL: TypeAdapter[HttpUrl] = TypeAdapter(HttpUrl)

_BOTH: dict[str, dict[str, Any]] = {"application/json": {}, "text/xml": {}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {
        "description": "errors as GeoReport v2 shapes them: a list of {code, description} (403: api_key)",
        "content": _BOTH,
    }
}
Fmt = Annotated[str, Path(description="format of the answer: json or xml", json_schema_extra={"enum": list(FORMATS)})]


def _docs(description: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"description": description, "content": _BOTH}, **_ERRORS}


_FORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["api_key", "service_code"],
    "properties": {
        "api_key": {"type": "string", "description": "an open311 token"},
        "jurisdiction_id": {"type": "string", "description": "ignored: one jurisdiction"},
        "service_code": {"type": "string"},
        "lat": {"type": "number"},
        "long": {"type": "number"},
        "address_string": {"type": "string", "maxLength": ADDRESS_LIMIT},
        "address_id": {"type": "string"},
        **{name: {"type": "string"} for name in CONTACT_FIELDS},
        "description": {"type": "string", "maxLength": DESCRIPTION_LIMIT},
        "media_url": {"type": "string", "format": "uri"},
    },
    "additionalProperties": {"type": "string", "description": "attribute[CODE] (multivaluelist: attribute[CODE][])"},
}


def build_router(runtime: Runtime) -> APIRouter:
    """The GeoReport v2 routes; include them with ``prefix=PREFIX``."""
    router = APIRouter(route_class=Open311Route, tags=["open311"])

    @router.get("/discovery.{fmt}", responses=_docs("Service Discovery: this endpoint, its formats, how to get a key"))
    async def discovery(request: Request, fmt: Fmt) -> Response:
        """Service Discovery (http://wiki.open311.org/Service_Discovery)."""
        f = parse_format(fmt)
        url = str(request.url.replace(query="")).rsplit("/discovery.", 1)[0]
        return render(
            f,
            "discovery",
            {
                "changeset": catalog.CHANGESET,
                "contact": f"{runtime.town.name_zh}城运中心 {runtime.town.name_en} town operations center (gridloop), "
                "through the town's 12345 hotline",
                "key_service": (
                    "An api_key is issued by a gridloop administrator: "
                    "python -m services.admin tokens issue --role open311 --subject <app-name>"
                ),
                "endpoints": [
                    {
                        "specification": SPECIFICATION,
                        "url": url,
                        "changeset": catalog.CHANGESET,
                        "type": "production",
                        "formats": ["application/json", "text/xml"],
                    }
                ],
            },
        )

    @router.get("/services.{fmt}", responses=_docs("every service: gridloop's incident categories"))
    async def service_list(fmt: Fmt) -> Response:
        """GET Service List: gridloop's incident categories."""
        return render(parse_format(fmt), "services", catalog.services(runtime.town))

    @router.get("/services/{service_code}.{fmt}", responses=_docs("the service's attributes (extra questions)"))
    async def service_definition(service_code: str, fmt: Fmt) -> Response:
        """GET Service Definition: the attributes a service asks for."""
        f = parse_format(fmt)
        return render(f, "service_definition", catalog.definition(service_code, runtime.town))

    @router.post(
        "/requests.{fmt}",
        responses=_docs("the new service request's id (one element)"),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {"schema": _FORM_SCHEMA},
                    "multipart/form-data": {"schema": _FORM_SCHEMA},
                },
            }
        },
    )
    async def create_request(request: Request, fmt: Fmt) -> Response:
        """POST Service Request: report an incident (api_key of an open311 client required)."""
        f = parse_format(fmt)
        if "api_key" in request.query_params:
            raise Open311Error(403, "the api_key goes in the posted form, never in the URL (where it is logged)")
        form = await _form(request)
        who = _client(runtime, form)
        service = catalog.category(_one(form, "service_code") or _missing("service_code"), runtime.town)
        accepted, account_id = await runtime.command(_post, form, who, service.code, runtime.town)
        created = {
            "service_request_id": accepted.incident_id,
            "service_notice": catalog.service_notice(service.code, runtime.town),
            "account_id": account_id,
        }
        return render(f, "service_requests", [created])

    @router.get("/requests.{fmt}", responses=_docs("service requests, newest first (at most 1000)"))
    async def list_requests(
        fmt: Fmt,
        service_request_id: Annotated[
            str | None,
            Query(max_length=IDS_LIMIT, description="comma-separated ids (about 40); overrides every other argument"),
        ] = None,
        service_code: Annotated[str | None, Query(max_length=CODES_LIMIT, description="comma-separated")] = None,
        start_date: Annotated[str | None, Query(max_length=40, description="W3C datetime")] = None,
        end_date: Annotated[str | None, Query(max_length=40, description="W3C datetime (≤ 90 days on)")] = None,
        status: Annotated[str | None, Query(max_length=20, description="open, closed or both")] = None,
    ) -> Response:
        """GET Service Requests: by id, or by service, status and requested_datetime (the last 90 days unless told)."""
        f = parse_format(fmt)
        ids = _split(service_request_id)
        if ids:
            found = await runtime.read(views.requests_by_ids, ids, runtime.town)
        else:
            codes = _split(service_code)
            unknown = [c for c in codes if c not in runtime.town.categories]
            if unknown:
                raise bad_request(*(f"unknown service_code {c[:60]!r}" for c in unknown))
            statuses = set(_split(status))
            if statuses - {"open", "closed"}:
                raise bad_request("status is open, closed or both (comma-separated)")
            found = await runtime.read(_matching, codes, statuses, start_date, end_date, runtime.town)
        return render(f, "service_requests", found)

    @router.get("/requests/{service_request_id}.{fmt}", responses=_docs("the service request (one element)"))
    async def get_request(service_request_id: str, fmt: Fmt) -> Response:
        """GET Service Request."""
        f = parse_format(fmt)
        found = await runtime.read(views.request_by_id, service_request_id, runtime.town)
        if found is None:
            raise Open311Error(404, f"service_request_id {service_request_id[:80]!r} not found")
        return render(f, "service_requests", [found])

    @router.get("/tokens/{token}.{fmt}", responses=_docs("the service request a token stands for"))
    async def token(token: str, fmt: Fmt) -> Response:
        """GET service_request_id from a token. Requests are realtime: a token is the service_request_id."""
        f = parse_format(fmt)
        known = await runtime.read(views.known, token, runtime.town)
        if not known:
            raise Open311Error(404, f"token {token[:80]!r} not found")
        return render(f, "service_requests", [{"service_request_id": token, "token": token}])

    @router.get("/servicerequestupdates.{fmt}", responses=_docs("updates, oldest first (at most 1000)"))
    async def request_updates(
        fmt: Fmt,
        start_date: Annotated[str | None, Query(max_length=40, description="W3C datetime")] = None,
        end_date: Annotated[str | None, Query(max_length=40, description="W3C datetime (≤ 90 days on)")] = None,
    ) -> Response:
        """FixMyStreet's extension: one update per transition of any request, in the range (the last 90 days)."""
        f = parse_format(fmt)
        found = await runtime.read(_updates, start_date, end_date, runtime.town)
        return render(f, "service_request_updates", found)

    @router.api_route(
        "/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"], include_in_schema=False
    )
    async def elsewhere(request: Request, path: str) -> Response:
        """Anything else under the prefix: answered in the spec's error format too."""
        allowed = sorted(
            {
                method
                for route in router.routes
                if isinstance(route, APIRoute) and route.endpoint is not elsewhere
                if route.path_regex.match(f"/{path}")
                for method in route.methods or ()
            }
        )
        if allowed:
            raise bad_request(f"{request.method} is not allowed here: use {', '.join(allowed)}")
        raise Open311Error(404, f"no resource {path[:80]!r}: see discovery.xml, services.xml and requests.xml")

    return router


# -- POST Service Request ------------------------------------------------------------------------------------------


async def _form(request: Request) -> dict[str, list[str]]:
    """The posted fields (name → values), decoded as UTF-8 whatever the client escaped."""
    mime = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > _BODY_LIMIT:
        raise _too_large()  # before a byte of it is read
    pairs: list[tuple[str, str]] = []
    if mime == "multipart/form-data":  # one streamed (chunked) is bounded by the API's own body limit
        for name, value in (await request.form()).multi_items():
            if not isinstance(value, str):
                raise bad_request(f"{name}: files are not taken; give media_url, a link to the picture")
            pairs.append((name, value))
    elif mime in ("application/x-www-form-urlencoded", ""):
        body = await _body(request)
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict", max_num_fields=500)
        except ValueError:  # UnicodeDecodeError too
            raise bad_request("the body is not UTF-8 application/x-www-form-urlencoded") from None
    else:
        raise bad_request("post the request as application/x-www-form-urlencoded (or multipart/form-data)")
    form: dict[str, list[str]] = {}
    for name, value in pairs:
        if NOT_XML.search(value) or NOT_XML.search(name):
            raise bad_request(f"{name[:60]} holds control characters")
        form.setdefault(name, []).append(value.strip())
    return form


async def _body(request: Request) -> bytes:
    """The posted body, read no further than the limit."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > _BODY_LIMIT:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large() -> Open311Error:
    return Open311Error(413, f"the form is larger than {_BODY_LIMIT // 1024} KiB")


def _one(form: dict[str, list[str]], name: str) -> str | None:
    """A single-valued field; empty means absent, as the spec's optional arguments say."""
    values = list(dict.fromkeys(v for v in form.get(name, []) if v))
    if len(values) > 1:
        raise bad_request(f"{name} is given more than once")
    return values[0] if values else None


def _missing(name: str) -> NoReturn:
    raise bad_request(f"{name} is required")


def _client(runtime: Runtime, form: dict[str, list[str]]) -> Principal:
    key = _one(form, "api_key")
    if not key:
        raise Open311Error(403, "api_key is required to post a service request; a gridloop administrator issues it")
    try:
        who = runtime.auth.authenticate(key)
    except Unauthenticated as exc:
        reason = str(exc)
        if reason.startswith("token expired"):
            raise Open311Error(403, "api_key " + reason.removeprefix("token ")) from None
        if reason == "unknown or revoked token":
            reason = "unknown or revoked"
        raise Open311Error(403, f"invalid api_key: {reason}") from None
    if who.role is not Role.OPEN311:
        raise Open311Error(403, "this api_key is not an Open311 client's key")
    return who


def _coordinates(form: dict[str, list[str]], problems: list[str]) -> tuple[float, float]:
    lat_raw, lon_raw = _one(form, "lat"), _one(form, "long")
    if lat_raw is None and lon_raw is None:
        if _one(form, "address_string") or _one(form, "address_id"):
            problems.append(
                "lat/long required: gridloop locates incidents by coordinates and cannot place an address_string "
                "or address_id alone"
            )
        else:
            problems.append("a location is required: lat and long")
        return 0.0, 0.0
    if lat_raw is None or lon_raw is None:
        problems.append("lat and long are both required")
        return 0.0, 0.0
    found: list[float] = []
    for name, raw, bound in (("lat", lat_raw, 90), ("long", lon_raw, 180)):
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or abs(value) > bound:
            problems.append(f"{name} must be a WGS84 number from -{bound} to {bound}, not {raw[:40]!r}")
        found.append(value)
    return found[0], found[1]


def _attributes(form: dict[str, list[str]]) -> dict[str, list[str]]:
    given: dict[str, list[str]] = {}
    for name, values in form.items():
        match = _ATTRIBUTE.match(name)
        if match:
            given.setdefault(match[1], []).extend(v for v in values if v)
    return given


def _post(
    form: dict[str, list[str]], who: Principal, service_code: str, town: Town, uow: UnitOfWork
) -> tuple[ReportAccepted, str | None]:
    """Take the report a posted request stands for; a concurrent twin answers as a retry."""
    cmd, account_id = _report(form, who, service_code, town, uow.now())
    return handlers.report_incident(cmd, uow, by=who.actor()), account_id


def _matching(
    codes: list[str], statuses: set[str], start_date: str | None, end_date: str | None, town: Town, uow: UnitOfWork
) -> list[dict[str, Any]]:
    start, end = window(start_date, end_date, uow.now())
    return views.requests_matching(codes, statuses, start, end, town, uow)


def _updates(start_date: str | None, end_date: str | None, town: Town, uow: UnitOfWork) -> list[dict[str, Any]]:
    start, end = window(start_date, end_date, uow.now())
    return views.updates(start, end, town, uow)


def _report(
    form: dict[str, list[str]], who: Principal, service_code: str, town: Town, now: datetime
) -> tuple[ReportCreate, str | None]:
    """The incident report a valid request stands for, and the account_id to echo; 400 with every problem."""
    problems: list[str] = []
    lat, lon = _coordinates(form, problems)
    address = _one(form, "address_string") or ""
    if len(address) > ADDRESS_LIMIT:
        problems.append(f"address_string is at most {ADDRESS_LIMIT} characters")
    contact = {name: _one(form, name) for name in CONTACT_FIELDS}
    problems += [f"{name} is at most 200 characters" for name, v in contact.items() if v and len(v) > 200]
    media_url = _one(form, "media_url")
    if media_url is not None:
        try:
            media_url = str(_URL.validate_python(media_url))
        except ValidationError:
            problems.append(f"media_url must be one http(s) URL, not {media_url[:80]!r}")
    given = _one(form, "description") or ""
    lines, wrong = catalog.answers(service_code, _attributes(form), town)
    problems += wrong
    description = "\n\n".join(p for p in (given or catalog.service_name(service_code, town), "\n".join(lines)) if p)
    if len(given) > DESCRIPTION_LIMIT:
        problems.append(f"description is {len(given)} characters: at most {DESCRIPTION_LIMIT}")
    elif len(description) > KEPT_LIMIT:
        with_answers = " with the attribute answers" if lines else ""
        problems.append(
            f"description is {len(description)} characters{with_answers}: gridloop keeps at most {KEPT_LIMIT}"
        )
    if problems:
        raise bad_request(*problems)
    day = now.astimezone(SHANGHAI).date().isoformat()
    content: list[Any] = [who.subject, [contact[k] for k in ("account_id", "device_id", "email")], day, service_code]
    content += [round(lat, 6), round(lon, 6), address, description, media_url]
    client_report_id = "o311-" + hashlib.sha256(orjson.dumps(content)).hexdigest()[:48]
    cmd = ReportCreate(
        source=Source.OPEN311,
        category_code=service_code,
        lat=lat,
        lon=lon,
        address=address,
        description=description,
        photo_urls=[media_url] if media_url else [],
        reporter_id=who.subject,
        client_report_id=client_report_id,
    )
    return cmd, contact["account_id"]


def _split(raw: str | None) -> list[str]:
    return [p.strip() for p in (raw or "").split(",") if p.strip()]


__all__ = ["JSON_TYPE", "PREFIX", "SPECIFICATION", "XML_TYPE", "build_router"]
