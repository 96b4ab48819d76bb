"""The envelope every gridloop event carries, and the small value types events share."""

from __future__ import annotations

import dataclasses
import functools
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Self, TypeVar, cast

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

SCHEMA_VERSION = 1
"""The only envelope schema version this build reads and writes."""


EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
"""Every time gridloop takes in (an event's, an API body's, an Open311 argument) is from EARLIEST to LATEST, both
included: a year 1 or 9999 is a mistake to refuse with its reason, not a time to compute with (in Shanghai time,
or plus a deadline, it falls off the calendar)."""
RANGE = f"from {EARLIEST:%Y-%m-%dT%H:%M:%SZ} to {LATEST:%Y-%m-%dT%H:%M:%SZ}"


def aware_utc(value: datetime) -> datetime:
    """``value`` in UTC; ValueError, saying why, unless it carries a timezone and falls from EARLIEST to LATEST."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamps must carry a timezone (ISO 8601 with offset)")
    try:
        utc = value.astimezone(UTC)
    except OverflowError:  # year 1 east of UTC, year 9999 west of it: before or after what a datetime holds
        utc = None
    if utc is None or not EARLIEST <= utc <= LATEST:
        raise ValueError(f"timestamps must be {RANGE}, not {value.isoformat()}")
    return utc


AwareDatetime = Annotated[
    datetime,
    AfterValidator(aware_utc),
    WithJsonSchema(
        {
            "type": "string",
            "format": "date-time",
            "description": f"with its timezone, {RANGE}",
        }
    ),
]
"""A timestamp with its timezone, from EARLIEST to LATEST, taken as UTC."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_event_id() -> str:
    return str(uuid.uuid4())


class Frozen(BaseModel):
    """Immutable, strict-keyed model: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class ActorKind(StrEnum):
    GRID_WORKER = "grid_worker"
    DEPARTMENT = "department"
    OPS_CENTER = "ops_center"
    CITIZEN = "citizen"
    SENSOR = "sensor"
    SYSTEM = "system"


class Actor(Frozen):
    """Who did it: a person or a service, always recorded on every transition.

    The actor is whoever acted (the caller's token); one acting for someone else (an administrator deciding for a
    grid worker, the hotline desk reporting for a caller) is recorded as itself ``on_behalf_of`` that person, never
    as the person."""

    kind: ActorKind
    id: Annotated[str, Field(min_length=1, max_length=64)]
    department: str | None = None
    on_behalf_of: Annotated[str | None, Field(min_length=1, max_length=64, exclude_if=lambda v: v is None)] = None
    """The person the actor acted for; absent (and not written: such a record reads as before) when it acted for
    itself."""

    @classmethod
    def system(cls, service: str) -> Actor:
        return cls(kind=ActorKind.SYSTEM, id=service)

    def on_behalf(self, person: str | None) -> Actor:
        """This actor acting for ``person``; itself when ``person`` is nobody or itself."""
        if person is None or person == self.id:
            return self
        return Actor(kind=self.kind, id=self.id, department=self.department, on_behalf_of=person)


class Location(Frozen):
    lat: Annotated[float, Field(ge=-90, le=90)]
    lon: Annotated[float, Field(ge=-180, le=180)]
    address: Annotated[str, Field(max_length=200)] = ""


class Event(Frozen):
    """Envelope shared by every event. Subclasses pin ``type`` to their own name."""

    event_id: str = Field(default_factory=new_event_id, min_length=1, max_length=64)
    incident_id: Annotated[str, Field(min_length=1, max_length=64)]
    type: str
    schema_version: Annotated[int, Field(strict=True)] = SCHEMA_VERSION
    """A JSON integer: a version written as a string ("1") is another envelope, refused."""
    occurred_at: AwareDatetime = Field(default_factory=utcnow)
    actor: Actor
    correlation_id: Annotated[str, Field(min_length=1, max_length=64)]
    causation_id: str | None = None

    @classmethod
    def following(cls, cause: Event, actor: Actor, **fields: Any) -> Self:
        """An event that follows ``cause``: same incident and correlation id, cause recorded."""
        fields.setdefault("incident_id", cause.incident_id)
        return cls(actor=actor, correlation_id=cause.correlation_id, causation_id=cause.event_id, **fields)

    if not TYPE_CHECKING:  # as pydantic's own: typed, every attribute would look present

        def __getattr__(self, item: str) -> Any:
            """A field the event does not have: ``getattr(event, "work_order_id", None)`` asks on every event a
            fold reads. pydantic's answer looks first for private attributes and extra fields, which an event has
            none of (``extra="forbid"``); this is its answer without the lookups, a few times cheaper."""
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {item!r}")


R = TypeVar("R")


@functools.cache
def _fields(kind: Any) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(kind))


def row_of(kind: type[R], event: Event, /, **values: Any) -> R:
    """The row ``kind`` (a service's dataclass) that ``event`` opens: each field of ``kind`` that the event has under
    the same name, as the event has it, and the ``lat``, ``lon`` and ``address`` of its ``location``; then
    ``values``, what the row keeps in another form or the event does not say."""
    names = _fields(cast(Any, kind))  # a class: hashable, whatever its type says
    given = type(event).model_fields
    copied = {name: getattr(event, name) for name in names if name in given}
    if isinstance(location := getattr(event, "location", None), Location):
        copied.update((name, getattr(location, name)) for name in ("lat", "lon", "address") if name in names)
    return kind(**{**copied, **values})


def fields_from(kind: type[BaseModel], source: object) -> dict[str, Any]:
    """What ``source`` says for the fields of the event (or model) ``kind``: each of its attributes named as a
    field, as it has it; :func:`row_of` the other way round."""
    return {name: getattr(source, name) for name in kind.model_fields if hasattr(source, name)}
