"""The one status vocabulary: every status a service stores or answers, as a ``StrEnum``.

A member is its string (``IncidentStatus.CLOSED == "closed"``): stored in a column, sent in JSON and matched in
a query as the word itself, so the words on the wire and in the databases are those of earlier versions.

- :class:`IncidentStatus` is where an incident stands in the 数字城管 loop, as the reporter (intake), the
  operations center (opscenter) and dispatch's case see it.
- :class:`WorkOrderStatus` is a department's work order (dispatch and handling).
- :class:`VerificationStatus` is a grid worker's 核查 task, :class:`ExtensionStatus` a 延期 request,
  :class:`DeliveryStatus` a push of a work order to a department's own system.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType


class IncidentStatus(StrEnum):
    REPORTED = "reported"
    """上报: received, not decided yet."""
    FILED = "filed"
    """立案: accepted as a case of the town."""
    DISPATCHED = "dispatched"
    """派遣: a department holds a work order."""
    IN_PROGRESS = "in_progress"
    """签收: the department took the work."""
    RETURNED = "returned"
    """退回: a department returned its work order; another is being found."""
    HANDLED = "handled"
    """处置: the department reported the work done."""
    VERIFYING = "verifying"
    """核查: a grid worker is checking the work on the spot."""
    REWORK = "rework"
    """返工: the check failed; the work goes back."""
    CLOSED = "closed"
    """结案."""
    REJECTED = "rejected"
    """不予立案: not a case of the town (unknown category, outside every grid)."""
    MERGED = "merged"
    """A duplicate of an open case nearby, merged into it."""


INCIDENT_FINAL: frozenset[IncidentStatus] = frozenset(
    {IncidentStatus.CLOSED, IncidentStatus.REJECTED, IncidentStatus.MERGED}
)
"""Statuses no later event changes."""

CASE_OPEN: tuple[IncidentStatus, ...] = (IncidentStatus.FILED, IncidentStatus.DISPATCHED, IncidentStatus.VERIFYING)
"""The statuses of a dispatch case still open: a report nearby of its category is merged into it."""

STATUS_AFTER: Mapping[str, IncidentStatus] = MappingProxyType(
    {
        "IncidentReported": IncidentStatus.REPORTED,
        "IncidentFiled": IncidentStatus.FILED,
        "IncidentRejected": IncidentStatus.REJECTED,
        "IncidentMerged": IncidentStatus.MERGED,
        "WorkOrderDispatched": IncidentStatus.DISPATCHED,
        "WorkOrderAccepted": IncidentStatus.IN_PROGRESS,
        "WorkOrderReturned": IncidentStatus.RETURNED,
        "WorkOrderHandled": IncidentStatus.HANDLED,
        "VerificationRequested": IncidentStatus.VERIFYING,
        "VerificationFailed": IncidentStatus.REWORK,
        "IncidentReworked": IncidentStatus.REWORK,
        "IncidentClosed": IncidentStatus.CLOSED,
    }
)
"""The incident's status after each lifecycle event, by event type; the others (reminders, extensions, …) leave
it as it was."""


class WorkOrderStatus(StrEnum):
    DISPATCHED = "dispatched"
    ACCEPTED = "accepted"
    RETURNED = "returned"
    HANDLED = "handled"
    REWORK = "rework"
    CLOSED = "closed"


ORDER_ACTIVE: tuple[WorkOrderStatus, ...] = (
    WorkOrderStatus.DISPATCHED,
    WorkOrderStatus.ACCEPTED,
    WorkOrderStatus.REWORK,
)
"""Work the department still owes: these can be overdue, and the watchdog reminds and escalates them."""

ORDER_LIVE: tuple[WorkOrderStatus, ...] = (*ORDER_ACTIVE, WorkOrderStatus.HANDLED)
"""A work order that still counts for its case: owed, or done and waiting for the check."""


class VerificationStatus(StrEnum):
    PENDING = "pending"
    PASSED = "passed"
    FAILED = "failed"


class ExtensionStatus(StrEnum):
    NONE = "none"
    REQUESTED = "requested"
    GRANTED = "granted"
    REFUSED = "refused"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


__all__ = [
    "CASE_OPEN",
    "INCIDENT_FINAL",
    "ORDER_ACTIVE",
    "ORDER_LIVE",
    "STATUS_AFTER",
    "DeliveryStatus",
    "ExtensionStatus",
    "IncidentStatus",
    "VerificationStatus",
    "WorkOrderStatus",
]
