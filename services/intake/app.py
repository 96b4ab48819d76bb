"""intake service: ``python -m services.intake``."""

from __future__ import annotations

from schemas import GAOHANG, Town
from services.common.runtime import Runtime

from .agents import CONSUMES, HANDLERS, PRELOAD
from .api import build_api
from .models import TABLES
from .settings import IntakeSettings


def build(settings: IntakeSettings | None = None, town: Town = GAOHANG) -> Runtime:
    """intake for ``town``: the lifecycle fold needs no reference data; the Open311 gateway's reads ask the
    runtime's town (its public categories, its grid cells)."""
    runtime = Runtime(settings or IntakeSettings(), TABLES, HANDLERS, consumes=CONSUMES, preload=PRELOAD, town=town)
    runtime.serve(build_api(runtime))
    return runtime
