"""What intake consumes: the whole lifecycle log, folded into each incident's status and timeline."""

from __future__ import annotations

from schemas.topics import LIFECYCLE

from .handlers import HANDLERS, preload

PRELOAD = preload

CONSUMES = (LIFECYCLE,)

__all__ = ["CONSUMES", "HANDLERS", "PRELOAD"]
