"""Every path of the 数字城管 loop, end to end over the real broker, through the public HTTP APIs only.

Each test reports at its own spot of Gaohang town so no two tests' reports are merged by accident.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.e2e.conftest import Town
from tests.kafka_support import consumer, producer

pytestmark = pytest.mark.kafka


def types(incident: dict[str, Any]) -> list[str]:
    return [t["type"] for t in incident["timeline"]]


def test_straight_close(town: Town) -> None:
    iid = town.report("exposed_garbage", 31.2710, 121.5610)
    [order] = town.work_orders(iid)
    assert order["department_code"] == "city_ops" and order["status"] == "dispatched"
    town.accept_and_handle(order)
    task = town.verify(iid, passed=True)
    assert task["grid_id"] == "gh01" and task["worker_id"] == "w-gh01-2"
    done = town.wait_for(iid, status="closed")
    assert types(done) == [
        "IncidentReported",
        "IncidentFiled",
        "WorkOrderDispatched",
        "WorkOrderAccepted",
        "WorkOrderHandled",
        "VerificationRequested",
        "VerificationPassed",
        "IncidentClosed",
    ]
    assert done["timeline"][-1]["detail"] == "closed on time"
    actors = {t["type"]: (t["actor_kind"], t["actor_id"]) for t in done["timeline"]}
    assert actors["WorkOrderAccepted"] == ("department", "staff-city_ops")
    assert actors["VerificationPassed"] == ("grid_worker", "w-gh01-2")
    assert len(town.work_orders(iid, status="closed")) == 1


def test_rework_then_close(town: Town) -> None:
    iid = town.report("illegal_parking", 31.2715, 121.5620)
    [order] = town.work_orders(iid)
    town.accept_and_handle(order)
    town.verify(iid, passed=False, note="车辆仍未挪走")
    [again] = town.work_orders(iid, status="rework")
    assert again["work_order_id"] == order["work_order_id"]
    town.act(again, "handle", result="已拖移", evidence_urls=["https://evidence.example/2.jpg"])
    town.verify(iid, passed=True)
    done = town.wait_for(iid, status="closed")
    assert done["rework_count"] == 1
    assert types(done).count("VerificationRequested") == 2 and "IncidentReworked" in types(done)


def test_return_reroute_close(town: Town) -> None:
    iid = town.report("illegal_signage", 31.2720, 121.5630)
    [first] = town.work_orders(iid)
    assert first["department_code"] == "civic_creation"
    town.act(first, "return", reason="店招属环境整治范围")
    orders = town.work_orders(iid, status="dispatched")
    [second] = [o for o in orders if o["work_order_id"] != first["work_order_id"]]
    assert second["department_code"] == "env_rectification"
    town.accept_and_handle(second)
    town.verify(iid, passed=True)
    done = town.wait_for(iid, status="closed")
    assert done["departments"] == ["civic_creation", "env_rectification"]
    assert "WorkOrderReturned" in types(done)


def test_duplicate_is_merged(town: Town) -> None:
    first = town.report("river_pollution", 31.2725, 121.5640)
    town.wait_for(first, status="dispatched")
    second = town.report("river_pollution", 31.27252, 121.56402)
    merged = town.wait_for(second, status="merged")
    assert first in merged["timeline"][-1]["detail"]


@pytest.mark.parametrize(
    ("category", "lat", "lon", "why"),
    [("exposed_garbage", 31.40, 121.70, "outside every grid"), ("not_a_category", 31.2730, 121.5650, "unknown")],
)
def test_rejected(town: Town, category: str, lat: float, lon: float, why: str) -> None:
    iid = town.report(category, lat, lon)
    rejected = town.wait_for(iid, status="rejected")
    assert why in rejected["timeline"][-1]["detail"]


def test_extension_granted(town: Town) -> None:
    iid = town.report("group_renting", 31.2735, 121.5660)  # 72 h → 72 s at this time scale
    [order] = town.work_orders(iid)
    town.act(order, "accept")
    asked = datetime.fromisoformat(order["deadline"]) + timedelta(hours=1)
    for out_of_range in ("0001-01-01T00:00:00+08:00", "9999-12-31T23:59:59Z"):
        r = town.act(order, "extension", expect=422, requested_deadline=out_of_range, reason="需联合执法")
        assert "requested_deadline: Value error, timestamps must be from 2000-01-01" in r.json()["error"]
    town.act(order, "extension", requested_deadline=asked.isoformat(), reason="需联合执法")
    deadline = time.monotonic() + 30
    while True:
        pending = [e for e in town.dispatch.get("/extensions").json() if e["work_order_id"] == order["work_order_id"]]
        if pending or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert pending, "the extension request never reached the operations centre"
    for out_of_range in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"):
        r = town.dispatch.post(
            f"/work-orders/{order['work_order_id']}/extension", json={"grant": True, "new_deadline": out_of_range}
        )
        assert r.status_code == 422, r.text
        assert r.json()["details"][0]["field"] == "new_deadline"
    r = town.dispatch.post(
        f"/work-orders/{order['work_order_id']}/extension", json={"actor_id": "ops-duty", "grant": True}
    )
    assert r.status_code == 200, r.text
    done = town.wait_for(iid, event="ExtensionGranted")
    assert datetime.fromisoformat(done["deadline"]) == asked
    deadline = time.monotonic() + 30
    while datetime.fromisoformat(town.work_orders(iid)[0]["deadline"]) != asked:
        assert time.monotonic() < deadline, "handling never saw the new deadline"
        time.sleep(0.2)
    town.act(order, "handle", result="已整治", evidence_urls=["https://evidence.example/3.jpg"])
    town.verify(iid, passed=True)
    assert town.wait_for(iid, status="closed")["timeline"][-1]["detail"] == "closed on time"


def test_overdue_is_reminded_then_escalated(town: Town) -> None:
    iid = town.report("flooding", 31.2740, 121.5670)  # 4 h → due in 4 s; escalation 2 h later
    town.work_orders(iid, min_count=2)
    late = town.wait_for(iid, event="IncidentEscalated", count=2, timeout=60)
    assert types(late).count("OverdueReminded") == 2  # one per department
    assert late["overdue"] and late["escalated"]
    for order in town.work_orders(iid, min_count=2):
        assert order["overdue"]
        town.accept_and_handle(order)
    town.verify(iid, passed=True)
    assert town.wait_for(iid, status="closed")["timeline"][-1]["detail"] == "closed late"


def test_handled_on_the_spot(town: Town) -> None:
    iid = town.report(
        "shared_bikes",
        31.2745,
        121.5680,
        handled_on_spot=True,
        evidence_urls=["https://evidence.example/bikes-tidy.jpg"],
    )
    task = town.verify(iid, passed=True)
    assert task["evidence_urls"] == ["https://evidence.example/bikes-tidy.jpg"]
    done = town.wait_for(iid, status="closed")
    assert "WorkOrderDispatched" not in types(done) and done["departments"] == []


def test_nobody_verifies_their_own_fix_and_whoever_acts_for_someone_is_recorded_as_themselves(town: Town) -> None:
    """Separation of duties and acting on someone's behalf, through the public APIs: the worker who fixed it on the
    spot cannot pass it, nor can the worker of the grid it was not asked of; an administrator passing it for the
    worker it was asked of is recorded as the administrator on their behalf. The hotline desk naming w-gh01-1 as
    reporter is recorded as the desk on their behalf and cannot retry w-gh01-1's client_report_id."""
    worker = town.as_("intake", town.tokens.workers["w-gh01-1"])
    client_report_id = f"e2e-duties-{time.time_ns()}"
    fixed = {
        "category_code": "shared_bikes",
        "lat": 31.2765,
        "lon": 121.5715,
        "description": "e2e 单车已摆放整齐",
        "reporter_id": "w-gh01-1",
        "client_report_id": client_report_id,
        "handled_on_spot": True,
        "evidence_urls": ["https://evidence.example/duties.jpg"],
    }
    r = worker.post("/reports", json=fixed)
    assert r.status_code == 202, r.text
    iid = r.json()["incident_id"]

    task = town.verification_task(iid)
    assert task["worker_id"] == "w-gh01-2"
    decide = f"/verifications/{task['verification_id']}/pass"
    own = town.as_("verification", town.tokens.workers["w-gh01-1"]).post(decide, json={"note": "我自己修好了"})
    assert own.status_code == 403 and "did the work" in own.json()["error"], own.text
    admin = town.as_("verification", town.tokens.admin)
    for_the_fixer = admin.post(decide, json={"worker_id": "w-gh01-1", "note": "代录"})
    assert for_the_fixer.status_code == 403, for_the_fixer.text
    r = admin.post(decide, json={"worker_id": "w-gh01-2", "note": "电话核实，代录"})
    assert r.status_code == 202, r.text
    done = town.wait_for(iid, status="closed")
    [passed] = [t for t in done["timeline"] if t["type"] == "VerificationPassed"]
    assert (passed["actor_kind"], passed["actor_id"], passed["on_behalf_of"]) == ("system", "admin", "w-gh01-2")

    desk = {**fixed, "source": "hotline_12345", "handled_on_spot": False, "evidence_urls": []}
    taken = town.intake.post("/reports", json=desk)
    assert taken.status_code == 409 and "another caller" in taken.json()["error"], taken.text
    assert iid not in taken.text
    r = town.intake.post(
        "/reports", json={**desk, "category_code": "illegal_parking", "client_report_id": "e2e-desk-1"}
    )
    assert r.status_code == 202, r.text
    reported = town.wait_for(r.json()["incident_id"], event="IncidentReported")
    assert reported["reporter_id"] == "w-gh01-1"
    [entry] = [t for t in reported["timeline"] if t["type"] == "IncidentReported"]
    assert (entry["actor_kind"], entry["actor_id"], entry["on_behalf_of"]) == ("ops_center", "ops-duty", "w-gh01-1")


def test_big_incident_engages_several_departments(town: Town) -> None:
    iid = town.report("safety_hazard", 31.2750, 121.5690)
    orders = town.work_orders(iid, min_count=3)
    assert sorted(o["department_code"] for o in orders) == ["planning", "public_safety", "work_safety"]
    assert {o["coordinator"] for o in orders} == {"ops_center"}
    for order in orders[:-1]:
        town.accept_and_handle(order)
    time.sleep(1.0)
    assert town.incident(iid)["status"] != "verifying", "verification must wait for every department"
    town.accept_and_handle(orders[-1])
    town.verify(iid, passed=True)
    done = town.wait_for(iid, status="closed")
    assert types(done).count("WorkOrderHandled") == 3


def test_same_kafka_event_twice_is_one_transition(town: Town) -> None:
    iid = town.report("public_toilet", 31.2755, 121.5700)
    [order] = town.work_orders(iid)
    town.act(order, "accept")
    town.act(order, "handle", result="已维修", evidence_urls=["https://evidence.example/wc.jpg"])
    town.wait_for(iid, event="VerificationRequested")
    # redeliver the department's WorkOrderHandled record, byte for byte
    from schemas.topics import FEEDBACK

    c = consumer(FEEDBACK.name)
    handled = None
    for _ in range(40):
        for batch in c.poll(timeout_ms=250).values():
            for record in batch:
                if record.key == iid.encode() and b'"WorkOrderHandled"' in record.value:
                    handled = record
        if handled:
            break
    c.close()
    assert handled is not None
    p = producer()
    p.send(FEEDBACK.name, key=handled.key, value=handled.value).get(timeout=10)
    p.send(FEEDBACK.name, key=handled.key, value=handled.value).get(timeout=10)
    p.close()
    town.verify(iid, passed=True)
    done = town.wait_for(iid, status="closed")
    time.sleep(1.0)
    done = town.incident(iid)
    assert types(done).count("WorkOrderHandled") == 1 and types(done).count("VerificationRequested") == 1
