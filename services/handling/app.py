"""handling service: ``python -m services.handling``."""

from __future__ import annotations

from services.common.runtime import Runtime

from . import handlers
from .agents import CONSUMES, register_webhooks
from .api import build_api
from .models import TABLES
from .settings import HandlingSettings


def build(settings: HandlingSettings | None = None) -> Runtime:
    settings = settings or HandlingSettings()
    runtime = Runtime(settings, TABLES, handlers.bind(settings), consumes=CONSUMES)
    register_webhooks(runtime, settings)
    runtime.serve(build_api(runtime))
    return runtime
