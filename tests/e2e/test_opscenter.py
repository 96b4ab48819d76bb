"""The operations center over the real pipeline: its figures agree with the incidents, and a read model rebuilt
from the lifecycle log's offset 0 gives the same KPIs as the live one."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from schemas.reference import GAOHANG
from services.common.db import UnitOfWork, make_engine
from services.opscenter.kpis import Dimension, Period
from services.opscenter.rebuild import kpi_report, rebuild
from tests.e2e.conftest import Town
from tests.kafka_support import BOOTSTRAP

pytestmark = pytest.mark.kafka


def _settle(town: Town, timeout: float = 60) -> dict[str, Any]:
    """Wait until opscenter has folded everything intake has seen (both follow the same lifecycle log)."""
    deadline = time.monotonic() + timeout
    while True:
        incidents = town.intake.get("/incidents", params={"limit": 500}).json()
        statuses = [i["status"] for i in incidents]
        kpis = town.opscenter.get("/api/kpis", params={"period": "month", "by": "none"}).json()
        total = kpis["total"]["current"]
        want = (len(incidents), statuses.count("closed"), statuses.count("rejected"), statuses.count("merged"))
        got = (total["reported"], total["closed"], total["rejected"], total["merged"])
        if want == got:
            return dict(kpis)
        if time.monotonic() > deadline:
            raise AssertionError(f"opscenter {got} never matched intake {want}")
        time.sleep(0.5)


def test_kpis_follow_the_loop(town: Town) -> None:
    closed = town.report("garbage_sorting", 31.2950, 121.6000)
    [order] = town.work_orders(closed)
    town.accept_and_handle(order)
    town.verify(closed, passed=True)
    town.wait_for(closed, status="closed")
    town.report("garbage_sorting", 31.2960, 121.6010)  # left open
    kpis = _settle(town)
    assert kpis["total"]["current"]["dispatched"] >= 2
    by_dept = town.opscenter.get("/api/kpis", params={"period": "day", "by": "department"}).json()
    city = {r["key"]: r for r in by_dept["rows"]}["city_ops"]["current"]
    assert city["closed"] >= 1 and city["time_to_accept"]["count"] >= 1
    csv = town.opscenter.get("/api/kpis.csv", params={"period": "day", "by": "department"})
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert "城运办" in csv.text
    backlog = {b["department_code"]: b for b in town.opscenter.get("/api/backlog").json()}
    assert backlog["city_ops"]["open"] >= 1
    points = town.opscenter.get("/api/map/incidents").json()["features"]
    assert any(p["properties"]["category_code"] == "garbage_sorting" for p in points)
    assert town.opscenter.get("/api/kpis", params={"period": "year"}).status_code == 422


def _facts(engine: Any) -> int:
    """How many events the read model has folded (or holds parked)."""
    with engine.connect() as conn:
        return int(conn.execute(sa.text("select count(*) from processed_event")).scalar_one())


def test_rebuild_from_offset_zero_gives_the_same_kpis(town: Town, tmp_path: Path) -> None:
    _settle(town)
    live_db = Path(town.env["GRIDLOOP_VAR_DIR"]) / "db" / "opscenter.sqlite"
    live = make_engine(f"sqlite:///{live_db}")
    # the watchdog keeps adding reminders for open work: rebuild until the live model holds the same events
    for attempt in range(10):
        rebuilt_url = f"sqlite:///{tmp_path / f'rebuilt{attempt}.sqlite'}"
        applied = rebuild(BOOTSTRAP, rebuilt_url)
        rebuilt = make_engine(rebuilt_url)
        time.sleep(1.0)
        if _facts(rebuilt) == _facts(live):
            break
        rebuilt.dispose()
    else:
        raise AssertionError("the live read model never caught up with the log")
    assert applied > 0
    now = datetime.now(UTC)
    for by in Dimension:
        for period in Period:
            with UnitOfWork(live) as a, UnitOfWork(rebuilt) as b:
                want = kpi_report(a.session, period, GAOHANG.local_day(now), by, now)
                got = kpi_report(b.session, period, GAOHANG.local_day(now), by, now)
            assert got == want, f"{period}/{by} differs after a rebuild"
            assert want.total.current.reported > 0 or period is not Period.MONTH
    live.dispose()
    rebuilt.dispose()
