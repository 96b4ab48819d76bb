"""Run every gridloop service as its own process.

* In the foreground (``python -m services.supervisor``, behind ``make run``): honcho runs them all with their
  output interleaved; Ctrl-C or SIGTERM stops them all.
* In the background, for a program that needs the services while it does something else (the simulator, tests)::

      with start_background({"GRIDLOOP_TOPIC_NAMESPACE": "t1"}, Path("var/log")) as group:
          group.wait_healthy(120)
          httpx.post(group.urls["intake"] + "/reports", json=...)

Each service runs as ``<python> -m services.<name>``; its address is read from its own settings class, so the
same environment overrides the service honours (``GRIDLOOP_INTAKE_HTTP_PORT``…) are honoured here.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import honcho.manager as honcho_manager
import httpx
from honcho.manager import Manager
from honcho.printer import Message, Printer
from pydantic import ValidationError

from schemas.topics import namespace
from services.common.settings import ServiceSettings

STOP_TIMEOUT_S = 20.0
"""How long a service gets to stop after SIGTERM before it is killed."""


class ServiceFailed(RuntimeError):
    """A service could not be started, or exited while it should be running."""


@dataclass(frozen=True, slots=True)
class Service:
    """One service the supervisor runs: module ``services.<name>``, settings in ``services.<name>.settings``."""

    name: str
    optional: bool = False
    """Run only if its module exists."""

    @property
    def module(self) -> str:
        return f"services.{self.name}"

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module]

    def settings_class(self) -> type[ServiceSettings]:
        module = importlib.import_module(f"{self.module}.settings")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, ServiceSettings)
                and value is not ServiceSettings
                and self.name == value.SERVICE
            ):
                return value
        raise LookupError(f"{module.__name__} defines no ServiceSettings subclass with SERVICE = {self.name!r}")

    def settings(self, env: Mapping[str, str] | None = None) -> ServiceSettings:
        """The service's settings as it will see them: this environment, with ``env`` on top."""
        with _environ(env):
            try:
                return self.settings_class()()
            except ValidationError as exc:
                raise ServiceFailed(f"settings of {self.name} are invalid: {exc}") from None

    def address(self, env: Mapping[str, str] | None = None) -> tuple[str, int]:
        """Host and port the service's HTTP API binds to."""
        s = self.settings(env)
        return s.http_host, s.http_port

    def url(self, env: Mapping[str, str] | None = None) -> str:
        """Base URL of the service's HTTP API."""
        s = self.settings(env)
        host = "127.0.0.1" if s.http_host in ("", "0.0.0.0") else "[::1]" if s.http_host == "::" else s.http_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{s.http_port}"


SERVICES: list[Service] = [
    Service("intake"),
    Service("dispatch"),
    Service("handling"),
    Service("verification"),
    Service("opscenter", optional=True),
]


def select_services(only: Iterable[str] | None = None, without: Iterable[str] = ()) -> list[Service]:
    """The services to run: all (``opscenter`` only once it exists), or just ``only``, minus ``without``."""
    known = {s.name: s for s in SERVICES}
    wanted, skipped = (set(only) if only else None), set(without)
    unknown = (wanted or set()) | skipped
    unknown -= set(known)
    if unknown:
        raise ServiceFailed(f"unknown service(s): {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    chosen: list[Service] = []
    for service in SERVICES:
        if service.name in skipped or (wanted is not None and service.name not in wanted):
            continue
        if not service.available():
            if service.optional and wanted is None:
                continue
            raise ServiceFailed(f"module {service.module} does not exist")
        chosen.append(service)
    return chosen


def port_free(host: str, port: int) -> bool:
    """Whether nothing listens on ``host:port`` (connections lingering in TIME_WAIT do not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def check_addresses(services: Iterable[Service], env: Mapping[str, str] | None = None) -> None:
    """ServiceFailed if two services would share a port or a port is taken (by another run, most likely)."""
    problems: list[str] = []
    owner: dict[int, str] = {}
    for service in services:
        host, port = service.address(env)
        setting = f"GRIDLOOP_{service.name.upper()}_HTTP_PORT"
        if port in owner:
            problems.append(f"{service.name} and {owner[port]} are both configured for port {port} (set {setting})")
        elif not port_free(host, port):
            problems.append(f"port {port} of {service.name} is in use by another program (set {setting})")
        owner.setdefault(port, service.name)
    if problems:
        raise ServiceFailed("; ".join(problems))


_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _environ(overrides: Mapping[str, str] | None) -> Iterator[None]:
    """Settings read ``os.environ``: lay ``overrides`` over it for the duration, then put it back."""
    if not overrides:
        yield
        return
    with _ENV_LOCK:
        saved = {key: os.environ.get(key) for key in overrides}
        os.environ.update(overrides)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def is_healthy(client: httpx.Client, service: str, url: str) -> bool:
    """Whether ``url``/health answers as ``service`` (not another program that took the port)."""
    try:
        response = client.get(f"{url}/health")
        body = response.json() if response.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return False
    return isinstance(body, dict) and body.get("status") == "ok" and body.get("service") == service


def child_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **(overrides or {})}


# -- in the background -------------------------------------------------------------------------------


class ServiceGroup:
    """Services started by :func:`start_background`; a context manager that stops them on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: dict[str, str] = {}
        """Service name → base URL of its API."""
        self._logs: dict[str, IO[bytes]] = {}

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self, service: Service, env: Mapping[str, str] | None = None) -> None:
        url = service.url(env)
        log = self.log_path(service.name).open("wb")
        try:
            proc = subprocess.Popen(
                service.command(),
                env=child_env(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for the caller reaches the services through stop()
            )
        except BaseException:
            log.close()
            raise
        self.procs[service.name], self.urls[service.name], self._logs[service.name] = proc, url, log

    def exited(self) -> dict[str, int]:
        """Services that are no longer running, with their exit code."""
        return {name: rc for name, proc in self.procs.items() if (rc := proc.poll()) is not None}

    def tail(self, name: str, lines: int = 20) -> str:
        try:
            text = self.log_path(name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_healthy(self, timeout: float = 120.0) -> None:
        """Block until every service answers /health; ServiceFailed if one exits, TimeoutError if too slow."""
        deadline = time.monotonic() + timeout
        pending = dict(self.urls)
        with httpx.Client(timeout=2.0) as client:
            while True:
                for name, url in list(pending.items()):
                    rc = self.procs[name].poll()
                    if rc is not None:
                        raise ServiceFailed(
                            f"{name} exited with code {rc} before it was up; {self.log_path(name)} ends with:\n"
                            f"{self.tail(name)}"
                        )
                    if is_healthy(client, name, url):
                        del pending[name]
                if not pending:
                    return
                if time.monotonic() >= deadline:
                    logs = ", ".join(str(self.log_path(n)) for n in pending)
                    raise TimeoutError(f"not up after {timeout:.0f} s: {', '.join(pending)} (see {logs})")
                time.sleep(0.25)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> dict[str, int]:
        """SIGTERM every service, wait up to ``timeout`` seconds, then SIGKILL what is left. Returns exit codes."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                codes[name] = proc.wait()
        for log in self._logs.values():
            log.close()
        return codes

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_background(
    env: dict[str, str] | None,
    log_dir: Path,
    *,
    services: Iterable[str] | None = None,
) -> ServiceGroup:
    """Start the services (all of them, or just ``services``) without waiting for them; returns at once.

    Each inherits this environment with ``env`` on top; its output goes to ``log_dir/<name>.log``.
    Call :meth:`ServiceGroup.wait_healthy` before using them and :meth:`ServiceGroup.stop` (or use the group
    as a context manager) to stop them.
    """
    chosen = select_services(services)
    check_addresses(chosen, env)
    log_dir.mkdir(parents=True, exist_ok=True)
    group = ServiceGroup(log_dir)
    try:
        for service in chosen:
            group.start(service, env)
    except BaseException:
        group.stop()
        raise
    return group


# -- in the foreground -------------------------------------------------------------------------------


class _Manager(Manager):  # type: ignore[misc]
    """honcho's manager, remembering whether the stop was asked for (a signal) or forced by a service's exit."""

    def __init__(self, printer: Printer) -> None:
        super().__init__(printer)
        self.stopping = threading.Event()
        self.stop_requested = False
        self.failure: str | None = None

    def terminate(self) -> None:
        if not self.stopping.is_set():
            self.stop_requested = not self._any_stopped()
            self.stopping.set()
        super().terminate()

    def all_started(self) -> bool:
        return bool(self._all_started())

    def say(self, text: str) -> None:
        """A line of the supervisor's own, printed in turn with the services' output."""
        self.events.put(Message(type="line", data=f"{text}\n", time=datetime.now(), name="system", colour=None))


def _watch_health(manager: _Manager, urls: Mapping[str, str], timeout: float) -> None:
    """Print each API's address once it answers, then "gridloop is up"; stop everything if that takes too long."""
    while not manager.all_started():
        if manager.stopping.wait(0.1):
            return
    deadline = time.monotonic() + timeout
    pending = dict(urls)
    with httpx.Client(timeout=2.0) as client:
        while pending:
            for name, url in list(pending.items()):
                if is_healthy(client, name, url):
                    manager.say(f"{name:<12} {url}  (docs {url}/docs)")
                    del pending[name]
            if not pending:
                break
            if time.monotonic() >= deadline:
                manager.failure = f"not up after {timeout:.0f} s: {', '.join(pending)}"
                manager.say(f"{manager.failure}; stopping everything")
                time.sleep(0.3)  # let that line out before honcho reports the signal
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if manager.stopping.wait(0.5):
                return
    if not manager.stopping.is_set():
        manager.say("gridloop is up (Ctrl-C stops every service)")


def run_foreground(services: Iterable[Service], health_timeout: float = 150.0) -> int:
    """Run ``services`` under honcho until Ctrl-C/SIGTERM or until one exits. Returns the exit code:
    0 after a requested stop, non-zero when a service died or the services did not come up in time.
    ServiceFailed (before anything starts) if a port is taken."""
    chosen = list(services)
    check_addresses(chosen)
    urls = {s.name: s.url() for s in chosen}
    printer = Printer(sys.stdout)
    manager = _Manager(printer)
    env = child_env()
    for service in chosen:
        # honcho runs a shell command line; ``exec`` makes the service itself the process honcho watches
        manager.add_process(service.name, f"exec {shlex.join(service.command())}", env=env)
    printer.write(
        Message(
            type="line",
            data=f"starting {', '.join(urls)} (topic namespace {namespace()!r}); Ctrl-C stops them\n",
            time=datetime.now(),
            name="system",
            colour=None,
        )
    )
    honcho_manager.KILL_WAIT = STOP_TIMEOUT_S  # faust leaves its consumer group cleanly within this
    watcher = threading.Thread(target=_watch_health, args=(manager, urls, health_timeout), daemon=True)
    watcher.start()
    manager.loop()
    if manager.failure:
        return 1
    if manager.stop_requested:
        return 0
    code = int(manager.returncode or 1)
    return code if code > 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it


__all__ = [
    "SERVICES",
    "STOP_TIMEOUT_S",
    "Service",
    "ServiceFailed",
    "ServiceGroup",
    "check_addresses",
    "is_healthy",
    "port_free",
    "run_foreground",
    "select_services",
    "start_background",
]
