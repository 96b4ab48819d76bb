"""The message bus: route a decoded event to its handler inside a unit of work, exactly once per event id."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from schemas import Event

from . import metrics
from .db import UnitOfWork

log = logging.getLogger(__name__)

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
