"""The operations center's reads never run on the event loop, and its lists answer a page at a time.

The service's own runtime (``services.opscenter.app.build``) and API, over HTTP in process (no broker): a read
runs in a read thread while the loop goes on, at most ``read_threads`` at once, and every route of the API reads
that way. The overdue list hands out its next page's cursor; a bad cursor, box or zoom is a 422 with the reason.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from schemas import utcnow
from services.common.auth import Role
from services.common.runtime import Runtime
from services.opscenter.api import build_api
from services.opscenter.app import build
from services.opscenter.settings import OpsCenterSettings
from services.opscenter.store import OpsStore
from tests.readmodel_fill import fill

ROUTES = (
    "/api/kpis?period=month&by=grid",
    "/api/kpis.csv?period=week&by=category",
    "/api/backlog",
    "/api/overdue?limit=5",
    "/api/trend?days=30",
    "/api/map/incidents",
    "/api/map/incidents?zoom=12&bbox=121.56,31.27,121.63,31.33",
    "/api/map/grids",
)


def _runtime(tmp_path: Path, **settings: Any) -> Runtime:
    rt = build(OpsCenterSettings(var_dir=tmp_path, **settings))
    rt.init_db()
    return rt


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    rt = _runtime(tmp_path)
    fill(rt.engine, 600, closed_share=0.5, now=utcnow())
    token = rt.auth.issue(Role.OPS_CENTER, "ops-duty")[0]
    transport = httpx.ASGITransport(app=build_api(rt))
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://opscenter.test", headers=headers) as c:
        yield c, rt
    rt.engine.dispose()


async def test_a_read_runs_in_a_read_thread_while_the_loop_goes_on(tmp_path: Path) -> None:
    rt = _runtime(tmp_path)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    def slow(uow: Any) -> str:
        time.sleep(0.5)
        return threading.current_thread().name

    ticker = asyncio.create_task(tick())
    try:
        name = await rt.read(slow)
    finally:
        ticker.cancel()
    assert name.startswith("gridloop-opscenter-read") and name != threading.current_thread().name
    assert ticks >= 10, f"the loop ticked {ticks} times in half a second of a read"  # ~50: it was never held


async def test_no_more_reads_run_at_once_than_the_read_threads(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, read_threads=2)
    lock = threading.Lock()
    running = peak = 0

    def busy(uow: Any) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.1)
        with lock:
            running -= 1

    await asyncio.gather(*(rt.read(busy) for _ in range(6)))
    assert peak == 2


async def test_an_in_memory_database_is_read_where_it_is_written(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, database_url="sqlite://")  # one database per thread: a read thread would see none

    def grids(uow: Any) -> tuple[str, dict[str | None, int]]:
        return threading.current_thread().name, OpsStore(uow).reads.open_by_grid()

    assert await rt.read(grids) == (threading.current_thread().name, {})


async def test_every_route_reads_off_the_loop(
    client: tuple[httpx.AsyncClient, Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    c, rt = client
    loop_thread = threading.get_ident()
    threads: list[int] = []
    query = rt.bus.query

    def recorded(handler: Any, *args: Any) -> Any:
        threads.append(threading.get_ident())
        return query(handler, *args)

    monkeypatch.setattr(rt.bus, "query", recorded)
    for route in ROUTES:
        before = len(threads)
        r = await c.get(route)
        assert r.status_code == 200, (route, r.text[:300])
        assert len(threads) > before, f"{route} read nothing through the bus"
    assert loop_thread not in threads


async def test_the_overdue_list_hands_out_its_next_page(client: tuple[httpx.AsyncClient, Runtime]) -> None:
    c, _ = client
    seen: list[str] = []
    url: str | None = "/api/overdue?limit=40"
    total = None
    while url is not None:
        r = await c.get(url)
        assert r.status_code == 200, r.text
        total = int(r.headers["X-Total-Count"])
        seen += [o["work_order_id"] for o in r.json()]
        cursor = r.headers.get("X-Next-Cursor")
        if cursor is None:
            assert "Link" not in r.headers
            url = None
        else:
            link = r.headers["Link"]
            assert link.startswith("</api/overdue?") and link.endswith('>; rel="next"') and "limit=40" in link
            assert f"cursor={cursor}" in link
            url = link[1 : link.index(">")]
    assert total is not None and total > 40 and len(seen) == len(set(seen)) == total
    everything = await c.get("/api/overdue", params={"limit": 1000})
    assert [o["work_order_id"] for o in everything.json()] == seen and "X-Next-Cursor" not in everything.headers


@pytest.mark.parametrize(
    ("route", "says"),
    [
        ("/api/overdue?cursor=bm90IGEgY3Vyc29y", "cursor"),
        ("/api/overdue?cursor=%FF%FE", "cursor"),
        ("/api/overdue?cursor=MjAyNi0wMS0wMVQwMDowMDowMHxHTC0x", "cursor"),  # naive time: not one it gave
        ("/api/overdue?limit=0", "limit"),
        ("/api/map/incidents?bbox=1,2,3", "bbox"),
        ("/api/map/incidents?bbox=121.6,31.3,121.5,31.4", "bbox"),
        ("/api/map/incidents?bbox=nan,31.2,121.6,31.3", "bbox"),
        ("/api/map/incidents?bbox=a,b,c,d", "bbox"),
        ("/api/map/incidents?zoom=23", "zoom"),
        ("/api/map/incidents?zoom=-1", "zoom"),
    ],
)
async def test_bad_paging_or_map_input_is_refused_with_the_reason(
    client: tuple[httpx.AsyncClient, Runtime], route: str, says: str
) -> None:
    c, _ = client
    r = await c.get(route)
    assert r.status_code == 422, (route, r.status_code, r.text)
    assert says in r.json()["error"], r.text
