"""The operations center's read model, folded from the lifecycle log (rebuildable from offset 0)."""

from __future__ import annotations

from datetime import date, datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from services.common.db import timestamp

from .domain import COUNTED, SUMMED


class OpsIncident(SQLModel, table=True):
    """One row per incident: where it is in the loop and the times KPIs are computed from."""

    __tablename__ = "ops_incident"
    __table_args__ = (
        # the open incidents (a few statuses of many) through the index, never the closed history, and the map's
        # and the grids' counts from the index alone
        sa.Index("ix_ops_incident_status_map", "status", "grid_id", "lat", "lon", "escalated", "big", "incident_id"),
    )

    incident_id: str = Field(primary_key=True, max_length=64)
    source: str = Field(default="", max_length=20)
    category_code: str = Field(max_length=40, index=True)
    grid_id: str | None = Field(default=None, max_length=40, index=True)
    lat: float = 0.0
    lon: float = 0.0
    address: str = Field(default="", max_length=200)
    status: str = Field(max_length=20)
    """reported → filed → dispatched → in_progress/handled/verifying/rework → closed; or rejected / merged."""
    handled_on_spot: bool = False
    big: bool = False
    escalated: bool = False
    rework_count: int = 0
    return_count: int = 0
    departments: str = ""
    """Every department that received a work order, space-separated, in order."""
    deadline: datetime | None = Field(default=None, sa_type=timestamp())
    on_time: bool | None = None
    reported_at: datetime = Field(sa_type=timestamp(), index=True)
    filed_at: datetime | None = Field(default=None, sa_type=timestamp())
    rejected_at: datetime | None = Field(default=None, sa_type=timestamp())
    merged_at: datetime | None = Field(default=None, sa_type=timestamp())
    closed_at: datetime | None = Field(default=None, sa_type=timestamp(), index=True)
    verifying_since: datetime | None = Field(default=None, sa_type=timestamp())


_OWED = ("status", "deadline", "work_order_id", "department_code", "incident_id", "category_code", "grid_id")
"""The columns of the index of the work owed: led by the status and the deadline, it holds what is counted."""


class OpsWorkOrder(SQLModel, table=True):
    """One row per work order: its department, deadline and the stage times."""

    __tablename__ = "ops_work_order"
    __table_args__ = (
        # the work still owed in deadline order, a status at a time (the overdue list's pages: deadline, then id),
        # with what the backlog, the map and the KPIs' overdue figure count it by, from the index alone
        sa.Index("ix_ops_work_order_owed", *_OWED),
    )

    work_order_id: str = Field(primary_key=True, max_length=80)
    incident_id: str = Field(max_length=64, index=True)
    department_code: str = Field(max_length=40, index=True)
    category_code: str = Field(max_length=40)
    grid_id: str | None = Field(default=None, max_length=40)
    status: str = Field(max_length=20)
    """dispatched, accepted, returned, handled, rework, closed."""
    deadline: datetime = Field(sa_type=timestamp(), index=True)
    dispatched_at: datetime = Field(sa_type=timestamp())
    accepted_at: datetime | None = Field(default=None, sa_type=timestamp())
    handled_at: datetime | None = Field(default=None, sa_type=timestamp())
    """First time it was reported handled."""
    returned_at: datetime | None = Field(default=None, sa_type=timestamp())
    reminded: bool = False
    escalated: bool = False


OPS_DAILY = sa.Table(
    "ops_daily",
    SQLModel.metadata,
    sa.Column("dim", sa.String(12), primary_key=True),
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("key", sa.String(40), primary_key=True),
    *(sa.Column(name, sa.Integer, nullable=False, default=0) for name in COUNTED),
    *(sa.Column(name, sa.Float, nullable=False, default=0.0) for name in SUMMED),
    sqlite_with_rowid=False,
    comment="The KPIs' counters of one day of the town, for one key of a dimension (department, category, grid, "
    "or none for the whole town): a period's figures are the sums over its days. Kept by the fold.",
)
"""The daily rollup: a column for each of the fold's counters and duration sums (``domain.COUNTED``,
``domain.SUMMED``, see ``domain.Tally``): one row per day of the town, dimension and key."""


class OpsDue(SQLModel, table=True):
    """Filed cases by deadline day and the later day they closed (``9999-12-31``: open): a period that holds the
    deadline day but not the close day counts them due (应结案)."""

    __tablename__ = "ops_due"
    __table_args__ = {"sqlite_with_rowid": False}  # a period's rows lie together, in key order

    dim: str = Field(primary_key=True, max_length=12)
    deadline_day: date = Field(primary_key=True)
    closed_day: date = Field(primary_key=True)
    key: str = Field(primary_key=True, max_length=40)
    n: int = 0


class OpsStage(SQLModel, table=True):
    """How many accept, handle or close durations that ended in one period (a day, a week from Monday, a month of
    the town) fall in one bucket of a log histogram (see ``domain.bucket``): the period's p90 is read off it."""

    __tablename__ = "ops_stage"
    __table_args__ = {"sqlite_with_rowid": False}  # a period's histograms lie together, in key order

    dim: str = Field(primary_key=True, max_length=12)
    span: str = Field(primary_key=True, max_length=5)
    """day, week or month."""
    first: date = Field(primary_key=True)
    """The period's first day."""
    key: str = Field(primary_key=True, max_length=40)
    stage: str = Field(primary_key=True, max_length=8)
    bucket: int = Field(primary_key=True)
    n: int = 0


class OpsParked(SQLModel, table=True):
    """A lifecycle event that arrived before the one it follows (its incident's report, its work order's
    dispatch), kept whole and folded as soon as that one arrives.

    The lifecycle log is ordered per incident for each producer, not across them: intake's copy of a report can
    reach the log after dispatch's rejection of it when intake's send was retried (a broker restart, say)."""

    __tablename__ = "ops_parked"

    event_id: str = Field(primary_key=True, max_length=64)
    incident_id: str = Field(max_length=64, index=True)
    work_order_id: str | None = Field(default=None, max_length=80, index=True)
    occurred_at: datetime = Field(sa_type=timestamp())
    payload: bytes = Field(sa_type=sa.LargeBinary)


class OpsLogPosition(SQLModel, table=True):
    """How far a rebuild has folded the lifecycle log into this database: per partition, the next offset to read,
    written in the transaction of the batch that got there (a rebuild resumes from it, and a swap checks it
    against the live fold). Bookkeeping of the rebuild, not of the read model: the swap that makes this database
    the live one empties it (the live consumer's offsets are its consumer group's)."""

    __tablename__ = "ops_log_position"

    topic: str = Field(primary_key=True, max_length=249)
    partition: int = Field(primary_key=True)
    next_offset: int = Field(ge=0)
    updated_at: datetime = Field(sa_type=timestamp())


TABLES = (
    OpsIncident.__table__,  # type: ignore[attr-defined]
    OpsWorkOrder.__table__,  # type: ignore[attr-defined]
    OPS_DAILY,
    OpsDue.__table__,  # type: ignore[attr-defined]
    OpsStage.__table__,  # type: ignore[attr-defined]
    OpsParked.__table__,  # type: ignore[attr-defined]
    OpsLogPosition.__table__,  # type: ignore[attr-defined]
)
