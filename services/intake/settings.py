from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from services.common.settings import ServiceSettings, Tuning


class IntakeTuning(Tuning):
    batch_linger_s: float = Field(default=0.25, ge=0, le=5)
    """It folds the lifecycle log into a view: up to 250 ms more for bigger batches (less CPU per record)."""
    batch_max: int = Field(default=64, ge=1, le=10_000)
    """But not too big: a batch is applied on the loop that answers reports, which wait while it is (measured in
    docs/performance.md)."""


class IntakeSettings(ServiceSettings):
    SERVICE: ClassVar[str] = "intake"
    DEFAULT_HTTP_PORT: ClassVar[int] = 8101
    tuning: IntakeTuning = Field(default_factory=IntakeTuning)
