"""The town's people, as asyncio actors over the services' public HTTP APIs (httpx; never Kafka, never a database).

* ``Reporters`` send the planned reports at a steady rate (POST /reports on intake);
* one ``Department`` per department code polls its queue on handling and accepts (签收) or returns (退回) new work
  orders, sometimes asks for more time (延期), and handles (处置) the work after a delay proportional to its
  deadline — mostly on time, some late, so reminders (催办) and escalations (督办) happen;
* the ``OpsCenter`` (城运中心) grants or refuses extension requests on dispatch;
* the grid workers (网格员) of each grid (``GridStation``) pass or fail the verifications (核查) asked of them
  on verification, failing an incident at most once so the run converges.

Every HTTP answer is tallied: a 409 on an action is "someone else got there first" and only counted; any other
error is counted and shown; a 5xx or a report that could not be sent fails the run.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from schemas.events import Source
from schemas.reference import default_town
from services.intake.models import ReportCreate

from .town import PlannedReport

_TOWN = default_town()
CATEGORIES, DEPARTMENTS, GRIDS, OPS_CENTER = _TOWN.categories, _TOWN.departments, _TOWN.grids, _TOWN.ops_center
"""The default town the simulation runs: its categories, departments, grid cells and operations center."""

# -- behaviour ---------------------------------------------------------------------------------------------------

RETURN_SHARE = 0.08
"""退回: a department sends a new work order back instead of taking it (never the operations center)."""
EXTENSION_SHARE = 0.05
"""延期: a department asks for more time after taking a work order."""
LATE_SHARE = 0.10
"""A department handles the work this many business hours after its deadline: 1–9 (escalation after 6)."""
GRANT_SHARE = 0.80
"""The operations center grants most extension requests, to the deadline asked for."""
FAIL_SHARE = 0.15
"""核查 fails this share of verifications, at most once per incident."""

DEPARTMENT_POLL_S = 0.5
IDLE_POLL_S = 1.0
"""A desk with no open work looks for new work less often."""
POLL_EVERY = {"dispatched": 1, "rework": 2, "accepted": 4}
"""A department looks for new work every poll, for rework every 2nd and at its accepted work every 4th; what it
does itself (accept, handle, return) it tracks on its own, so the services are not asked more than needed."""
VERIFY_MARGIN_S = 2.5
"""Wall-clock seconds a department leaves before its deadline for the grid worker to verify the work."""
OPS_CENTER_POLL_S = 0.5
VERIFIER_POLL_S = 1.0
STALE_S = 8.0
"""An action that changed nothing visible in this many seconds is planned again."""

RETURN_REASONS = (
    "经核实不属于本部门职责范围，请重新派遣",
    "该点位已移交属地居委处理，非本部门管辖",
    "权属单位为区级部门，建议转派",
    "现场信息不全，无法确定责任主体",
)
EXTENSION_REASONS = (
    "需协调产权单位共同处置，申请延期",
    "涉及多部门会商，需延长处置时限",
    "处置所需设备和材料尚未到位",
    "当事人联系不上，需多次上门",
)
REFUSAL_REASONS = (
    "时限内可以完成，不予延期",
    "群众反映强烈，请按原时限处置",
    "理由不充分，请加派人手按时办结",
)
RESULTS: dict[str, tuple[str, ...]] = {
    "garbage": ("已清运暴露垃圾，现场恢复整洁", "已督促物业规范分类投放，现场已整改"),
    "parking": ("已联系车主挪车，并张贴告知单", "已清理乱停放车辆，恢复通行"),
    "appearance": ("已劝离摊贩，现场恢复正常秩序", "已责令商户拆除违规招牌"),
    "violations": ("已下发整改通知书，违法部分已拆除", "已会同居委上门核查，群租已整改"),
    "water": ("已打捞漂浮物并封堵违规排口", "已组织河道保洁，水面恢复清洁"),
    "greenery": ("已补种绿植并修复绿化带", "已扶正树木并加固支撑"),
    "safety": ("已清除易燃物，消防通道已恢复畅通", "已抽排积水，道路恢复通行"),
    "facilities": ("已维修供水设施，公厕恢复正常使用", "已更换门锁并完成保洁"),
    "land": ("已清运渣土并设置围挡", "已拆除私设围挡，地块恢复原状"),
    "community": ("已联系设备维保单位修复，功能恢复正常", "已会同居委完成整改"),
    "housing": ("已组织维修公共部位，渗漏已处理", "已疏通管道，恢复正常排水"),
}
PASS_NOTES = ("现场核查已整改到位", "复核通过，问题已解决", "经现场查看，处置结果属实")
FAIL_NOTES = (
    "现场仍有垃圾未清理干净",
    "整改不到位，问题仍然存在",
    "现场情况与处置照片不符，请重新处置",
    "仅做了临时处理，未彻底解决",
)


STAFF = ("zhang", "wang")
"""Each department's desk is worked by these two; the operations center's duty officer is ``DESK``."""
DESK = f"duty@{OPS_CENTER}"


def staff(department: str, rng: random.Random) -> str:
    """A department's staff member signs as ``name@department``, so timelines show whose work it was."""
    return f"{rng.choice(STAFF)}@{department}"


@dataclass(frozen=True, slots=True)
class Principal:
    """Someone the simulation acts as, who needs a token: role (as the token store names it) and subject."""

    role: str
    subject: str
    department: str | None = None


def principals(reports: Sequence[PlannedReport]) -> list[Principal]:
    """Everyone who calls the services in a run: every grid worker, the sensors that report, the staff of every
    department, and the operations center's duty desk (which also takes the 12345 hotline's calls)."""
    people = [Principal("grid_worker", w) for grid in GRIDS.values() for w in grid.workers]
    sensors = sorted({p.report.reporter_id for p in reports if p.report.source is Source.SENSOR})
    people += [Principal("sensor", s) for s in sensors]
    people += [Principal("department", f"{name}@{d}", d) for d in DEPARTMENTS for name in STAFF]
    people.append(Principal("ops_center", DESK))
    return people


def reporter_subject(report: ReportCreate) -> str:
    """Whose token sends a report: the worker or sensor itself; a hotline call comes through the duty desk."""
    return report.reporter_id if report.source in (Source.GRID_WORKER, Source.SENSOR) else DESK


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_dt(value: Any) -> datetime:
    dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


# -- HTTP, tallied -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    ok: Counter[str] = field(default_factory=Counter)
    conflicts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    """``"<action> <status>"`` → count, every error that is not an expected 409."""
    server_errors: int = 0
    transport_errors: int = 0
    samples: list[str] = field(default_factory=list)
    unsent_reports: int = 0

    def error(self, action: str, status: str, message: str) -> None:
        self.errors[f"{action} {status}"] += 1
        if status.startswith("5"):
            self.server_errors += 1
        if len(self.samples) < 12:
            self.samples.append(f"{action} → {status}: {message[:300]}")

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class Api:
    """One httpx client for every actor, each call made with the caller's own token, every answer tallied."""

    def __init__(self, client: httpx.AsyncClient, tally: Tally, tokens: Mapping[str, str] | None = None) -> None:
        self.client, self.tally = client, tally
        self.tokens: Mapping[str, str] = tokens or {}
        """Subject → bearer token; a subject without one calls without (services that ask for no token)."""

    def headers(self, who: str) -> dict[str, str]:
        token = self.tokens.get(who)
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _send(self, action: str, method: str, url: str, who: str, **kwargs: Any) -> httpx.Response | None:
        """One request; a connection the server dropped (a closed keep-alive, a restart) is tried once more."""
        for attempt in range(2):
            try:
                return await self.client.request(method, url, headers=self.headers(who), **kwargs)
            except httpx.TransportError as exc:
                if attempt == 0:
                    await asyncio.sleep(0.2)
                    continue
                self.tally.transport_errors += 1
                self.tally.error(action, type(exc).__name__, str(exc) or repr(exc))
        return None

    async def get(self, action: str, url: str, params: Mapping[str, Any] | None = None, *, who: str) -> Any:
        """The JSON body of a 200, or None (counted) on any error."""
        response = await self._send(action, "GET", url, who, params=params)
        if response is None:
            return None
        if response.status_code != 200:
            self.tally.error(action, str(response.status_code), response.text)
            return None
        self.tally.ok[action] += 1
        return response.json()

    async def post(
        self, action: str, url: str, body: Mapping[str, object], *, who: str, conflict_ok: bool = True
    ) -> Any:
        """The JSON body of a 2xx; None on a 409 (someone got there first) or on an error (counted).

        A retry after a dropped connection is safe: had the first try been applied, the second gets a 409.
        """
        response = await self._send(action, "POST", url, who, json=body)
        if response is None:
            return None
        if response.status_code == 409 and conflict_ok:
            self.tally.conflicts[action] += 1
            return None
        if not response.is_success:
            self.tally.error(action, str(response.status_code), response.text)
            return None
        self.tally.ok[action] += 1
        return response.json()


# -- the shared picture ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Urls:
    intake: str
    dispatch: str
    handling: str
    verification: str


@dataclass(slots=True)
class World:
    """What the actors share: the plan, the incidents it became, and what the loops have seen."""

    reports: list[PlannedReport]
    urls: Urls
    seed: int
    business_hour_s: float
    """Wall-clock seconds of one business hour under the services' time scale."""
    incident_ids: dict[int, str] = field(default_factory=dict)
    attempted: int = 0
    statuses: dict[str, str] = field(default_factory=dict)
    """Incident id → status, as the progress monitor last saw it."""
    overdue: dict[str, set[str]] = field(default_factory=dict)
    """Department → work order ids the department's queue shows overdue."""
    failed_once: set[str] = field(default_factory=set)
    """Incidents whose verification failed once; they pass the next time."""

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.seed}/{name}")

    @property
    def reporting_done(self) -> bool:
        return self.attempted >= len(self.reports)


# -- reporters ---------------------------------------------------------------------------------------------------


async def report_all(world: World, api: Api, rate: float) -> None:
    """Send every planned report at ``rate`` per second; each one retried while the answer is not final."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: list[asyncio.Task[None]] = []
    for planned in world.reports:
        delay = start + planned.index / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_report(world, api, planned)))
    await asyncio.gather(*tasks)


async def _report(world: World, api: Api, planned: PlannedReport) -> None:
    url = f"{world.urls.intake}/reports"
    body = planned.payload()
    try:
        for attempt in range(5):
            try:
                response = await api.client.post(url, json=body, headers=api.headers(reporter_subject(planned.report)))
            except httpx.HTTPError as exc:
                api.tally.transport_errors += 1
                api.tally.error("report", type(exc).__name__, str(exc) or repr(exc))
            else:
                if response.status_code == 202:
                    api.tally.ok["report"] += 1
                    world.incident_ids[planned.index] = response.json()["incident_id"]
                    return
                api.tally.error("report", str(response.status_code), response.text)
                if response.status_code < 500:
                    break  # the same report would be refused again
            await asyncio.sleep(0.5 * 2**attempt)
        api.tally.unsent_reports += 1
    finally:
        world.attempted += 1


# -- departments -------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Job:
    action: str
    """accept, return, extension, handle — or "" once done, waiting for the order's state to change."""
    due: float
    key: tuple[str, str, str]
    done_at: float = 0.0


def order_key(order: Mapping[str, Any]) -> tuple[str, str, str]:
    return (str(order["status"]), str(order["deadline"]), str(order.get("extension_status", "")))


class Department:
    """A department's desk: polls its queue, takes or returns work, asks for time, handles it."""

    def __init__(self, code: str, world: World, api: Api, clock: Callable[[], float]) -> None:
        self.code, self.world, self.api, self.clock = code, world, api, clock
        self.rng = world.rng(f"department/{code}")
        self.jobs: dict[str, Job] = {}
        self.orders: dict[str, dict[str, Any]] = {}
        """The department's open work as last seen, kept up to date with its own actions."""
        self.wants_extension: dict[str, bool] = {}
        self.late: dict[str, bool] = {}
        self.asked: set[str] = set()
        self.cycle = 0
        self.clerk = f"{STAFF[0]}@{code}"
        """Who looks at the queue."""

    @property
    def url(self) -> str:
        return f"{self.world.urls.handling}/work-orders"

    async def run(self) -> None:
        await asyncio.sleep(self.rng.uniform(0, DEPARTMENT_POLL_S))
        while True:
            await self.step()
            interval = DEPARTMENT_POLL_S if self.orders else IDLE_POLL_S
            await asyncio.sleep(interval * self.rng.uniform(0.8, 1.2))

    async def step(self) -> None:
        """Poll the queue (new work every cycle, rework and accepted work less often), act on what is due."""
        statuses = [status for status, every in POLL_EVERY.items() if self.cycle % every == 0]
        self.cycle += 1
        queues = await asyncio.gather(
            *(
                self.api.get(
                    "poll work orders",
                    self.url,
                    {"department": self.code, "status": status, "limit": 500},
                    who=self.clerk,
                )
                for status in statuses
            )
        )
        for status, queue in zip(statuses, queues, strict=True):
            if queue is None:
                continue
            fresh = {str(o["work_order_id"]): dict(o) for o in queue}
            for gone in [wo for wo, o in self.orders.items() if o["status"] == status and wo not in fresh]:
                del self.orders[gone]
            self.orders.update(fresh)
        for gone in set(self.jobs) - set(self.orders):
            del self.jobs[gone]
        wall = utcnow()
        self.world.overdue[self.code] = {wo for wo, o in self.orders.items() if parse_dt(o["deadline"]) < wall}
        now = self.clock()
        for wo, order in self.orders.items():
            key, job = order_key(order), self.jobs.get(wo)
            if job is None or job.key != key or (not job.action and now - job.done_at > STALE_S):
                self.jobs[wo] = self.plan(order, key, now)
        due = [(wo, job) for wo, job in self.jobs.items() if job.action and job.due <= now]
        await asyncio.gather(*(self.act(wo, job) for wo, job in due))

    def plan(self, order: Mapping[str, Any], key: tuple[str, str, str], now: float) -> Job:
        wo, status, ext = str(order["work_order_id"]), key[0], key[2]
        rng = self.rng
        if status == "dispatched":
            # urgent work is looked at sooner: 2–8 % of the time limit, between 0.1 and 1.5 s
            category = CATEGORIES.get(str(order.get("category_code", "")))
            hours = category.deadline_hours if category else 24.0
            delay = min(1.5, max(0.1, rng.uniform(0.02, 0.08) * hours * self.world.business_hour_s))
            if self.code != OPS_CENTER and rng.random() < RETURN_SHARE:
                return Job("return", now + delay + rng.uniform(0.1, 0.5), key)
            return Job("accept", now + delay, key)
        if wo not in self.wants_extension:
            self.wants_extension[wo] = status == "accepted" and rng.random() < EXTENSION_SHARE
            self.late[wo] = not self.wants_extension[wo] and rng.random() < LATE_SHARE / (1 - EXTENSION_SHARE)
        if self.wants_extension[wo] and wo not in self.asked and ext in ("", "none"):
            return Job("extension", now + rng.uniform(0.3, 1.0), key)
        return Job("handle", self.handle_at(order, now), key)

    def handle_at(self, order: Mapping[str, Any], now: float) -> float:
        """When to report the work done: a share of the time left, or some business hours past the deadline."""
        rng, bh = self.rng, self.world.business_hour_s
        left = (parse_dt(order["deadline"]) - utcnow()).total_seconds()
        wo, status = str(order["work_order_id"]), str(order["status"])
        if self.late.get(wo) and status == "accepted":
            return now + max(left, 0.0) + rng.uniform(1.0, 9.0) * bh
        if order.get("extension_status") == "requested" and order.get("requested_deadline"):
            left = max(left, (parse_dt(order["requested_deadline"]) - utcnow()).total_seconds())
        left -= min(VERIFY_MARGIN_S, left / 4)
        if left <= 1.0:
            return now + rng.uniform(0.2, 1.0)
        share = rng.uniform(0.1, 0.5) if status == "accepted" else rng.uniform(0.1, 0.3)
        return now + max(0.2, share * left)

    async def act(self, wo: str, job: Job) -> None:
        order, rng = self.orders[wo], self.rng
        who = staff(self.code, rng)
        base = {"actor_id": who, "department_code": self.code}
        url = f"{self.url}/{wo}"
        action, job.action, job.done_at = job.action, "", self.clock()
        if action == "accept":
            if await self.api.post("accept", f"{url}/accept", base, who=who) is not None:
                order["status"] = "accepted"
        elif action == "return":
            if await self.api.post("return", f"{url}/return", {**base, "reason": rng.choice(RETURN_REASONS)}, who=who):
                self.orders.pop(wo, None)
        elif action == "extension":
            category = CATEGORIES.get(str(order["category_code"]))
            extra_hours = rng.uniform(0.5, 1.0) * (category.deadline_hours if category else 24.0)
            until = parse_dt(order["deadline"]) + timedelta(seconds=extra_hours * self.world.business_hour_s)
            until = max(until, utcnow() + timedelta(seconds=2))
            self.asked.add(wo)
            ask = {**base, "requested_deadline": until.isoformat(), "reason": rng.choice(EXTENSION_REASONS)}
            if await self.api.post("ask extension", f"{url}/extension", ask, who=who) is not None:
                order |= {"extension_status": "requested", "requested_deadline": until.isoformat()}
            # whatever the answer, the work gets done: plan it now, re-planned when the decision shows
            job.action, job.due = (
                "handle",
                self.handle_at(
                    {**order, "requested_deadline": until.isoformat(), "extension_status": "requested"}, self.clock()
                ),
            )
            job.key = order_key(order)
        elif action == "handle":
            category = CATEGORIES.get(str(order["category_code"]))
            results = RESULTS.get(category.family if category else "", ("已按要求处置完毕",))
            result = rng.choice(results)
            if order["status"] == "rework":
                result = f"返工：已按核查意见重新处置。{result}"
            evidence = [
                f"https://oss.gaohang.example.cn/handled/{wo}-{order.get('rework_count', 0)}-{k}.jpg"
                for k in range(1, rng.randint(1, 3) + 1)
            ]
            done = {**base, "result": result, "evidence_urls": evidence}
            if await self.api.post("handle", f"{url}/handle", done, who=who) is not None:
                self.orders.pop(wo, None)


# -- operations center -------------------------------------------------------------------------------------------


class OpsCenter:
    """城运中心's duty officer: decides every pending extension request after a short look."""

    def __init__(self, world: World, api: Api, clock: Callable[[], float]) -> None:
        self.world, self.api, self.clock = world, api, clock
        self.rng = world.rng("ops-center")
        self.due: dict[str, float] = {}
        self.decided: set[str] = set()

    async def run(self) -> None:
        while True:
            await self.step()
            await asyncio.sleep(OPS_CENTER_POLL_S * self.rng.uniform(0.8, 1.2))

    async def step(self) -> None:
        pending = await self.api.get("poll extensions", f"{self.world.urls.dispatch}/extensions", who=DESK)
        if pending is None:
            return
        now = self.clock()
        for item in pending:
            wo = str(item["work_order_id"])
            if wo not in self.decided and wo not in self.due:
                self.due[wo] = now + self.rng.uniform(0.3, 1.5)
        ready = [wo for wo, at in self.due.items() if at <= now]
        await asyncio.gather(*(self.decide(wo) for wo in ready))

    async def decide(self, wo: str) -> None:
        del self.due[wo]
        self.decided.add(wo)
        body: dict[str, Any] = {"actor_id": DESK}
        if self.rng.random() < GRANT_SHARE:
            body |= {"grant": True, "reason": "同意延期"}
            action = "grant extension"
        else:
            body |= {"grant": False, "reason": self.rng.choice(REFUSAL_REASONS)}
            action = "refuse extension"
        await self.api.post(action, f"{self.world.urls.dispatch}/work-orders/{wo}/extension", body, who=DESK)


# -- grid workers verifying --------------------------------------------------------------------------------------


class GridStation:
    """A grid's workers (网格员) checking the work done in their grid: 核查 pass, or fail with a note (返工).

    The worker the verification was asked of decides it; the grid's queue is looked at once for all its workers.
    """

    def __init__(self, grid_id: str, world: World, api: Api, clock: Callable[[], float]) -> None:
        self.grid_id, self.world, self.api, self.clock = grid_id, world, api, clock
        self.rng = world.rng(f"grid/{grid_id}")
        self.workers = GRIDS[grid_id].workers
        self.due: dict[str, tuple[float, str, str]] = {}
        """Verification id → (when, incident id, worker id)."""
        self.acted: dict[str, float] = {}

    async def run(self) -> None:
        await asyncio.sleep(self.rng.uniform(0, VERIFIER_POLL_S))
        while True:
            await self.step()
            await asyncio.sleep(VERIFIER_POLL_S * self.rng.uniform(0.8, 1.2))

    async def step(self) -> None:
        url = f"{self.world.urls.verification}/verifications"
        params = {"grid_id": self.grid_id, "status": "pending", "limit": 500}
        pending = await self.api.get("poll verifications", url, params, who=self.workers[0])
        if pending is None:
            return
        now = self.clock()
        seen = set()
        for item in pending:
            vid = str(item["verification_id"])
            seen.add(vid)
            if vid not in self.due and now - self.acted.get(vid, -STALE_S) >= STALE_S:
                worker = str(item.get("worker_id") or self.rng.choice(self.workers))
                self.due[vid] = (now + self.rng.uniform(0.2, 1.0), str(item["incident_id"]), worker)
        for vid in set(self.due) - seen:
            del self.due[vid]
        ready = [vid for vid, (at, _, _) in self.due.items() if at <= now]
        await asyncio.gather(*(self.decide(vid) for vid in ready))

    async def decide(self, vid: str) -> None:
        _, incident_id, worker = self.due.pop(vid)
        self.acted[vid] = self.clock()
        url = f"{self.world.urls.verification}/verifications/{vid}"
        if incident_id not in self.world.failed_once and self.rng.random() < FAIL_SHARE:
            self.world.failed_once.add(incident_id)
            note = {"worker_id": worker, "note": self.rng.choice(FAIL_NOTES)}
            await self.api.post("verify fail", f"{url}/fail", note, who=worker)
        else:
            note = {"worker_id": worker, "note": self.rng.choice(PASS_NOTES)}
            await self.api.post("verify pass", f"{url}/pass", note, who=worker)


# -- the whole town ----------------------------------------------------------------------------------------------


def town_actors(world: World, api: Api, clock: Callable[[], float]) -> list[Department | OpsCenter | GridStation]:
    """Every department's desk, the operations center's duty officer and every grid's workers."""
    actors: list[Department | OpsCenter | GridStation] = [Department(c, world, api, clock) for c in DEPARTMENTS]
    actors.append(OpsCenter(world, api, clock))
    actors += [GridStation(grid, world, api, clock) for grid in GRIDS]
    return actors
