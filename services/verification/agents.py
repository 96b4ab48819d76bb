"""What verification consumes: the verification topic, where dispatch asks for 核查 tasks."""

from __future__ import annotations

from schemas.topics import VERIFICATION

from .handlers import bind, preload

PRELOAD = preload

CONSUMES = (VERIFICATION,)

__all__ = ["CONSUMES", "PRELOAD", "bind"]
