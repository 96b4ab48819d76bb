"""Read a town package into a :class:`~schemas.reference.Town`, or say everything that is wrong with it.

A package is a folder (``towns/gaohang`` is the worked example; the README describes each file)::

    town.toml          code, names, district, time zone, datum, operations center, version, basemap
    grids.geojson      the grid cells: an RFC 7946 FeatureCollection of Polygon/MultiPolygon features
    departments.csv    code, name_zh, name_en
    categories.toml    [[category]]: GB/T 30428 kind and codes, lead and support departments, priority, deadline,
                       big, public, the reporter's questions
    routing.csv        category × grid / community / named feature → department
    roster.csv         id, name, role, department, grids, contact
    calendar.toml      working hours, workdays, the town's days off and make-up workdays
    layers/*.geojson   optional map layers (roads, rivers, landmarks); named features can be routed on

:func:`validate` reads every file and returns every problem, each with its file, its feature index or line, and
what is wrong; :func:`load_town` returns the town or raises :class:`TownError` with them.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, time
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import shapely
from shapely.errors import GEOSException
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry
from shapely.validation import explain_validity

from schemas.reference import (
    Calendar,
    Category,
    Choice,
    Datum,
    Deadline,
    DeadlineUnit,
    Department,
    Grid,
    Kind,
    Person,
    Question,
    Role,
    RoutingRule,
    Sensor,
    Town,
    statutory_days,
)

TOWNS_DIR = Path(__file__).resolve().parent.parent / "towns"
DEFAULT_TOWN_DIR = TOWNS_DIR / "gaohang"
TOWN_DIR_ENV = "GRIDLOOP_TOWN_DIR"

OVERLAP_M2 = 1.0
"""Cells sharing more than this area (square metres) overlap; a shared edge has none."""

_DATATYPES = ("string", "number", "datetime", "text", "singlevaluelist", "multivaluelist")
_WEEKDAYS = {"mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6, "sun": 7}
_CODE = re.compile(r"^[A-Za-z0-9][\w.@:-]{0,63}$")
_HOURS = re.compile(r"^(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})$")


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    where: str
    """A feature index, a line, an entry: where in the file."""
    what: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.what}" if self.where else f"{self.file}: {self.what}"


class TownError(ValueError):
    def __init__(self, path: Path, problems: list[Problem]) -> None:
        self.problems = problems
        listed = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"town package {path} has {len(problems)} problem(s):\n{listed}")


def validate(path: Path | str) -> list[Problem]:
    """Every problem of the package at ``path`` (empty: it loads)."""
    return _Reader(Path(path)).read()[1]


def load_town(path: Path | str) -> Town:
    """The town of the package at ``path``; :class:`TownError` lists its problems if it has any."""
    town, problems = _Reader(Path(path)).read()
    if problems or town is None:
        raise TownError(Path(path), problems)
    return town


@functools.cache
def load_default() -> Town:
    """The package named by ``GRIDLOOP_TOWN_DIR``, else ``towns/gaohang``, read once."""
    return load_town(os.environ.get(TOWN_DIR_ENV) or DEFAULT_TOWN_DIR)


def _m2(geometry: BaseGeometry) -> float:
    """An area in square degrees as square metres, near the geometry's latitude."""
    lat = geometry.centroid.y if not geometry.is_empty else 0.0
    return float(geometry.area) * 111_320.0**2 * math.cos(math.radians(lat))


class _Reader:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.problems: list[Problem] = []
        self.named_grids: dict[str, str] = {}
        """Every cell's code → its community, its geometry valid or not (so one bad polygon is reported once)."""

    def problem(self, file: str, where: str, what: str) -> None:
        self.problems.append(Problem(file, where, what))

    # files

    def _file(self, name: str, required: bool) -> Path | None:
        """The package's file, or None (a problem if it is required)."""
        path = self.root / name
        if path.is_file():
            return path
        if required:
            self.problem(name, "", "missing")
        return None

    def _toml(self, name: str, required: bool = True) -> dict[str, Any] | None:
        path = self._file(name, required)
        if path is None:
            return None
        try:
            with path.open("rb") as f:
                return tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            self.problem(name, "", f"not TOML: {exc}")
            return None

    def _csv(self, name: str, columns: tuple[str, ...], required: bool = True) -> Iterator[tuple[int, dict[str, str]]]:
        path = self._file(name, required)
        if path is None:
            return
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = csv.DictReader(f)
            missing = [c for c in columns if c not in (rows.fieldnames or ())]
            if missing:
                self.problem(name, "line 1", f"the header lacks {', '.join(missing)}")
                return
            for row in rows:
                if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue
                cells = {k: (v or "").strip() for k, v in row.items() if isinstance(k, str) and isinstance(v, str)}
                yield rows.line_num, cells

    def _geojson(self, name: str, required: bool = True) -> list[dict[str, Any]] | None:
        path = self._file(name, required)
        if path is None:
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.problem(name, "", f"not JSON: {exc}")
            return None
        if (
            not isinstance(doc, dict)
            or doc.get("type") != "FeatureCollection"
            or not isinstance(doc.get("features"), list)
        ):
            self.problem(name, "", "not a GeoJSON FeatureCollection")
            return None
        features: list[dict[str, Any]] = doc["features"]
        return features

    # the package

    def read(self) -> tuple[Town | None, list[Problem]]:
        if not self.root.is_dir():
            return None, [Problem(str(self.root), "", "no such folder")]
        head = self._toml("town.toml") or {}
        departments = self._departments()
        grids = self._grids()
        features, layers = self._layers()
        categories = self._categories(departments)
        roster = self._roster(departments, grids)
        grids = {
            code: Grid(
                g.code,
                g.name_zh,
                g.name_en,
                g.geometry,
                tuple(p.id for p in roster.values() if p.role is Role.GRID_WORKER and code in p.grids),
                g.community,
            )
            for code, g in grids.items()
        }
        for code, grid in grids.items():
            if len(grid.workers) < 2:
                self.problem(
                    "roster.csv",
                    "",
                    f"grid {code} has {len(grid.workers)} grid worker(s): verification needs two, one who neither "
                    "reported nor fixed it",
                )
        routing = self._routing(categories, departments, grids, features)
        calendar = self._calendar()
        town = self._town(head, departments, categories, grids, roster, routing, calendar, layers, features)
        return (None if self.problems else town), self.problems

    def _town(
        self,
        head: dict[str, Any],
        departments: dict[str, Department],
        categories: dict[str, Category],
        grids: dict[str, Grid],
        roster: dict[str, Person],
        routing: tuple[RoutingRule, ...],
        calendar: Calendar,
        layers: dict[str, Mapping[str, Any]],
        features: dict[str, BaseGeometry],
    ) -> Town | None:
        name = "town.toml"
        text: dict[str, str] = {}
        for key in ("code", "name_zh", "name_en", "timezone", "datum", "ops_center", "version"):
            value = head.get(key)
            if not isinstance(value, str) or not value.strip():
                if head:
                    self.problem(name, key, "missing (a text)")
                continue
            text[key] = value.strip()
        try:
            ZoneInfo(text.get("timezone", "UTC"))
        except (ZoneInfoNotFoundError, ValueError):
            self.problem(name, "timezone", f"{text['timezone']!r} is not an IANA time zone")
        datums = [d.value for d in Datum]
        if "datum" in text and text["datum"] not in datums:
            self.problem(name, "datum", f"{text['datum']!r} is not one of {', '.join(datums)}")
        if "ops_center" in text and departments and text["ops_center"] not in departments:
            self.problem(name, "ops_center", f"unknown department {text['ops_center']!r} (departments.csv)")
        basemap = head.get("basemap")
        if basemap is not None and not ((isinstance(basemap, str) and "{z}" in basemap) or "WMTS" in str(basemap)):
            self.problem(name, "basemap", "an XYZ tile URL template with {z}, {x} and {y}, or a WMTS URL")
        if self.problems or len(text) < 7:
            return None
        return Town(
            text["code"],
            text["name_zh"],
            text["name_en"],
            MappingProxyType(departments),
            MappingProxyType(categories),
            MappingProxyType(grids),
            ops_center=text["ops_center"],
            timezone=text["timezone"],
            datum=Datum(text["datum"]),
            version=text["version"],
            roster=MappingProxyType(roster),
            routing=routing,
            calendar=calendar,
            layers=MappingProxyType(layers),
            features=MappingProxyType(features),
            basemap=basemap if isinstance(basemap, str) else None,
            district=str(head.get("district", "")),
        )

    def _departments(self) -> dict[str, Department]:
        found: dict[str, Department] = {}
        for line, row in self._csv("departments.csv", ("code", "name_zh", "name_en")):
            code = row["code"]
            if not _CODE.match(code):
                self.problem("departments.csv", f"line {line}", f"{code!r} is not a code (letters, digits, _ . : @ -)")
            elif code in found:
                self.problem("departments.csv", f"line {line}", f"department {code} is listed twice")
            elif not row["name_zh"] or not row["name_en"]:
                self.problem("departments.csv", f"line {line}", f"department {code} needs name_zh and name_en")
            else:
                found[code] = Department(code, row["name_zh"], row["name_en"])
        return found

    def _grids(self) -> dict[str, Grid]:
        name = "grids.geojson"
        features = self._geojson(name)
        found: dict[str, Grid] = {}
        where: dict[str, int] = {}
        for i, feature in enumerate(features or ()):
            props = feature.get("properties") if isinstance(feature, dict) else None
            props = props if isinstance(props, dict) else {}
            code = str(props.get("code") or "")
            at = f"feature {i}" + (f" ({code})" if code else "")
            missing = [k for k in ("code", "name_zh", "name_en", "community") if not str(props.get(k) or "").strip()]
            if missing:
                self.problem(name, at, f"properties lack {', '.join(missing)}")
                continue
            if code in self.named_grids:
                self.problem(name, at, f"grid {code} is also feature {where[code]}")
                continue
            self.named_grids[code], where[code] = props["community"], i
            geometry = self._polygon(name, at, feature.get("geometry"))
            if geometry is None:
                continue
            found[code] = Grid(code, props["name_zh"], props["name_en"], geometry, community=props["community"])
        self._overlaps(name, found, where)
        return found

    def _polygon(self, name: str, at: str, geometry: Any) -> Polygon | MultiPolygon | None:
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        if kind not in ("Polygon", "MultiPolygon"):
            self.problem(name, at, f"a grid cell is a Polygon or MultiPolygon, not {kind or 'nothing'}")
            return None
        assert isinstance(geometry, dict)
        coords: Any = geometry.get("coordinates")
        polygons: Any = [coords] if kind == "Polygon" else coords
        try:
            for p, rings in enumerate(polygons):
                for r, ring in enumerate(rings):
                    label = ("exterior ring" if r == 0 else f"hole {r}") + (
                        f" of polygon {p}" if kind != "Polygon" else ""
                    )
                    if len(ring) < 4:
                        self.problem(name, at, f"{label} has {len(ring)} positions: a ring needs at least 4")
                        return None
                    if list(ring[0]) != list(ring[-1]):
                        self.problem(name, at, f"{label} is not closed: it ends at {ring[-1]}, not at {ring[0]}")
                        return None
            parsed = shape(geometry)
        except (TypeError, ValueError, IndexError, AttributeError, GEOSException) as exc:
            self.problem(name, at, f"unreadable coordinates: {exc}")
            return None
        if not parsed.is_valid:
            self.problem(name, at, f"invalid polygon: {explain_validity(parsed)}")
            return None
        assert isinstance(parsed, Polygon | MultiPolygon)
        return parsed

    def _overlaps(self, name: str, grids: dict[str, Grid], where: dict[str, int]) -> None:
        cells = list(grids.values())
        tree = shapely.STRtree([g.geometry for g in cells])
        for i, a in enumerate(cells):
            for j in sorted(int(j) for j in tree.query(a.geometry, predicate="intersects")):
                if j <= i:
                    continue
                b = cells[j]
                shared = _m2(a.geometry.intersection(b.geometry))
                if shared > OVERLAP_M2:
                    self.problem(
                        name,
                        f"feature {where[a.code]} ({a.code})",
                        f"overlaps feature {where[b.code]} ({b.code}) by about {shared:,.0f} m²",
                    )

    def _layers(self) -> tuple[dict[str, BaseGeometry], dict[str, Mapping[str, Any]]]:
        named: dict[str, list[BaseGeometry]] = {}
        layers: dict[str, Mapping[str, Any]] = {}
        folder = self.root / "layers"
        for path in sorted(folder.glob("*.geojson")) if folder.is_dir() else ():
            name = f"layers/{path.name}"
            features = self._geojson(name)
            if features is None:
                continue
            layers[path.stem] = MappingProxyType({"type": "FeatureCollection", "features": features})
            for i, feature in enumerate(features):
                props = feature.get("properties") if isinstance(feature, dict) else None
                label = str((props or {}).get("name") or "")
                try:
                    geometry = shape(feature.get("geometry"))
                except (TypeError, ValueError, AttributeError, KeyError, GEOSException) as exc:
                    self.problem(name, f"feature {i}", f"unreadable geometry: {exc}")
                    continue
                if not geometry.is_valid:
                    self.problem(name, f"feature {i}", f"invalid geometry: {explain_validity(geometry)}")
                elif label:
                    named.setdefault(label, []).append(geometry)
        features_by_name = {k: shapely.union_all(v) if len(v) > 1 else v[0] for k, v in named.items()}
        for geometry in features_by_name.values():
            shapely.prepare(geometry)
        return features_by_name, layers

    def _categories(self, departments: dict[str, Department]) -> dict[str, Category]:
        name = "categories.toml"
        doc = self._toml(name) or {}
        found: dict[str, Category] = {}
        entries = doc.get("category", [])
        if doc and not isinstance(entries, list):
            self.problem(name, "", "categories are [[category]] tables")
            return found
        for i, entry in enumerate(entries):
            code = str(entry.get("code", "")) if isinstance(entry, dict) else ""
            at = f"category {i}" + (f" ({code})" if code else "")
            if not isinstance(entry, dict):
                self.problem(name, at, "not a table")
                continue
            category = self._category(name, at, entry, departments)
            if category is None:
                continue
            if category.code in found:
                self.problem(name, at, f"category {category.code} is listed twice")
                continue
            found[category.code] = category
        return found

    def _category(self, name: str, at: str, e: dict[str, Any], departments: dict[str, Department]) -> Category | None:
        before = len(self.problems)
        for key in ("code", "name_zh", "name_en", "family", "lead"):
            if not isinstance(e.get(key), str) or not e[key].strip():
                self.problem(name, at, f"{key} is missing")
        if before != len(self.problems):
            return None
        if not _CODE.match(e["code"]):
            self.problem(name, at, f"{e['code']!r} is not a code (letters, digits, _ . : @ -)")
        support = e.get("support", [])
        if not isinstance(support, list) or not all(isinstance(s, str) for s in support):
            self.problem(name, at, "support is a list of department codes")
            support = []
        chain = (e["lead"], *support)
        for d in chain:
            if d not in departments:
                self.problem(name, at, f"unknown department {d!r} (departments.csv)")
        if len(set(chain)) != len(chain):
            self.problem(name, at, "a department is named twice among lead and support")
        kind = e.get("kind")
        if kind not in [k.value for k in Kind]:
            self.problem(name, at, f"kind is 部件 or 事件, not {kind!r}")
        for key in ("major", "minor"):
            if not re.fullmatch(r"\d{2}", str(e.get(key, ""))):
                self.problem(name, at, f"{key} is a two-digit code (GB/T 30428), not {e.get(key)!r}")
        priority = e.get("priority")
        if not isinstance(priority, int) or isinstance(priority, bool) or not 1 <= priority <= 5:
            self.problem(name, at, f"priority is a whole number 1 (most urgent) … 5, not {priority!r}")
        deadline = self._deadline(name, at, e.get("deadline"))
        for key in ("big", "public", "on_spot"):
            if key in e and not isinstance(e[key], bool):
                self.problem(name, at, f"{key} is true or false")
        if "public" not in e:
            self.problem(name, at, "public is missing: say whether the public reads its incidents")
        share = e.get("share", 1)
        if not isinstance(share, int | float) or isinstance(share, bool) or share < 0:
            self.problem(name, at, f"share is a number ≥ 0, not {share!r}")
            share = 0
        sensor = None
        if isinstance(e.get("sensor"), dict):
            s = e["sensor"]
            if not isinstance(s.get("kind"), str) or not isinstance(s.get("share", 1), int | float):
                self.problem(name, at, "sensor is {kind = text, share = number}")
            else:
                sensor = Sensor(s["kind"], float(s.get("share", 1)))
        examples = e.get("examples", [])
        if not isinstance(examples, list) or not all(isinstance(x, str) for x in examples):
            self.problem(name, at, "examples is a list of texts")
            examples = []
        questions: list[Question] = []
        for j, raw in enumerate(e.get("question", [])):
            question = self._question(name, f"{at} question {j}", raw)
            if question is not None:
                questions.append(question)
        if before != len(self.problems) or deadline is None:
            return None
        assert isinstance(priority, int)
        return Category(
            e["code"],
            e["name_zh"],
            e["name_en"],
            e["family"],
            chain,
            priority,
            deadline.wall_clock_hours,
            bool(e.get("big", False)),
            public=bool(e["public"]),
            kind=Kind(str(kind)),
            major=str(e["major"]),
            minor=str(e["minor"]),
            deadline=deadline,
            questions=tuple(questions),
            share=float(share),
            on_spot=bool(e.get("on_spot", False)),
            sensor=sensor,
            examples=tuple(examples),
        )

    def _deadline(self, name: str, at: str, raw: Any) -> Deadline | None:
        units = [u.value for u in DeadlineUnit]
        if raw is None:
            self.problem(name, at, f"no deadline: give deadline.{units[0]} or deadline.{units[1]}")
            return None
        if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in units:
            self.problem(name, at, f"deadline is one of {{{units[0]} = N}} or {{{units[1]} = N}}, not {raw!r}")
            return None
        unit, amount = next(iter(raw.items()))
        if not isinstance(amount, int | float) or isinstance(amount, bool) or not amount > 0:
            self.problem(name, at, f"deadline.{unit} is a number above 0, not {amount!r}")
            return None
        return Deadline(float(amount), DeadlineUnit(unit))

    def _question(self, name: str, at: str, q: Any) -> Question | None:
        if not isinstance(q, dict):
            self.problem(name, at, "not a table")
            return None
        before = len(self.problems)
        for key in ("code", "datatype", "description"):
            if not isinstance(q.get(key), str) or not q[key]:
                self.problem(name, at, f"{key} is missing")
        if before != len(self.problems):
            return None
        if q["datatype"] not in _DATATYPES:
            self.problem(name, at, f"datatype is one of {', '.join(_DATATYPES)}, not {q['datatype']!r}")
            return None
        choices = tuple(Choice(str(c.get("key", "")), str(c.get("name", ""))) for c in q.get("choice", []))
        if q["datatype"].endswith("valuelist") and not choices:
            self.problem(name, at, f"a {q['datatype']} needs [[...question.choice]] entries")
            return None
        variable = q.get("variable", True)
        if variable and not q.get("label"):
            self.problem(name, at, "label is missing (how the answer is introduced in the description)")
            return None

        def number(key: str) -> float | None:
            v = q.get(key)
            return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

        return Question(
            q["code"],
            q["datatype"],
            str(q.get("label", "")),
            q["description"],
            required=bool(q.get("required", False)),
            datatype_description=q.get("datatype_description"),
            values=choices,
            variable=bool(variable),
            minimum=number("minimum"),
            maximum=number("maximum"),
            whole=bool(q.get("whole", False)),
            max_length=int(q.get("max_length", 200)),
        )

    def _roster(self, departments: dict[str, Department], grids: dict[str, Grid]) -> dict[str, Person]:
        name = "roster.csv"
        found: dict[str, Person] = {}
        roles = [r.value for r in Role]
        for line, row in self._csv(name, ("id", "name", "role", "department", "grids", "contact")):
            at = f"line {line}"
            before = len(self.problems)
            pid = row["id"]
            if not _CODE.match(pid):
                self.problem(name, at, f"{pid!r} is not an id (letters, digits, _ . : @ -)")
            elif pid in found:
                self.problem(name, at, f"{pid} is listed twice")
            if row["role"] not in roles:
                self.problem(name, at, f"role is one of {', '.join(roles)}, not {row['role']!r}")
            if row["department"] not in departments:
                self.problem(name, at, f"unknown department {row['department']!r} (departments.csv)")
            cells = tuple(g for g in re.split(r"[;\s]+", row["grids"]) if g)
            for g in cells:
                if g not in self.named_grids:
                    self.problem(name, at, f"{pid} works in unknown grid {g!r} (grids.geojson)")
            if row["role"] == Role.GRID_WORKER and not cells:
                self.problem(name, at, f"grid worker {pid} has no grid")
            if before == len(self.problems):
                found[pid] = Person(pid, row["name"], Role(row["role"]), row["department"], cells, row["contact"])
        return found

    def _routing(
        self,
        categories: dict[str, Category],
        departments: dict[str, Department],
        grids: dict[str, Grid],
        features: dict[str, BaseGeometry],
    ) -> tuple[RoutingRule, ...]:
        name = "routing.csv"
        rules: list[RoutingRule] = []
        communities = set(self.named_grids.values())
        columns = ("category", "grid", "community", "feature", "within_m", "department")
        for line, row in self._csv(name, columns, required=False):
            at = f"line {line}"
            before = len(self.problems)
            if row["category"] not in categories:
                self.problem(name, at, f"unknown category {row['category']!r} (categories.toml)")
            if row["department"] not in departments:
                self.problem(name, at, f"unknown department {row['department']!r} (departments.csv)")
            if row["grid"] and row["grid"] not in self.named_grids:
                self.problem(name, at, f"unknown grid {row['grid']!r} (grids.geojson)")
            if row["community"] and row["community"] not in communities:
                self.problem(name, at, f"unknown community {row['community']!r} (no grid cell of grids.geojson)")
            if row["feature"] and row["feature"] not in features:
                self.problem(name, at, f"unknown feature {row['feature']!r} (no named feature of layers/)")
            within = 50.0
            if row["within_m"]:
                try:
                    within = float(row["within_m"])
                except ValueError:
                    within = -1
                if not 0 <= within <= 5000:
                    self.problem(name, at, f"within_m is metres 0–5000, not {row['within_m']!r}")
            if before == len(self.problems):
                rules.append(
                    RoutingRule(
                        row["category"],
                        row["department"],
                        row["grid"] or None,
                        row["community"] or None,
                        row["feature"] or None,
                        within,
                    )
                )
        return tuple(rules)

    def _calendar(self) -> Calendar:
        name = "calendar.toml"
        doc = self._toml(name) or {}
        hours: list[tuple[time, time]] = []
        for text in doc.get("hours", []):
            m = _HOURS.match(str(text))
            try:
                start, end = (time(int(m[1]), int(m[2])), time(int(m[3]), int(m[4]))) if m else (None, None)
            except ValueError:
                start, end = None, None
            if start is None or end is None or not start < end or (hours and start < hours[-1][1]):
                self.problem(name, "hours", f"{text!r} is not a period HH:MM-HH:MM after the one before")
            else:
                hours.append((start, end))
        if doc and not hours:
            self.problem(name, "hours", "no working hours")
        workdays: set[int] = set()
        for day in doc.get("workdays", []):
            if str(day).lower()[:3] not in _WEEKDAYS:
                self.problem(name, "workdays", f"{day!r} is not a weekday (Mon … Sun)")
            else:
                workdays.add(_WEEKDAYS[str(day).lower()[:3]])
        statutory = doc.get("statutory", True)
        if not isinstance(statutory, bool):
            self.problem(name, "statutory", "true (China's statutory holidays and make-up days apply) or false")
            statutory = True
        days_off = self._days(name, doc, "day_off")
        extra = self._days(name, doc, "workday")
        holidays = statutory_days()[0] if statutory else {}
        for day, label in extra.items():
            clash = days_off.get(day) or holidays.get(day)
            if clash:
                self.problem(
                    name, f"workday {day.isoformat()} ({label})", f"a make-up workday that is also a holiday ({clash})"
                )
        return Calendar(
            tuple(hours) or Calendar().hours,
            frozenset(workdays) if doc else Calendar().workdays,
            statutory,
            MappingProxyType(days_off),
            MappingProxyType(extra),
        )

    def _days(self, name: str, doc: dict[str, Any], key: str) -> dict[date, str]:
        days: dict[date, str] = {}
        for i, entry in enumerate(doc.get(key, [])):
            day = entry.get("date") if isinstance(entry, dict) else None
            if not isinstance(day, date):
                self.problem(name, f"{key} {i}", f"date is a TOML date (2026-10-10), not {day!r}")
                continue
            if day in days:
                self.problem(name, f"{key} {day.isoformat()}", "listed twice")
            days[day] = str(entry.get("name", ""))
        return days
