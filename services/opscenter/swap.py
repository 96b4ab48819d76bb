"""Swapping a rebuilt read model in: the running service's side (the rebuild's is :func:`.rebuild.swap_into`).

A rebuild folds the lifecycle log into a new database while the service keeps folding into its own. To swap:

1. the rebuild asks the service to hold its fold (:meth:`FoldGate.pause`): the batch being applied is committed,
   the next waits; the service answers how far it has folded each partition. A hold ends on its own after
   ``hold_s``, the fold resuming on the service's own model, if the rebuild never comes back;
2. the rebuild folds up to the log's end as it is then, past anything the service folded or holds;
3. :func:`swap_in` checks that the rebuilt model got at least as far as the service, names it in the service's
   read-model file (a restart opens it), switches the service's engine, forgets the rebuild's bookkeeping and
   lets the fold resume there. The batch the service held, and whatever comes next, are applied to the rebuilt
   model; an event the rebuild applied already is skipped by its claim (``processed_event``): none is lost, none
   counted twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas import GAOHANG, Event, Town
from schemas.topics import LIFECYCLE, Topic
from services.common.db import make_engine
from services.common.errors import GridloopError, Rejected
from services.common.replay import shown_url, sqlite_file
from services.common.runtime import Runtime

from . import handlers
from .settings import OpsCenterSettings
from .store import log_positions, prepare_read_model

log = logging.getLogger("gridloop")

MAX_HOLD_S = 600.0


class UnusableDatabase(GridloopError):
    """The database named for a swap cannot be opened, or holds no rebuilt read model (answered 422)."""


@dataclass(frozen=True, slots=True)
class Hold:
    """The fold held for a swap, until ``until`` (monotonic seconds) at the latest."""

    hold_id: str
    until: float


class FoldGate:
    """Lets the consumer's batches through, or holds them for a swap; knows how far the fold got per partition."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.hold: Hold | None = None
        self.folded: dict[str, dict[int, int]] = {}
        """Topic → partition → the offset after the last record this process has applied (or set aside)."""

    async def through(self, messages: Sequence[Any], apply: Callable[[Sequence[Any]], Awaitable[None]]) -> None:
        """Apply a consumed batch, once no hold keeps it waiting."""
        while not self._open.is_set():
            await self._open.wait()
        self._idle.clear()
        try:
            await apply(messages)
            for message in messages:
                partitions = self.folded.setdefault(message.topic, {})
                if message.offset + 1 > partitions.get(message.partition, 0):
                    partitions[message.partition] = message.offset + 1
        finally:
            self._idle.set()

    def held(self) -> bool:
        hold = self.hold
        return hold is not None and time.monotonic() < hold.until

    async def pause(self, hold_s: float) -> Hold:
        """Hold the fold (once the batch in hand is committed) for at most ``hold_s`` seconds."""
        if self.held():
            raise Rejected("the fold is held already, for another swap")
        hold = Hold(secrets.token_hex(8), time.monotonic() + hold_s)
        self.hold = hold
        self._open.clear()
        asyncio.get_running_loop().call_later(hold_s, self._expire, hold.hold_id)
        await self._idle.wait()
        return hold

    def _expire(self, hold_id: str) -> None:
        if self.hold is not None and self.hold.hold_id == hold_id:
            log.warning("the fold was held for a swap that did not come: it resumes on its own model")
            self.resume(hold_id)

    def check(self, hold_id: str) -> Hold:
        hold = self.hold
        if hold is None or hold.hold_id != hold_id or not self.held():
            raise Rejected("no such hold of the fold (it ended, or another took its place): pause again")
        return hold

    def resume(self, hold_id: str) -> None:
        """End the hold ``hold_id`` (ended already, or another's: refused): the fold goes on."""
        if self.hold is None or self.hold.hold_id != hold_id:
            raise Rejected("no such hold of the fold (it ended, or another took its place)")
        self.hold = None
        self._open.set()


class OpsCenterRuntime(Runtime):
    """opscenter's runtime: its consumer's batches go through a :class:`FoldGate`."""

    def __init__(
        self,
        settings: OpsCenterSettings,
        tables: Iterable[Any],
        handler_map: Mapping[type[Event], Any],
        *,
        consumes: Iterable[Topic] = (),
        preload: Any = None,
        town: Town = GAOHANG,
    ) -> None:
        self.gate = FoldGate()
        self.read_model_file = settings.read_model_file
        super().__init__(settings, tables, handler_map, consumes=consumes, preload=preload, town=town)

    async def process_batch(self, messages: Sequence[Any]) -> None:
        await self.gate.through(messages, super().process_batch)


@dataclass(frozen=True, slots=True)
class Swapped:
    """What a swap did: the database the service now folds into (its password hidden), and where its rebuild got."""

    database: str
    positions: dict[int, int]


async def swap_in(runtime: OpsCenterRuntime, hold_id: str, database_url: str, topic: str = "") -> Swapped:
    """Switch ``runtime`` to the rebuilt model at ``database_url`` and let its fold resume there (see the module).

    Refused (409) without a hold, in one of several instances, or if the rebuilt model has not folded ``topic``
    (the lifecycle log) as far as the service; 422 if it cannot be opened or holds no rebuild. Nothing changes
    when it is refused."""
    topic = topic or LIFECYCLE.name
    if runtime.settings.instance:
        raise Rejected(
            "this is one of several instances (GRIDLOOP_INSTANCE): the others would go on writing the model it "
            "leaves; swap with one instance running"
        )
    runtime.gate.check(hold_id)
    try:
        file = sqlite_file(database_url)
        if file is not None and not file.is_file():
            raise UnusableDatabase(f"no database file {file}")
        engine = make_engine(database_url)
    except UnusableDatabase:
        raise
    except Exception as exc:  # a URL SQLAlchemy cannot read, or a driver that is not installed
        raise UnusableDatabase(f"cannot use the database URL given ({type(exc).__name__})") from None
    try:
        positions = await asyncio.to_thread(_rebuilt_positions, engine, runtime.tables, topic)
        behind = {
            p: (positions.get(p, 0), folded)
            for p, folded in runtime.gate.folded.get(topic, {}).items()
            if positions.get(p, 0) < folded
        }
        if behind:
            said = ", ".join(f"partition {p}: {got} < {folded}" for p, (got, folded) in sorted(behind.items()))
            raise Rejected(f"the rebuilt model is behind the live fold ({said}): let the rebuild catch up")
        runtime.gate.check(hold_id)
        if runtime.read_model_file is not None:
            await asyncio.to_thread(_name_in_file, runtime.read_model_file, database_url)
    except BaseException:
        engine.dispose()
        raise
    old = runtime.replace_engine(engine)
    runtime.bus.execute(handlers.forget_rebuild_positions)
    runtime.gate.resume(hold_id)
    old.dispose()
    log.warning("the read model is now %s (swapped in; %s is no longer written)", shown_url(database_url), old.url)
    return Swapped(shown_url(database_url), positions)


def _rebuilt_positions(engine: Any, tables: Iterable[Any], topic: str) -> dict[int, int]:
    try:
        recorded = log_positions(engine)
        if topic in recorded:
            prepare_read_model(engine, tables)  # what a later version added (the rebuild made the rest)
    except Exception as exc:  # cannot connect, not a database, no such file …
        raise UnusableDatabase(f"cannot read a read model at {engine.url}: {type(exc).__name__}: {exc}") from None
    if topic not in recorded:
        raise UnusableDatabase(f"{engine.url} holds no rebuild of {topic} (was it rebuilt, or swapped in already?)")
    return recorded[topic]


def _name_in_file(path: Path, database_url: str) -> None:
    """Write ``database_url`` to ``path`` whole or not at all (a crash leaves the old name or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(database_url + "\n", encoding="utf-8")
    os.replace(temporary, path)


def swapped_database(settings: OpsCenterSettings) -> OpsCenterSettings:
    """``settings`` with the database a swap named in the read-model file, if one did (else as they are)."""
    path = settings.read_model_file
    if path is None or not path.exists():
        return settings
    named = path.read_text(encoding="utf-8").strip()
    if not named or named == settings.database_url:
        return settings
    log.warning("the read model is %s, swapped in (named in %s; not %s)", shown_url(named), path, settings.database_url)
    return settings.model_copy(update={"database_url": named})


__all__ = [
    "MAX_HOLD_S",
    "FoldGate",
    "Hold",
    "OpsCenterRuntime",
    "Swapped",
    "UnusableDatabase",
    "swap_in",
    "swapped_database",
]
