"""The one door to verification's table: tasks read and written as :class:`~.domain.Task`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypedDict

import sqlalchemy as sa

from schemas import Event, VerificationStatus
from schemas import events as ev
from services.common.db import Rows, UnitOfWork, as_utc, columns_by_key

from .domain import Task
from .models import VerificationTask

TASKS = Rows(VerificationTask, Task)

_TASK: sa.Table = VerificationTask.__table__  # type: ignore[attr-defined]
_BY_ID = columns_by_key(_TASK, *_TASK.c.keys())
"""A task by its id, built once: a decision reads it per request."""
_DECIDE = (
    sa.update(_TASK)
    .where(_TASK.c.verification_id == sa.bindparam("id"), _TASK.c.status == VerificationStatus.PENDING)
    .values(
        status=sa.bindparam("new_status"),
        decided_at=sa.bindparam("at"),
        decided_by=sa.bindparam("by"),
        decided_on_behalf_of=sa.bindparam("for"),
        note=sa.bindparam("new_note"),
    )
)
"""The decision as one prebuilt Core statement (it runs per decision)."""


def _task(row: sa.RowMapping) -> Task:
    values = dict(row)
    values["requested_at"] = as_utc(values["requested_at"])  # SQLite hands back naive datetimes
    if values["decided_at"] is not None:
        values["decided_at"] = as_utc(values["decided_at"])
    return Task(**values)


class Queue(TypedDict, total=False):
    """Which tasks of a queue (each filter given narrows it; ``grids``: only these grids') and which page."""

    worker_id: str | None
    grid_id: str | None
    status: str | None
    limit: int
    offset: int
    grids: Iterable[str] | None


class VerificationStore:
    """verification's tasks in one unit of work."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    # -- the consumer's path: tasks as records of the unit (a batch reads them at once)

    def preload(self, events: Sequence[Event]) -> None:
        """A batch's tasks read in one query, rather than one per request."""
        self.uow.fetch(TASKS, (e.verification_id for e in events if isinstance(e, ev.VerificationRequested)))

    def opened(self, verification_id: str) -> Task | None:
        """The task opened under ``verification_id`` (this unit's own included), or None."""
        return self.uow.record(TASKS, verification_id)

    def add(self, task: Task) -> None:
        """A new task, written at the commit."""
        self.uow.add(TASKS, task)

    # -- decisions and the API's reads

    def task(self, verification_id: str) -> Task | None:
        """The task as it stands in the table (a copy of this request's own: a decision writes it back with
        :meth:`record_decision`, never at the commit)."""
        row = self.uow.row(_BY_ID, verification_id)
        return None if row is None else _task(row._mapping)

    def record_decision(self, task: Task) -> bool:
        """Write ``task``'s decision if it is still pending in the table; False if another decided it meanwhile.

        Compare-and-set: of two workers deciding at once (two instances on one database, one worker on two
        devices), only one changes the task and emits the outcome."""
        changed = self.uow.connection.execute(
            _DECIDE,
            {
                "id": task.verification_id,
                "new_status": task.status,
                "at": task.decided_at,
                "by": task.decided_by,
                "for": task.decided_on_behalf_of,
                "new_note": task.note,
            },
        )
        return changed.rowcount == 1

    def queue(
        self,
        *,
        worker_id: str | None = None,
        grid_id: str | None = None,
        status: str | None = None,
        limit: int = 50,
        offset: int = 0,
        grids: Iterable[str] | None = None,
    ) -> list[Task]:
        """A worker's (or a grid's) queue, oldest request first; ``grids`` limits it to the caller's cells.

        Read as rows, not records of the unit: a queue is polled far more often than it changes, and nothing here
        is written."""
        c = _TASK.c
        q = sa.select(_TASK)
        if grids is not None:
            q = q.where(c.grid_id.in_(tuple(grids)))
        for column, wanted in ((c.worker_id, worker_id), (c.grid_id, grid_id), (c.status, status)):
            if wanted:
                q = q.where(column == wanted)
        q = q.order_by(c.requested_at, c.verification_id).offset(offset).limit(limit)
        return [_task(row) for row in self.uow.connection.execute(q).mappings()]
