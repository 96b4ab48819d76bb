"""dispatch service: ``python -m services.dispatch``."""

from __future__ import annotations

from schemas import GAOHANG, Town
from services.common.runtime import Runtime

from . import handlers
from .agents import CONSUMES, PRELOAD, register_watchdog
from .api import build_api
from .models import TABLES
from .settings import DispatchSettings


def build(settings: DispatchSettings | None = None, town: Town = GAOHANG) -> Runtime:
    settings = settings or DispatchSettings()
    runtime = Runtime(settings, TABLES, handlers.bind(settings, town), consumes=CONSUMES, preload=PRELOAD, town=town)
    register_watchdog(runtime, settings)
    runtime.serve(build_api(runtime))
    return runtime
