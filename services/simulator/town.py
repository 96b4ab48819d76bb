"""The default town's reports, as a seeded and reproducible mix: what is reported, where, by whom, in what words.

Everything here is pure: ``generate_reports(count, seed)`` returns the same list for the same arguments, each
report a valid ``ReportCreate``. The mix:

* categories weighted like the town's daily load, as its package says (each category's ``share``): in Gaohang
  garbage, parking, shared bikes, street vending and shop signs most, big incidents (大事全网联动) rarely; what
  a grid worker fixes on the spot, what sensors report and the words reporters use come from the package too;
* about 3 % near-duplicates (same category a few metres from a recent report → merged),
  about 2 % that cannot be filed (outside the town, or a category the town does not know → rejected),
  about 8 % handled on the spot by the grid worker (小事一格解决, with evidence photos),
  about 3 % of severity "major";
* mostly grid workers (网格员), some citizens through the 12345 hotline, a few sensors.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import StrEnum

from schemas.events import Severity, Source
from schemas.reference import Grid, Town, default_town
from services.intake.models import ReportCreate

# -- the mix -------------------------------------------------------------------------------------------------

TOWN: Town = default_town()
"""The town whose reports are made: its cells, its categories and their shares, its roads."""

CATEGORY_WEIGHTS: dict[str, float] = {c.code: c.share for c in TOWN.categories.values()}
"""Each category's share of a day's reports."""

DUPLICATE_SHARE = 0.03
OUTSIDE_SHARE = 0.01
UNKNOWN_CATEGORY_SHARE = 0.01
ON_SPOT_SHARE = 0.08
NORMAL_SHARE = 1 - DUPLICATE_SHARE - OUTSIDE_SHARE - UNKNOWN_CATEGORY_SHARE - ON_SPOT_SHARE
MAJOR_SHARE = 0.03
SENSOR_SHARE = 0.06
HOTLINE_SHARE = 0.15
"""Of all reports; the outside ones, half the unknown ones and most near-duplicates come through 12345 too."""

DUPLICATE_MAX_M = 20.0
"""A near-duplicate lies this close to its original at most (dispatch merges within 50 m)."""
DUPLICATE_WINDOW = (5, 25)
"""A near-duplicate repeats one of the reports this many places earlier: recent enough to be still open."""

ON_SPOT_CATEGORIES = tuple(c.code for c in TOWN.categories.values() if c.on_spot)
"""Small things a grid worker can fix at once (小事一格解决)."""

SENSOR_CATEGORIES: dict[str, tuple[str, float]] = {
    c.code: (c.sensor.kind, c.sensor.share) for c in TOWN.categories.values() if c.sensor
}
"""category → (sensor kind, weight)"""

UNKNOWN_CATEGORIES: dict[str, str] = {
    "noise_complaint": "夜间施工噪声扰民，持续到凌晨",
    "pothole_repair": "路面坑洼，电动车经过容易摔倒",
    "stray_animals": "小区内流浪犬较多，居民担心被咬伤",
    "tax_question": "咨询个体户开票问题",
}


def _outside_spots(town: Town) -> tuple[tuple[float, float, str], ...]:
    """A place a little beyond each edge of the town's cells: north, south, west and east."""
    cells = list(town.grids.values())
    south, north = min(g.south for g in cells), max(g.north for g in cells)
    west, east = min(g.west for g in cells), max(g.east for g in cells)
    lat, lon, d = (south + north) / 2, (west + east) / 2, 0.015
    return (
        (north + d, lon, f"{town.name_zh}以北"),
        (south - d, lon, f"{town.name_zh}以南"),
        (lat, west - d, f"{town.name_zh}以西"),
        (lat, east + d, f"{town.name_zh}以东"),
    )


OUTSIDE_SPOTS = _outside_spots(TOWN)
"""Places just outside the town, where a 12345 caller reports what is not the town's."""

ROADS = tuple(
    str(f["properties"]["name"])
    for f in TOWN.layers.get("roads", {}).get("features", ())
    if f["properties"].get("name")
) or ("主干道", "支路", "沿河路")
"""The town's roads (its roads layer), as addresses name them."""
PLACES = (
    "小区门口",
    "地铁站出口",
    "菜场旁",
    "公交站附近",
    "学校门口",
    "沿街商铺前",
    "桥下",
    "绿地边",
    "小区内",
    "路口",
    "工业园区内",
    "河边步道",
)

DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    c.code: c.examples or ("{p}" + c.name_zh,) for c in TOWN.categories.values()
}
DUPLICATE_PREFIXES = ("市民再次反映：", "同一位置又有人报告：", "重复反映：")


class ReportKind(StrEnum):
    NORMAL = "normal"
    DUPLICATE = "duplicate"
    """Same category within ~20 m of a recent open report → dispatch merges it."""
    ON_SPOT = "on_spot"
    """小事一格解决: fixed by the grid worker at once; straight to verification."""
    OUTSIDE = "outside"
    """Outside every grid of the town → rejected."""
    UNKNOWN_CATEGORY = "unknown_category"
    """A category the town does not know → rejected."""

    @property
    def expected(self) -> str:
        """What dispatch should make of it: ``merged``, ``rejected`` or ``filed``."""
        if self is ReportKind.DUPLICATE:
            return "merged"
        if self in (ReportKind.OUTSIDE, ReportKind.UNKNOWN_CATEGORY):
            return "rejected"
        return "filed"


@dataclass(frozen=True, slots=True)
class PlannedReport:
    index: int
    kind: ReportKind
    report: ReportCreate
    duplicate_of: int | None = None
    """For a near-duplicate, the index of the report it repeats."""

    def payload(self) -> dict[str, object]:
        """The JSON body of POST /reports."""
        return self.report.model_dump(mode="json")


# -- generation ----------------------------------------------------------------------------------------------

_MARGIN = 0.0006
"""Degrees kept away from a grid's edges (~60 m), so a near-duplicate a few metres off stays in its grid."""
_M_PER_DEG_LAT = 111_320.0


def offset_m(lat: float, lon: float, distance: float, bearing_deg: float) -> tuple[float, float]:
    """The point ``distance`` metres from (lat, lon) towards ``bearing_deg`` (flat-earth, fine under 1 km)."""
    b = math.radians(bearing_deg)
    dlat = distance * math.cos(b) / _M_PER_DEG_LAT
    dlon = distance * math.sin(b) / (_M_PER_DEG_LAT * math.cos(math.radians(lat)))
    return lat + dlat, lon + dlon


def draw_point(rng: random.Random, grid: Grid) -> tuple[float, float]:
    """A place in ``grid``, away from its edges, to six decimals (as a phone reports it)."""
    lat, lon = grid.random_point(rng, _MARGIN)
    return round(lat, 6), round(lon, 6)


def draw_address(rng: random.Random, grid: Grid, town: Town) -> tuple[str, str]:
    """A street address in ``grid`` of ``town``, and the place there a description names."""
    road, place = rng.choice(ROADS), rng.choice(PLACES)
    number = rng.randint(1, 2999)
    return f"{town.district}{town.name_zh}{road}{number}号（{grid.name_zh}）", f"{road}{number}号{place}"


def draw_citizen(rng: random.Random) -> str:
    """A caller of the hotline, by their mobile number."""
    return f"citizen-1{rng.choice('3589')}{rng.randint(0, 999_999_999):09d}"


def draw_photo_urls(rng: random.Random, town_code: str, kind: str, name: str, at_least: int = 0) -> list[str]:
    """Up to two pictures (``kind``: photo or evidence) of ``name`` in the town's object store, at least
    ``at_least``."""
    count = max(at_least, rng.choice((0, 1, 1, 2)))
    return [f"https://oss.{town_code}.example.cn/{kind}/{name}-{k + 1}.jpg" for k in range(count)]


class _Generator:
    def __init__(self, seed: int, run_id: str) -> None:
        self.rng = random.Random(seed)
        self.run_id = run_id
        self.grids: list[Grid] = list(TOWN.grids.values())
        self.reports: list[PlannedReport] = []

    # small pieces

    def _weighted(self, weights: dict[str, float]) -> str:
        keys = list(weights)
        return self.rng.choices(keys, weights=[weights[k] for k in keys], k=1)[0]

    def _description(self, category: str, place: str) -> str:
        template = self.rng.choice(DESCRIPTIONS[category])
        return template.format(p=place, n=self.rng.randint(3, 30))

    def _photos(self, client_id: str, kind: str, at_least: int = 0) -> list[str]:
        return draw_photo_urls(self.rng, TOWN.code, kind, client_id, at_least)

    def _client_id(self, index: int) -> str:
        return f"{self.run_id}-{index:05d}"

    # report kinds

    def _normal(self, index: int) -> PlannedReport:
        client_id = self._client_id(index)
        grid = self.rng.choice(self.grids)
        r = self.rng.random()
        sensor_share, hotline_share = SENSOR_SHARE / NORMAL_SHARE, HOTLINE_SHARE / NORMAL_SHARE
        if r < sensor_share:
            category = self._weighted({c: w for c, (_, w) in SENSOR_CATEGORIES.items()})
            sensor = f"sensor-{grid.code}-{SENSOR_CATEGORIES[category][0]}-{self.rng.randint(1, 9)}"
            source, reporter = Source.SENSOR, sensor
        elif r < sensor_share + hotline_share:
            category = self._weighted(CATEGORY_WEIGHTS)
            source, reporter = Source.HOTLINE_12345, draw_citizen(self.rng)
        else:
            category = self._weighted(CATEGORY_WEIGHTS)
            source, reporter = Source.GRID_WORKER, self.rng.choice(grid.workers)
        lat, lon = draw_point(self.rng, grid)
        address, place = draw_address(self.rng, grid, TOWN)
        severity = Severity.MAJOR if self.rng.random() < MAJOR_SHARE / NORMAL_SHARE else Severity.NORMAL
        description = self._description(category, place)
        if severity is Severity.MAJOR:
            description += "，情况严重，请尽快处置"
        report = ReportCreate(
            category_code=category,
            lat=lat,
            lon=lon,
            address=address,
            description=description,
            photo_urls=self._photos(client_id, "photo") if source is not Source.SENSOR else [],
            severity=severity,
            source=source,
            reporter_id=reporter,
            client_report_id=client_id,
        )
        return PlannedReport(index, ReportKind.NORMAL, report)

    def _on_spot(self, index: int) -> PlannedReport:
        client_id = self._client_id(index)
        grid = self.rng.choice(self.grids)
        category = self._weighted({c: CATEGORY_WEIGHTS[c] for c in ON_SPOT_CATEGORIES})
        lat, lon = draw_point(self.rng, grid)
        address, place = draw_address(self.rng, grid, TOWN)
        report = ReportCreate(
            category_code=category,
            lat=lat,
            lon=lon,
            address=address,
            description=self._description(category, place) + "，已现场处置",
            photo_urls=self._photos(client_id, "photo", at_least=1),
            source=Source.GRID_WORKER,
            reporter_id=self.rng.choice(grid.workers),
            client_report_id=client_id,
            handled_on_spot=True,
            evidence_urls=self._photos(client_id, "evidence", at_least=1),
        )
        return PlannedReport(index, ReportKind.ON_SPOT, report)

    def _outside(self, index: int) -> PlannedReport:
        lat0, lon0, where = self.rng.choice(OUTSIDE_SPOTS)
        lat = round(lat0 + self.rng.uniform(-0.004, 0.004), 6)
        lon = round(lon0 + self.rng.uniform(-0.004, 0.004), 6)
        assert TOWN.grid_at(lat, lon) is None
        category = self._weighted(CATEGORY_WEIGHTS)
        place = self.rng.choice(PLACES)
        report = ReportCreate(
            category_code=category,
            lat=lat,
            lon=lon,
            address=f"{where}{self.rng.choice(ROADS)}附近",
            description=self._description(category, place),
            source=Source.HOTLINE_12345,
            reporter_id=draw_citizen(self.rng),
            client_report_id=self._client_id(index),
        )
        return PlannedReport(index, ReportKind.OUTSIDE, report)

    def _unknown(self, index: int) -> PlannedReport:
        grid = self.rng.choice(self.grids)
        category = self.rng.choice(sorted(UNKNOWN_CATEGORIES))
        lat, lon = draw_point(self.rng, grid)
        address, place = draw_address(self.rng, grid, TOWN)
        hotline = self.rng.random() < 0.5
        report = ReportCreate(
            category_code=category,
            lat=lat,
            lon=lon,
            address=address,
            description=f"{place}{UNKNOWN_CATEGORIES[category]}",
            source=Source.HOTLINE_12345 if hotline else Source.GRID_WORKER,
            reporter_id=draw_citizen(self.rng) if hotline else self.rng.choice(grid.workers),
            client_report_id=self._client_id(index),
        )
        return PlannedReport(index, ReportKind.UNKNOWN_CATEGORY, report)

    def _duplicate(self, index: int) -> PlannedReport | None:
        lo, hi = DUPLICATE_WINDOW
        recent = self.reports[max(0, index - hi) : max(0, index - lo + 1)]
        candidates = [p for p in recent if p.kind is ReportKind.NORMAL]
        if not candidates:
            return None
        original = self.rng.choice(candidates)
        o = original.report
        lat, lon = offset_m(o.lat, o.lon, self.rng.uniform(2.0, DUPLICATE_MAX_M), self.rng.uniform(0, 360))
        grid = TOWN.grid_at(o.lat, o.lon)
        assert grid is not None
        hotline = self.rng.random() < 0.6
        others = [w for w in grid.workers if w != o.reporter_id]
        report = ReportCreate(
            category_code=o.category_code,
            lat=round(lat, 6),
            lon=round(lon, 6),
            address=o.address,
            description=self.rng.choice(DUPLICATE_PREFIXES) + o.description,
            source=Source.HOTLINE_12345 if hotline or not others else Source.GRID_WORKER,
            reporter_id=draw_citizen(self.rng) if hotline or not others else self.rng.choice(others),
            client_report_id=self._client_id(index),
        )
        return PlannedReport(index, ReportKind.DUPLICATE, report, duplicate_of=original.index)

    def next(self) -> PlannedReport:
        index = len(self.reports)
        r = self.rng.random()
        planned: PlannedReport | None = None
        if r < DUPLICATE_SHARE:
            planned = self._duplicate(index)
        elif r < DUPLICATE_SHARE + OUTSIDE_SHARE:
            planned = self._outside(index)
        elif r < DUPLICATE_SHARE + OUTSIDE_SHARE + UNKNOWN_CATEGORY_SHARE:
            planned = self._unknown(index)
        elif r < DUPLICATE_SHARE + OUTSIDE_SHARE + UNKNOWN_CATEGORY_SHARE + ON_SPOT_SHARE:
            planned = self._on_spot(index)
        if planned is None:
            planned = self._normal(index)
        self.reports.append(planned)
        return planned


def generate_reports(count: int, seed: int = 7, run_id: str = "sim") -> list[PlannedReport]:
    """``count`` reports of the default town, the same for the same seed; client report ids ``<run_id>-00000``…"""
    gen = _Generator(seed, run_id)
    return [gen.next() for _ in range(count)]
