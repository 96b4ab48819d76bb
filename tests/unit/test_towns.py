"""Town packages: a second town, written by hand and sharing nothing with Gaohang, and what validation says."""

from __future__ import annotations

import json
import random
import shutil
from datetime import date, time
from pathlib import Path
from typing import Any

import pytest
import shapely
from typer.testing import CliRunner

from schemas.reference import GAOHANG, Datum, DeadlineUnit, Kind, Role, convert
from schemas.towns import DEFAULT_TOWN_DIR, TownError, load_town, validate
from services.admin.__main__ import cli

HUBIN = Path(__file__).resolve().parent.parent / "fixtures" / "towns" / "hubin"


@pytest.fixture(scope="module")
def hubin() -> Any:
    return load_town(HUBIN)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A copy of the Hubin package to break."""
    return Path(shutil.copytree(HUBIN, tmp_path / "hubin"))


def test_the_second_town_shares_nothing_with_gaohang(hubin: Any) -> None:
    assert validate(HUBIN) == []
    assert (hubin.code, hubin.ops_center, hubin.timezone, hubin.datum, hubin.version) == (
        "hubin",
        "command",
        "Asia/Urumqi",
        Datum.GCJ02,
        "7",
    )
    assert not set(hubin.departments) & set(GAOHANG.departments)
    assert not set(hubin.categories) & set(GAOHANG.categories)
    assert not set(hubin.grids) & set(GAOHANG.grids)
    assert not set(hubin.roster) & set(GAOHANG.roster)
    assert hubin.basemap == "https://tiles.hubin.example/{z}/{x}/{y}.png"


def test_its_categories(hubin: Any) -> None:
    pothole, algae = hubin.categories["pothole"], hubin.categories["lake_algae"]
    assert (pothole.kind, pothole.gb_code, pothole.departments) == (Kind.COMPONENT, "0201", ("roads", "command"))
    assert (pothole.deadline.unit, pothole.deadline.amount, pothole.deadline_hours) == (
        DeadlineUnit.WORKING_HOURS,
        16,
        16,
    )
    assert hubin.categories["fallen_tree"].deadline_hours == 24  # one working day, on the wall clock for now
    assert algae.big and not algae.public and algae.kind is Kind.EVENT
    assert [q.code for q in hubin.categories["fly_tipping"].questions] == ["volume_m3"]


def test_grid_lookup_knows_the_hole(hubin: Any) -> None:
    assert hubin.grid_at(30.12, 120.11).code == "hb01"
    assert hubin.grid_at(30.135, 120.15).code == "hb02"
    assert hubin.grid_at(30.102, 120.155).code == "hb03"  # in the south shore's ring
    assert hubin.grid_at(30.110, 120.145).code == "hb04"  # in its hole: the island
    assert not hubin.grids["hb03"].contains(30.110, 120.145)
    assert hubin.grid_at(30.135, 120.105).code == "hb01"  # west of the slanting edge
    assert hubin.grid_at(30.125, 120.13).code == "hb02"  # east of it
    assert hubin.grid_at(30.09, 120.13) is None


def test_a_phone_location_is_converted_to_the_towns_datum(hubin: Any) -> None:
    """Hubin draws its cells in GCJ-02; a phone's WGS-84 fix of the same place is found in the same cell."""
    island_gcj = (30.110, 120.145)
    wgs = convert(*island_gcj, Datum.GCJ02, Datum.WGS84)
    assert hubin.grid_at(*wgs, datum=Datum.WGS84).code == "hb04"
    assert hubin.grid_at(*island_gcj, datum=Datum.GCJ02).code == "hb04"


def test_routing_by_grid_community_and_feature_else_the_lead(hubin: Any) -> None:
    island, north = hubin.grids["hb04"], hubin.grids["hb02"]
    assert hubin.route("fly_tipping", *island.center, island) == "parks"  # by grid
    assert hubin.route("fly_tipping", *north.center, north) == "sanitation"  # the lead
    assert hubin.route("blocked_drain", *north.center, north) == "sanitation"  # by community
    assert hubin.route("blocked_drain", 30.102, 120.155, hubin.grids["hb03"]) == "water"
    assert hubin.route("pothole", 30.1031, 120.145, hubin.grids["hb03"]) == "parks"  # on the lake loop road
    assert hubin.route("pothole", 30.135, 120.15, north) == "roads"


def test_its_roster(hubin: Any) -> None:
    assert hubin.grids["hb03"].workers == ("hb-en", "hb-fei")
    assert hubin.grids["hb04"].workers == ("hb-fei", "hb-gu")  # hb-fei works both
    assert hubin.grid_of_worker("hb-fei").code == "hb03"
    assert hubin.roster["hb-fei"].grids == ("hb03", "hb04")
    assert hubin.roster["road-1"].role is Role.STAFF and hubin.roster["road-1"].grids == ()
    assert "0000 0006" not in repr(hubin.roster["hb-fei"])  # the contact is never shown
    assert [p.id for p in hubin.staff["roads"]] == ["road-1"]


def test_its_calendar(hubin: Any) -> None:
    cal = hubin.calendar
    assert cal.hours == ((time(9), time(12)), (time(14), time(18)))
    assert cal.is_workday(date(2026, 12, 12))  # a Saturday: a six-day week
    assert not cal.is_workday(date(2026, 12, 13))
    assert not cal.is_workday(date(2026, 10, 1)) and cal.is_workday(date(2026, 5, 10))
    assert cal.is_workday(date(2026, 2, 17))  # no statutory Spring Festival here


def test_gaohang_and_hubin_pass_the_cli() -> None:
    runner = CliRunner()
    for folder in (DEFAULT_TOWN_DIR, HUBIN):
        result = runner.invoke(cli, ["town", "validate", str(folder)])
        assert result.exit_code == 0, result.output
        assert "is valid" in result.output


# -- validation: one test per rule, each with its message ------------------------------------------------------


def _features(folder: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((folder / "grids.geojson").read_text(encoding="utf-8"))
    return doc


def _write(folder: Path, doc: dict[str, Any]) -> None:
    (folder / "grids.geojson").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")


def _messages(folder: Path) -> list[str]:
    return [str(p) for p in validate(folder)]


def test_an_invalid_polygon_is_reported_with_shapelys_reason(copy: Path) -> None:
    doc = _features(copy)
    bowtie = [[120.10, 30.10], [120.125, 30.14], [120.125, 30.10], [120.10, 30.14], [120.10, 30.10]]
    doc["features"][0]["geometry"]["coordinates"] = [bowtie]
    _write(copy, doc)
    assert _messages(copy) == [
        "grids.geojson: feature 0 (hb01): invalid polygon: Self-intersection[120.1125 30.12]",
    ]


def test_an_unclosed_ring_is_reported(copy: Path) -> None:
    doc = _features(copy)
    doc["features"][1]["geometry"]["coordinates"][0].pop()
    _write(copy, doc)
    assert _messages(copy) == [
        "grids.geojson: feature 1 (hb02): exterior ring is not closed: "
        "it ends at [120.12, 30.14], not at [120.13, 30.12]",
    ]


def test_an_unclosed_hole_is_reported(copy: Path) -> None:
    doc = _features(copy)
    doc["features"][2]["geometry"]["coordinates"][1].pop()
    _write(copy, doc)
    assert _messages(copy) == [
        "grids.geojson: feature 2 (hb03): hole 1 is not closed: it ends at [120.15, 30.105], not at [120.14, 30.105]",
    ]


def test_overlapping_cells_are_reported(copy: Path) -> None:
    doc = _features(copy)
    doc["features"][2]["geometry"]["coordinates"] = [doc["features"][2]["geometry"]["coordinates"][0]]  # no hole
    _write(copy, doc)
    [message] = _messages(copy)
    assert message.startswith("grids.geojson: feature 2 (hb03): overlaps feature 3 (hb04) by about 1,0")
    assert message.endswith(" m²")


def test_a_routing_rule_naming_an_unknown_department_is_reported(copy: Path) -> None:
    with (copy / "routing.csv").open("a", encoding="utf-8") as f:
        f.write("pothole,hb01,,,,police,\n")
    assert _messages(copy) == ["routing.csv: line 5: unknown department 'police' (departments.csv)"]


def test_a_routing_rule_naming_an_unknown_grid_is_reported(copy: Path) -> None:
    with (copy / "routing.csv").open("a", encoding="utf-8") as f:
        f.write("pothole,hb09,,,,roads,\n")
    assert _messages(copy) == ["routing.csv: line 5: unknown grid 'hb09' (grids.geojson)"]


def test_a_category_without_a_deadline_is_reported(copy: Path) -> None:
    text = (copy / "categories.toml").read_text(encoding="utf-8")
    (copy / "categories.toml").write_text(text.replace("deadline = { working_days = 1 }\n", "", 1), encoding="utf-8")
    assert _messages(copy) == [
        "categories.toml: category 1 (fallen_tree): no deadline: give deadline.working_hours or deadline.working_days",
    ]


def test_a_worker_in_an_unknown_grid_is_reported(copy: Path) -> None:
    with (copy / "roster.csv").open("a", encoding="utf-8") as f:
        f.write("hb-hu,胡,grid_worker,command,hb01;hb07,+86 571 0000 0008\n")
    assert _messages(copy) == ["roster.csv: line 14: hb-hu works in unknown grid 'hb07' (grids.geojson)"]


def test_a_make_up_day_that_is_also_a_town_holiday_is_reported(copy: Path) -> None:
    with (copy / "calendar.toml").open("a", encoding="utf-8") as f:
        f.write('\n[[workday]]\ndate = 2026-10-01\nname = "调休"\n')
    assert _messages(copy) == [
        "calendar.toml: workday 2026-10-01 (调休): a make-up workday that is also a holiday (国庆节)"
    ]


def test_a_make_up_day_that_is_also_a_statutory_holiday_is_reported(copy: Path) -> None:
    text = (copy / "calendar.toml").read_text(encoding="utf-8").replace("statutory = false", "statutory = true")
    (copy / "calendar.toml").write_text(text + '\n[[workday]]\ndate = 2026-02-17\nname = "加班"\n', encoding="utf-8")
    [message] = _messages(copy)
    assert message.startswith("calendar.toml: workday 2026-02-17 (加班): a make-up workday that is also a holiday (")
    assert "Spring Festival" in message or "春节" in message


def test_every_problem_is_reported_at_once_and_loading_refuses(copy: Path) -> None:
    with (copy / "routing.csv").open("a", encoding="utf-8") as f:
        f.write("pothole,hb09,,,,police,\n")
    with (copy / "roster.csv").open("a", encoding="utf-8") as f:
        f.write("hb-hu,胡,grid_worker,command,hb07,+86 571 0000 0008\n")
    assert len(validate(copy)) == 3
    with pytest.raises(TownError, match="3 problem"):
        load_town(copy)
    result = CliRunner().invoke(cli, ["town", "validate", str(copy)])
    assert result.exit_code == 1
    assert "routing.csv: line 5: unknown grid 'hb09' (grids.geojson)" in result.output
    assert "roster.csv: line 14: hb-hu works in unknown grid 'hb07' (grids.geojson)" in result.output


def test_the_cell_index_answers_as_the_polygons_do(hubin: Any) -> None:
    """Whatever bucket a location falls in (inside a cell, on an edge, in a hole, off the town), the index names a
    cell the location lies in, and None only where none does."""
    rng = random.Random(11)
    for town, (south, west, north, east) in (
        (GAOHANG, (31.265, 121.555, 31.335, 121.635)),
        (hubin, (30.095, 120.095, 30.145, 120.165)),
    ):
        for _ in range(3000):
            lat, lon = rng.uniform(south, north), rng.uniform(west, east)
            found = town.grid_at(lat, lon)
            containing = [g for g in town.grids.values() if shapely.intersects_xy(g.geometry, lon, lat)]
            assert (found in containing) if found else not containing, (town.code, lat, lon)
