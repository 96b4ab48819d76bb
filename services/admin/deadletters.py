"""Dead letters: list the records no consumer could process, and replay them to their source topic after a fix.

python -m services.admin deadletters list [--limit N] [--since ISO] [--json]
python -m services.admin deadletters replay (--offset N ... | --all) [--dry-run]

A dead letter (see ``services.common.kafka.dead_letter_record``) names the original record — its source topic,
partition and offset, its size and SHA-256 — says why it could not be processed, and carries its key and value
(UTF-8 text, or base64 for a binary value): whole when the record is small, as events are, else an
excerpt (``value_truncated``), so that a dead letter always fits on its topic. A replay sends that key and value
again to the same partition of the source topic — for an excerpt, the original read back from the source topic
at its offset, checked against the size and hash — with a header ``replayed_from`` naming the dead letter's offset
(and ``replayed_at``), so that the fixed consumer processes it again. Consumers are idempotent on event id:
replaying a record that was in fact applied changes nothing, and a record that is still bad is dead-lettered
again, at a new offset, with its reason. Dead letters written before sizes were kept (the whole record, always)
are read and replayed as before.

The dead-letter topic has one partition: a dead letter is named by its offset there (``#12``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol

import orjson
import typer

from schemas.topics import DEADLETTER
from services.common.admin import list_topics
from services.common.settings import ServiceSettings

with warnings.catch_warnings():
    # kafka-python reads its protocol schemas with importlib.resources' legacy API, deprecated on 3.11.
    warnings.filterwarnings("ignore", message=r"(read|open)_text is deprecated", category=DeprecationWarning)
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.errors import KafkaError

REPLAYED_FROM = "replayed_from"
"""Header on a replayed record: the offset of the dead letter it came from."""
REPLAYED_AT = "replayed_at"

Original = tuple[bytes | None, bytes | None]
"""A record's (key, value) as read back from its source topic."""
Fetch = Callable[[str, int, int], Original | None]
"""Reads the record at (topic, partition, offset); None once the topic no longer holds it."""


class SelectionError(ValueError):
    """The dead letters asked for cannot be chosen (none given, unknown offsets)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the dead-letter topic, read back."""

    offset: int
    """Where the dead letter is on the dead-letter topic."""
    reason: str
    service: str
    source_topic: str
    source_partition: int
    source_offset: int
    failed_at: datetime | None
    key: str | None
    value: str | None
    value_encoding: str = "utf-8"
    problem: str | None = None
    """Why the dead letter itself cannot be read (it is then listed, never replayed)."""
    value_bytes: int | None = None
    """The original value's size (None: no value, or a dead letter written before sizes were kept)."""
    value_sha256: str | None = None
    truncated: bool = False
    """The dead letter holds an excerpt of the value or the key only: a replay reads the original from its source."""

    @classmethod
    def from_record(cls, offset: int, raw: bytes | None) -> DeadLetter:
        """Parse a dead-letter record's value; anything unreadable becomes a dead letter with a ``problem``."""

        def unreadable(problem: str) -> DeadLetter:
            return cls(
                offset=offset,
                reason="",
                service="?",
                source_topic="?",
                source_partition=-1,
                source_offset=-1,
                failed_at=None,
                key=None,
                value=None,
                problem=problem,
            )

        try:
            body: Any = orjson.loads(raw or b"")
        except orjson.JSONDecodeError as exc:
            return unreadable(f"not a dead letter: {exc}")
        if not isinstance(body, dict):
            return unreadable(f"not a dead letter: a JSON {type(body).__name__}")
        try:
            failed_at = _parse_time(body["failed_at"]) if body.get("failed_at") else None
            letter = cls(
                offset=offset,
                reason=str(body.get("reason", "")),
                service=str(body.get("service", "?")),
                source_topic=str(body["source_topic"]),
                source_partition=int(body["partition"]),
                source_offset=int(body["offset"]),
                failed_at=failed_at,
                key=None if body.get("key") is None else str(body["key"]),
                value=None if body.get("value") is None else str(body["value"]),
                value_encoding=str(body.get("value_encoding") or "utf-8"),
                value_bytes=None if body.get("value_bytes") is None else int(body["value_bytes"]),
                value_sha256=None if body.get("value_sha256") is None else str(body["value_sha256"]),
                truncated=bool(body.get("value_truncated")) or bool(body.get("key_truncated")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            return unreadable(f"not a dead letter: {type(exc).__name__}: {exc}")
        if letter.value_encoding not in ("utf-8", "base64"):
            return unreadable(f"unknown value_encoding {letter.value_encoding!r}")
        return letter

    @property
    def source(self) -> str:
        return f"{self.source_topic}[{self.source_partition}]@{self.source_offset}"

    def original_key(self) -> bytes | None:
        return None if self.key is None else self.key.encode()

    def excerpt(self) -> bytes | None:
        """The value as the dead letter holds it: the whole original, or its first bytes (see ``truncated``)."""
        if self.value is None:
            return None
        if self.value_encoding == "base64":
            try:
                return base64.b64decode(self.value, validate=True)
            except binascii.Error as exc:
                raise ValueError(f"dead letter #{self.offset}: value is not valid base64 ({exc})") from None
        return self.value.encode()

    def original_value(self) -> bytes | None:
        """The value exactly as the consumer received it; a ValueError if the dead letter holds an excerpt only."""
        if self.truncated:
            raise ValueError(
                f"dead letter #{self.offset} holds an excerpt of the record only ({self.value_bytes} bytes): "
                f"the original is on {self.source}"
            )
        return self.excerpt()

    def is_original(self, value: bytes | None) -> bool:
        """Whether ``value`` is the record this dead letter was written for, by its size and hash (when kept)."""
        if value is None:
            return self.value_bytes is None and self.value_sha256 is None
        if self.value_bytes is not None and len(value) != self.value_bytes:
            return False
        return self.value_sha256 is None or hashlib.sha256(value).hexdigest() == self.value_sha256

    def preview(self, width: int = 60) -> str:
        """The value on one short line: text as is, a binary value as its size and first bytes in hex; a value
        the dead letter holds an excerpt of is marked with its size."""
        if self.problem is not None:
            return "-"
        if self.value is None:
            return "(no value)"
        size = self._size()
        if self.value_encoding == "base64":
            try:
                raw = self.excerpt() or b""
            except ValueError:
                return "(unreadable base64)"
            head = raw[: max(1, (width - 20) // 3)].hex(" ")
            total = len(raw) if size is None else size
            return _shorten(f"<{total} bytes> {head}{' …' if total * 3 > len(head) + 1 else ''}", width)
        if self.truncated:
            return _shorten(f"<{size} bytes> {' '.join(self.value.split())}".rstrip(), width)
        return _shorten(" ".join(self.value.split()), width)

    def _size(self) -> int | None:
        if self.value_bytes is not None:
            return self.value_bytes
        try:
            value = self.excerpt()
        except ValueError:
            return None
        return None if value is None else len(value)

    def as_dict(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "reason": self.reason,
            "service": self.service,
            "source_topic": self.source_topic,
            "source_partition": self.source_partition,
            "source_offset": self.source_offset,
            "failed_at": self.failed_at.isoformat() if self.failed_at else None,
            "key": self.key,
            "value_preview": self.preview(),
            "value_bytes": self._size(),
            "value_encoding": self.value_encoding,
            "value_sha256": self.value_sha256,
            "truncated": self.truncated,
            "problem": self.problem,
        }


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def parse_since(text: str) -> datetime:
    """An ISO 8601 date or date-time (UTC when no offset is given)."""
    try:
        return _parse_time(text)
    except ValueError:
        raise ValueError(
            f"--since wants an ISO 8601 date or date-time (2026-06-01T09:00:00+08:00), not {text!r}"
        ) from None


# -- choosing -----------------------------------------------------------------------------------------


def recent(
    letters: Sequence[DeadLetter], *, since: datetime | None = None, limit: int | None = None
) -> list[DeadLetter]:
    """The dead letters that failed at or after ``since``, the latest ``limit`` of them, oldest first."""
    chosen = [d for d in letters if since is None or (d.failed_at is not None and d.failed_at >= since)]
    chosen.sort(key=lambda d: d.offset)
    return chosen[-limit:] if limit else chosen


def chosen_for_replay(
    letters: Sequence[DeadLetter], *, offsets: Iterable[int] = (), every: bool = False
) -> list[DeadLetter]:
    """The dead letters at ``offsets`` (each once, in offset order), or all of them with ``every``."""
    wanted = sorted(set(offsets))
    if every and wanted:
        raise SelectionError("give either --offset or --all, not both")
    if every:
        return sorted(letters, key=lambda d: d.offset)
    if not wanted:
        raise SelectionError("say which dead letters to replay: --offset N (repeatable) or --all")
    by_offset = {d.offset: d for d in letters}
    missing = [o for o in wanted if o not in by_offset]
    if missing:
        raise SelectionError(f"no dead letter at offset {', '.join(map(str, missing))}")
    return [by_offset[o] for o in wanted]


# -- showing --------------------------------------------------------------------------------------------

_HEADER = f"{'#':>6}  {'failed at (UTC)':19}  {'service':12}  {'source':44}  {'key':22}  reason"


def format_table(letters: Sequence[DeadLetter]) -> str:
    """Two lines per dead letter: where it came from and why it failed, then a preview of its value."""
    if not letters:
        return "no dead letters"
    lines = [_HEADER]
    for d in letters:
        failed = d.failed_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if d.failed_at else "?"
        if d.problem is not None:
            lines.append(f"{d.offset:>6}  {failed:19}  {'?':12}  {'?':44}  {'-':22}  {d.problem}")
            continue
        key = _shorten(d.key if d.key is not None else "-", 22)
        lines.append(f"{d.offset:>6}  {failed:19}  {d.service:12}  {d.source:44}  {key:22}  {d.reason}")
        lines.append(f"{'':6}  value ({d.value_encoding}): {d.preview(100)}")
    return "\n".join(lines)


def to_json(letters: Sequence[DeadLetter]) -> str:
    return orjson.dumps([d.as_dict() for d in letters], option=orjson.OPT_INDENT_2).decode()


# -- replaying ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Replay:
    """One original record to send again."""

    letter: DeadLetter
    topic: str
    partition: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def plan_replay(
    letters: Sequence[DeadLetter],
    *,
    existing_topics: set[str],
    dead_letter_topic: str,
    now: datetime | None = None,
    fetch: Fetch | None = None,
) -> tuple[list[Replay], list[tuple[DeadLetter, str]]]:
    """What to send for each dead letter, and the ones that cannot be replayed with the reason. A dead letter that
    holds an excerpt only is replayed with the original, read by ``fetch`` from its source topic."""
    at = (now or datetime.now(UTC)).isoformat().encode()
    plan: list[Replay] = []
    skipped: list[tuple[DeadLetter, str]] = []
    for d in letters:
        if d.problem is not None:
            skipped.append((d, d.problem))
            continue
        if d.source_topic == dead_letter_topic:
            skipped.append((d, "its source is the dead-letter topic itself"))
            continue
        if d.source_topic not in existing_topics:
            skipped.append((d, f"source topic {d.source_topic} does not exist"))
            continue
        try:
            key, value = _original(d, fetch)
        except ValueError as exc:
            skipped.append((d, str(exc)))
            continue
        if value is None:
            skipped.append((d, "the record had no value"))
            continue
        headers = [(REPLAYED_FROM, str(d.offset).encode()), (REPLAYED_AT, at)]
        plan.append(Replay(d, d.source_topic, d.source_partition, key, value, headers))
    return plan, skipped


def _original(d: DeadLetter, fetch: Fetch | None) -> Original:
    """The dead-lettered record's key and value: from the dead letter, or from its source if it holds an excerpt."""
    if not d.truncated:
        return d.original_key(), d.original_value()
    if fetch is None:
        raise ValueError(f"the dead letter holds an excerpt only; the original is on {d.source}")
    found = fetch(d.source_topic, d.source_partition, d.source_offset)
    if found is None:
        raise ValueError(f"the dead letter holds an excerpt only, and {d.source} is no longer on its topic")
    key, value = found
    if not d.is_original(value):
        raise ValueError(f"the record at {d.source} is not the one dead-lettered (size or sha256 differs)")
    return key, value


class _Sender(Protocol):
    def send(
        self, topic: str, value: bytes | None = ..., key: bytes | None = ..., headers: Any = ..., partition: Any = ...
    ) -> Any: ...

    def flush(self, timeout: float | None = ...) -> None: ...


def send_replays(producer: _Sender, plan: Sequence[Replay], timeout_s: float = 30.0) -> list[tuple[Replay, int]]:
    """Send every planned record and wait until the broker has each; returns (replay, new offset) pairs."""
    futures = [
        (r, producer.send(r.topic, value=r.value, key=r.key, headers=r.headers, partition=r.partition)) for r in plan
    ]
    producer.flush(timeout=timeout_s)
    return [(r, int(f.get(timeout=timeout_s).offset)) for r, f in futures]


def describe_replay(r: Replay, new_offset: int | None = None) -> str:
    where = f"{r.topic}[{r.partition}]" + (f"@{new_offset}" if new_offset is not None else "")
    verb = "replayed" if new_offset is not None else "would replay"
    key = r.key.decode(errors="replace") if r.key is not None else "-"
    return f"{verb} #{r.letter.offset} → {where}  key {key}  {len(r.value)} bytes  (was: {r.letter.reason})"


# -- Kafka ----------------------------------------------------------------------------------------------


def read_dead_letters(
    bootstrap: str, topic: str | None = None, *, since: datetime | None = None, timeout_s: float = 30.0
) -> list[DeadLetter]:
    """Every dead letter on ``topic`` (default: this namespace's), from ``since`` (by record time) or the start."""
    import time

    name = topic or DEADLETTER.name
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        client_id="gridloop-admin-deadletters",
        group_id=None,
        enable_auto_commit=False,
        request_timeout_ms=int(timeout_s * 1000) + 5000,
        **ServiceSettings().kafka_client_options(),  # the administrator's credentials, where the broker asks
    )
    try:
        partitions = consumer.partitions_for_topic(name)
        if not partitions:
            raise RuntimeError(f"no topic {name} on {bootstrap} (run `make topics`)")
        parts = [TopicPartition(name, p) for p in sorted(partitions)]
        consumer.assign(parts)
        end = {tp.partition: int(o) for tp, o in consumer.end_offsets(parts).items()}
        start = {tp.partition: int(o) for tp, o in consumer.beginning_offsets(parts).items()}
        if since is not None:  # a record's time is when it was dead-lettered: skip what came before
            found = consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in parts})
            start = {tp.partition: (found[tp].offset if found.get(tp) else end[tp.partition]) for tp in parts}
        for tp in parts:
            consumer.seek(tp, start[tp.partition])
        letters: list[DeadLetter] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp.partition] for tp in parts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {name} to its end within {timeout_s:.0f} s")
            for batch in consumer.poll(timeout_ms=500).values():
                letters.extend(DeadLetter.from_record(r.offset, r.value) for r in batch if r.offset < end[r.partition])
        return sorted(letters, key=lambda d: d.offset)
    finally:
        consumer.close()


@contextmanager
def source_reader(bootstrap: str, timeout_s: float = 30.0) -> Iterator[Fetch]:
    """Reads single records back from their source topics (the originals of dead letters holding excerpts)."""
    import time

    made: list[KafkaConsumer] = []  # connected at the first record asked for: most replays need none

    def fetch(topic: str, partition: int, offset: int) -> Original | None:
        if not made:
            made.append(
                KafkaConsumer(
                    bootstrap_servers=bootstrap.split(","),
                    client_id="gridloop-admin-deadletters",
                    group_id=None,
                    enable_auto_commit=False,
                    request_timeout_ms=int(timeout_s * 1000) + 5000,
                    **ServiceSettings().kafka_client_options(),  # the administrator's credentials, where asked
                )
            )
        consumer = made[0]
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        first = int(consumer.beginning_offsets([tp])[tp])
        end = int(consumer.end_offsets([tp])[tp])
        if not first <= offset < end:
            return None
        consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                for record in batch:
                    # a compacted topic may have dropped it: the first record read back is then a later one
                    return (record.key, record.value) if record.offset == offset else None
            if consumer.position(tp) >= end:
                return None
        raise TimeoutError(f"could not read {topic}[{partition}]@{offset} within {timeout_s:.0f} s")

    try:
        yield fetch
    finally:
        for consumer in made:
            consumer.close()


def replay(bootstrap: str, plan: Sequence[Replay]) -> list[tuple[Replay, int]]:
    producer = KafkaProducer(
        bootstrap_servers=bootstrap.split(","),
        client_id="gridloop-admin-replay",
        acks="all",
        max_request_size=2 * 1024 * 1024,  # the original may be as large as its topic takes; the broker decides
        **ServiceSettings().kafka_client_options(),
    )
    try:
        return send_replays(producer, plan)
    finally:
        producer.close()


# -- CLI ------------------------------------------------------------------------------------------------

cli = typer.Typer(
    help="Dead letters: records no consumer could process. List them; replay them to their source after a fix.",
    no_args_is_help=True,
)


def _bootstrap() -> str:
    return ServiceSettings().kafka_bootstrap


def _read(bootstrap: str, since: datetime | None = None) -> list[DeadLetter]:
    try:
        return read_dead_letters(bootstrap, since=since)
    except (KafkaError, RuntimeError, TimeoutError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@cli.command("list")
def list_command(
    limit: Annotated[int | None, typer.Option(min=1, help="only the latest N")] = None,
    since: Annotated[str | None, typer.Option(help="only those that failed at or after this ISO 8601 time")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table")] = False,
) -> None:
    """Show the dead letters: offset, when, which service, the source record, its key, the reason, the value."""
    try:
        after = parse_since(since) if since else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    letters = recent(_read(_bootstrap(), since=after), since=after, limit=limit)
    typer.echo(to_json(letters) if as_json else format_table(letters))


@cli.command("replay")
def replay_command(
    offset: Annotated[list[int] | None, typer.Option("--offset", help="a dead letter's offset (repeatable)")] = None,
    every: Annotated[bool, typer.Option("--all", help="every dead letter")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would be sent, send nothing")] = False,
) -> None:
    """Send the chosen dead letters' original records (key, value) again to their source topic and partition."""
    bootstrap = _bootstrap()
    letters = _read(bootstrap)
    try:
        chosen = chosen_for_replay(letters, offsets=offset or (), every=every)
    except SelectionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        with source_reader(bootstrap) as fetch:
            plan, skipped = plan_replay(
                chosen, existing_topics=list_topics(bootstrap), dead_letter_topic=DEADLETTER.name, fetch=fetch
            )
    except (KafkaError, TimeoutError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for d, why in skipped:
        typer.echo(f"skipped #{d.offset}: {why}", err=True)
    if dry_run:
        for r in plan:
            typer.echo(describe_replay(r))
        typer.echo(f"dry run: {len(plan)} of {len(chosen)} dead letters would be replayed, {len(skipped)} skipped")
        return
    sent = replay(bootstrap, plan) if plan else []
    for r, new_offset in sent:
        typer.echo(describe_replay(r, new_offset))
    typer.echo(f"replayed {len(sent)} of {len(chosen)} dead letters, {len(skipped)} skipped")
    if skipped:
        raise typer.Exit(1)
