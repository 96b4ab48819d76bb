"""The door of every service's API, before any route, token check or body parsing: how often a caller asks, and
the size of what it sends; and the security headers on every answer.

Rate limits: each request counts once against its bearer token (by hash) and once against its client address, in
fixed windows (the ``limits`` package's strategy, its counts in this process's memory); more than a limit allows is
answered 429 with ``Retry-After`` and the reason. ``/health`` and ``/metrics`` are never held: what watches the
service must not be shut out by a busy client. Each instance of a service counts what it serves.

Bodies: a request whose ``Content-Length`` is over the limit is answered 413 at once, its body never read; one
streamed without a length (chunked) is counted as it is read and refused as soon as it passes the limit. The answer
closes the connection, so the server does not go on reading what the client still sends.

Security headers: every answer, a refusal or a failure too, says that nothing of it runs but scripts and styles
from the service itself (no inline script or style, no other origin: the operations center's dashboard is built
so), that it is never framed, never sniffed for another type, and sends no referrer. FastAPI's docs pages (Swagger
UI, ReDoc) are the exception: they load their scripts and styles from a CDN and start them with inline code, so
they alone are allowed that CDN and inline code, and ``GRIDLOOP_DOCS_ENABLED=false`` removes them.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence

import orjson
from limits import RateLimitItem
from limits.storage import Storage
from limits.strategies import FixedWindowRateLimiter
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
"""The Content Security Policy of every answer but the docs pages'."""
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; "
    "font-src 'self' https://fonts.gstatic.com; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
"""The docs pages': FastAPI's Swagger UI and ReDoc pages load from jsDelivr and start with inline code."""
_OTHERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"))
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = ((b"content-security-policy", CSP.encode()), *_OTHERS)
DOCS_HEADERS: tuple[tuple[bytes, bytes], ...] = ((b"content-security-policy", DOCS_CSP.encode()), *_OTHERS)


class SecurityHeaders:
    """ASGI middleware: the security headers on every answer (``DOCS_HEADERS`` on the ``docs`` pages). Meant to be
    outermost, around the error handling too, so that a failure's answer carries them as well."""

    def __init__(self, app: ASGIApp, *, docs: Sequence[str] = ()) -> None:
        self.app = app
        self.docs = frozenset(docs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        added = DOCS_HEADERS if scope["path"] in self.docs else SECURITY_HEADERS

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *added]
            await send(message)

        await self.app(scope, receive, secured)


UNHELD = ("/health", "/metrics")
"""Paths never held to a rate: what watches the service."""


class WindowCounts(Storage):
    """The rate limiter's counts, in this process's memory: a dictionary, each count dropped once its window is
    over (when it is next looked at, or by a sweep every ``sweep_s`` seconds). Used from one thread, the event loop.

    limits' own MemoryStorage keeps them the same way but starts a timer thread, 10 ms long, whenever it counts and
    finds none running: a service answering a few hundred requests a second started a hundred threads a second, and
    each took the interpreter lock from the loop (docs/performance.md). This storage keeps the package's rate
    limiting (the limits' notation, the fixed-window strategy) without that cost."""

    STORAGE_SCHEME = None

    def __init__(self, sweep_s: float = 10.0) -> None:
        super().__init__()
        self.sweep_s = sweep_s
        self._counts: dict[str, list[float]] = {}
        """key → [count, when its window ends (POSIX time)]"""
        self._next_sweep = time.time() + sweep_s

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()
        if now >= self._next_sweep:
            self._sweep(now)
        entry = self._counts.get(key)
        if entry is None or entry[1] <= now:
            self._counts[key] = [amount, now + expiry]
            return amount
        entry[0] += amount
        return int(entry[0])

    def get(self, key: str) -> int:
        entry = self._counts.get(key)
        return int(entry[0]) if entry is not None and entry[1] > time.time() else 0

    def get_expiry(self, key: str) -> float:
        entry = self._counts.get(key)
        now = time.time()
        return entry[1] if entry is not None and entry[1] > now else now

    def check(self) -> bool:
        return True

    def reset(self) -> int | None:
        count = len(self._counts)
        self._counts.clear()
        return count

    def clear(self, key: str) -> None:
        self._counts.pop(key, None)

    def __len__(self) -> int:
        return len(self._counts)

    def _sweep(self, now: float) -> None:
        """Drop the counts of windows that are over (keys not seen again: a forged token asks once)."""
        self._counts = {key: entry for key, entry in self._counts.items() if entry[1] > now}
        self._next_sweep = now + self.sweep_s


class BodyTooLarge(HTTPException):
    """A body that passed the limit while it was read (answered 413 by whoever reads it: a route, or the door)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large(limit), headers={"Connection": "close"})


def too_large(limit: int) -> str:
    size = f"{limit // 1024} KiB" if limit % 1024 == 0 else f"{limit} bytes"
    return f"the request body is larger than {size}: refused before it was read"


class Door:
    """ASGI middleware: holds tokens and addresses to their rates (429), and refuses a request body over
    ``body_limit`` bytes (413) before it is read.

    Per request: one pass over the headers, one counter for the token and one for the address (a dictionary in
    memory, no I/O), and nothing more unless the body comes without a length."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        body_limit: int,
        per_token: Sequence[RateLimitItem] = (),
        per_address: Sequence[RateLimitItem] = (),
    ) -> None:
        self.app = app
        self.body_limit = body_limit
        self.per_token = tuple(per_token)
        self.per_address = tuple(per_address)
        self.limiter = FixedWindowRateLimiter(WindowCounts()) if self.per_token or self.per_address else None
        self._too_large = orjson.dumps({"error": too_large(body_limit)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length: bytes | None = None
        streamed = False
        authorization: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                streamed = True
            elif name == b"authorization":
                authorization = value
        if self.limiter is not None and not scope["path"].startswith(UNHELD):
            held = self._held(self.limiter, scope, authorization)
            if held is not None:
                reason, retry_after = held
                await _answer(send, 429, orjson.dumps({"error": reason}), (b"retry-after", str(retry_after).encode()))
                return
        if length is not None and length.isdigit() and int(length) > self.body_limit:
            await self._refuse(send)
        elif streamed and length is None:
            await self._counted(scope, receive, send)
        else:  # no body, or no more than its declared length is read: only the declaration needs looking at
            await self.app(scope, receive, send)

    def _held(
        self, limiter: FixedWindowRateLimiter, scope: Scope, authorization: bytes | None
    ) -> tuple[str, int] | None:
        """Why the request is refused and in how many seconds to come back; None: it is counted and goes on."""
        if self.per_token and authorization:
            token = authorization.strip().partition(b" ")[2].strip()
            if token:
                key = hashlib.sha256(token).hexdigest()
                for item in self.per_token:
                    if not limiter.hit(item, "token", key):
                        return _refusal(limiter, item, "with this token", "token", key)
        if self.per_address:
            client = scope.get("client")
            address = str(client[0]) if client else "-"
            for item in self.per_address:
                if not limiter.hit(item, "address", address):
                    return _refusal(limiter, item, "from this address", "address", address)
        return None

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A body of no declared length (chunked): counted as the app reads it."""
        limit = self.body_limit
        received = 0
        started = False

        async def counting() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def noting(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting, noting)
        except BodyTooLarge:  # read where no route answers for it (a mounted app): the door does
            if started:
                raise
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await _answer(send, 413, self._too_large, (b"connection", b"close"))


def _refusal(limiter: FixedWindowRateLimiter, item: RateLimitItem, who: str, *key: str) -> tuple[str, int]:
    reset = limiter.get_window_stats(item, *key).reset_time
    retry_after = max(1, math.ceil(reset - time.time()))
    return f"too many requests {who}: at most {item}; retry in {retry_after} s", retry_after


async def _answer(send: Send, status: int, body: bytes, *headers: tuple[bytes, bytes]) -> None:
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


__all__ = [
    "CSP",
    "DOCS_CSP",
    "DOCS_HEADERS",
    "SECURITY_HEADERS",
    "UNHELD",
    "BodyTooLarge",
    "Door",
    "SecurityHeaders",
    "WindowCounts",
    "too_large",
]
