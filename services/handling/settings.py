from __future__ import annotations

from typing import Any, ClassVar

import orjson
from pydantic import Field, field_validator

from services.common.settings import ServiceSettings


class HandlingSettings(ServiceSettings):
    SERVICE: ClassVar[str] = "handling"
    DEFAULT_HTTP_PORT: ClassVar[int] = 8102

    webhooks: dict[str, str] = Field(default_factory=dict)
    """Department code → URL that gets every new work order and rework of that department pushed (POST, JSON).
    From the environment as JSON: ``GRIDLOOP_HANDLING_WEBHOOKS='{"roads": "https://…"}'``."""
    webhook_max_attempts: int = Field(default=8, ge=1)
    """Attempts before a delivery is given up (status ``failed``)."""
    webhook_interval_s: float = Field(default=0.5, gt=0)
    """How often the deliverer looks for due deliveries."""
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    webhook_backoff_max_s: float = Field(default=300.0, gt=0)
    """Waits between attempts double from 1 s up to this (wall-clock seconds, whatever the time scale)."""

    @field_validator("webhooks", mode="before")
    @classmethod
    def _json_webhooks(cls, value: Any) -> Any:
        if isinstance(value, str | bytes):
            try:
                return orjson.loads(value) if value.strip() else {}
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"webhooks must be a JSON object of department code → URL: {exc}") from None
        return value

    @field_validator("webhooks", mode="after")
    @classmethod
    def _http_urls(cls, value: dict[str, str]) -> dict[str, str]:
        for department, url in value.items():
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"webhook of {department!r} must be an http(s) URL, got {url!r}")
        return value
