"""A small chaos run, for real: its own broker, every service as a pair, 150 incidents through the public APIs,
one SIGKILL of an instance of every service and one of the broker — and nothing lost or done twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.supervisor import port_free
from tests.kafka_support import PORT_OFFSET

pytestmark = pytest.mark.kafka


def _free_block(start: int, size: int, step: int, tries: int = 40) -> int:
    """The first port from ``start`` (in ``step``s) with ``size`` free ports after it."""
    for base in range(start, start + step * tries, step):
        if all(port_free("127.0.0.1", p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no {size} free ports from {start}")


@pytest.mark.timeout(600)
def test_small_chaos_run_loses_nothing_and_does_nothing_twice(tmp_path: Path) -> None:
    base_port = _free_block(8430 + PORT_OFFSET, 10, 10)
    kafka_port = _free_block(19492 + PORT_OFFSET, 2, 10)
    command = [
        sys.executable,
        "-m",
        "services.chaos",
        "run",
        "--incidents",
        "150",
        "--kills",
        "1",
        "--broker-kills",
        "1",
        "--together",
        "--pairs",
        "--last-kill-at",
        "0.5",
        "--var-dir",
        str(tmp_path / "chaos"),
        "--base-port",
        str(base_port),
        "--kafka-port",
        str(kafka_port),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDLOOP_")}
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the run stops its services and its broker on SIGTERM
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C, the test's timeout): the run still cleans up after itself
            proc.terminate()
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
    took = time.monotonic() - started
    lines = stdout.strip().splitlines()
    tail = "\n".join(lines[-60:]) + "\n" + stderr[-3000:]
    assert lines, f"no output (exit {proc.returncode}):\n{tail}"
    result = json.loads(lines[-1])
    assert set(result) == {"incidents", "terminal", "lost", "duplicate_transitions", "kills", "max_recovery_s"}
    assert result["lost"] == 0, tail
    assert result["duplicate_transitions"] == 0, tail
    assert result["incidents"] == 150 and result["terminal"] == 150, tail
    assert result["kills"] == 6, tail  # one instance of each of the five services, and the broker
    assert proc.returncode == 0, tail
    assert any("took over" in line for line in lines), tail  # the survivor of a pair took the partitions
    print(f"chaos run of 150 incidents took {took:.0f} s: {lines[-1]}")
