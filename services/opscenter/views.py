"""What the operations center looks at besides KPIs: backlog per department, overdue work, trend, the map."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlmodel import Session, col, select

from schemas.reference import CATEGORIES, DEPARTMENTS, GRIDS
from services.common.db import as_utc

from .kpis import ACTIVE_ORDER
from .models import OpsIncident, OpsWorkOrder

_TERMINAL = ("closed", "rejected", "merged")


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


def backlog(session: Session, now: datetime) -> list[Backlog]:
    rows = session.exec(select(OpsWorkOrder).where(col(OpsWorkOrder.status).in_(ACTIVE_ORDER))).all()
    open_, late = Counter[str](), Counter[str]()
    for o in rows:
        open_[o.department_code] += 1
        if as_utc(o.deadline) < now:
            late[o.department_code] += 1
    return [
        Backlog(department_code=code, name_zh=d.name_zh, name_en=d.name_en, open=open_[code], overdue=late[code])
        for code, d in DEPARTMENTS.items()
    ]


def overdue_orders(session: Session, now: datetime, limit: int = 200) -> list[OverdueOrder]:
    rows = session.exec(
        select(OpsWorkOrder, OpsIncident)
        .join(OpsIncident, col(OpsIncident.incident_id) == col(OpsWorkOrder.incident_id))
        .where(col(OpsWorkOrder.status).in_(ACTIVE_ORDER), col(OpsWorkOrder.deadline) < now)
        .order_by(col(OpsWorkOrder.deadline))
        .limit(limit)
    ).all()
    out = []
    for o, i in rows:
        dept, cat = DEPARTMENTS.get(o.department_code), CATEGORIES.get(o.category_code)
        out.append(
            OverdueOrder(
                work_order_id=o.work_order_id,
                incident_id=o.incident_id,
                department_code=o.department_code,
                department_zh=dept.name_zh if dept else o.department_code,
                category_code=o.category_code,
                category_zh=cat.name_zh if cat else o.category_code,
                grid_id=o.grid_id,
                deadline=as_utc(o.deadline),
                overdue_s=round((now - as_utc(o.deadline)).total_seconds(), 1),
                reminded=o.reminded,
                escalated=o.escalated,
                lat=i.lat,
                lon=i.lon,
            )
        )
    return out


def trend(session: Session, now: datetime, days: int) -> list[TrendPoint]:
    start = (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    rows = session.exec(
        select(OpsIncident).where((col(OpsIncident.reported_at) >= start) | (col(OpsIncident.closed_at) >= start))
    ).all()
    reported, closed = Counter[str](), Counter[str]()
    for i in rows:
        if as_utc(i.reported_at) >= start:
            reported[as_utc(i.reported_at).date().isoformat()] += 1
        if i.closed_at and as_utc(i.closed_at) >= start:
            closed[as_utc(i.closed_at).date().isoformat()] += 1
    return [
        TrendPoint(date=d, reported=reported[d], closed=closed[d])
        for d in ((start + timedelta(days=n)).date().isoformat() for n in range(days))
    ]


def open_incidents_geojson(session: Session, now: datetime, limit: int = 2000) -> dict[str, Any]:
    rows = session.exec(
        select(OpsIncident)
        .where(col(OpsIncident.status).not_in(_TERMINAL))
        .order_by(col(OpsIncident.reported_at).desc())
        .limit(limit)
    ).all()
    late = {
        o.incident_id
        for o in session.exec(
            select(OpsWorkOrder).where(col(OpsWorkOrder.status).in_(ACTIVE_ORDER), col(OpsWorkOrder.deadline) < now)
        ).all()
    }
    features = []
    for i in rows:
        cat = CATEGORIES.get(i.category_code)
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
                    "overdue": i.incident_id in late,
                    "escalated": i.escalated,
                    "big": i.big,
                    "grid_id": i.grid_id,
                    "reported_at": as_utc(i.reported_at).isoformat(),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def grids_geojson(session: Session) -> dict[str, Any]:
    open_by_grid = Counter(
        i.grid_id for i in session.exec(select(OpsIncident).where(col(OpsIncident.status).not_in(_TERMINAL))).all()
    )
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
            for g in GRIDS.values()
        ],
    }
