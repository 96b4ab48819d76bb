from __future__ import annotations

from typing import ClassVar

from services.common.settings import ServiceSettings


class OpsCenterSettings(ServiceSettings):
    SERVICE: ClassVar[str] = "opscenter"
    DEFAULT_HTTP_PORT: ClassVar[int] = 8104
