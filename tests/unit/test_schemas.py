from __future__ import annotations

import json
from datetime import datetime

import pytest
from pydantic import ValidationError

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


def test_events_are_frozen_and_strict() -> None:
    event = _report()
    with pytest.raises(ValidationError):
        event.description = "changed"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="extra"):
        _report(unexpected="x")
    with pytest.raises(ValidationError, match="timezone"):
        _report(occurred_at=datetime(2026, 1, 1, 12, 0))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty record"),
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"schema_version": 2, "type": "IncidentReported"}', "unknown schema_version 2"),
        (b'{"type": "IncidentReported"}', "unknown schema_version None"),
        (b'{"schema_version": 1, "type": "Nope"}', "unknown event type 'Nope'"),
        (b'{"schema_version": 1, "type": "WorkOrderAccepted", "incident_id": "x"}', "work_order_id: Field required"),
    ],
)
def test_bad_records_give_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(schemas.DecodeError) as info:
        schemas.decode_event(raw)
    assert reason in info.value.reason


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
