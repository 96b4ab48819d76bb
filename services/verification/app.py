"""verification service: ``python -m services.verification``."""

from __future__ import annotations

from schemas import GAOHANG, Town
from services.common.runtime import Runtime

from .agents import CONSUMES, PRELOAD, bind
from .api import build_api
from .models import TABLES
from .settings import VerificationSettings


def build(settings: VerificationSettings | None = None, town: Town = GAOHANG) -> Runtime:
    settings = settings or VerificationSettings()
    runtime = Runtime(settings, TABLES, bind(town), consumes=CONSUMES, preload=PRELOAD, town=town)
    runtime.serve(build_api(runtime, settings.verifier_policy))
    return runtime
