"""opscenter service: ``python -m services.opscenter`` (``… rebuild`` folds the log again from offset 0)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from schemas.reference import GAOHANG, Town

from . import handlers
from .agents import CONSUMES
from .api import build_api
from .metrics import ConsumerLagCollector, consumer_groups
from .models import TABLES
from .settings import OpsCenterSettings
from .swap import OpsCenterRuntime, swapped_database

_lag: ConsumerLagCollector | None = None


def build(settings: OpsCenterSettings | None = None, town: Town = GAOHANG) -> OpsCenterRuntime:
    global _lag
    settings = swapped_database(settings or OpsCenterSettings())
    runtime = OpsCenterRuntime(
        settings, TABLES, handlers.bind(town), consumes=CONSUMES, preload=handlers.preload, town=town
    )
    runtime.serve(build_api(runtime))
    if _lag is None:  # one per process: the registry refuses a second collector of the same series
        _lag = ConsumerLagCollector(
            settings.kafka_bootstrap, consumer_groups(), security=settings.kafka_client_options()
        )
        REGISTRY.register(_lag)
    return runtime
