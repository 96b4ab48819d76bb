"""What the operations center looks at besides KPIs: backlog per department, overdue work (a page at a time),
trend. The map is :mod:`._map`'s."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from pydantic import BaseModel

from schemas.reference import Town

from .domain import Incident, WorkOrder


class Backlog(BaseModel):
    department_code: str
    name_zh: str
    name_en: str
    open: int
    overdue: int


class OverdueOrder(BaseModel):
    work_order_id: str
    incident_id: str
    department_code: str
    department_zh: str
    category_code: str
    category_zh: str
    grid_id: str | None
    deadline: datetime
    overdue_s: float
    reminded: bool
    escalated: bool
    lat: float
    lon: float


class TrendPoint(BaseModel):
    date: str
    reported: int
    closed: int


def backlog(counts: Mapping[str, tuple[int, int]], town: Town) -> list[Backlog]:
    """Open and overdue work per department of the town, from the work still owed counted per department
    (``counts``: department code → (open, overdue); a department with none is absent)."""
    out = []
    for code, d in town.departments.items():
        open_, late = counts.get(code, (0, 0))
        out.append(Backlog(department_code=code, name_zh=d.name_zh, name_en=d.name_en, open=open_, overdue=late))
    return out


def overdue_orders(late: list[tuple[WorkOrder, Incident]], now: datetime, town: Town) -> list[OverdueOrder]:
    """超期未处置: the ``late`` work orders (each with its incident) as the dashboard lists them."""
    out = []
    for o, i in late:
        dept, cat = town.departments.get(o.department_code), town.categories.get(o.category_code)
        out.append(
            OverdueOrder(
                work_order_id=o.work_order_id,
                incident_id=o.incident_id,
                department_code=o.department_code,
                department_zh=dept.name_zh if dept else o.department_code,
                category_code=o.category_code,
                category_zh=cat.name_zh if cat else o.category_code,
                grid_id=o.grid_id,
                deadline=o.deadline,
                overdue_s=round((now - o.deadline).total_seconds(), 1),
                reminded=o.reminded,
                escalated=o.escalated,
                lat=i.lat,
                lon=i.lon,
            )
        )
    return out


# -- the overdue list, a page at a time ---------------------------------------------------------------------

_NOT_A_CURSOR = "not a cursor this list handed out (its X-Next-Cursor header)"


@dataclass(frozen=True, slots=True)
class OverdueAfter:
    """Where a page of the overdue list starts: after this work order, in (deadline, id) order. A keyset, not an
    offset: work that falls due or is done meanwhile moves no other work order to another page."""

    deadline: datetime
    work_order_id: str

    def token(self) -> str:
        """The opaque cursor the API hands out for this position."""
        text = f"{self.deadline.isoformat()}|{self.work_order_id}"
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def parse(cls, token: str) -> OverdueAfter:
        """The position a :meth:`token` names; ValueError if ``token`` is not one."""
        try:
            text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            deadline_text, work_order_id = text.split("|", 1)
            deadline = datetime.fromisoformat(deadline_text)
        except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors too
            raise ValueError(_NOT_A_CURSOR) from None
        if deadline.tzinfo is None or not work_order_id or cls(deadline, work_order_id).token() != token:
            raise ValueError(_NOT_A_CURSOR)
        return cls(deadline, work_order_id)


@dataclass(frozen=True, slots=True)
class OverduePage:
    """One page of the overdue list, where the next one starts (None: this is the last) and how many work orders
    are overdue in all."""

    items: list[OverdueOrder]
    next: OverdueAfter | None
    total: int


def overdue_page(
    late: list[tuple[WorkOrder, Incident]], limit: int, total: int, now: datetime, town: Town
) -> OverduePage:
    """The first ``limit`` of the ``late`` work orders as a page; the store read one more than that when another
    page follows."""
    items = overdue_orders(late[:limit], now, town)
    last = late[limit - 1][0] if len(late) > limit else None
    return OverduePage(items, OverdueAfter(last.deadline, last.work_order_id) if last else None, total)


def trend_first(today: date, days: int) -> date:
    """The first of the ``days`` days of the town ending ``today``."""
    return today - timedelta(days=days - 1)


def trend(totals: list[tuple[date, int, int]], first: date, days: int) -> list[TrendPoint]:
    """Incidents reported and closed on each of ``days`` days from ``first``, from the days' ``totals``
    (day, reported, closed); a day without a row had none."""
    by_day = {day: (reported, closed) for day, reported, closed in totals}
    points = []
    for n in range(days):
        day = first + timedelta(days=n)
        reported, closed = by_day.get(day, (0, 0))
        points.append(TrendPoint(date=day.isoformat(), reported=reported, closed=closed))
    return points


__all__ = [
    "Backlog",
    "OverdueAfter",
    "OverdueOrder",
    "OverduePage",
    "TrendPoint",
    "backlog",
    "overdue_orders",
    "overdue_page",
    "trend",
    "trend_first",
]
