"""Reference data of Gaohang town (高行镇, Pudong, Shanghai): departments, incident categories and grid cells.

Departments are the offices the town's 2023 urban-management plan (高行镇2023年城市管理精细化工作要点) makes
responsible for each task; categories name the incidents those tasks are about.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from types import MappingProxyType
from zoneinfo import ZoneInfo


@dataclass(frozen=True, slots=True)
class Department:
    code: str
    name_zh: str
    name_en: str


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
    big: bool = False
    """大事全网联动: every listed department is engaged at once, the operations center coordinating."""
    public: bool = field(kw_only=True)
    """Whether the public reads its incidents (Open311): a problem of a street, a creek or a public place is
    public; one inside private premises, or naming a flat or a building's owner, is not. Every category says."""

    @property
    def lead(self) -> str:
        return self.departments[0]


@dataclass(frozen=True, slots=True)
class Grid:
    code: str
    name_zh: str
    name_en: str
    south: float
    west: float
    north: float
    east: float
    workers: tuple[str, ...]

    def contains(self, lat: float, lon: float) -> bool:
        return self.south <= lat < self.north and self.west <= lon < self.east

    @property
    def center(self) -> tuple[float, float]:
        return ((self.south + self.north) / 2, (self.west + self.east) / 2)


OPS_CENTER = "ops_center"

DEPARTMENTS: dict[str, Department] = {
    d.code: d
    for d in (
        Department("env_rectification", "环境综合整治办", "Environmental Rectification Office"),
        Department("city_ops", "城运办", "City Operations Office"),
        Department("public_safety", "平安办", "Public Safety Office"),
        Department("river_chief", "河长办", "River Chief Office"),
        Department("forest_chief", "林长办", "Forest Chief Office"),
        Department("work_safety", "安委办", "Work Safety Committee Office"),
        Department("planning", "规建办", "Planning and Construction Office"),
        Department("civic_creation", "综合创建办", "Civic Creation Office"),
        Department("refinement", "精细化办", "Urban Refinement Office"),
        Department(OPS_CENTER, "城运中心", "City Operations Center"),
    )
}

CATEGORIES: dict[str, Category] = {
    c.code: c
    for c in (
        # 五违四必 / 群租 (task 8)
        Category(
            "illegal_construction",
            "违法建筑",
            "Illegal construction",
            "violations",
            ("env_rectification", "planning"),
            2,
            72,
            public=False,
        ),
        Category(
            "group_renting",
            "群租",
            "Group renting",
            "violations",
            ("env_rectification", "public_safety"),
            2,
            72,
            public=False,
        ),
        # 违法户外广告、店招店牌 (task 9)
        Category(
            "illegal_signage",
            "违法户外广告/店招店牌",
            "Illegal ads and shop signs",
            "appearance",
            ("civic_creation", "env_rectification", "city_ops"),
            3,
            120,
            public=True,
        ),
        Category(
            "street_vending",
            "占道经营",
            "Street vending",
            "appearance",
            ("city_ops", "env_rectification"),
            3,
            8,
            public=True,
        ),
        # 垃圾 (task 10)
        Category(
            "exposed_garbage",
            "暴露垃圾",
            "Exposed garbage",
            "garbage",
            ("city_ops", "civic_creation"),
            3,
            24,
            public=True,
        ),
        Category("garbage_sorting", "垃圾分类不规范", "Unsorted garbage", "garbage", ("city_ops",), 4, 48, public=True),
        # 停车 / 共享单车 (tasks 12, 16)
        Category(
            "illegal_parking", "乱停车", "Illegal parking", "parking", ("public_safety", "city_ops"), 3, 8, public=True
        ),
        Category(
            "shared_bikes",
            "共享单车乱停放",
            "Shared bikes parked badly",
            "parking",
            (OPS_CENTER, "city_ops"),
            4,
            24,
            public=True,
        ),
        # 河道 (task 11)
        Category(
            "river_pollution",
            "河道污染",
            "River pollution",
            "water",
            ("river_chief", "env_rectification"),
            2,
            48,
            public=True,
        ),
        # 绿化 (task 2)
        Category(
            "greenery_damage",
            "绿化损坏",
            "Damaged greenery",
            "greenery",
            ("forest_chief", "planning"),
            4,
            72,
            public=True,
        ),
        # 安全隐患 (task 13), 防汛 (task 15)
        Category(
            "safety_hazard",
            "安全隐患（厂房仓库）",
            "Safety hazard (factory/warehouse)",
            "safety",
            ("work_safety", "public_safety", "planning"),
            1,
            24,
            big=True,
            public=False,
        ),
        Category("flooding", "积水", "Flooding", "safety", ("city_ops", "planning"), 1, 4, big=True, public=True),
        # 公厕 (task 1), 闲置土地 (task 16)
        Category(
            "public_toilet",
            "公厕问题",
            "Public toilet problem",
            "facilities",
            ("planning", "city_ops"),
            4,
            48,
            public=True,
        ),
        Category("idle_land", "闲置土地", "Idle land misuse", "land", (OPS_CENTER, "planning"), 4, 120, public=True),
    )
}

# Gaohang town, about 31.27–31.33 N, 121.56–121.63 E, as 4 × 3 grid cells.
_SOUTH, _NORTH, _WEST, _EAST = 31.27, 31.33, 121.56, 121.63
_ROWS, _COLS = 3, 4
_NAMES = (
    ("华高", "Huagao"),
    ("高海", "Gaohai"),
    ("东力", "Dongli"),
    ("紫翠", "Zicui"),
    ("浦江东旭", "Pujiang Dongxu"),
    ("和悦家园", "Heyue Jiayuan"),
    ("东语璟庭", "Dongyu Jingting"),
    ("森兰", "Senlan"),
    ("金京", "Jinjing"),
    ("东沟", "Donggou"),
    ("赵家沟", "Zhaojiagou"),
    ("芦九沟", "Lujiugou"),
)


def _grids() -> dict[str, Grid]:
    cells: dict[str, Grid] = {}
    dlat, dlon = (_NORTH - _SOUTH) / _ROWS, (_EAST - _WEST) / _COLS
    for row in range(_ROWS):
        for col in range(_COLS):
            i = row * _COLS + col
            code = f"gh{i + 1:02d}"
            zh, en = _NAMES[i]
            cells[code] = Grid(
                code,
                f"{zh}网格",
                f"{en} grid",
                round(_SOUTH + row * dlat, 6),
                round(_WEST + col * dlon, 6),
                round(_SOUTH + (row + 1) * dlat, 6),
                round(_WEST + (col + 1) * dlon, 6),
                (f"w-{code}-1", f"w-{code}-2"),
            )
    return cells


GRIDS: dict[str, Grid] = _grids()


@dataclass(frozen=True)
class Town:
    """One town's reference data, handed to the rules as a value: its offices, its incident categories, its grid
    cells and its operations center. A rule asks the town it is given, never a module for a town by name."""

    code: str
    name_zh: str
    name_en: str
    departments: Mapping[str, Department]
    categories: Mapping[str, Category]
    grids: Mapping[str, Grid]
    ops_center: str = OPS_CENTER
    """The code of the department that is the operations center (城运中心): escalations go to it."""
    timezone: str = "Asia/Shanghai"
    """The IANA time zone of the town's clocks: its days (the KPIs' periods, the trend) begin at its midnight."""

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

    def grid_at(self, lat: float, lon: float) -> Grid | None:
        """The grid cell a location falls in, or None outside the town."""
        for grid in self.grids.values():
            if grid.contains(lat, lon):
                return grid
        return None

    def grid_of_worker(self, worker_id: str) -> Grid | None:
        for grid in self.grids.values():
            if worker_id in grid.workers:
                return grid
        return None

    @functools.cached_property
    def public_categories(self) -> frozenset[str]:
        """The categories whose incidents the public reads (Open311)."""
        return frozenset(code for code, c in self.categories.items() if c.public)


GAOHANG = Town(
    "gaohang",
    "高行镇",
    "Gaohang",
    MappingProxyType(DEPARTMENTS),
    MappingProxyType(CATEGORIES),
    MappingProxyType(GRIDS),
)
"""The town gridloop runs for unless told otherwise."""


def grid_at(lat: float, lon: float) -> Grid | None:
    """The grid cell of :data:`GAOHANG` a location falls in (a rule asks the town it is given)."""
    return GAOHANG.grid_at(lat, lon)


def grid_of_worker(worker_id: str) -> Grid | None:
    return GAOHANG.grid_of_worker(worker_id)


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres (haversine)."""
    r = 6_371_000.0
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * r * math.asin(math.sqrt(a))
