"""The operations center's handlers: the fold of the lifecycle log (idempotent on event id, the bus claims each
once) and the reads of the KPIs and the dashboard. The rules are in :mod:`.domain`; the tables behind
:mod:`.store`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import date, timedelta
from typing import Any

from schemas import EVENT_TYPES, Event
from schemas.reference import GAOHANG, Town
from services.common.db import UnitOfWork

from . import domain, metrics, views
from .domain import Stage
from .kpis import Dimension, KpiReport, Period, kpi_report
from .store import OpsStore

# -- the fold ------------------------------------------------------------------------------------------


def fold_event(event: Event, uow: UnitOfWork, town: Town = GAOHANG) -> list[Stage]:
    """Apply one lifecycle event (and those that waited for it). Returns the stage durations it completes."""
    return _fold(event, OpsStore(uow), town)


def _fold(event: Event, store: OpsStore, town: Town) -> list[Stage]:
    incident = store.incident(event.incident_id)
    if incident is None:
        incident = domain.open_incident(event, town)
        if incident is None:
            store.park(event)  # ahead of its report (another producer's copy): folded when the report comes
            return []
        store.add(incident)
    order = store.work_order(domain.work_order_of(event))
    if domain.waits_for_order(event, order):
        store.park(event)  # ahead of its dispatch: folded when the work order is known
        return []
    orders = store.orders_of(incident.incident_id) if domain.closes_orders(event) else ()
    folded = domain.fold(event, incident, order, orders)
    if folded.order is not None:
        store.add(folded.order)
    store.tally(town).event(event, incident)
    stages = folded.stages
    if (released := domain.released_by(event)) is not None:
        stages += _unpark(store, *released, town)
    return stages


def _unpark(store: OpsStore, column: str, key: str, town: Town) -> list[Stage]:
    """Fold the events that waited for the one just folded, oldest first (one may park again, waiting for
    something else still: a work order's events wait for its dispatch after the report came)."""
    stages: list[Stage] = []
    for event_id in store.waiting_on(column, key):
        parked = store.unpark(event_id)
        if parked is not None:  # else folded meanwhile, by an event folded before it in this loop
            stages += _fold(parked, store, town)
    return stages


def fold(event: Event, uow: UnitOfWork, town: Town = GAOHANG) -> None:
    """Fold one event and time the stages it completes (``gridloop_stage_duration_seconds``)."""
    for stage, seconds in fold_event(event, uow, town):
        metrics.observe_stage(stage, seconds)


def preload(events: Sequence[Event], uow: UnitOfWork) -> None:
    """A batch's rows, read in a few queries before its events are folded one by one."""
    OpsStore(uow).preload(events)


def forget_rebuild_positions(uow: UnitOfWork) -> None:
    """The rebuilt model is the live one now: where its rebuild got in the log no longer says anything (the live
    consumer's offsets are its consumer group's)."""
    OpsStore(uow).forget_positions()


def bind(town: Town) -> Mapping[type[Event], Callable[[Any, UnitOfWork], None]]:
    """The fold of every lifecycle event, for ``town``."""

    def fold_in_town(event: Event, uow: UnitOfWork) -> None:
        fold(event, uow, town)

    return {cls: fold_in_town for cls in EVENT_TYPES.values()}


# -- reads (runtime.query) -------------------------------------------------------------------------------


def report_kpis(period: Period, at: date | None, by: Dimension, town: Town, uow: UnitOfWork) -> KpiReport:
    """KPIs for the period containing the town's day ``at`` (default today) and the previous one (环比)."""
    now = uow.now()
    return kpi_report(OpsStore(uow).reads, period, at or town.local_day(now), by, now, town)


def show_backlog(town: Town, uow: UnitOfWork) -> list[views.Backlog]:
    return views.backlog(OpsStore(uow).reads.active_orders(), uow.now(), town)


def list_overdue(limit: int, town: Town, uow: UnitOfWork) -> list[views.OverdueOrder]:
    now = uow.now()
    return views.overdue_orders(OpsStore(uow).reads.overdue_orders(now, limit), now, town)


def show_trend(days: int, town: Town, uow: UnitOfWork) -> list[views.TrendPoint]:
    first = views.trend_first(town.local_day(uow.now()), days)
    return views.trend(OpsStore(uow).reads.daily_totals(first, first + timedelta(days=days)), first, days)


def map_incidents(town: Town, uow: UnitOfWork) -> dict[str, Any]:
    reads, now = OpsStore(uow).reads, uow.now()
    return views.open_incidents_geojson(reads.open_incidents(views.MAP_LIMIT), reads.late_orders(now), town)


def map_grids(town: Town, uow: UnitOfWork) -> dict[str, Any]:
    return views.grids_geojson(OpsStore(uow).reads.open_incidents(), town)
