"""One exception hierarchy for every service."""

from __future__ import annotations


class GridloopError(Exception):
    """Base of every error gridloop raises on purpose."""


class PoisonMessage(GridloopError):
    """A record that can never be processed as it is: it goes to the dead-letter topic with this reason."""


class UnknownIncident(PoisonMessage):
    """An event names an incident (or work order) this service has never seen."""


class Rejected(GridloopError):
    """A request that breaks a rule of the loop (wrong state, not allowed): answered 409 with the reason."""


class Forbidden(GridloopError):
    """The caller may not do this (e.g. a worker verifying outside their grid): answered 403."""


class NotFound(GridloopError):
    """The thing asked for does not exist (or is not visible to the caller): answered 404."""


class Unavailable(GridloopError):
    """A dependency (broker, database) cannot be reached now: answered 503, retried by workers."""
