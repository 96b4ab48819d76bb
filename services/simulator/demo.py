"""The demo: start every service in a fresh namespace, simulate the town until every incident is terminal, report.

``run_demo`` sets the services' environment (time scale, a fresh topic namespace ``demo<timestamp>``, its own
var directory, dispatch tuned so reminders and escalations show within minutes), creates the topics, starts the
services with the supervisor and drives them with ``simulate``. ``simulate`` alone drives services already
running (``make run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.common.settings import REPO_ROOT

from .actors import DESK, Api, Principal, Tally, Urls, World, principals, report_all, town_actors
from .report import TERMINAL, Summary, render, stuck_lines, summarize
from .town import PlannedReport, generate_reports

DEFAULT_BASE_PORT = 8101
PORT_OFFSETS = {"intake": 0, "handling": 1, "verification": 2, "opscenter": 3, "dispatch": 4}
"""Each service's port relative to the base port (the defaults: intake 8101 … dispatch 8105)."""

REQUIRED_SERVICES = frozenset({"intake", "dispatch", "handling", "verification"})

DEMO_TUNING = {
    "GRIDLOOP_DISPATCH_ESCALATE_AFTER_HOURS": "6",
}
"""Escalate (督办) 6 business hours past a deadline (the default is 24): seconds under the demo's time scale."""


@dataclass(slots=True)
class Options:
    incidents: int = 300
    seed: int = 7
    time_scale: float = 3600.0
    rate: float = 10.0
    timeout: float = 600.0
    keep_running: bool = False
    base_port: int = DEFAULT_BASE_PORT


@dataclass(slots=True)
class Outcome:
    summary: Summary
    tally: Tally
    seconds: float
    unreported: int
    timed_out: bool
    services_down: dict[str, int]
    plan_check: Counter[tuple[str, str]]
    """(what the plan expected, what became of the report): filed, merged or rejected."""

    @property
    def ok(self) -> bool:
        return (
            not self.summary.stuck and not self.unreported and self.tally.server_errors == 0 and not self.services_down
        )


def demo_env(namespace: str, var_dir: Path, time_scale: float, base_port: int) -> dict[str, str]:
    env = {
        "GRIDLOOP_TIME_SCALE": f"{time_scale:g}",
        "GRIDLOOP_TOPIC_NAMESPACE": namespace,
        "GRIDLOOP_VAR_DIR": str(var_dir),
        **DEMO_TUNING,
    }
    for service, offset in PORT_OFFSETS.items():
        env[f"GRIDLOOP_{service.upper()}_HTTP_PORT"] = str(base_port + offset)
    return env


def ports_in_use(ports: list[int], host: str = "127.0.0.1") -> list[int]:
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.3)
            if s.connect_ex((host, port)) == 0:
                busy.append(port)
    return busy


# -- the simulation ------------------------------------------------------------------------------------------------


def plan(options: Options, run_id: str) -> list[PlannedReport]:
    return generate_reports(options.incidents, options.seed, run_id)


class Tokens:
    """Bearer tokens for everyone the simulation acts as, issued in the token store the services read (the one
    ``GRIDLOOP_AUTH_DATABASE_URL`` or ``GRIDLOOP_VAR_DIR`` names): the demo is the town's administrator."""

    def __init__(self, people: Sequence[Principal], label: str) -> None:
        from services.common.auth import Role, TokenStore

        self.store = TokenStore.from_env()
        self.secrets: dict[str, str] = {}
        self.ids: list[str] = []
        for person in people:
            secret, row = self.store.issue(Role(person.role), person.subject, department=person.department, name=label)
            self.secrets[person.subject] = secret
            self.ids.append(row.token_id)

    def revoke(self) -> None:
        for token_id in self.ids:
            self.store.revoke(token_id)


def _skip_sniffio_lookups() -> None:
    """httpcore tries ``import sniffio`` each time it sets up a lock; without sniffio installed every try searches
    the whole import path again. Remember the miss once (httpcore then assumes asyncio, which this is)."""
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


async def _fetch_statuses(api: Api, world: World) -> None:
    """Every incident's status from intake's list, newest first, 500 a page."""
    ours = set(world.incident_ids.values())
    offset, found = 0, 0
    while found < len(ours):
        params = {"limit": 500, "offset": offset}
        page = await api.get("list incidents", f"{world.urls.intake}/incidents", params, who=DESK)
        if not page:
            return
        for item in page:
            if item["incident_id"] in ours:
                world.statuses[item["incident_id"]] = item["status"]
                found += 1
        if len(page) < 500:
            return
        offset += 500


async def _fetch_incidents(api: Api, world: World) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(16)

    async def one(incident_id: str) -> dict[str, Any]:
        async with sem:
            for _ in range(3):
                body = await api.get("get incident", f"{world.urls.intake}/incidents/{incident_id}", who=DESK)
                if body is not None:
                    return dict(body)
                await asyncio.sleep(0.5)
        return {"incident_id": incident_id, "status": "unknown (intake did not answer)", "timeline": []}

    ids = [world.incident_ids[i] for i in sorted(world.incident_ids)]
    return list(await asyncio.gather(*(one(i) for i in ids)))


def _progress_line(world: World, tally: Tally) -> str:
    statuses = [world.statuses.get(i, "reported") for i in world.incident_ids.values()]
    terminal = sum(s in TERMINAL for s in statuses)
    overdue = sum(len(v) for v in world.overdue.values())
    return (
        f"reported {len(world.incident_ids)}/{len(world.reports)} · terminal {terminal} · "
        f"open {len(statuses) - terminal} · rework {statuses.count('rework')} · overdue {overdue} · "
        f"409s {sum(tally.conflicts.values())} · errors {tally.error_count}"
    )


async def simulate(
    urls: Urls,
    options: Options,
    console: Console,
    *,
    run_id: str = "sim",
    services_down: Callable[[], dict[str, int]] = dict,
    tokens: Mapping[str, str] | None = None,
) -> Outcome:
    """Drive the town until every reported incident is terminal or ``options.timeout`` passes.

    ``tokens`` maps each subject of ``principals(plan(options, run_id))`` to its bearer token."""
    reports = plan(options, run_id)
    world = World(reports, urls, options.seed, business_hour_s=3600.0 / options.time_scale)
    tally = Tally()
    started = time.monotonic()
    _skip_sniffio_lookups()
    # httpcore scans every pooled connection for each request: a small pool keeps the simulator light
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(timeout=httpx.Timeout(15.0), limits=limits) as client:
        api = Api(client, tally, tokens)
        loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(a.run()) for a in town_actors(world, api, loop.time)]
        reporter = asyncio.create_task(report_all(world, api, options.rate))
        progress = Progress(
            TextColumn("[bold]Gaohang town"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=False,
        )
        task = progress.add_task("town", total=len(reports), info="")
        down: dict[str, int] = {}
        timed_out = False
        last_line = 0.0
        with progress if console.is_terminal else contextlib.nullcontext():
            while True:
                await asyncio.sleep(1.0)
                await _fetch_statuses(api, world)
                line = _progress_line(world, tally)
                terminal = sum(world.statuses.get(i) in TERMINAL for i in world.incident_ids.values())
                progress.update(task, completed=terminal, info=line)
                elapsed = time.monotonic() - started
                if not console.is_terminal and elapsed - last_line >= 5:
                    console.print(f"[{elapsed:5.0f} s] {line}", highlight=False)
                    last_line = elapsed
                if down := services_down():
                    break
                if world.reporting_done and terminal == len(world.incident_ids):
                    break
                if elapsed > options.timeout:
                    timed_out = True
                    break
        reporter.cancel()
        incidents = await _fetch_incidents(api, world)
        for t in tasks:
            t.cancel()
        await asyncio.gather(reporter, *tasks, return_exceptions=True)
    status = {i["incident_id"]: i["status"] for i in incidents}
    check: Counter[tuple[str, str]] = Counter()
    for index, incident_id in world.incident_ids.items():
        got = status.get(incident_id, "")
        check[reports[index].kind.expected, got if got in ("merged", "rejected") else "filed"] += 1
    return Outcome(
        summarize(incidents),
        tally,
        time.monotonic() - started,
        unreported=len(reports) - len(world.incident_ids),
        timed_out=timed_out,
        services_down=down,
        plan_check=check,
    )


# -- printing ------------------------------------------------------------------------------------------------------


def http_table(tally: Tally) -> Table:
    table = Table(title="HTTP calls", title_justify="left", header_style="bold")
    table.add_column("action")
    table.add_column("ok", justify="right")
    table.add_column("409 (already done)", justify="right")
    table.add_column("errors", justify="right")
    actions = sorted(set(tally.ok) | set(tally.conflicts) | {k.rsplit(" ", 1)[0] for k in tally.errors})
    for action in actions:
        errors = sum(n for k, n in tally.errors.items() if k.rsplit(" ", 1)[0] == action)
        table.add_row(
            action, str(tally.ok[action]), str(tally.conflicts[action]), f"[red]{errors}[/red]" if errors else "0"
        )
    return table


def print_outcome(console: Console, outcome: Outcome) -> None:
    console.print()
    console.print(render(outcome.summary, console.width))
    console.print()
    console.print(http_table(outcome.tally))
    tally = outcome.tally
    if tally.errors:
        console.print(
            f"[yellow]{tally.error_count} HTTP error(s)[/yellow] "
            f"({tally.server_errors} server errors, {tally.transport_errors} transport errors):"
        )
        for key, n in tally.errors.most_common():
            console.print(f"  {key}: {n}")
        for sample in tally.samples:
            console.print(f"  [dim]{sample}[/dim]", highlight=False)
    plan = outcome.plan_check
    expected = Counter[str]()
    for (want, _), n in plan.items():
        expected[want] += n
    console.print(
        "plan check: "
        + ", ".join(
            f"{plan[want, want]}/{expected[want]} {label}"
            for want, label in (
                ("filed", "filed"),
                ("merged", "near-duplicates merged"),
                ("rejected", "unfileable rejected"),
            )
        )
    )
    for (want, got), n in sorted(plan.items()):
        if want != got:
            console.print(f"  [yellow]{n} report(s) planned to be {want} were {got}[/yellow]")
    console.print(f"\nrun time {outcome.seconds:.0f} s")
    if outcome.services_down:
        console.print(f"[red]services stopped during the run:[/red] {outcome.services_down}")
    if outcome.unreported:
        console.print(f"[red]{outcome.unreported} report(s) could not be sent[/red]")
    if outcome.summary.stuck:
        why = "timeout" if outcome.timed_out else "end of the run"
        console.print(f"[red]{len(outcome.summary.stuck)} incident(s) not terminal at the {why}:[/red]")
        for line in stuck_lines(outcome.summary):
            console.print(f"  {line}", highlight=False)
    if outcome.ok:
        console.print("[green]every incident reached a terminal state (closed, rejected or merged)[/green]")


# -- the demo ------------------------------------------------------------------------------------------------------


def wide_console() -> Console:
    """A console; when the output is not a terminal (a log, a CI job), wide enough for the tables."""
    console = Console()
    return console if console.is_terminal else Console(width=180)


def run_demo(options: Options, console: Console | None = None) -> int:
    console = console or wide_console()
    namespace = f"demo{time.strftime('%Y%m%d%H%M%S')}"
    var_dir = REPO_ROOT / "var" / "demo" / namespace
    env = demo_env(namespace, var_dir, options.time_scale, options.base_port)
    busy = ports_in_use([options.base_port + o for o in PORT_OFFSETS.values()])
    if busy:
        console.print(
            f"[red]port(s) {', '.join(map(str, busy))} already in use[/red]: is gridloop already running? "
            "Stop it, or choose other ports with --base-port."
        )
        return 2
    os.environ.update(env)  # the topic catalog and the supervisor read the namespace from here
    bootstrap = os.environ.get("GRIDLOOP_KAFKA_BOOTSTRAP", "127.0.0.1:9092")

    from services.common.admin import create_topics
    from services.supervisor import SERVICES, start_background

    console.print(
        f"namespace [bold]{namespace}[/bold], time scale {options.time_scale:g} "
        f"(one business hour = {3600 / options.time_scale:g} s), state in {var_dir}"
    )
    try:
        created = create_topics(bootstrap)
    except Exception as exc:
        console.print(
            f"[red]Kafka at {bootstrap} is not reachable ({type(exc).__name__}: {exc})[/red]; "
            "start it with `make kafka-up`."
        )
        return 2
    console.print(f"created {len(created)} topics")
    tokens = Tokens(principals(plan(options, namespace)), f"demo {namespace}")
    console.print(f"issued {len(tokens.secrets)} tokens (grid workers, sensors, department staff, the duty desk)")
    log_dir = var_dir / "logs"
    # every service that can run: an optional one still being built (no __main__ yet) is left out
    runnable = [s.name for s in SERVICES if s.available() and importlib.util.find_spec(f"{s.module}.__main__")]
    skipped = [s.name for s in SERVICES if s.name not in runnable]
    if missing := sorted(REQUIRED_SERVICES - set(runnable)):
        console.print(f"[red]cannot run without {', '.join(missing)}[/red]")
        return 2
    if skipped:
        console.print(f"not starting {', '.join(skipped)} (not runnable yet)")
    group = start_background(env, log_dir, services=runnable)
    try:
        try:
            group.wait_healthy(180)
        except (TimeoutError, RuntimeError) as exc:
            console.print(f"[red]the services did not come up:[/red] {exc}")
            return 2
        _print_urls(console, group.urls, log_dir, tokens.secrets.get(DESK))
        urls = Urls(
            intake=group.urls["intake"],
            dispatch=group.urls["dispatch"],
            handling=group.urls["handling"],
            verification=group.urls["verification"],
        )
        outcome = asyncio.run(
            simulate(urls, options, console, run_id=namespace, services_down=group.exited, tokens=tokens.secrets)
        )
        print_outcome(console, outcome)
        if outcome.services_down:
            for name in outcome.services_down:
                console.print(f"[red]{name}[/red] log ends with:\n{group.tail(name)}", highlight=False)
        if options.keep_running:
            _print_urls(console, group.urls, log_dir, tokens.secrets.get(DESK))
            console.print("the services keep running; Ctrl-C stops them")
            _wait_for_interrupt(group.exited)
        return 0 if outcome.ok else 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    finally:
        console.print("stopping the services…")
        group.stop()


def _print_urls(console: Console, urls: dict[str, str], log_dir: Path, desk_token: str | None = None) -> None:
    table = Table(title="Services", title_justify="left", header_style="bold")
    table.add_column("service")
    table.add_column("API docs")
    for name, url in urls.items():
        table.add_row(name, f"{url}/docs")
    console.print(table)
    if "opscenter" in urls:
        fragment = f"#token={desk_token}" if desk_token else ""
        console.print(f"城运中心 dashboard: {urls['opscenter']}/{fragment}", soft_wrap=True, highlight=False)
    console.print(f"logs in {log_dir}")


def _wait_for_interrupt(exited: Callable[[], dict[str, int]]) -> None:
    """Until Ctrl-C, SIGTERM, or a service stopping on its own."""
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop and not exited():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
