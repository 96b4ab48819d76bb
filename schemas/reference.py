"""A town's reference data as the rules receive it: departments, incident categories, grid cells, the roster, the
routing rules, the working calendar and the map layers.

No town is written here. A town is a package of files (``towns/<code>/``: GeoJSON, TOML and CSV that a town's GIS
and duty staff produce) read by :mod:`schemas.towns`, which builds the :class:`Town` value every rule is handed.
:data:`GAOHANG` is the package gridloop runs for unless told otherwise.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Literal
from zoneinfo import ZoneInfo

import numpy as np
import shapely
from prcoords import gcj_wgs_bored, wgs_gcj
from shapely.geometry import MultiPolygon, Point, Polygon, box
from shapely.geometry.base import BaseGeometry

_M_PER_DEG_LAT = 111_320.0


@dataclass(frozen=True, slots=True)
class Department:
    code: str
    name_zh: str
    name_en: str


Datatype = Literal["string", "number", "datetime", "text", "singlevaluelist", "multivaluelist"]


@dataclass(frozen=True, slots=True)
class Choice:
    key: str
    name: str


@dataclass(frozen=True, slots=True)
class Question:
    """One question a reporter answers about an incident of a category (an Open311 attribute)."""

    code: str
    datatype: Datatype
    label: str
    """How the answer is introduced in the incident's description."""
    description: str
    """The question put to the reporter."""
    required: bool = False
    datatype_description: str | None = None
    values: tuple[Choice, ...] = ()
    variable: bool = True
    """False: only information shown to the reporter, nothing to answer."""
    minimum: float | None = None
    maximum: float | None = None
    whole: bool = False
    max_length: int = 200


class DeadlineUnit(StrEnum):
    WORKING_HOURS = "working_hours"
    WORKING_DAYS = "working_days"


@dataclass(frozen=True, slots=True)
class Deadline:
    """The time a category's work order is given, in the town's working time (工作时/工作日)."""

    amount: float
    unit: DeadlineUnit

    @property
    def wall_clock_hours(self) -> float:
        """The hours the loop counts today, on the wall clock: a working hour as an hour, a working day as 24
        hours (the deadline on the working calendar replaces it)."""
        return self.amount * (24 if self.unit is DeadlineUnit.WORKING_DAYS else 1)

    def __str__(self) -> str:
        return f"{self.amount:g} {self.unit.value.replace('_', ' ')}"


class Kind(StrEnum):
    """GB/T 30428's two kinds of city-management object: a 部件 (a thing: a manhole cover, a lamp, a toilet) or an
    事件 (an occurrence: garbage, a stall, a flooded road)."""

    COMPONENT = "部件"
    EVENT = "事件"


@dataclass(frozen=True, slots=True)
class Sensor:
    """A kind of sensor that reports incidents of a category on its own (a water-level gauge, a smart bin)."""

    kind: str
    share: float


@dataclass(frozen=True, slots=True)
class Category:
    code: str
    name_zh: str
    name_en: str
    family: str
    departments: tuple[str, ...]
    """Lead department first; the rest support a big incident or take a returned work order, in order."""
    priority: int
    """1 most urgent … 5 least."""
    deadline_hours: float
    """The deadline the loop counts today, on the wall clock (see :attr:`Deadline.wall_clock_hours`)."""
    big: bool = False
    """大事全网联动: every listed department is engaged at once, the operations center coordinating."""
    public: bool = field(kw_only=True)
    """Whether the public reads its incidents (Open311): a problem of a street, a creek or a public place is
    public; one inside private premises, or naming a flat or a building's owner, is not. Every category says."""
    kind: Kind = field(default=Kind.EVENT, kw_only=True)
    major: str = field(default="", kw_only=True)
    """大类 code (two digits, in the manner of GB/T 30428)."""
    minor: str = field(default="", kw_only=True)
    """小类 code (two digits)."""
    deadline: Deadline | None = field(default=None, kw_only=True)
    """The deadline as the town states it; None: :attr:`deadline_hours` working hours."""
    questions: tuple[Question, ...] = field(default=(), kw_only=True)
    """What a reporter answers (Open311 attributes), in order."""
    share: float = field(default=1.0, kw_only=True)
    """The category's relative share of a day's reports (what a simulated day draws)."""
    on_spot: bool = field(default=False, kw_only=True)
    """A grid worker may fix it at once (小事一格解决)."""
    sensor: Sensor | None = field(default=None, kw_only=True)
    examples: tuple[str, ...] = field(default=(), kw_only=True)
    """Typical descriptions, ``{p}`` the place and ``{n}`` a number (what a simulated report says)."""

    @property
    def lead(self) -> str:
        return self.departments[0]

    @property
    def gb_code(self) -> str:
        """大类 and 小类 together, e.g. ``0102``."""
        return f"{self.major}{self.minor}"


def _polygonal(geometry: BaseGeometry) -> Polygon | MultiPolygon:
    if not isinstance(geometry, Polygon | MultiPolygon):
        raise TypeError(f"a grid cell is a Polygon or MultiPolygon, not a {geometry.geom_type}")
    return geometry


@dataclass(frozen=True)
class Grid:
    """One grid cell (网格): a polygon, holes allowed, of a community (居委/村), with its grid workers."""

    code: str
    name_zh: str
    name_en: str
    geometry: Polygon | MultiPolygon
    """In the town's datum, x the longitude and y the latitude."""
    workers: tuple[str, ...] = ()
    """The roster's grid workers of the cell, in roster order."""
    community: str = ""
    south: float = field(init=False)
    west: float = field(init=False)
    north: float = field(init=False)
    east: float = field(init=False)

    def __post_init__(self) -> None:
        geometry = _polygonal(self.geometry)
        shapely.prepare(geometry)
        west, south, east, north = geometry.bounds
        for name, value in (("south", south), ("west", west), ("north", north), ("east", east)):
            object.__setattr__(self, name, value)

    @classmethod
    def box(
        cls,
        code: str,
        name_zh: str,
        name_en: str,
        south: float,
        west: float,
        north: float,
        east: float,
        workers: tuple[str, ...] = (),
        community: str = "",
    ) -> Grid:
        """A rectangular cell."""
        return cls(code, name_zh, name_en, box(west, south, east, north), workers, community)

    def contains(self, lat: float, lon: float) -> bool:
        """Whether the location lies in the cell or on its edge (never in a hole)."""
        return bool(shapely.intersects_xy(self.geometry, lon, lat))

    @functools.cached_property
    def center(self) -> tuple[float, float]:
        """A point inside the cell (its centroid when that lies inside), as (lat, lon)."""
        c = self.geometry.centroid
        if not self.contains(c.y, c.x):
            c = self.geometry.representative_point()
        return (c.y, c.x)

    def random_point(self, rng: random.Random, margin: float = 0.0) -> tuple[float, float]:
        """A location drawn evenly from the cell, at least ``margin`` degrees inside its edges, as (lat, lon)."""
        area = self._inner(margin)
        west, south, east, north = area.bounds
        for _ in range(10_000):
            lat, lon = rng.uniform(south, north), rng.uniform(west, east)
            if shapely.intersects_xy(area, lon, lat):
                return lat, lon
        raise ValueError(f"grid {self.code} has no room {margin} degrees inside its edges")

    def _inner(self, margin: float) -> BaseGeometry:
        inner: dict[float, BaseGeometry] = self.__dict__.setdefault("_inner_by_margin", {})
        if margin not in inner:
            area = self.geometry.buffer(-margin) if margin > 0 else self.geometry
            if area.is_empty:
                area = self.geometry
            shapely.prepare(area)
            inner[margin] = area
        return inner[margin]


Ring = tuple[tuple[float, float], ...]


def _inside(rings: tuple[Ring, ...], x: float, y: float) -> bool:
    """Even-odd ray casting over every ring of a polygon (its holes too): a hole's points are outside."""
    inside = False
    for ring in rings:
        x1, y1 = ring[-1]
        for x2, y2 in ring:
            if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
                inside = not inside
            x1, y1 = x2, y2
    return inside


class CellIndex:
    """Finds the cell of a location in about the time a few comparisons take, however many cells a town has.

    The town's extent is cut into buckets (some 16 per cell, at least 128 × 128). Once, when the town is read, a
    shapely ``STRtree`` of the cells answers for every bucket at once which cells it lies within and which it
    touches: a bucket within one cell names that cell, a bucket no cell touches names none, and a bucket an edge
    crosses keeps the few cells it touches, each clipped to the bucket (a handful of vertices), to test the
    location against in the package's order. A lookup is a few multiplications and a list index, and for a
    location near an edge a ray cast over a few short rings."""

    def __init__(self, cells: tuple[Grid, ...]) -> None:
        self.cells = cells
        self.rows = self.cols = 0
        self.south = self.west = self.lat_step = self.lon_step = 0.0
        self.table: list[Grid | tuple[tuple[Grid, tuple[Ring, ...]], ...] | None] = []
        if cells:
            self._build(cells)

    def _build(self, cells: tuple[Grid, ...]) -> None:
        pad = 1e-9
        self.south = min(g.south for g in cells) - pad
        self.west = min(g.west for g in cells) - pad
        height = max(g.north for g in cells) + pad - self.south
        width = max(g.east for g in cells) + pad - self.west
        buckets = min(max(128 * 128, 16 * len(cells)), 1 << 20)
        self.rows = max(1, min(4096, round(math.sqrt(buckets * height / width))))
        self.cols = max(1, min(4096, buckets // self.rows))
        self.lat_step, self.lon_step = self.rows / height, self.cols / width
        i, j = np.divmod(np.arange(self.rows * self.cols), self.cols)
        dlat, dlon = height / self.rows, width / self.cols
        boxes = shapely.box(
            self.west + j * dlon, self.south + i * dlat, self.west + (j + 1) * dlon, self.south + (i + 1) * dlat
        )
        geometries = np.array([g.geometry for g in cells], dtype=object)
        tree = shapely.STRtree(geometries)
        within = tree.query(boxes, predicate="within")
        inside = np.zeros(len(boxes), dtype=bool)
        inside[within[0]] = True
        touch = tree.query(boxes, predicate="intersects")
        order = np.lexsort((touch[1], touch[0]))  # by bucket, then by the package's order
        bucket, cell = touch[0][order], touch[1][order]
        edge = ~inside[bucket]
        edge_bucket, edge_cell = bucket[edge].tolist(), cell[edge].tolist()
        clipped = shapely.intersection(geometries[cell[edge]], boxes[bucket[edge]])
        rings, owner = shapely.get_rings(clipped, return_index=True)
        xy, of_ring = shapely.get_coordinates(rings, return_index=True)
        starts = np.searchsorted(of_ring, np.arange(len(rings) + 1)).tolist()
        flat = [(float(x), float(y)) for x, y in xy.tolist()]
        by_piece: dict[int, list[Ring]] = {}
        for r, piece in enumerate(owner.tolist()):
            by_piece.setdefault(piece, []).append(tuple(flat[starts[r] : starts[r + 1]]))
        pieces: dict[int, list[tuple[Grid, tuple[Ring, ...]]]] = {}
        for piece, piece_rings in by_piece.items():
            pieces.setdefault(edge_bucket[piece], []).append((cells[edge_cell[piece]], tuple(piece_rings)))
        table: list[Grid | tuple[tuple[Grid, tuple[Ring, ...]], ...] | None] = [None] * len(boxes)
        for b, c in zip(within[0].tolist(), within[1].tolist(), strict=True):
            table[b] = cells[c]  # a bucket within a cell: every location of it is that cell's
        for b, near in pieces.items():
            table[b] = tuple(near)
        self.table = table

    def find(self, lat: float, lon: float) -> Grid | None:
        row = (lat - self.south) * self.lat_step
        col = (lon - self.west) * self.lon_step
        if not (0 <= row < self.rows and 0 <= col < self.cols):  # outside the extent (or not a number)
            return None
        entry = self.table[int(row) * self.cols + int(col)]
        if entry is None or type(entry) is Grid:
            return entry
        for grid, rings in entry:  # type: ignore[union-attr]
            if _inside(rings, lon, lat):
                return grid
        return None


class Datum(StrEnum):
    """The geodetic datum of a location: phones' GPS give WGS-84; Chinese basemaps (高德, 腾讯) use GCJ-02."""

    WGS84 = "WGS-84"
    GCJ02 = "GCJ-02"


def convert(lat: float, lon: float, source: Datum, target: Datum) -> tuple[float, float]:
    """(lat, lon) in ``source`` as (lat, lon) in ``target`` (GCJ-02 to WGS-84 inverted to well under a metre)."""
    if source is target:
        return lat, lon
    out = wgs_gcj((lat, lon)) if target is Datum.GCJ02 else gcj_wgs_bored((lat, lon))
    return float(out[0]), float(out[1])


class Role(StrEnum):
    GRID_WORKER = "grid_worker"
    """A grid worker (网格员): reports in, and verifies the work orders of, their grid cells."""
    STAFF = "staff"
    """A department's staff member."""


@dataclass(frozen=True, slots=True)
class Person:
    """One entry of the roster. The contact is never shown to anyone but the town's own staff."""

    id: str
    name: str
    role: Role
    department: str
    grids: tuple[str, ...] = ()
    contact: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class RoutingRule:
    """Incidents of ``category`` in a grid cell, a community, or near a named map feature go to ``department``
    (a river section to its 河长, a park to its keeper). The first rule that matches wins; the category's lead
    department takes the rest."""

    category: str
    department: str
    grid: str | None = None
    community: str | None = None
    feature: str | None = None
    within_m: float = 50.0
    """How near a named feature a location counts as on it."""


@dataclass(frozen=True)
class Calendar:
    """The town's working time: the hours of a workday and which days are workdays, the statutory holidays and
    调休 make-up workdays (from the ``chinese-calendar`` package when ``statutory``), and the town's own days on
    top of them."""

    hours: tuple[tuple[time, time], ...] = ((time(8, 30), time(11, 30)), (time(13, 0), time(17, 30)))
    workdays: frozenset[int] = frozenset({1, 2, 3, 4, 5})
    """ISO weekdays, Monday 1 … Sunday 7."""
    statutory: bool = True
    """Whether the State Council's holidays and make-up workdays apply."""
    days_off: Mapping[date, str] = field(default_factory=lambda: MappingProxyType({}))
    """The town's own days off, by name."""
    extra_workdays: Mapping[date, str] = field(default_factory=lambda: MappingProxyType({}))
    """The town's own make-up workdays, by name."""

    def is_workday(self, day: date) -> bool:
        if day in self.extra_workdays:
            return True
        if day in self.days_off:
            return False
        if self.statutory:
            holidays, makeups = statutory_days()
            if day in makeups:
                return True
            if day in holidays:
                return False
        return day.isoweekday() in self.workdays

    def working_periods(self, day: date) -> tuple[tuple[time, time], ...]:
        """The working hours of ``day``: none on a day off."""
        return self.hours if self.is_workday(day) else ()


@functools.cache
def statutory_days() -> tuple[Mapping[date, str], Mapping[date, str]]:
    """China's statutory holidays and 调休 make-up workdays as ``chinese-calendar`` knows them (by name)."""
    from chinese_calendar import constants  # its tables: date → the holiday's name

    def named(table: Mapping[date, Any]) -> Mapping[date, str]:
        return MappingProxyType({d: str(getattr(h, "value", h)).split(",")[-1] for d, h in table.items()})

    return named(constants.holidays), named(constants.workdays)


@dataclass(frozen=True)
class Town:
    """One town's reference data, handed to the rules as a value: its offices, its incident categories, its grid
    cells and its operations center, its roster, routing rules, calendar and map layers. A rule asks the town it is
    given, never a module for a town by name."""

    code: str
    name_zh: str
    name_en: str
    departments: Mapping[str, Department]
    categories: Mapping[str, Category]
    grids: Mapping[str, Grid]
    ops_center: str = "ops_center"
    """The code of the department that is the operations center (城运中心): escalations go to it."""
    timezone: str = "Asia/Shanghai"
    """The IANA time zone of the town's clocks: its days (the KPIs' periods, the trend) begin at its midnight."""
    datum: Datum = Datum.WGS84
    """The datum of the cells, the layers and the locations the rules compare with them."""
    version: str = "0"
    roster: Mapping[str, Person] = field(default_factory=lambda: MappingProxyType({}))
    routing: tuple[RoutingRule, ...] = ()
    calendar: Calendar = field(default_factory=Calendar)
    layers: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    """Map layers by name (roads, rivers, landmarks): GeoJSON FeatureCollections, to draw."""
    features: Mapping[str, BaseGeometry] = field(default_factory=lambda: MappingProxyType({}))
    """The layers' named features (a river section, a park), for routing."""
    basemap: str | None = None
    """An XYZ or WMTS tile URL template of the town's basemap, or None (the dashboard draws the cells alone)."""
    district: str = ""
    """The district the town lies in (区/县), as addresses begin."""

    @functools.cached_property
    def zone(self) -> ZoneInfo:
        """:attr:`timezone` as a tzinfo."""
        return ZoneInfo(self.timezone)

    def local_day(self, t: datetime) -> date:
        """The town's calendar day at the instant ``t`` (aware)."""
        return t.astimezone(self.zone).date()

    def midnight(self, day: date) -> datetime:
        """The instant the town's calendar day ``day`` begins."""
        return datetime(day.year, day.month, day.day, tzinfo=self.zone)

    @functools.cached_property
    def _cells(self) -> CellIndex:
        return CellIndex(tuple(self.grids.values()))

    def grid_at(self, lat: float, lon: float, datum: Datum | None = None) -> Grid | None:
        """The grid cell a location (in ``datum``, the town's when None) falls in, or None outside the town. A
        location on the edge of two cells is one of them."""
        if datum is not None and datum is not self.datum:
            lat, lon = convert(lat, lon, datum, self.datum)
        return self._cells.find(lat, lon)

    @functools.cached_property
    def _home(self) -> Mapping[str, Grid]:
        home: dict[str, Grid] = {}
        for grid in self.grids.values():
            for worker in grid.workers:
                home.setdefault(worker, grid)
        return home

    def grid_of_worker(self, worker_id: str) -> Grid | None:
        """The (first) grid cell a worker works in, or None for no grid worker of the town."""
        return self._home.get(worker_id)

    def workers_of(self, grid_code: str) -> tuple[str, ...]:
        grid = self.grids.get(grid_code)
        return grid.workers if grid else ()

    @functools.cached_property
    def _rules(self) -> Mapping[str, tuple[RoutingRule, ...]]:
        by: dict[str, list[RoutingRule]] = {}
        for rule in self.routing:
            by.setdefault(rule.category, []).append(rule)
        return {code: tuple(rules) for code, rules in by.items()}

    def route(self, category_code: str, lat: float, lon: float, grid: Grid | None = None) -> str | None:
        """The department an incident of the category at the location goes to: the first routing rule that
        matches, else the category's lead department; None for a category the town does not have."""
        category = self.categories.get(category_code)
        if category is None:
            return None
        for rule in self._rules.get(category_code, ()):
            if rule.grid is not None and (grid is None or grid.code != rule.grid):
                continue
            if rule.community is not None and (grid is None or grid.community != rule.community):
                continue
            if rule.feature is not None:
                where = self.features.get(rule.feature)
                if where is None or not shapely.dwithin(where, Point(lon, lat), rule.within_m / _M_PER_DEG_LAT):
                    continue
            return rule.department
        return category.lead

    @functools.cached_property
    def public_categories(self) -> frozenset[str]:
        """The categories whose incidents the public reads (Open311)."""
        return frozenset(code for code, c in self.categories.items() if c.public)

    @functools.cached_property
    def staff(self) -> Mapping[str, tuple[Person, ...]]:
        """The roster's staff by department."""
        by: dict[str, list[Person]] = {}
        for person in self.roster.values():
            if person.role is Role.STAFF:
                by.setdefault(person.department, []).append(person)
        return {code: tuple(people) for code, people in by.items()}


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres (haversine)."""
    r = 6_371_000.0
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * r * math.asin(math.sqrt(a))


def default_town() -> Town:
    """The town gridloop runs for unless told otherwise: the package ``GRIDLOOP_TOWN_DIR`` names, else
    ``towns/gaohang`` (read once)."""
    from schemas.towns import load_default  # the loader builds the values this module defines

    return load_default()


GAOHANG: Town = default_town()
"""The default package, ``towns/gaohang``: Gaohang town (高行镇, Pudong, Shanghai)."""
