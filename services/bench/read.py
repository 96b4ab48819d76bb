"""The read side's benchmark (``python -m services.bench read``, behind ``make bench-read N=…``): how the
operations center rebuilds and reads a town's history of ``N`` incidents.

1. A fresh topic namespace on the broker it is given (the catalog's topics, the lifecycle log with its partition
   count; a running demo's topics are never touched, and the run's are deleted when it ends).
2. ``N`` incidents of synthetic history (:mod:`.history`, a year by default, ending now) published to that
   lifecycle log: the generation and publication rates.
3. For each database (SQLite in the run's directory; PostgreSQL in a scratch database of its own where a server
   is given): the rebuild through ``services.opscenter.rebuild.rebuild`` — events/s, wall time, peak RSS, the
   database's bytes and bytes per event —, then opscenter serving the rebuilt read model: every read endpoint
   timed over repeated requests (p50/p95/p99, payload bytes), and the live fold's lag while a dashboard refreshes
   every 5 s and fresh events arrive at a steady rate.

With ``read_models`` (``--read-model URL``), steps 2 and the rebuild are skipped: the read models named, filled
before (``tests/readmodel_fill.py`` writes a year of a district straight into one), are served and read as they
are, and the live events fold into them.

The result is written to ``result.json`` in the run's directory as each phase ends (the history, each database's
rebuild, each endpoint's timing, the live phase), ``"complete": false`` until the run has ended: a long run that
dies late leaves every figure it got. It prints tables, then the result as one JSON object on the last line.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]

from schemas import Event, Town
from schemas.reference import GAOHANG
from schemas.topics import LIFECYCLE, consumer_group
from services.common.settings import LOAD_RATE_LIMITS, REPO_ROOT, ServiceSettings

from . import _read_db as db
from . import stats
from ._read_live import TOWN_VIEW, LiveResult, measure_live
from .harness import new_namespace, write_json
from .history import lifecycle, publish

DEFAULT_BASE_PORT = 24200
"""opscenter listens on base+4: apart from ``make bench``'s 24100 block and the tests' ports."""
PERIODS = ("day", "week", "month")
DIMENSIONS = ("department", "category", "grid", "none")
LIVE_SEED_OFFSET = 1_000_003
"""The live events are another history's (another seed, for each database another): incidents of their own."""


@dataclass
class ReadOptions:
    """One run of the read benchmark."""

    incidents: int = 20_000
    days: int = 365
    seed: int = 1
    bootstrap: str = "127.0.0.1:9092"
    databases: tuple[str, ...] = ()
    """Read models to rebuild and read (their tables are dropped); none: a SQLite file in the run's directory,
    and a scratch database on ``postgres_url``'s server if one is given."""
    postgres_url: str = ""
    read_models: tuple[str, ...] = ()
    """Read models filled before, served and read as they are (no history is published, nothing rebuilt)."""
    repeats: int = 100
    """Timed requests per endpoint (after one untimed)…"""
    budget_s: float = 10.0
    """…or fewer, once an endpoint has taken this long (at least ``min_repeats``)."""
    min_repeats: int = 3
    live_s: float = 30.0
    live_rate: float = 100.0
    """Events per second published while the dashboard refreshes (0 s: no live phase)."""
    refresh_s: float = 5.0
    base_port: int = DEFAULT_BASE_PORT
    out_root: Path = REPO_ROOT / "var" / "bench-read"
    keep_db: bool = False
    keep_topics: bool = False
    town: Town = GAOHANG


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A read the benchmark times: a name for the tables and the path with its query."""

    name: str
    path: str


def endpoints(last: date, middle: date) -> list[Endpoint]:
    """Every read of the operations center: the KPIs for each period and cut at the history's last day and in its
    middle, the CSV, the lists and the map (with the dashboard's arguments)."""
    out = [
        Endpoint(f"kpis {period} by {by} @{label}", f"/api/kpis?period={period}&by={by}&at={day.isoformat()}")
        for label, day in (("last", last), ("mid", middle))
        for period in PERIODS
        for by in DIMENSIONS
    ]
    out += [
        Endpoint(f"kpis.csv {period} @last", f"/api/kpis.csv?period={period}&by=department&at={last.isoformat()}")
        for period in ("day", "month")
    ]
    out += [
        Endpoint("backlog", "/api/backlog"),
        Endpoint("overdue", "/api/overdue"),
        Endpoint("overdue, the dashboard's page", "/api/overdue?limit=50"),
        Endpoint("trend 14 days", "/api/trend?days=14"),
        Endpoint("map incidents", "/api/map/incidents"),
        Endpoint("map incidents, the dashboard's view", f"/api/map/incidents?{TOWN_VIEW}"),
        Endpoint("map grids", "/api/map/grids"),
    ]
    return out


@dataclass
class Timing:
    """One endpoint's timed requests."""

    endpoint: Endpoint
    ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    bytes: int = 0
    server_cpu_ms: float | None = None
    """The CPU the service spent per timed request, on average (user and system, every thread): what a busy host
    does not inflate as it does the wall time."""

    @property
    def ok(self) -> bool:
        return set(self.statuses) == {200}

    def as_dict(self) -> dict[str, Any]:
        summary = stats.summarize(self.ms)
        return {
            "path": self.endpoint.path,
            "n": summary["n"],
            **{f"{k}_ms": round(float(v), 1) for k in ("p50", "p95", "p99", "max") if (v := summary[k]) is not None},
            "server_cpu_ms": round(self.server_cpu_ms, 1) if self.server_cpu_ms is not None else None,
            "bytes": self.bytes,
            "status": {str(code): n for code, n in sorted(self.statuses.items())},
        }


def time_endpoints(
    base_url: str, token: str, reads: Iterable[Endpoint], options: ReadOptions, server_pid: int | None = None
) -> Iterator[Timing]:
    """Each read once untimed, then ``repeats`` times one after the other (fewer past the budget), one client;
    each endpoint's timing as soon as it is done, with the CPU the process ``server_pid`` spent on it."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=600.0) as client:
        for endpoint in reads:
            timing = Timing(endpoint)
            client.get(endpoint.path)  # connections, caches, the first compile of a statement
            cpu = _cpu_s(server_pid)
            began = time.monotonic()
            for n in range(options.repeats):
                if n >= options.min_repeats and time.monotonic() - began > options.budget_s:
                    break
                t = time.perf_counter()
                response = client.get(endpoint.path)
                body = response.content
                timing.ms.append((time.perf_counter() - t) * 1000)
                timing.statuses[response.status_code] = timing.statuses.get(response.status_code, 0) + 1
                timing.bytes = len(body)
            if cpu is not None and (after := _cpu_s(server_pid)) is not None and timing.ms:
                timing.server_cpu_ms = (after - cpu) * 1000 / len(timing.ms)
            yield timing


def _cpu_s(pid: int | None) -> float | None:
    """The CPU seconds (user and system) process ``pid`` and its children have spent; None without one."""
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        return sum(sum(p.cpu_times()[:2]) for p in (proc, *proc.children(recursive=True)))
    except psutil.Error:
        return None


class _TimedEvents:
    """The events of a history as they are drawn, with the time spent drawing them (apart from publishing)."""

    def __init__(self, events: Iterable[Event]) -> None:
        self._events = iter(events)
        self.seconds = 0.0
        self.count = 0

    def __iter__(self) -> Iterator[Event]:
        while True:
            t = time.perf_counter()
            try:
                event = next(self._events)
            except StopIteration:
                self.seconds += time.perf_counter() - t
                return
            self.seconds += time.perf_counter() - t
            self.count += 1
            yield event


class _PeakRss:
    """The highest resident memory of this process while it runs (sampled every 100 ms)."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self.before = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


@dataclass
class Target:
    """A database the read model is rebuilt into and served from."""

    label: str
    url: str
    scratch: tuple[str, str] | None = None
    """(server URL, database name) of a scratch PostgreSQL database the run made, and drops."""
    filled: bool = False
    """A read model filled before the run: served as it is (not rebuilt, nor deleted after)."""


class ReadBench:
    """One run of the read benchmark in ``out_dir`` (its own namespace, databases and opscenter)."""

    def __init__(self, options: ReadOptions) -> None:
        self.o = options
        self.out_dir = options.out_root / time.strftime("%Y%m%d-%H%M%S")
        self.var_dir = self.out_dir / "var"
        self.ns = new_namespace("benchread")
        self.t0 = time.time()
        self.targets: list[Target] = []
        self.result: dict[str, Any] = {}
        """What the run has measured so far: written to ``result.json`` as each phase ends."""
        self.security = ServiceSettings().kafka_client_options()
        """The Kafka client's credentials, from the environment (none on the local broker)."""

    def log(self, text: str) -> None:
        from rich.console import Console

        Console(stderr=True, highlight=False).print(f"[dim]{time.time() - self.t0:7.1f}s[/dim] {text}")

    # -- the run --------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from services.common.admin import create_topics

        o = self.o
        self.out_dir.mkdir(parents=True, exist_ok=True)
        os.environ["GRIDLOOP_TOPIC_NAMESPACE"] = self.ns  # the topic names and consumer groups below use it
        try:
            create_topics(o.bootstrap, security=self.security)
            self.log(f"namespace [bold]{self.ns}[/bold], results in {self.out_dir}")
            self.targets = self._targets()
            end = datetime.now(UTC).replace(microsecond=0)
            start = end - timedelta(days=o.days)
            result = self.result = {
                "bench": "read",
                "complete": False,
                "incidents": o.incidents,
                "days": o.days,
                "seed": o.seed,
                "history": None,
                "databases": {},
                "host": self._host(),
            }
            if o.read_models:  # what they hold, not what the options say
                result["incidents"] = [db.incidents(t.url) for t in self.targets]
            else:
                result["history"] = self._publish_history(start)
                self._save()
            token = self._token()
            last, middle = (end - timedelta(microseconds=1)).date(), (start + (end - start) / 2).date()
            for index, target in enumerate(self.targets):
                result["databases"][target.label] = {"url": _without_password(target.url)}
                self._round(index, target, token, endpoints(last, middle), result["databases"][target.label])
            result["host"]["probe_ms_end"] = _probe()
            result["host"]["load_end"] = round(os.getloadavg()[0], 2)
            result["duration_s"] = round(time.time() - self.t0, 1)
            result["complete"] = True
            self._save()
            return result
        finally:
            self._clean_up()

    def _save(self) -> None:
        """The result so far, on disk (written aside and renamed: a run killed meanwhile leaves the last one)."""
        path = self.out_dir / "result.json"
        partial = path.with_suffix(".json.part")
        write_json(partial, {**self.result, "duration_s": round(time.time() - self.t0, 1)})
        partial.replace(path)

    def _targets(self) -> list[Target]:
        o = self.o
        if o.read_models or o.databases:
            urls = o.read_models or o.databases
            labels = [db.dialect(url) for url in urls]
            return [
                Target(label if labels.count(label) == 1 else f"{label}-{i + 1}", url, filled=bool(o.read_models))
                for i, (label, url) in enumerate(zip(labels, urls, strict=True))
            ]
        targets = [Target("sqlite", f"sqlite:///{self.var_dir / 'db' / 'opscenter.sqlite'}")]
        if o.postgres_url:
            name = self.ns.lower()
            url = db.create_database(o.postgres_url, name)
            targets.append(Target("postgresql", url, (o.postgres_url, name)))
        return targets

    def _publish_history(self, start: datetime) -> dict[str, Any]:
        o = self.o
        self.log(f"history: {o.incidents:,} incidents over {o.days} days, published to {LIFECYCLE.name}")
        drawn = _TimedEvents(lifecycle(o.incidents, seed=o.seed, start=start, days=o.days, town=o.town))
        began = time.perf_counter()
        sent = publish(drawn, o.bootstrap, topic=LIFECYCLE.name, security=self.security)
        wall = time.perf_counter() - began
        publishing = max(wall - drawn.seconds, 1e-9)
        self.log(
            f"  {sent:,} events ({sent / max(o.incidents, 1):.2f} an incident) in {wall:.1f} s: drawn at "
            f"{drawn.count / max(drawn.seconds, 1e-9):,.0f}/s, published at {sent / publishing:,.0f}/s"
        )
        return {
            "events": sent,
            "events_per_incident": round(sent / o.incidents, 2) if o.incidents else None,
            "start": start.isoformat(),
            "generate_s": round(drawn.seconds, 2),
            "generate_events_per_s": round(drawn.count / max(drawn.seconds, 1e-9)),
            "publish_s": round(publishing, 2),
            "publish_events_per_s": round(sent / publishing),
            "wall_s": round(wall, 2),
        }

    @staticmethod
    def _host() -> dict[str, Any]:
        """The machine, and how busy it is (other work on it slows every figure): the host probe of
        :func:`.monitor.probe_ms` and the load average, at the start and at the end."""
        return {
            "cpus": psutil.cpu_count(),
            "memory_mb": psutil.virtual_memory().total // 2**20,
            "probe_ms_start": _probe(),
            "load_start": round(os.getloadavg()[0], 2),
        }

    def _token(self) -> str:
        from services.common.auth import Role, TokenStore
        from services.common.db import make_engine

        engine = make_engine(f"sqlite:///{self.var_dir / 'db' / 'auth.sqlite'}")
        try:
            return TokenStore(engine).issue(Role.OPS_CENTER, "bench-read", expires_in=timedelta(days=1))[0]
        finally:
            engine.dispose()

    # -- one database -----------------------------------------------------------------------------------------

    def _round(self, index: int, target: Target, token: str, reads: list[Endpoint], out: dict[str, Any]) -> None:
        """Rebuild (unless filled before), time every read and the live fold on one database, into ``out`` (saved
        as each phase ends)."""
        o = self.o
        out["rebuild"] = None if target.filled else self._rebuild(target)
        out["endpoints"], out["errors"], out["live"] = {}, 0, None
        self._save()
        self._start_at_the_end()
        group = self._serve(target)
        try:
            base_url = group.urls["opscenter"]
            self.log(f"  timing {len(reads)} reads ({o.repeats} each, at most ~{o.budget_s:g} s an endpoint)")
            pid = group.procs["opscenter"].pid
            for t in time_endpoints(base_url, token, reads, o, pid):
                p99 = stats.percentile(t.ms, 99)
                answers = "" if t.ok else f"  [red]answers {dict(sorted(t.statuses.items()))}[/red]"
                self.log(f"    {t.endpoint.name:<36} p99 {p99 or 0:9.1f} ms {t.bytes:>10,} B{answers}")
                out["endpoints"][t.endpoint.name] = t.as_dict()
                out["errors"] += sum(n for code, n in t.statuses.items() if code != 200)
                self._save()
            live = self._live(index, target, base_url, token)
            out["live"] = live.as_dict() if live is not None else None
            self._save()
        finally:
            group.stop()

    def _rebuild(self, target: Target) -> dict[str, Any]:
        from services.opscenter.rebuild import rebuild

        o = self.o
        self.log(f"[bold]{target.label}[/bold]: rebuilding the read model from the log")
        with _PeakRss() as rss:
            began = time.perf_counter()
            applied = rebuild(o.bootstrap, target.url, security=self.security)
            seconds = time.perf_counter() - began
        size = db.size(target.url)
        rebuilt = {
            "events": applied,
            "seconds": round(seconds, 1),
            "events_per_s": round(applied / seconds) if seconds else None,
            "rss_before_mb": round(rss.before / 2**20, 1),
            "peak_rss_mb": round(rss.peak / 2**20, 1),
            "db_bytes": size.total,
            "bytes_per_event": round(size.total / applied) if applied else None,
            "table_bytes": dict(sorted(size.tables.items(), key=lambda kv: -kv[1])),
        }
        self.log(
            f"  {applied:,} events in {seconds:.1f} s ({rebuilt['events_per_s'] or 0:,}/s), peak RSS "
            f"{rebuilt['peak_rss_mb']} MB, {size.total / 2**20:.0f} MB ({rebuilt['bytes_per_event']} B an event)"
        )
        return rebuilt

    def _start_at_the_end(self) -> None:
        """Commit opscenter's consumer group at the log's end: the service starts where the rebuild stopped (it
        would otherwise fold the whole log again, each event skipped as seen)."""
        from kafka import KafkaConsumer, TopicPartition
        from kafka.structs import OffsetAndMetadata

        consumer = KafkaConsumer(
            bootstrap_servers=self.o.bootstrap,
            group_id=consumer_group("opscenter"),
            enable_auto_commit=False,
            **self.security,
        )
        try:
            topic = LIFECYCLE.name
            parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
            consumer.assign(parts)
            ends = consumer.end_offsets(parts)
            consumer.commit({tp: OffsetAndMetadata(ends[tp], "", -1) for tp in parts})
        finally:
            consumer.close()

    def _serve(self, target: Target) -> Any:
        from services.supervisor import start_background

        env = {
            "GRIDLOOP_KAFKA_BOOTSTRAP": self.o.bootstrap,
            "GRIDLOOP_TOPIC_NAMESPACE": self.ns,
            "GRIDLOOP_VAR_DIR": str(self.var_dir),
            "GRIDLOOP_OPSCENTER_DATABASE_URL": target.url,
            "GRIDLOOP_OPSCENTER_HTTP_PORT": str(self.o.base_port + 4),
            "GRIDLOOP_LOG_LEVEL": "warning",
            **LOAD_RATE_LIMITS,
        }
        group = start_background(env, self.var_dir / "logs" / target.label, services=["opscenter"])
        try:
            group.wait_healthy(180)
        except BaseException:
            group.stop()
            raise
        return group

    def _live(self, index: int, target: Target, base_url: str, token: str) -> LiveResult | None:
        import uvloop

        o = self.o
        count = math.ceil(o.live_rate * o.live_s)
        if count <= 0:
            return None
        # the first events of a busy day of another history, ending now: incidents of their own (drawn lazily:
        # no more than read); another for each database (the next one's rebuild folds this one's)
        now = datetime.now(UTC)
        seed = o.seed + LIVE_SEED_OFFSET * (index + 1)
        day = lifecycle(count, seed=seed, start=now - timedelta(days=1), days=1, town=o.town)
        events = list(itertools.islice(day, count))
        self.log(
            f"  live: {len(events):,} events at {o.live_rate:g}/s while a dashboard refreshes every {o.refresh_s:g} s"
        )
        marks = db.marks(target.url)
        try:
            live = uvloop.run(
                measure_live(
                    events,
                    bootstrap=o.bootstrap,
                    topic=LIFECYCLE.name,
                    rate=o.live_rate,
                    base_url=base_url,
                    token=token,
                    marks=marks,
                    refresh_s=o.refresh_s,
                    drain_s=max(60.0, o.live_s * 2),
                    security=self.security,
                )
            )
        finally:
            marks.close()
        summary = live.as_dict()
        self.log(
            f"  → lag p50 {summary['lag_ms']['p50']} ms, p99 {summary['lag_ms']['p99']} ms"
            f", {live.unfolded} not folded; dashboard refresh p99 {summary['dashboard_refresh_ms']['p99']} ms"
        )
        return live

    # -- clean-up -------------------------------------------------------------------------------------------------

    def _clean_up(self) -> None:
        if not self.o.keep_topics:
            from services.common.admin import drop_namespace

            try:
                dropped = drop_namespace(self.o.bootstrap, self.ns)
                self.log(f"deleted the run's {len(dropped)} topics")
            except Exception as exc:  # the figures stand; a broker gone keeps the topics
                self.log(f"[yellow]topics of {self.ns} not deleted ({type(exc).__name__}: {exc})[/yellow]")
        if self.o.keep_db:
            return
        for target in self.targets:
            if target.scratch is not None:
                try:
                    db.drop_database(*target.scratch)
                except Exception as exc:
                    self.log(f"[yellow]database {target.scratch[1]} not dropped ({type(exc).__name__}: {exc})[/yellow]")
        shutil.rmtree(self.var_dir / "db", ignore_errors=True)  # a model filled before is elsewhere: kept


def _probe() -> float:
    """The host probe's median of five (CPU ms of a fixed piece of pure Python)."""
    from .monitor import probe_ms

    return round(sorted(probe_ms() for _ in range(5))[2], 2)


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


__all__ = ["DEFAULT_BASE_PORT", "Endpoint", "ReadBench", "ReadOptions", "Timing", "endpoints", "time_endpoints"]
