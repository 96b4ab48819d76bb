"""CPU and memory of the services, the broker and the driver, sampled with psutil every half second."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from services.common.settings import REPO_ROOT


def broker_pid(var_dir: Path | None = None) -> int | None:
    """The broker's pid from ``var/kafka/broker.pid`` (where ``infra/kafka/kafka.sh`` writes it), if alive."""
    path = (var_dir or REPO_ROOT / "var") / "kafka" / "broker.pid"
    try:
        pid = int("".join(c for c in path.read_text() if c.isdigit()))
    except (OSError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) else None


MACHINE = "machine"
"""The whole machine: CPU of every process (ours and others'), in % of one core; memory in use."""
STEAL = "steal"
"""CPU this virtual machine wanted and its host gave to others (part of the machine's busy figure), in % of one
core: when it rises, every process slows together, whatever the code does."""


PROBE_ROUNDS = 50_000
"""The host probe's fixed piece of work: a few milliseconds of pure Python on this machine kind."""


def probe_ms(rounds: int = PROBE_ROUNDS) -> float:
    """CPU milliseconds this thread takes for a fixed piece of pure-Python work.

    On a virtual machine whose host runs others' work beside it, the same code runs slower at some times than at
    others, and this guest does not always see it as steal: a step measured while the host is busy closes fewer
    incidents for every process's CPU. The probe counts only its own thread's running time, so a machine kept busy
    by the benchmark itself does not inflate it; a slower host does."""
    started = time.thread_time()
    acc = 0
    for i in range(rounds):
        acc += i * i % 7
    return (time.thread_time() - started) * 1000


@dataclass
class Sample:
    t: float
    cpu: float
    """Percent of one core since the previous sample."""
    rss_mb: float


@dataclass
class Monitor:
    """Samples every process in ``pids`` (name → pid) in a background thread until :meth:`stop`."""

    pids: Mapping[str, int]
    interval_s: float = 0.5
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    steal: list[tuple[float, float]] = field(default_factory=list)
    """(time, % of one core stolen by the host since the previous sample)."""
    probe_every_s: float = 5.0
    probes: list[tuple[float, float]] = field(default_factory=list)
    """(time, :func:`probe_ms`): how fast the host ran a fixed piece of work."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Monitor:
        procs: dict[str, psutil.Process] = {}
        for name, pid in self.pids.items():
            try:
                procs[name] = psutil.Process(pid)
                procs[name].cpu_percent(None)  # the first call only sets the baseline
            except psutil.NoSuchProcess:
                continue
            self.samples[name] = []
        self.samples[MACHINE] = []
        psutil.cpu_percent(None)
        psutil.cpu_times_percent(None)
        self._thread = threading.Thread(target=self._run, args=(procs,), name="bench-monitor", daemon=True)
        self._thread.start()
        return self

    def _run(self, procs: dict[str, psutil.Process]) -> None:
        cores = psutil.cpu_count() or 1
        last_probe = 0.0
        while not self._stop.wait(self.interval_s):
            now = time.time()
            if now - last_probe >= self.probe_every_s:
                self.probes.append((now, probe_ms()))
                last_probe = now
            busy = psutil.cpu_percent(None) * cores  # % of one core, like the processes' figures
            self.samples[MACHINE].append(Sample(now, busy, psutil.virtual_memory().used / 2**20))
            self.steal.append((now, getattr(psutil.cpu_times_percent(None), "steal", 0.0) * cores))
            for name, proc in list(procs.items()):
                try:
                    with proc.oneshot():
                        cpu, rss = proc.cpu_percent(None), proc.memory_info().rss / 2**20
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    del procs[name]
                    continue
                self.samples[name].append(Sample(now, cpu, rss))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    # -- reading ------------------------------------------------------------------------------------------

    def between(self, name: str, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples.get(name, []) if start <= s.t <= end]

    def cpu_avg(self, start: float, end: float) -> dict[str, float]:
        """Average CPU (% of one core) per process between two epoch times, the machine's and what the host
        stole."""
        out: dict[str, float] = {}
        for name in self.samples:
            window = self.between(name, start, end)
            if window:
                out[name] = sum(s.cpu for s in window) / len(window)
        stolen = [v for t, v in self.steal if start <= t <= end]
        if stolen:
            out[STEAL] = sum(stolen) / len(stolen)
        return out

    def probe_median(self, start: float, end: float) -> float | None:
        """The median host probe between two epoch times (ms; lower is a faster host), None without one."""
        window = sorted(v for t, v in self.probes if start <= t <= end)
        if not window:
            return None
        mid = len(window) // 2
        return window[mid] if len(window) % 2 else (window[mid - 1] + window[mid]) / 2

    def peak_rss(self, start: float = 0.0, end: float = float("inf")) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in self.samples:
            if name == MACHINE:
                continue
            window = self.between(name, start, end)
            if window:
                out[name] = max(s.rss_mb for s in window)
        return out

    def rss_series(self, name: str) -> list[tuple[float, float]]:
        return [(s.t, s.rss_mb) for s in self.samples.get(name, [])]
