"""handling service: ``python -m services.handling``."""

from __future__ import annotations

from schemas import GAOHANG, ORDER_ACTIVE, Town
from services.common.metrics import register_work_order_gauges
from services.common.runtime import Runtime

from . import handlers
from .agents import CONSUMES, PRELOAD, register_webhooks
from .api import build_api
from .models import TABLES, HandlingWorkOrder
from .settings import HandlingSettings


def build(settings: HandlingSettings | None = None, town: Town = GAOHANG) -> Runtime:
    """The service for ``town`` (handling's rules need nothing of it; the runtime carries it)."""
    settings = settings or HandlingSettings()
    runtime = Runtime(settings, TABLES, handlers.bind(settings), consumes=CONSUMES, preload=PRELOAD, town=town)
    register_webhooks(runtime, settings)
    register_work_order_gauges(runtime.engine, HandlingWorkOrder, ORDER_ACTIVE)
    runtime.serve(build_api(runtime))
    return runtime
