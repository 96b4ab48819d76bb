"""Open311 GeoReport v2 over the running town: a citizens' app posts a request, the town works it round the loop,
and the app follows it to the end through the gateway alone."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from services.common.auth import Role
from tests.e2e.conftest import Town

pytestmark = pytest.mark.kafka

SHANGHAI = timezone(timedelta(hours=8))
SPOT = ("31.3010", "121.5860")  # 和悦家园 (gh06), where no other end-to-end test reports


def shanghai(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(SHANGHAI).replace(microsecond=0).isoformat()


def gateway(town: Town) -> httpx.Client:
    port = town.port["GRIDLOOP_INTAKE_HTTP_PORT"]
    return httpx.Client(base_url=f"http://127.0.0.1:{port}/open311/v2", timeout=10)


def test_an_open311_request_goes_round_the_loop(town: Town) -> None:
    key = town.tokens.store.issue(Role.OPEN311, "fixmystreet")[0]
    app = gateway(town)
    description = '小区东门垃圾成堆 <厨余> & "湿垃圾" 混投，请尽快清运'
    form = {
        "api_key": key,
        "service_code": "exposed_garbage",
        "lat": SPOT[0],
        "long": SPOT[1],
        "address_string": "高行镇 和悦家园 东门",
        "description": description,
        "media_url": "https://img.example.cn/open311-e2e.jpg",
        "account_id": "fms-user-7",
        "email": "citizen@example.cn",
    }
    r = app.post("/requests.json", data=form)
    assert r.status_code == 200, r.text
    [created] = r.json()
    incident_id = created["service_request_id"]
    assert created["account_id"] == "fms-user-7" and "城运办" in created["service_notice"]
    retried = app.post("/requests.xml", data=form)  # the app did not see the answer and tries again
    assert retried.status_code == 200 and ET.fromstring(retried.content).findtext("request/service_request_id") == (
        incident_id
    )

    [order] = town.work_orders(incident_id)
    assert order["department_code"] == "city_ops"
    town.accept_and_handle(order)
    town.verify(incident_id, passed=True)
    done = town.wait_for(incident_id, status="closed")
    assert (done["source"], done["reporter_id"]) == ("open311", "fixmystreet")

    [request] = app.get(f"/requests/{incident_id}.json").json()
    assert request["status"] == "closed" and request["status_notes"].startswith("已结案 closed")
    assert request["agency_responsible"] == "城运办 City Operations Office"
    assert request["updated_datetime"] == shanghai(done["closed_at"])
    assert request["requested_datetime"] == shanghai(done["reported_at"])
    assert request["expected_datetime"] == shanghai(done["deadline"])
    assert (request["description"], request["address"]) == (description, "高行镇 和悦家园 东门")
    assert (request["media_url"], request["lat"], request["long"]) == (form["media_url"], 31.301, 121.586)
    assert "fixmystreet" not in str(request) and "fms-user-7" not in str(request)
    assert app.get("/requests.json", params={"service_request_id": incident_id}).json() == [request]
    closed_ones = app.get("/requests.json", params={"status": "closed", "service_code": "exposed_garbage"}).json()
    assert incident_id in [r["service_request_id"] for r in closed_ones]

    r = app.get(f"/requests/{incident_id}.xml")
    assert r.headers["content-type"] == "text/xml; charset=utf-8"
    assert r.content.startswith(b'<?xml version="1.0" encoding="utf-8"?>')
    assert "&lt;厨余&gt; &amp;".encode() in r.content
    shown = ET.fromstring(r.content).find("request")
    assert shown is not None
    assert shown.findtext("description") == description and shown.findtext("status") == "closed"
    assert shown.findtext("agency_responsible") == "城运办 City Operations Office"

    until = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    updates: list[dict[str, Any]] = [
        u
        for u in app.get(
            "/servicerequestupdates.json", params={"start_date": request["requested_datetime"], "end_date": until}
        ).json()
        if u["service_request_id"] == incident_id
    ]
    assert len(updates) == len(done["timeline"])  # one per transition
    assert [u["update_id"] for u in updates] == [t["event_id"] for t in done["timeline"]]
    assert updates[0]["status"] == "open" and updates[0]["media_url"] == form["media_url"]
    assert updates[-1]["status"] == "fixed" and updates[-1]["updated_datetime"] == request["updated_datetime"]
    assert {"investigating", "action_scheduled", "in_progress"} <= {u["status"] for u in updates}
    xml_updates = ET.fromstring(
        app.get("/servicerequestupdates.xml", params={"start_date": request["requested_datetime"]}).content
    )
    assert xml_updates.tag == "service_request_updates"
    assert incident_id in [u.findtext("service_request_id") for u in xml_updates.findall("request_update")]


def test_the_gateway_refuses_what_the_spec_refuses(town: Town) -> None:
    app = gateway(town)
    ops = town.tokens.ops_center
    r = app.post("/requests.json", data={"api_key": ops, "service_code": "exposed_garbage", "lat": SPOT[0]})
    assert (r.status_code, r.json()) == (
        403,
        [{"code": 403, "description": "this api_key is not an Open311 client's key"}],
    )
    r = app.get("/requests.json", params={"start_date": "9999-12-31T00:00:00+08:00"})
    assert r.status_code == 400, r.text
    [error] = r.json()
    assert error["code"] == 400 and error["description"].startswith("start_date: timestamps must be from 2000-01-01")
    r = app.get("/services/potholes.xml")
    assert r.status_code == 404 and ET.fromstring(r.content).findtext("error/code") == "404"
    services = app.get("/services.json").json()
    assert {s["service_code"] for s in services} >= {"exposed_garbage", "safety_hazard", "flooding"}
    assert app.get("/discovery.json").json()["endpoints"][0]["url"].endswith("/open311/v2")
