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
        while not self._stop.wait(self.interval_s):
            now = time.time()
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
