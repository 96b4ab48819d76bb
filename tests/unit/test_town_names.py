"""No code names a town's codes: Gaohang's grid cells, workers, categories and departments live in its package
(``towns/gaohang``), and the services and the contract read them from the Town they are given."""

from __future__ import annotations

import re
from pathlib import Path

from schemas.reference import GAOHANG

ROOT = Path(__file__).resolve().parents[2]
LOADER = ROOT / "schemas" / "towns.py"
SHARED_WORDS = {"ops_center"}
"""Codes that are gridloop's own words too: the operations center's role and actor kind (``Role.OPS_CENTER``)."""


def gaohang_codes() -> set[str]:
    codes = set(GAOHANG.grids) | set(GAOHANG.categories) | set(GAOHANG.departments) | set(GAOHANG.roster)
    return codes - SHARED_WORDS


def named(text: str, codes: set[str]) -> set[str]:
    pattern = re.compile(
        r"(?<![\w-])(" + "|".join(sorted(map(re.escape, codes), key=len, reverse=True)) + r")(?![\w-])"
    )
    return set(pattern.findall(text))


def test_the_scan_finds_a_code_where_it_is_written() -> None:
    codes = gaohang_codes()
    assert named('worker = "w-gh01-1"  # in gh01, for exposed_garbage at city_ops', codes) == {
        "w-gh01-1",
        "gh01",
        "exposed_garbage",
        "city_ops",
    }
    assert named("gh011 w-gh01-10 my_city_ops flooding_level", codes) == set()


def test_no_service_or_contract_module_names_a_gaohang_code() -> None:
    codes = gaohang_codes()
    assert {"gh01", "w-gh01-1", "exposed_garbage", "city_ops"} <= codes
    found = {}
    for folder in ("services", "schemas"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == LOADER:
                continue
            hits = named(path.read_text(encoding="utf-8"), codes)
            if hits:
                found[str(path.relative_to(ROOT))] = sorted(hits)
    assert found == {}
