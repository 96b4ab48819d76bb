"""gridloop's contract: every event, the envelope they share, the topic catalog and the reference data."""

from ._base import SCHEMA_VERSION, Actor, ActorKind, AwareDatetime, Event, Location, utcnow
from .codec import DecodeError, decode_event, encode_event
from .events import *  # noqa: F403
from .events import EVENT_TYPES, TERMINAL_EVENTS, AnyEvent
from .topics import CATALOG, Topic, topics_for

__all__ = [
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
    "decode_event",
    "encode_event",
    "topics_for",
    "utcnow",
    *EVENT_TYPES,
]
