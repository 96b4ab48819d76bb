"""dispatch's own data: the case (one per incident) and its work orders, with every deadline the watchdog needs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlmodel import Field as SqlField
from sqlmodel import SQLModel

from schemas import AwareDatetime
from services.common.columns import WorkOrderColumns
from services.common.db import timestamp


class DispatchCase(SQLModel, table=True):
    __tablename__ = "dispatch_case"
    __table_args__ = (
        # a report's merge candidates (open cases of its category reported in the merge window) read straight from
        # the index: with the single-column indexes SQLite takes the category's and reads every case of that
        # category ever filed, closed ones too, a cost that grows with every incident
        sa.Index("ix_dispatch_case_open_by_category", "category_code", "status", "reported_at"),
    )

    incident_id: str = SqlField(primary_key=True, max_length=64)
    correlation_id: str = SqlField(max_length=64)
    status: str = SqlField(max_length=20, index=True)
    """An IncidentStatus."""
    category_code: str = SqlField(max_length=40, index=True)
    grid_id: str | None = SqlField(default=None, max_length=40)
    lat: float
    lon: float
    address: str = SqlField(default="", max_length=200)
    description: str = SqlField(default="", max_length=2000)
    photo_urls: str = ""
    evidence_urls: str = ""
    reporter_id: str = SqlField(max_length=64)
    severity: str = SqlField(default="normal", max_length=10)
    priority: int = 3
    big: bool = False
    handled_on_spot: bool = False
    merged_into: str | None = SqlField(default=None, max_length=64)
    duplicates: int = 0
    return_count: int = 0
    rework_count: int = 0
    verification_round: int = 0
    reported_at: datetime = SqlField(sa_type=timestamp(), index=True)
    filed_at: datetime | None = SqlField(default=None, sa_type=timestamp())
    closed_at: datetime | None = SqlField(default=None, sa_type=timestamp())


class DispatchWorkOrder(WorkOrderColumns, table=True):
    __tablename__ = "dispatch_work_order"
    __table_args__ = (
        # the operations center's list of pending 延期 requests reads the few orders that have one, not every work
        # order ever dispatched (a partial index: only those rows are in it)
        sa.Index(
            "ix_dispatch_work_order_extension_pending",
            "extension_requested_until",
            sqlite_where=sa.column("extension_requested_until").is_not(None),
            postgresql_where=sa.column("extension_requested_until").is_not(None),
        ),
    )

    handled_by: str | None = SqlField(default=None, max_length=130)
    """Who handled it (the staff member, and whom they acted for), space-separated: they never verify it."""
    reminded_at: datetime | None = SqlField(default=None, sa_type=timestamp())
    escalated_at: datetime | None = SqlField(default=None, sa_type=timestamp())
    extension_requested_until: datetime | None = SqlField(default=None, sa_type=timestamp())
    extension_reason: str = SqlField(default="", max_length=1000)


TABLES = (DispatchCase.__table__, DispatchWorkOrder.__table__)  # type: ignore[attr-defined]


# -- API ---------------------------------------------------------------------------------------------


class ExtensionDecision(BaseModel):
    """The operations center (城运中心) grants or refuses a department's 延期 request."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    actor_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\w.@:-]+$")] | None = None
    """Over HTTP the caller's token says who decides; a body naming someone else is refused."""
    grant: bool
    new_deadline: Annotated[AwareDatetime, Field(examples=["2025-06-01T18:00:00+08:00"])] | None = None
    """Defaults to the deadline the department asked for."""
    reason: Annotated[str, Field(max_length=1000)] = ""

    @model_validator(mode="after")
    def _reason_for_refusal(self) -> ExtensionDecision:
        if not self.grant and not self.reason:
            raise ValueError("a refusal needs a reason")
        return self


class WorkOrderPublic(BaseModel):
    work_order_id: str
    incident_id: str
    department_code: str
    role: str
    attempt: int
    status: str
    deadline: datetime
    dispatched_at: datetime
    overdue: bool
    reminded: bool
    escalated: bool
    extension_requested_until: datetime | None
    extension_reason: str


class CasePublic(BaseModel):
    incident_id: str
    status: str
    category_code: str
    grid_id: str | None
    priority: int
    big: bool
    handled_on_spot: bool
    merged_into: str | None
    duplicates: int
    return_count: int
    rework_count: int
    reported_at: datetime
    closed_at: datetime | None
    work_orders: list[WorkOrderPublic]
