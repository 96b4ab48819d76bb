"""Running a benchmark: a fresh namespace and var dir, the services in the background, the raw measurement,
the ramp of offered rates, the half-rate latency step, hop counting, and the results on disk."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil  # type: ignore[import-untyped]

from schemas.topics import CATALOG, LIFECYCLE
from services.common.settings import LOAD_RATE_LIMITS, REPO_ROOT
from services.supervisor import Service, ServiceGroup, check_addresses, select_services

from . import stats
from .driver import Driver, Tokens, end_offsets, issue_tokens
from .monitor import Monitor, broker_pid
from .raw import RAW_TOPIC_SUFFIX, RawResult, measure_raw

_T = TypeVar("_T")

DEFAULT_BASE_PORT = 24100
"""intake on base+1, handling +2, verification +3, opscenter +4, dispatch +5: apart from 810x and the tests'
281xx–283xx, and below Linux's ephemeral range (32768–60999), where an outgoing connection may hold a port and a
service then cannot listen on it."""
RAW_WARMUP_S = 10.0
"""Produced and consumed before the raw limit is measured, on a topic of its own."""
PORT_OFFSETS = {"intake": 1, "handling": 2, "verification": 3, "opscenter": 4, "dispatch": 5}
SERVICE_NAMES = frozenset(PORT_OFFSETS)
DEFAULT_RATES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)


@dataclass
class Options:
    rates: tuple[float, ...] = DEFAULT_RATES
    step_s: float = 60.0
    warmup_s: float | None = None
    """Seconds at the start of a step left out of the measurement; default a quarter of the step, at most 10."""
    refine: int = 3
    """Bisections between the highest sustained and the lowest failed rate: with the doubling ladder, three find
    the rate within an eighth of the failed step (16/s between 128 and 256; two could only answer 128, 160, 192
    or 224)."""
    raw_s: float = 15.0
    raw_count: int = 0
    half_step: bool = True
    """Run a last step at half the maximum rate for the latency figures."""
    settle_s: float = 60.0
    """How long to wait between steps for the backlog to drain."""
    poll_s: float = 0.2
    """How often a desk or grid worker with work looks at its queue…"""
    idle_poll_s: float = 1.0
    """…and how often at most when the last looks found nothing (without long polls)."""
    long_poll_s: float = 10.0
    """How long the API holds a desk's or worker's empty answer until work comes (0: plain polling)."""
    batch_actions: bool = True
    """Desks accept and handle, and grid workers pass, what one look at their queue found in one request each
    (批量签收/处置/核查); False: one request per work order or task."""
    base_port: int = DEFAULT_BASE_PORT
    bootstrap: str = "127.0.0.1:9092"
    out_root: Path = REPO_ROOT / "var" / "bench"
    profile: tuple[str, ...] = ()
    """Services to run under pyinstrument (HTML and text reports in the run directory)."""
    keep_db: bool = False
    keep_topics: bool = False
    """Leave the run's topics on the broker (deleted by default: a broker keeping every run's grows without end)."""
    warmup_offer_s: float = 5.0
    """A first, unmeasured burst of reports at the lowest rate (connections, caches, consumers settle)."""
    overlap_startup: bool = False
    """Measure the raw limit while the services start (saves time; only for a smoke run: they compete)."""
    criteria: stats.Criteria = field(default_factory=stats.Criteria)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(10.0, self.step_s / 4)


@dataclass
class StepRecord:
    kind: str
    """ramp, refine, half, soak"""
    outcome: stats.StepOutcome
    sustained: bool
    reason: str
    started: float
    ended: float
    latencies: dict[str, dict[str, float | int | None]]
    cpu: dict[str, float]
    unfinished: int = 0
    """Incidents of the step still open after the drain."""
    host_probe_ms: float | None = None
    """Median of the host probe over the step (:func:`monitor.probe_ms`): steps, and runs, measured on a slower host
    show a higher figure; compare throughput only between steps whose probes are alike."""

    @property
    def service_cpu_ms_per_incident(self) -> float | None:
        """CPU time the five services spent per incident closed in the window (contention inflates it less
        than it lowers the throughput: the figure to compare code changes by)."""
        o = self.outcome
        services = sum(v for k, v in self.cpu.items() if k in SERVICE_NAMES)
        if not o.closed_in_window or not services:
            return None
        return services / 100 * o.window_s * 1000 / o.closed_in_window

    def as_dict(self) -> dict[str, Any]:
        o = self.outcome
        per_incident = self.service_cpu_ms_per_incident
        return {
            "kind": self.kind,
            "offered_rate": o.offered_rate,
            "reported_rate": round(o.sent_rate, 2),
            "closure_rate": round(o.closure_rate, 2),
            "sustained": self.sustained,
            "reason": self.reason,
            "duration_s": round(o.duration_s, 2),
            "window_s": round(o.window_s, 2),
            "backlog_growth": round(stats.backlog_growth(o), 1),
            "open_end": o.open_end,
            "requests": o.requests,
            "errors": o.errors,
            "unfinished": self.unfinished,
            "latency_ms": self.latencies,
            "cpu_pct": {k: round(v, 1) for k, v in self.cpu.items()},
            "service_cpu_ms_per_incident": round(per_incident, 1) if per_incident is not None else None,
            "host_probe_ms": None if self.host_probe_ms is None else round(self.host_probe_ms, 2),
        }


class ProfiledService(Service):
    """A service run under pyinstrument, its reports written when it stops."""

    out_dir: Path

    def __init__(self, name: str, out_dir: Path) -> None:
        super().__init__(name)
        object.__setattr__(self, "out_dir", out_dir)

    @property
    def session(self) -> Path:
        return self.out_dir / f"profile-{self.name}.pyisession"

    def render(self) -> None:
        """The saved session as HTML (to browse) and text (to read and quote)."""
        import subprocess

        for renderer, ext, extra in (("html", "html", []), ("text", "txt", ["-p", "show_all=false"])):
            out = self.out_dir / f"profile-{self.name}.{ext}"
            cmd = [sys.executable, "-m", "pyinstrument", "--load", str(self.session), "-r", renderer, "-o", str(out)]
            subprocess.run([*cmd, *extra], check=False, capture_output=True)

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pyinstrument",
            "--renderer",
            "pyisession",
            "--outfile",
            str(self.session),
            "-m",
            self.module,
        ]


def new_namespace(prefix: str = "bench") -> str:
    return f"{prefix}{time.strftime('%H%M%S')}{uuid.uuid4().hex[:6]}"


def service_env(ns: str, var_dir: Path, options: Options) -> dict[str, str]:
    env = {
        "GRIDLOOP_KAFKA_BOOTSTRAP": options.bootstrap,
        "GRIDLOOP_TOPIC_NAMESPACE": ns,
        "GRIDLOOP_VAR_DIR": str(var_dir),
        "GRIDLOOP_TIME_SCALE": "1",
        "GRIDLOOP_LOG_LEVEL": "warning",
        # every report is its own incident: no two random points of the town are merged as duplicates
        "GRIDLOOP_DISPATCH_MERGE_DISTANCE_M": "0",
        **LOAD_RATE_LIMITS,
    }
    for name, offset in PORT_OFFSETS.items():
        env[f"GRIDLOOP_{name.upper()}_HTTP_PORT"] = str(options.base_port + offset)
    env.update(options.extra_env)
    return env


def busy_processes() -> list[str]:
    """Other gridloop services or test runs on this machine (they would take the CPU the benchmark measures)."""
    me = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.info["pid"] in me:
            continue
        cmd = " ".join(proc.info["cmdline"] or [])
        if ("-m services." in cmd and "services.bench" not in cmd) or "pytest" in cmd:
            found.append(f"{proc.info['pid']} {cmd[:120]}")
    return found


@contextmanager
def services_running(
    env: dict[str, str], log_dir: Path, options: Options, out_dir: Path, meanwhile: Callable[[], None] | None = None
) -> Iterator[ServiceGroup]:
    """Every service started in the background; ``meanwhile`` runs while they come up."""
    chosen = select_services()
    check_addresses(chosen, env)
    log_dir.mkdir(parents=True, exist_ok=True)
    group = ServiceGroup(log_dir)
    profiled: list[ProfiledService] = []
    try:
        for service in chosen:
            target = service
            if service.name in options.profile:
                target = ProfiledService(service.name, out_dir)
                profiled.append(target)
            group.start(target, env)
        if meanwhile is not None:
            meanwhile()
        group.wait_healthy(180)
        yield group
    finally:
        group.stop(timeout=60)
        for target in profiled:
            if target.session.exists():
                target.render()


@dataclass
class RunResult:
    out_dir: Path
    raw: RawResult | None
    steps: list[StepRecord]
    best: StepRecord | None
    half: StepRecord | None
    hops: float | None
    hops_per_topic: dict[str, int]
    peak_rss: dict[str, float]
    summary: dict[str, Any]
    errors: list[str]
    conflicts: int
    busy: list[str]
    retries: int = 0


class Bench:
    """One benchmark run in ``out_dir`` (its own namespace, var dir and services)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.out_dir = options.out_root / stamp
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.var_dir = self.out_dir / "var"
        self.ns = new_namespace()
        self.env = service_env(self.ns, self.var_dir, options)
        self.monitor: Monitor | None = None
        self.steps: list[StepRecord] = []
        self.t0 = time.time()
        self._tokens: Tokens | None = None

    def log(self, text: str) -> None:
        from rich.console import Console

        Console(stderr=True, highlight=False).print(f"[dim]{time.time() - self.t0:7.1f}s[/dim] {text}")

    # -- setup ------------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        from services.common.admin import create_topics

        os.environ["GRIDLOOP_TOPIC_NAMESPACE"] = self.ns  # topic names below, and the admin, use the namespace
        create_topics(self.options.bootstrap)
        self.tokens()
        self.log(f"namespace [bold]{self.ns}[/bold], results in {self.out_dir}")

    def raw(self) -> RawResult:
        o = self.options
        if not o.raw_count:
            # a broker just started (its JIT cold) carries far fewer hops than a warm one (docs/performance.md)
            self.log(f"raw Kafka limit: warming the broker up for {RAW_WARMUP_S:g} s (not measured)")
            measure_raw(o.bootstrap, f"{self.ns}.{RAW_TOPIC_SUFFIX}-warmup", seconds=RAW_WARMUP_S)
        self.log(f"raw Kafka limit: producing for {o.raw_s:g} s" if not o.raw_count else f"raw: {o.raw_count} records")
        result = measure_raw(
            o.bootstrap, f"{self.ns}.{RAW_TOPIC_SUFFIX}", seconds=o.raw_s, count=o.raw_count, broker_pid=broker_pid()
        )
        per_hop = result.cpu_ms_per_hop
        self.log(
            f"raw: {result.hops_per_s:,.0f} hops/s ({result.consumed:,} records of {result.message_bytes:.0f} B "
            f"in {result.seconds:.1f} s)" + ("" if per_hop is None else f", {per_hop * 1000:.0f} µs of CPU per hop")
        )
        return result

    def clean_up(self) -> None:
        """Delete the run's databases, unless asked to keep them (its topics go when the run ends, see
        :meth:`run`)."""
        if not self.options.keep_db:
            for sub in ("db", "faust"):
                shutil.rmtree(self.var_dir / sub, ignore_errors=True)

    def drop_topics(self) -> None:
        if self.options.keep_topics:
            return
        from services.common.admin import drop_namespace

        try:
            dropped = drop_namespace(self.options.bootstrap, self.ns)
        except Exception as exc:  # the figures are saved; a broker that is gone keeps the topics
            self.log(f"[yellow]topics of {self.ns} not deleted ({type(exc).__name__}: {exc})[/yellow]")
        else:
            self.log(f"deleted the run's {len(dropped)} topics")

    def tokens(self) -> Tokens:
        # issued before the services start: five processes creating the token table at once can collide
        if self._tokens is None:
            self._tokens = issue_tokens(f"sqlite:///{self.var_dir / 'db' / 'auth.sqlite'}")
        return self._tokens

    def urls(self) -> dict[str, str]:
        return {name: f"http://127.0.0.1:{self.options.base_port + off}" for name, off in PORT_OFFSETS.items()}

    def start_monitor(self, group: ServiceGroup) -> Monitor:
        pids: dict[str, int] = {name: proc.pid for name, proc in group.procs.items()}
        if (broker := broker_pid()) is not None:
            pids["broker"] = broker
        pids["driver"] = os.getpid()
        self.monitor = Monitor(pids).start()
        return self.monitor

    # -- steps ------------------------------------------------------------------------------------------------

    async def step(self, driver: Driver, kind: str, rate: float, seconds: float) -> StepRecord:
        o = self.options
        warmup = o.warmup_s if o.warmup_s is not None else min(10.0, seconds / 4)
        self.log(f"{kind} step: {rate:g} incidents/s for {seconds:g} s")
        outcome, started, ended = await driver.run_step(rate, seconds, warmup)
        ok, reason = stats.evaluate_step(outcome, o.criteria)
        step_index = driver.step
        drained = await driver.settle(o.settle_s)
        unfinished = sum(1 for t in driver.incidents.values() if t.step == step_index)
        lat = {name: stats.summarize(v) for name, v in driver.latencies.get(step_index, {}).items()}
        cpu = self.monitor.cpu_avg(started + warmup, ended) if self.monitor else {}
        probe = self.monitor.probe_median(started + warmup, ended) if self.monitor else None
        record = StepRecord(kind, outcome, ok, reason, started, ended, lat, cpu, unfinished, probe)
        self.steps.append(record)
        p99 = lat.get("report_to_dispatched", {}).get("p99")
        self.log(
            f"  → {'[green]sustained[/green]' if ok else '[red]not sustained[/red]'}: {reason}; "
            f"reported {outcome.sent_rate:.1f}/s, p99 report→dispatched "
            f"{f'{p99:.0f} ms' if p99 is not None else '-'}"
            + ("" if drained else f"; backlog {driver.open_count} not drained after {o.settle_s:g} s")
        )
        return record

    async def ramp(self, driver: Driver) -> StepRecord | None:
        o = self.options
        tried: dict[float, bool] = {}
        while (rate := stats.next_rate(tried, o.rates, o.refine)) is not None:
            record = await self.step(driver, "ramp" if rate in o.rates else "refine", rate, o.step_s)
            tried[rate] = record.sustained
            # what a failed step left behind must not count against the next one
            if driver.open_count > 0 and not record.sustained and not await driver.settle(o.settle_s * 2):
                self.log(f"[yellow]backlog of {driver.open_count} does not drain; the ramp stops here[/yellow]")
                break
            if not record.sustained:
                await self.caught_up(o.settle_s * 2)
        verdicts = [(s.outcome, s.sustained) for s in self.steps]
        best = stats.highest_sustained(verdicts)
        return next((s for s in self.steps if s.outcome is best), None)

    async def caught_up(self, within_s: float) -> bool:
        """Wait up to ``within_s`` until every service's consumer group has committed every record on its topics.

        Every incident of an overloaded step may be closed while the read models (intake's and the operations
        center's, which fold the whole lifecycle) are still far behind: the next step would then share the machine
        with their catching up, and its latency would be theirs."""
        from services.chaos.cluster import SERVICE_NAMES, Probe

        probe = Probe(self.options.bootstrap)
        started = time.time()
        try:
            while True:
                behind: dict[str, int | None] = {}
                for service in SERVICE_NAMES:
                    try:
                        lag = (await asyncio.to_thread(probe.group, service)).lag
                    except Exception:
                        lag = None
                    if lag is None or lag > 0:
                        behind[service] = lag
                if not behind:
                    if time.time() - started >= 1.0:
                        self.log(f"  consumers caught up after {time.time() - started:.0f} s")
                    return True
                if time.time() - started > within_s:
                    self.log(f"[yellow]consumers still behind after {within_s:g} s: {behind}[/yellow]")
                    return False
                await asyncio.sleep(1.0)
        finally:
            probe.close()

    # -- the whole run ----------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        return self.dropping_topics(self._run)

    def dropping_topics(self, body: Callable[[], _T]) -> _T:
        """``body()``; the run's topics are dropped when it ends, an interrupted run's too."""
        try:
            return body()
        finally:
            self.drop_topics()

    def begin(self) -> list[str]:
        """Warn if other gridloop processes share the machine (their lines are returned), then :meth:`prepare`."""
        busy = busy_processes()
        if busy:
            self.log("[yellow]other gridloop services or tests are running; figures will be low:[/yellow]")
            for line in busy:
                self.log(f"  {line}")
        self.prepare()
        return busy

    def _run(self) -> RunResult:
        o = self.options
        busy = self.begin()
        raws: list[RawResult] = []

        def measure() -> None:
            if o.raw_s > 0 or o.raw_count:
                raws.append(self.raw())

        if not o.overlap_startup:
            measure()  # on a machine where nothing of ours runs yet
        from services.common.admin import partitions_for

        topics = {t.name: partitions_for(t) for t in CATALOG}
        meanwhile = measure if o.overlap_startup else None
        with services_running(self.env, self.var_dir / "logs", o, self.out_dir, meanwhile) as group:
            self.log("services up: " + ", ".join(f"{n} (pid {p.pid})" for n, p in group.procs.items()))
            monitor = self.start_monitor(group)
            try:
                best, half, offsets, driver_info = _run(self._drive(topics))
            finally:
                monitor.stop()
        raw = raws[0] if raws else None
        hops, per_topic = stats.measured_hops(offsets[0], offsets[1], driver_info["reported"])
        peak = {k: v for k, v in monitor.peak_rss().items() if k not in ("driver",)}
        latency_step = half or best
        summary = stats.summary(
            incidents_per_s=best.outcome.closure_rate if best else 0.0,
            raw_hops_per_s=raw.hops_per_s if raw else 0.0,
            hops_per_incident=hops,
            p99_report_to_dispatch_ms=_p99(latency_step, "report_to_dispatched"),
            p99_end_to_end_ms=_p99(latency_step, "end_to_end"),
            peak_rss_mb=peak,
            duration_s=time.time() - self.t0,
        )
        result = RunResult(
            self.out_dir,
            raw,
            self.steps,
            best,
            half,
            hops,
            per_topic,
            peak,
            summary,
            driver_info["errors"],
            driver_info["conflicts"],
            busy,
            driver_info["retries"],
        )
        self.save(result, monitor)
        self.clean_up()
        return result

    def _driver(self) -> Driver:
        from services.common.admin import partitions_for

        o = self.options
        return Driver(
            self.urls(),
            self.tokens(),
            o.bootstrap,
            LIFECYCLE.name,
            lifecycle_partitions=partitions_for(LIFECYCLE),
            poll_s=o.poll_s,
            idle_poll_s=o.idle_poll_s,
            long_poll_s=o.long_poll_s,
            batch_actions=o.batch_actions,
        )

    async def _drive(
        self, topics: dict[str, int]
    ) -> tuple[StepRecord | None, StepRecord | None, tuple[Any, Any], dict[str, Any]]:
        o = self.options
        driver = self._driver()
        before = await end_offsets(o.bootstrap, topics)
        await driver.start()
        try:
            # a short warm-up (connections, caches, consumer groups settled), not measured
            await driver.offer(min(o.rates), o.warmup_offer_s)
            await driver.settle(o.settle_s)
            best = await self.ramp(driver)
            half = None
            if o.half_step and best is not None:
                await driver.settle(o.settle_s)
                await self.caught_up(o.settle_s * 2)
                half = await self.step(driver, "half", max(1.0, round(best.outcome.offered_rate / 2, 1)), o.step_s)
            await driver.settle(o.settle_s)
            await asyncio.sleep(1.0)  # the last outbox flushes and lifecycle copies
            after = await end_offsets(o.bootstrap, topics)
            info = {
                "reported": sum(driver.reported.values()),
                "errors": driver.counters.error_samples,
                "conflicts": driver.counters.conflicts,
                "retries": driver.counters.retries,
            }
            return best, half, (before, after), info
        finally:
            await driver.stop()

    def save(self, result: RunResult, monitor: Monitor) -> None:
        from .report import plot

        data = {
            "summary": result.summary,
            "namespace": self.ns,
            "options": {
                "rates": list(self.options.rates),
                "step_s": self.options.step_s,
                "warmup_s": self.options.warmup,
                "refine": self.options.refine,
                "poll_s": self.options.poll_s,
                "long_poll_s": self.options.long_poll_s,
                "batch_actions": self.options.batch_actions,
                "raw_s": self.options.raw_s,
            },
            "machine": {"cpus": psutil.cpu_count(), "memory_mb": psutil.virtual_memory().total // 2**20},
            "raw": result.raw.as_dict() if result.raw else None,
            "steps": [s.as_dict() for s in result.steps],
            "best_step": result.best.as_dict() if result.best else None,
            "hops_per_topic": result.hops_per_topic,
            "expected_hops_per_incident": stats.expected_hops(),
            "peak_rss_mb": result.peak_rss,
            "http_error_samples": result.errors,
            "http_conflicts": result.conflicts,
            "http_retries": result.retries,
            "busy_processes": result.busy,
        }
        write_json(self.out_dir / "result.json", data)
        write_json(self.out_dir / "summary.json", result.summary)
        rss = {name: monitor.rss_series(name) for name in monitor.samples}
        write_json(self.out_dir / "rss.json", rss)
        plot(result.steps, self.out_dir / "bench.png")


def _run(main: Coroutine[Any, Any, _T]) -> _T:
    """``main`` on uvloop, the loop the services run on: the load (reports, desks, grid workers, the lifecycle
    reader) shares the machine with what it measures, and costs it less there than on the standard loop."""
    import uvloop

    return uvloop.run(main)


def _p99(step: StepRecord | None, stage: str) -> float | None:
    if step is None:
        return None
    value = step.latencies.get(stage, {}).get("p99")
    return float(value) if value is not None else None


def write_json(path: Path, data: Mapping[str, Any] | Any) -> None:
    import orjson

    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


# -- soak ---------------------------------------------------------------------------------------------------


@dataclass
class SoakResult:
    out_dir: Path
    rate: float
    steps: list[StepRecord]
    growth: dict[str, dict[str, Any]]
    summary: dict[str, Any]


class Soak(Bench):
    """A long run at one rate (half the maximum unless given): is memory stable, does the loop keep up?"""

    def __init__(self, options: Options, minutes: float, rate: float | None, ramp_step_s: float = 10.0) -> None:
        super().__init__(options)
        self.minutes = minutes
        self.rate = rate
        self.ramp_step_s = ramp_step_s

    def run_soak(self) -> SoakResult:
        return self.dropping_topics(self._run_soak)

    def _run_soak(self) -> SoakResult:
        o = self.options
        busy = self.begin()
        with services_running(self.env, self.var_dir / "logs", o, self.out_dir) as group:
            monitor = self.start_monitor(group)
            try:
                rate, soak_start, soak_end, latencies = _run(self._soak())
            finally:
                monitor.stop()
        soak_steps = [s for s in self.steps if s.kind == "soak"]
        growth = {
            name: stats.rss_growth([(t, r) for t, r in monitor.rss_series(name) if soak_start <= t <= soak_end])
            for name in monitor.samples
            if name != "driver"
        }
        closed = sum(s.outcome.closed_in_window for s in soak_steps)
        window = sum(s.outcome.window_s for s in soak_steps)
        peak = {k: v for k, v in monitor.peak_rss(soak_start, soak_end).items() if k != "driver"}
        summary = {
            "incidents_per_s": round(closed / window, 2) if window else 0.0,
            "offered_rate": rate,
            "minutes_sustained": f"{sum(s.sustained for s in soak_steps)}/{len(soak_steps)}",
            "rss_growth_mb": {k: v["growth_mb"] for k, v in sorted(growth.items())},
            "rss_first_mb": {k: v["first_mb"] for k, v in sorted(growth.items())},
            "rss_last_mb": {k: v["last_mb"] for k, v in sorted(growth.items())},
            "peak_rss_mb": {k: round(v, 1) for k, v in sorted(peak.items())},
            "p99_report_to_dispatch_ms": _round_opt(stats.percentile(latencies.get("report_to_dispatched", []), 99)),
            "p99_end_to_end_ms": _round_opt(stats.percentile(latencies.get("end_to_end", []), 99)),
            "duration_s": round(time.time() - self.t0, 1),
        }
        result = SoakResult(self.out_dir, rate, self.steps, growth, summary)
        write_json(
            self.out_dir / "soak.json",
            {
                "summary": summary,
                "namespace": self.ns,
                "rss_growth": growth,
                "steps": [s.as_dict() for s in self.steps],
                "busy_processes": busy,
            },
        )
        write_json(self.out_dir / "summary.json", summary)
        write_json(self.out_dir / "rss.json", {name: monitor.rss_series(name) for name in monitor.samples})
        from .report import plot_rss

        plot_rss({n: monitor.rss_series(n) for n in monitor.samples}, soak_start, self.out_dir / "soak.png")
        self.clean_up()
        return result

    async def _soak(self) -> tuple[float, float, float, dict[str, list[float]]]:
        o = self.options
        driver = self._driver()
        await driver.start()
        try:
            await driver.offer(min(o.rates), 5.0)
            await driver.settle(o.settle_s)
            rate = self.rate
            if rate is None:
                step_s = o.step_s
                o.step_s = self.ramp_step_s
                best = await self.ramp(driver)
                o.step_s = step_s
                if best is None:
                    raise RuntimeError("no rate was sustained in the quick ramp")
                rate = max(1.0, round(best.outcome.offered_rate / 2, 1))
                await driver.settle(o.settle_s)
            self.log(f"soak at {rate:g} incidents/s for {self.minutes:g} min")
            start = time.time()
            minutes = max(1, round(self.minutes))
            first_step = driver.step + 1
            for _ in range(minutes):
                # one-minute slices, back to back (no drain between them): a time series of the same load
                outcome, started, ended = await driver.run_step(rate, 60.0 * self.minutes / minutes, 0.0)
                ok, reason = stats.evaluate_step(outcome, o.criteria)
                cpu = self.monitor.cpu_avg(started, ended) if self.monitor else {}
                probe = self.monitor.probe_median(started, ended) if self.monitor else None
                lat = {n: stats.summarize(v) for n, v in driver.latencies.get(driver.step, {}).items()}
                self.steps.append(StepRecord("soak", outcome, ok, reason, started, ended, lat, cpu, 0, probe))
                rss = self.monitor.peak_rss(started, ended) if self.monitor else {}
                minute = sum(1 for s in self.steps if s.kind == "soak")
                self.log(
                    f"  minute {minute}: closed {outcome.closure_rate:.1f}/s, "
                    f"open {outcome.open_end}, "
                    + ", ".join(f"{k} {v:.0f} MB" for k, v in sorted(rss.items()) if k != "driver")
                )
            end = time.time()
            await driver.settle(o.settle_s)
            latencies: dict[str, list[float]] = {}
            for index in range(first_step, driver.step + 1):
                for name, values in driver.latencies.get(index, {}).items():
                    latencies.setdefault(name, []).extend(values)
            return rate, start, end, latencies
        finally:
            await driver.stop()


def _round_opt(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
