"""The live map (风险一张图) as the server draws it, small whatever the backlog.

- Where few open incidents are in view (at most :data:`POINTS_MAX`) and the map is close enough to tell them
  apart (zoom :data:`CLUSTER_BELOW_ZOOM` or more, or none asked), each is a point with its properties.
- Else they are clusters: the open incidents counted per cell of a latitude/longitude grid anchored at (-90,
  -180), each with its count, how many are overdue, escalated and big, and its centroid. A cell is about
  :data:`CLUSTER_PX` pixels across at the zoom asked, doubled until the open incidents in view span at most
  :data:`CELLS_ACROSS_MAX` cells each way: so never more than 25 × 25 clusters, and cells of one size line up
  from one request to the next as the map pans.

A point is some 400 bytes of JSON and a cluster some 200: an answer stays well under 200 KB.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import shapely
from shapely.geometry import MultiPolygon, Polygon

from schemas.reference import Town

from .domain import Incident

POINTS_MAX = 400
"""The most open incidents answered as points; more in view are answered as clusters."""
CLUSTER_BELOW_ZOOM = 12
"""Below this zoom (the town a few hundred pixels across) the map is clusters, however few the incidents."""
DEFAULT_ZOOM = 13
"""The zoom clusters are cut for when a request names none (the town filling a dashboard's map)."""
CLUSTER_PX = 64
"""A cluster's cell is about this many pixels across at the zoom asked (256-pixel Web Mercator tiles)."""
CELLS_ACROSS_MAX = 24
"""…and at least 1/24 of the width and the height of what is in view."""
_DECIMALS = 6
"""Coordinates are answered to about 10 cm."""


@dataclass(frozen=True, slots=True)
class Box:
    """A part of the map, in degrees (no box crosses the antimeridian)."""

    west: float
    south: float
    east: float
    north: float

    @classmethod
    def parse(cls, text: str) -> Box:
        """A box from ``west,south,east,north``; ValueError with the reason if it is not one."""
        parts = text.split(",")
        if len(parts) != 4:
            raise ValueError("bbox is west,south,east,north in degrees")
        try:
            west, south, east, north = (float(p) for p in parts)
        except ValueError:
            raise ValueError("bbox is west,south,east,north in degrees") from None
        if not all(math.isfinite(v) for v in (west, south, east, north)):
            raise ValueError("bbox holds a number that is not finite")
        if not (-180 <= west <= east <= 180 and -90 <= south <= north <= 90):
            raise ValueError("bbox must have -180 <= west <= east <= 180 and -90 <= south <= north <= 90")
        return cls(west, south, east, north)


@dataclass(frozen=True, slots=True)
class MapQuery:
    """What the map asks for: its zoom and the part of the town in view (None: all of it)."""

    zoom: int | None = None
    box: Box | None = None


@dataclass(frozen=True, slots=True)
class Extent:
    """How many open incidents are in view and the box around them (None when there are none)."""

    count: int
    box: Box | None


@dataclass(frozen=True, slots=True)
class Cluster:
    """The open incidents of one cell of the cluster grid (row and column of cells from (-90, -180))."""

    row: int
    col: int
    count: int
    escalated: int
    big: int
    lat: float
    """The centroid of its incidents."""
    lon: float
    overdue: int = 0
    """Those with work past its deadline."""


def as_points(query: MapQuery, extent: Extent) -> bool:
    """Whether the open incidents in view are answered one by one (else as clusters)."""
    close = query.zoom is None or query.zoom >= CLUSTER_BELOW_ZOOM
    return close and extent.count <= POINTS_MAX


def cell_size(query: MapQuery, extent: Extent) -> float:
    """The side of a cluster cell in degrees, for this zoom and what is in view."""
    zoom = DEFAULT_ZOOM if query.zoom is None else query.zoom
    cell = math.ldexp(CLUSTER_PX * 360.0 / 256, -zoom)  # halves with each zoom level
    if extent.box is not None:
        b = extent.box
        span = max(b.north - b.south, b.east - b.west)
        while span / cell > CELLS_ACROSS_MAX:
            cell *= 2
    return cell


def _round(value: float) -> float:
    return float(round(value, _DECIMALS))


def points_geojson(incidents: Iterable[Incident], overdue: set[str], town: Town, query: MapQuery) -> dict[str, Any]:
    """GeoJSON points of the open ``incidents``, those whose id is in ``overdue`` marked so."""
    features = []
    for i in incidents:
        cat = town.categories.get(i.category_code)
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [_round(i.lon), _round(i.lat)]},
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
    return {
        "type": "FeatureCollection",
        "mode": "points",
        "zoom": query.zoom,
        "total": len(features),
        "features": features,
    }


def clusters_geojson(clusters: Iterable[Cluster], cell: float, query: MapQuery) -> dict[str, Any]:
    """GeoJSON points of the ``clusters`` (cells of side ``cell``), each with its counts and its cell's box."""
    features = []
    total = 0
    for c in clusters:
        total += c.count
        south, west = c.row * cell - 90, c.col * cell - 180
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [_round(c.lon), _round(c.lat)]},
                "properties": {
                    "cluster": True,
                    "count": c.count,
                    "overdue": c.overdue,
                    "escalated": c.escalated,
                    "big": c.big,
                    "bbox": [_round(west), _round(south), _round(west + cell), _round(south + cell)],
                },
            }
        )
    return {
        "type": "FeatureCollection",
        "mode": "clusters",
        "zoom": query.zoom,
        "total": total,
        "cell_deg": cell,
        "features": features,
    }


def _geojson(geometry: Polygon | MultiPolygon) -> dict[str, Any]:
    """A cell's geometry as RFC 7946 writes it (exterior rings counterclockwise, positions as lists)."""
    shape: dict[str, Any] = json.loads(shapely.to_geojson(shapely.orient_polygons(geometry)))
    return shape


def grids_geojson(open_by_grid: Mapping[str | None, int], town: Town) -> dict[str, Any]:
    """GeoJSON polygons of the town's grid cells, each with how many open incidents are in it."""
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": _geojson(g.geometry),
                "properties": {
                    "grid_id": g.code,
                    "name_zh": g.name_zh,
                    "name_en": g.name_en,
                    "community": g.community,
                    "workers": list(g.workers),
                    "open": open_by_grid.get(g.code, 0),
                },
            }
            for g in town.grids.values()
        ],
    }


__all__ = [
    "CELLS_ACROSS_MAX",
    "CLUSTER_BELOW_ZOOM",
    "CLUSTER_PX",
    "DEFAULT_ZOOM",
    "POINTS_MAX",
    "Box",
    "Cluster",
    "Extent",
    "MapQuery",
    "as_points",
    "cell_size",
    "clusters_geojson",
    "grids_geojson",
    "points_geojson",
]
