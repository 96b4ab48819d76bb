"""Bytes on the wire ⇄ events. Anything that is not a valid current event raises DecodeError with a reason."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError

from ._base import SCHEMA_VERSION, Event
from .events import EVENT_ADAPTER, EVENT_TYPES


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
    if kind not in EVENT_TYPES:
        raise DecodeError(f"unknown event type {kind!r}")
    try:
        event: Event = EVENT_ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'][1:]) or '(root)'}: {err['msg']}" for err in exc.errors()
        )
        raise DecodeError(f"invalid {kind}: {problems}") from None
    return event
