"""The load: grid workers reporting at an offered rate, departments and grid workers acting at once, and an
independent reader of the lifecycle topic that times every incident — all over the public HTTP APIs (aiohttp,
pooled connections) and one aiokafka consumer, in one asyncio loop.

* reporters POST /reports on intake at the offered rate (open loop: a slow service does not slow the arrivals);
* one desk per department polls GET /work-orders?department=X&status=dispatched on handling and accepts (签收)
  then handles (处置) the new work orders at once: all a look found in one request each (批量签收, 批量处置), or
  one request per order;
* one grid worker per grid polls GET /verifications?status=pending on verification with their own token and
  passes (核查通过) the new tasks at once, in one request (批量核查) or one per task;
* the lifecycle reader records when each incident's events occurred; an incident is open from its report's 202
  until its IncidentClosed (or IncidentMerged/IncidentRejected) is read.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import orjson

from schemas import GAOHANG, Town
from schemas.reference import Grid

from .stats import TIMED_EVENTS, StepOutcome, stage_latencies_ms

log = logging.getLogger(__name__)

TERMINAL = frozenset({"IncidentClosed", "IncidentMerged", "IncidentRejected"})
HANDLED: dict[str, Any] = {"result": "已处置", "evidence_urls": ["https://evidence.example/after.jpg"]}
"""What a desk reports of each work order it handles."""
"""Categories that go round the loop once with one department (a big one engages several at once)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """What a service answered: status and body."""

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return orjson.loads(self.content)


@dataclass
class Counters:
    requests: int = 0
    errors: int = 0
    conflicts: int = 0
    retries: int = 0
    """Calls repeated after the connection dropped (each counted again as an error only if all attempts fail)."""
    """409s: an action someone (or a repeated poll) already took; expected now and then, not an error."""
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(what[:300])


@dataclass
class Tokens:
    """The tokens the driver acts with: one grid worker reporting and one verifying per grid, every department."""

    reporters: dict[str, tuple[str, str]]
    """grid code → (worker id, token)"""
    verifiers: dict[str, str]
    """grid code → token of another worker of the grid"""
    departments: dict[str, str]


def reporter_and_verifier(grid: Grid) -> tuple[str, str]:
    """The grid's worker who reports the driver's incidents, and the one dispatch asks to verify them: its first
    worker who neither reported nor handled the incident."""
    reporter = grid.workers[0]
    return reporter, next(w for w in grid.workers if w != reporter)


def issue_tokens(auth_database_url: str, town: Town = GAOHANG) -> Tokens:
    from services.common.auth import Role, TokenStore
    from services.common.db import make_engine

    store = TokenStore(make_engine(auth_database_url))
    reporters, verifiers = {}, {}
    for code, grid in town.grids.items():
        reporter, verifier = reporter_and_verifier(grid)
        reporters[code] = (reporter, store.issue(Role.GRID_WORKER, reporter)[0])
        verifiers[code] = store.issue(Role.GRID_WORKER, verifier)[0]
    departments = {d: store.issue(Role.DEPARTMENT, f"bench-{d}", department=d)[0] for d in town.departments}
    return Tokens(reporters, verifiers, departments)


class _Seen:
    """A bounded set of ids already acted on (so a poll answered before an action landed does not repeat it)."""

    def __init__(self, size: int = 200_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self.size = size

    def add(self, key: str) -> bool:
        if key in self._ids:
            return False
        self._ids[key] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return True


@dataclass
class Tracked:
    step: int
    sent: float
    times: dict[str, float] = field(default_factory=dict)


class Driver:
    def __init__(
        self,
        urls: Mapping[str, str],
        tokens: Tokens,
        bootstrap: str,
        lifecycle_topic: str,
        *,
        lifecycle_partitions: int = 6,
        poll_s: float = 0.2,
        idle_poll_s: float = 1.0,
        long_poll_s: float = 10.0,
        batch_actions: bool = True,
        max_in_flight: int = 1000,
        attempts: int = 3,
        seed: int = 7,
        town: Town = GAOHANG,
    ) -> None:
        self.urls = dict(urls)
        self.tokens = tokens
        self.bootstrap = bootstrap
        self.lifecycle_topic = lifecycle_topic
        self.lifecycle_partitions = lifecycle_partitions
        self.poll_s = poll_s
        self.attempts = attempts
        self.idle_poll_s = max(idle_poll_s, poll_s)
        self.long_poll_s = long_poll_s
        self.batch_actions = batch_actions
        """Desks and workers ask the API to hold an empty answer this long (0: they poll, backing off)."""
        self.rng = random.Random(seed)
        self.town = town
        self._small_categories = tuple(c for c in town.categories.values() if not c.big)
        """The categories of the reports: the small ones (a big one engages several departments at once)."""
        self.counters = Counters()
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[Any]] = []
        self._running = False
        self._clients: dict[str, aiohttp.ClientSession] = {}
        self._consumer: Any = None
        self._seen_orders = _Seen()
        self._seen_tasks = _Seen()
        self.step = -1
        self.incidents: dict[str, Tracked] = {}
        """Open incidents: reported (202) and not terminal yet."""
        self.early: dict[str, dict[str, float]] = {}
        """Lifecycle times of incidents whose report's answer has not come back yet."""
        self.latencies: dict[int, dict[str, list[float]]] = {}
        """step → stage → latencies (ms) of the incidents reported in that step."""
        self.closed_at: list[float] = []
        """IncidentClosed.occurred_at of every closure read (epoch seconds)."""
        self.reported: dict[int, int] = {}
        self.terminal_other = 0
        self.lifecycle_records = 0
        self.sequence = 0
        self.reporting = 0
        """Reports sent whose answer has not come back."""

    # -- life ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        # aiohttp, a small pool per service: the driver shares the machine with what it measures, and an httpx
        # pool looks at every pooled connection on each request (grown to hundreds in a burst, it made the
        # driver the bottleneck); long polls hold one connection each
        timeout = aiohttp.ClientTimeout(total=30.0)
        for name in self.urls:
            connector = aiohttp.TCPConnector(limit=48)
            self._clients[name] = aiohttp.ClientSession(connector=connector, timeout=timeout)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            client_id="gridloop-bench-lifecycle",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # the times come from the events themselves: a fetch may wait up to 50 ms to fill, so the reader
            # costs little CPU on the machine it shares with what it measures
            fetch_max_wait_ms=50,
            fetch_min_bytes=256 * 1024,
        )
        await consumer.start()
        parts = [TopicPartition(self.lifecycle_topic, p) for p in range(self.lifecycle_partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        self._consumer = consumer
        self._running = True
        self._loops.append(asyncio.create_task(self._read_lifecycle(), name="lifecycle"))
        for code in self.town.departments:
            self._loops.append(asyncio.create_task(self._department(code), name=f"desk-{code}"))
        for code in self.town.grids:
            self._loops.append(asyncio.create_task(self._verifier(code), name=f"verifier-{code}"))

    async def stop(self) -> None:
        self._running = False
        for task in self._loops:
            task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        for client in self._clients.values():
            await client.close()
        if self._consumer is not None:
            await self._consumer.stop()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def open_count(self) -> int:
        return len(self.incidents)

    # -- HTTP ---------------------------------------------------------------------------------------------

    async def _request(
        self,
        service: str,
        method: str,
        path: str,
        token: str,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
    ) -> Reply:
        headers = {"Authorization": f"Bearer {token}"}
        data = None
        if json is not None:
            data, headers["Content-Type"] = orjson.dumps(json), "application/json"
        query = {k: str(v) for k, v in (params or {}).items()}
        url = self.urls[service] + path
        async with self._clients[service].request(method, url, headers=headers, params=query, data=data) as r:
            return Reply(r.status, await r.read())

    async def _call(
        self, service: str, method: str, path: str, token: str, ok: tuple[int, ...], **kw: Any
    ) -> Reply | None:
        self.counters.requests += 1
        for attempt in range(1, self.attempts + 1):
            try:
                r = await self._request(service, method, path, token, **kw)
                break
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                # a connection the server dropped under load: every call is safe to repeat (a report carries its
                # client_report_id, a repeated action answers 409), so a desk tries again as a person would
                self.counters.retries += 1
                if attempt == self.attempts:
                    self.counters.error(f"{method} {service}{path}: {type(exc).__name__}: {exc}")
                    return None
                await asyncio.sleep(0.2 * attempt)
            except aiohttp.ClientError as exc:
                self.counters.error(f"{method} {service}{path}: {type(exc).__name__}: {exc}")
                return None
        if r.status_code == 409:
            self.counters.conflicts += 1
            # after a dropped connection, 409 most likely means the first attempt took effect: carry on
            return r if attempt > 1 else None
        if r.status_code not in ok:
            self.counters.error(f"{method} {service}{path}: HTTP {r.status_code} {r.text[:200]}")
            return None
        return r

    # -- reporters ----------------------------------------------------------------------------------------

    def _report_body(self) -> tuple[str, dict[str, Any]]:
        grid_code = self.rng.choice(list(self.town.grids))
        grid = self.town.grids[grid_code]
        category = self.rng.choice(self._small_categories)
        self.sequence += 1
        lat, lon = grid.random_point(self.rng, 1e-5)
        body = {
            "category_code": category.code,
            "lat": round(lat, 6),
            "lon": round(lon, 6),
            "description": f"bench {category.code} #{self.sequence}",
            "reporter_id": self.tokens.reporters[grid_code][0],
            "client_report_id": f"bench-{int(time.time())}-{self.sequence}",
        }
        return grid_code, body

    async def _report(self, step: int) -> None:
        try:
            async with self._in_flight:
                grid_code, body = self._report_body()
                sent = time.time()
                r = await self._post_report(grid_code, body)
                if r is None:
                    return
                incident_id = r.json()["incident_id"]
                self.reported[step] = self.reported.get(step, 0) + 1
                tracked = Tracked(step, sent)
                early = self.early.pop(incident_id, None)
                if early:
                    tracked.times.update(early)
                    if any(t in TERMINAL for t in early):
                        self._finish(incident_id, tracked)
                        return
                self.incidents[incident_id] = tracked
        finally:
            self.reporting -= 1

    async def _post_report(self, grid_code: str, body: dict[str, Any]) -> Reply | None:
        token = self.tokens.reporters[grid_code][1]
        self.counters.requests += 1
        try:
            r = await self._request("intake", "POST", "/reports", token, json=body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.counters.error(f"POST intake/reports: {type(exc).__name__}: {exc}")
            return None
        if r.status_code != 202:
            self.counters.error(f"POST intake/reports: HTTP {r.status_code} {r.text[:200]}")
            return None
        return r

    async def offer(self, rate: float, seconds: float, sample: Callable[[float], None] | None = None) -> float:
        """Report at ``rate`` per second for ``seconds``; ``sample(elapsed)`` every half second. Returns the
        actual duration."""
        self.step += 1
        step = self.step
        self.latencies.setdefault(step, {})
        total = max(1, round(rate * seconds))
        started = time.time()
        next_sample = started
        i = 0
        while i < total:
            now = time.time()
            due = min(total, int((now - started) * rate) + 1)
            while i < due:
                self.reporting += 1
                self._spawn(self._report(step))
                i += 1
            if sample is not None and now >= next_sample:
                sample(now - started)
                next_sample += 0.5
            await asyncio.sleep(max(0.0, min(started + i / rate, next_sample) - time.time()))
        await asyncio.sleep(max(0.0, started + total / rate - time.time()))
        if sample is not None:
            sample(time.time() - started)
        return time.time() - started

    async def settle(self, within_s: float, target: int = 0) -> bool:
        """Wait up to ``within_s`` until at most ``target`` incidents are open and no report is in flight."""
        deadline = time.time() + within_s
        while time.time() < deadline:
            if self.open_count <= target and not self.reporting:
                return True
            await asyncio.sleep(0.25)
        return self.open_count <= target

    # -- departments and grid workers ---------------------------------------------------------------------

    async def _department(self, code: str) -> None:
        token = self.tokens.departments[code]
        params: dict[str, Any] = {"department": code, "status": "dispatched", "limit": 50}
        queue = ("handling", "/work-orders", "work_order_id")
        await self._serve(queue, params, token, self._seen_orders, self._work, self._work_many)

    async def _serve(
        self,
        queue: tuple[str, str, str],
        params: dict[str, Any],
        token: str,
        seen: _Seen,
        act: Callable[[str, str], Coroutine[Any, Any, None]],
        act_many: Callable[[list[str], str], Coroutine[Any, Any, None]],
    ) -> None:
        """Look at a queue (service, path, the id field of its items) until the run ends; act on each item not
        seen before, all of one answer in one request (``batch_actions``) or one at a time."""
        service, path, id_field = queue
        if self.long_poll_s:
            params["wait"] = self.long_poll_s
        wait = self.poll_s
        while self._running:
            listed = found = 0
            r = await self._call(service, "GET", path, token, (200,), params=params)
            if r is not None:
                items = orjson.loads(r.content)
                listed = len(items)
                new = [i[id_field] for i in items if seen.add(i[id_field])]
                found = len(new)
                if new and self.batch_actions:
                    self._spawn(act_many(new, token))
                elif new:
                    for item_id in new:
                        self._spawn(act(item_id, token))
            wait = self._next_wait(wait, found, listed, r is None)
            if wait:
                await asyncio.sleep(wait)

    def _next_wait(self, wait: float, found: int, listed: int, failed: bool) -> float:
        """How long to pause before the next look at a queue.

        With long polls, an empty answer means the wait ran out: look again at once. An answer listing work
        already taken in hand (its acceptance still on its way) would come back at once: pause ``poll_s``.
        Without them: back at the shortest interval after a poll that found work; a little longer after each
        empty one, up to ``idle_poll_s`` (a desk with nothing to do looks less often, and costs the services
        less)."""
        if self.long_poll_s:
            return self.poll_s if (listed or failed) else 0.0
        return self.poll_s if found else min(self.idle_poll_s, wait * 1.5)

    async def _work(self, work_order_id: str, token: str) -> None:
        base = f"/work-orders/{work_order_id}"
        if await self._call("handling", "POST", f"{base}/accept", token, (202,)) is None:
            return
        await self._call("handling", "POST", f"{base}/handle", token, (202,), json=HANDLED)

    async def _work_many(self, work_order_ids: list[str], token: str) -> None:
        accepted = await self._call(
            "handling", "POST", "/work-orders/accept", token, (202,), json={"work_order_ids": work_order_ids}
        )
        if accepted is None:
            return
        # an order refused 409 was most likely accepted by an earlier try of this request: handle it too (if it
        # was not, handling refuses it again)
        taken = [o["id"] for o in self._outcomes(accepted) if o["code"] in (None, 409)]
        if taken:
            items = [{"work_order_id": i, **HANDLED} for i in taken]
            r = await self._call("handling", "POST", "/work-orders/handle", token, (202,), json={"items": items})
            if r is not None:
                self._outcomes(r)

    def _outcomes(self, reply: Reply) -> list[dict[str, Any]]:
        """A batch's outcomes; refusals counted as a one-item call's would be (409 a conflict, others errors)."""
        results: list[dict[str, Any]] = reply.json()["results"]
        for outcome in results:
            if outcome["code"] == 409:
                self.counters.conflicts += 1
            elif outcome["code"] is not None:
                self.counters.error(f"{outcome['id']}: {outcome['code']} {outcome['error']}")
        return results

    async def _verifier(self, grid_code: str) -> None:
        token = self.tokens.verifiers[grid_code]
        params: dict[str, Any] = {"status": "pending", "limit": 50}
        queue = ("verification", "/verifications", "verification_id")
        await self._serve(queue, params, token, self._seen_tasks, self._pass, self._pass_many)

    async def _pass(self, verification_id: str, token: str) -> None:
        await self._call(
            "verification", "POST", f"/verifications/{verification_id}/pass", token, (202,), json={"note": "核查通过"}
        )

    async def _pass_many(self, verification_ids: list[str], token: str) -> None:
        body = {"verification_ids": verification_ids, "note": "核查通过"}
        r = await self._call("verification", "POST", "/verifications/pass", token, (202,), json=body)
        if r is not None:
            self._outcomes(r)

    # -- the lifecycle ------------------------------------------------------------------------------------

    async def _read_lifecycle(self) -> None:
        consumer = self._consumer
        while self._running:
            try:
                batches = await consumer.getmany(timeout_ms=100, max_records=5000)
            except Exception:  # the broker went away for a moment: keep reading
                log.exception("lifecycle reader")
                await asyncio.sleep(0.5)
                continue
            for records in batches.values():
                for record in records:
                    self.lifecycle_records += 1
                    self._fold(record.value)

    def _fold(self, value: bytes) -> None:
        try:
            data = orjson.loads(value)
            kind, incident_id = data["type"], data["incident_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if kind not in TIMED_EVENTS and kind not in TERMINAL:
            return
        at = datetime.fromisoformat(data["occurred_at"]).timestamp()
        if kind == "IncidentClosed":
            self.closed_at.append(at)
        tracked = self.incidents.get(incident_id)
        if tracked is None:  # the report's answer is still on its way (or an incident of no step of ours)
            self.early.setdefault(incident_id, {}).setdefault(kind, at)
            return
        tracked.times.setdefault(kind, at)
        if kind in TERMINAL:
            del self.incidents[incident_id]
            self._finish(incident_id, tracked)

    def _finish(self, incident_id: str, tracked: Tracked) -> None:
        if "IncidentClosed" not in tracked.times:
            self.terminal_other += 1
        stages = self.latencies.setdefault(tracked.step, {})
        for name, ms in stage_latencies_ms({"sent": tracked.sent, **tracked.times}).items():
            stages.setdefault(name, []).append(ms)

    # -- a step -------------------------------------------------------------------------------------------

    async def run_step(self, rate: float, seconds: float, warmup_s: float) -> tuple[StepOutcome, float, float]:
        """Offer ``rate`` for ``seconds``; the outcome over the window after ``warmup_s``, and the step's start
        and end (epoch seconds)."""
        before = (self.counters.requests, self.counters.errors)
        samples: list[tuple[float, int]] = []
        started = time.time()

        def sample(elapsed: float) -> None:
            if elapsed >= warmup_s:
                samples.append((elapsed, self.open_count))

        duration = await self.offer(rate, seconds, sample)
        ended = started + duration
        window_start = started + warmup_s
        closed = sum(1 for t in self.closed_at if window_start <= t <= ended)
        outcome = StepOutcome(
            offered_rate=rate,
            duration_s=duration,
            sent=self.reported.get(self.step, 0),
            window_s=max(duration - warmup_s, 1e-6),
            closed_in_window=closed,
            open_samples=samples,
            requests=self.counters.requests - before[0],
            errors=self.counters.errors - before[1],
        )
        return outcome, started, ended


async def end_offsets(bootstrap: str, topics: Mapping[str, int]) -> dict[str, int]:
    """Records in each topic (name → partitions): the sum of its partitions' end offsets."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, client_id="gridloop-bench-offsets")
    await consumer.start()
    try:
        out: dict[str, int] = {}
        for topic, partitions in topics.items():
            offsets = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
            out[topic] = int(sum(offsets.values()))
        return out
    finally:
        await consumer.stop()
