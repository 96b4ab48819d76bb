"""Closure KPIs as 数字城管 defines them, by department, category or grid, for a day, week or month, with the
previous period beside it (环比).

A period is made of the town's days (midnight to midnight in its time zone; a week starts on Monday). Its figures
are sums over the fold's daily rollups (``ops_daily``, ``ops_due``, ``ops_stage``): a query costs by the days and
keys of the period, not by the incidents of all history.

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
- time to accept / handle (from dispatch) and to close (from report): count, mean and p90 in seconds, counted on
  the day the stage ended. The mean is exact; the p90 is read off a log histogram (the middle of the bucket that
  holds the nearest-rank 90th percentile): within 2.2 % of the exact one.

By department, incident-level figures (reported … closed) count for the category's responsible department,
and closures for every department that worked on the incident.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Protocol

from pydantic import BaseModel

from schemas.reference import GAOHANG, Town

from .domain import TOTAL, bucket_value


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
    """A period: the town's days [first, after), and the instants they begin and end."""

    first: date
    after: date
    start: datetime
    end: datetime

    def __contains__(self, t: datetime | None) -> bool:
        return t is not None and self.start <= t < self.end


def _days(first: date, after: date, town: Town) -> Window:
    return Window(first, after, town.midnight(first), town.midnight(after))


def window(period: Period, at: date, town: Town = GAOHANG) -> tuple[Window, Window]:
    """The period containing the town's day ``at`` (weeks start on Monday) and the one before it."""
    if period is Period.DAY:
        return _days(at, at + timedelta(days=1), town), _days(at - timedelta(days=1), at, town)
    if period is Period.WEEK:
        first = at - timedelta(days=at.weekday())
        return _days(first, first + timedelta(days=7), town), _days(first - timedelta(days=7), first, town)
    first = date(at.year, at.month, 1)
    nxt = date(at.year + (at.month == 12), at.month % 12 + 1, 1)
    prev = date(at.year - (at.month == 1), (at.month - 2) % 12 + 1, 1)
    return _days(first, nxt, town), _days(prev, first, town)


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


COUNTS = tuple(name for name, f in Kpi.model_fields.items() if f.annotation is int)
"""The counted figures of a :class:`Kpi`, in the order a CSV row gives them."""

STAGES = {"accept": "time_to_accept", "handle": "time_to_handle", "close": "time_to_close"}
"""The stages timed, and the figure each is."""


def _rate(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def p90_bucket(histogram: Mapping[int, int]) -> int:
    """The bucket of a histogram (bucket → count) that holds the nearest-rank 90th percentile of the durations it
    counts: the first bucket, in order, at which the running count reaches ⌈0.9 × total⌉ (that is, ten times the
    running count reaches nine times the total); the last bucket if none does. ``ReadModel.stage_p90`` reads the
    same bucket in SQL."""
    total = sum(histogram.values())
    seen = 0
    for b in sorted(histogram):
        seen += histogram[b]
        if 10 * seen >= 9 * total:
            return b
    return max(histogram)


def _stat(count: float, total_s: float, p90: int | None) -> Stat | None:
    """A stage's figures: its count and mean from the daily sums, its p90 from the bucket that holds it (None:
    no histogram)."""
    n = int(count)
    if n <= 0:
        return None
    return Stat(count=n, mean_s=round(total_s / n, 3), p90_s=round(bucket_value(p90), 3) if p90 is not None else None)


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


P90 = tuple[str, bool, str, int]
"""The bucket that holds a key's p90 of a stage: (key, of the current period?, stage, bucket)."""


class KpiReads(Protocol):
    """The rollups' sums a report is made of (see ``store.ReadModel``): per key of a dimension, over the days of
    the previous period [start, split) (False) and the current one [split, end) (True)."""

    def daily_sums(self, dim: str, start: date, split: date, end: date) -> list[tuple[str, bool, dict[str, float]]]:
        """The daily counters and duration sums."""
        ...

    def still_due(self, dim: str, start: date, split: date, end: date) -> list[tuple[str, bool, int]]:
        """Cases due in a period without closing in it."""
        ...

    def stage_p90(self, dim: str, span: str, previous: date, current: date) -> list[P90]:
        """The bucket of each duration histogram of the two periods (by their first days) that holds its p90 (see
        :func:`p90_bucket`): (key, current, stage, bucket); a histogram with no duration left is absent."""
        ...

    def overdue_open(self, dim: str, now: datetime) -> list[tuple[str, int]]:
        """Work still owed past its deadline at ``now``."""
        ...


Overdue = dict[tuple[bool, str], int]
"""Work still owed past its deadline now, per (of the current period?, key): shown in the period that holds now."""


def _overdue(reads: KpiReads, by: Dimension, periods: tuple[Window, Window], now: datetime) -> tuple[Overdue, Overdue]:
    """超期未处置 per key of ``by`` and for the whole town, from one count of the work owed: each work order has
    one key of each dimension, so the town's figure is the sum of its keys'. Empty unless ``now`` is in a period."""
    current, previous = periods
    side = True if now in current else False if now in previous else None
    if side is None:
        return {}, {}
    cut = {(side, key): n for key, n in reads.overdue_open(by.value, now) if n}
    total = sum(cut.values())
    return cut, ({(side, TOTAL): total} if total else {})


def _compute(
    reads: KpiReads, by: Dimension, period: Period, periods: tuple[Window, Window], overdue: Overdue
) -> dict[bool, dict[str, Kpi]]:
    """Every key's KPIs in the current period (True) and the previous one (False)."""
    current, previous = periods
    span = (by.value, previous.first, current.first, current.after)
    sums: dict[tuple[bool, str], dict[str, float]] = {}
    for key, side, figures in reads.daily_sums(*span):
        sums[(side, key)] = figures
    due: dict[tuple[bool, str], int] = {(side, key): n for key, side, n in reads.still_due(*span)}
    p90s = {
        (side, key, stage): b
        for key, side, stage, b in reads.stage_p90(by.value, period.value, previous.first, current.first)
    }
    out: dict[bool, dict[str, Kpi]] = {True: {}, False: {}}
    for side, key in sums.keys() | due.keys() | overdue.keys():
        a = sums.get((side, key), {})

        def count(name: str, a: dict[str, float] = a) -> int:
            return int(a.get(name, 0))

        if not (any(a.values()) or due.get((side, key)) or overdue.get((side, key))):
            continue  # only rows taken back (an incident that moved grid, say): nothing of this key here
        due_n = count("due_closed") + due.get((side, key), 0)
        out[side][key] = Kpi(
            **{name: count(name) for name in COUNTS if name not in ("due", "overdue_open")},
            due=due_n,
            overdue_open=overdue.get((side, key), 0),
            closure_rate=_rate(count("closed"), due_n),
            on_time_rate=_rate(count("closed_on_time"), due_n),
            rework_rate=_rate(count("reworks"), count("handled")),
            accurate_dispatch_rate=_rate(count("dispatched") - count("returned"), count("dispatched")),
            **{
                figure: _stat(a.get(stage + "_n", 0), a.get(stage + "_s", 0.0), p90s.get((side, key, stage)))
                for stage, figure in STAGES.items()
            },
        )
    return out


def kpi_report(
    reads: KpiReads, period: Period, at: date, by: Dimension, now: datetime, town: Town = GAOHANG
) -> KpiReport:
    """The KPIs of the period containing the town's day ``at`` and of the one before it, cut ``by`` a dimension
    of ``town``, from the rollups ``reads`` sums; ``now``: when the snapshot figures are taken."""
    current, previous = window(period, at, town)
    periods = (current, previous)
    overdue_cut, overdue_total = _overdue(reads, by, periods, now)
    none: dict[bool, dict[str, Kpi]] = {True: {}, False: {}}
    cut = _compute(reads, by, period, periods, overdue_cut) if by is not Dimension.NONE else none
    total = _compute(reads, Dimension.NONE, period, periods, overdue_total)
    cur, prev = cut[True], cut[False]
    keys = sorted(cur.keys() | prev.keys())

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
        total=row(TOTAL, total[True].get(TOTAL, Kpi()), total[False].get(TOTAL, Kpi())),
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
