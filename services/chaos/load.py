"""The load a chaos run drives through the public APIs, and its view of progress.

Grid workers, the 12345 hotline desk, department staff and the grid workers who verify are simulated as a few
asyncio loops over httpx, each call made with the acting person's own token, each acting as soon as there is
something to do. Every call survives restarts: a refused connection, a dropped one or a 5xx is tried again, on
the other instance of the pair first. A report is retried with the same ``client_report_id`` until it is
answered (intake takes it once), so a report that was ever accepted is known to the audit by its incident id.
An action retried after its first try was applied is refused with 409, which is how "already done" reads.

:class:`LifecycleTail` follows the lifecycle log from offset 0 on a thread of its own: which incidents are
terminal, how many records were seen — the progress the kill plan waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson

from schemas import GAOHANG, Town
from schemas.events import TERMINAL_EVENTS
from schemas.reference import Grid
from services.common.auth import Role, TokenStore
from services.common.db import make_engine

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"(read|open)_text is deprecated", category=DeprecationWarning)
    from kafka import KafkaConsumer, TopicPartition

log = logging.getLogger("gridloop.chaos")

UNKNOWN_CATEGORY = "abandoned_spaceship"
"""Not a category of the town: dispatch rejects it (不予立案)."""
OUTSIDE = (31.20, 121.45)
"""A point outside every grid of the town: rejected too."""

RETURN_SHARE = 0.05
"""退回: a department sends a new work order back (first attempt only) and dispatch routes it elsewhere."""
SLOW_SHARE = 0.04
"""A department leaves the work past its deadline (when that is near), so 催办 and 督办 happen."""
FAIL_SHARE = 0.10
"""核查 fails this share of first verifications (返工); the next one passes."""
DOUBLE_SHARE = 0.04
"""A report, action or verdict sent to both instances of the pair at once, as a client whose first try timed out
retries on the other instance while the first is still being served: the pair must still apply it once."""
POLL_S = 0.4


# -- the plan -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedReport:
    index: int
    body: dict[str, Any]
    token_subject: str
    """Whose token sends it: the grid worker, or the operations center's hotline desk."""
    expect: str
    """What the loop should make of it: filed, rejected, merge (if its twin is still open), on_spot."""


def _inside(grid: Grid, rng: random.Random) -> tuple[float, float]:
    lat, lon = grid.random_point(rng, min(grid.north - grid.south, grid.east - grid.west) * 0.05)
    return round(lat, 6), round(lon, 6)


def plan_reports(n: int, seed: int, town: Town = GAOHANG) -> list[PlannedReport]:
    """``n`` reports: most filed and worked, some rejected, some merged into an open twin, some fixed on the spot."""
    rng = random.Random(f"chaos/{seed}")
    grids = list(town.grids.values())
    categories = sorted(town.categories)
    plans: list[PlannedReport] = []
    recent: list[tuple[str, float, float, Grid]] = []
    for i in range(n):
        grid = rng.choice(grids)
        worker = rng.choice(grid.workers)
        lat, lon = _inside(grid, rng)
        category = rng.choice(categories)
        roll = rng.random()
        expect, severity, on_spot = "filed", "normal", False
        if roll < 0.04:
            category, expect = UNKNOWN_CATEGORY, "rejected"
        elif roll < 0.07:
            (lat, lon), expect = OUTSIDE, "rejected"
        elif roll < 0.15 and recent:
            category, lat0, lon0, grid = rng.choice(recent[-20:])
            worker = rng.choice(grid.workers)
            lat, lon, expect = round(lat0 + 0.00005, 6), round(lon0 + 0.00005, 6), "merge"
        elif roll < 0.20:
            on_spot, expect = True, "on_spot"
        elif roll < 0.23:
            severity = "major"
        hotline = not on_spot and rng.random() < 0.15
        body: dict[str, Any] = {
            "category_code": category,
            "lat": lat,
            "lon": lon,
            "address": f"{grid.name_zh} chaos #{i}",
            "description": f"chaos report {i} ({category})",
            "severity": severity,
            "source": "hotline_12345" if hotline else "grid_worker",
            "reporter_id": f"caller-{seed}-{i}" if hotline else worker,
            "client_report_id": f"chaos-{seed}-{i}",
        }
        if on_spot:
            body["handled_on_spot"] = True
            body["evidence_urls"] = [f"https://evidence.example/chaos/{i}.jpg"]
        if expect == "filed" and not on_spot:
            recent.append((category, lat, lon, grid))
        plans.append(PlannedReport(i, body, "ops" if hotline else worker, expect))
    return plans


# -- tokens ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tokens:
    by_subject: dict[str, str]
    """Grid worker id, ``staff@<department>`` or ``ops`` → bearer token."""

    @classmethod
    def issue(cls, var_dir: Path, town: Town = GAOHANG) -> Tokens:
        store = TokenStore(make_engine(f"sqlite:///{var_dir / 'db' / 'auth.sqlite'}"))
        tokens = {w: store.issue(Role.GRID_WORKER, w)[0] for g in town.grids.values() for w in g.workers}
        for d in town.departments:
            tokens[f"staff@{d}"] = store.issue(Role.DEPARTMENT, f"staff@{d}", department=d)[0]
        tokens["ops"] = store.issue(Role.OPS_CENTER, f"duty@{town.ops_center}")[0]
        return cls(tokens)

    def header(self, subject: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.by_subject[subject]}"}


# -- calls that survive restarts -----------------------------------------------------------------------------------


class GaveUp(RuntimeError):
    """No instance of a service gave a final answer within the call's deadline."""


@dataclass(slots=True)
class Stats:
    ok: Counter[str] = field(default_factory=Counter)
    already: Counter[str] = field(default_factory=Counter)
    """409 on an action: it had been applied (a retry after a lost answer) or overtaken."""
    retries: Counter[str] = field(default_factory=Counter)
    """``"<service> <why>"`` → calls tried again (connection refused or dropped, 5xx)."""
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    gave_up: int = 0

    def error(self, action: str, status: int | str, text: str) -> None:
        self.errors[f"{action} {status}"] += 1
        if len(self.samples) < 10:
            self.samples.append(f"{action} → {status}: {text[:240]}")


class Caller:
    """Calls a service through whichever of its instances answers."""

    def __init__(
        self, http: httpx.AsyncClient, urls: Mapping[str, Sequence[str]], tokens: Tokens, stats: Stats
    ) -> None:
        self.http, self.urls, self.tokens, self.stats = http, urls, tokens, stats
        self._turn = 0

    async def call(
        self,
        service: str,
        method: str,
        path: str,
        *,
        who: str,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        patience_s: float = 600.0,
    ) -> httpx.Response:
        urls = self.urls[service]
        self._turn += 1
        start = self._turn
        deadline = time.monotonic() + patience_s
        attempt = 0
        while True:
            url = urls[(start + attempt) % len(urls)]
            why: str
            try:
                response = await self.http.request(
                    method, url + path, headers=self.tokens.header(who), json=json, params=params
                )
            except httpx.TransportError as exc:
                why = type(exc).__name__
            else:
                if response.status_code < 500:
                    return response
                why = str(response.status_code)
                if response.status_code == 500 and len(self.stats.samples) < 10:
                    self.stats.samples.append(f"{service} {method} {path} → 500: {response.text[:200]}")
            self.stats.retries[f"{service} {why}"] += 1
            attempt += 1
            if time.monotonic() > deadline:
                self.stats.gave_up += 1
                raise GaveUp(f"{method} {service}{path}: no answer in {patience_s:.0f} s (last: {why})")
            if attempt % len(urls) == 0:  # every instance refused: wait for one to come back
                await asyncio.sleep(min(2.0, 0.1 * 2 ** min(attempt // len(urls), 5)))

    async def call_both(
        self, service: str, method: str, path: str, *, who: str, json: Any = None
    ) -> list[httpx.Response]:
        """The same request to every instance of the service at the same moment; the answers that came back."""

        async def one(url: str) -> httpx.Response | None:
            try:
                return await self.http.request(method, url + path, headers=self.tokens.header(who), json=json)
            except httpx.TransportError:
                return None

        answers = await asyncio.gather(*(one(url) for url in self.urls[service]))
        self.stats.ok[f"{service} sent to both"] += 1
        return [a for a in answers if a is not None]

    async def submit(
        self, service: str, path: str, *, who: str, json: Any, double: bool
    ) -> tuple[httpx.Response, list[httpx.Response]]:
        """POST once (retried until final), or to both instances at once when ``double``. Returns the answer that
        counts and every 2xx answer (two when both instances said they applied it)."""
        if double and len(self.urls[service]) > 1:
            answers = await self.call_both(service, "POST", path, who=who, json=json)
            applied = [a for a in answers if a.is_success]
            final = [a for a in answers if a.status_code < 500]
            if applied:
                return applied[0], applied
            if final:
                return final[0], []
        response = await self.call(service, "POST", path, who=who, json=json)
        return response, [response] if response.is_success else []


# -- the people ----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Ledger:
    """What the load did and was told."""

    accepted: dict[int, str] = field(default_factory=dict)
    """Planned report index → incident id, for every report answered 202."""
    refused: dict[int, str] = field(default_factory=dict)
    """Reports answered 4xx (none expected)."""
    duplicate_answers: int = 0
    """202s answered ``duplicate``: a retry of a report intake had already taken."""
    submitted: int = 0
    decided: Counter[str] = field(default_factory=Counter)
    acted: Counter[str] = field(default_factory=Counter)
    both_applied: Counter[str] = field(default_factory=Counter)
    """Requests sent to both instances at once that both answered 2xx: applied twice unless one was a no-op."""


class Reporters:
    """Send every planned report, a few at a time, as far as the gate allows."""

    def __init__(
        self,
        plans: Sequence[PlannedReport],
        caller: Caller,
        ledger: Ledger,
        allowed: Callable[[], int],
        seed: int,
        concurrency: int = 6,
    ) -> None:
        self.plans, self.caller, self.ledger, self.allowed = plans, caller, ledger, allowed
        self.seed, self.concurrency = seed, concurrency
        self.next = 0

    async def run(self) -> None:
        await asyncio.gather(*(self._worker() for _ in range(self.concurrency)))

    async def _worker(self) -> None:
        while self.next < len(self.plans):
            if self.next >= self.allowed():
                await asyncio.sleep(0.2)
                continue
            plan = self.plans[self.next]
            self.next += 1
            await self.send(plan)

    async def send(self, plan: PlannedReport) -> None:
        self.ledger.submitted += 1
        double = _chance(self.seed, "double", "report", plan.index) < DOUBLE_SHARE
        response, applied = await self.caller.submit(
            "intake", "/reports", who=plan.token_subject, json=plan.body, double=double
        )
        if response.status_code >= 500:
            response = await self.caller.call("intake", "POST", "/reports", who=plan.token_subject, json=plan.body)
        if sum(1 for a in applied if not a.json().get("duplicate")) > 1:
            self.ledger.both_applied["report"] += 1  # two incidents for one report
        if response.status_code == 202:
            body = response.json()
            self.ledger.accepted[plan.index] = str(body["incident_id"])
            if body.get("duplicate"):
                self.ledger.duplicate_answers += 1
            self.caller.stats.ok["report"] += 1
        else:
            self.ledger.refused[plan.index] = f"{response.status_code} {response.text[:200]}"
            self.caller.stats.error("report", response.status_code, response.text)


def _chance(seed: int, *parts: object) -> float:
    """A stable coin for one decision: the same run (seed) decides the same way, whichever instance answers."""
    digest = hashlib.sha256("/".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _parse(value: Any) -> datetime:
    dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


class _Crew:
    """People who act on the items of a queue, each item by one of them at a time, at most ``parallel`` at once."""

    def __init__(self, caller: Caller, ledger: Ledger, seed: int, parallel: int) -> None:
        self.caller, self.ledger, self.seed = caller, ledger, seed
        self.busy: set[str] = set()
        """Items someone is acting on: never two actions on one item at once (the action discards its key)."""
        self.sem = asyncio.Semaphore(parallel)
        self.tasks: set[asyncio.Task[None]] = set()

    def take(self, key: str, act: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Start ``act()`` on the item ``key`` unless someone is acting on it already."""
        if key in self.busy:
            return
        self.busy.add(key)
        task = asyncio.create_task(act())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def pause(self, stop: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), POLL_S)

    def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()


class Desks(_Crew):
    """Every department's staff: one look at all queues, then each order taken by its own department at once."""

    def __init__(
        self,
        caller: Caller,
        ledger: Ledger,
        seed: int,
        escalate_after_s: float,
        parallel: int = 12,
        town: Town = GAOHANG,
    ) -> None:
        super().__init__(caller, ledger, seed, parallel)
        self.escalate_after_s = escalate_after_s
        self.ops_center = town.ops_center
        """The operations center's code: its desk never sends a work order back (退回)."""

    async def run(self, stop: asyncio.Event) -> None:
        cycle = 0
        while not stop.is_set():
            statuses = ["dispatched", "rework"] + (["accepted"] if cycle % 5 == 0 else [])
            cycle += 1
            for status in statuses:
                for order in await self._queue(status):
                    key = str(order["work_order_id"])
                    self.take(key, functools.partial(self._act, order, key))
            await self.pause(stop)
        self.cancel()

    async def _queue(self, status: str) -> list[dict[str, Any]]:
        return await _all_pages(self.caller, "handling", "/work-orders", {"status": status}, "poll work orders")

    async def _post(self, order: Mapping[str, Any], action: str, body: Mapping[str, Any] | None = None) -> bool:
        """True if the action was applied now or before (409 after a retry); False if refused otherwise."""
        wo, dept = str(order["work_order_id"]), str(order["department_code"])
        double = _chance(self.seed, "double", action, wo, order.get("rework_count")) < DOUBLE_SHARE
        r, applied = await self.caller.submit(
            "handling", f"/work-orders/{wo}/{action}", who=f"staff@{dept}", json=body, double=double
        )
        if len(applied) > 1:
            self.ledger.both_applied[action] += 1
        if r.status_code == 202:
            self.ledger.acted[action] += 1
            return True
        if r.status_code == 409:
            self.caller.stats.already[action] += 1
            return True
        self.caller.stats.error(action, r.status_code, r.text)
        return False

    async def _act(self, order: dict[str, Any], key: str) -> None:
        try:
            async with self.sem:
                await self._work(order)
        except GaveUp as exc:
            self.caller.stats.error("department", "gave up", str(exc))
        finally:
            self.busy.discard(key)

    async def _work(self, order: dict[str, Any]) -> None:
        wo, status = str(order["work_order_id"]), str(order["status"])
        dept = str(order["department_code"])
        if status == "dispatched":
            if (
                int(order.get("attempt") or 1) == 1
                and dept != self.ops_center
                and _chance(self.seed, "return", wo) < RETURN_SHARE
            ):
                await self._post(order, "return", {"reason": "经核实不属于本部门职责范围，请重新派遣"})
                return
            if not await self._post(order, "accept"):
                return
        if _chance(self.seed, "slow", wo, order.get("rework_count")) < SLOW_SHARE:
            deadline = _parse(order["deadline"])
            wait = (deadline - datetime.now(UTC)).total_seconds() + self.escalate_after_s + 1.0
            if 0 < wait < 30:
                self.ledger.acted["late"] += 1
                await asyncio.sleep(wait)
        await self._post(
            order,
            "handle",
            {"result": "已处置，现场恢复", "evidence_urls": [f"https://evidence.example/chaos/{wo}.jpg"]},
        )


class Verifiers(_Crew):
    """The grid workers asked to verify (核查): each pending task is decided by the worker it names."""

    def __init__(self, caller: Caller, ledger: Ledger, seed: int, parallel: int = 8) -> None:
        super().__init__(caller, ledger, seed, parallel)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for task in await self._pending():
                self.take(str(task["verification_id"]), functools.partial(self._decide, task))
            await self.pause(stop)
        self.cancel()

    async def _pending(self) -> list[dict[str, Any]]:
        return await _all_pages(
            self.caller, "verification", "/verifications", {"status": "pending"}, "poll verifications"
        )

    async def _decide(self, task: Mapping[str, Any]) -> None:
        vid = str(task["verification_id"])
        try:
            async with self.sem:
                fail = int(task.get("round") or 1) == 1 and _chance(self.seed, "fail", vid) < FAIL_SHARE
                action = "fail" if fail else "pass"
                body = {"note": "整改不到位，问题仍然存在"} if fail else {"note": "现场核查已整改到位"}
                double = _chance(self.seed, "double", "verify", vid) < DOUBLE_SHARE
                r, applied = await self.caller.submit(
                    "verification",
                    f"/verifications/{vid}/{action}",
                    who=str(task["worker_id"]),
                    json=body,
                    double=double,
                )
                if len(applied) > 1:
                    self.ledger.both_applied[action] += 1
                if r.status_code == 202:
                    self.ledger.decided[action] += 1
                elif r.status_code == 409:
                    self.caller.stats.already[action] += 1
                else:
                    self.caller.stats.error(f"verify {action}", r.status_code, r.text)
        except GaveUp as exc:
            self.caller.stats.error("verify", "gave up", str(exc))
        finally:
            self.busy.discard(vid)


# -- progress: the lifecycle log, followed ------------------------------------------------------------------------


class LifecycleTail(threading.Thread):
    """Follows the lifecycle log from offset 0 and keeps which incidents are terminal (thread-safe reads)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(name="lifecycle-tail", daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self._lock = threading.Lock()
        self._terminal: dict[str, str] = {}
        self._reported: set[str] = set()
        self._positions: dict[int, int] = {}
        self.records = 0
        self.errors = 0
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def terminal_of(self, incident_ids: set[str]) -> int:
        with self._lock:
            return sum(1 for i in incident_ids if i in self._terminal)

    def terminal_count(self) -> int:
        with self._lock:
            return len(self._terminal)

    def open_incidents(self, incident_ids: set[str]) -> set[str]:
        with self._lock:
            return {i for i in incident_ids if i not in self._terminal}

    def run(self) -> None:
        while not self._stop.is_set():
            consumer: KafkaConsumer | None = None
            try:
                consumer = KafkaConsumer(
                    bootstrap_servers=self.bootstrap,
                    client_id="gridloop-chaos-tail",
                    enable_auto_commit=False,
                    request_timeout_ms=10000,
                )
                parts = sorted(consumer.partitions_for_topic(self.topic) or [])
                if not parts:
                    raise RuntimeError("lifecycle topic has no partitions yet")
                tps = [TopicPartition(self.topic, p) for p in parts]
                consumer.assign(tps)
                for tp in tps:
                    consumer.seek(tp, self._positions.get(tp.partition, 0))
                while not self._stop.is_set():
                    for tp, batch in consumer.poll(timeout_ms=300).items():
                        self._take(batch)
                        self._positions[tp.partition] = batch[-1].offset + 1
            except Exception:
                self.errors += 1
                time.sleep(1.0)
            finally:
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        consumer.close()

    def _take(self, batch: Sequence[Any]) -> None:
        with self._lock:
            for record in batch:
                self.records += 1
                try:
                    body = orjson.loads(record.value)
                except orjson.JSONDecodeError:
                    continue
                kind, incident = body.get("type"), body.get("incident_id")
                if kind == "IncidentReported":
                    self._reported.add(incident)
                elif kind in TERMINAL_EVENTS:
                    self._terminal.setdefault(incident, kind)


def read_topic(bootstrap: str, topic: str, timeout_s: float = 120.0) -> list[tuple[int, int, bytes]]:
    """Every record of ``topic`` from offset 0 to its end now, as (partition, offset, value)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="gridloop-chaos-audit", enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out: list[tuple[int, int, bytes]] = []
        remaining = {tp for tp in tps if ends[tp] > 0}
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: could not read to the end within {timeout_s:.0f} s")
            for tp, batch in consumer.poll(timeout_ms=500, max_records=5000).items():
                for record in batch:
                    if record.offset < ends[tp]:
                        out.append((tp.partition, record.offset, bytes(record.value or b"")))
                if consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        return out
    finally:
        consumer.close()


def deadline_after(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


_PAGE = 500


async def _all_pages(
    caller: Caller, service: str, path: str, params: Mapping[str, Any], what: str
) -> list[dict[str, Any]]:
    """Every item of a listing, page by page as the operations center sees it; what was read so far if the
    service gives up or refuses (the next poll tries again)."""
    out: list[dict[str, Any]] = []
    offset = 0
    while True:
        try:
            r = await caller.call(
                service, "GET", path, who="ops", params={**params, "limit": _PAGE, "offset": offset}, patience_s=60
            )
        except GaveUp:
            return out
        if r.status_code != 200:
            caller.stats.error(what, r.status_code, r.text)
            return out
        page = r.json()
        out.extend(page)
        if len(page) < _PAGE:
            return out
        offset += _PAGE
