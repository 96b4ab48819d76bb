"""verification service: ``python -m services.verification``."""

from __future__ import annotations

from services.common.runtime import Runtime

from .agents import CONSUMES, HANDLERS, PRELOAD
from .api import build_api
from .models import TABLES
from .settings import VerificationSettings


def build(settings: VerificationSettings | None = None) -> Runtime:
    settings = settings or VerificationSettings()
    runtime = Runtime(settings, TABLES, HANDLERS, consumes=CONSUMES, preload=PRELOAD)
    runtime.serve(build_api(runtime, settings.verifier_policy))
    return runtime
