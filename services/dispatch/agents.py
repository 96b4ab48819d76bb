"""What dispatch consumes (reports, departments' feedback, verification outcomes) and its watchdog timer."""

from __future__ import annotations

from schemas.topics import FEEDBACK, INCIDENTS_REPORTED, VERIFICATION
from services.common.runtime import Runtime

from . import handlers
from .settings import DispatchSettings

CONSUMES = (INCIDENTS_REPORTED, FEEDBACK, VERIFICATION)
PRELOAD = handlers.preload


def register_watchdog(runtime: Runtime, policy: DispatchSettings) -> None:
    """催办 / 督办 from deadlines kept in the database, so the timers survive restarts."""

    @runtime.timer(policy.watchdog_interval_s)
    async def watchdog() -> None:
        await runtime.command(handlers.watch_deadlines, policy)
