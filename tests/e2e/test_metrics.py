"""Every running service's /metrics over the real pipeline: valid for ``promtool check metrics``, and counting
what the loop did (a report shows in intake's counters, its work order in handling's gauges); consumer lag read
from the broker."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import httpx
import pytest

from services.opscenter.metrics import ConsumerLagCollector
from services.supervisor import Service
from tests.e2e.conftest import Town
from tests.kafka_support import BOOTSTRAP

pytestmark = pytest.mark.kafka

CATEGORY = "garbage_sorting"
SPOT = (31.3150, 121.6150)  # a corner of the town no other end-to-end test reports at


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool is not installed (Debian package `prometheus`)", pytrace=False)
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    return path


def services(town: Town) -> dict[str, httpx.Client]:
    """The API client of every service the town runs (opscenter once it exists)."""
    clients = {
        "intake": town.intake,
        "dispatch": town.dispatch,
        "handling": town.handling,
        "verification": town.verification,
    }
    opscenter = getattr(town, "opscenter", None)
    if isinstance(opscenter, httpx.Client) and Service("opscenter").available():
        clients["opscenter"] = opscenter
    return clients


def scrape(client: httpx.Client) -> str:
    response = client.get("/metrics", follow_redirects=True)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers["content-type"]
    return response.text


def wait_for_sample(client: httpx.Client, pattern: str, timeout: float = 30) -> str:
    """The exposition once a line matches ``pattern`` (outbox flushes and consumers are asynchronous)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = scrape(client)
        if re.search(pattern, text, re.MULTILINE):
            return text
        time.sleep(0.3)
    lines = "\n".join(line for line in text.splitlines() if line.startswith("gridloop_"))
    raise AssertionError(f"no line matching {pattern!r} in:\n{lines}")


def sample(name: str, **labels: str) -> str:
    """A pattern of an exposition line of ``name`` with (at least) ``labels``, in any order, and a value ≥ 1."""
    wanted = "".join(f'(?=[^}}]*\\b{key}="{re.escape(value)}")' for key, value in labels.items())
    return rf"^{name}\{{{wanted}[^}}]*\}} [1-9]"


def test_every_service_exports_valid_metrics(town: Town) -> None:
    town.report(CATEGORY, *SPOT)
    intake = wait_for_sample(town.intake, sample("gridloop_incidents_reported_total", category=CATEGORY))
    assert re.search(sample("gridloop_http_requests_total", route="/reports", status="202"), intake, re.MULTILINE)
    wait_for_sample(
        town.dispatch, sample("gridloop_work_orders_dispatched_total", department="city_ops", category=CATEGORY)
    )
    wait_for_sample(town.handling, sample("gridloop_work_orders_open", department="city_ops"))

    exe = promtool()
    for name, client in services(town).items():
        exposition = scrape(client)
        assert "\ngridloop_" in exposition, f"{name} exports no gridloop metric"
        result = subprocess.run(
            [exe, "check", "metrics"], input=exposition.encode(), capture_output=True, timeout=60, check=False
        )
        problems = (result.stdout + result.stderr).decode(errors="replace").strip()
        assert result.returncode == 0 and not problems, f"{name}: promtool check metrics says:\n{problems}"


def test_consumer_lag_of_the_town(town: Town) -> None:
    env = getattr(town, "env", None)
    namespace = (env if isinstance(env, dict) else os.environ)["GRIDLOOP_TOPIC_NAMESPACE"]
    names = list(services(town))
    groups = [f"{namespace}-{name}" for name in names]
    iid = town.report(CATEGORY, SPOT[0] + 0.002, SPOT[1])  # not merged with the report above: 220 m apart
    town.work_orders(iid)  # intake, dispatch and handling have consumed something by now
    collector = ConsumerLagCollector(BOOTSTRAP, groups, timeout_s=5)
    try:
        deadline = time.monotonic() + 30
        lags = collector.read()
        while not {f"{namespace}-{s}" for s in ("intake", "dispatch", "handling")} <= {g for g, _ in lags}:
            assert time.monotonic() < deadline, f"no committed offsets of every group yet: {lags}"
            time.sleep(0.5)
            lags = collector.read()
    finally:
        collector.close()
    assert all(group in groups and topic.startswith(f"{namespace}.") for group, topic in lags)
    assert all(isinstance(lag, int) and lag >= 0 for lag in lags.values())
    assert (f"{namespace}-dispatch", f"{namespace}.incidents.reported") in lags
