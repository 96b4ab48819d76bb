"""What the operations center looks at besides KPIs: backlog per department, overdue work, trend, the map."""

from __future__ import annotations

from collections import Counter
from datetime import date, datetime, timedelta
from typing import Any

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


def backlog(active: list[WorkOrder], now: datetime, town: Town) -> list[Backlog]:
    """Open and overdue work per department of the town, from the work still owed (``active``)."""
    open_, late = Counter[str](), Counter[str]()
    for o in active:
        open_[o.department_code] += 1
        if o.deadline < now:
            late[o.department_code] += 1
    return [
        Backlog(department_code=code, name_zh=d.name_zh, name_en=d.name_en, open=open_[code], overdue=late[code])
        for code, d in town.departments.items()
    ]


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


MAP_LIMIT = 2000
"""The most open incidents the map shows (the latest reported)."""


def open_incidents_geojson(incidents: list[Incident], late: list[WorkOrder], town: Town) -> dict[str, Any]:
    """GeoJSON points of the open ``incidents``, those with ``late`` work marked overdue."""
    overdue = {o.incident_id for o in late}
    features = []
    for i in incidents:
        cat = town.categories.get(i.category_code)
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [i.lon, i.lat]},
                "properties": {
                    "incident_id": i.incident_id,
                    "category_code": i.category_code,
                    "category_zh": cat.name_zh if cat else i.category_code,
                    "family": cat.family if cat else "",
                    "status": i.status,
                    "overdue": i.incident_id in overdue,
                    "escalated": i.escalated,
                    "big": i.big,
                    "grid_id": i.grid_id,
                    "reported_at": i.reported_at.isoformat(),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def grids_geojson(open_incidents: list[Incident], town: Town) -> dict[str, Any]:
    """GeoJSON polygons of the town's grid cells, each with how many of ``open_incidents`` are in it."""
    open_by_grid = Counter(i.grid_id for i in open_incidents)
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [
                        [
                            [g.west, g.south],
                            [g.east, g.south],
                            [g.east, g.north],
                            [g.west, g.north],
                            [g.west, g.south],
                        ]
                    ],
                },
                "properties": {
                    "grid_id": g.code,
                    "name_zh": g.name_zh,
                    "name_en": g.name_en,
                    "workers": list(g.workers),
                    "open": open_by_grid.get(g.code, 0),
                },
            }
            for g in town.grids.values()
        ],
    }
