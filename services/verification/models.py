"""verification's own data: one task per 核查 request, waiting for a worker of its grid to pass or fail it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import sqlalchemy as sa
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from sqlmodel import Field as SqlField
from sqlmodel import SQLModel

from schemas import VerificationStatus
from services.common.batch import MAX_BATCH, ItemId, unique
from services.common.db import timestamp


class VerificationTask(SQLModel, table=True):
    __tablename__ = "verification_task"
    __table_args__ = (
        # a grid's queue (grid, status, oldest request first) read straight from the index, whatever the number
        # of tasks decided before
        sa.Index("ix_verification_task_queue", "grid_id", "status", "requested_at"),
    )

    verification_id: str = SqlField(primary_key=True, max_length=80)
    incident_id: str = SqlField(max_length=64, index=True)
    correlation_id: str = SqlField(max_length=64)
    request_event_id: str = SqlField(max_length=64)
    """The VerificationRequested event: the cause recorded on the outcome."""
    grid_id: str = SqlField(max_length=40, index=True)
    worker_id: str = SqlField(max_length=64, index=True)
    """The worker asked to verify: by default the only one who decides (see ``verifier_policy``)."""
    reporter_id: str | None = SqlField(default=None, max_length=64)
    """Who reported the incident (None on a task of an earlier version): under the grid policy, not a verifier."""
    handled_by: str | None = SqlField(default=None)
    """Who did the work being verified, space-separated: never a verifier (None on a task of an earlier version)."""
    category_code: str = SqlField(max_length=40)
    lat: float
    lon: float
    address: str = SqlField(default="", max_length=200)
    description: str = SqlField(default="", max_length=2000)
    work_order_ids: str = SqlField(default="")
    evidence_urls: str = SqlField(default="")
    round: int = 1
    status: str = SqlField(default=VerificationStatus.PENDING, max_length=10, index=True)
    requested_at: datetime = SqlField(sa_type=timestamp(), index=True)
    decided_at: datetime | None = SqlField(default=None, sa_type=timestamp())
    decided_by: str | None = SqlField(default=None, max_length=64)
    """Who decided: the caller's token, never the person it acted for."""
    decided_on_behalf_of: str | None = SqlField(default=None, max_length=64)
    """The worker an administrator decided for; None when the worker decided."""
    note: str = SqlField(default="", max_length=1000)


TABLES = (VerificationTask.__table__,)  # type: ignore[attr-defined]


# -- API ---------------------------------------------------------------------------------------------

WorkerId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\w.@:-]+$", examples=["w-a01-2"])]


class PassRequest(BaseModel):
    """The grid worker found the problem solved: 核查通过."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    worker_id: WorkerId | None = None
    """Over HTTP a grid worker's token says who, and a body naming someone else is refused; an administrator
    names the worker it decides for, and is recorded as itself on their behalf."""
    note: Annotated[str, Field(max_length=1000)] = ""


class PassVerifications(PassRequest):
    """批量核查通过: the grid worker found several problems solved (back from a round), one note for all."""

    verification_ids: Annotated[list[ItemId], Field(min_length=1, max_length=MAX_BATCH), AfterValidator(unique)]


class FailRequest(BaseModel):
    """The grid worker found the problem not (well enough) solved: 核查不通过, the work goes back (返工)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    worker_id: WorkerId | None = None
    """As in :class:`PassRequest`: the worker deciding, or the one an administrator decides for."""
    note: Annotated[str, Field(min_length=1, max_length=1000, examples=["garbage still piled by the gate"])]
    """What is still wrong: the department sees it with the returned work."""


class VerificationDecided(BaseModel):
    verification_id: str
    status: str


def _words(value: object) -> object:
    """A list stored as space-separated words (work order ids, evidence URLs), read as the list."""
    return value.split() if isinstance(value, str) else value


Words = Annotated[list[str], BeforeValidator(_words)]


class VerificationPublic(BaseModel):
    # a task as the API shows it, filled with model_validate(task, from_attributes=True)
    verification_id: str
    incident_id: str
    correlation_id: str
    grid_id: str
    worker_id: str
    category_code: str
    lat: float
    lon: float
    address: str
    description: str
    work_order_ids: Words
    evidence_urls: Words
    round: int
    status: str
    requested_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    decided_on_behalf_of: str | None = None
    note: str
