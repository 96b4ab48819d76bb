"""Rebuild the read model from the lifecycle log, in large batches, resumably, beside the live one.

    python -m services.opscenter rebuild --database-url sqlite:///var/db/opscenter-rebuilt.sqlite

- **Batches.** Each worker reads its partitions of the log with aiokafka, decodes every record as the live
  consumer does and applies thousands of events per transaction through the same bus, handlers
  (:func:`~.handlers.bind`) and preload as the live service (:mod:`services.common.replay`). One worker per
  partition (at most one per CPU): the workers fold side by side and take turns to write.
- **Resumable.** Each batch's transaction records the next offset of each partition in ``ops_log_position``. Run
  again with the same target, the rebuild goes on from there (``--fresh`` starts over); an interrupted rebuild
  resumed gives the read model an uninterrupted one gives (every event is claimed once).
- **Beside the live model.** ``--follow`` keeps folding what comes; ``--swap URL`` (with it) then swaps the
  rebuilt model into the running service once it has caught up: see :func:`swap_into` and
  :mod:`.swap`.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import resource
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from schemas import utcnow
from schemas.reference import GAOHANG, Town
from schemas.topics import LIFECYCLE, consumer_group
from services.common.bus import MessageBus
from services.common.db import UnitOfWork, make_engine
from services.common.replay import (
    FOLLOW,
    Applier,
    Batching,
    Positions,
    Progress,
    Source,
    absolute_url,
    replay,
    settle,
    split,
    tune_for_replay,
)

from . import kpis
from .handlers import bind, preload, preload_rolling_up_later
from .kpis import Dimension, KpiReport, Period
from .store import (
    Db,
    OpsStore,
    ReadModel,
    drop_read_indexes,
    fresh_read_model,
    holds_read_model,
    log_positions,
    prepare_read_model,
    settle_rollups,
)

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"(read|open)_text is deprecated", category=DeprecationWarning)
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

log = logging.getLogger("gridloop")


class RebuildError(RuntimeError):
    """The rebuild cannot start, or a worker of it failed: the message says why (what is committed stays)."""


@dataclass(frozen=True, slots=True)
class Options:
    """How a rebuild runs (what it builds is the fold's)."""

    topic: str = ""
    """The log to fold; empty: the lifecycle log of the namespace (``GRIDLOOP_TOPIC_NAMESPACE``)."""
    fresh: bool = False
    """Drop what the target holds and start from offset 0; otherwise a target holding a rebuild's positions is
    resumed, an empty one started, and one holding a read model no rebuild is filling refused."""
    workers: int = 0
    """Worker processes; 0: one per partition, at most one per CPU. 1 folds in this process."""
    batch: int = 10_000
    """Records applied per transaction, at most."""
    follow: bool = False
    """Keep folding what comes after the log's end (until stopped, or swapped in)."""
    stop_after: int = 0
    """Stop (resumably) once this many records are applied; 0: no such limit."""
    progress: bool = True
    """A progress bar on standard error (only where it is a terminal)."""


@dataclass
class Outcome:
    """What a rebuild did."""

    applied: int
    """Records applied (those the target held already are skipped by their claims, and counted here)."""
    skipped: int
    """Records set aside: undecodable, or no handler could apply them."""
    seconds: float
    started_at: dict[int, int]
    """Partition → the offset it started from (0 unless resumed)."""
    positions: dict[int, int]
    """Partition → the next offset to read, as committed."""
    stopped: bool = False
    """Stopped before the end (``stop_after``, or interrupted): run again to resume."""
    peak_rss_mb: float = 0.0
    """The memory the rebuild took at most: the largest resident set of this process and of each worker
    process, added up (an upper bound: each peaked when it did)."""
    swapped: dict[str, Any] | None = None
    """What the service answered to the swap, if one was asked for."""

    @property
    def rate(self) -> float:
        return self.applied / self.seconds if self.seconds > 0 else 0.0

    @property
    def resumed(self) -> bool:
        return any(self.started_at.values())


@dataclass
class _Plan:
    """What each worker needs, set before the workers start (a forked worker inherits it)."""

    source: Source
    database_url: str
    town: Town
    batching: Batching
    assignment: list[list[int]]
    progress: Progress
    errors: Any = None
    parent: int = field(default_factory=os.getpid)
    rows_later: bool = True
    """The workers leave the rows' shares of the rollups to the settling (catching up), or roll up at each batch
    (following)."""


def rebuild(bootstrap: str, database_url: str, **how: Any) -> int:
    """Fold the lifecycle log into the read model at ``database_url``; returns the records applied. ``how``: the
    keywords of :func:`run` (the Kafka client's credentials, the town, the :class:`Options`, a swap target)."""
    return run(bootstrap, database_url, **how).applied


def run(
    bootstrap: str,
    database_url: str,
    *,
    security: Mapping[str, Any] | None = None,
    town: Town = GAOHANG,
    options: Options = Options(),
    swap: SwapTarget | None = None,
) -> Outcome:
    """The rebuild, and what it did.

    It runs in two steps. First it catches up with the log as it ends when the rebuild starts, leaving the rows'
    shares of the rollups out of its batches (an incident changes in batch after batch; its share is worked out
    once); then the rollups are settled from the rows (:func:`~.store.settle_rollups`). A following rebuild then
    folds what comes after as the live service does, rolling up at each batch. A rebuild stopped or killed while
    catching up leaves the rows' shares unsettled: run it again, and it settles them when it is caught up."""
    source = Source(bootstrap, options.topic or LIFECYCLE.name, dict(security or {}))
    ends = log_end(source)
    start = _prepare_target(database_url, source.topic, options.fresh, ends)
    _drop_read_indexes(database_url)
    workers = options.workers or min(len(ends), os.cpu_count() or 1)
    assignment = split(ends, workers)
    context = mp.get_context("fork") if len(assignment) > 1 else mp.get_context()
    progress = Progress(len(ends), len(assignment), context)
    for p in ends:
        progress.positions[p] = start.get(p, 0)
        progress.stops[p] = max(ends[p], start.get(p, 0))
    plan = _Plan(source, database_url, town, Batching(size=options.batch), assignment, progress, context.Queue())
    started = time.monotonic()
    stopped, _ = _phase(plan, options, ends, start, None, following=False)
    _raise_worker_errors(plan)
    _settle(plan)
    outcome_swap: dict[str, Any] | None = None
    if options.follow and not stopped and not progress.stopping.is_set():
        plan.rows_later = False
        for p in ends:
            progress.stops[p] = FOLLOW
        stopped, outcome_swap = _phase(plan, options, ends, start, swap, following=True)
        _raise_worker_errors(plan)
    settle(make_engine(database_url))
    positions = progress.position()
    stopped = stopped or any(positions[p] < progress.stops[p] for p in ends if progress.stops[p] != FOLLOW)
    return Outcome(
        applied=progress.total_applied(),
        skipped=progress.total_skipped(),
        seconds=time.monotonic() - started,
        started_at=dict(start),
        positions=positions,
        stopped=stopped,
        peak_rss_mb=_peak_rss_mb(progress),
        swapped=outcome_swap,
    )


def _phase(
    plan: _Plan,
    options: Options,
    ends: Mapping[int, int],
    start: Mapping[int, int],
    swap: SwapTarget | None,
    *,
    following: bool,
) -> tuple[bool, dict[str, Any] | None]:
    """Run the workers, following the log if ``following`` (and swapping into ``swap`` once caught up, if
    given); whether they were stopped, and what the swap answered."""
    answer: dict[str, Any] | None = None
    with _workers(plan) as running:
        watch = _Watch(plan, options, ends, start, following)  # its progress bar's thread once the workers are forked
        try:
            answer = watch.until_done(running, swap)
        except KeyboardInterrupt:
            plan.progress.stopping.set()
            watch.stopped = True
        finally:
            watch.close()
    return watch.stopped, answer


def _drop_read_indexes(database_url: str) -> None:
    """While it catches up, the rebuild keeps only the indexes the fold reads through (see :func:`run`)."""
    engine = make_engine(database_url)
    try:
        drop_read_indexes(engine)
    finally:
        engine.dispose()


def _settle(plan: _Plan) -> None:
    """The rollups worked out from the rows the catching up folded, and the read model's indexes made again (see
    :func:`run`)."""
    engine = make_engine(plan.database_url)
    tune_for_replay(engine)
    try:
        settle_rollups(engine, plan.town)
        prepare_read_model(engine)
    finally:
        engine.dispose()


# -- the target ------------------------------------------------------------------------------------------------


def _prepare_target(database_url: str, topic: str, fresh: bool, ends: Mapping[int, int]) -> dict[int, int]:
    """Make the target ready and say where each partition starts: 0 for a fresh one, else where it got."""
    engine = make_engine(database_url)
    try:
        if fresh:
            fresh_read_model(engine)
            return {}
        recorded = log_positions(engine)
        if topic in recorded:
            prepare_read_model(engine)
            start = recorded[topic]
            if gone := sorted(set(start) - set(ends)):
                raise RebuildError(f"{topic} has no partition {gone} the target got to: --fresh to start over")
            return start
        if recorded:
            other = ", ".join(sorted(recorded))
            raise RebuildError(f"the target holds a rebuild of {other}, not of {topic}: --fresh to start over")
        if holds_read_model(engine):
            raise RebuildError(
                "the target holds a read model that no rebuild is filling (the live one?): "
                "name another database, or --fresh to drop it"
            )
        fresh_read_model(engine)
        return {}
    finally:
        engine.dispose()


def log_end(source: Source) -> dict[int, int]:
    """Partition → the offset after the last record of the source's topic, now."""
    consumer = KafkaConsumer(
        bootstrap_servers=source.bootstrap,
        client_id="gridloop-rebuild",
        enable_auto_commit=False,
        **source.security,
    )
    try:
        partitions = consumer.partitions_for_topic(source.topic)
        if not partitions:
            raise RebuildError(f"the broker at {source.bootstrap} has no topic {source.topic}")
        tps = [TopicPartition(source.topic, p) for p in sorted(partitions)]
        return {tp.partition: int(offset) for tp, offset in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def group_committed(source: Source, group: str) -> dict[int, int]:
    """Partition → the offset ``group`` committed on the source's topic (where it resumes after a restart)."""
    admin = KafkaAdminClient(bootstrap_servers=source.bootstrap, client_id="gridloop-rebuild", **source.security)
    try:
        if hasattr(admin, "list_group_offsets"):
            offsets = admin.list_group_offsets({group: None}).get(group) or {}
        else:
            offsets = admin.list_consumer_group_offsets(group)
        out: dict[int, int] = {}
        for tp, meta in offsets.items():
            offset = getattr(meta, "offset", meta)
            if tp.topic == source.topic and isinstance(offset, int) and offset >= 0:
                out[tp.partition] = offset
        return out
    finally:
        admin.close()


# -- the workers -----------------------------------------------------------------------------------------------


def _save(topic: str) -> Callable[[UnitOfWork, Positions], None]:
    def save(unit: UnitOfWork, positions: Positions) -> None:
        OpsStore(unit).save_positions(topic, positions)

    return save


def _work(plan: _Plan, worker: int, keep_going: Callable[[], bool]) -> None:
    """One worker: fold its partitions into the target."""
    engine = make_engine(plan.database_url)
    tune_for_replay(engine)
    handlers = bind(plan.town, timed=False)
    reads = preload_rolling_up_later if plan.rows_later else preload
    applier = Applier(engine, lambda units: MessageBus(units, handlers, reads), _save(plan.source.topic))
    try:
        asyncio.run(
            replay(
                plan.source,
                plan.assignment[worker],
                applier,
                plan.progress,
                worker,
                plan.batching,
                keep_going=keep_going,
            )
        )
    finally:
        engine.dispose()


def _forked(plan: _Plan, worker: int) -> None:
    """A worker process: the parent stops it (SIGINT is the parent's to handle); it stops if the parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _work(plan, worker, lambda: os.getppid() == plan.parent)
    except BaseException as exc:
        plan.errors.put(f"worker {worker}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        plan.progress.stopping.set()
        raise SystemExit(1) from None
    finally:
        plan.progress.peak_rss_kb[worker] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _workers:
    """The workers, running: forked processes, or one thread of this process (a single worker)."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.processes: list[Any] = []
        self.thread: threading.Thread | None = None

    def __enter__(self) -> _workers:
        plan = self.plan
        if len(plan.assignment) == 1:
            self.thread = threading.Thread(target=self._inline, name="rebuild-worker", daemon=True)
            self.thread.start()
            return self
        context = mp.get_context("fork")
        for worker in range(len(plan.assignment)):
            process = context.Process(target=_forked, args=(plan, worker), name=f"rebuild-worker-{worker}")
            process.start()
            self.processes.append(process)
        return self

    def _inline(self) -> None:
        try:
            _work(self.plan, 0, lambda: True)
        except BaseException as exc:
            self.plan.errors.put(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            self.plan.progress.stopping.set()

    def alive(self) -> bool:
        if self.thread is not None:
            return self.thread.is_alive()
        return any(p.is_alive() for p in self.processes)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every worker to end (at most ``timeout`` seconds); whether they all did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.thread is not None:
            self.thread.join(timeout)
        for process in self.processes:
            process.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self.alive()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:  # the watch failed: the workers end their batch and stop
            self.plan.progress.stopping.set()
        while not self.join(0.5):
            pass
        for worker, process in enumerate(self.processes):
            if process.exitcode not in (0, 1):  # 1: it said why (see _forked)
                self.plan.errors.put(f"worker {worker} ended with exit code {process.exitcode}")


def _raise_worker_errors(plan: _Plan) -> None:
    import queue

    errors: list[str] = []
    while True:
        try:
            errors.append(plan.errors.get(timeout=0.1))
        except queue.Empty:
            break
    if errors:
        log.error("the rebuild failed:\n%s", "\n".join(errors))
        raise RebuildError(errors[0].splitlines()[0])


def _peak_rss_mb(progress: Progress) -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(own + sum(progress.peak_rss_kb[:])) / 1024


# -- watching: progress, follow, swap ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SwapTarget:
    """The running opscenter to swap the rebuilt model into, and an administrator's token for it."""

    url: str
    token: str
    hold_s: float = 60.0
    """How long the service holds its fold for the swap at most (it resumes on its own model after that)."""


class _Watch:
    """The main process's side: shows progress, stops at ``stop_after``, follows the log's end, swaps."""

    def __init__(
        self, plan: _Plan, options: Options, ends: Mapping[int, int], start: Mapping[int, int], following: bool
    ) -> None:
        self.plan = plan
        self.options = options
        self.following = following
        self.ends = dict(ends)
        self.start = dict(start)
        self.stopped = False
        self._bar = _Bar(enabled=options.progress and sys.stderr.isatty())
        self._ends_at = time.monotonic()

    def until_done(self, running: _workers, swap: SwapTarget | None) -> dict[str, Any] | None:
        progress = self.plan.progress
        while running.alive():
            running.join(0.25)
            self._show()
            if self.options.stop_after and progress.total_applied() >= self.options.stop_after:
                progress.stopping.set()
                self.stopped = True
            if self.following:
                self._refresh_ends()
                if swap is not None and not progress.stopping.is_set() and self._caught_up():
                    return swap_into(self.plan, running, swap, self._show)
        self._show()
        return None

    def _refresh_ends(self) -> None:
        if time.monotonic() - self._ends_at >= 1.0:
            self.ends = log_end(self.plan.source)
            self._ends_at = time.monotonic()

    def _caught_up(self) -> bool:
        """Whether what is left to fold is less than a batch (a moment's work)."""
        positions = self.plan.progress.position()
        lag = sum(max(0, self.ends[p] - positions.get(p, 0)) for p in self.ends)
        return lag < self.plan.batching.size

    def _show(self) -> None:
        progress = self.plan.progress
        positions = progress.position()
        ends = {p: (self.ends[p] if progress.stops[p] == FOLLOW else progress.stops[p]) for p in positions}
        total = sum(max(0, ends[p] - self.start.get(p, 0)) for p in positions)
        done = sum(max(0, positions[p] - self.start.get(p, 0)) for p in positions)
        self._bar.update(done, total, progress.total_skipped())

    def close(self) -> None:
        self._bar.close()


class _Bar:
    """A rich progress bar on standard error: records folded, events/s, the time left."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        self._rate: list[tuple[float, int]] = []
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("rebuild"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>7,.0f} events/s"),
                TextColumn("{task.fields[skipped]} set aside"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("rebuild", total=None, rate=0.0, skipped=0)

    def update(self, done: int, total: int, skipped: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        self._rate.append((now, done))
        while len(self._rate) > 2 and now - self._rate[0][0] > 10:
            self._rate.pop(0)
        (t0, d0) = self._rate[0]
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        self._progress.update(self._task, completed=done, total=max(total, done), rate=rate, skipped=skipped)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


# -- the swap: the rebuilding side --------------------------------------------------------------------------------


def swap_into(
    plan: _Plan, running: _workers, target: SwapTarget, show: Callable[[], None] = lambda: None
) -> dict[str, Any]:
    """Swap the rebuilt model (caught up with the log, workers following) into the running service.

    1. The service holds its fold (``POST /admin/fold/pause``): the batch it is applying is committed, the next
       waits. It answers the positions it has folded.
    2. The log's end is read now: nothing the service has folded or will fold before resuming lies past it.
       The workers fold up to it and stop.
    3. The rebuilt model is checked against the service's positions and its consumer group's committed offsets
       (where it would resume after a restart): it must have folded at least as far.
    4. The service switches to the rebuilt database (``POST /admin/read-model/swap``) and resumes: what it held
       and what comes next is applied there; an event the rebuild folded already is skipped by its claim.

    Whatever fails, the service resumes on its own model (on its own at the end of the hold, if need be), and
    the rebuild can be run again: it resumes from what it committed."""
    import httpx

    progress = plan.progress
    client = httpx.Client(base_url=target.url, headers={"Authorization": f"Bearer {target.token}"}, timeout=30)
    try:
        answer = _ok(client.post("/admin/fold/pause", json={"hold_s": target.hold_s}), "pause the live fold")
        hold_id = str(answer["hold_id"])
        deadline = time.monotonic() + target.hold_s * 0.8
        try:
            ends = log_end(plan.source)
            for p, end in ends.items():
                progress.stops[p] = max(end, int(progress.positions[p]))
            while not running.join(0.25):
                show()
                if time.monotonic() > deadline:
                    raise RebuildError(f"not caught up within the hold ({target.hold_s:.0f} s)")
            show()
            _raise_worker_errors(plan)
            positions = progress.position()
            live = {int(p): int(o) for p, o in (answer.get("positions") or {}).get(plan.source.topic, {}).items()}
            committed = group_committed(plan.source, consumer_group("opscenter"))
            behind = {
                p: (positions.get(p, 0), max(live.get(p, 0), committed.get(p, 0)))
                for p in set(live) | set(committed)
                if positions.get(p, 0) < max(live.get(p, 0), committed.get(p, 0))
            }
            if behind:
                raise RebuildError(f"the rebuilt model is behind the live fold: {behind}")
            settle(make_engine(plan.database_url))
            body = {"hold_id": hold_id, "database_url": absolute_url(plan.database_url)}
            return dict(_ok(client.post("/admin/read-model/swap", json=body), "swap the read model in"))
        except BaseException:
            try:
                client.post("/admin/fold/resume", json={"hold_id": hold_id})
            except Exception:  # the hold ends on its own
                log.warning("the live fold was not told to resume; it will when its hold ends")
            raise
    finally:
        client.close()


def _ok(response: Any, what: str) -> dict[str, Any]:
    if response.status_code != 200:
        raise RebuildError(f"could not {what}: {response.status_code} {response.text}")
    return dict(response.json())


# -- reading the result ------------------------------------------------------------------------------------------


def kpi_report(db: Db, period: Period, at: date, by: Dimension, now: datetime, town: Town = GAOHANG) -> KpiReport:
    """The KPIs of the read model ``db`` reads (a connection or a session of its database): how a rebuilt read
    model is compared with the live one."""
    return kpis.kpi_report(ReadModel(db), period, at, by, now, town)


def report(database_url: str, period: Period, at: date, by: Dimension, now: datetime | None = None) -> KpiReport:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return kpi_report(connection, period, at, by, now or utcnow())
    finally:
        engine.dispose()


__all__ = [
    "Options",
    "Outcome",
    "RebuildError",
    "SwapTarget",
    "group_committed",
    "kpi_report",
    "log_end",
    "rebuild",
    "report",
    "run",
    "swap_into",
]
