"""Everything a chaos run owns and breaks: its own Kafka broker, every service (as a pair), and a probe that reads
consumer groups (members, assignments, lag) from the broker.

* :class:`Broker` is ``infra/kafka/kafka.sh`` under the run's own var dir and port, so SIGKILLing it touches no
  one else's broker.
* :class:`Instance` is one ``python -m services.<name>`` process; :class:`Fleet` holds them all and restarts any
  that dies when it should not (the job of a supervisor in production).
* :class:`Probe` asks the broker, through kafka-python, who holds which partition and how far behind each
  service's consumer group is.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from schemas.topics import FEEDBACK, INCIDENTS_CLOSED, INCIDENTS_REPORTED, LIFECYCLE, VERIFICATION, WORKORDERS, Topic
from schemas.topics import namespace as topic_namespace
from services.common.settings import REPO_ROOT
from services.supervisor import Service, is_healthy, port_free

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"(read|open)_text is deprecated", category=DeprecationWarning)
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

SERVICE_NAMES = ("intake", "dispatch", "handling", "verification", "opscenter")

CONSUMES: dict[str, tuple[Topic, ...]] = {
    "intake": (LIFECYCLE,),
    "dispatch": (INCIDENTS_REPORTED, FEEDBACK, VERIFICATION),
    "handling": (WORKORDERS, INCIDENTS_CLOSED),
    "verification": (VERIFICATION,),
    "opscenter": (LIFECYCLE,),
}
"""The topics each service's consumer group reads (its agents' CONSUMES)."""

KAFKA_SH = REPO_ROOT / "infra" / "kafka" / "kafka.sh"


def group_id(service: str) -> str:
    """The consumer group of a service: its faust app id."""
    return f"{topic_namespace()}-{service}"


# -- the broker -----------------------------------------------------------------------------------------------


class Broker:
    """A broker of the run's own: ``kafka.sh`` with ``GRIDLOOP_VAR_DIR`` and ``KAFKA_PORT`` set."""

    def __init__(self, var_dir: Path, port: int, log: IO[str]) -> None:
        self.var_dir, self.port, self.log = var_dir, port, log

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _sh(self, command: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "GRIDLOOP_VAR_DIR": str(self.var_dir), "KAFKA_PORT": str(self.port)}
        env.setdefault("KAFKA_START_TIMEOUT", "150")
        env.setdefault("KAFKA_STOP_TIMEOUT", "20")
        return subprocess.run(
            ["bash", str(KAFKA_SH), command],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def up(self) -> None:
        done = self._sh("up")
        self.log.write(done.stdout + done.stderr)
        self.log.flush()
        if done.returncode != 0:
            raise RuntimeError(f"chaos broker on port {self.port} did not start:\n{done.stdout}{done.stderr}")

    def down(self) -> None:
        done = self._sh("down", timeout=90)
        self.log.write(done.stdout + done.stderr)
        self.log.flush()

    def pid(self) -> int | None:
        try:
            text = (self.var_dir / "kafka" / "broker.pid").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def kill(self) -> int:
        """SIGKILL the broker's JVM (the pid kafka.sh recorded for this var dir); returns the pid."""
        pid = self.pid()
        if pid is None:
            raise RuntimeError("the chaos broker has no pid file: is it running?")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        return pid


def _inherited_env() -> dict[str, str]:
    """This process's environment without gridloop's and faust's settings: the run sets its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("GRIDLOOP_", "BROKER_"))}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()
        return stat[0] != "Z"
    except OSError:
        return False


# -- service processes --------------------------------------------------------------------------------------


@dataclass
class Instance:
    """One process of a service: ``name`` is the service, ``tag`` the instance (``a``/``b``, or ``""`` alone)."""

    service: str
    tag: str
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    expected_down: bool = False
    """Set while the run itself holds the instance down (between a kill and its restart)."""
    unexpected_exits: list[tuple[float, int]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.service}-{self.tag}" if self.tag else self.service

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        if not port_free("127.0.0.1", self.port):
            # a killed process's port is free at once; give a lingering one a moment
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not port_free("127.0.0.1", self.port):
                time.sleep(0.2)
        with self.log_path.open("ab") as log:
            log.write(f"\n==== start #{self.starts + 1} of {self.label} at {time.strftime('%H:%M:%S')} ====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                Service(self.service).command(),
                env={**_inherited_env(), "PYTHONUNBUFFERED": "1", **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=str(REPO_ROOT),
            )
        self.starts += 1
        self.expected_down = False

    def kill(self) -> int:
        """SIGKILL, as a power cut would; returns the pid."""
        assert self.proc is not None
        self.expected_down = True
        pid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        return pid

    def exited(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def stop(self, timeout: float = 25.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        self.expected_down = True
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
        return self.proc.wait()

    def healthy(self, client: httpx.Client) -> bool:
        return self.exited() is None and is_healthy(client, self.service, self.url)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Fleet:
    """Every service instance of the run."""

    def __init__(
        self,
        base_env: Mapping[str, str],
        log_dir: Path,
        base_port: int,
        pairs: bool,
        services: Iterable[str] = SERVICE_NAMES,
    ) -> None:
        self.instances: list[Instance] = []
        self.pairs = pairs
        log_dir.mkdir(parents=True, exist_ok=True)
        names = list(services)
        tags = ("a", "b") if pairs else ("",)
        for t, tag in enumerate(tags):
            for i, name in enumerate(names):
                port = base_port + t * len(names) + i
                env = {**base_env, f"GRIDLOOP_{name.upper()}_HTTP_PORT": str(port)}
                if tag:
                    env["GRIDLOOP_INSTANCE"] = tag
                self.instances.append(Instance(name, tag, port, env, log_dir / f"{name}{'-' + tag if tag else ''}.log"))

    def of(self, service: str) -> list[Instance]:
        return [i for i in self.instances if i.service == service]

    def urls(self, service: str) -> list[str]:
        return [i.url for i in self.of(service)]

    def get(self, label: str) -> Instance:
        for inst in self.instances:
            if inst.label == label:
                return inst
        raise KeyError(label)

    def check_ports(self) -> None:
        taken = [f"{i.label}:{i.port}" for i in self.instances if not port_free("127.0.0.1", i.port)]
        if taken:
            raise RuntimeError(f"ports already in use: {', '.join(taken)} (choose another --base-port)")

    def start_all(self) -> None:
        for inst in self.instances:
            inst.start()

    def wait_healthy(self, timeout: float, only: Iterable[Instance] | None = None, starts: int = 3) -> None:
        """Until every instance answers /health; one that exits while starting (it gave up waiting for a slow
        broker, say) is started again, up to ``starts`` starts in all."""
        pending = list(only) if only is not None else list(self.instances)
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for inst in list(pending):
                    rc = inst.exited()
                    if rc is not None and inst.starts < starts:
                        inst.start()
                        continue
                    if rc is not None:
                        raise RuntimeError(f"{inst.label} exited with {rc} while starting:\n{inst.log_tail()}")
                    if inst.healthy(client):
                        pending.remove(inst)
                if not pending:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not healthy after {timeout:.0f} s: {', '.join(i.label for i in pending)}")
                time.sleep(0.3)

    def revive_crashed(self) -> list[Instance]:
        """Restart every instance that exited although the run did not stop it (a supervisor's job)."""
        revived = []
        for inst in self.instances:
            rc = inst.exited()
            if rc is not None and not inst.expected_down:
                inst.unexpected_exits.append((time.time(), rc))
                inst.start()
                revived.append(inst)
        return revived

    def stop_all(self, timeout: float = 25.0) -> dict[str, int | None]:
        for inst in self.instances:
            inst.expected_down = True
            if inst.proc is not None and inst.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    inst.proc.send_signal(signal.SIGTERM)
        codes = {}
        for inst in self.instances:
            codes[inst.label] = inst.stop(timeout)
        return codes


# -- reading the consumer groups ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupView:
    """A consumer group as the broker describes it at one moment."""

    state: str
    members: dict[str, frozenset[tuple[str, int]]]
    """Member id → the (topic, partition) pairs assigned to it."""
    ports: dict[str, int]
    """Member id → the HTTP port its worker announced (faust's canonical URL): which instance it is."""
    lag: int | None
    """Records on the group's topics not yet committed by it; None when the offsets could not be read."""

    def assigned(self) -> frozenset[tuple[str, int]]:
        return frozenset(tp for parts in self.members.values() for tp in parts)

    def holders(self) -> int:
        return sum(1 for parts in self.members.values() if parts)

    def held_by_port(self, port: int) -> frozenset[tuple[str, int]]:
        return frozenset(tp for mid, parts in self.members.items() if self.ports.get(mid) == port for tp in parts)


class Probe:
    """kafka-python clients of its own, recreated after the broker comes back."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._admin: KafkaAdminClient | None = None
        self._consumer: KafkaConsumer | None = None
        self._partitions: dict[str, list[int]] = {}

    def close(self) -> None:
        for client in (self._admin, self._consumer):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        self._admin = self._consumer = None

    def _clients(self) -> tuple[KafkaAdminClient, KafkaConsumer]:
        if self._admin is None:
            self._admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap, client_id="gridloop-chaos-probe", request_timeout_ms=5000
            )
        if self._consumer is None:
            self._consumer = KafkaConsumer(
                bootstrap_servers=self.bootstrap,
                client_id="gridloop-chaos-probe",
                enable_auto_commit=False,
                request_timeout_ms=5000,
            )
        return self._admin, self._consumer

    def partitions(self, topic: str) -> list[int]:
        if topic not in self._partitions:
            _, consumer = self._clients()
            parts = sorted(consumer.partitions_for_topic(topic) or [])
            if not parts:
                raise RuntimeError(f"no partitions known for {topic}")
            self._partitions[topic] = parts
        return self._partitions[topic]

    def group(self, service: str) -> GroupView:
        """Members, assignments and lag of ``service``'s consumer group. Raises if the broker does not answer."""
        try:
            return self._group(service)
        except Exception:
            self.close()
            raise

    def _group(self, service: str) -> GroupView:
        admin, consumer = self._clients()
        gid = group_id(service)
        described: Any = admin.describe_groups([gid])[gid]
        members: dict[str, frozenset[tuple[str, int]]] = {}
        ports: dict[str, int] = {}
        for member in described.get("members") or []:
            mid = str(member.get("member_id"))
            members[mid] = frozenset(_assignment_pairs(member.get("member_assignment")))
            found = _URL_PORT.search(str(member.get("member_metadata") or ""))
            if found:
                ports[mid] = int(found.group(1))
        topics = [t.name for t in CONSUMES[service]]
        tps = [TopicPartition(t, p) for t in topics for p in self.partitions(t)]
        lag: int | None = None
        with contextlib.suppress(Exception):
            committed = admin.list_group_offsets({gid: tps}).get(gid, {})
            ends = consumer.end_offsets(tps)
            lag = 0
            for tp in tps:
                meta = committed.get(tp)
                done = meta.offset if meta is not None and meta.offset is not None and meta.offset >= 0 else 0
                lag += max(0, int(ends.get(tp, 0)) - int(done))
        return GroupView(str(described.get("group_state") or described.get("state") or "?"), members, ports, lag)

    def all_partitions(self, service: str) -> frozenset[tuple[str, int]]:
        return frozenset((t.name, p) for t in CONSUMES[service] for p in self.partitions(t.name))


_URL_PORT = re.compile(r'"url"\s*:\s*"https?://[^"/]*:(\d+)')


def _assignment_pairs(assignment: Any) -> list[tuple[str, int]]:
    """(topic, partition) pairs of a decoded consumer-protocol assignment, whatever shape kafka-python gave it."""
    if assignment is None or isinstance(assignment, bytes | bytearray):
        return []
    if isinstance(assignment, dict):
        parts = assignment.get("assigned_partitions") or assignment.get("assignment") or []
    else:
        parts = getattr(assignment, "assigned_partitions", None) or getattr(assignment, "assignment", None) or []
    pairs: list[tuple[str, int]] = []
    for entry in parts:
        if isinstance(entry, dict):
            topic, partitions = entry.get("topic"), entry.get("partitions") or []
        elif isinstance(entry, tuple | list) and len(entry) == 2:
            topic, partitions = entry
        else:
            topic, partitions = getattr(entry, "topic", None), getattr(entry, "partitions", [])
        pairs.extend((str(topic), int(p)) for p in partitions)
    return pairs


def describe_parts(parts: Iterable[tuple[str, int]]) -> str:
    """``lifecycle[0,2,4] reported[1]``: partitions grouped by topic, topic names without the namespace."""
    by_topic: dict[str, list[int]] = {}
    for topic, p in parts:
        by_topic.setdefault(topic.split(".", 1)[-1], []).append(p)
    return " ".join(f"{t}[{','.join(str(p) for p in sorted(ps))}]" for t, ps in sorted(by_topic.items())) or "-"


def python() -> str:
    return sys.executable
