"""Closure KPIs as 数字城管 defines them, by department, category or grid, for a day, week or month, with the
previous period beside it (环比).

Within a period [start, end):
- reported / filed / rejected / merged: incidents whose report, filing, rejection or merge happened in it;
- dispatched / returned / handled / reworks: work orders dispatched, returned (退回), handled (处置) and sent
  back for rework (返工) in it;
- closed (结案): incidents closed in it; closed on time (按期结案): those closed by their deadline;
- due (应结案): filed incidents whose deadline falls in the period, plus those closed in it (a case closed
  early counts as due when it closes);
- closure rate = closed / due; on-time closure rate = on time / due; rework rate = reworks / handled;
  accurate dispatch rate = (dispatched − returned) / dispatched;
- overdue open (超期未处置): work orders still owed whose deadline has passed — a snapshot at the time of the
  query, shown in the period that contains it;
- time to accept / handle (from dispatch) and to close (from report): mean and p90 in seconds.

By department, incident-level figures (reported … closed) count for the category's responsible department,
and closures for every department that worked on the incident.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel

from schemas import ORDER_ACTIVE
from schemas.reference import GAOHANG, Town

from .domain import Fact, Incident, WorkOrder

TOTAL = "all"


class Period(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


class Dimension(StrEnum):
    DEPARTMENT = "department"
    CATEGORY = "category"
    GRID = "grid"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Window:
    start: datetime
    end: datetime

    def __contains__(self, t: datetime | None) -> bool:
        return t is not None and self.start <= t < self.end


def window(period: Period, at: date) -> tuple[Window, Window]:
    """The period containing ``at`` (UTC days; weeks start on Monday) and the one before it."""

    def day(d: date) -> datetime:
        return datetime(d.year, d.month, d.day, tzinfo=UTC)

    if period is Period.DAY:
        start = day(at)
        return Window(start, start + timedelta(days=1)), Window(start - timedelta(days=1), start)
    if period is Period.WEEK:
        start = day(at - timedelta(days=at.weekday()))
        return Window(start, start + timedelta(days=7)), Window(start - timedelta(days=7), start)
    first = date(at.year, at.month, 1)
    nxt = date(at.year + (at.month == 12), at.month % 12 + 1, 1)
    prev = date(at.year - (at.month == 1), (at.month - 2) % 12 + 1, 1)
    return Window(day(first), day(nxt)), Window(day(prev), day(first))


class Stat(BaseModel):
    count: int
    mean_s: float | None
    p90_s: float | None


class Kpi(BaseModel):
    reported: int = 0
    filed: int = 0
    rejected: int = 0
    merged: int = 0
    dispatched: int = 0
    returned: int = 0
    handled: int = 0
    reworks: int = 0
    closed: int = 0
    closed_on_time: int = 0
    due: int = 0
    overdue_open: int = 0
    closure_rate: float | None = None
    on_time_rate: float | None = None
    rework_rate: float | None = None
    accurate_dispatch_rate: float | None = None
    time_to_accept: Stat | None = None
    time_to_handle: Stat | None = None
    time_to_close: Stat | None = None


class KpiRow(BaseModel):
    key: str
    name_zh: str
    name_en: str
    current: Kpi
    previous: Kpi


class KpiReport(BaseModel):
    period: Period
    by: Dimension
    start: datetime
    end: datetime
    previous_start: datetime
    previous_end: datetime
    total: KpiRow
    rows: list[KpiRow]


COUNTS = (
    "reported",
    "filed",
    "rejected",
    "merged",
    "dispatched",
    "returned",
    "handled",
    "reworks",
    "closed",
    "closed_on_time",
    "due",
    "overdue_open",
)
"""The counted figures of a :class:`Kpi`, in the order a CSV row gives them."""


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _stat(values: list[float]) -> Stat | None:
    if not values:
        return None
    ordered = sorted(values)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]  # nearest-rank
    return Stat(count=len(ordered), mean_s=round(sum(ordered) / len(ordered), 3), p90_s=round(p90, 3))


def _names(by: Dimension, key: str, town: Town) -> tuple[str, str]:
    if key == TOTAL:
        return "全镇", "Whole town"
    if by is Dimension.DEPARTMENT and key in town.departments:
        return town.departments[key].name_zh, town.departments[key].name_en
    if by is Dimension.CATEGORY and key in town.categories:
        return town.categories[key].name_zh, town.categories[key].name_en
    if by is Dimension.GRID and key in town.grids:
        return town.grids[key].name_zh, town.grids[key].name_en
    return key, key


@dataclass(frozen=True, slots=True)
class KpiRows:
    """The rows touching two adjacent periods, loaded once."""

    incidents: list[Incident]
    orders: list[WorkOrder]
    facts: list[Fact]
    """Handlings and reworks (WorkOrderHandled, IncidentReworked): each counts, not only a work order's first."""


class KpiReads(Protocol):
    def kpi_rows(self, start: datetime, end: datetime) -> KpiRows:
        """The rows with a time of theirs in [start, end], and the work still owed."""
        ...


def _incident_keys(by: Dimension, i: Incident, town: Town, *, closure: bool = False) -> list[str]:
    if by is Dimension.CATEGORY:
        return [i.category_code]
    if by is Dimension.GRID:
        return [i.grid_id or "outside"]
    if by is Dimension.DEPARTMENT:
        worked = i.departments.split()
        if closure and worked:
            return worked
        cat = town.categories.get(i.category_code)
        return [cat.lead if cat else "unassigned"]
    return [TOTAL]


def _order_key(by: Dimension, o: WorkOrder | Fact) -> str:
    if by is Dimension.CATEGORY:
        return o.category_code
    if by is Dimension.GRID:
        return o.grid_id or "outside"
    if by is Dimension.DEPARTMENT:
        return o.department_code or "unassigned"
    return TOTAL


def _compute(data: KpiRows, by: Dimension, w: Window, now: datetime, town: Town) -> dict[str, Kpi]:
    acc: dict[str, dict[str, Any]] = defaultdict(lambda: defaultdict(int))
    lists: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def bump(keys: Iterable[str], field: str) -> None:
        for k in keys:
            acc[k][field] += 1

    for i in data.incidents:
        keys = _incident_keys(by, i, town)
        if i.reported_at in w:
            bump(keys, "reported")
        if i.filed_at in w:
            bump(keys, "filed")
        if i.rejected_at in w:
            bump(keys, "rejected")
        if i.merged_at in w:
            bump(keys, "merged")
        closure_keys = _incident_keys(by, i, town, closure=True)
        closed_here = i.closed_at in w
        if closed_here:
            bump(closure_keys, "closed")
            if i.on_time:
                bump(closure_keys, "closed_on_time")
            for k in closure_keys:
                lists[k]["close"].append((i.closed_at - i.reported_at).total_seconds())  # type: ignore[operator]
        if i.filed_at is not None and (
            closed_here or (i.deadline in w and (i.closed_at is None or i.closed_at >= w.start))
        ):
            bump(closure_keys, "due")
    snapshot = now in w
    for o in data.orders:
        ok = [_order_key(by, o)]
        if o.dispatched_at in w:
            bump(ok, "dispatched")
        if o.returned_at in w:
            bump(ok, "returned")
        if o.accepted_at in w:
            lists[ok[0]]["accept"].append((o.accepted_at - o.dispatched_at).total_seconds())  # type: ignore[operator]
        if o.handled_at in w:
            lists[ok[0]]["handle"].append((o.handled_at - o.dispatched_at).total_seconds())  # type: ignore[operator]
        if snapshot and o.status in ORDER_ACTIVE and o.deadline < now:
            bump(ok, "overdue_open")
    for f in data.facts:
        if f.occurred_at in w:
            bump([_order_key(by, f)], "handled" if f.type == "WorkOrderHandled" else "reworks")

    out: dict[str, Kpi] = {}
    for key in set(acc) | set(lists):
        a, lst = acc[key], lists[key]
        out[key] = Kpi(
            **{f: a.get(f, 0) for f in COUNTS},
            closure_rate=_rate(a.get("closed", 0), a.get("due", 0)),
            on_time_rate=_rate(a.get("closed_on_time", 0), a.get("due", 0)),
            rework_rate=_rate(a.get("reworks", 0), a.get("handled", 0)),
            accurate_dispatch_rate=_rate(a.get("dispatched", 0) - a.get("returned", 0), a.get("dispatched", 0)),
            time_to_accept=_stat(lst["accept"]),
            time_to_handle=_stat(lst["handle"]),
            time_to_close=_stat(lst["close"]),
        )
    return out


def kpi_report(
    reads: KpiReads, period: Period, at: date, by: Dimension, now: datetime, town: Town = GAOHANG
) -> KpiReport:
    """The KPIs of the period containing ``at`` and of the one before it, cut ``by`` a dimension of ``town``,
    from the rows ``reads`` loads for both periods at once; ``now``: when the snapshot figures are taken."""
    current, previous = window(period, at)
    return report_of(reads.kpi_rows(previous.start, current.end), period, by, (current, previous), now, town)


def report_of(
    data: KpiRows, period: Period, by: Dimension, periods: tuple[Window, Window], now: datetime, town: Town
) -> KpiReport:
    """The KPIs of two adjacent periods (current, previous) from the rows touching them."""
    current, previous = periods
    cur, prev = _compute(data, by, current, now, town), _compute(data, by, previous, now, town)
    tot_cur = _compute(data, Dimension.NONE, current, now, town).get(TOTAL, Kpi())
    tot_prev = _compute(data, Dimension.NONE, previous, now, town).get(TOTAL, Kpi())
    keys = sorted(set(cur) | set(prev)) if by is not Dimension.NONE else []

    def row(key: str, c: Kpi, p: Kpi) -> KpiRow:
        zh, en = _names(by, key, town)
        return KpiRow(key=key, name_zh=zh, name_en=en, current=c, previous=p)

    return KpiReport(
        period=period,
        by=by,
        start=current.start,
        end=current.end,
        previous_start=previous.start,
        previous_end=previous.end,
        total=row(TOTAL, tot_cur, tot_prev),
        rows=[row(k, cur.get(k, Kpi()), prev.get(k, Kpi())) for k in keys],
    )


CSV_FIELDS = (
    *COUNTS,
    "closure_rate",
    "on_time_rate",
    "rework_rate",
    "accurate_dispatch_rate",
)


def to_csv_rows(report: KpiReport) -> list[list[str]]:
    def fmt(v: object) -> str:
        return "" if v is None else str(v)

    def stat(s: Stat | None) -> list[str]:
        return [fmt(s.mean_s), fmt(s.p90_s)] if s else ["", ""]

    header = [
        "period",
        "start",
        "key",
        "name_zh",
        "name_en",
        *CSV_FIELDS,
        "accept_mean_s",
        "accept_p90_s",
        "handle_mean_s",
        "handle_p90_s",
        "close_mean_s",
        "close_p90_s",
    ]
    out = [header]
    for r in [*report.rows, report.total]:
        for label, start, k in (("current", report.start, r.current), ("previous", report.previous_start, r.previous)):
            out.append(
                [
                    label,
                    start.isoformat(),
                    r.key,
                    r.name_zh,
                    r.name_en,
                    *(fmt(getattr(k, f)) for f in CSV_FIELDS),
                    *stat(k.time_to_accept),
                    *stat(k.time_to_handle),
                    *stat(k.time_to_close),
                ]
            )
    return out
