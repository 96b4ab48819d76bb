"""State the rules of several services keep alike, as plain dataclasses (a service's domain inherits it).

The columns that store it are declared alike too, in ``services.common.columns``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass
class WorkOrderState:
    """A work order as dispatch and handling both follow it: whose it is, and how far it has gone."""

    work_order_id: str
    incident_id: str
    department_code: str
    role: str
    attempt: int
    status: str
    """A :class:`WorkOrderStatus`."""
    deadline: datetime
    dispatched_at: datetime
    accepted_at: datetime | None = None
    handled_at: datetime | None = None
