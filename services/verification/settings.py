from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from services.common.settings import ServiceSettings


class VerificationSettings(ServiceSettings):
    SERVICE: ClassVar[str] = "verification"
    DEFAULT_HTTP_PORT: ClassVar[int] = 8103
    batch_linger_s: float = Field(default=0.02, ge=0, le=5)
    """Verification tasks come from dispatch in bursts (a batch at a time): 20 ms more for the rest of a burst,
    applied in one transaction."""
