"""The door of the running services, over real sockets: bodies over the limit are refused before they are read, and
every answer carries the security headers."""

from __future__ import annotations

import contextlib
import select
import socket
import time

import httpx
import psutil  # type: ignore[import-untyped]
import pytest

from services.common.edge import SECURITY_HEADERS
from tests.e2e.conftest import Town

pytestmark = pytest.mark.kafka

FIFTY_MB = 50 * 1024 * 1024
LIMIT = 1024 * 1024
"""GRIDLOOP_BODY_LIMIT_BYTES as the town runs it: the default."""


def _intake(town: Town) -> int:
    return town.port["GRIDLOOP_INTAKE_HTTP_PORT"]


def _head(path: str, *fields: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *fields, "", ""]
    return "\r\n".join(lines).encode()


def _answer(sock: socket.socket, timeout: float) -> bytes:
    """What the server answered, up to the end of its head (empty if nothing came within ``timeout``)."""
    sock.settimeout(timeout)
    got = b""
    try:
        while b"\r\n\r\n" not in got:
            part = sock.recv(65536)
            if not part:
                break
            got += part
    except (TimeoutError, ConnectionResetError):
        pass
    return got


def _service_process(name: str) -> psutil.Process:
    for proc in psutil.Process().children(recursive=True):
        try:
            if f"services.{name}" in " ".join(proc.cmdline()):
                return proc
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no {name} process among this run's children")


def test_a_body_declared_over_the_limit_is_refused_at_once_without_a_token(town: Town) -> None:
    with socket.create_connection(("127.0.0.1", _intake(town)), timeout=10) as sock:
        sock.sendall(_head("/reports", f"Content-Length: {FIFTY_MB}"))  # and not a byte of the body
        started = time.monotonic()
        answer = _answer(sock, timeout=5)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.monotonic() - started < 2
    assert b"connection: close" in answer.lower()


def test_a_chunked_body_is_refused_once_it_passes_the_limit(town: Town) -> None:
    chunk = b" " * 64 * 1024
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", _intake(town)), timeout=10) as sock:
        sock.sendall(_head("/reports", "Transfer-Encoding: chunked"))
        while sent < FIFTY_MB:
            try:
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            if select.select([sock], [], [], 0.01)[0]:
                break
        answer = _answer(sock, timeout=5)
    assert answer.startswith(b"HTTP/1.1 413"), (sent, answer[:200])
    assert sent < 16 * LIMIT  # answered once it had read the limit, not at the end of 50 MB


def test_four_anonymous_50_mb_posts_leave_intakes_memory_as_it_was(town: Town) -> None:
    intake = _service_process("intake")
    before = intake.memory_info().rss
    body = b" " * FIFTY_MB
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", _intake(town)), timeout=10) as sock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before it was all sent
                sock.sendall(_head("/reports", f"Content-Length: {FIFTY_MB}") + body)
            _answer(sock, timeout=5)
    grown = intake.memory_info().rss - before
    assert grown < 20 * 1024 * 1024, f"intake grew by {grown / 2**20:.0f} MB"


SERVICES = ("intake", "handling", "verification", "opscenter", "dispatch")


def test_every_service_answers_with_the_security_headers(town: Town) -> None:
    wanted = [(name.decode(), value.decode()) for name, value in SECURITY_HEADERS]
    missing = []
    for service in SERVICES:
        base = f"http://127.0.0.1:{town.port[f'GRIDLOOP_{service.upper()}_HTTP_PORT']}"
        spec = httpx.get(f"{base}/openapi.json", timeout=10)
        guarded = next(p for p, item in spec.json()["paths"].items() if "{" not in p and "get" in item and p != "/")
        for path in ("/health", "/metrics", "/openapi.json", "/no-such-thing", guarded):
            r = httpx.get(base + path, timeout=10)
            if [(name, r.headers.get(name)) for name, _ in wanted] != wanted:
                missing.append(f"{service} {path} {r.status_code}: {dict(r.headers)}")
    assert not missing, "\n".join(missing)
