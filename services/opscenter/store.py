"""The only door to the operations center's tables.

- :class:`OpsStore` is the fold's: typed rows through the unit of work (read once per batch by :meth:`preload`,
  changed in place, written at the commit), the rollups kept beside them (added to at the commit, from the rows
  the unit changed), and the parked events.
- :class:`ReadModel` answers the KPIs and the dashboard: sums over the rollups' days, and bounded selects of
  the work still open, their rows handed out as the domain's typed rows (timestamps UTC-aware).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, SQLModel, col, select

from schemas import INCIDENT_FINAL, ORDER_ACTIVE, Event, IncidentStatus, decode_event, encode_event
from schemas import events as ev
from schemas.reference import Town
from services.common.db import SHARED_TABLES, Rows, UnitOfWork, create_tables, insert_adding

from ._map import Box, Cluster, Extent
from .domain import COUNTED, FLOOR, PER_EVENT, SPANS, SUMMED, Incident, Tally, WorkOrder, first_day
from .kpis import P90, p90_bucket
from .models import OPS_DAILY, TABLES, OpsDue, OpsIncident, OpsLogPosition, OpsParked, OpsStage, OpsWorkOrder

INCIDENTS = Rows(OpsIncident, Incident)
ORDERS = Rows(OpsWorkOrder, WorkOrder)

_TALLY = "opscenter.tally"
"""In the unit's info: the rollups' additions of this unit (see :meth:`OpsStore.tally`)."""
_ROWS_LATER = "opscenter.rows_rolled_up_later"
"""In the unit's info: the rows' shares of the rollups are left to :func:`settle_rollups`."""
_MAY_BE_PARKED = "opscenter.may_be_parked"
"""In the unit's info: False once a batch's preload found no parked event it could release (the usual case),
so the fold skips looking; parking one sets it again."""


class OpsStore:
    """The fold's rows, in one unit of work."""

    __slots__ = ("uow",)

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow = uow

    def preload(self, events: Sequence[Event]) -> None:
        """A batch's incidents and work orders read in two queries rather than two per event, and whether any
        parked event waits for one of them."""
        uow = self.uow
        incident_ids = {e.incident_id for e in events}
        order_ids = {w for e in events if (w := getattr(e, "work_order_id", None))}
        uow.fetch(INCIDENTS, incident_ids)
        uow.fetch(ORDERS, order_ids)
        # a closure closes the incident's handled work orders: all of them, read at once
        uow.fetch_by(ORDERS, "incident_id", (e.incident_id for e in events if isinstance(e, ev.IncidentClosed)))
        p = OpsParked.__table__.c  # type: ignore[attr-defined]
        waits = sa.or_(p.incident_id.in_(incident_ids), p.work_order_id.in_(order_ids))
        waiting = uow.connection.execute(sa.select(p.event_id).where(waits).limit(1)).first()
        uow.info[_MAY_BE_PARKED] = waiting is not None

    def incident(self, incident_id: str) -> Incident | None:
        return self.uow.record(INCIDENTS, incident_id)

    def work_order(self, work_order_id: str | None) -> WorkOrder | None:
        """The work order named, if any and known."""
        return self.uow.record(ORDERS, work_order_id) if work_order_id else None

    def orders_of(self, incident_id: str) -> list[WorkOrder]:
        return self.uow.records_by(ORDERS, "incident_id", incident_id)

    def add(self, row: Incident | WorkOrder) -> None:
        """A new incident or work order, written at the commit (with its changes until then)."""
        if isinstance(row, Incident):
            self.uow.add(INCIDENTS, row)
        else:
            self.uow.add(ORDERS, row)

    # -- the rollups: added to at the commit ---------------------------------------------------------------

    def tally(self, town: Town) -> Tally:
        """This unit's additions to the rollups. At each commit, the incidents and work orders the unit changed
        take their old share back and add their new one, and the lot is added to the rollup tables."""
        uow = self.uow
        tally: Tally | None = uow.info.get(_TALLY)
        if tally is None:
            tally = uow.info[_TALLY] = Tally(town)
            uow.before_commit(lambda: self._roll_up(tally))
        return tally

    def roll_up_rows_later(self) -> None:
        """Leave the rows' shares of the rollups out of this unit's commits: only what events add by themselves
        (:data:`~.domain.PER_EVENT`) is added. For a rebuild's catching up, whose rows change batch after batch:
        :func:`settle_rollups` then works the rows' shares out once, from the rows as they end."""
        self.uow.info[_ROWS_LATER] = True

    def _roll_up(self, tally: Tally) -> None:
        uow = self.uow
        if not uow.info.get(_ROWS_LATER):
            for before, incident in uow.changed(INCIDENTS):
                if before is not None:
                    tally.incident(before, -1)
                tally.incident(incident)
            for was, order in uow.changed(ORDERS):
                if was is not None:
                    tally.order(was, -1)
                tally.order(order)
        _add_tally(uow.connection, tally)

    # -- parked events: ahead of their report or dispatch -------------------------------------------------

    def park(self, event: Event) -> None:
        """Keep ``event`` whole until what it waits for is folded (once: a redelivered copy is kept once)."""
        self.uow.info[_MAY_BE_PARKED] = True
        s = self.uow.session
        if s.get(OpsParked, event.event_id) is None:
            s.add(
                OpsParked(
                    event_id=event.event_id,
                    incident_id=event.incident_id,
                    work_order_id=getattr(event, "work_order_id", None),
                    occurred_at=event.occurred_at,
                    payload=encode_event(event),
                )
            )

    def waiting_on(self, column: str, key: str) -> list[str]:
        """The ids of the parked events whose ``column`` (incident_id, work_order_id) holds ``key``, oldest
        first (none without asking, when the batch's preload found none could be waiting)."""
        if not self.uow.info.get(_MAY_BE_PARKED, True):
            return []
        condition = getattr(OpsParked, column) == key
        s = self.uow.session
        return list(s.exec(select(OpsParked.event_id).where(condition).order_by(col(OpsParked.occurred_at))))

    def unpark(self, event_id: str) -> Event | None:
        """The parked event, no longer parked; None if it was folded meanwhile (by an event folded before it)."""
        s = self.uow.session
        parked = s.get(OpsParked, event_id)
        if parked is None:
            return None
        s.delete(parked)
        s.flush()
        return decode_event(parked.payload)

    @property
    def reads(self) -> ReadModel:
        """The read model's queries, in this unit's transaction."""
        return ReadModel(self.uow.connection)

    # -- how far a rebuild got in the log -----------------------------------------------------------------

    def save_positions(self, topic: str, positions: Mapping[int, int]) -> None:
        """Record, in this unit's transaction, the next offset to read of each partition of ``topic``."""
        connection, now = self.uow.connection, self.uow.now()
        rows = [{"topic": topic, "partition": p, "next_offset": o, "updated_at": now} for p, o in positions.items()]
        connection.execute(_upsert_position(connection.dialect.name), rows)

    def forget_positions(self) -> None:
        """Forget every position recorded (the database becomes the live one: its consumer group's offsets rule)."""
        self.uow.connection.execute(sa.delete(_POSITION))


# -- the rollups: written from a tally, or worked out again from the rows ---------------------------------


def _add_tally(connection: Connection, tally: Tally, spans: Sequence[str] = SPANS) -> None:
    """Add ``tally`` to the rollup tables (one upsert statement per table), and empty it; its stage histograms
    for each of ``spans``."""
    if not tally:
        return
    day = _day_param(connection.dialect.name)
    daily = [
        (
            dim,
            day(when),
            key,
            *(int(counters.get(c, 0)) for c in COUNTED),
            *(counters.get(c, 0.0) for c in SUMMED),
        )
        for (when, dim, key), counters in tally.daily.items()
        if any(counters.values())
    ]
    due = [(dim, day(deadline), day(closed), key, n) for (deadline, closed, dim, key), n in tally.due.items() if n]
    histograms: Counter[tuple[str, str, date, str, str, int]] = Counter()
    for (when, dim, key, stage, b), n in tally.stages.items():
        if n:
            for span in spans:
                histograms[(dim, span, first_day(span, when), key, stage, b)] += n
    stages = [
        (dim, span, day(first), key, stage, b, n) for (dim, span, first, key, stage, b), n in histograms.items() if n
    ]
    for table, columns, rows in (
        (_DAILY, _DAILY_COLUMNS, daily),
        (_DUE, _DUE_COLUMNS, due),
        (_STAGE, _STAGE_COLUMNS, stages),
    ):
        _add_rows(connection, table, columns, rows)
    tally.daily.clear()
    tally.due.clear()
    tally.stages.clear()


_DAILY_COLUMNS = ("dim", "day", "key", *COUNTED, *SUMMED)
_DUE_COLUMNS = ("dim", "deadline_day", "closed_day", "key", "n")
_STAGE_COLUMNS = ("dim", "span", "first", "key", "stage", "bucket", "n")


def _add_rows(connection: Connection, table: sa.Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    """Add ``rows`` (values of ``columns``, the key's first) to ``table``'s rows of the same key, or insert them. On
    SQLite straight through the driver (SQLAlchemy's handling of each row's parameters costs more than SQLite's
    upsert itself), the days already written as SQLite's DATE holds them (:func:`_day_param`)."""
    if not rows:
        return
    dialect = connection.dialect.name
    if dialect == "sqlite":
        connection.exec_driver_sql(_sqlite_adding(table, columns), rows)
    else:
        connection.execute(insert_adding(table, dialect), [dict(zip(columns, row, strict=True)) for row in rows])


@functools.cache
def _sqlite_adding(table: sa.Table, columns: tuple[str, ...]) -> str:
    """:func:`~services.common.db.insert_adding` for SQLite, as the text of one statement of ``columns``."""
    from sqlalchemy.dialects import sqlite

    quote = sqlite.dialect().identifier_preparer.quote
    keys = [c.name for c in table.primary_key.columns]
    added = ", ".join(f"{quote(c)} = {quote(c)} + excluded.{quote(c)}" for c in columns if c not in keys)
    return (
        f"INSERT INTO {quote(table.name)} ({', '.join(map(quote, columns))}) VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT ({', '.join(map(quote, keys))}) DO UPDATE SET {added}"
    )


def _day_param(dialect: str) -> Callable[[date], Any]:
    """How a day is handed to the driver: on SQLite as the text SQLAlchemy's DATE writes (``YYYY-MM-DD``), each
    day's once; elsewhere as it is."""
    if dialect != "sqlite":
        return lambda day: day
    texts: dict[date, str] = {}

    def text(day: date) -> str:
        out = texts.get(day)
        if out is None:
            out = texts[day] = day.isoformat()
        return out

    return text


_FROM_ROWS = tuple(c for c in (*COUNTED, *SUMMED) if c not in PER_EVENT)
"""The daily figures that follow the rows (all but those folded event by event)."""


def settle_rollups(engine: Engine, town: Town, *, chunk: int = 20_000) -> None:
    """Work the rows' shares of the rollups out again, from every incident and work order as it stands, in one
    transaction: the figures that follow the rows are set to nothing (``ops_due`` and ``ops_stage`` wholly, the
    daily counters but those folded event by event), each row adds its share (``chunk`` rows at a time, in the
    order of their ids), and the daily rows left with nothing are dropped. What a fold that rolled up row by row
    holds, since a row's share is a function of the row alone (:class:`~.domain.Tally`); what a rebuild that
    left the rows' shares for later (:meth:`OpsStore.roll_up_rows_later`) needs once it has caught up. Safe to
    run again: it starts from the rows each time."""
    d = _DAILY.c
    with engine.begin() as connection:
        connection.execute(sa.update(_DAILY).values(dict.fromkeys(_FROM_ROWS, 0)))
        connection.execute(sa.delete(_DUE))
        connection.execute(sa.delete(_STAGE))
        for rows in _pages(connection, _INCIDENT, chunk):
            tally = Tally(town)
            for values in rows:
                tally.incident(_typed(Incident, _INCIDENT, values))
            _add_tally(connection, tally, ("day",))
        for rows in _pages(connection, _ORDER, chunk):
            tally = Tally(town)
            for values in rows:
                tally.order(_typed(WorkOrder, _ORDER, values))
            _add_tally(connection, tally, ("day",))
        _stages_of_longer_spans(connection)
        connection.execute(sa.delete(_DAILY).where(*(d[c] == 0 for c in (*COUNTED, *SUMMED))))


def _stages_of_longer_spans(connection: Connection) -> None:
    """The week's and the month's stage histograms, summed in SQL from their days' (written already)."""
    s = _STAGE.c
    for span in SPANS:
        if span == "day":
            continue
        first = _first_day_sql(span, s.first, connection.dialect.name)
        summed = (
            sa.select(s.dim, sa.literal(span), first, s.key, s.stage, s.bucket, sa.func.sum(s.n))
            .where(s.span == "day")
            .group_by(s.dim, first, s.key, s.stage, s.bucket)
        )
        connection.execute(sa.insert(_STAGE).from_select(list(_STAGE_COLUMNS), summed))


def _first_day_sql(span: str, day: Any, dialect: str) -> Any:
    """:func:`~.domain.first_day` in SQL: the Monday of a week, the first of a month (no bound parameter: the
    same expression is selected and grouped by)."""
    if dialect == "sqlite":
        shift = ("'-6 days'", "'weekday 1'") if span == "week" else ("'start of month'",)
        return sa.func.date(day, *(sa.literal_column(m) for m in shift), type_=sa.Date)
    return sa.cast(sa.func.date_trunc(sa.literal_column(f"'{span}'"), day), sa.Date)


def _pages(connection: Connection, table: sa.Table, size: int) -> Iterator[list[dict[str, Any]]]:
    """Every row of ``table``, ``size`` at a time in the order of its key (each page read whole: the connection
    is free to write between them)."""
    (key,) = table.primary_key.columns
    last: Any = None
    while True:
        page = sa.select(table).order_by(key).limit(size)
        if last is not None:
            page = page.where(key > last)
        rows = [dict(row) for row in connection.execute(page).mappings()]
        if not rows:
            return
        last = rows[-1][key.name]
        yield rows


# -- the read side --------------------------------------------------------------------------------------

Db = Connection | Session
"""What the read model is read through: a connection of its database, or a session of one."""

K = TypeVar("K")

_INCIDENT: sa.Table = OpsIncident.__table__  # type: ignore[attr-defined]
_ORDER: sa.Table = OpsWorkOrder.__table__  # type: ignore[attr-defined]
_DAILY = OPS_DAILY
_DUE: sa.Table = OpsDue.__table__  # type: ignore[attr-defined]
_STAGE: sa.Table = OpsStage.__table__  # type: ignore[attr-defined]


def _datetimes(table: sa.Table) -> tuple[str, ...]:
    return tuple(c.name for c in table.columns if isinstance(c.type, sa.DateTime))


_AWARE = {t: _datetimes(t) for t in (_INCIDENT, _ORDER)}
_INCIDENT_OPEN = tuple(sorted(s.value for s in IncidentStatus if s not in INCIDENT_FINAL))
"""The statuses of an incident still open, named one by one: an index finds them, where ``NOT IN`` the final
ones would read every incident ever closed."""

Sums = dict[str, float]
"""A key's sums of the daily counters (:data:`~.domain.COUNTED`, :data:`~.domain.SUMMED`) over some days."""


def _typed(kind: type[K], table: sa.Table, values: dict[str, Any]) -> K:
    """A row as the domain's ``kind``, its timestamps UTC (SQLite hands them back naive)."""
    for name in _AWARE[table]:
        if (value := values[name]) is not None and value.tzinfo is None:
            values[name] = value.replace(tzinfo=UTC)
    return kind(**values)


class ReadModel:
    """The queries of the KPIs and the dashboard (the read side: nothing here changes a row)."""

    __slots__ = ("db",)

    def __init__(self, db: Db) -> None:
        self.db = db

    def _all(self, kind: type[K], table: sa.Table, statement: Any) -> list[K]:
        return [_typed(kind, table, dict(row)) for row in self.db.execute(statement).mappings()]

    def _incidents(self, statement: Any) -> list[Incident]:
        return self._all(Incident, _INCIDENT, statement)

    def _orders(self, statement: Any) -> list[WorkOrder]:
        return self._all(WorkOrder, _ORDER, statement)

    # -- the KPIs: sums over the rollups' days of two adjacent periods [start, split) and [split, end)

    def daily_sums(self, dim: str, start: date, split: date, end: date) -> list[tuple[str, bool, Sums]]:
        """Each key's counters summed over the days of the previous period (False) and the current one (True)."""
        d = _DAILY.c
        current = (d.day >= split).label("current")
        figures = [sa.func.sum(d[c]).label(c) for c in (*COUNTED, *SUMMED)]
        statement = (
            sa.select(d.key, current, *figures)
            .where(d.dim == dim, d.day >= start, d.day < end)
            .group_by(d.key, current)
        )
        return [
            (row[0], bool(row[1]), dict(zip((*COUNTED, *SUMMED), row[2:], strict=True)))
            for row in self._rows(statement)
        ]

    def still_due(self, dim: str, start: date, split: date, end: date) -> list[tuple[str, bool, int]]:
        """Each key's filed cases whose deadline day is in a period and that did not close in it or before (open
        or closed after the period's end): due (应结案) there without closing there."""
        u = _DUE.c
        current = (u.deadline_day >= split).label("current")
        after = sa.or_(
            sa.and_(u.deadline_day >= split, u.closed_day >= end),
            sa.and_(u.deadline_day < split, u.closed_day >= split),
        )
        statement = (
            sa.select(u.key, current, sa.func.sum(u.n))
            .where(u.dim == dim, u.deadline_day >= start, u.deadline_day < end, after)
            .group_by(u.key, current)
        )
        return [(row[0], bool(row[1]), int(row[2])) for row in self._rows(statement)]

    def stage_p90(self, dim: str, span: str, previous: date, current: date) -> list[P90]:
        """The bucket holding the p90 of each key's duration histogram (per stage) of the ``span`` starting on
        ``previous`` (False) and the one starting on ``current`` (True), as :func:`.kpis.p90_bucket` reads it, in
        two steps: each histogram's counts summed per group of :data:`_COARSE` consecutive buckets (in SQL), the
        group where the running count reaches nine tenths of the total, then that group's own buckets only. A
        period's histograms are one range of the primary key; some rows per histogram come back, not every
        bucket. (A histogram with a bucket below zero, which a fold never leaves, is read whole.)"""
        g = _STAGE.c
        coarse = ((g.bucket - _LOWEST) // _COARSE).label("coarse")  # of a whole number from 0: the same everywhere
        statement = (
            sa.select(g.first, g.key, g.stage, coarse, sa.func.sum(g.n), sa.func.min(g.n))
            .where(g.dim == dim, g.span == span, g.first.in_((previous, current)), g.n != 0)
            .group_by(g.first, g.key, g.stage, coarse)
        )
        groups: dict[tuple[Any, str, str], list[tuple[int, int]]] = {}
        whole: set[tuple[Any, str, str]] = set()
        for first, key, stage, c, n, least in self.db.execute(statement):
            groups.setdefault((first, key, stage), []).append((int(c), int(n)))
            if least < 0:
                whole.add((first, key, stage))
        wanted: dict[tuple[Any, str, str], tuple[int, int]] = {}  # (the group, the count before it)
        for histogram, sums in groups.items():
            if histogram in whole:
                wanted[histogram] = (0, 0)
                continue
            sums.sort()
            total, seen, group = sum(n for _, n in sums), 0, sums[-1][0]
            for c, n in sums:
                if 10 * (seen + n) >= 9 * total:
                    group = c
                    break
                seen += n
            wanted[histogram] = (group, seen)
        if not wanted:
            return []
        fine: dict[tuple[Any, str, str], dict[int, int]] = {}
        for histogram, (c, _) in wanted.items():
            first, key, stage = histogram
            low, high = _bucket_range(c, histogram in whole)
            bounds = {"dim": dim, "span": span, "first": first, "key": key, "stage": stage, "low": low, "high": high}
            fine[histogram] = {int(b): int(n) for b, n in self.db.execute(_FINE_BUCKETS, bounds)}
        out: list[P90] = []
        for histogram, (_, before) in wanted.items():
            first, key, stage = histogram
            total = sum(n for _, n in groups[histogram])
            buckets = fine.get(histogram, {})
            if histogram in whole:
                b = p90_bucket(buckets)
            else:
                b, seen = max(buckets), before
                for fb in sorted(buckets):
                    seen += buckets[fb]
                    if 10 * seen >= 9 * total:
                        b = fb
                        break
            out.append((key, _as_date(first) == current, stage, b))
        return out

    def overdue_open(self, dim: str, now: datetime) -> list[tuple[str, int]]:
        """Work still owed past its deadline at ``now`` (超期未处置), counted per key of ``dim``."""
        o = _ORDER.c
        key = {
            "department": sa.func.coalesce(o.department_code, "unassigned"),
            "category": o.category_code,
            "grid": sa.func.coalesce(o.grid_id, "outside"),
        }.get(dim, sa.literal("all"))
        statement = sa.select(key, sa.func.count()).where(o.status.in_(ORDER_ACTIVE), o.deadline < now).group_by(key)
        return [(row[0], int(row[1])) for row in self._rows(statement)]

    def daily_totals(self, start: date, end: date) -> list[tuple[date, int, int]]:
        """The whole town's incidents reported and closed per day in [start, end)."""
        d = _DAILY.c
        statement = (
            sa.select(d.day, sa.func.sum(d.reported), sa.func.sum(d.closed))
            .where(d.dim == "none", d.day >= start, d.day < end)
            .group_by(d.day)
        )
        return [(_as_date(row[0]), int(row[1]), int(row[2])) for row in self._rows(statement)]

    def _rows(self, statement: Any) -> list[Any]:
        return list(self.db.execute(statement))

    # -- the dashboard's lists: the work still owed and the open incidents, through the indexes that hold them;
    #    what they cost follows the backlog, not the history

    def backlog(self, now: datetime) -> dict[str, tuple[int, int]]:
        """Work still owed (ORDER_ACTIVE) per department: (open, past its deadline at ``now``), counted in SQL."""
        o = _ORDER.c
        late = sa.func.sum(sa.case((o.deadline < now, 1), else_=0))
        statement = (
            sa.select(o.department_code, sa.func.count(), late)
            .where(o.status.in_(ORDER_ACTIVE))
            .group_by(o.department_code)
        )
        return {code: (int(n), int(k or 0)) for code, n, k in self.db.execute(statement)}

    def overdue_count(self, now: datetime) -> int:
        """How many work orders still owed are past their deadline at ``now``."""
        o = _ORDER.c
        statement = sa.select(sa.func.count()).select_from(_ORDER).where(o.status.in_(ORDER_ACTIVE), o.deadline < now)
        return int(self.db.execute(statement).scalar_one())

    def overdue_orders(
        self, now: datetime, limit: int, after: tuple[datetime, str] | None = None
    ) -> list[tuple[WorkOrder, Incident]]:
        """Work still owed past its deadline, most overdue first (then by id), with its incident: at most
        ``limit``, those after the (deadline, work order id) ``after`` if given.

        Each status owed is read in deadline order from its part of the index, ``limit`` at most, from ``after``
        on (a row-value seek): a page costs its size, not the backlog before it nor the backlog's."""
        o = _ORDER.c
        per_status = []
        for status in ORDER_ACTIVE:
            one = sa.select(o.work_order_id, o.deadline).where(o.status == status, o.deadline < now)
            if after is not None:
                one = one.where(sa.tuple_(o.deadline, o.work_order_id) > sa.tuple_(*after))
            per_status.append(sa.select(one.order_by(o.deadline, o.work_order_id).limit(limit).subquery()))
        owed = sa.union_all(*per_status).subquery()
        page = sa.select(owed).order_by(owed.c.deadline, owed.c.work_order_id).limit(limit).subquery()
        statement = (
            sa.select(_ORDER, _INCIDENT)
            .select_from(page)
            .join(_ORDER, o.work_order_id == page.c.work_order_id)
            .join(_INCIDENT, _INCIDENT.c.incident_id == o.incident_id)
            .order_by(page.c.deadline, page.c.work_order_id)
        )
        n = len(_ORDER.columns)
        order_names, incident_names = _ORDER.columns.keys(), _INCIDENT.columns.keys()
        out = []
        for row in self.db.execute(statement):
            values = tuple(row)
            out.append(
                (
                    _typed(WorkOrder, _ORDER, dict(zip(order_names, values[:n], strict=True))),
                    _typed(Incident, _INCIDENT, dict(zip(incident_names, values[n:], strict=True))),
                )
            )
        return out

    def open_extent(self, box: Box | None) -> Extent:
        """How many incidents are open in ``box`` (everywhere: None), and the box around them."""
        i = _INCIDENT.c
        statement = sa.select(
            sa.func.count(), sa.func.min(i.lon), sa.func.min(i.lat), sa.func.max(i.lon), sa.func.max(i.lat)
        ).where(*_open_in(box))
        count, west, south, east, north = self.db.execute(statement).one()
        return Extent(int(count), Box(west, south, east, north) if count else None)

    def open_incidents(self, box: Box | None, limit: int) -> list[Incident]:
        """The incidents open in ``box`` (everywhere: None), the latest reported first, at most ``limit``."""
        i = _INCIDENT.c
        statement = (
            sa.select(_INCIDENT).where(*_open_in(box)).order_by(i.reported_at.desc(), i.incident_id).limit(limit)
        )
        return self._incidents(statement)

    def overdue_among(self, incident_ids: Iterable[str], now: datetime) -> set[str]:
        """Those of ``incident_ids`` with work still owed past its deadline at ``now``."""
        ids = sorted(set(incident_ids))
        if not ids:
            return set()
        o = _ORDER.c
        statement = sa.select(o.incident_id).where(o.incident_id.in_(ids), o.status.in_(ORDER_ACTIVE), o.deadline < now)
        return set(self.db.execute(statement).scalars())

    def open_clusters(self, box: Box | None, cell: float, now: datetime) -> list[Cluster]:
        """The incidents open in ``box`` counted per cell of side ``cell`` degrees (from -90, -180), in SQL: how
        many, how many escalated, big and with work past its deadline at ``now``, and their centroid. One pass
        over the open incidents' index, each looked up in the set of incidents with late work (read once from the
        work orders' index)."""
        i, o = _INCIDENT.c, _ORDER.c
        late = sa.select(o.incident_id).where(o.status.in_(ORDER_ACTIVE), o.deadline < now)
        cells = sa.select(
            sa.func.floor((i.lat + 90) / cell).label("row"),
            sa.func.floor((i.lon + 180) / cell).label("col"),
            i.lat,
            i.lon,
            sa.case((i.escalated, 1), else_=0).label("escalated"),
            sa.case((i.big, 1), else_=0).label("big"),
            sa.case((i.incident_id.in_(late), 1), else_=0).label("overdue"),
        ).where(*_open_in(box))
        c = cells.subquery().c
        statement = sa.select(
            c.row,
            c.col,
            sa.func.count(),
            sa.func.sum(c.escalated),
            sa.func.sum(c.big),
            sa.func.sum(c.overdue),
            sa.func.avg(c.lat),
            sa.func.avg(c.lon),
        ).group_by(c.row, c.col)
        return [
            Cluster(
                row=int(r),
                col=int(k),
                count=int(n),
                escalated=int(esc),
                big=int(big),
                overdue=int(late_),
                lat=float(lat),
                lon=float(lon),
            )
            for r, k, n, esc, big, late_, lat, lon in self.db.execute(statement)
        ]

    def open_by_grid(self) -> dict[str | None, int]:
        """How many incidents are open in each grid cell (None: outside every one), counted in SQL."""
        i = _INCIDENT.c
        statement = sa.select(i.grid_id, sa.func.count()).where(*_open_in(None)).group_by(i.grid_id)
        return {grid: int(n) for grid, n in self.db.execute(statement)}


_COARSE = 16
"""Buckets in a group of the p90's first step (a doubling of the duration, at ``domain.GAMMA`` = 2^(1/16))."""
_LOWEST = 16 * (FLOOR // 16)
"""Where the first group starts: at or below every bucket (``domain.FLOOR``, a millisecond or less), so that the
groups are the buckets' distance from it divided by :data:`_COARSE`, a whole number from 0 that every database
divides alike."""


def _bucket_range(group: int, whole: bool) -> tuple[int, int]:
    """The lowest and highest buckets in ``group`` (see :meth:`ReadModel.stage_p90`); every bucket for a histogram
    read whole."""
    if whole:
        return -(2**31), 2**31 - 1
    low = _LOWEST + group * _COARSE
    return low, low + _COARSE - 1


def _fine_buckets() -> Any:
    """One histogram's buckets from ``low`` to ``high`` with their counts: a range of the primary key (the
    statement is the same for every histogram, compiled once)."""
    g = _STAGE.c
    return sa.select(g.bucket, g.n).where(
        g.dim == sa.bindparam("dim"),
        g.span == sa.bindparam("span"),
        g.first == sa.bindparam("first"),
        g.key == sa.bindparam("key"),
        g.stage == sa.bindparam("stage"),
        g.bucket.between(sa.bindparam("low"), sa.bindparam("high")),
        g.n != 0,
    )


_FINE_BUCKETS = _fine_buckets()


def _open_in(box: Box | None) -> list[Any]:
    """The conditions of an incident open (through the status index: a few statuses of many) in ``box``."""
    i = _INCIDENT.c
    conditions: list[Any] = [i.status.in_(_INCIDENT_OPEN)]
    if box is not None:
        conditions += [i.lat.between(box.south, box.north), i.lon.between(box.west, box.east)]
    return conditions


def _as_date(value: Any) -> date:
    """A DATE column's value (SQLite's driver may hand back the ISO text of a grouped day)."""
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def fresh_read_model(engine: Engine, tables: Iterable[sa.Table] = TABLES) -> None:
    """Drop the read model's tables (and the shared ones) at ``engine`` and make them again, empty."""
    SQLModel.metadata.drop_all(engine, tables=[*SHARED_TABLES, *tables])
    create_tables(engine, tuple(tables))


# -- the rebuild's bookkeeping ------------------------------------------------------------------------------

_POSITION: sa.Table = OpsLogPosition.__table__  # type: ignore[attr-defined]


@functools.cache
def _upsert_position(dialect: str) -> Any:
    """Insert a partition's position, or move the one recorded (built once per dialect)."""
    from sqlalchemy.dialects import postgresql, sqlite

    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(_POSITION)
    moved = {"next_offset": statement.excluded.next_offset, "updated_at": statement.excluded.updated_at}
    return statement.on_conflict_do_update(index_elements=["topic", "partition"], set_=moved)


def log_positions(engine: Engine) -> dict[str, dict[int, int]]:
    """Topic → partition → the next offset to read, as a rebuild into ``engine``'s database recorded them (empty:
    none recorded, or no table for them)."""
    if not sa.inspect(engine).has_table(_POSITION.name):
        return {}
    out: dict[str, dict[int, int]] = {}
    with engine.connect() as connection:
        p = _POSITION.c
        for topic, partition, offset in connection.execute(sa.select(p.topic, p.partition, p.next_offset)):
            out.setdefault(topic, {})[int(partition)] = int(offset)
    return out


def holds_read_model(engine: Engine, tables: Iterable[sa.Table] = TABLES) -> bool:
    """Whether ``engine``'s database holds a row of the read model (the rebuild's bookkeeping aside)."""
    inspector = sa.inspect(engine)
    present = [t for t in tables if t is not _POSITION and inspector.has_table(t.name)]
    with engine.connect() as connection:
        return any(connection.execute(sa.select(sa.literal(1)).select_from(t).limit(1)).first() for t in present)


_FOLD_LOOKS_UP = frozenset(
    {(_ORDER.name, "incident_id"), ("ops_parked", "incident_id"), ("ops_parked", "work_order_id")}
)
"""The columns besides the keys that the fold finds rows by: a closure's work orders by their incident, parked
events by what they wait for."""


def drop_read_indexes(engine: Engine, tables: Iterable[sa.Table] = TABLES) -> None:
    """Drop the indexes of the read model that only its reads use (the fold finds its rows by key, and by
    :data:`_FOLD_LOOKS_UP`): a rebuild catching up then writes its rows without keeping them, and
    :func:`prepare_read_model` makes them again, each in one pass over its table."""
    for table in tables:
        for index in table.indexes:
            columns = [c.name for c in index.columns]
            if len(columns) == 1 and (table.name, columns[0]) in _FOLD_LOOKS_UP:
                continue
            index.drop(engine, checkfirst=True)


def prepare_read_model(engine: Engine, tables: Iterable[sa.Table] = TABLES) -> None:
    """Make the read model's tables that ``engine``'s database lacks (those there are kept as they are)."""
    create_tables(engine, tuple(tables))


__all__ = [
    "INCIDENTS",
    "ORDERS",
    "Db",
    "OpsStore",
    "ReadModel",
    "drop_read_indexes",
    "fresh_read_model",
    "holds_read_model",
    "log_positions",
    "prepare_read_model",
    "settle_rollups",
]
