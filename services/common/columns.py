"""Columns that tables of several services hold alike, declared once (each service keeps its own tables).

A table inherits them first: they come first in its columns, before the service's own.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from .db import timestamp


class WorkOrderColumns(SQLModel):
    """A work order as dispatch and handling both keep it: whose it is, and how far it has gone."""

    work_order_id: str = Field(primary_key=True, max_length=80)
    incident_id: str = Field(max_length=64, index=True)
    department_code: str = Field(max_length=40, index=True)
    role: str = Field(max_length=10)
    attempt: int = 1
    status: str = Field(max_length=20, index=True)
    """A WorkOrderStatus."""
    deadline: datetime = Field(sa_type=timestamp(), index=True)
    dispatched_at: datetime = Field(sa_type=timestamp())
    accepted_at: datetime | None = Field(default=None, sa_type=timestamp())
    handled_at: datetime | None = Field(default=None, sa_type=timestamp())
