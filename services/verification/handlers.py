"""verification's rules, as plain functions.

A VerificationRequested opens one task (once per verification id, however often it is delivered). Only a worker
of the task's grid may decide it, and only while it is pending: pass (核查通过) lets dispatch close the case,
fail (核查不通过) sends the work back to the department (返工) with the worker's note. Duties are separate: the
worker the task is asked of decides it (or, under the ``grid`` policy, any worker of the grid but the reporter),
and whoever did the work — the reporter who fixed it on the spot, the staff who handled it — never does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from schemas import Actor, ActorKind, Event
from schemas import events as ev
from schemas.reference import GRIDS
from services.common import visibility
from services.common.batch import BatchOutcome, act_on_each
from services.common.bus import Handler
from services.common.changes import keys_for
from services.common.db import UnitOfWork, as_utc, columns_by_key
from services.common.errors import Forbidden, PoisonMessage, Rejected

from .models import (
    FailRequest,
    PassRequest,
    PassVerifications,
    TaskStatus,
    VerificationDecided,
    VerificationPublic,
    VerificationTask,
)
from .settings import VerifierPolicy

# -- events ---------------------------------------------------------------------------------------------


VERIFICATIONS = "verifications"
"""The long-poll key of a grid's verification queue (``verifications:<grid>``)."""


def open_task(requested: ev.VerificationRequested, uow: UnitOfWork) -> None:
    """A 核查 task for the grid worker; a request already seen under the same verification id changes nothing."""
    if uow.record(VerificationTask, requested.verification_id) is not None:
        return
    if requested.grid_id not in GRIDS:
        raise PoisonMessage(f"verification {requested.verification_id} names unknown grid {requested.grid_id!r}")
    loc = requested.location
    uow.insert(
        VerificationTask,
        verification_id=requested.verification_id,
        incident_id=requested.incident_id,
        correlation_id=requested.correlation_id,
        request_event_id=requested.event_id,
        grid_id=requested.grid_id,
        worker_id=requested.worker_id,
        category_code=requested.category_code,
        lat=loc.lat,
        lon=loc.lon,
        address=loc.address,
        description=requested.description,
        work_order_ids=" ".join(requested.work_order_ids),
        evidence_urls=" ".join(str(u) for u in requested.evidence_urls),
        round=requested.round,
        reporter_id=requested.reporter_id,
        handled_by=" ".join(requested.handled_by) or None,
        status=TaskStatus.PENDING,
        requested_at=requested.occurred_at,
    )
    uow.touch(*keys_for(VERIFICATIONS, requested.grid_id))


# -- commands from the grid worker ------------------------------------------------------------------------


_TASK: sa.Table = VerificationTask.__table__  # type: ignore[attr-defined]
_DECIDE = (
    sa.update(_TASK)
    .where(_TASK.c.verification_id == sa.bindparam("id"), _TASK.c.status == TaskStatus.PENDING)
    .values(
        status=sa.bindparam("new_status"),
        decided_at=sa.bindparam("at"),
        decided_by=sa.bindparam("by"),
        decided_on_behalf_of=sa.bindparam("for"),
        note=sa.bindparam("new_note"),
    )
)
"""The decision as one prebuilt Core statement (it runs per decision)."""

_HEAD = columns_by_key(
    _TASK,
    "verification_id",
    "incident_id",
    "correlation_id",
    "request_event_id",
    "grid_id",
    "worker_id",
    "reporter_id",
    "handled_by",
    "status",
    "decided_by",
)
"""What a decision reads of its task, built once: the columns its rules and its event need, not the whole row as
an ORM object (which cost more than the rest of the decision)."""


def _task_for(uow: UnitOfWork, verification_id: str) -> sa.Row[Any] | None:
    return uow.row(_HEAD, verification_id)


def _check_duties(task: sa.Row[Any], worker_id: str, policy: VerifierPolicy) -> None:
    """Whether ``worker_id``, a worker of the task's grid, may decide it: never whoever did the work; under the
    ``assigned`` policy only the worker it is asked of, under ``grid`` anyone but the reporter."""
    if worker_id in (task.handled_by or "").split():
        raise Forbidden(
            f"{worker_id} did the work verification {task.verification_id} checks (fixed it on the spot or handled "
            "it); another worker verifies it"
        )
    if policy == "assigned":
        if worker_id != task.worker_id:
            raise Forbidden(f"verification {task.verification_id} is assigned to {task.worker_id}; only they decide it")
    elif worker_id == task.reporter_id:
        raise Forbidden(
            f"{worker_id} reported incident {task.incident_id}; another worker of grid {task.grid_id} verifies it"
        )


def _decide(
    verification_id: str,
    worker_id: str | None,
    passed: bool,
    note: str,
    uow: UnitOfWork,
    grids: tuple[str, ...] | None,
    actor: Actor | None,
    policy: VerifierPolicy,
) -> str:
    """The decision, written and emitted but not committed; the task's new status. ``worker_id`` is the worker
    who decides; ``actor`` whoever acts (the caller's token), recorded on behalf of the worker when another."""
    task = _task_for(uow, verification_id)
    if task is None or (grids is not None and task.grid_id not in grids):
        raise visibility.unseen("verification", verification_id)  # outside the caller's grids: as unknown
    grid = GRIDS.get(task.grid_id)
    allowed = task.grid_id in grids if grids is not None else grid is not None and worker_id in grid.workers
    if worker_id is None or grid is None or not allowed:
        raise Forbidden(f"{worker_id} is not a worker of grid {task.grid_id}; only its workers verify its incidents")
    _check_duties(task, worker_id, policy)
    if task.status != TaskStatus.PENDING:
        raise Rejected(f"verification {verification_id} is already {task.status} (by {task.decided_by})")

    now = uow.now()
    status = TaskStatus.PASSED if passed else TaskStatus.FAILED
    recorded = (actor or Actor(kind=ActorKind.GRID_WORKER, id=worker_id)).on_behalf(worker_id)
    # Compare-and-set: of two workers deciding at once, only one changes the task and emits the outcome.
    changed = uow.connection.execute(
        _DECIDE,
        {
            "id": verification_id,
            "new_status": status,
            "at": now,
            "by": recorded.id,
            "for": recorded.on_behalf_of,
            "new_note": note,
        },
    )
    if changed.rowcount != 1:
        raise Rejected(f"verification {verification_id} was decided meanwhile")

    common: dict[str, Any] = dict(
        incident_id=task.incident_id,
        actor=recorded,
        correlation_id=task.correlation_id,
        causation_id=task.request_event_id,
        occurred_at=now,
        verification_id=verification_id,
        note=note,
    )
    uow.emit(ev.VerificationPassed(**common) if passed else ev.VerificationFailed(**common))
    return status


def pass_verification(
    verification_id: str,
    cmd: PassRequest,
    uow: UnitOfWork,
    grids: tuple[str, ...] | None = None,
    *,
    actor: Actor | None = None,
    policy: VerifierPolicy = "assigned",
) -> VerificationDecided:
    """核查通过: the problem is solved; dispatch closes the case (结案). ``grids``: the caller's grid cells;
    ``actor``: the caller (by default the worker the command names); ``policy``: who may decide."""
    status = _decide(verification_id, cmd.worker_id, True, cmd.note, uow, grids, actor, policy)
    uow.commit()
    return VerificationDecided(verification_id=verification_id, status=status)


def pass_verifications(
    cmd: PassVerifications,
    uow: UnitOfWork,
    grids: tuple[str, ...] | None = None,
    *,
    actor: Actor | None = None,
    policy: VerifierPolicy = "assigned",
) -> BatchOutcome:
    """批量核查通过: each task as :func:`pass_verification` would decide it; the refused ones change nothing."""
    done = act_on_each(
        cmd.verification_ids,
        lambda verification_id: _decide(verification_id, cmd.worker_id, True, cmd.note, uow, grids, actor, policy),
    )
    uow.commit()
    return done


def fail_verification(
    verification_id: str,
    cmd: FailRequest,
    uow: UnitOfWork,
    grids: tuple[str, ...] | None = None,
    *,
    actor: Actor | None = None,
    policy: VerifierPolicy = "assigned",
) -> VerificationDecided:
    """核查不通过: the problem is not solved; dispatch sends the work back (返工) with the note."""
    status = _decide(verification_id, cmd.worker_id, False, cmd.note, uow, grids, actor, policy)
    uow.commit()
    return VerificationDecided(verification_id=verification_id, status=status)


# -- queries --------------------------------------------------------------------------------------------


def _public(t: VerificationTask | sa.Row[Any]) -> VerificationPublic:
    return VerificationPublic(
        verification_id=t.verification_id,
        incident_id=t.incident_id,
        correlation_id=t.correlation_id,
        grid_id=t.grid_id,
        worker_id=t.worker_id,
        category_code=t.category_code,
        lat=t.lat,
        lon=t.lon,
        address=t.address,
        description=t.description,
        work_order_ids=t.work_order_ids.split(),
        evidence_urls=t.evidence_urls.split(),
        round=t.round,
        status=t.status,
        requested_at=as_utc(t.requested_at),
        decided_at=as_utc(t.decided_at) if t.decided_at else None,
        decided_by=t.decided_by,
        decided_on_behalf_of=t.decided_on_behalf_of,
        note=t.note,
    )


def get_verification(verification_id: str, uow: UnitOfWork) -> VerificationPublic:
    task = uow.session.get(VerificationTask, verification_id)
    if task is None:
        raise visibility.unseen("verification", verification_id)
    return _public(task)


def list_verifications(
    uow: UnitOfWork,
    *,
    worker_id: str | None = None,
    grid_id: str | None = None,
    status: str | None = None,
    limit: int = 50,
    offset: int = 0,
    grids: tuple[str, ...] | None = None,
) -> list[VerificationPublic]:
    """A worker's (or a grid's) queue, oldest request first; ``grids`` limits it to the caller's cells.

    Read as rows, not ORM objects: a queue is polled far more often than it changes, and nothing here is written."""
    c = _TASK.c
    q = sa.select(_TASK)
    if grids is not None:
        q = q.where(c.grid_id.in_(grids))
    if worker_id:
        q = q.where(c.worker_id == worker_id)
    if grid_id:
        q = q.where(c.grid_id == grid_id)
    if status:
        q = q.where(c.status == status)
    q = q.order_by(c.requested_at, c.verification_id).offset(offset).limit(limit)
    return [_public(t) for t in uow.connection.execute(q)]


def preload(events: Sequence[Event], uow: UnitOfWork) -> None:
    """A batch's tasks read in one query, rather than one per request."""
    uow.fetch(VerificationTask, (e.verification_id for e in events if isinstance(e, ev.VerificationRequested)))


HANDLERS: dict[type[Event], Handler] = {
    ev.VerificationRequested: open_task,
}
