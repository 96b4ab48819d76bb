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
    utcnow,
)
from .codec import DecodeError, decode_event, encode_event
from .events import *  # noqa: F403
from .events import EVENT_TYPES, TERMINAL_EVENTS, AnyEvent
from .topics import CATALOG, Topic, topics_for

__all__ = [
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
    "TERMINAL_EVENTS",
    "Topic",
    "aware_utc",
    "decode_event",
    "encode_event",
    "topics_for",
    "utcnow",
    *EVENT_TYPES,
]
