"""intake's handlers: take a report once (idempotent on the client's report id), fold the incident's lifecycle,
answer what a caller may see of it. Each loads from the store, asks the domain, saves and emits."""

from __future__ import annotations

from collections.abc import Sequence

from schemas import Actor, Event, IncidentStatus
from schemas import events as ev
from services.common import visibility
from services.common.auth import Principal
from services.common.db import UnitOfWork
from services.common.errors import Forbidden, Rejected, Unavailable, UnknownIncident

from . import domain
from .domain import Incident, Transition
from .models import IncidentListed, IncidentPublic, ReportAccepted, ReportCreate, TransitionPublic
from .store import IntakeStore


def report_incident(cmd: ReportCreate, uow: UnitOfWork, by: Actor | None = None) -> ReportAccepted:
    """Record a report and queue IncidentReported; a retry with the same client report id changes nothing.

    ``by`` is the caller (by default the reporter): one reporting for another reporter (the hotline desk for a
    caller) is recorded as itself on the reporter's behalf. Only whoever sent a report may retry it: the same
    client report id of the same reporter from anyone else is refused, never answered with that report.

    The new incident is inserted first, unless a row holds its client report id or its case number already
    (:meth:`IntakeStore.take`): a report, nearly always new, costs one statement, not a lookup and an insert. An
    insert that took nothing is a retry (answered with its incident) or a case number drawn twice (drawn again).
    Two intake instances that take the same client report id at once serialize on the unique index: the second
    inserts nothing and finds the first's incident."""
    actor = domain.reporting_actor(cmd, by)
    if refused := domain.reporting_refusal(cmd, actor):
        raise Forbidden(refused)
    store = IntakeStore(uow)
    now = uow.now()
    for _ in range(domain.ID_DRAWS):
        event = domain.report_incident(cmd, actor, now)
        if store.take(domain.incident_of(event)):
            uow.emit(event)
            return ReportAccepted(incident_id=event.incident_id, status=IncidentStatus.REPORTED.value)
        existing = store.report_of(cmd.reporter_id, cmd.client_report_id)
        if existing is not None:
            if refused := domain.retry_refusal(existing, cmd, actor):
                raise Rejected(refused)
            return ReportAccepted(incident_id=existing.incident_id, status=existing.status, duplicate=True)
        # the case number was taken by another report: draw another
    raise Unavailable(f"no free case number in {domain.ID_DRAWS} draws; retry")


def record_transition(event: Event, uow: UnitOfWork) -> None:
    """Fold one lifecycle event into the incident's status and timeline."""
    store = IntakeStore(uow)
    incident = store.incident(event.incident_id)
    if incident is None:
        if not isinstance(event, ev.IncidentReported):
            raise UnknownIncident(f"{event.type} for unknown incident {event.incident_id}")
        incident = store.add_incident(domain.incident_of(event))
    store.add_transition(domain.fold(incident, event))


def preload(events: Sequence[Event], uow: UnitOfWork) -> None:
    """A batch's incidents in one query rather than one per event."""
    IntakeStore(uow).preload(events)


def get_incident(incident_id: str, who: Principal | None, uow: UnitOfWork) -> IncidentPublic:
    """The incident as ``who`` may see it (services.common.visibility): unknown when it is not theirs to see, a
    citizen reporter's contact withheld from anyone but the operations center. Without ``who``, all of it."""
    store = IntakeStore(uow)
    row = store.incident(incident_id)
    if row is None:
        raise visibility.unseen("incident", incident_id)
    departments = domain.departments_of(row)
    if who is not None and not visibility.sees_incident(who, row.reporter_id, row.grid_id, departments):
        raise visibility.unseen("incident", incident_id)
    return _public(row, departments, store.timeline(incident_id), who)


def _public(row: Incident, departments: list[str], timeline: list[Transition], who: Principal | None) -> IncidentPublic:
    reporter = row.reporter_id if who is None else visibility.reporter(who, row.source, row.reporter_id)
    return IncidentPublic.model_validate(
        {
            **vars(row),
            "reporter_id": reporter,
            "departments": departments,
            "timeline": [
                TransitionPublic.model_validate(
                    {
                        **vars(t),
                        "actor_id": t.actor_id if who is None else visibility.actor(who, t.actor_kind, t.actor_id),
                        "on_behalf_of": t.on_behalf_of if t.on_behalf_of != row.reporter_id else reporter,
                    }
                )
                for t in timeline
            ],
        }
    )


def list_incidents(
    status: str | None, limit: int, offset: int, who: Principal | None, uow: UnitOfWork
) -> list[IncidentListed]:
    """Recent incidents ``who`` may see (all without ``who``), newest first, optionally by status."""
    return [
        IncidentListed.model_validate(r, from_attributes=True)
        for r in IntakeStore(uow).incidents(status, limit, offset, who)
        if who is None or visibility.sees_incident(who, r.reporter_id, r.grid_id, r.departments.split())
    ]


HANDLERS = {cls: record_transition for cls in ev.EVENT_TYPES.values()}
