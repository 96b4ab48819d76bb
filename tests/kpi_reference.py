"""The KPIs computed the slow way, as the operations center did before its rollups: every incident, work order
and handling of the two periods scanned in Python, each figure checked against its definition. Tests compare the
rollups' answers with these, on the same history and the same periods of the town's days."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from schemas import ORDER_ACTIVE, Event
from schemas import events as ev
from schemas.reference import Town
from services.opscenter.domain import TOTAL, Incident, WorkOrder
from services.opscenter.kpis import COUNTS, Dimension, Kpi, KpiReport, Stat, Window
from services.opscenter.models import OpsIncident, OpsWorkOrder


@dataclass(frozen=True, slots=True)
class Handling:
    """A 处置 or 返工, cut by its department and its incident's category and grid."""

    type: str
    occurred_at: datetime
    department_code: str | None
    category_code: str
    grid_id: str | None


@dataclass(frozen=True, slots=True)
class History:
    incidents: list[Incident]
    orders: list[WorkOrder]
    handlings: list[Handling]


def load(connection: Connection, events: Iterable[Event]) -> History:
    """The read model's rows, and the handlings and reworks among ``events`` cut as the fold cut them."""
    incidents = [_typed(Incident, dict(r)) for r in connection.execute(sa.select(OpsIncident.__table__)).mappings()]  # type: ignore[attr-defined]
    orders = [_typed(WorkOrder, dict(r)) for r in connection.execute(sa.select(OpsWorkOrder.__table__)).mappings()]  # type: ignore[attr-defined]
    by_id = {i.incident_id: i for i in incidents}
    handlings = [
        Handling(e.type, e.occurred_at, e.department_code, i.category_code, i.grid_id)
        for e in events
        if isinstance(e, ev.WorkOrderHandled | ev.IncidentReworked) and (i := by_id.get(e.incident_id)) is not None
    ]
    return History(incidents, orders, handlings)


def _typed(kind: type[Any], values: dict[str, Any]) -> Any:
    from datetime import UTC

    for name, value in values.items():
        if isinstance(value, datetime) and value.tzinfo is None:
            values[name] = value.replace(tzinfo=UTC)
    return kind(**values)


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _stat(values: list[float]) -> Stat | None:
    if not values:
        return None
    ordered = sorted(values)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]  # nearest-rank
    return Stat(count=len(ordered), mean_s=round(sum(ordered) / len(ordered), 3), p90_s=round(p90, 3))


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


def _order_key(by: Dimension, o: WorkOrder | Handling) -> str:
    if by is Dimension.CATEGORY:
        return o.category_code
    if by is Dimension.GRID:
        return o.grid_id or "outside"
    if by is Dimension.DEPARTMENT:
        return o.department_code or "unassigned"
    return TOTAL


def compute(data: History, by: Dimension, w: Window, now: datetime, town: Town) -> dict[str, Kpi]:
    """Every key's KPIs in the period ``w``, by the definitions in README ("How the KPIs are counted")."""
    acc: dict[str, dict[str, Any]] = defaultdict(lambda: defaultdict(int))
    lists: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def bump(keys: Iterable[str], field: str) -> None:
        for k in keys:
            acc[k][field] += 1

    for i in data.incidents:
        keys = _incident_keys(by, i, town)
        for when, field in ((i.reported_at, "reported"), (i.filed_at, "filed"), (i.rejected_at, "rejected")):
            if when in w:
                bump(keys, field)
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
    for f in data.handlings:
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


def differences(report: KpiReport, data: History, now: datetime, town: Town) -> list[str]:
    """Where ``report`` (from the rollups) disagrees with the scan of ``data`` over the same two periods: every
    count, rate and mean exactly (means to the millisecond), every p90 within its histogram's 2.2 %."""
    windows = (
        Window(town.local_day(report.start), town.local_day(report.end), report.start, report.end),
        Window(
            town.local_day(report.previous_start),
            town.local_day(report.previous_end),
            report.previous_start,
            report.previous_end,
        ),
    )
    problems: list[str] = []
    for side, w in zip(("current", "previous"), windows, strict=True):
        want = compute(data, report.by, w, now, town) if report.by is not Dimension.NONE else {}
        # a row holds both periods: a key of the other period only is all zeros on this side
        got = {r.key: k for r in report.rows if (k := getattr(r, side)) != Kpi() or r.key in want}
        if set(got) != set(want):
            problems.append(f"{side}: keys {sorted(set(got) ^ set(want))} on one side only")
        for key in set(got) & set(want):
            problems += _compare(f"{side}/{key}", got[key], want[key])
        total = compute(data, Dimension.NONE, w, now, town).get(TOTAL, Kpi())
        problems += _compare(f"{side}/total", getattr(report.total, side), total)
    return problems


def _compare(where: str, got: Kpi, want: Kpi) -> list[str]:
    problems = []
    for name in Kpi.model_fields:
        g, w = getattr(got, name), getattr(want, name)
        if isinstance(w, Stat) or isinstance(g, Stat):
            if (g is None) != (w is None):
                problems.append(f"{where} {name}: {g} != {w}")
            elif g is not None and w is not None:
                if (g.count, g.mean_s) != (w.count, w.mean_s) and not (
                    g.count == w.count and abs((g.mean_s or 0) - (w.mean_s or 0)) <= 0.002
                ):
                    problems.append(f"{where} {name}: {g} != {w}")
                if not _near(g.p90_s, w.p90_s):
                    problems.append(f"{where} {name}.p90: {g.p90_s} vs {w.p90_s}")
        elif g != w:
            problems.append(f"{where} {name}: {g} != {w}")
    return problems


def _near(got: float | None, want: float | None) -> bool:
    if got is None or want is None:
        return got == want
    return abs(got - want) <= 0.022 * abs(want) + 0.001
