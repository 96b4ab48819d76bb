"""verification's handlers: load the task from the store, ask the rules (``domain``), save and emit.

A VerificationRequested opens a 核查 task; a worker of the task's grid passes (核查通过) or fails (核查不通过,
返工) it, one at a time or several in one request (批量核查). The rules are in :mod:`.domain`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Unpack

from schemas import Actor, Event, Town
from schemas import events as ev
from services.common import visibility
from services.common.batch import BatchOutcome, act_on_each
from services.common.bus import Handler
from services.common.changes import keys_for
from services.common.db import UnitOfWork
from services.common.errors import Forbidden, GridloopError, PoisonMessage, Rejected

from . import domain
from .domain import Refusal, Rules
from .models import FailRequest, PassRequest, PassVerifications, VerificationDecided, VerificationPublic
from .store import Queue, VerificationStore

VERIFICATIONS = "verifications"
"""The long-poll key of a grid's verification queue (``verifications:<grid>``)."""

_REFUSED: dict[str, type[GridloopError]] = {"unknown": PoisonMessage, "forbidden": Forbidden, "decided": Rejected}


def _refuse(refusal: Refusal) -> GridloopError:
    return _REFUSED[refusal.kind](refusal.reason)


# -- events ---------------------------------------------------------------------------------------------


def open_task(requested: ev.VerificationRequested, uow: UnitOfWork, town: Town) -> None:
    """A 核查 task for the grid worker; a request already seen under the same verification id changes nothing."""
    store = VerificationStore(uow)
    if store.opened(requested.verification_id) is not None:
        return
    task = domain.open_task(requested, town)
    if isinstance(task, Refusal):
        raise _refuse(task)
    store.add(task)
    uow.touch(*keys_for(VERIFICATIONS, task.grid_id))


def preload(events: Sequence[Event], uow: UnitOfWork) -> None:
    VerificationStore(uow).preload(events)


def bind(town: Town) -> dict[type[Event], Handler]:
    """The event handlers of a service running for ``town``."""
    return {ev.VerificationRequested: functools.partial(open_task, town=town)}


# -- commands from the grid worker ------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who asks: ``grids``, the grid cells the caller sees and decides in (``visibility.verifier_grids``; None:
    every grid), and ``actor``, who acts (None: the worker the command names)."""

    grids: tuple[str, ...] | None = None
    actor: Actor | None = None


def _decide(
    verification_id: str, worker_id: str | None, passed: bool, note: str, caller: Caller, rules: Rules, uow: UnitOfWork
) -> str:
    """The decision, written and emitted but not committed; the task's new status."""
    store = VerificationStore(uow)
    task = store.task(verification_id)
    if task is None or not visibility.sees_task(caller.grids, task.grid_id):
        raise visibility.unseen("verification", verification_id)  # outside the caller's grids: as unknown
    if refusal := domain.refuse_decision(task, worker_id, caller.grids, rules):
        raise _refuse(refusal)
    assert worker_id is not None  # the rules refuse a decision that names no worker
    outcome = domain.decide(task, worker_id, passed, note, caller.actor, uow.now())
    if not store.record_decision(task):
        raise Rejected(f"verification {verification_id} was decided meanwhile")
    uow.emit(outcome)
    return task.status


def pass_verification(
    verification_id: str, cmd: PassRequest, caller: Caller, rules: Rules, uow: UnitOfWork
) -> VerificationDecided:
    """核查通过: the problem is solved; dispatch closes the case (结案)."""
    status = _decide(verification_id, cmd.worker_id, True, cmd.note, caller, rules, uow)
    return VerificationDecided(verification_id=verification_id, status=status)


def fail_verification(
    verification_id: str, cmd: FailRequest, caller: Caller, rules: Rules, uow: UnitOfWork
) -> VerificationDecided:
    """核查不通过: the problem is not solved; dispatch sends the work back (返工) with the note."""
    status = _decide(verification_id, cmd.worker_id, False, cmd.note, caller, rules, uow)
    return VerificationDecided(verification_id=verification_id, status=status)


def pass_verifications(cmd: PassVerifications, caller: Caller, rules: Rules, uow: UnitOfWork) -> BatchOutcome:
    """批量核查通过: each task as :func:`pass_verification` would decide it; the refused ones change nothing."""
    return act_on_each(
        cmd.verification_ids, lambda one: _decide(one, cmd.worker_id, True, cmd.note, caller, rules, uow)
    )


# -- queries --------------------------------------------------------------------------------------------


def get_verification(verification_id: str, grids: tuple[str, ...] | None, uow: UnitOfWork) -> VerificationPublic:
    """A task, if the caller with ``grids`` sees it (one outside them is answered as unknown)."""
    task = VerificationStore(uow).task(verification_id)
    if task is None or not visibility.sees_task(grids, task.grid_id):
        raise visibility.unseen("verification", verification_id)
    return VerificationPublic.model_validate(task, from_attributes=True)


def list_verifications(uow: UnitOfWork, **queue: Unpack[Queue]) -> list[VerificationPublic]:
    """A worker's (or a grid's) queue, oldest request first; ``grids`` limits it to the caller's cells."""
    return [VerificationPublic.model_validate(t, from_attributes=True) for t in VerificationStore(uow).queue(**queue)]


__all__ = [
    "VERIFICATIONS",
    "Caller",
    "bind",
    "fail_verification",
    "get_verification",
    "list_verifications",
    "open_task",
    "pass_verification",
    "pass_verifications",
    "preload",
]
