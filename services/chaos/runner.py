"""One chaos run, start to finish: its own broker and services, the load, the kills, the drain and the audit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
import orjson

from schemas.topics import DEADLETTER, LIFECYCLE
from services.common.admin import create_topics
from services.common.settings import LOAD_RATE_LIMITS, REPO_ROOT

from .audit import AuditResult, LogEvent, ServiceState, audit_log, check_states
from .cluster import SERVICE_NAMES, Broker, Fleet, GroupView, Instance, Probe, describe_parts
from .load import (
    Caller,
    Desks,
    Ledger,
    LifecycleTail,
    Reporters,
    Stats,
    Tokens,
    Verifiers,
    plan_reports,
    read_topic,
)

DEFAULT_BASE_PORT = 8410
"""Instance a of the services on 8410–8414, instance b on 8415–8419 (intake, dispatch, handling, verification,
opscenter): clear of the defaults (810x), the end-to-end tests (281xx/282xx) and the demo."""
DEFAULT_KAFKA_PORT = 19392
"""The run's own broker (controller on the next port): killing it disturbs no one else's."""

MARKER = ".gridloop-chaos"
"""The file that marks a var dir as a chaos run's own, so the next run may empty it."""

TABLES: dict[str, tuple[str, ...]] = {
    "intake": ("intake_incident", "intake_transition"),
    "dispatch": ("dispatch_case", "dispatch_work_order"),
    "handling": ("handling_work_order",),
    "verification": ("verification_task",),
    "opscenter": ("ops_incident", "ops_work_order", "ops_daily"),
}
LOG_PATTERNS = {
    "database is locked": re.compile(r"database is locked"),
    "tracebacks": re.compile(r"^Traceback \(most recent call last\)", re.M),
    "dead-lettered": re.compile(r"dead-lettered "),
    "outbox not flushed": re.compile(r"outbox not flushed yet"),
    "crashed (faust)": re.compile(r"\[\^Worker\]: Error|Crashed reason=|CRASHED", re.I),
}


@dataclass
class Options:
    incidents: int = 2000
    seed: int = 1
    pairs: bool = True
    kills_per_service: int = 3
    broker_kills: int = 1
    together: bool = False
    """Kill one instance of every service at the same moment in each round (faster) instead of one at a time."""
    base_port: int = DEFAULT_BASE_PORT
    kafka_port: int = DEFAULT_KAFKA_PORT
    var_dir: Path = REPO_ROOT / "var" / "chaos"
    time_scale: float = 3600.0
    escalate_after_hours: float = 2.0
    session_timeout_s: float = 10.0
    broker_down_s: float = 3.0
    """How long the broker stays dead before it is restarted."""
    start_timeout_s: float = 360.0
    recovery_timeout_s: float = 240.0
    drain_timeout_s: float = 900.0
    gate_margin: float = 0.12
    """How far (share of incidents) reporting may run ahead of the next planned kill."""
    first_kill_at: float = 0.2
    last_kill_at: float = 0.8


@dataclass
class KillRecord:
    target: str
    kind: str
    """``service`` or ``broker``."""
    pid: int
    at_s: float
    progress: float
    down_s: float = 0.0
    takeover_s: float | None = None
    moved: str = ""
    health_s: float | None = None
    rejoin_s: float | None = None
    recovery_s: float | None = None
    note: str = ""


@dataclass
class RunResult:
    audit: AuditResult
    kills: list[KillRecord]
    states: dict[str, list[str]]
    failures: list[str]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_recovery_s(self) -> float:
        values = [k.recovery_s for k in self.kills if k.recovery_s is not None]
        return round(max(values), 1) if values else 0.0

    def json_line(self) -> str:
        return orjson.dumps(
            {
                "incidents": self.audit.incidents,
                "terminal": self.audit.terminal,
                "lost": len(self.audit.lost),
                "duplicate_transitions": self.audit.duplicate_transitions,
                "kills": len(self.kills),
                "max_recovery_s": self.max_recovery_s,
            }
        ).decode()

    @property
    def ok(self) -> bool:
        return not self.audit.lost and not self.audit.duplicate_transitions and not self.failures


class Chaos:
    def __init__(self, options: Options, out: TextIO) -> None:
        self.o = options
        self.out = out
        self.t0 = time.monotonic()
        self.var = options.var_dir.resolve()
        self.ns = f"chaos{time.strftime('%H%M%S')}{uuid.uuid4().hex[:4]}"
        self.kills: list[KillRecord] = []
        self.failures: list[str] = []
        self.events: list[str] = []
        self.ledger = Ledger()
        self.stats = Stats()
        self.broker: Broker
        self.fleet: Fleet
        self.tail: LifecycleTail
        self.accepted_ids: set[str] = set()
        self.rounds_started = 0
        self.points: list[float] = []

    def leave_nothing_behind(self) -> None:
        """Kill whatever of the run is still running (after an interruption); a no-op after a normal end."""
        fleet: Fleet | None = getattr(self, "fleet", None)
        if fleet is not None:
            for inst in fleet.instances:
                if inst.exited() is None:
                    with contextlib.suppress(Exception):
                        inst.kill()
        broker: Broker | None = getattr(self, "broker", None)
        if broker is not None and broker.pid() is not None:
            with contextlib.suppress(Exception):
                broker.down()

    # -- output -------------------------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        self.out.write(f"[{self.elapsed():6.1f}s] {text}\n")
        self.out.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # -- progress -----------------------------------------------------------------------------------------------

    def terminal(self) -> int:
        self.accepted_ids = set(self.ledger.accepted.values())
        return self.tail.terminal_of(self.accepted_ids)

    def progress(self) -> float:
        return self.terminal() / self.o.incidents

    def allowed_reports(self) -> int:
        """Reports may run ``gate_margin`` ahead of the next round of kills, so each round finds load in flight."""
        if self.rounds_started >= len(self.points):
            return self.o.incidents
        point = self.points[self.rounds_started]
        return min(self.o.incidents, int(self.o.incidents * (point + self.o.gate_margin)) + 1)

    # -- setting up ----------------------------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Empty the var dir — only one an earlier chaos run made (it carries a marker): never someone's var/."""
        if self.var.exists() and any(self.var.iterdir()):
            if not (self.var / MARKER).exists():
                raise RuntimeError(f"{self.var} is not empty and was not made by a chaos run; choose another --var-dir")
            # a broker left over from an earlier run of this var dir goes first
            with (self.var / "broker-script.log").open("a") as log_file:
                Broker(self.var, self.o.kafka_port, log_file).down()
            shutil.rmtree(self.var)
        self.var.mkdir(parents=True, exist_ok=True)
        (self.var / MARKER).write_text("made by python -m services.chaos run; emptied by the next run\n")
        os.environ["GRIDLOOP_TOPIC_NAMESPACE"] = self.ns
        os.environ["GRIDLOOP_KAFKA_BOOTSTRAP"] = f"127.0.0.1:{self.o.kafka_port}"

    def _service_env(self) -> dict[str, str]:
        session = self.o.session_timeout_s
        return {
            "GRIDLOOP_KAFKA_BOOTSTRAP": f"127.0.0.1:{self.o.kafka_port}",
            "GRIDLOOP_TOPIC_NAMESPACE": self.ns,
            "GRIDLOOP_VAR_DIR": str(self.var),
            "GRIDLOOP_LOG_LEVEL": "warning",
            "GRIDLOOP_TIME_SCALE": str(self.o.time_scale),
            "GRIDLOOP_DISPATCH_ESCALATE_AFTER_HOURS": str(self.o.escalate_after_hours),
            **LOAD_RATE_LIMITS,
            # faust reads these from the environment: a member that stops heartbeating (SIGKILL) is out of its
            # group after `session` seconds, so the other instance of the pair takes its partitions soon
            "BROKER_SESSION_TIMEOUT": str(session),
            "BROKER_HEARTBEAT_INTERVAL": str(max(0.5, session / 10)),
            "BROKER_REBALANCE_TIMEOUT": str(max(30.0, session * 3)),
        }

    async def _groups_ready(self, within_s: float, what: str) -> None:
        probe = Probe(self.broker.bootstrap)
        holders = 2 if self.o.pairs else 1
        deadline = time.monotonic() + within_s
        try:
            pending = list(SERVICE_NAMES)
            while pending:
                for service in list(pending):
                    with contextlib.suppress(Exception):
                        g = await asyncio.to_thread(probe.group, service)
                        full = await asyncio.to_thread(probe.all_partitions, service)
                        if g.state == "Stable" and g.assigned() >= full and g.holders() >= holders:
                            pending.remove(service)
                if pending and time.monotonic() > deadline:
                    raise TimeoutError(f"{what}: consumer groups not settled after {within_s:.0f} s: {pending}")
                if pending:
                    await asyncio.sleep(0.5)
        finally:
            probe.close()

    # -- kills --------------------------------------------------------------------------------------------------

    def _plan_waves(self) -> list[list[str]]:
        """Rounds of kills: a service round kills one instance of each service, a broker round the broker."""
        rounds: list[list[str]] = []
        for r in range(self.o.kills_per_service):
            tag = ("a" if r % 2 == 0 else "b") if self.o.pairs else ""
            labels = [f"{s}-{tag}" if tag else s for s in SERVICE_NAMES]
            if self.o.together:
                rounds.append(labels)
            else:
                rounds.extend([label] for label in labels)
        n = len(rounds) + self.o.broker_kills
        spots = [round((k + 1) * (len(rounds) + 1) / (self.o.broker_kills + 1)) - 1 for k in range(self.o.broker_kills)]
        for i, spot in enumerate(spots):
            rounds.insert(min(spot + i, len(rounds)), ["broker"])
        lo, hi = self.o.first_kill_at, self.o.last_kill_at
        self.points = [lo + (hi - lo) * k / (n - 1) if n > 1 else lo for k in range(n)]
        return rounds

    async def _wait_progress(self, point: float) -> None:
        last, last_change = -1, time.monotonic()
        while self.progress() < point:
            now = self.terminal()
            if now != last:
                last, last_change = now, time.monotonic()
            if time.monotonic() - last_change > self.o.recovery_timeout_s + 120:
                raise RuntimeError(f"no progress for {time.monotonic() - last_change:.0f} s at {now} terminal")
            await asyncio.sleep(0.3)

    async def _kill_plan(self) -> None:
        rounds = self._plan_waves()
        self.say(
            f"kill plan: {sum(len(r) for r in rounds)} kills in {len(rounds)} rounds at progress "
            + ", ".join(f"{p:.0%}" for p in self.points)
        )
        for point, labels in zip(self.points, rounds, strict=True):
            await self._wait_progress(point)
            self.rounds_started += 1  # the load goes on while this round's kills recover
            if labels == ["broker"]:
                await self._kill_broker()
            else:
                await asyncio.gather(*(self._kill_instance(self.fleet.get(label)) for label in labels))

    async def _kill_instance(self, inst: Instance) -> KillRecord:
        service = inst.service
        probe = Probe(self.broker.bootstrap)
        try:
            before: GroupView | None = None
            with contextlib.suppress(Exception):
                before = await asyncio.to_thread(probe.group, service)
            held = before.held_by_port(inst.port) if before else frozenset()
            record = KillRecord(inst.label, "service", 0, self.elapsed(), self.progress())
            t_kill = time.monotonic()
            record.pid = await asyncio.to_thread(inst.kill)
            self.kills.append(record)
            self.say(
                f"SIGKILL {inst.label} (pid {record.pid}) at {record.progress:.0%}; it held {describe_parts(held)}"
            )
            survivors = [i for i in self.fleet.of(service) if i is not inst]
            if survivors:
                survivor = survivors[0]
                deadline = t_kill + self.o.session_timeout_s * 2 + 60
                while time.monotonic() < deadline:
                    with contextlib.suppress(Exception):
                        g = await asyncio.to_thread(probe.group, service)
                        full = await asyncio.to_thread(probe.all_partitions, service)
                        if (
                            g.state == "Stable"
                            and inst.port not in g.ports.values()
                            and g.held_by_port(survivor.port) >= full
                        ):
                            record.takeover_s = time.monotonic() - t_kill
                            record.moved = f"{describe_parts(held)} → {survivor.label}"
                            self.say(
                                f"  {survivor.label} took over {describe_parts(held)} after {record.takeover_s:.1f} s"
                                f" (now holds {describe_parts(g.held_by_port(survivor.port))})"
                            )
                            break
                    await asyncio.sleep(0.5)
                else:
                    self.fail(inst.label, record, "survivor did not take the partitions over")
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t_kill)))
            record.down_s = time.monotonic() - t_kill
            t_restart = time.monotonic()
            await asyncio.to_thread(inst.start)
            await self._recover(inst, record, probe, t_restart, before.lag if before else None)
            return record
        finally:
            probe.close()

    def fail(self, who: str, record: KillRecord, note: str) -> None:
        """A kill whose aftermath went wrong: the note on its record, and a failure of the run."""
        record.note = note
        self.failures.append(f"{who}: {note}")

    async def _recover(
        self, inst: Instance, record: KillRecord, probe: Probe, t_restart: float, lag_before: int | None
    ) -> None:
        deadline = t_restart + self.o.recovery_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if await asyncio.to_thread(inst.healthy, client):
                    record.health_s = time.monotonic() - t_restart
                    break
                await asyncio.sleep(0.3)
        if record.health_s is None:
            self.fail(inst.label, record, f"/health did not answer within {self.o.recovery_timeout_s:.0f} s")
            return
        progress_at_health = self.terminal()
        slack = max(20, lag_before or 0)
        last_lag: int | None = None
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                g = await asyncio.to_thread(probe.group, inst.service)
                full = await asyncio.to_thread(probe.all_partitions, inst.service)
                last_lag = g.lag
                back = g.state == "Stable" and g.assigned() >= full
                if self.o.pairs:
                    back = back and bool(g.held_by_port(inst.port))
                if back and record.rejoin_s is None:
                    record.rejoin_s = time.monotonic() - t_restart
                drained = g.lag is not None and g.lag <= slack
                if back and (drained or self.terminal() > progress_at_health):
                    record.recovery_s = time.monotonic() - t_restart
                    break
            await asyncio.sleep(0.5)
        if record.recovery_s is None:
            self.fail(inst.label, record, f"not recovered within {self.o.recovery_timeout_s:.0f} s (lag {last_lag})")
        self.say(
            f"  {inst.label} restarted: /health after {record.health_s:.1f} s, back in its group after "
            f"{_s(record.rejoin_s)}, recovered after {_s(record.recovery_s)}"
        )

    async def _kill_broker(self) -> None:
        record = KillRecord("broker", "broker", 0, self.elapsed(), self.progress())
        t_kill = time.monotonic()
        record.pid = await asyncio.to_thread(self.broker.kill)
        self.kills.append(record)
        self.say(f"SIGKILL broker (pid {record.pid}) at {record.progress:.0%}; down for {self.o.broker_down_s:.0f} s")
        await asyncio.sleep(self.o.broker_down_s)
        record.down_s = time.monotonic() - t_kill
        t_restart = time.monotonic()
        await asyncio.to_thread(self.broker.up)
        record.health_s = time.monotonic() - t_restart
        self.say(f"  broker back after {record.health_s:.1f} s")
        progress_at_ready = self.terminal()
        deadline = t_restart + self.o.recovery_timeout_s
        probe = Probe(self.broker.bootstrap)
        holders = 2 if self.o.pairs else 1
        pending: dict[str, str] = dict.fromkeys(SERVICE_NAMES, "?")
        try:
            while time.monotonic() < deadline and pending:
                for service in list(pending):
                    try:
                        g = await asyncio.to_thread(probe.group, service)
                        full = await asyncio.to_thread(probe.all_partitions, service)
                    except Exception as exc:
                        pending[service] = type(exc).__name__
                        continue
                    settled = g.state == "Stable" and g.assigned() >= full and g.holders() >= holders
                    drained = g.lag is not None and g.lag <= 20
                    if settled and (drained or self.terminal() > progress_at_ready):
                        del pending[service]
                    else:
                        pending[service] = f"{g.state}, {g.holders()} holders, lag {g.lag}"
                if pending:
                    await asyncio.sleep(0.5)
        finally:
            probe.close()
        if pending:
            self.fail("broker", record, "not recovered: " + "; ".join(f"{s}: {why}" for s, why in pending.items()))
        else:
            record.recovery_s = time.monotonic() - t_restart
        self.say(f"  every consumer group working again after {_s(record.recovery_s)} {record.note}")

    # -- keeping everyone up ---------------------------------------------------------------------------------------

    async def _supervise(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for inst in await asyncio.to_thread(self.fleet.revive_crashed):
                rc = inst.unexpected_exits[-1][1]
                line = f"{inst.label} exited by itself (code {rc}); restarted"
                self.events.append(f"{self.elapsed():.0f}s {line}")
                self.say(line)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def _report_progress(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 15.0)
            self.say(
                f"progress: {len(self.ledger.accepted)} reported, {self.terminal()} terminal "
                f"({self.progress():.0%}), {self.tail.records} log records"
            )

    # -- the run ------------------------------------------------------------------------------------------------

    async def run(self) -> RunResult:
        o = self.o
        await asyncio.to_thread(self._prepare)
        broker_log = (self.var / "broker-script.log").open("a")
        self.broker = Broker(self.var, o.kafka_port, broker_log)
        self.say(f"namespace {self.ns}, var dir {self.var}; starting the chaos broker on {self.broker.bootstrap}")
        tokens = await asyncio.to_thread(Tokens.issue, self.var)
        self.fleet = Fleet(self._service_env(), self.var / "logs", o.base_port, o.pairs)
        self.fleet.check_ports()
        actors_stop = asyncio.Event()
        try:
            # the services start while the broker does: they wait for it and for the topics on their own
            broker_up = asyncio.create_task(asyncio.to_thread(self.broker.up))
            self.say(
                f"starting {len(self.fleet.instances)} service processes: "
                + ", ".join(f"{i.label}:{i.port}" for i in self.fleet.instances)
            )
            await asyncio.to_thread(self.fleet.start_all)
            await broker_up
            await asyncio.to_thread(create_topics, self.broker.bootstrap)
            self.say("broker up, topics created")
            await asyncio.to_thread(self.fleet.wait_healthy, o.start_timeout_s)
            await self._groups_ready(120, "start")
            self.say("every service is up and its consumer group settled")
            return await self._drive(tokens, actors_stop)
        finally:
            actors_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.fleet.stop_all)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.broker.down)
            broker_log.close()

    async def _drive(self, tokens: Tokens, actors_stop: asyncio.Event) -> RunResult:
        o = self.o
        self.tail = LifecycleTail(self.broker.bootstrap, LIFECYCLE.name)
        self.tail.start()
        plans = plan_reports(o.incidents, o.seed)
        urls = {s: self.fleet.urls(s) for s in SERVICE_NAMES}
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        timeout = httpx.Timeout(60.0, connect=5.0)
        supervise_stop = asyncio.Event()
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
            caller = Caller(http, urls, tokens, self.stats)
            reporters = Reporters(plans, caller, self.ledger, self.allowed_reports, o.seed)
            desks = Desks(caller, self.ledger, o.seed, o.escalate_after_hours * 3600 / o.time_scale)
            verifiers = Verifiers(caller, self.ledger, o.seed)
            background = [
                asyncio.create_task(desks.run(actors_stop)),
                asyncio.create_task(verifiers.run(actors_stop)),
                asyncio.create_task(self._supervise(supervise_stop)),
                asyncio.create_task(self._report_progress(actors_stop)),
            ]
            t_load = time.monotonic()
            try:
                report_task = asyncio.create_task(reporters.run())
                await _first_failure([report_task, asyncio.create_task(self._kill_plan())])
                self.say(f"all {len(self.ledger.accepted)} reports accepted and {len(self.kills)} kills done; draining")
                await self._drain()
                self.say(f"load and drain took {time.monotonic() - t_load:.0f} s")
                await self._quiesce()
            finally:
                actors_stop.set()
                await asyncio.gather(*background[:2], return_exceptions=True)
                supervise_stop.set()
                await asyncio.gather(*background[2:], return_exceptions=True)
        self.say("stopping the services (SIGTERM) to read their databases")
        await asyncio.to_thread(self.fleet.stop_all)
        self.tail.stop()
        return await asyncio.to_thread(self._audit)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.o.drain_timeout_s
        while time.monotonic() < deadline:
            if self.terminal() >= len(self.ledger.accepted):
                self.say(f"drained: every one of {len(self.ledger.accepted)} incidents is terminal")
                return
            await asyncio.sleep(0.5)
        left = self.tail.open_incidents(set(self.ledger.accepted.values()))
        self.failures.append(f"{len(left)} incidents not terminal after {self.o.drain_timeout_s:.0f} s of draining")
        self.say(f"drain timed out: {len(left)} incidents still open (e.g. {sorted(left)[:5]})")

    async def _quiesce(self, within_s: float = 120.0) -> None:
        """Let every consumer catch up with the log and every outbox empty before the services stop."""
        probe = Probe(self.broker.bootstrap)
        deadline = time.monotonic() + within_s
        try:
            while time.monotonic() < deadline:
                lags: dict[str, int | None] = {}
                for service in SERVICE_NAMES:
                    try:
                        lags[service] = (await asyncio.to_thread(probe.group, service)).lag
                    except Exception:
                        lags[service] = None
                pending = await asyncio.to_thread(self._outbox_pending)
                if all(v == 0 for v in lags.values()) and pending == 0:
                    self.say("every consumer group caught up, every outbox empty")
                    return
                await asyncio.sleep(1.0)
            self.say(f"not quiet after {within_s:.0f} s: lags {lags}, outbox rows pending {pending}")
        finally:
            probe.close()

    def _db(self, service: str) -> Path:
        return self.var / "db" / f"{service}.sqlite"

    def _outbox_pending(self) -> int:
        total = 0
        for service in SERVICE_NAMES:
            with contextlib.closing(sqlite3.connect(f"file:{self._db(service)}?mode=ro", uri=True, timeout=30)) as c:
                total += c.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()[0]
        return total

    def _read_state(self, service: str) -> ServiceState:
        with contextlib.closing(sqlite3.connect(f"file:{self._db(service)}?mode=ro", uri=True, timeout=30)) as c:
            c.row_factory = sqlite3.Row
            processed = {r[0] for r in c.execute("SELECT event_id FROM processed_event")}
            outbox = [(r[0], r[1] is not None) for r in c.execute("SELECT event_id, published_at FROM outbox")]
            tables = {t: [dict(r) for r in c.execute(f"SELECT * FROM {t}")] for t in TABLES[service]}
        return ServiceState(processed, outbox, tables)

    def _audit(self) -> RunResult:
        self.say("auditing: the whole lifecycle log from offset 0, the dead-letter topic, every database")
        raw = read_topic(self.broker.bootstrap, LIFECYCLE.name)
        records = [LogEvent.decode(value, partition, offset) for partition, offset, value in raw]
        dead = read_topic(self.broker.bootstrap, DEADLETTER.name)
        result = audit_log(records, self.ledger.accepted.values())
        states = check_states(records, {s: self._read_state(s) for s in SERVICE_NAMES})
        failures = list(self.failures)
        if self.ledger.refused:
            failures.append(f"{len(self.ledger.refused)} reports refused")
        if len(self.ledger.accepted) < self.o.incidents:
            failures.append(f"only {len(self.ledger.accepted)} of {self.o.incidents} reports were accepted")
        if self.stats.gave_up:
            failures.append(f"{self.stats.gave_up} calls found no instance answering")
        if result.conflicting_redeliveries:
            failures.append(f"{len(result.conflicting_redeliveries)} event ids carried different contents")
        for service, problems in states.items():
            failures.extend(f"{service}: {p}" for p in problems)
        if dead:
            failures.append(f"{len(dead)} dead letters")
        run = RunResult(result, self.kills, states, failures, self.elapsed())
        run.extra["dead_letters"] = [orjson.loads(v).get("reason", "?") for _, _, v in dead[:5]]
        run.extra["dead_letter_count"] = len(dead)
        run.extra["log_findings"] = self._scan_logs()
        return run

    def _scan_logs(self) -> dict[str, Counter[str]]:
        found: dict[str, Counter[str]] = {}
        for inst in self.fleet.instances:
            try:
                text = inst.log_path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            for name, pattern in LOG_PATTERNS.items():
                n = len(pattern.findall(text))
                if n:
                    found.setdefault(name, Counter())[inst.label] += n
        return found

    # -- the summary ----------------------------------------------------------------------------------------------

    def summary(self, run: RunResult) -> list[str]:
        a = run.audit
        o = self.o
        lines = [
            "",
            f"chaos run: {o.incidents} incidents, {'pairs' if o.pairs else 'one instance'} per service, "
            f"seed {o.seed}, namespace {self.ns}, {run.seconds:.0f} s",
            f"load: {len(self.ledger.accepted)} reports accepted ({self.ledger.duplicate_answers} retries answered "
            f"as already taken), {len(self.ledger.refused)} refused; department actions {dict(self.ledger.acted)}; "
            f"verifications {dict(self.ledger.decided)}",
            f"  sent to both instances at once: {sum(v for k, v in self.stats.ok.items() if 'both' in k)}; "
            f"applied by both: {dict(self.ledger.both_applied) or 0}",
            f"  retried calls: {dict(self.stats.retries.most_common())}",
            f"  409 already done: {dict(self.stats.already)}; errors: {dict(self.stats.errors)}",
        ]
        lines += [f"    {s}" for s in self.stats.samples[:6]]
        lines.append(
            f"kills: {len(run.kills)} (takeover = the other instance holds every partition; "
            "recovery = restart → /health and lag drained or progress resumed)"
        )
        lines.append(
            f"  {'#':>2} {'at':>6} {'prog':>5} {'target':<15} {'takeover':>8} {'health':>7} {'rejoin':>7} "
            f"{'recovery':>8}  partitions moved"
        )
        for n, k in enumerate(run.kills, 1):
            lines.append(
                f"  {n:>2} {k.at_s:>5.0f}s {k.progress:>5.0%} {k.target:<15} {_s(k.takeover_s):>8} "
                f"{_s(k.health_s):>7} {_s(k.rejoin_s):>7} {_s(k.recovery_s):>8}  {k.moved or k.note}"
            )
        lines += [f"  {e}" for e in self.events]
        outcomes = ", ".join(f"{t.removeprefix('Incident').lower()} {n}" for t, n in sorted(a.terminal_by_type.items()))
        lines += [
            f"log: {a.records} records, {a.events} distinct events; redeliveries {a.redeliveries} "
            f"({a.redelivered_events} events published more than once; consumers dedupe them)",
            f"  by type: {dict(sorted(a.by_type.items()))}",
            f"outcome: {a.terminal} of {a.incidents} incidents terminal ({outcomes})",
            f"lost: {len(a.lost)} (missing from the log {len(a.missing_from_log)}, not terminal {len(a.not_terminal)})"
            + (f" e.g. {a.lost[:5]}" if a.lost else ""),
            f"duplicate transitions: {a.duplicate_transitions}",
        ]
        lines += [f"  {d.describe()}" for d in a.duplicates[:10]]
        for service, problems in run.states.items():
            lines.append(f"state of {service}: {'agrees with the log' if not problems else '; '.join(problems)}")
        lines.append(f"dead letters: {run.extra.get('dead_letter_count', 0)} {run.extra.get('dead_letters') or ''}")
        findings = run.extra.get("log_findings") or {}
        for name, per in findings.items():
            lines.append(f"service logs, {name}: {dict(per)}")
        if a.unexpected_incidents:
            lines.append(f"incidents on the log no report was answered for: {len(a.unexpected_incidents)}")
        reasons = list(run.failures)
        if a.lost:
            reasons.insert(0, f"{len(a.lost)} incidents lost")
        if a.duplicate_transitions:
            reasons.insert(0, f"{a.duplicate_transitions} duplicate transitions")
        lines.append("result: " + ("OK" if run.ok else "FAILED: " + "; ".join(reasons[:12])))
        return lines


def _s(value: float | None) -> str:
    return f"{value:.1f}s" if value is not None else "-"


async def _first_failure(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Wait for every task; the first to fail cancels the rest and its error is raised."""
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


def run_chaos(options: Options, out: TextIO) -> tuple[RunResult | None, str]:
    """Run; returns the result (None if the run could not finish) and the JSON line.

    SIGTERM (a timeout, a CI runner giving up) ends the run like Ctrl-C: the services and the broker it started
    are stopped, not left behind in sessions of their own."""
    for name in ("kafka", "aiokafka", "httpx"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    chaos = Chaos(options, out)

    def _terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = asyncio.run(chaos.run())
    except Exception as exc:
        out.write(f"chaos run failed: {type(exc).__name__}: {exc}\n")
        line = orjson.dumps(
            {
                "incidents": len(chaos.ledger.accepted),
                "terminal": 0,
                "lost": -1,
                "duplicate_transitions": -1,
                "kills": len(chaos.kills),
                "max_recovery_s": 0.0,
            }
        ).decode()
        return None, line
    finally:
        signal.signal(signal.SIGTERM, previous)
        chaos.leave_nothing_behind()
    for line in chaos.summary(result):
        out.write(line + "\n")
    return result, result.json_line()


__all__ = ["Options", "RunResult", "run_chaos"]
