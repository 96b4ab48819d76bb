"""The tuning knobs: one nested settings group (``GRIDLOOP_TUNING__<NAME>``), each with its reason, a service's own
defaults kept whatever else is set, and the names of the release before still read, with a warning."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from services.common.settings import RENAMED, ServiceSettings, Tuning
from services.dispatch.settings import DispatchSettings
from services.intake.settings import IntakeSettings
from services.opscenter.settings import OpsCenterSettings

SERVICES = ("intake", "dispatch", "handling", "verification", "opscenter")
OTHER_THAN_THE_DEFAULT = {
    "batch_max": 7,
    "batch_linger_s": 0.5,
    "fetch_min_bytes": 4096,
    "fetch_max_wait_ms": 100,
    "kafka_linger_ms": 5,
    "switch_interval_s": 0.005,
    "event_loop": "aio",
}


@pytest.fixture(autouse=True)
def _no_tuning_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if "TUNING" in key.upper() or key.upper() in RENAMED:
            monkeypatch.delenv(key)


def test_the_defaults_are_the_measured_ones(tmp_path: Path) -> None:
    assert Tuning() == Tuning(
        batch_max=500,
        batch_linger_s=0.02,
        fetch_min_bytes=1,
        fetch_max_wait_ms=1500,
        kafka_linger_ms=0,
        switch_interval_s=0.001,
        event_loop="uvloop",
    )
    assert DispatchSettings(var_dir=tmp_path).tuning == Tuning()
    intake, ops = IntakeSettings(var_dir=tmp_path).tuning, OpsCenterSettings(var_dir=tmp_path).tuning
    assert (intake.batch_linger_s, intake.batch_max, intake.fetch_min_bytes) == (0.25, 64, 1)
    assert (ops.batch_linger_s, ops.batch_max, ops.fetch_min_bytes, ops.fetch_max_wait_ms) == (
        0.25,
        500,
        256 * 1024,
        250,
    )


@pytest.mark.parametrize("service", SERVICES)
def test_every_knob_says_why(service: str) -> None:
    module = importlib.import_module(f"services.{service}.settings")
    (kind,) = (
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, ServiceSettings) and v is not ServiceSettings
    )
    tuning = kind.model_fields["tuning"].annotation
    assert isinstance(tuning, type) and issubclass(tuning, Tuning)
    assert not [name for name, field in tuning.model_fields.items() if not field.description]
    assert set(tuning.model_fields) == set(Tuning.model_fields)  # a service overrides defaults, adds no knob


def test_a_knob_is_set_by_its_nested_name_and_a_service_keeps_its_other_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRIDLOOP_TUNING__BATCH_MAX", "32")
    monkeypatch.setenv("GRIDLOOP_OPSCENTER_TUNING__FETCH_MAX_WAIT_MS", "100")
    intake = IntakeSettings(var_dir=tmp_path).tuning
    assert (intake.batch_max, intake.batch_linger_s) == (32, 0.25)
    ops = OpsCenterSettings(var_dir=tmp_path).tuning
    assert (ops.batch_max, ops.fetch_max_wait_ms, ops.fetch_min_bytes) == (32, 100, 256 * 1024)
    assert DispatchSettings(var_dir=tmp_path).tuning.fetch_max_wait_ms == 1500  # opscenter's own, not dispatch's


def test_a_knob_given_in_code_takes_the_service_s_defaults_for_the_rest(tmp_path: Path) -> None:
    intake = IntakeSettings(var_dir=tmp_path, tuning=Tuning(batch_linger_s=0)).tuning
    assert (intake.batch_linger_s, intake.batch_max) == (0, 64)


def test_a_misspelt_or_invalid_knob_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("GRIDLOOP_TUNING__BATCH_MAXIMUM", "32")
    with pytest.raises(ValidationError, match="batch_maximum"):
        DispatchSettings(var_dir=tmp_path)
    monkeypatch.delenv("GRIDLOOP_TUNING__BATCH_MAXIMUM")
    monkeypatch.setenv("GRIDLOOP_TUNING__EVENT_LOOP", "trio")
    with pytest.raises(ValidationError, match="event_loop"):
        DispatchSettings(var_dir=tmp_path)


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED.items()))
def test_the_old_name_of_a_knob_is_still_read_for_a_release_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old: str, new: str
) -> None:
    name = new.removeprefix("GRIDLOOP_TUNING__").lower()
    value = OTHER_THAN_THE_DEFAULT[name]
    monkeypatch.setenv(old, str(value))
    with pytest.warns(FutureWarning, match=new):
        tuning = DispatchSettings(var_dir=tmp_path).tuning
    assert getattr(tuning, name) == value


def test_under_both_names_the_new_one_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRIDLOOP_BATCH_MAX", "7")
    monkeypatch.setenv("GRIDLOOP_TUNING__BATCH_MAX", "9")
    with pytest.warns(FutureWarning):
        assert DispatchSettings(var_dir=tmp_path).tuning.batch_max == 9


def test_the_old_service_specific_name_and_the_old_argument_are_read_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRIDLOOP_INTAKE_BATCH_LINGER_S", "0.5")
    with pytest.warns(FutureWarning, match="GRIDLOOP_INTAKE_TUNING__BATCH_LINGER_S"):
        tuning = IntakeSettings(var_dir=tmp_path).tuning
    assert (tuning.batch_linger_s, tuning.batch_max) == (0.5, 64)
    with pytest.warns(FutureWarning, match="tuning.batch_max"):
        assert DispatchSettings(var_dir=tmp_path, batch_max=3).tuning.batch_max == 3  # type: ignore[call-arg]


def test_no_warning_without_an_old_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    monkeypatch.setenv("GRIDLOOP_TUNING__BATCH_MAX", "9")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DispatchSettings(var_dir=tmp_path).tuning.batch_max == 9
