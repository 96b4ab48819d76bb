"""verification's HTTP edge for the grid worker (网格员): the 核查 queue, pass and fail."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, FastAPI, Query

from schemas import VerificationStatus
from services.common import visibility
from services.common.api import WaitS, create_api
from services.common.auth import Principal, Role
from services.common.batch import BatchOutcome
from services.common.changes import key_for, long_poll
from services.common.errors import Forbidden
from services.common.runtime import Runtime

from . import handlers
from .domain import Rules
from .models import FailRequest, PassRequest, PassVerifications, VerificationDecided, VerificationPublic
from .settings import VerifierPolicy

B = TypeVar("B", PassRequest, FailRequest, PassVerifications)
R = TypeVar("R")

_ID = r"^[\w.@:-]+$"
_STATUS = f"^({'|'.join(VerificationStatus)})$"
_DECISION_ERRORS: dict[int | str, dict[str, str]] = {
    403: {
        "description": "the body names someone else; the worker does not belong to the task's grid, is not the one "
        "it is asked of (or, under the grid policy, reported it), or did the work it checks"
    },
    404: {"description": "no such verification, or one outside the caller's grid cells (answered alike)"},
    409: {"description": "the verification is already decided"},
    422: {"description": "invalid request"},
}
_UNSEEN: dict[int | str, dict[str, str]] = {
    404: {"description": "no such verification, or one outside the caller's grid cells"}
}


@dataclass(frozen=True)
class QueueQuery:
    """Which tasks of a queue, which page, and how long to wait for one: the query string of ``GET /verifications``."""

    worker_id: Annotated[str | None, Query(min_length=1, max_length=64, pattern=_ID)] = None
    grid_id: Annotated[str | None, Query(min_length=1, max_length=40, pattern=r"^[a-z0-9_]+$")] = None
    status: Annotated[str | None, Query(pattern=_STATUS)] = None
    limit: Annotated[int, Query(ge=1, le=500)] = 50
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0
    wait: WaitS = 0.0


_ALL = QueueQuery()


def _as_caller(body: B, who: Principal) -> tuple[B, handlers.Caller]:
    """The command as the caller may give it, and who asks: a grid worker decides as themselves, in their own
    grid cells; an administrator names the worker it decides for and is recorded as itself on their behalf."""
    grids = visibility.verifier_grids(who)
    if who.role is not Role.GRID_WORKER:
        if body.worker_id is None:
            raise Forbidden(f"a {who.role.value} decides for a worker of the grid: name them (worker_id)")
        return body, handlers.Caller(grids, who.actor().on_behalf(body.worker_id))
    if body.worker_id not in (None, who.subject):
        raise Forbidden(f"you are {who.subject}; the body names {body.worker_id}")
    return body.model_copy(update={"worker_id": who.subject}), handlers.Caller(grids, who.actor())


def build_api(runtime: Runtime, policy: VerifierPolicy = "assigned") -> FastAPI:
    Worker = runtime.allow(Role.GRID_WORKER, Role.ADMIN)
    Reader = runtime.allow(Role.GRID_WORKER, Role.OPS_CENTER, Role.ADMIN)
    rules = Rules(runtime.town, policy)
    api = create_api(
        "verification",
        title="gridloop verification",
        description="核查: the grid worker checks on the spot that an incident is solved; pass closes it (结案), "
        "fail sends the work back (返工).",
    )

    async def decide(handler: Callable[..., R], body: B, who: Principal, *ids: str) -> R:
        """A decision the caller asks for, through the bus: the same for one task and for several."""
        cmd, caller = _as_caller(body, who)
        return await runtime.command(handler, *ids, cmd, caller, rules)

    reads = functools.partial(api.get, tags=["verifications"])
    decisions = functools.partial(api.post, status_code=202, tags=["verifications"])
    decided = functools.partial(decisions, response_model=VerificationDecided, responses=_DECISION_ERRORS)

    @reads("/verifications", response_model=list[VerificationPublic])
    async def verifications(
        who: Principal = Reader, query: Annotated[QueueQuery, Depends()] = _ALL
    ) -> list[VerificationPublic]:
        """A worker's (or a grid's) verification queue, oldest request first.

        With ``wait``, an empty answer waits up to that many seconds for a task to arrive (a long poll)."""
        grids = visibility.verifier_grids(who)
        filters = asdict(query)
        wait = filters.pop("wait")
        read = functools.partial(handlers.list_verifications, grids=grids, **filters)
        grid = query.grid_id or (grids[0] if grids is not None and len(grids) == 1 else None)
        return await long_poll(
            runtime.changes, key_for(handlers.VERIFICATIONS, grid), wait, lambda: runtime.query(read)
        )

    @reads("/verifications/{verification_id}", response_model=VerificationPublic, responses=_UNSEEN)
    async def verification(verification_id: str, who: Principal = Reader) -> VerificationPublic:
        return await runtime.read(handlers.get_verification, verification_id, visibility.verifier_grids(who))

    @decisions("/verifications/pass", response_model=BatchOutcome)
    async def pass_many(body: PassVerifications, who: Principal = Worker) -> BatchOutcome:
        """批量核查通过: pass several verifications in one request.

        Each is passed or refused (403, 404, 409, with the reason) as the one-task action would — a task outside
        the caller's grid cells as an unknown one; the refused ones change nothing and the others are decided
        together."""
        return await decide(handlers.pass_verifications, body, who)

    @decided("/verifications/{verification_id}/pass")
    async def pass_(verification_id: str, body: PassRequest, who: Principal = Worker) -> VerificationDecided:
        """核查通过: the problem is solved; the incident will be closed."""
        return await decide(handlers.pass_verification, body, who, verification_id)

    @decided("/verifications/{verification_id}/fail")
    async def fail(verification_id: str, body: FailRequest, who: Principal = Worker) -> VerificationDecided:
        """核查不通过: the work goes back to the department (返工) with the note."""
        return await decide(handlers.fail_verification, body, who, verification_id)

    return api
