"""gridloop's contract: every event, the envelope they share, the topic catalog and the reference data."""

from ._base import (
    EARLIEST,
    LATEST,
    RANGE,
    SCHEMA_VERSION,
    Actor,
    ActorKind,
    AwareDatetime,
    Event,
    Location,
    aware_utc,
    fields_from,
    row_of,
    utcnow,
)
from .clock import Moment
from .codec import DecodeError, decode_event, encode_event
from .events import *  # noqa: F403
from .events import EVENT_TYPES, TERMINAL_EVENTS, AnyEvent
from .reference import GAOHANG, Town
from .state import WorkOrderState
from .status import (
    CASE_OPEN,
    INCIDENT_FINAL,
    ORDER_ACTIVE,
    ORDER_LIVE,
    STATUS_AFTER,
    DeliveryStatus,
    ExtensionStatus,
    IncidentStatus,
    VerificationStatus,
    WorkOrderStatus,
)
from .topics import CATALOG, Topic, topics_for

__all__ = [
    "CASE_OPEN",
    "GAOHANG",
    "INCIDENT_FINAL",
    "ORDER_ACTIVE",
    "ORDER_LIVE",
    "STATUS_AFTER",
    "DeliveryStatus",
    "ExtensionStatus",
    "IncidentStatus",
    "Town",
    "VerificationStatus",
    "WorkOrderState",
    "WorkOrderStatus",
    "EARLIEST",
    "LATEST",
    "RANGE",
    "SCHEMA_VERSION",
    "Actor",
    "ActorKind",
    "AnyEvent",
    "AwareDatetime",
    "CATALOG",
    "DecodeError",
    "EVENT_TYPES",
    "Event",
    "Location",
    "Moment",
    "TERMINAL_EVENTS",
    "Topic",
    "aware_utc",
    "decode_event",
    "encode_event",
    "fields_from",
    "row_of",
    "topics_for",
    "utcnow",
    *EVENT_TYPES,
]
