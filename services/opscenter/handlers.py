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

from . import _map, domain, metrics, views
from ._map import MapQuery
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


def preload_rolling_up_later(events: Sequence[Event], uow: UnitOfWork) -> None:
    """:func:`preload`, in a unit that leaves the rows' shares of the rollups to
    :func:`~.store.settle_rollups` (a rebuild catching up with the log)."""
    store = OpsStore(uow)
    store.roll_up_rows_later()
    store.preload(events)


def forget_rebuild_positions(uow: UnitOfWork) -> None:
    """The rebuilt model is the live one now: where its rebuild got in the log no longer says anything (the live
    consumer's offsets are its consumer group's)."""
    OpsStore(uow).forget_positions()


def bind(town: Town, *, timed: bool = True) -> Mapping[type[Event], Callable[[Any, UnitOfWork], None]]:
    """The fold of every lifecycle event, for ``town``; ``timed``: the stages it completes are observed in this
    process's metrics (the service's; a rebuild's would be nobody's)."""

    def fold_in_town(event: Event, uow: UnitOfWork) -> None:
        fold(event, uow, town)

    def fold_untimed(event: Event, uow: UnitOfWork) -> None:
        _fold(event, OpsStore(uow), town)

    return {cls: fold_in_town if timed else fold_untimed for cls in EVENT_TYPES.values()}


# -- reads (runtime.read) --------------------------------------------------------------------------------


def report_kpis(period: Period, at: date | None, by: Dimension, town: Town, uow: UnitOfWork) -> KpiReport:
    """KPIs for the period containing the town's day ``at`` (default today) and the previous one (环比)."""
    now = uow.now()
    return kpi_report(OpsStore(uow).reads, period, at or town.local_day(now), by, now, town)


def show_backlog(town: Town, uow: UnitOfWork) -> list[views.Backlog]:
    return views.backlog(OpsStore(uow).reads.backlog(uow.now()), town)


def page_overdue(limit: int, after: views.OverdueAfter | None, town: Town, uow: UnitOfWork) -> views.OverduePage:
    """A page of the overdue list: at most ``limit`` work orders, those after ``after`` (from the first: None)."""
    reads, now = OpsStore(uow).reads, uow.now()
    position = (after.deadline, after.work_order_id) if after else None
    late = reads.overdue_orders(now, limit + 1, position)  # one more: is there another page?
    return views.overdue_page(late, limit, reads.overdue_count(now), now, town)


def list_overdue(limit: int, town: Town, uow: UnitOfWork) -> list[views.OverdueOrder]:
    """The first ``limit`` work orders of the overdue list."""
    return page_overdue(limit, None, town, uow).items


def show_trend(days: int, town: Town, uow: UnitOfWork) -> list[views.TrendPoint]:
    first = views.trend_first(town.local_day(uow.now()), days)
    return views.trend(OpsStore(uow).reads.daily_totals(first, first + timedelta(days=days)), first, days)


def show_map(query: MapQuery, town: Town, uow: UnitOfWork) -> dict[str, Any]:
    """The open incidents in view as GeoJSON: points where few are, else clusters (see :mod:`._map`)."""
    reads, now = OpsStore(uow).reads, uow.now()
    extent = reads.open_extent(query.box)
    if _map.as_points(query, extent):
        points = reads.open_incidents(query.box, _map.POINTS_MAX)
        overdue = reads.overdue_among((i.incident_id for i in points), now)
        return _map.points_geojson(points, overdue, town, query)
    cell = _map.cell_size(query, extent)
    return _map.clusters_geojson(reads.open_clusters(query.box, cell, now), cell, query)


def map_incidents(town: Town, uow: UnitOfWork) -> dict[str, Any]:
    """The whole town's open incidents as the map shows them when it names no zoom."""
    return show_map(MapQuery(), town, uow)


def map_grids(town: Town, uow: UnitOfWork) -> dict[str, Any]:
    return _map.grids_geojson(OpsStore(uow).reads.open_by_grid(), town)
