"""opscenter service: ``python -m services.opscenter`` (``… rebuild`` folds the log again from offset 0)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from services.common.runtime import Runtime

from .agents import CONSUMES, HANDLERS, PRELOAD
from .api import build_api
from .metrics import ConsumerLagCollector, consumer_groups
from .models import TABLES
from .settings import OpsCenterSettings

_lag: ConsumerLagCollector | None = None


def build(settings: OpsCenterSettings | None = None) -> Runtime:
    global _lag
    settings = settings or OpsCenterSettings()
    runtime = Runtime(settings, TABLES, HANDLERS, consumes=CONSUMES, preload=PRELOAD)
    runtime.serve(build_api(runtime))
    if _lag is None:  # one per process: the registry refuses a second collector of the same series
        _lag = ConsumerLagCollector(
            settings.kafka_bootstrap, consumer_groups(), security=settings.kafka_client_options()
        )
        REGISTRY.register(_lag)
    return runtime
