from __future__ import annotations

from typing import ClassVar

from services.common.settings import ServiceSettings


class VerificationSettings(ServiceSettings):
    SERVICE: ClassVar[str] = "verification"
    DEFAULT_HTTP_PORT: ClassVar[int] = 8103
