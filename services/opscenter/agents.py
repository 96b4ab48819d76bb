"""What opscenter consumes: the whole lifecycle log, folded into the read model."""

from __future__ import annotations

from schemas.reference import GAOHANG
from schemas.topics import LIFECYCLE

from .handlers import bind, fold, preload

CONSUMES = (LIFECYCLE,)

HANDLERS = bind(GAOHANG)
"""The fold of every lifecycle event, for the default town (the app binds its own)."""

PRELOAD = preload

__all__ = ["CONSUMES", "HANDLERS", "PRELOAD", "fold"]
