"""The message bus: every change goes through it, in a unit of work it commits.

An event is routed to its handler exactly once per event id (a redelivery is claimed already and skipped); a
command (a person's action through an API, a timer's look at deadlines) runs its handler once. Either way the
bus opens the unit of work, the handler loads, decides and saves into it, and the bus commits: a handler never
commits, and what it emitted is published from the outbox only once the commit holds."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from schemas import Event

from . import metrics
from .db import UnitOfWork

log = logging.getLogger(__name__)

T = TypeVar("T")

Handler = Callable[[Any, UnitOfWork], None]
Preload = Callable[[Sequence[Event], UnitOfWork], None]
"""Reads, in a few queries, the records a batch's handlers are about to ask for one by one (the unit of work
then answers from memory): it changes what a batch costs, never what it does."""


class MessageBus:
    def __init__(
        self,
        uow_factory: Callable[[], UnitOfWork],
        handlers: Mapping[type[Event], Handler],
        preload: Preload | None = None,
    ) -> None:
        self.uow_factory = uow_factory
        self.handlers = dict(handlers)
        self.preload = preload

    def handles(self, event: Event) -> bool:
        return type(event) in self.handlers

    def handle(self, event: Event) -> list[Event]:
        """Apply ``event`` once; returns the events it caused (empty for a redelivery or an ignored type)."""
        handler = self.handlers.get(type(event))
        if handler is None:
            return []
        uow = self.uow_factory()
        with uow:
            if not uow.claim(event):
                log.debug("skipping redelivered %s %s", event.type, event.event_id)
                metrics.duplicate_skipped()
                return []
            handler(event, uow)
            uow.commit()
            return list(uow.emitted)

    def handle_batch(self, events: Sequence[Event]) -> list[Event]:
        """Apply ``events`` in order in one transaction (one commit for the lot); returns the events they caused.

        All or nothing: if any handler raises, nothing is committed and the exception propagates — the caller
        then applies the events one at a time, so only the bad one is set aside. Redeliveries (also twice in
        one batch) are skipped as in :meth:`handle`."""
        uow = self.uow_factory()
        with uow:
            handled = [e for e in events if type(e) in self.handlers]
            fresh = uow.claim_all(handled)
            for _ in range(len(handled) - len(fresh)):
                metrics.duplicate_skipped()
            if self.preload is not None and len(fresh) > 1:
                self.preload(fresh, uow)
            for event in fresh:
                self.handlers[type(event)](event, uow)
            uow.commit()
            return list(uow.emitted)

    def execute(self, handler: Callable[..., T], *args: Any) -> tuple[T, list[Event]]:
        """A command: ``handler(*args, uow)`` in a unit of work, committed if it returns (nothing is if it
        raises). Returns what the handler returned and the events it emitted."""
        uow = self.uow_factory()
        with uow:
            result = handler(*args, uow)
            uow.commit()
            return result, list(uow.emitted)

    def query(self, handler: Callable[..., T], *args: Any) -> T:
        """A read: ``handler(*args, uow)`` in a unit of work that is never committed."""
        with self.uow_factory() as uow:
            return handler(*args, uow)
