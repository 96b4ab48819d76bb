"""Bytes on the wire ⇄ events. Anything that is not a valid current event raises DecodeError with a reason —
whatever went wrong in decoding it (an OverflowError, a TypeError, a RecursionError: never anything else)."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError

from ._base import SCHEMA_VERSION, Event
from .events import EVENT_ADAPTER, EVENT_TYPES

_ON_THE_WIRE = frozenset({"event_id", "schema_version", "occurred_at"})
"""Envelope fields an event built in code may leave to their defaults (a new id, this version, now), but a record
must carry: one without its event id would get a new one at every delivery, and the consumers that skip what they
saw by event id would apply it again."""


class DecodeError(ValueError):
    """A record that is not a valid gridloop event; ``reason`` says why in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode_event(event: Event) -> bytes:
    return event.model_dump_json().encode()


def decode_event(raw: bytes | str | None) -> Event:
    if raw is None or raw in (b"", ""):
        raise DecodeError("empty record")
    # the common case, a valid current event: validated straight from the JSON text, without building the
    # dicts of a parse first; anything else is looked at step by step below, to say why it is refused
    try:
        event: Event = EVENT_ADAPTER.validate_json(raw)
    except Exception:  # a ValidationError, or whatever else a validator raised (an OverflowError, say): see below
        pass
    else:
        if event.schema_version == SCHEMA_VERSION and event.model_fields_set >= _ON_THE_WIRE:
            return event
    return _decode_or_say_why(raw)


def _decode_or_say_why(raw: bytes | str) -> Event:
    try:
        return _step_by_step(raw)
    except DecodeError:
        raise
    except Exception as exc:  # never anything but a DecodeError: the consumer sets the record aside with it
        raise DecodeError(f"undecodable record: {type(exc).__name__}: {exc}") from None


def _step_by_step(raw: bytes | str) -> Event:
    try:
        data: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DecodeError(f"expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DecodeError(f"unknown schema_version {version!r} (this build reads {SCHEMA_VERSION})")
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in EVENT_TYPES:
        raise DecodeError(f"unknown event type {kind!r}")
    problems = [f"{name}: Field required" for name in sorted(_ON_THE_WIRE - data.keys())]
    try:
        event: Event = EVENT_ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems += [f"{'.'.join(str(p) for p in err['loc'][1:]) or '(root)'}: {err['msg']}" for err in exc.errors()]
    except Exception as exc:  # not a ValidationError: a validator's own failure (an OverflowError, a TypeError)
        problems.append(f"{type(exc).__name__}: {exc}")
    if problems:
        raise DecodeError(f"invalid {kind}: {'; '.join(problems)}")
    return event
