"""Long polls: an API request that found nothing waits, up to a limit, until a consumed event changes what it
asked for — a department's desk gets a new work order the moment it is committed, without polling for it.

A handler names what it changed (``uow.touch("work-orders:roads")``); once the unit of work commits, every
request waiting on that key wakes and reads again. Keys are plain strings ``<what>:<whose>``; ``<what>:*`` is
woken by every change of that kind (for a reader watching all of them). Only this process's waiters wake:
another instance of the service, sharing the database, commits changes this one is never told about, so where a
service runs as several instances a held request also reads again every ``recheck_s`` (one second by default,
``GRIDLOOP_LONG_POLL_RECHECK_S``) — a desk asking one instance sees what the other committed within that time,
not only when its wait runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

MAX_WAIT_S = 30.0
"""The longest a request may ask to wait (below common proxies' idle timeouts)."""


def keys_for(what: str, whose: str | None) -> tuple[str, ...]:
    """The keys a change to ``whose`` (a department, a grid) of kind ``what`` wakes."""
    return (f"{what}:{whose}", f"{what}:*") if whose else (f"{what}:*",)


def key_for(what: str, whose: str | None) -> str:
    """The key a request about ``whose`` (or about all, if None) waits on."""
    return f"{what}:{whose or '*'}"


class Changes:
    """Waiters keyed by what they wait for; :meth:`notify` wakes them. Lives on one event loop."""

    def __init__(self, max_wait_s: float = MAX_WAIT_S, recheck_s: float = 0.0) -> None:
        self.max_wait_s = min(max_wait_s, MAX_WAIT_S)
        """The longest a long poll on these changes is held, whatever it asks for."""
        self.recheck_s = recheck_s
        """How often a held long poll reads again unwoken (changes committed elsewhere); 0: only when woken."""
        self._waiting: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def notify(self, keys: Iterable[str]) -> None:
        """Wake whoever waits on any of ``keys`` (callable from the loop's thread or another one)."""
        events = [e for k in keys if (e := self._waiting.pop(k, None)) is not None]
        if not events:
            return
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for event in events:
            if loop is None or running is loop:
                event.set()
            else:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                    loop.call_soon_threadsafe(event.set)

    async def wait(self, key: str, seconds: float) -> bool:
        """Wait until ``key`` is notified (True) or ``seconds`` pass (False)."""
        self._loop = asyncio.get_running_loop()
        event = self._waiting.get(key)
        if event is None:
            event = self._waiting[key] = asyncio.Event()
        try:
            async with asyncio.timeout(max(0.0, seconds)):
                await event.wait()
        except TimeoutError:
            return False
        return True


async def long_poll(changes: Changes, key: str, wait_s: float, read: Callable[[], list[T]]) -> list[T]:
    """``read()``; if it finds nothing, read again each time ``key`` is notified (and every ``recheck_s`` of
    ``changes``, if set), until something is found or ``wait_s`` seconds have passed (then the empty answer)."""
    found = read()
    deadline = time.monotonic() + min(wait_s, changes.max_wait_s)
    while not found and (left := deadline - time.monotonic()) > 0:
        await changes.wait(key, min(left, changes.recheck_s) if changes.recheck_s > 0 else left)
        found = read()
    return found
