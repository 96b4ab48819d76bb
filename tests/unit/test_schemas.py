from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

import schemas
from schemas import events as ev
from schemas.export import drift, rendered
from schemas.topics import CATALOG, DEADLETTER, LIFECYCLE, topics_for


def _report(**overrides: object) -> ev.IncidentReported:
    fields: dict[str, object] = dict(
        incident_id="GL1",
        actor=schemas.Actor(kind="grid_worker", id="w-gh01-1"),
        correlation_id="GL1",
        source="grid_worker",
        category_code="exposed_garbage",
        location=schemas.Location(lat=31.285, lon=121.575, address="华高路 1 号"),
        description="垃圾堆在路边",
        reporter_id="w-gh01-1",
        client_report_id="r-1",
    )
    fields.update(overrides)
    return ev.IncidentReported(**fields)  # type: ignore[arg-type]


def test_checked_in_json_schema_matches_the_models() -> None:
    assert drift() == [], "run `make schemas` and commit schemas/jsonschema"


def test_drift_is_detected_when_a_model_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    original = rendered()
    changed = dict(original)
    changed["IncidentReported.json"] = original["IncidentReported.json"].replace('"description"', '"descr"', 1)
    monkeypatch.setattr("schemas.export.rendered", lambda: changed)
    assert "IncidentReported.json" in drift()


def test_every_event_has_one_topic_and_the_lifecycle_log() -> None:
    for name in ev.EVENT_TYPES:
        own, log = topics_for(name)
        assert log is LIFECYCLE and own is not LIFECYCLE and own is not DEADLETTER
    assert len({t.suffix for t in CATALOG}) == len(CATALOG)


def test_envelope_round_trips_through_bytes() -> None:
    event = _report()
    decoded = schemas.decode_event(schemas.encode_event(event))
    assert decoded == event
    assert decoded.schema_version == schemas.SCHEMA_VERSION
    assert "垃圾" in schemas.encode_event(event).decode()


def test_an_actor_on_behalf_of_someone_round_trips_and_one_acting_for_itself_is_written_as_before() -> None:
    admin = schemas.Actor(kind="system", id="admin")
    for_worker = admin.on_behalf("w-gh01-2")
    assert (for_worker.kind, for_worker.id, for_worker.on_behalf_of) == ("system", "admin", "w-gh01-2")
    assert admin.on_behalf("admin") is admin and admin.on_behalf(None) is admin
    event = _report(actor=for_worker)
    assert schemas.decode_event(schemas.encode_event(event)).actor == for_worker
    # nobody acted for anyone: the record is what an earlier build wrote (and reads), without the field
    assert b"on_behalf_of" not in schemas.encode_event(_report())
    with pytest.raises(ValidationError):
        schemas.Actor(kind="system", id="admin", on_behalf_of="")


def test_events_are_frozen_and_strict() -> None:
    event = _report()
    with pytest.raises(ValidationError):
        event.description = "changed"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="extra"):
        _report(unexpected="x")
    with pytest.raises(ValidationError, match="timezone"):
        _report(occurred_at=datetime(2026, 1, 1, 12, 0))


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("0001-01-01T00:00:00Z", "from 2000-01-01T00:00:00Z to 2100-01-01T00:00:00Z"),
        ("9999-12-31T23:59:59Z", "from 2000-01-01T00:00:00Z to 2100-01-01T00:00:00Z"),
        ("1999-12-31T23:59:59Z", "not 1999-12-31T23:59:59+00:00"),
        ("2000-01-01T07:59:59+08:00", "not 2000-01-01T07:59:59+08:00"),  # 1999 in UTC
        ("2100-01-01T00:00:01Z", "from 2000-01-01T00:00:00Z to 2100-01-01T00:00:00Z"),
        ("2101-06-01T00:00:00+08:00", "from 2000-01-01T00:00:00Z to 2100-01-01T00:00:00Z"),
        ("0001-01-01T00:00:00+14:00", "not 0001-01-01T00:00:00+14:00"),  # before year 1 in UTC
        ("9999-12-31T23:59:59-14:00", "not 9999-12-31T23:59:59-14:00"),  # after year 9999 in UTC
        ("2026-06-01T09:00:00", "timestamps must carry a timezone"),
    ],
)
def test_timestamps_carry_a_timezone_and_fall_from_2000_to_2100(given: str, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        TypeAdapter(schemas.AwareDatetime).validate_python(given)
    [error] = info.value.errors()
    assert reason in error["msg"], error["msg"]
    with pytest.raises(ValidationError, match="occurred_at"):
        _report(occurred_at=given)


@pytest.mark.parametrize(
    ("given", "utc"),
    [
        ("2000-01-01T00:00:00Z", datetime(2000, 1, 1, tzinfo=UTC)),
        ("2000-01-01T08:00:00+08:00", datetime(2000, 1, 1, tzinfo=UTC)),
        ("2100-01-01T00:00:00Z", datetime(2100, 1, 1, tzinfo=UTC)),
        ("2099-12-31T23:00:00-01:00", datetime(2100, 1, 1, tzinfo=UTC)),
        ("2026-06-01T09:00:00+08:00", datetime(2026, 6, 1, 1, tzinfo=UTC)),
    ],
)
def test_timestamps_at_the_ends_of_the_range_are_taken_as_utc(given: str, utc: datetime) -> None:
    found = TypeAdapter(schemas.AwareDatetime).validate_python(given)
    assert found == utc and found.utcoffset() is not None and not found.utcoffset()


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "9999-12-31T23:59:59Z"])
def test_a_record_with_a_time_out_of_range_is_refused_with_a_reason(when: str) -> None:
    data = json.loads(schemas.encode_event(_report()))
    data["occurred_at"] = when
    with pytest.raises(schemas.DecodeError) as info:
        schemas.decode_event(json.dumps(data).encode())
    assert info.value.reason.startswith("invalid IncidentReported: occurred_at: Value error, timestamps must be from")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty record"),
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"schema_version": 2, "type": "IncidentReported"}', "unknown schema_version 2"),
        (b'{"type": "IncidentReported"}', "unknown schema_version None"),
        (b'{"schema_version": 1, "type": "Nope"}', "unknown event type 'Nope'"),
        (b'{"schema_version": 1, "type": ["IncidentReported"]}', "unknown event type ['IncidentReported']"),
        (b'{"schema_version": 1, "type": "WorkOrderAccepted", "incident_id": "x"}', "work_order_id: Field required"),
    ],
)
def test_bad_records_give_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(schemas.DecodeError) as info:
        schemas.decode_event(raw)
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        ("schema_version", "unknown schema_version None (this build reads 1)"),
        ("event_id", "invalid IncidentReported: event_id: Field required"),
        ("occurred_at", "invalid IncidentReported: occurred_at: Field required"),
    ],
)
def test_a_record_must_carry_the_envelope_fields_an_event_in_code_may_default(field: str, reason: str) -> None:
    """Without its event id a record would get a new one at every delivery, and be applied again each time."""
    data = json.loads(schemas.encode_event(_report()))
    del data[field]
    with pytest.raises(schemas.DecodeError) as info:
        schemas.decode_event(json.dumps(data).encode())
    assert info.value.reason == reason


def test_a_whole_valid_event_of_another_schema_version_is_refused_for_its_version() -> None:
    data = json.loads(schemas.encode_event(_report()))
    data["schema_version"] = 2  # every other field as this build would write it
    with pytest.raises(schemas.DecodeError) as info:
        schemas.decode_event(json.dumps(data).encode())
    assert info.value.reason == "unknown schema_version 2 (this build reads 1)"


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_a_timestamp_that_overflows_is_refused_with_a_reason(when: str) -> None:
    """Turned to UTC it leaves the calendar: an OverflowError, not a ValidationError, which went past the consumer's
    handling of refused records and crashed it."""
    data = json.loads(schemas.encode_event(_report()))
    data["occurred_at"] = when
    with pytest.raises(schemas.DecodeError) as info:
        schemas.decode_event(json.dumps(data).encode())
    assert info.value.reason.startswith("invalid IncidentReported: ")


class _FailingAdapter:
    """An event adapter whose validation raises ``error`` (what some validator might raise on some input)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def validate_json(self, raw: Any) -> Any:
        raise self.error

    def validate_python(self, data: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        OverflowError("date value out of range"),
        TypeError("can't compare offset-naive and offset-aware datetimes"),
        RecursionError("maximum recursion depth exceeded"),
        OSError(75, "Value too large for defined data type"),
        ZeroDivisionError("division by zero"),
        KeyError("lat"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_whatever_decoding_raises_is_a_decode_error_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    from schemas import codec

    monkeypatch.setattr(codec, "EVENT_ADAPTER", _FailingAdapter(error))
    with pytest.raises(schemas.DecodeError) as info:
        schemas.decode_event(schemas.encode_event(_report()))
    assert info.value.reason == f"invalid IncidentReported: {type(error).__name__}: {error}"


def _samples() -> list[dict[str, Any]]:
    """Events of several shapes (nested location and actor, lists, timestamps), as dicts of their JSON."""
    from services.bench.raw import sample_events

    report = _report(photo_urls=["https://img.example/1.jpg"])
    staff = schemas.Actor(kind="department", id="staff-7", department="city_ops")
    more = [
        report,
        ev.WorkOrderAccepted.following(report, staff, work_order_id="GL1-1", department_code="city_ops"),
        ev.WorkOrderHandled.following(
            report,
            staff,
            work_order_id="GL1-1",
            department_code="city_ops",
            result="已清运",
            evidence_urls=["https://img.example/after.jpg"],
        ),
    ]
    return [json.loads(raw) for raw in sample_events()] + [json.loads(schemas.encode_event(e)) for e in more]


_JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=80)
    | st.sampled_from(
        [
            "2026-06-01T09:00:00",
            "2026-06-01T09:00:00+08:00",
            "2026-06-01",
            "1999-12-31T23:59:59Z",
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59-14:00",
            "1",
            " x ",
            "",
            "grid_worker",
            "Nope",
        ]
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """A valid event's JSON with a few fields replaced by any JSON, deleted or added, at the top or one level in."""
    data = draw(st.sampled_from(_samples()))
    for _ in range(draw(st.integers(0, 3))):
        target = data
        nested = [k for k, v in data.items() if isinstance(v, dict)]
        one_level_in = draw(st.booleans())
        if nested and one_level_in:
            target = data[draw(st.sampled_from(nested))]
        key = draw(st.sampled_from([*target, "unexpected"]))
        if draw(st.integers(0, 4)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(_JSON_VALUES)
    return json.dumps(data, ensure_ascii=draw(st.booleans())).encode()


def _outcome(decode: Callable[[bytes], schemas.Event], raw: bytes) -> object:
    try:
        return decode(raw)
    except schemas.DecodeError as exc:
        return exc.reason


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_the_quick_decode_accepts_and_refuses_as_the_step_by_step_one(raw: bytes) -> None:
    """Valid events are validated straight from their JSON; the step-by-step path that explains a refusal must
    agree on every record, valid or not, or the two would accept different things."""
    from schemas.codec import _decode_or_say_why

    assert _outcome(schemas.decode_event, raw) == _outcome(_decode_or_say_why, raw)


@pytest.mark.parametrize("version", ['"1"', "1.0", "true"])
def test_a_schema_version_that_is_not_the_integer_is_refused_by_both_decoders(version: str) -> None:
    """The quick decode once took ``"schema_version": "1"`` (coerced to 1) where the step-by-step one refused it."""
    from schemas.codec import _decode_or_say_why

    raw = schemas.encode_event(_report()).replace(b'"schema_version":1', b'"schema_version":' + version.encode())
    assert raw != schemas.encode_event(_report())
    for decode in (schemas.decode_event, _decode_or_say_why):
        with pytest.raises(schemas.DecodeError, match="schema_version"):
            decode(raw)


def test_following_keeps_incident_and_correlation() -> None:
    report = _report()
    filed = ev.IncidentFiled.following(
        report,
        schemas.Actor.system("dispatch"),
        category_code="exposed_garbage",
        grid_id="gh01",
        priority=3,
        severity="normal",
    )
    assert (filed.incident_id, filed.correlation_id, filed.causation_id) == ("GL1", "GL1", report.event_id)
    assert filed.event_id != report.event_id


def test_topic_names_follow_the_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRIDLOOP_TOPIC_NAMESPACE", "t123")
    assert LIFECYCLE.name == "t123.incidents.lifecycle"
    monkeypatch.delenv("GRIDLOOP_TOPIC_NAMESPACE")
    assert LIFECYCLE.name == "gridloop.incidents.lifecycle"


def test_topic_catalog_is_exported() -> None:
    catalog = json.loads(rendered()["topics.json"])
    assert {t["name"].split(".", 1)[1] for t in catalog} == {t.suffix for t in CATALOG}


def test_the_loops_topics_take_the_configured_partitions_the_dead_letters_keeps_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from schemas.topics import CATALOG, DEADLETTER, PARTITIONS
    from services.bench.raw import raw_partitions
    from services.common.admin import partitions_for

    monkeypatch.delenv("GRIDLOOP_TOPIC_PARTITIONS", raising=False)
    assert {t.suffix: partitions_for(t) for t in CATALOG} == {
        t.suffix: 1 if t is DEADLETTER else PARTITIONS for t in CATALOG
    }
    assert PARTITIONS == 2 and raw_partitions() == 2
    monkeypatch.setenv("GRIDLOOP_TOPIC_PARTITIONS", "6")
    assert {t.suffix: partitions_for(t) for t in CATALOG} == {t.suffix: 1 if t is DEADLETTER else 6 for t in CATALOG}
    assert raw_partitions() == 6  # the raw measurement follows the pipeline's topics


@dataclass
class _Row:
    incident_id: str
    category_code: str
    lat: float
    address: str
    description: str
    note: str = ""
    status: str = "new"


def test_a_row_takes_what_its_event_says_under_the_same_names_and_the_values_given() -> None:
    event = _report()
    row = schemas.row_of(_Row, event, description="kept otherwise", note="given")
    assert row == _Row("GL1", "exposed_garbage", 31.285, "华高路 1 号", "kept otherwise", "given", "new")


def test_an_event_takes_what_its_source_says_for_its_fields_and_nothing_else() -> None:
    source = SimpleNamespace(category_code="exposed_garbage", description="x", lat=1.0, unrelated=2)
    assert schemas.fields_from(ev.IncidentReported, source) == {"category_code": "exposed_garbage", "description": "x"}
