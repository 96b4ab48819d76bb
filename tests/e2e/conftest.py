"""The whole loop, running for real: every service as its own process over the real broker, driven only through
the public HTTP APIs — as grid workers, departments and the operations centre would."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.kafka_support import Tokens, fresh_namespace, require_broker, running, service_env

TIME_SCALE = 3600  # one business hour of deadline per second: flooding (4 h) is due in 4 s


class Town:
    """Thin client of the public APIs, with waits that fail with what was last seen."""

    def __init__(self, env: dict[str, str], tokens: Tokens) -> None:
        port = {k: int(v) for k, v in env.items() if k.endswith("_HTTP_PORT")}

        def client(name: str, token: str) -> httpx.Client:
            url = f"http://127.0.0.1:{port[f'GRIDLOOP_{name.upper()}_HTTP_PORT']}"
            return httpx.Client(base_url=url, timeout=10, headers=Tokens.bearer(token))

        self.tokens = tokens
        self.port = port
        # the operations center's view of every service; actions use the acting person's own token
        self.intake = client("intake", tokens.ops_center)
        self.handling = client("handling", tokens.ops_center)
        self.verification = client("verification", tokens.ops_center)
        self.dispatch = client("dispatch", tokens.ops_center)
        self.opscenter = client("opscenter", tokens.ops_center)
        self.env = env
        self.n = 0

    def as_(self, service: str, token: str) -> httpx.Client:
        url = f"http://127.0.0.1:{self.port[f'GRIDLOOP_{service.upper()}_HTTP_PORT']}"
        return httpx.Client(base_url=url, timeout=10, headers=Tokens.bearer(token))

    # -- grid workers ------------------------------------------------------------------------------

    def report(self, category: str, lat: float, lon: float, **kw: Any) -> str:
        self.n += 1
        body: dict[str, Any] = {
            "category_code": category,
            "lat": lat,
            "lon": lon,
            "description": f"e2e {category}",
            "reporter_id": "w-gh01-1",
            "client_report_id": f"e2e-{self.n}-{time.time_ns()}",
        }
        body.update(kw)
        r = self.as_("intake", self.tokens.workers[body["reporter_id"]]).post("/reports", json=body)
        assert r.status_code == 202, r.text
        return str(r.json()["incident_id"])

    def incident(self, incident_id: str) -> dict[str, Any]:
        r = self.intake.get(f"/incidents/{incident_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait_for(
        self,
        incident_id: str,
        *,
        status: str | None = None,
        event: str | None = None,
        count: int = 1,
        timeout: float = 60,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen: dict[str, Any] = {}
        while time.monotonic() < deadline:
            r = self.intake.get(f"/incidents/{incident_id}")
            if r.status_code == 200:
                seen = r.json()
                types = [t["type"] for t in seen["timeline"]]
                if (status is None or seen["status"] == status) and (event is None or types.count(event) >= count):
                    return seen
            time.sleep(0.2)
        timeline = [t["type"] for t in seen.get("timeline", [])]
        raise AssertionError(
            f"{incident_id}: wanted status={status} event={event}×{count}; saw {seen.get('status')} {timeline}"
        )

    def verification_task(self, incident_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tasks = self.verification.get("/verifications", params={"status": "pending", "limit": 500}).json()
            mine = [t for t in tasks if t["incident_id"] == incident_id]
            if mine:
                return dict(mine[0])
            time.sleep(0.2)
        raise AssertionError(f"no pending verification for {incident_id}")

    def verify(self, incident_id: str, passed: bool, note: str = "已核查") -> dict[str, Any]:
        task = self.verification_task(incident_id)
        action = "pass" if passed else "fail"
        worker = self.as_("verification", self.tokens.workers[task["worker_id"]])
        r = worker.post(f"/verifications/{task['verification_id']}/{action}", json={"note": note})
        assert r.status_code == 202, r.text
        return task

    # -- departments -------------------------------------------------------------------------------

    def work_orders(
        self, incident_id: str, status: str | None = None, min_count: int = 1, timeout: float = 60
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            params: dict[str, Any] = {"limit": 500}
            if status:
                params["status"] = status
            found = [
                w for w in self.handling.get("/work-orders", params=params).json() if w["incident_id"] == incident_id
            ]
            if len(found) >= min_count:
                return found
            time.sleep(0.2)
        raise AssertionError(f"{incident_id}: wanted {min_count} work orders ({status}); saw {found}")

    def act(self, order: dict[str, Any], action: str, expect: int = 202, **body: Any) -> httpx.Response:
        staff = self.as_("handling", self.tokens.departments[order["department_code"]])
        r = staff.post(f"/work-orders/{order['work_order_id']}/{action}", json=body or None)
        assert r.status_code == expect, r.text
        return r

    def accept_and_handle(self, order: dict[str, Any]) -> None:
        self.act(order, "accept")
        self.act(order, "handle", result="已处置", evidence_urls=["https://evidence.example/after.jpg"])


def iso(dt: datetime) -> str:
    return dt.isoformat()


@pytest.fixture(scope="session")
def town(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Town]:
    require_broker()
    ns = fresh_namespace("e2e")
    var = tmp_path_factory.mktemp("e2e")
    env = service_env(
        ns,
        var,
        base_port=28100,
        GRIDLOOP_TIME_SCALE=str(TIME_SCALE),
        GRIDLOOP_DISPATCH_ESCALATE_AFTER_HOURS="2",
        GRIDLOOP_DISPATCH_WATCHDOG_INTERVAL_S="0.5",
        GRIDLOOP_DISPATCH_MERGE_WINDOW_HOURS="600",
        # the fuzzing asks for long polls of up to 30 s on empty queues: held a moment only, it still runs them
        GRIDLOOP_LONG_POLL_MAX_S="0.5",
    )
    tokens = Tokens(var)
    with running(env, var):
        yield Town(env, tokens)
