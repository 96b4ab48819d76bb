from __future__ import annotations

from schemas.reference import CATEGORIES, DEPARTMENTS, GRIDS, OPS_CENTER, distance_m, grid_at, grid_of_worker


def test_every_category_routes_to_known_departments() -> None:
    required = {
        "illegal_construction",
        "group_renting",
        "illegal_signage",
        "exposed_garbage",
        "garbage_sorting",
        "illegal_parking",
        "shared_bikes",
        "river_pollution",
        "greenery_damage",
        "safety_hazard",
        "flooding",
        "public_toilet",
        "idle_land",
        "street_vending",
    }
    assert required <= set(CATEGORIES)
    for c in CATEGORIES.values():
        assert c.departments and all(d in DEPARTMENTS for d in c.departments)
        assert 1 <= c.priority <= 5 and c.deadline_hours > 0
    assert OPS_CENTER in DEPARTMENTS


def test_grids_tile_gaohang_without_overlap() -> None:
    assert len(GRIDS) == 12
    for lat in (31.2701, 31.29, 31.3299):
        for lon in (121.5601, 121.6, 121.6299):
            hits = [g for g in GRIDS.values() if g.contains(lat, lon)]
            assert len(hits) == 1
    assert grid_at(31.20, 121.60) is None
    assert grid_at(31.30, 121.70) is None


def test_workers_belong_to_one_grid() -> None:
    for grid in GRIDS.values():
        for w in grid.workers:
            assert grid_of_worker(w) is grid
    assert grid_of_worker("nobody") is None


def test_distance() -> None:
    assert distance_m(31.3, 121.6, 31.3, 121.6) == 0
    assert 1100 < distance_m(31.3, 121.6, 31.31, 121.6) < 1120


def test_each_category_says_whether_the_public_reads_its_incidents() -> None:
    """What happens inside private premises, or names a flat or a building's owner, is not public."""
    private = {c.code for c in CATEGORIES.values() if not c.public}
    assert private == {"illegal_construction", "group_renting", "safety_hazard"}
    assert {"exposed_garbage", "flooding", "street_vending", "shared_bikes"} <= set(CATEGORIES) - private
