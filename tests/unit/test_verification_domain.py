"""verification's rules (核查) as pure functions: a task, a town, a time; no database, no broker."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas import GAOHANG, Actor, ActorKind, Location, Town, VerificationStatus
from schemas import events as ev
from schemas.reference import Grid
from services.verification.domain import Policy, Refusal, Rules, Task, decide, open_task, refuse_decision

T0 = datetime(2024, 5, 6, 9, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=2)

TINY = Town(
    "tiny",
    "小镇",
    "Tiny",
    {},
    {},
    {"zz01": Grid.box("zz01", "一格", "Cell one", 30.0, 120.0, 30.1, 120.1, ("w-zz01-1", "w-zz01-2"))},
)
"""A town of one grid cell, none of whose names Gaohang has."""

ASSIGNED = Rules(GAOHANG)
GRID = Rules(GAOHANG, "grid")


def requested(verification_id: str = "GL20240506-AB12CD34-v1", **fields: Any) -> ev.VerificationRequested:
    values: dict[str, Any] = dict(
        incident_id="GL20240506-AB12CD34",
        actor=Actor.system("dispatch"),
        correlation_id="GL20240506-AB12CD34",
        occurred_at=T0,
        verification_id=verification_id,
        grid_id="gh01",
        worker_id="w-gh01-2",
        category_code="exposed_garbage",
        location=Location(lat=31.275, lon=121.565, address="华高路 1 号"),
        description="garbage by the gate",
        work_order_ids=["GL20240506-AB12CD34-1", "GL20240506-AB12CD34-2"],
        evidence_urls=["https://example.org/after.jpg"],
        round=1,
    )
    values.update(fields)
    return ev.VerificationRequested(**values)


def task(town: Town = GAOHANG, **fields: Any) -> Task:
    opened = open_task(requested(**fields), town)
    assert isinstance(opened, Task)
    return opened


def refusal(t: Task, worker_id: str | None, grids: tuple[str, ...] | None, rules: Rules = ASSIGNED) -> str | None:
    """The kind and reason of a refusal, as one string; None if the worker may decide."""
    refused = refuse_decision(t, worker_id, grids, rules)
    return None if refused is None else f"{refused.kind}: {refused.reason}"


# -- a request opens a task ----------------------------------------------------------------------------


def test_a_request_opens_a_pending_task_with_what_the_worker_needs() -> None:
    request = requested(reporter_id="caller-7", handled_by=["staff-city_ops", "w-gh01-1"])
    assert open_task(request, GAOHANG) == Task(
        verification_id="GL20240506-AB12CD34-v1",
        incident_id="GL20240506-AB12CD34",
        correlation_id="GL20240506-AB12CD34",
        request_event_id=request.event_id,
        grid_id="gh01",
        worker_id="w-gh01-2",
        reporter_id="caller-7",
        handled_by="staff-city_ops w-gh01-1",
        category_code="exposed_garbage",
        lat=31.275,
        lon=121.565,
        address="华高路 1 号",
        description="garbage by the gate",
        work_order_ids="GL20240506-AB12CD34-1 GL20240506-AB12CD34-2",
        evidence_urls="https://example.org/after.jpg",
        round=1,
        status=VerificationStatus.PENDING,
        requested_at=T0,
        decided_at=None,
        decided_by=None,
        decided_on_behalf_of=None,
        note="",
    )


def test_a_request_without_who_did_the_work_names_nobody() -> None:
    """A request of an earlier version names neither the reporter nor who did the work."""
    t = task()
    assert (t.reporter_id, t.handled_by) == (None, None)


def test_a_request_for_a_grid_the_town_does_not_have_can_never_be_opened() -> None:
    assert open_task(requested(grid_id="nowhere"), GAOHANG) == Refusal(
        "unknown", "verification GL20240506-AB12CD34-v1 names unknown grid 'nowhere'"
    )


def test_the_grids_are_the_towns_it_is_given() -> None:
    assert isinstance(open_task(requested(grid_id="zz01", worker_id="w-zz01-1"), TINY), Task)
    refused = open_task(requested(), TINY)  # gh01 is Gaohang's, not this town's
    assert isinstance(refused, Refusal) and refused.kind == "unknown"


# -- who decides -------------------------------------------------------------------------------------


@pytest.mark.parametrize("grids", [("gh01",), None])
def test_the_worker_asked_decides(grids: tuple[str, ...] | None) -> None:
    """As themselves (their token names their grid) or through an administrator deciding for them."""
    assert refusal(task(), "w-gh01-2", grids) is None


@pytest.mark.parametrize("grids", [("gh01",), None])
def test_only_the_assigned_worker_decides_by_default(grids: tuple[str, ...] | None) -> None:
    assert refusal(task(), "w-gh01-1", grids) == (
        "forbidden: verification GL20240506-AB12CD34-v1 is assigned to w-gh01-2; only they decide it"
    )


def test_under_the_grid_policy_any_worker_of_the_grid_decides_but_the_reporter_and_whoever_did_the_work() -> None:
    by_a_caller = task(reporter_id="caller-7", handled_by=["staff-city_ops"])  # asked of w-gh01-2
    by_w1 = task(reporter_id="w-gh01-1", handled_by=["staff-city_ops"])
    fixed_by_w1 = task(reporter_id="caller-8", handled_by=["w-gh01-1"])

    assert refusal(by_a_caller, "w-gh01-1", None, GRID) is None  # not the one asked, but of the grid
    assert refusal(by_w1, "w-gh01-1", None, GRID) == (
        "forbidden: w-gh01-1 reported incident GL20240506-AB12CD34; another worker of grid gh01 verifies it"
    )
    assert refusal(fixed_by_w1, "w-gh01-1", None, GRID) == (
        "forbidden: w-gh01-1 did the work verification GL20240506-AB12CD34-v1 checks (fixed it on the spot or "
        "handled it); another worker verifies it"
    )
    assert refusal(by_w1, "w-gh02-1", None, GRID) == (  # still only the grid's workers
        "forbidden: w-gh02-1 is not a worker of grid gh01; only its workers verify its incidents"
    )
    assert refusal(by_w1, "w-gh01-2", None, GRID) is None
    assert refusal(fixed_by_w1, "w-gh01-2", ("gh01",), GRID) is None


def test_under_the_assigned_policy_the_reporter_asked_decides() -> None:
    """Reporting is no work done: a worker who reported the incident verifies it when it is asked of them."""
    assert refusal(task(reporter_id="w-gh01-2"), "w-gh01-2", ("gh01",)) is None


@pytest.mark.parametrize("rules", [ASSIGNED, GRID])
@pytest.mark.parametrize("grids", [("gh01",), None])
def test_a_reporter_never_verifies_their_own_fix_on_the_spot(rules: Rules, grids: tuple[str, ...] | None) -> None:
    """Even when the task is asked of them (as it could be of a grid's only worker)."""
    fixed = task(worker_id="w-gh01-1", reporter_id="w-gh01-1", handled_by=["w-gh01-1"])
    assert (refusal(fixed, "w-gh01-1", grids, rules) or "").startswith("forbidden: w-gh01-1 did the work")


@pytest.mark.parametrize("worker_id", ["w-gh02-1", "someone-else", None])
def test_one_who_is_no_worker_of_the_grid_is_forbidden(worker_id: str | None) -> None:
    assert refusal(task(), worker_id, None) == (
        f"forbidden: {worker_id} is not a worker of grid gh01; only its workers verify its incidents"
    )


def test_a_worker_of_the_grid_is_so_by_their_token_or_else_by_the_town() -> None:
    """A grid worker's token names their cells; one deciding for a worker is checked against the town's list."""
    t = task(TINY, grid_id="zz01", worker_id="w-zz01-9")  # asked of one the town does not list (yet)
    assert refusal(t, "w-zz01-9", ("zz01",), Rules(TINY)) is None
    assert (refusal(t, "w-zz01-9", None, Rules(TINY)) or "").startswith("forbidden: w-zz01-9 is not a worker")
    assert (refusal(task(), "w-gh01-2", None, Rules(TINY)) or "").startswith("forbidden")  # not this town's grid


@pytest.mark.parametrize("status", [VerificationStatus.PASSED, VerificationStatus.FAILED])
def test_a_decided_task_is_decided_once(status: VerificationStatus) -> None:
    decided = replace(task(), status=status, decided_by="w-gh01-2")
    assert refusal(decided, "w-gh01-2", ("gh01",)) == (
        f"decided: verification GL20240506-AB12CD34-v1 is already {status} (by w-gh01-2)"
    )


def test_who_may_decide_is_asked_before_whether_it_is_still_pending() -> None:
    """One who may not decide a task learns nothing of its state."""
    decided = replace(task(), status=VerificationStatus.PASSED, decided_by="w-gh01-2")
    assert (refusal(decided, "w-gh01-1", ("gh01",)) or "").startswith("forbidden")


# -- deciding ----------------------------------------------------------------------------------------


def test_passing_decides_the_task_and_tells_dispatch_to_close_the_case() -> None:
    t = task()
    outcome = decide(t, "w-gh01-2", True, "clean now", None, NOW)

    assert isinstance(outcome, ev.VerificationPassed)
    assert (outcome.verification_id, outcome.incident_id, outcome.correlation_id, outcome.causation_id) == (
        t.verification_id,
        t.incident_id,
        t.correlation_id,
        t.request_event_id,
    )
    assert outcome.actor == Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-2")
    assert (outcome.note, outcome.occurred_at) == ("clean now", NOW)
    assert (t.status, t.decided_at, t.decided_by, t.decided_on_behalf_of, t.note) == (
        "passed",
        NOW,
        "w-gh01-2",
        None,
        "clean now",
    )


def test_failing_sends_the_work_back_with_the_note() -> None:
    t = task(round=2, verification_id="GL20240506-AB12CD34-v2")
    outcome = decide(t, "w-gh01-2", False, "still piled up", None, NOW)

    assert isinstance(outcome, ev.VerificationFailed)
    assert (outcome.verification_id, outcome.causation_id, outcome.note) == (
        "GL20240506-AB12CD34-v2",
        t.request_event_id,
        "still piled up",
    )
    assert (t.status, t.decided_by, t.note, t.round) == ("failed", "w-gh01-2", "still piled up", 2)


def test_an_administrator_deciding_for_the_worker_is_recorded_as_itself_on_their_behalf() -> None:
    t = task()
    outcome = decide(t, "w-gh01-2", True, "seen on the camera", Actor(kind=ActorKind.SYSTEM, id="admin"), NOW)
    assert outcome.actor == Actor(kind=ActorKind.SYSTEM, id="admin", on_behalf_of="w-gh01-2")
    assert (t.decided_by, t.decided_on_behalf_of) == ("admin", "w-gh01-2")


def test_a_worker_deciding_is_recorded_as_themselves() -> None:
    t = task()
    worker = Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-2")
    outcome = decide(t, "w-gh01-2", False, "no", worker, NOW)
    assert outcome.actor == worker and outcome.actor.on_behalf_of is None
    assert (t.decided_by, t.decided_on_behalf_of) == ("w-gh01-2", None)


def test_the_policies_are_the_settings_values() -> None:
    from typing import get_args

    from services.verification.settings import VerifierPolicy

    assert get_args(Policy) == get_args(VerifierPolicy) == ("assigned", "grid")
