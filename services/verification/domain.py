"""verification's rules (核查), as pure functions over a task.

- **A request opens one task.** A VerificationRequested opens one 核查 task for a worker of the incident's grid,
  once per verification id however often it is delivered; a request naming a grid the town does not have can
  never be opened.
- **Only a worker of the task's grid decides it.** A grid worker's token names their grid cells; the operations
  center or an administrator decides for a worker it names, who must be one of the grid's workers in the town.
- **Duties are separate.** Whoever did the work — the reporter who fixed it on the spot (现场处置), the staff
  who handled it — never verifies it. Under the ``assigned`` policy only the worker the task is asked of decides
  it; under ``grid`` any worker of the grid but the one who reported the incident.
- **Once.** A task is decided while it is pending, and only once: pass (核查通过) lets dispatch close the case
  (结案), fail (核查不通过) sends the work back to the department (返工) with the worker's note.
- **Who is recorded.** The one who acts (the caller's token) is recorded as deciding, on behalf of the worker
  when it is someone else.

Whether the caller may see a task at all (a task outside a grid worker's cells is answered as an unknown one) is
``services.common.visibility``'s to say, before these rules are asked.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from schemas import Actor, ActorKind, Town, VerificationStatus, row_of
from schemas import events as ev

Policy = Literal["assigned", "grid"]
"""Who decides a task (the service's ``verifier_policy``): the worker it is asked of, or any worker of its grid
but the reporter. Under either, whoever did the work never decides it."""


@dataclass
class Task:
    """A 核查 task: the columns of ``verification_task``."""

    verification_id: str
    incident_id: str
    correlation_id: str
    request_event_id: str
    grid_id: str
    worker_id: str
    reporter_id: str | None
    handled_by: str | None
    """Who did the work being verified, space-separated (None on a task of an earlier version)."""
    category_code: str
    lat: float
    lon: float
    address: str
    description: str
    work_order_ids: str
    evidence_urls: str
    round: int
    status: str
    requested_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    decided_on_behalf_of: str | None
    note: str


@dataclass(frozen=True)
class Rules:
    """What the rules of a service are given once: the town it runs for and its verifier policy."""

    town: Town
    policy: Policy = "assigned"


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: ``unknown`` names what the town does not have (a request that can never be
    applied), ``forbidden`` a decision this worker may not take, ``decided`` a task no longer pending."""

    kind: Literal["unknown", "forbidden", "decided"]
    reason: str


def open_task(requested: ev.VerificationRequested, town: Town) -> Task | Refusal:
    """The pending 核查 task a request opens (the caller has made sure none is open under its id yet)."""
    if requested.grid_id not in town.grids:
        return Refusal("unknown", f"verification {requested.verification_id} names unknown grid {requested.grid_id!r}")
    return row_of(
        Task,
        requested,
        request_event_id=requested.event_id,
        handled_by=" ".join(requested.handled_by) or None,
        work_order_ids=" ".join(requested.work_order_ids),
        evidence_urls=" ".join(str(u) for u in requested.evidence_urls),
        status=VerificationStatus.PENDING,
        requested_at=requested.occurred_at,
        decided_at=None,
        decided_by=None,
        decided_on_behalf_of=None,
        note="",
    )


def refuse_decision(task: Task, worker_id: str | None, grids: Collection[str] | None, rules: Rules) -> Refusal | None:
    """Why ``worker_id`` may not decide ``task``, or None if they may. ``grids``: the cells the caller's token
    names (a grid worker deciding as themselves), None when the center or an administrator decides for the worker
    (then the town says whether they are one of the grid's)."""
    grid = rules.town.grids.get(task.grid_id)
    of_grid = task.grid_id in grids if grids is not None else grid is not None and worker_id in grid.workers
    if worker_id is None or grid is None or not of_grid:
        return Refusal(
            "forbidden", f"{worker_id} is not a worker of grid {task.grid_id}; only its workers verify its incidents"
        )
    if worker_id in (task.handled_by or "").split():
        return Refusal(
            "forbidden",
            f"{worker_id} did the work verification {task.verification_id} checks (fixed it on the spot or handled "
            "it); another worker verifies it",
        )
    if rules.policy == "assigned":
        if worker_id != task.worker_id:
            return Refusal(
                "forbidden", f"verification {task.verification_id} is assigned to {task.worker_id}; only they decide it"
            )
    elif worker_id == task.reporter_id:
        return Refusal(
            "forbidden",
            f"{worker_id} reported incident {task.incident_id}; another worker of grid {task.grid_id} verifies it",
        )
    if task.status != VerificationStatus.PENDING:
        return Refusal(
            "decided", f"verification {task.verification_id} is already {task.status} (by {task.decided_by})"
        )
    return None


def decide(
    task: Task, worker_id: str, passed: bool, note: str, actor: Actor | None, now: datetime
) -> ev.VerificationPassed | ev.VerificationFailed:
    """核查通过 (``passed``: dispatch closes the case) or 核查不通过 (the work goes back, 返工, with ``note``): the
    task decided in place, and the outcome to emit. ``actor`` is whoever acts (by default the worker), recorded on
    the worker's behalf when another."""
    recorded = (actor or Actor(kind=ActorKind.GRID_WORKER, id=worker_id)).on_behalf(worker_id)
    task.status = VerificationStatus.PASSED if passed else VerificationStatus.FAILED
    task.decided_at = now
    task.decided_by = recorded.id
    task.decided_on_behalf_of = recorded.on_behalf_of
    task.note = note
    fields: dict[str, Any] = dict(
        incident_id=task.incident_id,
        actor=recorded,
        correlation_id=task.correlation_id,
        causation_id=task.request_event_id,
        occurred_at=now,
        verification_id=task.verification_id,
        note=note,
    )
    return ev.VerificationPassed(**fields) if passed else ev.VerificationFailed(**fields)


__all__ = ["Policy", "Refusal", "Rules", "Task", "decide", "open_task", "refuse_decision"]
