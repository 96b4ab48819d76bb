from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from services.common.settings import ServiceSettings


class IntakeSettings(ServiceSettings):
    SERVICE: ClassVar[str] = "intake"
    DEFAULT_HTTP_PORT: ClassVar[int] = 8101
    batch_linger_s: float = Field(default=0.25, ge=0, le=5)
    """It folds the lifecycle log into a view: up to 250 ms more for bigger batches (less CPU per record)."""
