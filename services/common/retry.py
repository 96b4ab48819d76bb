"""Waiting out what is down: a database or a broker that cannot be reached now is retried with backoff, for ever;
a failure that would come again at every try is not."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiokafka.errors import KafkaError as _KafkaError
from sqlalchemy.exc import InterfaceError, OperationalError
from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    wait_exponential,
)

from .kafka import TOO_LARGE

log = logging.getLogger("gridloop")

TRANSIENT = (OperationalError, InterfaceError)
"""A database that cannot be reached (or is locked) now: retried. Anything else a handler raises — another
database error (an IntegrityError, say), an OverflowError, even an OSError — is a bug in the handler or the data:
retried, it would stop the stream for ever; it is dead-lettered."""

RETRYABLE = (*TRANSIENT, OSError, ConnectionError, asyncio.TimeoutError, _KafkaError)
"""A broker or a database that cannot be reached now: retried, except a record refused as too large (TOO_LARGE,
Kafka errors too), which would be refused for ever."""


def forever(what: str, retryable: tuple[type[BaseException], ...] = RETRYABLE) -> AsyncRetrying:
    def _log(state: Any) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "%s unavailable (%s: %s); retry %d in %.1f s", what, type(exc).__name__, exc, state.attempt_number, wait
        )

    return AsyncRetrying(
        retry=retry_if_exception_type(retryable) & retry_if_not_exception_type(TOO_LARGE),
        wait=wait_exponential(multiplier=0.2, max=5),
        before_sleep=_log,
        reraise=True,
    )


def retry_sync(what: str, fn: Callable[[], None]) -> None:
    """``fn()``, retried while the database is unreachable (start-up, before the loop runs)."""
    for attempt in Retrying(
        retry=retry_if_exception_type(TRANSIENT),
        wait=wait_exponential(multiplier=0.2, max=5),
        before_sleep=lambda s: log.warning(
            "%s unavailable (%s); retry %d", what, s.outcome.exception() if s.outcome else "?", s.attempt_number
        ),
        reraise=True,
    ):
        with attempt:
            fn()
