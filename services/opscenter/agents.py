"""What opscenter consumes: the whole lifecycle log, folded into the read model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from schemas import EVENT_TYPES, Event
from schemas.topics import LIFECYCLE
from services.common.db import UnitOfWork

from . import metrics
from .handlers import fold_event, preload

CONSUMES = (LIFECYCLE,)


def fold(event: Event, uow: UnitOfWork) -> None:
    for stage, seconds in fold_event(event, uow):
        metrics.observe_stage(stage, seconds)


HANDLERS: Mapping[type[Event], Callable[[Any, UnitOfWork], None]] = {cls: fold for cls in EVENT_TYPES.values()}

PRELOAD = preload
