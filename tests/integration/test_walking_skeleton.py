"""One incident over the real broker: intake's HTTP API → Kafka → dispatch (faust) → Kafka, read back independently.
Also: a malformed record goes to the dead-letter topic with its reason, and the pipeline keeps going."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from schemas.topics import DEADLETTER, INCIDENTS_REPORTED, LIFECYCLE, WORKORDERS
from services.supervisor import ServiceGroup
from tests.kafka_support import Tokens, fresh_namespace, producer, read_until, require_broker, running, service_env

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def skeleton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceGroup, str, str]]:
    require_broker()
    ns = fresh_namespace("skel")
    var = tmp_path_factory.mktemp("skeleton")
    env = service_env(ns, var, base_port=28200)
    worker = Tokens(var).workers["w-gh01-1"]
    with running(env, var, services=["intake", "dispatch"]) as group:
        yield group, env["GRIDLOOP_INTAKE_HTTP_PORT"], worker


def _report(client_id: str, **kw: object) -> dict[str, object]:
    body: dict[str, object] = {
        "category_code": "exposed_garbage",
        "lat": 31.2851,
        "lon": 121.5752,
        "address": "华高路 88 号",
        "description": "路边暴露垃圾",
        "reporter_id": "w-gh01-1",
        "client_report_id": client_id,
    }
    body.update(kw)
    return body


def test_report_travels_to_a_dispatched_work_order(skeleton: tuple[ServiceGroup, str, str]) -> None:
    _, port, token = skeleton
    auth = Tokens.bearer(token)
    api = f"http://127.0.0.1:{port}"
    r = httpx.post(f"{api}/reports", json=_report("skel-1"), timeout=10, headers=auth)
    assert r.status_code == 202, r.text
    incident_id = r.json()["incident_id"]

    record, reported = read_until(INCIDENTS_REPORTED.name, lambda v: v["incident_id"] == incident_id)
    assert record.key == incident_id.encode() and reported["type"] == "IncidentReported"
    record, order = read_until(WORKORDERS.name, lambda v: v["incident_id"] == incident_id)
    assert record.key == incident_id.encode()
    assert order["type"] == "WorkOrderDispatched" and order["department_code"] == "city_ops"
    assert order["correlation_id"] == incident_id and order["causation_id"] == reported["event_id"]
    read_until(LIFECYCLE.name, lambda v: v["event_id"] == order["event_id"])


def test_retried_post_returns_the_same_incident(skeleton: tuple[ServiceGroup, str, str]) -> None:
    _, port, token = skeleton
    auth = Tokens.bearer(token)
    api = f"http://127.0.0.1:{port}"
    body = _report("skel-2", category_code="illegal_parking")
    first = httpx.post(f"{api}/reports", json=body, timeout=10, headers=auth).json()
    again = httpx.post(f"{api}/reports", json=body, timeout=10, headers=auth).json()
    assert (again["incident_id"], again["duplicate"], first["duplicate"]) == (first["incident_id"], True, False)


def test_malformed_record_is_dead_lettered_and_the_pipeline_goes_on(skeleton: tuple[ServiceGroup, str, str]) -> None:
    _, port, token = skeleton
    auth = Tokens.bearer(token)
    p = producer()
    meta = p.send(INCIDENTS_REPORTED.name, key=b"junk", value=b"{this is not json").get(timeout=10)
    p.close()
    _, letter = read_until(
        DEADLETTER.name,
        lambda v: (
            v["offset"] == meta.offset
            and v["partition"] == meta.partition
            and v["source_topic"] == INCIDENTS_REPORTED.name
        ),
    )
    assert letter["service"] == "dispatch" and "malformed JSON" in letter["reason"]
    assert letter["value"] == "{this is not json"
    # the next good report still gets through
    r = httpx.post(f"http://127.0.0.1:{port}/reports", json=_report("skel-3", lat=31.3101), timeout=10, headers=auth)
    incident_id = r.json()["incident_id"]
    read_until(WORKORDERS.name, lambda v: v["incident_id"] == incident_id)


def test_invalid_report_is_a_422_with_the_reason(skeleton: tuple[ServiceGroup, str, str]) -> None:
    _, port, token = skeleton
    auth = Tokens.bearer(token)
    r = httpx.post(f"http://127.0.0.1:{port}/reports", json=_report("skel-4", lat=95), timeout=10, headers=auth)
    assert r.status_code == 422
    assert "lat" in r.json()["error"]


def test_no_token_is_a_401_and_nothing_is_recorded(skeleton: tuple[ServiceGroup, str, str]) -> None:
    _, port, _ = skeleton
    api = f"http://127.0.0.1:{port}"
    r = httpx.post(f"{api}/reports", json=_report("skel-5"), timeout=10)
    assert r.status_code == 401 and "token" in r.json()["error"]
    r = httpx.post(f"{api}/reports", json=_report("skel-5"), headers=Tokens.bearer("glt_forged"), timeout=10)
    assert r.status_code == 401
    assert httpx.get(f"{api}/health", timeout=10).status_code == 200
