from __future__ import annotations

from typing import ClassVar

from services.common.settings import ServiceSettings


class IntakeSettings(ServiceSettings):
    SERVICE: ClassVar[str] = "intake"
    DEFAULT_HTTP_PORT: ClassVar[int] = 8101
