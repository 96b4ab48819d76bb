"""intake's Open311 GeoReport v2 gateway in process, against intake's own API on a test database (no broker).

Every resource is asked for in both formats, and the XML must say what the JSON says (the spec's JSON is the
Spark-convention mapping of its XML). Field names and shapes follow the spec's examples.
"""

from __future__ import annotations

import asyncio
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import httpx
import orjson
import pytest
import sqlalchemy as sa
from fastapi import Depends
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from schemas import Actor, ActorKind, Event, Location, decode_event
from schemas import events as ev
from schemas.reference import GAOHANG
from services.common.auth import Role, TokenStore, require
from services.common.bus import MessageBus
from services.common.db import OutboxRecord, UnitOfWork, make_engine
from services.common.runtime import Runtime
from services.intake import handlers
from services.intake.api import build_api
from services.intake.models import TABLES, IntakeIncident, ReportCreate
from services.intake.store import IntakeStore

from .conftest import FakeClock
from .test_edge import post

T0 = datetime(2026, 11, 24, 0, 15, tzinfo=UTC)
"""08:15 in Shanghai."""
T = TypeVar("T")
V2 = "/open311/v2"
SPOT = {"lat": "31.2851", "long": "121.5752"}
W3C = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+08:00$")
REQUEST_FIELDS = [
    "service_request_id",
    "status",
    "status_notes",
    "service_name",
    "service_code",
    "description",
    "agency_responsible",
    "service_notice",
    "requested_datetime",
    "updated_datetime",
    "expected_datetime",
    "address",
    "address_id",
    "zipcode",
    "lat",
    "long",
    "media_url",
]
PLURALS = {
    "services": "service",
    "service_requests": "request",
    "service_request_updates": "request_update",
    "attributes": "attribute",
    "values": "value",
    "endpoints": "endpoint",
    "formats": "format",
    "errors": "error",
}


class FakeRuntime:
    """What intake's API uses of its Runtime: units of work on a test database and clock, tokens, the outbox."""

    def __init__(self, engine: Engine, clock: FakeClock, auth: TokenStore) -> None:
        self.engine, self.clock, self.auth = engine, clock, auth
        self.town = GAOHANG
        self.bus = MessageBus(self.uow, handlers.HANDLERS)
        self.flushed = 0

    def uow(self) -> UnitOfWork:
        return UnitOfWork(self.engine, clock=self.clock)

    def allow(self, *roles: Role) -> Any:
        return Depends(require(self.auth, *roles))

    async def command(self, handler: Callable[..., T], *args: Any) -> T:
        result, emitted = self.bus.execute(handler, *args)
        if emitted:
            await self.flush_outbox()
        return result

    def query(self, handler: Callable[..., T], *args: Any) -> T:
        return self.bus.query(handler, *args)

    async def read(self, handler: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(self.bus.query, handler, *args)  # off the loop, as the runtime reads

    async def flush_outbox(self) -> None:
        self.flushed += 1


def spark(element: ET.Element) -> Any:
    """An XML answer as the Spark convention maps it to JSON (every leaf as its text, empty as None)."""
    if element.tag in PLURALS:
        assert all(child.tag == PLURALS[element.tag] for child in element), element.tag
        return [spark(child) for child in element]
    if len(element):
        return {child.tag: spark(child) for child in element}
    return element.text


def as_text(value: Any) -> Any:
    """A JSON answer with every leaf written as XML writes it."""
    if isinstance(value, list):
        return [as_text(v) for v in value]
    if isinstance(value, dict):
        return {k: as_text(v) for k, v in value.items()}
    if isinstance(value, bool):
        return "true" if value else "false"
    return None if value is None or value == "" else str(value)


def read(r: httpx.Response, fmt: str) -> Any:
    if fmt == "json":
        assert r.headers["content-type"] == "application/json; charset=utf-8"
        return r.json()
    assert r.headers["content-type"] == "text/xml; charset=utf-8"
    assert r.content.startswith(b'<?xml version="1.0" encoding="utf-8"?>\n<')
    return spark(ET.fromstring(r.content))


class Gateway:
    def __init__(
        self, client: httpx.AsyncClient, runtime: FakeRuntime, engine: Engine, key: str, api: Any = None
    ) -> None:
        self.client, self.runtime, self.engine, self.key = client, runtime, engine, key
        self.api = api
        self.clock = runtime.clock
        self.bus = MessageBus(runtime.uow, handlers.HANDLERS)

    async def both(self, path: str, **params: Any) -> Any:
        """GET ``path`` as .json and .xml: both answer 200 and say the same; the JSON is returned."""
        got = {}
        for fmt in ("json", "xml"):
            r = await self.client.get(f"{V2}/{path}.{fmt}", params=params)
            assert r.status_code == 200, (fmt, r.text)
            got[fmt] = read(r, fmt)
        assert got["xml"] == as_text(got["json"])
        return got["json"]

    async def post(self, fmt: str = "json", **fields: Any) -> httpx.Response:
        data: dict[str, Any] = {"api_key": self.key, "service_code": "exposed_garbage", **SPOT}
        data["description"] = "路口有暴露垃圾 garbage at the crossing"
        data.update(fields)
        return await self.client.post(f"{V2}/requests.{fmt}", data={k: v for k, v in data.items() if v is not None})

    async def report(self, **fields: Any) -> str:
        """Post a request in both formats (the second is a retry): the same id; the report reaches the log."""
        ids = []
        for fmt in ("json", "xml"):
            r = await self.post(fmt, **fields)
            assert r.status_code == 200, r.text
            [created] = read(r, fmt)
            assert list(created) == ["service_request_id", "service_notice", "account_id"]
            ids.append(created["service_request_id"])
        assert ids[0] == ids[1]
        self.deliver()
        return str(ids[0])

    def outbox(self) -> list[Event]:
        with UnitOfWork(self.engine) as uow:
            rows = uow.session.exec(select(OutboxRecord).order_by(col(OutboxRecord.id))).all()
            return [decode_event(r.payload) for r in rows]

    def deliver(self) -> None:
        """What the lifecycle topic brings back to intake: every report queued so far."""
        for event in self.outbox():
            self.bus.handle(event)

    def reported(self, incident_id: str) -> ev.IncidentReported:
        [event] = [e for e in self.outbox() if e.incident_id == incident_id]
        assert isinstance(event, ev.IncidentReported)
        return event

    def apply(self, *events: Event) -> None:
        for event in events:
            self.bus.handle(event)


@pytest.fixture
async def gw(tmp_path: Any, make_db: Callable[[tuple[sa.Table, ...]], Engine]) -> AsyncIterator[Gateway]:
    engine = make_db(TABLES)
    auth = TokenStore(make_engine(f"sqlite:///{tmp_path / 'auth.sqlite'}"))
    runtime = FakeRuntime(engine, FakeClock(T0), auth)
    api = build_api(cast(Runtime, runtime))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://intake.test") as client:
        yield Gateway(client, runtime, engine, auth.issue(Role.OPEN311, "fixmystreet")[0], api)
    auth.engine.dispose()


def errors(r: httpx.Response) -> list[tuple[int, str]]:
    """The spec's error list, from either format (the format the resource asked for)."""
    fmt = "json" if r.request.url.path.endswith(".json") else "xml"
    body = read(r, fmt)
    assert all(list(e) == ["code", "description"] for e in body), body
    return [(int(e["code"]), str(e["description"])) for e in body]


def the_loop(gw: Gateway, incident_id: str, department: str = "city_ops") -> list[Event]:
    """What the rest of the town does with a report: file, dispatch, accept, handle, verify, close."""
    reported = gw.reported(incident_id)
    system, at = Actor.system("dispatch"), reported.occurred_at
    staff = Actor(kind=ActorKind.DEPARTMENT, id="staff-7", department=department)
    worker = Actor(kind=ActorKind.GRID_WORKER, id="w-gh05-2")
    order = f"{incident_id}-1"
    code, grid, deadline = reported.category_code, "gh05", at + timedelta(hours=24)

    def step(cls: type[Event], actor: Actor, minutes: int, **fields: Any) -> Event:
        return cls.following(reported, actor, occurred_at=at + timedelta(minutes=minutes), **fields)

    return [
        step(ev.IncidentFiled, system, 1, category_code=code, grid_id=grid, priority=3, severity="normal"),
        step(
            ev.WorkOrderDispatched,
            system,
            2,
            work_order_id=order,
            department_code=department,
            category_code=code,
            grid_id=grid,
            location=reported.location,
            description=reported.description,
            priority=3,
            deadline=deadline,
        ),
        step(ev.WorkOrderAccepted, staff, 10, work_order_id=order, department_code=department),
        step(ev.WorkOrderHandled, staff, 60, work_order_id=order, department_code=department, result="已清运 cleared"),
        step(
            ev.VerificationRequested,
            Actor.system("verification"),
            61,
            verification_id="V-1",
            grid_id=grid,
            worker_id="w-gh05-2",
            category_code=code,
            location=reported.location,
            description=reported.description,
        ),
        step(ev.VerificationPassed, worker, 90, verification_id="V-1", note="已核查 checked"),
        step(
            ev.IncidentClosed,
            system,
            91,
            category_code=code,
            grid_id=grid,
            departments=[department],
            reported_at=at,
            deadline=deadline,
            on_time=True,
            rework_count=0,
            return_count=0,
        ),
    ]


# -- Service Discovery, GET Service List, GET Service Definition -------------------------------------------------


async def test_discovery(gw: Gateway) -> None:
    found = await gw.both("discovery")
    assert list(found) == ["changeset", "contact", "key_service", "endpoints"]
    assert "--role open311 --subject" in found["key_service"]
    [endpoint] = found["endpoints"]
    assert endpoint == {
        "specification": "http://wiki.open311.org/GeoReport_v2",
        "url": "http://intake.test/open311/v2",
        "changeset": found["changeset"],
        "type": "production",
        "formats": ["application/json", "text/xml"],
    }


async def test_service_list(gw: Gateway) -> None:
    services = await gw.both("services")
    assert [s["service_code"] for s in services] == list(GAOHANG.categories)
    fields = ["service_code", "service_name", "description", "metadata", "type", "keywords", "group"]
    assert all(list(s) == fields for s in services)
    by_code = {s["service_code"]: s for s in services}
    garbage = by_code["exposed_garbage"]
    assert garbage["service_name"] == "暴露垃圾 / Exposed garbage"
    assert (garbage["metadata"], garbage["type"], garbage["group"]) == (False, "realtime", "garbage")
    assert "暴露垃圾" in garbage["keywords"] and "城运办" in garbage["description"]
    assert {code for code, s in by_code.items() if s["metadata"]} >= {"safety_hazard", "group_renting", "flooding"}
    assert all(s["group"] == GAOHANG.categories[s["service_code"]].family for s in services)
    private = {code for code, s in by_code.items() if "Requests are not public" in s["description"]}
    assert "group_renting" in private and private == {c.code for c in GAOHANG.categories.values() if not c.public}


async def test_service_definitions(gw: Gateway) -> None:
    hazard = await gw.both("services/safety_hazard")
    assert hazard["service_code"] == "safety_hazard"
    fields = ["variable", "code", "datatype", "required", "datatype_description", "order", "description", "values"]
    assert all(list(a) == fields for a in hazard["attributes"])
    site, hazards = hazard["attributes"]
    assert (site["code"], site["datatype"], site["required"], site["order"]) == (
        "site_type",
        "singlevaluelist",
        True,
        1,
    )
    assert [v["key"] for v in site["values"]] == ["factory", "warehouse", "other"]
    assert site["values"][0] == {"key": "factory", "name": "厂房 Factory"}
    assert (hazards["datatype"], hazards["required"], hazards["order"]) == ("multivaluelist", False, 2)

    flooding = await gw.both("services/flooding")
    kinds = {a["code"]: (a["datatype"], a["required"], a["variable"]) for a in flooding["attributes"]}
    assert kinds == {
        "call_110": ("string", False, False),
        "water_depth_cm": ("number", True, True),
        "observed_at": ("datetime", False, True),
    }
    renting = await gw.both("services/group_renting")
    assert [(a["code"], a["datatype"]) for a in renting["attributes"]] == [("residents_estimate", "number")]
    assert (await gw.both("services/exposed_garbage")) == {"service_code": "exposed_garbage", "attributes": []}

    assert errors(await gw.client.get(f"{V2}/services/potholes.json")) == [
        (404, "service_code 'potholes' not found: see services.xml for the list")
    ]
    [(code, text)] = errors(await gw.client.get(f"{V2}/services/potholes.xml"))
    assert code == 404 and "potholes" in text


# -- POST Service Request ---------------------------------------------------------------------------------------


async def test_a_posted_request_is_an_incident_reported_by_the_client_application(gw: Gateway) -> None:
    r = await gw.post(account_id="acct-42", email="li@example.cn", device_id="dev-9", first_name="磊", phone="1")
    assert r.status_code == 200, r.text
    [created] = r.json()
    assert created["account_id"] == "acct-42" and "城运办" in created["service_notice"]
    incident_id = created["service_request_id"]
    assert gw.runtime.flushed == 1
    event = gw.reported(incident_id)
    assert (event.source, event.reporter_id, event.category_code) == (
        ev.Source.OPEN311,
        "fixmystreet",
        "exposed_garbage",
    )
    assert event.actor == Actor(kind=ActorKind.CITIZEN, id="fixmystreet")
    assert event.location == Location(lat=31.2851, lon=121.5752)
    assert event.description == "路口有暴露垃圾 garbage at the crossing" and event.occurred_at == T0
    assert event.client_report_id.startswith("o311-")

    again = await gw.post("xml", account_id="acct-42", email="li@example.cn", device_id="dev-9", first_name="磊")
    assert read(again, "xml")[0]["service_request_id"] == incident_id  # a retry: the same request
    assert gw.runtime.flushed == 1 and len(gw.outbox()) == 1

    other = await gw.post(account_id="acct-43")  # someone else reporting the same thing
    assert other.json()[0]["service_request_id"] != incident_id
    gw.clock.advance(days=1)  # the same report a day later is a new request
    later = await gw.post(account_id="acct-42", email="li@example.cn", device_id="dev-9")
    assert later.json()[0]["service_request_id"] not in (incident_id, other.json()[0]["service_request_id"])
    assert len(gw.outbox()) == 3 and gw.runtime.flushed == 3


async def test_an_identical_request_committed_meanwhile_is_the_same_request(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = (await gw.post()).json()[0]["service_request_id"]
    looked = IntakeStore.report_of
    misses = [None]

    def racing(*args: Any) -> Any:  # the lookup ran before the other request committed
        return misses.pop() if misses else looked(*args)

    monkeypatch.setattr(IntakeStore, "report_of", racing)
    again = await gw.post()
    assert again.status_code == 200 and again.json()[0]["service_request_id"] == first
    assert misses == [] and len(gw.outbox()) == 1


async def test_address_media_and_attributes_are_kept(gw: Gateway) -> None:
    incident_id = await gw.report(
        service_code="safety_hazard",
        address_string="高行镇东靖路 1 号 仓库",
        media_url="https://img.example.cn/hazard.jpg",
        **{
            "attribute[site_type]": "warehouse",
            "attribute[hazards][]": ["blocked_exits", "wiring"],
            "attribute[fixmystreet_id]": "991",  # not ours: ignored
        },
    )
    event = gw.reported(incident_id)
    assert event.location.address == "高行镇东靖路 1 号 仓库"
    assert [str(u) for u in event.photo_urls] == ["https://img.example.cn/hazard.jpg"]
    assert event.description == (
        "路口有暴露垃圾 garbage at the crossing\n\n"
        "场所类型 Site type: 仓库 Warehouse\n"
        "隐患 Hazards: 消防通道堵塞 Blocked fire exits、私拉电线 Makeshift wiring"
    )
    assert errors(await gw.client.get(f"{V2}/requests/{incident_id}.json"))[0][0] == 404  # not a public service

    flood = await gw.report(
        service_code="flooding",
        description=None,
        address_string="东靖路下立交",
        media_url="https://img.example.cn/flood.jpg",
        **{"attribute[water_depth_cm]": "35", "attribute[observed_at]": "2026-11-24T00:05:00Z"},
    )
    assert gw.reported(flood).description == (
        "积水 / Flooding\n\n积水深度（厘米）Water depth (cm): 35\n发现时间 Seen at: 2026-11-24T08:05:00+08:00"
    )
    [shown] = await gw.both(f"requests/{flood}")
    assert (shown["address"], shown["media_url"]) == ("东靖路下立交", "https://img.example.cn/flood.jpg")
    assert shown["description"] == gw.reported(flood).description  # a citizen's own words, posted to the public


async def test_multipart_forms_are_taken_too(gw: Gateway) -> None:
    fields = {"api_key": gw.key, "service_code": "illegal_parking", **SPOT, "description": "占道停车"}
    body, boundary = _multipart({**fields, "attribute[plate_number]": "沪A12345"})
    r = await gw.client.post(
        f"{V2}/requests.json", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert r.status_code == 200, r.text
    incident_id = r.json()[0]["service_request_id"]
    assert gw.reported(incident_id).description == "占道停车\n\n车牌号 Plate number: 沪A12345"
    r = await gw.client.post(f"{V2}/requests.xml", data=fields, files={"media": ("car.jpg", b"\xff\xd8")})
    assert errors(r) == [(400, "media: files are not taken; give media_url, a link to the picture")]


def _multipart(fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = "gridloop-open311-test"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields.items()
    ]
    return ("".join(parts) + f"--{boundary}--\r\n").encode(), boundary


async def test_raw_utf8_in_a_form_body_is_read_as_utf8(gw: Gateway) -> None:
    body = f"api_key={gw.key}&service_code=exposed_garbage&lat=31.2851&long=121.5752&description=垃圾成堆".encode()
    r = await gw.client.post(
        f"{V2}/requests.json", content=body, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 200, r.text
    assert gw.reported(r.json()[0]["service_request_id"]).description == "垃圾成堆"


BAD_POSTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("no api_key", {"api_key": None}, 403, "api_key is required"),
    ("unknown api_key", {"api_key": "glt_not-a-token"}, 403, "invalid api_key"),
    ("no service_code", {"service_code": None}, 400, "service_code is required"),
    ("unknown service_code", {"service_code": "potholes"}, 404, "'potholes' not found"),
    ("no location", {"lat": None, "long": None}, 400, "a location is required: lat and long"),
    ("address only", {"lat": None, "long": None, "address_string": "东靖路1号"}, 400, "lat/long required"),
    ("address_id only", {"lat": None, "long": None, "address_id": "A-1"}, 400, "lat/long required"),
    ("lat without long", {"long": None}, 400, "lat and long are both required"),
    ("lat not a number", {"lat": "north"}, 400, "lat must be a WGS84 number"),
    ("lat out of range", {"lat": "91"}, 400, "lat must be a WGS84 number"),
    ("long not finite", {"long": "nan"}, 400, "long must be a WGS84 number"),
    (
        "missing required attribute",
        {"service_code": "safety_hazard"},
        400,
        "attribute[site_type] is required",
    ),
    (
        "value not in the list",
        {"service_code": "safety_hazard", "attribute[site_type]": "shop"},
        400,
        "attribute[site_type] 'shop' is not one of its values (factory, warehouse, other)",
    ),
    (
        "two values for a single-value list",
        {"service_code": "safety_hazard", "attribute[site_type]": ["factory", "other"]},
        400,
        "attribute[site_type] takes one value",
    ),
    (
        "a multi-value list value not in the list",
        {"service_code": "safety_hazard", "attribute[site_type]": "factory", "attribute[hazards][]": ["x"]},
        400,
        "attribute[hazards] 'x' is not one of its values",
    ),
    (
        "not a number",
        {"service_code": "flooding", "attribute[water_depth_cm]": "deep"},
        400,
        "attribute[water_depth_cm] 'deep' is not a number",
    ),
    (
        "number out of range",
        {"service_code": "flooding", "attribute[water_depth_cm]": "-5"},
        400,
        "attribute[water_depth_cm] -5 is below the minimum, 0",
    ),
    (
        "not a whole number",
        {"service_code": "group_renting", "attribute[residents_estimate]": "7.5"},
        400,
        "attribute[residents_estimate] '7.5' is not a whole number",
    ),
    (
        "datetime without timezone",
        {"service_code": "flooding", "attribute[water_depth_cm]": "5", "attribute[observed_at]": "2026-11-24T08:00"},
        400,
        "observed_at must carry a timezone",
    ),
    (
        "datetime out of range",
        {"service_code": "flooding", "attribute[water_depth_cm]": "5", "attribute[observed_at]": "9999-12-31T23:00Z"},
        400,
        "observed_at: timestamps must be from 2000-01-01T00:00:00Z to 2100-01-01T00:00:00Z",
    ),
    (
        "datetime before year 1 in UTC",
        {"service_code": "flooding", "attribute[water_depth_cm]": "5", "attribute[observed_at]": "0001-01-01"},
        400,
        "observed_at: timestamps must be from 2000-01-01T00:00:00Z to 2100-01-01T00:00:00Z",
    ),
    (
        "string with a line break",
        {"service_code": "illegal_parking", "attribute[plate_number]": "沪A\n12345"},
        400,
        "attribute[plate_number] is one line of text",
    ),
    (
        "description over the spec's 4000",
        {"description": "长" * 4001},
        400,
        "description is 4001 characters: at most 4000",
    ),
    (
        "description over gridloop's 2000",
        {"description": "长" * 2500},
        400,
        "description is 2500 characters: gridloop keeps at most 2000",
    ),
    ("media_url not a URL", {"media_url": "photo.jpg"}, 400, "media_url must be one http(s) URL"),
    ("control characters", {"description": "bad\x00byte"}, 400, "description holds control characters"),
    ("a field twice", {"service_code": ["exposed_garbage", "flooding"]}, 400, "service_code is given more than once"),
    ("address too long", {"address_string": "路" * 201}, 400, "address_string is at most 200 characters"),
]


@pytest.mark.parametrize("fmt", ["json", "xml"])
@pytest.mark.parametrize(("case", "fields", "status", "says"), BAD_POSTS, ids=[c[0] for c in BAD_POSTS])
async def test_bad_requests_are_refused_as_the_spec_says(
    gw: Gateway, fmt: str, case: str, fields: dict[str, Any], status: int, says: str
) -> None:
    r = await gw.post(fmt, **fields)
    assert r.status_code == status, r.text
    found = errors(r)
    assert any(code == status and says in text for code, text in found), found
    assert gw.outbox() == [] and gw.runtime.flushed == 0


@pytest.mark.parametrize("fmt", ["json", "xml"])
async def test_keys_other_than_a_live_open311_key_are_refused(gw: Gateway, fmt: str) -> None:
    ops = gw.runtime.auth.issue(Role.OPS_CENTER, "ops-duty")[0]
    assert errors(await gw.post(fmt, api_key=ops)) == [(403, "this api_key is not an Open311 client's key")]
    secret, row = gw.runtime.auth.issue(Role.OPEN311, "retired-app")
    assert (await gw.post(fmt, api_key=secret)).status_code == 200
    gw.runtime.auth.revoke(row.token_id)
    assert errors(await gw.post(fmt, api_key=secret, description="another")) == [
        (403, "invalid api_key: unknown or revoked")
    ]
    expired, _ = gw.runtime.auth.issue(Role.OPEN311, "short-lived-app", expires_in=timedelta(minutes=1))
    gw.runtime.auth.clock = lambda: datetime.now(UTC) + timedelta(minutes=2)
    assert errors(await gw.post(fmt, api_key=expired, description="late"))[0][1].startswith("api_key expired")


@pytest.mark.parametrize("fmt", ["json", "xml"])
async def test_the_api_key_is_taken_from_the_form_only_never_from_the_url(gw: Gateway, fmt: str) -> None:
    """The spec puts api_key in the POST's form; in the URL it lands in every proxy's and server's log."""
    in_url = "the api_key goes in the posted form, never in the URL (where it is logged)"
    r = await gw.client.post(f"{V2}/requests.{fmt}?api_key={gw.key}", data={"service_code": "flooding", **SPOT})
    assert errors(r) == [(403, in_url)]
    data = {"api_key": gw.key, "service_code": "flooding", **SPOT}
    r = await gw.client.post(f"{V2}/requests.{fmt}?api_key={gw.key}", data=data)
    assert errors(r) == [(403, in_url)]
    assert gw.outbox() == []
    r = await gw.client.post(f"{V2}/requests.{fmt}", data=data, headers={"Authorization": "Bearer nothing"})
    assert errors(r) == [(400, "attribute[water_depth_cm] is required: 积水大约有多深？ About how deep is the water?")]


@pytest.mark.parametrize("mime", [b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x"])
async def test_a_form_over_256_kib_is_refused_before_it_is_read(gw: Gateway, mime: bytes) -> None:
    """The gateway read the whole form, then looked at its size."""
    declared = [(b"content-length", str(300 * 1024).encode())]
    exchange = await post(gw.api, declared, [b"api_key=x"], path=f"{V2}/requests.json", content_type=mime)
    assert exchange.status == 413 and exchange.reads == 0
    assert orjson.loads(exchange.body) == [{"code": 413, "description": "the form is larger than 256 KiB"}]
    assert gw.outbox() == []


async def test_a_streamed_form_is_refused_once_it_passes_256_kib(gw: Gateway) -> None:
    chunk = b"description=" + b"x" * (32 * 1024 - 12)
    mime = b"application/x-www-form-urlencoded"
    exchange = await post(gw.api, [(b"transfer-encoding", b"chunked")], [chunk] * 20, f"{V2}/requests.xml", mime)
    assert exchange.status == 413 and exchange.reads == 9  # 8 chunks are 256 KiB: the 9th is one too many
    assert ET.fromstring(exchange.body).findtext("error/description") == "the form is larger than 256 KiB"


async def test_a_streamed_multipart_form_is_refused_once_it_passes_the_apis_body_limit(gw: Gateway) -> None:
    mime = b"multipart/form-data; boundary=x"
    head = b'--x\r\nContent-Disposition: form-data; name="description"\r\n\r\n'
    chunks = [head, *[b"x" * 64 * 1024] * 40]
    exchange = await post(gw.api, [(b"transfer-encoding", b"chunked")], chunks, f"{V2}/requests.json", mime)
    assert exchange.status == 413 and exchange.reads == 17  # the head and 16 chunks are a little over 1 MiB
    [error] = orjson.loads(exchange.body)
    assert error["code"] == 413 and error["description"].startswith("the request body is larger than 1024 KiB")


async def test_every_problem_is_listed_at_once(gw: Gateway) -> None:
    r = await gw.post(service_code="flooding", lat=None, media_url="nope", **{"attribute[water_depth_cm]": "x"})
    assert r.status_code == 400
    assert [text.split(" ")[0] for _, text in errors(r)] == ["lat", "media_url", "attribute[water_depth_cm]"]


async def test_bodies_that_are_not_forms_and_unknown_formats(gw: Gateway) -> None:
    r = await gw.client.post(f"{V2}/requests.json", json={"api_key": gw.key, "service_code": "flooding"})
    assert errors(r) == [(400, "post the request as application/x-www-form-urlencoded (or multipart/form-data)")]
    bad_utf8 = b"api_key=x&description=%FF%FE"
    r = await gw.client.post(
        f"{V2}/requests.xml", content=bad_utf8, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert errors(r) == [(400, "the body is not UTF-8 application/x-www-form-urlencoded")]
    for path in ("services.csv", "requests.html", "discovery.yaml", "services/flooding.txt", "tokens/x.rss"):
        r = await gw.client.get(f"{V2}/{path}")
        assert r.status_code == 400 and r.headers["content-type"] == "text/xml; charset=utf-8"
        [(code, text)] = errors(r)
        assert code == 400 and text.startswith("unsupported format") and "use" not in text
    r = await gw.post("csv")
    assert r.status_code == 400 and errors(r)[0][1].startswith("unsupported format 'csv'")


# -- GET Service Requests, GET Service Request, GET service_request_id from a token --------------------------------


async def test_a_request_through_the_loop(gw: Gateway) -> None:
    incident_id = await gw.report(account_id="acct-42", email="li@example.cn", first_name="磊", last_name="李")
    [fresh] = await gw.both(f"requests/{incident_id}")
    assert list(fresh) == REQUEST_FIELDS
    assert fresh == {
        "service_request_id": incident_id,
        "status": "open",
        "status_notes": "已上报 reported",
        "service_name": "暴露垃圾 / Exposed garbage",
        "service_code": "exposed_garbage",
        "description": "路口有暴露垃圾 garbage at the crossing",
        "agency_responsible": None,
        "service_notice": fresh["service_notice"],
        "requested_datetime": "2026-11-24T08:15:00+08:00",
        "updated_datetime": "2026-11-24T08:15:00+08:00",
        "expected_datetime": None,
        "address": None,
        "address_id": None,
        "zipcode": None,
        "lat": 31.2851,
        "long": 121.5752,
        "media_url": None,
    }
    steps = the_loop(gw, incident_id)
    gw.apply(*steps[:3])
    [working] = await gw.both(f"requests/{incident_id}")
    assert (working["status"], working["status_notes"]) == ("open", "已签收 accepted")
    assert working["agency_responsible"] == "城运办 City Operations Office"
    assert working["expected_datetime"] == "2026-11-25T08:15:00+08:00"  # the deadline
    assert working["updated_datetime"] == "2026-11-24T08:25:00+08:00"
    gw.apply(*steps[3:])
    [done] = await gw.both(f"requests/{incident_id}")
    assert (done["status"], done["status_notes"]) == ("closed", "已结案 closed")
    assert done["updated_datetime"] == "2026-11-24T09:46:00+08:00"  # when it was closed
    assert done["agency_responsible"] == "城运办 City Operations Office"
    assert (await gw.both("requests", service_request_id=incident_id)) == [done]
    everything = str(await gw.both("requests")) + str(await gw.both("servicerequestupdates"))
    for private in ("fixmystreet", "acct-42", "li@example.cn", "磊", "staff-7", "w-gh05-2", "o311-"):
        assert private not in everything


async def test_rejected_and_merged_requests_are_closed_with_the_reason(gw: Gateway) -> None:
    far = await gw.report(lat="31.40", long="121.70")
    twin = await gw.report(description="又一处垃圾")
    system = Actor.system("dispatch")
    gw.apply(
        ev.IncidentRejected.following(
            gw.reported(far), system, reason_code="outside_grids", reason="location outside every grid of the town"
        ),
        ev.IncidentMerged.following(gw.reported(twin), system, into_incident_id="GL-OTHER", distance_m=12.4),
    )
    found = {r["service_request_id"]: r for r in await gw.both("requests", service_request_id=f"{far},{twin}")}
    rejected, merged = found[far], found[twin]
    assert rejected["status"] == merged["status"] == "closed"
    assert (
        rejected["status_notes"]
        == "不予立案 rejected: 位置不在本镇网格内 the location lies outside every grid of the town"
    )
    assert merged["status_notes"] == "已合并 merged: 与附近已受理的诉求重复 a duplicate of a request nearby"


async def test_searching_requests(gw: Gateway) -> None:
    gw.clock.now = T0 - timedelta(days=100)
    ancient = await gw.report(description="很久以前")
    gw.clock.now = T0 - timedelta(days=10)
    older = await gw.report(service_code="flooding", **{"attribute[water_depth_cm]": "20"})
    gw.clock.now = T0
    closed = await gw.report()
    gw.apply(*the_loop(gw, closed))
    gw.clock.advance(hours=2)
    newest = await gw.report(description="新的一处")

    async def ids(**params: Any) -> list[str]:
        return [r["service_request_id"] for r in await gw.both("requests", **params)]

    assert await ids() == [newest, closed, older]  # the last 90 days, newest first
    assert await ids(status="open") == [newest, older]
    assert await ids(status="closed") == [closed]
    assert await ids(status="open,closed") == [newest, closed, older]
    assert await ids(service_code="flooding") == [older]
    assert await ids(service_code="flooding,exposed_garbage", status="open") == [newest, older]
    in_november = {"start_date": "2026-11-01T00:00:00+08:00", "end_date": "2026-11-30T00:00:00+08:00"}
    assert await ids(**in_november) == [newest, closed, older]
    assert await ids(start_date="2026-11-24T01:00:00Z") == [newest]  # 09:00 in Shanghai
    assert await ids(start_date="2026-11-24T09:30:00 08:00") == [newest]  # '+' sent unescaped
    assert await ids(start_date="2026-11-24", end_date="2026-11-24T09:00:00+08:00") == [closed]
    assert await ids(end_date="2026-11-01T00:00:00Z") == [ancient]  # the 90 days before end_date
    assert await ids(service_request_id=f"{ancient}, nope,{older}", status="closed") == [older, ancient]
    assert await ids(service_request_id="nope") == []

    bad: list[tuple[dict[str, str], str]] = [
        (
            {"start_date": "2026-01-01T00:00:00Z", "end_date": "2026-11-24T00:00:00Z"},
            "may not span more than 90 days",
        ),
        ({"start_date": "2026-11-24T00:00:00Z", "end_date": "2026-11-01T00:00:00Z"}, "end_date is before start_date"),
        ({"start_date": "2026-11-24T08:00:00"}, "start_date must carry a timezone"),
        ({"end_date": "yesterday"}, "end_date must be a W3C datetime"),
        ({"status": "pending"}, "status is open, closed or both"),
        ({"service_code": "potholes"}, "unknown service_code 'potholes'"),
        ({"start_date": "x" * 41}, "start_date: String should have at most 40 characters"),
    ]
    for params, says in bad:
        for fmt in ("json", "xml"):
            r = await gw.client.get(f"{V2}/requests.{fmt}", params=params)
            assert r.status_code == 400, (params, r.text)  # FastAPI's own 422 too becomes the spec's 400
            [(code, text)] = errors(r)
            assert code == 400 and says in text, (params, text)


@pytest.mark.parametrize("resource", ["requests", "servicerequestupdates"])
@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"start_date": "9999-12-31T00:00:00+08:00"}, "start_date: timestamps must be from 2000-01-01T00:00:00Z"),
        ({"start_date": "9999-12-31T23:59:59-14:00"}, "start_date: timestamps must be from 2000-01-01T00:00:00Z"),
        ({"end_date": "0001-01-01"}, "end_date: timestamps must be from 2000-01-01T00:00:00Z"),  # Shanghai midnight
        ({"end_date": "0001-03-01T00:00:00Z"}, "end_date: timestamps must be from 2000-01-01T00:00:00Z"),
        ({"start_date": "1999-12-31T23:59:59Z"}, "not 1999-12-31T23:59:59+00:00"),
        ({"start_date": "2100-01-01T08:00:00+08:00"}, None),  # the last moment in range: nothing is so late
    ],
)
async def test_a_date_out_of_range_is_refused_with_the_reason_never_a_service_error(
    gw: Gateway, resource: str, params: dict[str, str], says: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    for fmt in ("json", "xml"):
        r = await gw.client.get(f"{V2}/{resource}.{fmt}", params=params)
        if says is None:
            assert (r.status_code, read(r, fmt)) == (200, []), r.text
            continue
        assert r.status_code == 400, r.text
        [(code, text)] = errors(r)
        assert code == 400 and says in text, text
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]


async def test_a_deadline_stored_far_ahead_is_shown_and_the_listings_still_answer(gw: Gateway) -> None:
    """A deadline granted before the range was checked may still be in the database: the listings show it."""
    incident_id = await gw.report()
    gw.apply(*the_loop(gw, incident_id)[:3])
    far = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)  # too late to be written in Shanghai time
    with UnitOfWork(gw.engine) as uow:
        uow.connection.execute(
            sa.update(IntakeIncident).where(col(IntakeIncident.incident_id) == incident_id).values(deadline=far)
        )
        uow.commit()
    [found] = await gw.both(f"requests/{incident_id}")
    assert found["expected_datetime"] == "9999-12-31T23:59:59+00:00"
    assert await gw.both("requests") == [found]
    assert await gw.both("requests", service_request_id=incident_id) == [found]
    assert len(await gw.both("servicerequestupdates")) == 4


async def test_a_single_request_and_tokens(gw: Gateway) -> None:
    incident_id = await gw.report()
    [found] = await gw.both(f"requests/{incident_id}")
    assert found["service_request_id"] == incident_id
    assert await gw.both(f"tokens/{incident_id}") == [{"service_request_id": incident_id, "token": incident_id}]
    for fmt in ("json", "xml"):
        r = await gw.client.get(f"{V2}/requests/GL20990101-NOPE.{fmt}")
        assert errors(r) == [(404, "service_request_id 'GL20990101-NOPE' not found")]
        r = await gw.client.get(f"{V2}/tokens/nope.{fmt}")
        assert errors(r) == [(404, "token 'nope' not found")]


async def test_chinese_and_markup_round_trip_in_xml(gw: Gateway) -> None:
    text = '井盖<缺失> & 路面塌陷 "危险"\n请尽快处理'
    incident_id = await gw.report(description=text, address_string="东靖路 & 高行路口")
    r = await gw.client.get(f"{V2}/requests/{incident_id}.xml")
    assert "&lt;缺失&gt; &amp; 路面塌陷".encode() in r.content  # escaped markup, the Chinese itself in UTF-8
    [request] = spark(ET.fromstring(r.content))
    assert (request["description"], request["address"]) == (text, "东靖路 & 高行路口")
    assert request["service_name"] == "暴露垃圾 / Exposed garbage"


# -- what the public reads --------------------------------------------------------------------------------------


FLAT = "高行镇某小区12号302室 flat 302, No. 12"


def staff_report(gw: Gateway, **fields: Any) -> str:
    """A report that came in on another channel than Open311 (a grid worker's, unless told), delivered."""
    body: dict[str, Any] = {
        "category_code": "exposed_garbage",
        "lat": 31.2851,
        "lon": 121.5752,
        "description": "e",
        "reporter_id": "w-gh05-1",
        "client_report_id": f"staff-{len(gw.outbox())}",
    }
    body.update(fields)
    incident_id = gw.bus.execute(handlers.report_incident, ReportCreate.model_validate(body))[0].incident_id
    gw.deliver()
    return incident_id


async def public_reads(gw: Gateway, *ids: str) -> str:
    """Everything the public can read about ``ids``, as one text."""
    found = [
        await gw.both("requests"),
        await gw.both("requests", service_request_id=",".join(ids)),
        await gw.both("servicerequestupdates"),
    ]
    for incident_id in ids:
        r = await gw.client.get(f"{V2}/requests/{incident_id}.json")
        found.append(r.json())
    return str(found)


async def test_a_non_public_categorys_requests_are_absent_from_every_public_read(gw: Gateway) -> None:
    """A grid worker's 群租 report, with its flat, is no service request of the public's: not listed, not found
    by id or token, no update; a citizen may still post one, and never reads it back."""
    assert not GAOHANG.categories["group_renting"].public
    flat = staff_report(gw, category_code="group_renting", address=FLAT, description=f"{FLAT} 住了二十多人")
    posted = await gw.report(service_code="group_renting", address_string=FLAT, description="群租")
    r = await gw.post(service_code="group_renting", address_string=FLAT, description="群租")
    assert "Requests of this service are not public" in r.json()[0]["service_notice"]  # the poster is told
    garbage = await gw.report()
    assert await gw.both("requests") == await gw.both("requests", service_request_id=f"{flat},{posted},{garbage}")
    assert [r["service_request_id"] for r in await gw.both("requests")] == [garbage]
    assert await gw.both("requests", service_code="group_renting") == []
    assert {u["service_request_id"] for u in await gw.both("servicerequestupdates")} == {garbage}
    for hidden in (flat, posted):
        for fmt in ("json", "xml"):
            r = await gw.client.get(f"{V2}/requests/{hidden}.{fmt}")
            assert errors(r) == [(404, f"service_request_id {hidden!r} not found")]  # as for an unknown id
            assert errors(await gw.client.get(f"{V2}/tokens/{hidden}.{fmt}")) == [(404, f"token {hidden!r} not found")]
    assert FLAT not in await public_reads(gw, flat, posted, garbage)


async def test_a_public_request_shows_no_staff_text_nor_reporter(gw: Gateway) -> None:
    """What staff wrote (a grid worker's or the hotline desk's report, a return reason, a handling result, a
    verification note, an escalation) and who reported stay inside; the category, place and progress are public."""
    worker = staff_report(
        gw,
        description="店主张三倒的垃圾 dumped by the shop owner",
        address="东靖路12号张三家门口",
        photo_urls=["https://img.example.cn/worker.jpg"],
    )
    caller = staff_report(
        gw,
        source="hotline_12345",
        reporter_id="13912345678",
        description="来电人李四反映 caller Li Si says",
        lat=31.2861,
        client_report_id="call-1",
    )
    steps = the_loop(gw, worker)
    staff = Actor(kind=ActorKind.DEPARTMENT, id="staff-7", department="city_ops")
    order, at = steps[1], steps[1].occurred_at
    returned = ev.WorkOrderReturned.following(
        order,
        staff,
        occurred_at=at + timedelta(minutes=1),
        work_order_id=f"{worker}-1",
        department_code="city_ops",
        reason="不归我们管 not ours, ask 王五",
    )
    escalated = ev.IncidentEscalated.following(
        order,
        Actor.system("dispatch"),
        occurred_at=at + timedelta(minutes=2),
        reason_code="overdue",
        reason="returned twice; last: 不归我们管",
    )
    gw.apply(*steps[:2], returned, escalated, *steps[2:])
    [request] = await gw.both(f"requests/{worker}")
    assert request == {
        **request,
        "status": "closed",
        "status_notes": "已结案 closed",
        "service_name": "暴露垃圾 / Exposed garbage",
        "description": "暴露垃圾 / Exposed garbage",  # the service's name stands in for staff's words
        "address": None,
        "media_url": None,
        "agency_responsible": "城运办 City Operations Office",
        "lat": 31.2851,
        "long": 121.5752,
    }
    [called] = await gw.both(f"requests/{caller}")
    assert (called["description"], called["status_notes"], called["lat"]) == (
        "暴露垃圾 / Exposed garbage",
        "已上报 reported",
        31.2861,
    )
    updates = [u for u in await gw.both("servicerequestupdates") if u["service_request_id"] == worker]
    assert [u["description"] for u in updates][3:6] == ["已退回 returned", "督办 escalated", "已签收 accepted"]
    assert all(u["media_url"] is None for u in updates)
    everything = await public_reads(gw, worker, caller)
    for private in (
        "w-gh05-1",
        "张三",
        "worker.jpg",
        "13912345678",
        "李四",
        "王五",
        "不归我们管",
        "已清运",
        "checked",
        "staff-7",
        "w-gh05-2",
    ):
        assert private not in everything, private


# -- FixMyStreet's GET servicerequestupdates ------------------------------------------------------------------------


async def test_updates_one_per_transition(gw: Gateway) -> None:
    incident_id = await gw.report(media_url="https://img.example.cn/before.jpg")
    steps = the_loop(gw, incident_id)
    gw.apply(*steps)
    since = {"start_date": "2026-11-24T08:00:00+08:00", "end_date": "2026-11-25T08:00:00+08:00"}
    updates = await gw.both("servicerequestupdates", **since)
    fields = ["update_id", "service_request_id", "status", "updated_datetime", "description", "media_url"]
    assert all(list(u) == fields and u["service_request_id"] == incident_id for u in updates)
    assert [u["update_id"] for u in updates] == [gw.reported(incident_id).event_id] + [s.event_id for s in steps]
    assert [u["status"] for u in updates] == [
        "open",
        "investigating",
        "action_scheduled",
        "in_progress",
        "in_progress",
        "in_progress",
        "in_progress",
        "fixed",
    ]
    assert [u["media_url"] for u in updates] == ["https://img.example.cn/before.jpg"] + [None] * 7
    assert all(W3C.match(u["updated_datetime"]) for u in updates)
    assert updates[-1]["updated_datetime"] == "2026-11-24T09:46:00+08:00"
    assert [u["description"] for u in updates] == [  # each step's label, never its detail: no words of staff
        "已上报 reported",
        "已立案 filed",
        "已派遣 dispatched",
        "已签收 accepted",
        "已处置 handled",
        "待核查 verification requested",
        "核查通过 verified",
        "已结案 closed",
    ]

    later = await gw.both("servicerequestupdates", start_date="2026-11-24T09:00:00+08:00")
    assert [u["status"] for u in later] == [
        "in_progress",
        "in_progress",
        "in_progress",
        "fixed",
    ]  # status followed from the start
    assert await gw.both("servicerequestupdates", start_date="2026-11-25T00:00:00+08:00") == []
    r = await gw.client.get(
        f"{V2}/servicerequestupdates.xml",
        params={"start_date": "2026-01-01T00:00:00Z", "end_date": "2026-12-01T00:00Z"},
    )
    assert errors(r) == [(400, "start_date … end_date may not span more than 90 days")]


# -- anything else under /open311/v2 -----------------------------------------------------------------------------


async def test_unknown_resources_and_methods(gw: Gateway) -> None:
    r = await gw.client.get(f"{V2}/potholes.json")
    assert errors(r) == [(404, "no resource 'potholes.json': see discovery.xml, services.xml and requests.xml")]
    assert errors(await gw.client.get(f"{V2}/requests"))[0][0] == 404
    assert errors(await gw.client.delete(f"{V2}/requests.json")) == [(400, "DELETE is not allowed here: use GET, POST")]
    assert errors(await gw.client.post(f"{V2}/services.xml")) == [(400, "POST is not allowed here: use GET")]


async def test_the_rest_of_intake_keeps_its_own_errors(gw: Gateway) -> None:
    r = await gw.client.post("/reports", json={"category_code": "x"})
    assert r.status_code == 401 and "error" in r.json()
    ops = gw.runtime.auth.issue(Role.OPS_CENTER, "ops-duty")[0]
    r = await gw.client.post("/reports", json={"category_code": "x"}, headers={"Authorization": f"Bearer {ops}"})
    assert r.status_code == 422 and r.json()["error"].startswith("invalid request")
    spec = (await gw.client.get("/openapi.json")).json()
    ours = {path: ops for path, ops in spec["paths"].items() if path.startswith(V2)}
    assert set(ours) == {
        f"{V2}/discovery.{{fmt}}",
        f"{V2}/services.{{fmt}}",
        f"{V2}/services/{{service_code}}.{{fmt}}",
        f"{V2}/requests.{{fmt}}",
        f"{V2}/requests/{{service_request_id}}.{{fmt}}",
        f"{V2}/tokens/{{token}}.{{fmt}}",
        f"{V2}/servicerequestupdates.{{fmt}}",
    }
    for operations in ours.values():
        for operation in operations.values():
            assert set(operation["responses"]) == {"200", "4XX"}
            assert set(operation["responses"]["200"]["content"]) >= {"application/json", "text/xml"}
    form = ours[f"{V2}/requests.{{fmt}}"]["post"]["requestBody"]["content"]
    assert set(form) == {"application/x-www-form-urlencoded", "multipart/form-data"}
