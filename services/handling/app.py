"""handling service: ``python -m services.handling``."""

from __future__ import annotations

from services.common.metrics import register_work_order_gauges
from services.common.runtime import Runtime

from . import handlers
from .agents import CONSUMES, PRELOAD, register_webhooks
from .api import build_api
from .models import TABLES, HandlingWorkOrder, OrderStatus
from .settings import HandlingSettings


def build(settings: HandlingSettings | None = None) -> Runtime:
    settings = settings or HandlingSettings()
    runtime = Runtime(settings, TABLES, handlers.bind(settings), consumes=CONSUMES, preload=PRELOAD)
    register_webhooks(runtime, settings)
    register_work_order_gauges(runtime.engine, HandlingWorkOrder, OrderStatus.ACTIVE)
    runtime.serve(build_api(runtime))
    return runtime
