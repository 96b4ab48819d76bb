"""intake service: ``python -m services.intake``."""

from __future__ import annotations

from services.common.runtime import Runtime

from .agents import CONSUMES, HANDLERS, PRELOAD
from .api import build_api
from .models import TABLES
from .settings import IntakeSettings


def build(settings: IntakeSettings | None = None) -> Runtime:
    runtime = Runtime(settings or IntakeSettings(), TABLES, HANDLERS, consumes=CONSUMES, preload=PRELOAD)
    runtime.serve(build_api(runtime))
    return runtime
