"""Gaohang, the default town package (``towns/gaohang``), as the loop and its tests know it."""

from __future__ import annotations

import random
from datetime import date

import shapely
from shapely.geometry import box

from schemas.reference import GAOHANG, Datum, convert, distance_m
from schemas.towns import DEFAULT_TOWN_DIR, validate

# The categories and their offices as the loop, the simulator and the bench have always had them.
KEPT = {
    # code: (departments, priority, wall-clock hours, big, public)
    "illegal_construction": (("env_rectification", "planning"), 2, 72, False, False),
    "group_renting": (("env_rectification", "public_safety"), 2, 72, False, False),
    "illegal_signage": (("civic_creation", "env_rectification", "city_ops"), 3, 120, False, True),
    "street_vending": (("city_ops", "env_rectification"), 3, 8, False, True),
    "exposed_garbage": (("city_ops", "civic_creation"), 3, 24, False, True),
    "garbage_sorting": (("city_ops",), 4, 48, False, True),
    "illegal_parking": (("public_safety", "city_ops"), 3, 8, False, True),
    "shared_bikes": (("ops_center", "city_ops"), 4, 24, False, True),
    "river_pollution": (("river_chief", "env_rectification"), 2, 48, False, True),
    "greenery_damage": (("forest_chief", "planning"), 4, 72, False, True),
    "safety_hazard": (("work_safety", "public_safety", "planning"), 1, 24, True, False),
    "flooding": (("city_ops", "planning"), 1, 4, True, True),
    "public_toilet": (("planning", "city_ops"), 4, 48, False, True),
    "idle_land": (("ops_center", "planning"), 4, 120, False, True),
}


def test_the_package_is_valid() -> None:
    assert validate(DEFAULT_TOWN_DIR) == []
    assert (GAOHANG.code, GAOHANG.name_zh, GAOHANG.timezone, GAOHANG.datum) == (
        "gaohang",
        "高行镇",
        "Asia/Shanghai",
        Datum.WGS84,
    )


def test_the_categories_the_loop_knows_are_kept_as_they_were() -> None:
    for code, (departments, priority, hours, big, public) in KEPT.items():
        c = GAOHANG.categories[code]
        assert (c.departments, c.priority, c.deadline_hours, c.big, c.public) == (
            departments,
            priority,
            hours,
            big,
            public,
        ), code
    assert GAOHANG.ops_center in GAOHANG.departments


def test_every_category_is_complete() -> None:
    assert len(GAOHANG.categories) >= 27
    for c in GAOHANG.categories.values():
        assert c.departments and all(d in GAOHANG.departments for d in c.departments)
        assert 1 <= c.priority <= 5 and c.deadline is not None and c.deadline_hours > 0
        assert c.kind.value in ("部件", "事件") and len(c.gb_code) == 4 and c.gb_code.isdigit()
        assert c.examples and c.share > 0


def test_the_questions_a_reporter_answers_come_with_their_category() -> None:
    assert [q.code for q in GAOHANG.categories["flooding"].questions] == ["call_110", "water_depth_cm", "observed_at"]
    site = GAOHANG.categories["safety_hazard"].questions[0]
    assert (site.code, site.required, [v.key for v in site.values]) == (
        "site_type",
        True,
        ["factory", "warehouse", "other"],
    )
    assert not GAOHANG.categories["exposed_garbage"].questions


def test_the_cells_cover_the_town_without_overlap() -> None:
    cells = list(GAOHANG.grids.values())
    assert len(cells) == 12 and not any(c.geometry.equals(c.geometry.envelope) for c in cells)  # none a rectangle
    town = box(121.56, 31.27, 121.63, 31.33)
    union = shapely.union_all([c.geometry for c in cells])
    assert abs(union.area - town.area) < 1e-12 and union.symmetric_difference(town).area < 1e-12
    assert abs(sum(c.geometry.area for c in cells) - town.area) < 1e-12  # no overlap: the areas add up


def test_the_old_lattice_centers_are_still_in_their_cells() -> None:
    """Where tests, the simulator and the bench put reports in a cell by its code, the cell is still there."""
    for i, code in enumerate(f"gh{n:02d}" for n in range(1, 13)):
        row, col = divmod(i, 4)
        lat, lon = 31.28 + 0.02 * row, 121.56875 + 0.0175 * col
        grid = GAOHANG.grid_at(lat, lon)
        assert grid is not None and grid.code == code


def test_grid_lookup() -> None:
    rng = random.Random(3)
    for grid in GAOHANG.grids.values():
        for _ in range(20):
            lat, lon = grid.random_point(rng, 0.0006)
            assert GAOHANG.grid_at(lat, lon) is grid and grid.contains(lat, lon)
        assert GAOHANG.grid_at(*grid.center) is grid
    assert GAOHANG.grid_at(31.20, 121.60) is None
    assert GAOHANG.grid_at(31.30, 121.70) is None


def test_a_location_in_the_other_datum_is_converted_before_it_is_looked_up() -> None:
    lat, lon = 31.3005, 121.6118  # near an edge: GCJ-02 lies some 500 m away from WGS-84 here
    gcj = convert(lat, lon, Datum.WGS84, Datum.GCJ02)
    assert 300 < distance_m(lat, lon, *gcj) < 800
    back = convert(*gcj, Datum.GCJ02, Datum.WGS84)
    assert distance_m(lat, lon, *back) < 0.5
    assert GAOHANG.grid_at(*gcj, datum=Datum.GCJ02) is GAOHANG.grid_at(lat, lon)
    assert GAOHANG.grid_at(*gcj) is not GAOHANG.grid_at(lat, lon)  # the same numbers read as WGS-84


def test_each_grid_has_several_workers_of_its_own() -> None:
    for grid in GAOHANG.grids.values():
        assert len(grid.workers) >= 3
        for w in grid.workers:
            assert GAOHANG.grid_of_worker(w) is grid
            assert GAOHANG.roster[w].grids == (grid.code,)
    assert GAOHANG.grids["gh01"].workers[:2] == ("w-gh01-1", "w-gh01-2")
    assert GAOHANG.grid_of_worker("nobody") is None
    assert all(GAOHANG.staff.get(d) for d in GAOHANG.departments)


def test_routing_sends_a_river_section_to_its_office_and_the_rest_to_the_lead() -> None:
    lujiugou = (31.2950, 121.62148)  # on 芦九沟
    assert GAOHANG.route("river_pollution", *lujiugou) == "river_chief"
    under_bridge = (31.2812, 121.6126)  # 申江路桥下空间
    assert GAOHANG.route("under_bridge_space", *under_bridge) == "refinement"
    assert GAOHANG.route("under_bridge_space", 31.3200, 121.5700) == "planning"  # the lead
    heyue = GAOHANG.grids["gh06"]
    assert GAOHANG.route("elderly_facility", *heyue.center, heyue) == "community_building"
    assert (
        GAOHANG.route("elderly_facility", *GAOHANG.grids["gh01"].center, GAOHANG.grids["gh01"]) == "social_development"
    )
    assert GAOHANG.route("no_such_category", *lujiugou) is None


def test_the_calendar() -> None:
    cal = GAOHANG.calendar
    assert cal.is_workday(date(2026, 12, 8)) and not cal.is_workday(date(2026, 12, 12))  # a Tuesday, a Saturday
    assert not cal.is_workday(date(2026, 2, 17))  # 春节
    assert cal.is_workday(date(2026, 7, 11))  # the town's own flood-season duty Saturday
    assert [(p[0].isoformat(), p[1].isoformat()) for p in cal.working_periods(date(2026, 12, 8))] == [
        ("08:30:00", "11:30:00"),
        ("13:00:00", "17:30:00"),
    ]


def test_distance() -> None:
    assert distance_m(31.3, 121.6, 31.3, 121.6) == 0
    assert 1100 < distance_m(31.3, 121.6, 31.31, 121.6) < 1120


def test_each_category_says_whether_the_public_reads_its_incidents() -> None:
    """What happens inside private premises, or names a flat or a building's owner, is not public."""
    private = {c.code for c in GAOHANG.categories.values() if not c.public}
    assert {"illegal_construction", "group_renting", "safety_hazard"} <= private
    assert {"exposed_garbage", "flooding", "street_vending", "shared_bikes"} <= set(GAOHANG.categories) - private
    assert GAOHANG.public_categories == set(GAOHANG.categories) - private
