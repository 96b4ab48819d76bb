from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from services.common.settings import ServiceSettings


class DispatchSettings(ServiceSettings):
    SERVICE: ClassVar[str] = "dispatch"
    DEFAULT_HTTP_PORT: ClassVar[int] = 8105

    merge_distance_m: float = Field(default=50.0, ge=0)
    """Reports of the same category closer than this to an open case are merged into it."""
    merge_window_hours: float = Field(default=24.0, ge=0)
    """…if the open case was reported within this many business hours."""
    max_returns: int = Field(default=2, ge=1)
    """After this many 退回 returns the case goes to the operations center (城运中心)."""
    escalate_after_hours: float = Field(default=24.0, gt=0)
    """Business hours past the deadline before an overdue work order is escalated (督办)."""
    watchdog_interval_s: float = Field(default=1.0, gt=0)
