"""Every lifecycle event of an incident, past tense, one frozen model each.

The loop (数字城管): report → 立案 file or reject (or merge into an open case) → 派遣 dispatch → 签收 accept /
退回 return / 延期 extension → 处置 handle → 核查 verify (pass closes 结案, fail sends back 返工) — with 催办 reminders
and 督办 escalation to the operations center (城运中心) for overdue work.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, HttpUrl, TypeAdapter

from ._base import AwareDatetime, Event, Location

Text = Annotated[str, Field(max_length=2000)]
Note = Annotated[str, Field(max_length=1000)]
Urls = Annotated[list[HttpUrl], Field(max_length=10)]
Code = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[a-z0-9_]+$")]
WorkOrderId = Annotated[str, Field(min_length=1, max_length=80)]
PersonId = Annotated[str, Field(min_length=1, max_length=64)]


class Source(StrEnum):
    GRID_WORKER = "grid_worker"
    HOTLINE_12345 = "hotline_12345"
    SENSOR = "sensor"
    OPEN311 = "open311"


class Severity(StrEnum):
    NORMAL = "normal"
    MAJOR = "major"


class RejectReason(StrEnum):
    UNKNOWN_CATEGORY = "unknown_category"
    OUTSIDE_GRIDS = "outside_grids"
    MISSING_FIELDS = "missing_fields"


class EscalationReason(StrEnum):
    OVERDUE = "overdue"
    REPEATED_RETURNS = "repeated_returns"
    NO_DEPARTMENT = "no_department"


class WorkOrderRole(StrEnum):
    LEAD = "lead"
    SUPPORT = "support"


# --- intake ---------------------------------------------------------------------------------


class IncidentReported(Event):
    type: Literal["IncidentReported"] = "IncidentReported"
    source: Source
    category_code: Code
    location: Location
    description: Text
    photo_urls: Urls = []
    reporter_id: Annotated[str, Field(min_length=1, max_length=64)]
    client_report_id: Annotated[str, Field(min_length=1, max_length=80)]
    severity: Severity = Severity.NORMAL
    handled_on_spot: bool = False
    """小事一格解决: the worker fixed it on the spot; it goes straight to verification."""
    evidence_urls: Urls = []


# --- dispatch (立案 / 派遣) -------------------------------------------------------------------


class IncidentFiled(Event):
    type: Literal["IncidentFiled"] = "IncidentFiled"
    category_code: Code
    grid_id: Code
    priority: Annotated[int, Field(ge=1, le=5)]
    severity: Severity
    big: bool = False
    """大事全网联动: several departments engaged, the operations center coordinating."""
    handled_on_spot: bool = False


class IncidentRejected(Event):
    type: Literal["IncidentRejected"] = "IncidentRejected"
    reason_code: RejectReason
    reason: Note


class IncidentMerged(Event):
    type: Literal["IncidentMerged"] = "IncidentMerged"
    into_incident_id: Annotated[str, Field(min_length=1, max_length=64)]
    distance_m: Annotated[float, Field(ge=0)]
    category_code: Code | None = None


class WorkOrderDispatched(Event):
    type: Literal["WorkOrderDispatched"] = "WorkOrderDispatched"
    work_order_id: WorkOrderId
    department_code: Code
    role: WorkOrderRole = WorkOrderRole.LEAD
    coordinator: Code | None = None
    category_code: Code
    grid_id: Code
    location: Location
    description: Text
    photo_urls: Urls = []
    priority: Annotated[int, Field(ge=1, le=5)]
    deadline: AwareDatetime
    attempt: Annotated[int, Field(ge=1)] = 1
    """1 for the first department, +1 for each re-route after a return."""


class IncidentReworked(Event):
    """返工: verification failed, the work order goes back to the same department."""

    type: Literal["IncidentReworked"] = "IncidentReworked"
    work_order_id: WorkOrderId
    department_code: Code
    rework_count: Annotated[int, Field(ge=1)]
    note: Note
    deadline: AwareDatetime


class ExtensionGranted(Event):
    type: Literal["ExtensionGranted"] = "ExtensionGranted"
    work_order_id: WorkOrderId
    department_code: Code
    new_deadline: AwareDatetime


class ExtensionRefused(Event):
    type: Literal["ExtensionRefused"] = "ExtensionRefused"
    work_order_id: WorkOrderId
    department_code: Code
    reason: Note


class OverdueReminded(Event):
    """催办: the work order passed its deadline."""

    type: Literal["OverdueReminded"] = "OverdueReminded"
    work_order_id: WorkOrderId
    department_code: Code
    deadline: AwareDatetime
    overdue_s: Annotated[float, Field(ge=0)]


class IncidentEscalated(Event):
    """督办: the operations center (城运中心) takes over supervision."""

    type: Literal["IncidentEscalated"] = "IncidentEscalated"
    reason_code: EscalationReason
    reason: Note
    work_order_id: WorkOrderId | None = None
    department_code: Code | None = None
    to: Code = "ops_center"


class IncidentClosed(Event):
    """结案."""

    type: Literal["IncidentClosed"] = "IncidentClosed"
    category_code: Code
    grid_id: Code
    departments: list[Code]
    reported_at: AwareDatetime
    deadline: AwareDatetime | None
    on_time: bool
    rework_count: Annotated[int, Field(ge=0)]
    return_count: Annotated[int, Field(ge=0)]
    handled_on_spot: bool = False


# --- handling (签收 / 退回 / 延期 / 处置) ----------------------------------------------------------


class WorkOrderAccepted(Event):
    type: Literal["WorkOrderAccepted"] = "WorkOrderAccepted"
    work_order_id: WorkOrderId
    department_code: Code


class WorkOrderReturned(Event):
    type: Literal["WorkOrderReturned"] = "WorkOrderReturned"
    work_order_id: WorkOrderId
    department_code: Code
    reason: Annotated[str, Field(min_length=1, max_length=1000)]


class ExtensionRequested(Event):
    type: Literal["ExtensionRequested"] = "ExtensionRequested"
    work_order_id: WorkOrderId
    department_code: Code
    requested_deadline: AwareDatetime
    reason: Annotated[str, Field(min_length=1, max_length=1000)]


class WorkOrderHandled(Event):
    type: Literal["WorkOrderHandled"] = "WorkOrderHandled"
    work_order_id: WorkOrderId
    department_code: Code
    result: Annotated[str, Field(min_length=1, max_length=2000)]
    evidence_urls: Urls = []


# --- verification (核查) ------------------------------------------------------------------------


class VerificationRequested(Event):
    type: Literal["VerificationRequested"] = "VerificationRequested"
    verification_id: Annotated[str, Field(min_length=1, max_length=80)]
    grid_id: Code
    worker_id: Annotated[str, Field(min_length=1, max_length=64)]
    category_code: Code
    location: Location
    description: Text
    work_order_ids: list[WorkOrderId] = []
    evidence_urls: Urls = []
    round: Annotated[int, Field(ge=1)] = 1
    reporter_id: PersonId | None = None
    """Who reported the incident; absent on a request of an earlier version."""
    handled_by: Annotated[list[PersonId], Field(max_length=20)] = []
    """Who did the work being verified: the reporter who fixed it on the spot, the staff who handled its work
    orders. None of them verifies it."""


class VerificationPassed(Event):
    type: Literal["VerificationPassed"] = "VerificationPassed"
    verification_id: Annotated[str, Field(min_length=1, max_length=80)]
    note: Note = ""


class VerificationFailed(Event):
    type: Literal["VerificationFailed"] = "VerificationFailed"
    verification_id: Annotated[str, Field(min_length=1, max_length=80)]
    note: Annotated[str, Field(min_length=1, max_length=1000)]


AnyEvent = Annotated[
    IncidentReported
    | IncidentFiled
    | IncidentRejected
    | IncidentMerged
    | WorkOrderDispatched
    | IncidentReworked
    | ExtensionGranted
    | ExtensionRefused
    | OverdueReminded
    | IncidentEscalated
    | IncidentClosed
    | WorkOrderAccepted
    | WorkOrderReturned
    | ExtensionRequested
    | WorkOrderHandled
    | VerificationRequested
    | VerificationPassed
    | VerificationFailed,
    Field(discriminator="type"),
]

EVENT_ADAPTER: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)

EVENT_TYPES: dict[str, type[Event]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        IncidentReported,
        IncidentFiled,
        IncidentRejected,
        IncidentMerged,
        WorkOrderDispatched,
        IncidentReworked,
        ExtensionGranted,
        ExtensionRefused,
        OverdueReminded,
        IncidentEscalated,
        IncidentClosed,
        WorkOrderAccepted,
        WorkOrderReturned,
        ExtensionRequested,
        WorkOrderHandled,
        VerificationRequested,
        VerificationPassed,
        VerificationFailed,
    )
}

TERMINAL_EVENTS: frozenset[str] = frozenset({"IncidentClosed", "IncidentRejected", "IncidentMerged"})
"""After one of these an incident takes no further part in the loop (结案 / 不予立案 / 合并)."""
