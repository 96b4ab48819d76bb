"""handling's own data: each department's work orders as it works them, and the webhook deliveries to send."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import sqlalchemy as sa
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, HttpUrl, model_validator
from sqlmodel import Field as SqlField

from schemas import AwareDatetime, DeliveryStatus, ExtensionStatus
from services.common.batch import MAX_BATCH, ItemId, unique
from services.common.columns import WorkOrderColumns
from services.common.db import Numbered, timestamp

# -- tables ------------------------------------------------------------------------------------------


class HandlingWorkOrder(WorkOrderColumns, table=True):
    __tablename__ = "handling_work_order"
    __table_args__ = (
        # a desk's queue (department, status, earliest deadline first) read straight from the index: with the
        # single-column indexes SQLite may take the department's and sort all its orders ever made, a cost that
        # grows with every closed order
        sa.Index("ix_handling_work_order_queue", "department_code", "status", "deadline"),
    )

    correlation_id: str = SqlField(max_length=64)
    coordinator: str | None = SqlField(default=None, max_length=40)
    category_code: str = SqlField(max_length=40)
    grid_id: str = SqlField(max_length=40)
    lat: float
    lon: float
    address: str = SqlField(default="", max_length=200)
    description: str = SqlField(default="", max_length=2000)
    photo_urls: str = ""
    priority: int = 3
    rework_count: int = 0
    last_note: str = SqlField(default="", max_length=1000)
    """The latest word from the center: the verifier's 返工 note, or why an extension was refused."""
    extension_status: str = SqlField(default=ExtensionStatus.NONE, max_length=10)
    requested_deadline: datetime | None = SqlField(default=None, sa_type=timestamp())
    result: str = SqlField(default="", max_length=2000)
    evidence_urls: str = ""


class HandlingWebhookDelivery(Numbered, table=True):
    """A push of one event to a department's own system, sent by the deliverer timer (never by the consumer)."""

    __tablename__ = "handling_webhook_delivery"

    work_order_id: str = SqlField(max_length=80, index=True)
    department_code: str = SqlField(max_length=40, index=True)
    url: str = SqlField(max_length=2000)
    event_id: str = SqlField(max_length=64)
    event_type: str = SqlField(max_length=40)
    payload: str
    """The event as JSON, exactly as published on Kafka."""
    attempts: int = 0
    next_attempt_at: datetime = SqlField(sa_type=timestamp(), index=True)
    status: str = SqlField(default=DeliveryStatus.PENDING, max_length=10, index=True)
    last_error: str = SqlField(default="", max_length=1000)
    created_at: datetime = SqlField(sa_type=timestamp())
    delivered_at: datetime | None = SqlField(default=None, sa_type=timestamp())


TABLES = (HandlingWorkOrder.__table__, HandlingWebhookDelivery.__table__)  # type: ignore[attr-defined]


# -- API ---------------------------------------------------------------------------------------------

ActorId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\w.@:-]+$", examples=["cityops-zhang"])]
DepartmentCode = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[a-z0-9_]+$", examples=["roads"])]
Reason = Annotated[str, Field(min_length=1, max_length=1000)]


class DepartmentCommand(BaseModel):
    """Who acts, for which department: it must be the work order's department.

    Over HTTP both come from the caller's token; a body may repeat them, and then they must match it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    actor_id: ActorId | None = None
    department_code: DepartmentCode | None = None


class AcceptWorkOrder(DepartmentCommand):
    """签收: the department takes the work order."""


class ReturnWorkOrder(DepartmentCommand):
    """退回: not this department's work; the center routes it elsewhere."""

    reason: Reason


class RequestExtension(DepartmentCommand):
    """延期: more time, decided by the operations center (城运中心)."""

    requested_deadline: Annotated[AwareDatetime, Field(examples=["2025-06-01T18:00:00+08:00"])]
    reason: Reason


class HandleWorkOrder(DepartmentCommand):
    """处置: the work is done; the grid worker will verify it (核查)."""

    result: Annotated[str, Field(min_length=1, max_length=2000)]
    evidence_urls: Annotated[list[HttpUrl], Field(max_length=10)] = []


class AcceptWorkOrders(DepartmentCommand):
    """批量签收: the department takes several work orders at once (a desk clearing its queue)."""

    work_order_ids: Annotated[list[ItemId], Field(min_length=1, max_length=MAX_BATCH), AfterValidator(unique)]


class HandledWork(BaseModel):
    """One work order done, in a :class:`HandleWorkOrders`."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    work_order_id: ItemId
    result: Annotated[str, Field(min_length=1, max_length=2000)]
    evidence_urls: Annotated[list[HttpUrl], Field(max_length=10)] = []


class HandleWorkOrders(DepartmentCommand):
    """批量处置: several work orders done, each with its result and evidence."""

    items: Annotated[list[HandledWork], Field(min_length=1, max_length=MAX_BATCH)]

    @model_validator(mode="after")
    def _each_once(self) -> HandleWorkOrders:
        unique([item.work_order_id for item in self.items])
        return self


class WorkOrderAction(BaseModel):
    work_order_id: str
    status: str


class WorkOrderPublic(BaseModel):
    work_order_id: str
    incident_id: str
    department_code: str
    role: str
    coordinator: str | None
    category_code: str
    grid_id: str
    lat: float
    lon: float
    address: str
    description: str
    photo_urls: list[str]
    priority: int
    attempt: int
    status: str
    deadline: datetime
    overdue: bool
    dispatched_at: datetime
    accepted_at: datetime | None
    handled_at: datetime | None
    rework_count: int
    last_note: str
    extension_status: str
    requested_deadline: datetime | None
    result: str
    evidence_urls: list[str]


class WebhookDeliveryPublic(BaseModel):
    id: int
    work_order_id: str
    department_code: str
    url: str
    event_id: str
    event_type: str
    attempts: int
    status: str
    next_attempt_at: datetime
    last_error: str
    created_at: datetime
    delivered_at: datetime | None
