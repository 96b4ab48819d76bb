"""intake's own data: incidents as reported, and the timeline of every transition it has seen on the log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator
from sqlmodel import Field as SqlField
from sqlmodel import SQLModel

from schemas.events import Severity, Source
from services.common.db import Numbered, timestamp

# -- API ---------------------------------------------------------------------------------------------


class ReportBase(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    category_code: Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[a-z0-9_]+$", examples=["pothole"])]
    lat: Annotated[float, Field(ge=-90, le=90, examples=[31.285])]
    lon: Annotated[float, Field(ge=-180, le=180, examples=[121.575])]
    address: Annotated[str, Field(max_length=200)] = ""
    description: Annotated[str, Field(min_length=1, max_length=2000)]
    photo_urls: Annotated[list[HttpUrl], Field(max_length=10)] = []
    severity: Severity = Severity.NORMAL


class ReportCreate(ReportBase):
    """A report from a grid worker (网格员), the 12345 hotline, a sensor or an Open311 client."""

    source: Source = Source.GRID_WORKER
    reporter_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\w.@:-]+$")]
    client_report_id: Annotated[str, Field(min_length=1, max_length=80, pattern=r"^[\w.:-]+$")]
    """Chosen by the client; a retry with the same id (and reporter) returns the same incident. Only its sender
    may retry a report: anyone else using that id for the same reporter is refused (409)."""
    handled_on_spot: bool = False
    """小事一格解决: the worker fixed it on the spot; evidence_urls show the result."""
    evidence_urls: Annotated[list[HttpUrl], Field(max_length=10)] = []

    @model_validator(mode="after")
    def _evidence_for_on_spot(self) -> ReportCreate:
        if self.handled_on_spot and not self.evidence_urls:
            raise ValueError("handled_on_spot needs at least one evidence_url showing the result")
        if self.handled_on_spot and self.source is not Source.GRID_WORKER:
            raise ValueError("only a grid worker can report an incident as handled on the spot")
        return self


class ReportAccepted(BaseModel):
    incident_id: str
    status: str
    duplicate: bool = False
    """True when this client_report_id was seen before: the original incident is returned."""


class IncidentListed(BaseModel):
    """An incident as a list shows it."""

    incident_id: str
    status: str
    category_code: str
    grid_id: str | None
    reported_at: datetime


class TransitionPublic(BaseModel):
    event_id: str
    type: str
    occurred_at: datetime
    actor_kind: str
    actor_id: str | None
    """Who acted; None for a citizen, unless the caller sees citizens' contacts (services.common.visibility)."""
    on_behalf_of: str | None = None
    """The person the actor acted for (the hotline desk for a caller, say); None when it acted for itself, or when
    that person is a citizen reporter whose contact the caller may not see."""
    detail: str


class IncidentPublic(BaseModel):
    incident_id: str
    status: str
    source: str
    category_code: str
    lat: float
    lon: float
    address: str
    description: str
    severity: str
    reporter_id: str | None
    """The reporter of record; None for a 12345 caller or an Open311 client, unless the caller sees citizens'
    contacts (the operations center, administrators: services.common.visibility)."""
    handled_on_spot: bool
    grid_id: str | None
    departments: list[str]
    deadline: datetime | None
    overdue: bool
    escalated: bool
    rework_count: int
    reported_at: datetime
    updated_at: datetime
    closed_at: datetime | None
    timeline: list[TransitionPublic]


# -- tables ------------------------------------------------------------------------------------------


class IntakeIncident(SQLModel, table=True):
    __tablename__ = "intake_incident"
    __table_args__ = (sa.UniqueConstraint("reporter_id", "client_report_id", name="uq_intake_client_report"),)

    incident_id: str = SqlField(primary_key=True, max_length=64)
    client_report_id: str = SqlField(max_length=80)
    reporter_id: str = SqlField(max_length=64)
    submitted_by: str | None = SqlField(default=None, max_length=80)
    """Who sent the report (``<actor kind>:<id>`` of the caller's token), the only one who may retry it; None on
    a report taken by an earlier version (its reporter may retry it)."""
    source: str = SqlField(max_length=20)
    category_code: str = SqlField(max_length=40)
    lat: float
    lon: float
    address: str = SqlField(default="", max_length=200)
    description: str = SqlField(max_length=2000)
    photo_urls: str = SqlField(default="")
    severity: str = SqlField(default="normal", max_length=10)
    handled_on_spot: bool = False
    evidence_urls: str = SqlField(default="")
    status: str = SqlField(default="reported", max_length=20, index=True)
    status_at: datetime | None = SqlField(default=None, sa_type=timestamp())
    """When the event that set ``status`` occurred: an earlier one folded after it (a copy that crossed another
    producer's) goes into the timeline without stepping the status back."""
    grid_id: str | None = SqlField(default=None, max_length=40)
    departments: str = SqlField(default="")
    deadline: datetime | None = SqlField(default=None, sa_type=timestamp())
    overdue: bool = False
    escalated: bool = False
    rework_count: int = 0
    reported_at: datetime = SqlField(sa_type=timestamp())
    updated_at: datetime = SqlField(sa_type=timestamp())
    closed_at: datetime | None = SqlField(default=None, sa_type=timestamp())


class IntakeTransition(Numbered, table=True):
    __tablename__ = "intake_transition"

    incident_id: str = SqlField(max_length=64, index=True)
    event_id: str = SqlField(max_length=64, unique=True)
    type: str = SqlField(max_length=40)
    occurred_at: datetime = SqlField(sa_type=timestamp())
    actor_kind: str = SqlField(max_length=20)
    actor_id: str = SqlField(max_length=64)
    on_behalf_of: str | None = SqlField(default=None, max_length=64)
    detail: str = SqlField(default="", max_length=2000)


TABLES = (IntakeIncident.__table__, IntakeTransition.__table__)  # type: ignore[attr-defined]
