"""The dead-letter tool without a broker: reading dead letters back, choosing, showing and planning a replay."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from services.admin import deadletters as dl
from services.admin.__main__ import cli
from services.common.kafka import EXCERPT_BYTES, REASON_KEPT, dead_letter_record

T0 = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
TOPIC = "gridloop.incidents.reported"
DLQ = "gridloop.deadletter"


def letter(offset: int, value: bytes | None = b"{this is not json", *, minute: int = 0, **kw: Any) -> dl.DeadLetter:
    """A dead letter as the services write it (services.common.kafka.dead_letter_record), read back."""
    fields: dict[str, Any] = {
        "service": "dispatch",
        "reason": "malformed JSON: unexpected character",
        "source_topic": TOPIC,
        "partition": 3,
        "offset": 40 + offset,
        "key": b"GL20260601-0001",
        "value": value,
        "failed_at": T0.replace(minute=minute),
    }
    fields.update(kw)
    _, raw, _ = dead_letter_record(**fields)
    return dl.DeadLetter.from_record(offset, raw)


def test_a_dead_letter_is_read_back_with_everything_the_service_wrote() -> None:
    d = letter(7)
    assert (d.offset, d.service, d.reason) == (7, "dispatch", "malformed JSON: unexpected character")
    assert (d.source_topic, d.source_partition, d.source_offset) == (TOPIC, 3, 47)
    assert d.source == f"{TOPIC}[3]@47"
    assert d.failed_at == T0 and d.key == "GL20260601-0001" and d.problem is None
    assert d.original_key() == b"GL20260601-0001"
    assert d.original_value() == b"{this is not json"


def test_a_binary_value_survives_the_round_trip_through_base64() -> None:
    raw = b"\xff\xfe\x00\x01binary\x80"
    d = letter(1, raw, reason="malformed JSON: str is not valid UTF-8")
    assert d.value_encoding == "base64"
    assert d.original_value() == raw
    assert d.preview().startswith(f"<{len(raw)} bytes> ff fe 00 01")


def test_no_value_and_no_key_are_kept_as_none() -> None:
    d = letter(2, None, key=None)
    assert d.original_value() is None and d.original_key() is None
    assert d.preview() == "(no value)"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"{not json", "not a dead letter"),
        (b"[1, 2]", "a JSON list"),
        (b'{"reason": "x"}', "KeyError"),
        (b'{"source_topic": "t", "partition": "p", "offset": 1}', "ValueError"),
        (b'{"source_topic": "t", "partition": 0, "offset": 1, "value_encoding": "rot13"}', "rot13"),
        (None, "not a dead letter"),
    ],
)
def test_an_unreadable_dead_letter_is_listed_with_its_problem(raw: bytes | None, problem: str) -> None:
    d = dl.DeadLetter.from_record(5, raw)
    assert d.problem is not None and problem in d.problem
    assert d.preview() == "-"
    [_, row] = dl.format_table([d]).splitlines()
    assert row.split()[0] == "5" and problem in row


def test_preview_is_one_short_line() -> None:
    d = letter(1, ("路边暴露垃圾\n" * 40).encode())
    assert "\n" not in d.preview() and len(d.preview(30)) == 30 and d.preview(30).endswith("…")
    assert letter(2, b"short").preview() == "short"


def test_since_is_iso_8601_utc_unless_told() -> None:
    assert dl.parse_since("2026-06-01T09:00:00") == T0
    assert dl.parse_since("2026-06-01T17:00:00+08:00") == T0
    assert dl.parse_since("2026-06-01T09:00:00Z") == T0
    assert dl.parse_since("2026-06-01") == T0.replace(hour=0)
    with pytest.raises(ValueError, match="ISO 8601"):
        dl.parse_since("yesterday")


def test_recent_filters_by_time_and_keeps_the_latest_n_oldest_first() -> None:
    letters = [letter(o, minute=o) for o in (3, 0, 2, 1)]
    assert [d.offset for d in dl.recent(letters)] == [0, 1, 2, 3]
    assert [d.offset for d in dl.recent(letters, limit=2)] == [2, 3]
    assert [d.offset for d in dl.recent(letters, since=T0.replace(minute=1))] == [1, 2, 3]
    assert [d.offset for d in dl.recent(letters, since=T0.replace(minute=1), limit=1)] == [3]
    unreadable = dl.DeadLetter.from_record(9, b"junk")  # no time: not "since" anything
    assert dl.recent([unreadable], since=T0) == [] and dl.recent([unreadable]) == [unreadable]


def test_replay_chooses_by_offset_or_all() -> None:
    letters = [letter(o) for o in (0, 1, 2)]
    assert [d.offset for d in dl.chosen_for_replay(letters, offsets=[2, 0, 2])] == [0, 2]
    assert [d.offset for d in dl.chosen_for_replay(letters, every=True)] == [0, 1, 2]
    with pytest.raises(dl.SelectionError, match="offset 5, 7"):
        dl.chosen_for_replay(letters, offsets=[1, 5, 7])
    with pytest.raises(dl.SelectionError, match="--offset N"):
        dl.chosen_for_replay(letters)
    with pytest.raises(dl.SelectionError, match="not both"):
        dl.chosen_for_replay(letters, offsets=[1], every=True)


def test_a_replay_sends_the_original_key_and_value_to_the_same_partition_saying_where_it_came_from() -> None:
    raw = b"\x00\xffbinary"
    plan, skipped = dl.plan_replay(
        [letter(4), letter(5, raw)], existing_topics={TOPIC, DLQ}, dead_letter_topic=DLQ, now=T0
    )
    assert skipped == []
    first, second = plan
    assert (first.topic, first.partition, first.key) == (TOPIC, 3, b"GL20260601-0001")
    assert first.value == b"{this is not json"
    assert dict(first.headers) == {"replayed_from": b"4", "replayed_at": T0.isoformat().encode()}
    assert second.value == raw and dict(second.headers)["replayed_from"] == b"5"
    assert dl.describe_replay(first).startswith(f"would replay #4 → {TOPIC}[3]  key GL20260601-0001  17 bytes")
    assert dl.describe_replay(first, 99).startswith(f"replayed #4 → {TOPIC}[3]@99")


def test_what_cannot_be_replayed_is_skipped_with_the_reason() -> None:
    bad_b64 = dl.DeadLetter(
        offset=6,
        reason="r",
        service="s",
        source_topic=TOPIC,
        source_partition=0,
        source_offset=1,
        failed_at=T0,
        key=None,
        value="%%%",
        value_encoding="base64",
    )
    letters = [
        dl.DeadLetter.from_record(1, b"junk"),
        letter(2, source_topic=DLQ),
        letter(3, source_topic="gridloop.gone"),
        letter(4, None),
        bad_b64,
        letter(5),
    ]
    plan, skipped = dl.plan_replay(letters, existing_topics={TOPIC, DLQ}, dead_letter_topic=DLQ)
    assert [r.letter.offset for r in plan] == [5]
    reasons = {d.offset: why for d, why in skipped}
    assert "not a dead letter" in reasons[1]
    assert "dead-letter topic itself" in reasons[2]
    assert "gridloop.gone does not exist" in reasons[3]
    assert "no value" in reasons[4]
    assert "not valid base64" in reasons[6]
    assert bad_b64.preview() == "(unreadable base64)" and bad_b64.as_dict()["value_bytes"] is None


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, Any, Any]] = []
        self.flushed = False

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: Any = None,
        partition: Any = None,
    ) -> Any:
        self.sent.append((topic, value, key, headers, partition))
        offset = 100 + len(self.sent)

        class Future:
            def get(self, timeout: float | None = None) -> Any:
                return type("Meta", (), {"offset": offset})()

        return Future()

    def flush(self, timeout: float | None = None) -> None:
        self.flushed = True


def test_send_replays_waits_for_the_broker_and_returns_the_new_offsets() -> None:
    plan, _ = dl.plan_replay([letter(1), letter(2)], existing_topics={TOPIC}, dead_letter_topic=DLQ)
    producer = FakeProducer()
    sent = dl.send_replays(producer, plan)
    assert producer.flushed and [o for _, o in sent] == [101, 102]
    assert [(t, v, k, p) for t, v, k, _, p in producer.sent] == [
        (TOPIC, b"{this is not json", b"GL20260601-0001", 3),
        (TOPIC, b"{this is not json", b"GL20260601-0001", 3),
    ]


def test_the_table_shows_source_reason_and_a_value_preview() -> None:
    table = dl.format_table([letter(12, minute=5)])
    head, first, second = table.splitlines()
    assert head.split()[:2] == ["#", "failed"]
    assert first.split()[:5] == ["12", "2026-06-01", "09:05:00", "dispatch", f"{TOPIC}[3]@52"]
    assert first.endswith("malformed JSON: unexpected character")
    assert second.strip() == "value (utf-8): {this is not json"
    assert dl.format_table([]) == "no dead letters"


def test_json_lists_every_field() -> None:
    [row] = json.loads(dl.to_json([letter(3)]))
    assert row == {
        "offset": 3,
        "reason": "malformed JSON: unexpected character",
        "service": "dispatch",
        "source_topic": TOPIC,
        "source_partition": 3,
        "source_offset": 43,
        "failed_at": T0.isoformat(),
        "key": "GL20260601-0001",
        "value_preview": "{this is not json",
        "value_bytes": 17,
        "value_encoding": "utf-8",
        "value_sha256": hashlib.sha256(b"{this is not json").hexdigest(),
        "truncated": False,
        "problem": None,
    }


# -- the CLI, with the broker replaced ------------------------------------------------------------------


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    state: dict[str, Any] = {"letters": [letter(o, minute=o) for o in range(4)], "sent": [], "since": []}

    def read(bootstrap: str, topic: str | None = None, *, since: datetime | None = None) -> list[dl.DeadLetter]:
        state["since"].append(since)
        return list(state["letters"])

    def replay(bootstrap: str, plan: list[dl.Replay]) -> list[tuple[dl.Replay, int]]:
        state["sent"].extend(plan)
        return [(r, 500 + i) for i, r in enumerate(plan)]

    monkeypatch.setenv("GRIDLOOP_TOPIC_NAMESPACE", "gridloop")
    monkeypatch.setattr(dl, "read_dead_letters", read)
    monkeypatch.setattr(dl, "replay", replay)
    monkeypatch.setattr(dl, "list_topics", lambda bootstrap: {TOPIC, DLQ})
    yield state


def test_cli_list_limit_since_and_json(broker: dict[str, Any]) -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["deadletters", "list", "--limit", "2"])
    assert out.exit_code == 0, out.output
    assert [line.split()[0] for line in out.output.splitlines()[1::2]] == ["2", "3"]
    out = runner.invoke(cli, ["deadletters", "list", "--json", "--since", "2026-06-01T09:01:00Z"])
    assert out.exit_code == 0, out.output
    assert [r["offset"] for r in json.loads(out.output)] == [1, 2, 3]
    assert broker["since"][-1] == T0.replace(minute=1)
    out = runner.invoke(cli, ["deadletters", "list", "--since", "soon"])
    assert out.exit_code == 2 and "ISO 8601" in out.output


def test_cli_replay_dry_run_sends_nothing(broker: dict[str, Any]) -> None:
    out = CliRunner().invoke(cli, ["deadletters", "replay", "--offset", "1", "--offset", "3", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "would replay #1 →" in out.output and "would replay #3 →" in out.output
    assert "dry run: 2 of 2 dead letters would be replayed, 0 skipped" in out.output
    assert broker["sent"] == []


def test_cli_replay_sends_and_summarises(broker: dict[str, Any]) -> None:
    broker["letters"].append(letter(4, source_topic=DLQ))
    out = CliRunner().invoke(cli, ["deadletters", "replay", "--all"])
    assert [r.letter.offset for r in broker["sent"]] == [0, 1, 2, 3]
    assert f"replayed #0 → {TOPIC}[3]@500" in out.output
    assert "skipped #4: its source is the dead-letter topic itself" in out.output
    assert "replayed 4 of 5 dead letters, 1 skipped" in out.output
    assert out.exit_code == 1  # something was left behind: say so to scripts


def test_cli_replay_needs_a_choice_and_known_offsets(broker: dict[str, Any]) -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["deadletters", "replay"])
    assert out.exit_code == 2 and "--offset N" in out.output
    out = runner.invoke(cli, ["deadletters", "replay", "--offset", "42"])
    assert out.exit_code == 2 and "no dead letter at offset 42" in out.output
    assert broker["sent"] == []


def test_cli_says_what_is_wrong_with_the_broker_or_topic(monkeypatch: pytest.MonkeyPatch) -> None:
    def read(bootstrap: str, topic: str | None = None, *, since: datetime | None = None) -> list[dl.DeadLetter]:
        raise RuntimeError("no topic gridloop.deadletter on 127.0.0.1:9092 (run `make topics`)")

    monkeypatch.setattr(dl, "read_dead_letters", read)
    for args in (["list"], ["replay", "--all"]):
        out = CliRunner().invoke(cli, ["deadletters", *args])
        assert out.exit_code == 1 and "error: no topic gridloop.deadletter" in out.output


# -- records too large to carry whole --------------------------------------------------------------------

PRODUCER_MAX = 1024 * 1024
"""aiokafka's default max_request_size: a dead letter bigger than this is refused before it leaves."""


def _record_size(key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    return len(key) + len(value) + sum(len(k) + len(v) for k, v in headers)


HUGE: dict[str, tuple[bytes, bytes]] = {
    "800 KB of binary": (b"GL-HUGE", bytes(range(256)) * 3200),
    "180 KB of 0x01 (JSON escaping makes it 1 MB)": (b"GL-HUGE", b"\x01" * 180 * 1024),
    "900 KB of text": (b"GL-HUGE", ("路边暴露垃圾" * 50_000).encode()),
    "a 600 KB key": (b"k" * 600 * 1024, b"{not json"),
}


@pytest.mark.parametrize("kind", list(HUGE))
def test_a_dead_letter_always_fits_and_keeps_an_excerpt_the_size_and_hash_of_a_huge_record(kind: str) -> None:
    key, value = HUGE[kind]
    dl_key, raw, headers = dead_letter_record(
        service="handling",
        reason="malformed JSON: " + "x" * 100_000,  # a reason may be long too
        source_topic=TOPIC,
        partition=1,
        offset=99,
        key=key,
        value=value,
        failed_at=T0,
    )
    assert _record_size(dl_key, raw, headers) < 128 * 1024 < PRODUCER_MAX
    body = orjson.loads(raw)
    assert (body["value_bytes"], body["value_sha256"]) == (len(value), hashlib.sha256(value).hexdigest())
    d = dl.DeadLetter.from_record(8, raw)
    assert d.problem is None and d.truncated and d.source == f"{TOPIC}[1]@99"
    assert (d.value_bytes, d.value_sha256) == (len(value), hashlib.sha256(value).hexdigest())
    assert d.reason.startswith("malformed JSON: xxx") and len(d.reason) <= REASON_KEPT
    excerpt = d.excerpt() or b""
    assert value.startswith(excerpt) and 0 < len(excerpt) <= EXCERPT_BYTES
    assert d.as_dict()["value_bytes"] == len(value)
    with pytest.raises(ValueError, match="excerpt"):
        d.original_value()  # never taken for the whole record


def test_a_record_up_to_the_bound_is_kept_whole_with_its_size_and_hash() -> None:
    value = b"x" * EXCERPT_BYTES
    d = letter(1, value)
    assert not d.truncated and d.original_value() == value
    assert (d.value_bytes, d.value_sha256) == (len(value), hashlib.sha256(value).hexdigest())
    assert letter(2, value + b"y").truncated


def test_a_dead_letter_written_before_sizes_were_kept_is_still_read_and_replayed() -> None:
    old = orjson.dumps(
        {
            "reason": "malformed JSON: unexpected character",
            "service": "dispatch",
            "source_topic": TOPIC,
            "partition": 0,
            "offset": 12,
            "key": "GL-OLD",
            "value": "{old",
            "value_encoding": "utf-8",
            "failed_at": T0.isoformat(),
        }
    )
    d = dl.DeadLetter.from_record(3, old)
    assert d.problem is None and not d.truncated and d.original_value() == b"{old"
    assert d.as_dict()["value_bytes"] == 4 and d.value_sha256 is None
    [replay], skipped = dl.plan_replay([d], existing_topics={TOPIC}, dead_letter_topic=DLQ)
    assert skipped == [] and replay.value == b"{old" and replay.key == b"GL-OLD"


def test_a_dead_letter_holding_an_excerpt_is_replayed_from_the_original_on_its_source_topic() -> None:
    key, value = HUGE["800 KB of binary"]
    big = letter(4, value, key=key)
    small = letter(5)
    asked: list[tuple[str, int, int]] = []

    def fetch(topic: str, partition: int, offset: int) -> tuple[bytes | None, bytes | None] | None:
        asked.append((topic, partition, offset))
        return key, value

    plan, skipped = dl.plan_replay([big, small], existing_topics={TOPIC}, dead_letter_topic=DLQ, fetch=fetch)
    assert skipped == [] and asked == [(TOPIC, 3, 44)]  # only the excerpt is looked up
    assert [(r.key, r.value, r.partition) for r in plan] == [
        (key, value, 3),
        (small.original_key(), b"{this is not json", 3),
    ]
    assert dl.describe_replay(plan[0]).endswith(f"{len(value)} bytes  (was: {big.reason})")


def test_an_excerpt_whose_original_is_gone_or_differs_is_skipped_with_the_reason() -> None:
    key, value = HUGE["800 KB of binary"]
    letters = [letter(o, value, key=key) for o in (1, 2, 3)]
    found: dict[int, tuple[bytes | None, bytes | None] | None] = {
        41: None,  # past the topic's retention, or compacted away
        42: (key, value[:-1] + b"!"),  # another record: the hash says so
        43: (key, value),
    }
    plan, skipped = dl.plan_replay(
        letters,
        existing_topics={TOPIC},
        dead_letter_topic=DLQ,
        fetch=lambda topic, partition, offset: found[offset],
    )
    assert [r.letter.offset for r in plan] == [3]
    reasons = {d.offset: why for d, why in skipped}
    assert "no longer on" in reasons[1] and f"{TOPIC}[3]@41" in reasons[1]
    assert "sha256" in reasons[2]
    without, skipped = dl.plan_replay(letters[2:], existing_topics={TOPIC}, dead_letter_topic=DLQ)
    assert without == [] and "excerpt" in skipped[0][1]


def test_a_minimal_dead_letter_names_the_record_and_why_without_any_of_it() -> None:
    key, value = HUGE["800 KB of binary"]
    _, raw, _ = dead_letter_record(
        service="handling",
        reason="r" * 5000,
        source_topic=TOPIC,
        partition=1,
        offset=7,
        key=key,
        value=value,
        minimal=True,
    )
    assert len(raw) < 1024
    d = dl.DeadLetter.from_record(1, raw)
    assert d.truncated and d.key is None and d.excerpt() == b"" and d.value_bytes == len(value)
    assert d.value_sha256 == hashlib.sha256(value).hexdigest() and d.reason.startswith("rrr")
    assert d.preview().startswith(f"<{len(value)} bytes")
