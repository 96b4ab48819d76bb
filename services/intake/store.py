"""The one door to intake's tables: incidents as reported and their timelines, as typed rows.

Every statement is built here, most of them once (a report and every folded event run them). The fold reads a
consumed batch's incidents in one query (:meth:`IntakeStore.preload`) and appends the timeline with one insert per
commit; a report is one ``INSERT … ON CONFLICT DO NOTHING``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from schemas import INCIDENT_FINAL, Event
from services.common.auth import Principal, Role
from services.common.db import Rows, UnitOfWork, insert_unless_taken

from .domain import Incident, Transition
from .models import IntakeIncident, IntakeTransition

INCIDENTS = Rows(IntakeIncident, Incident)
TRANSITIONS = Rows(IntakeTransition, Transition)
_INCIDENT = INCIDENTS.table
_TRANSITION = TRANSITIONS.table

DatabaseUnavailable = OperationalError
"""The database cannot be reached, is locked or full: nothing was recorded (the Open311 gateway says so)."""

LIMIT = 1000
"""The most rows one of the public's (Open311) queries returns, as GeoReport v2's default query limit."""

_CLOSED = sorted(s.value for s in INCIDENT_FINAL)

_REPORTED_AS = sa.select(_INCIDENT).where(
    _INCIDENT.c.reporter_id == sa.bindparam("reporter"), _INCIDENT.c.client_report_id == sa.bindparam("report")
)
"""The incident a client's report id already names, built once: asked when a report's insert took nothing."""

_TIMELINE = (
    sa.select(_TRANSITION)
    .where(_TRANSITION.c.incident_id == sa.bindparam("incident"))
    .order_by(_TRANSITION.c.occurred_at, _TRANSITION.c.id)
)


def _chunks(ids: Sequence[str], size: int = 500) -> Iterator[Sequence[str]]:
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


class IntakeStore:
    """intake's tables in one unit of work."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    # -- reports and the fold

    def take(self, incident: Incident) -> bool:
        """Insert a new incident unless a row holds its client report id or its case number already; whether it
        went in. Written now, not at the commit: a report costs this one statement, and two intake instances taking
        the same client report id at once serialize on the unique index (the second inserts nothing)."""
        insert = insert_unless_taken(_INCIDENT, self.uow.engine.dialect.name)
        return bool(self.uow.connection.execute(insert, vars(incident)).rowcount)

    def report_of(self, reporter_id: str, client_report_id: str) -> Incident | None:
        """The incident this reporter's client report id names, if any."""
        found = self.uow.records_where(INCIDENTS, _REPORTED_AS, {"reporter": reporter_id, "report": client_report_id})
        return found[0] if found else None

    def preload(self, events: Sequence[Event]) -> None:
        """A batch's incidents in one query rather than one per event."""
        self.uow.fetch(INCIDENTS, (e.incident_id for e in events))

    def incident(self, incident_id: str) -> Incident | None:
        """The incident (changes to it are written at the commit)."""
        return self.uow.record(INCIDENTS, incident_id)

    def add_incident(self, incident: Incident) -> Incident:
        return self.uow.add(INCIDENTS, incident)

    def add_transition(self, t: Transition) -> None:
        """A line of a timeline: appended (nothing in the unit reads it back), its id the database's."""
        values = vars(t).copy()
        del values["id"]
        self.uow.append(IntakeTransition, **values)

    # -- reads for intake's API

    def timeline(self, incident_id: str) -> list[Transition]:
        """The incident's transitions in the order they occurred."""
        return self.uow.records_where(TRANSITIONS, _TIMELINE, {"incident": incident_id})

    def incidents(self, status: str | None, limit: int, offset: int, who: Principal | None) -> Sequence[sa.Row[Any]]:
        """A page of incidents, newest first, narrowed in SQL to those ``who`` may see (the caller checks each:
        a department's code found in ``departments`` may be a part of another's)."""
        q = sa.select(_INCIDENT).order_by(_INCIDENT.c.reported_at.desc())
        if status:
            q = q.where(_INCIDENT.c.status == status)
        if who is not None and not who.sees_everything:
            if who.role is Role.DEPARTMENT:
                q = q.where(_INCIDENT.c.departments.contains(who.department or "?"))
            elif who.role is Role.GRID_WORKER:
                q = q.where(sa.or_(_INCIDENT.c.reporter_id == who.subject, _INCIDENT.c.grid_id.in_(who.grids)))
            else:
                q = q.where(_INCIDENT.c.reporter_id == who.subject)
        return self.uow.connection.execute(q.offset(offset).limit(limit)).all()

    # -- the public's reads (Open311): incidents of ``public`` categories only

    def public_incidents(self, ids: Sequence[str], public: Collection[str]) -> list[Incident]:
        """Those of ``ids`` (the first :data:`LIMIT` distinct) the public reads, newest first."""
        rows: list[Incident] = []
        for chunk in _chunks(list(dict.fromkeys(ids))[:LIMIT]):
            q = sa.select(_INCIDENT).where(_INCIDENT.c.incident_id.in_(chunk), _in(public))
            rows.extend(self.uow.records_where(INCIDENTS, q))
        rows.sort(key=lambda r: (r.reported_at, r.incident_id), reverse=True)
        return rows

    def public_incidents_matching(
        self, codes: Sequence[str], closed: bool | None, start: datetime, end: datetime | None, public: Collection[str]
    ) -> list[Incident]:
        """Incidents reported from ``start`` to ``end`` (inclusive), of ``codes`` (any if none), closed or open
        (either if None), newest first, at most :data:`LIMIT`."""
        q = sa.select(_INCIDENT).where(_in(public), _INCIDENT.c.reported_at >= _utc(start))
        if end is not None:
            q = q.where(_INCIDENT.c.reported_at <= _utc(end))
        if codes:
            q = q.where(_INCIDENT.c.category_code.in_(codes))
        if closed is False:
            q = q.where(_INCIDENT.c.status.not_in(_CLOSED))
        elif closed is True:
            q = q.where(_INCIDENT.c.status.in_(_CLOSED))
        q = q.order_by(_INCIDENT.c.reported_at.desc(), _INCIDENT.c.incident_id.desc()).limit(LIMIT)
        return self.uow.records_where(INCIDENTS, q)

    def public_transitions(self, start: datetime, end: datetime | None, public: Collection[str]) -> list[Transition]:
        """Transitions of the public's incidents from ``start`` to ``end``, oldest first, at most :data:`LIMIT`."""
        q = (
            sa.select(_TRANSITION)
            .join(_INCIDENT, _INCIDENT.c.incident_id == _TRANSITION.c.incident_id)
            .where(_in(public), _TRANSITION.c.occurred_at >= _utc(start))
        )
        if end is not None:
            q = q.where(_TRANSITION.c.occurred_at <= _utc(end))
        q = q.order_by(_TRANSITION.c.occurred_at, _TRANSITION.c.id).limit(LIMIT)
        return self.uow.records_where(TRANSITIONS, q)

    def photos_and_sources(self, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """Each incident's photo_urls and source."""
        found: dict[str, tuple[str, str]] = {}
        for chunk in _chunks(list(dict.fromkeys(ids))):
            q = sa.select(_INCIDENT.c.incident_id, _INCIDENT.c.photo_urls, _INCIDENT.c.source).where(
                _INCIDENT.c.incident_id.in_(chunk)
            )
            for incident_id, photos, source in self.uow.connection.execute(q):
                found[incident_id] = (photos, source)
        return found

    def timelines(self, ids: Sequence[str], until: datetime | None = None) -> list[Transition]:
        """The transitions of these incidents (up to ``until``), in the order they occurred."""
        found: list[Transition] = []
        for chunk in _chunks(list(dict.fromkeys(ids))):
            q = sa.select(_TRANSITION).where(_TRANSITION.c.incident_id.in_(chunk))
            if until is not None:
                q = q.where(_TRANSITION.c.occurred_at <= _utc(until))
            found.extend(self.uow.records_where(TRANSITIONS, q))
        found.sort(key=lambda t: (t.occurred_at, t.id or 0))
        return found


def _in(public: Collection[str]) -> Any:
    """The public's incidents: those of a public category."""
    return _INCIDENT.c.category_code.in_(sorted(public))


__all__ = ["INCIDENTS", "LIMIT", "TRANSITIONS", "DatabaseUnavailable", "IntakeStore"]
