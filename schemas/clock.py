"""Business time for the rules: the moment a decision is taken, and deadlines counted from it.

A deadline is so many business hours from now; a demo or a benchmark runs the clock faster (``time_scale``
3600: one business hour a second). Every time a rule computes stays inside the contract's range
(:data:`schemas.EARLIEST` … :data:`schemas.LATEST`): a tiny time scale would put it past the calendar.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from ._base import EARLIEST, LATEST


@dataclass(frozen=True, slots=True)
class Moment:
    """When a rule decides, and how fast business time runs against the wall clock."""

    now: datetime
    time_scale: float = 1.0

    def business_hours(self, hours: float) -> timedelta:
        """A span of business time as wall-clock time (at most timedelta.max, a span never reached)."""
        try:
            return timedelta(hours=hours) / self.time_scale
        except OverflowError:
            return timedelta.max

    def due_in(self, hours: float) -> datetime:
        """The deadline ``hours`` of business time from now, at most :data:`schemas.LATEST`."""
        span = self.business_hours(hours)
        return self.now + span if span < LATEST - self.now else LATEST

    def hours_ago(self, hours: float) -> datetime:
        """The moment ``hours`` of business time ago, no earlier than :data:`schemas.EARLIEST`."""
        span = self.business_hours(hours)
        return self.now - span if span < self.now - EARLIEST else EARLIEST


__all__ = ["Moment"]
