"""gridloop's categories as Open311 services, the extra questions (attributes) some of them ask, and their answers.

An answer to an attribute is checked against its definition and written into the incident's description, on
lines of their own after the reporter's text, so the department that handles the incident reads it on the work
order (gridloop's incident has no other place for it). Attributes a service does not define are ignored: clients
such as FixMyStreet send attributes of their own (``attribute[fixmystreet_id]`` and the like).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from schemas.reference import CATEGORIES, DEPARTMENTS, Category

from ._open311_wire import Open311Error, parse_w3c, w3c

CHANGESET = "2026-12-06T00:00:00+08:00"
"""When the service list or a service definition last changed (Service Discovery's changeset): bump it then."""

Datatype = Literal["string", "number", "datetime", "text", "singlevaluelist", "multivaluelist"]

_FAMILY_ZH = {
    "violations": "违法违章",
    "appearance": "市容",
    "garbage": "垃圾",
    "parking": "停车",
    "water": "河道",
    "greenery": "绿化",
    "safety": "安全",
    "facilities": "公共设施",
    "land": "土地",
}


@dataclass(frozen=True, slots=True)
class Choice:
    key: str
    name: str


@dataclass(frozen=True, slots=True)
class Attribute:
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

    def answer(self, raw: list[str]) -> str:
        """The answer, as written into the description; ValueError says what is wrong with it."""
        if self.datatype == "multivaluelist":
            keys = list(dict.fromkeys(raw))
            return "、".join(self._choice(k).name for k in keys)
        if len(raw) > 1:
            raise ValueError("takes one value")
        value = raw[0]
        match self.datatype:
            case "singlevaluelist":
                return self._choice(value).name
            case "number":
                return self._number(value)
            case "datetime":
                try:
                    return w3c(parse_w3c(self.code, value)) or ""
                except Open311Error as exc:
                    raise ValueError(str(exc)) from None
            case "string" if "\n" in value or "\r" in value:
                raise ValueError("is one line of text (no line breaks)")
        if len(value) > self.max_length:
            raise ValueError(f"is at most {self.max_length} characters")
        return value

    def _choice(self, key: str) -> Choice:
        for choice in self.values:
            if choice.key == key:
                return choice
        keys = ", ".join(c.key for c in self.values)
        raise ValueError(f"{key[:40]!r} is not one of its values ({keys})")

    def _number(self, text: str) -> str:
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{text[:40]!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{text[:40]!r} is not a number")
        if self.whole and not number.is_integer():
            raise ValueError(f"{text[:40]!r} is not a whole number")
        if self.minimum is not None and number < self.minimum:
            raise ValueError(f"{number:g} is below the minimum, {self.minimum:g}")
        if self.maximum is not None and number > self.maximum:
            raise ValueError(f"{number:g} is above the maximum, {self.maximum:g}")
        return f"{number:g}"


_CALL_110 = Attribute(
    "call_110",
    "string",
    "",
    "如有人员被困或触电危险，请立即拨打110 / If anyone is trapped or there is a risk of electric shock, call 110 now.",
    variable=False,
)

ATTRIBUTES: dict[str, tuple[Attribute, ...]] = {
    "safety_hazard": (
        Attribute(
            "site_type",
            "singlevaluelist",
            "场所类型 Site type",
            "隐患在什么场所？ What kind of site is the hazard at?",
            required=True,
            values=(
                Choice("factory", "厂房 Factory"),
                Choice("warehouse", "仓库 Warehouse"),
                Choice("other", "其他 Other"),
            ),
        ),
        Attribute(
            "hazards",
            "multivaluelist",
            "隐患 Hazards",
            "看到了哪些隐患（可多选）？ Which hazards did you see (any number)?",
            values=(
                Choice("blocked_exits", "消防通道堵塞 Blocked fire exits"),
                Choice("people_living", "违规住人 People living on site"),
                Choice("flammables", "易燃物堆放 Flammables stored"),
                Choice("wiring", "私拉电线 Makeshift wiring"),
            ),
        ),
    ),
    "group_renting": (
        Attribute(
            "residents_estimate",
            "number",
            "估计居住人数 Estimated residents",
            "大约有多少人住在这套房屋里？ About how many people live in the flat?",
            datatype_description="整数 1–200 / a whole number from 1 to 200",
            minimum=1,
            maximum=200,
            whole=True,
        ),
    ),
    "flooding": (
        _CALL_110,
        Attribute(
            "water_depth_cm",
            "number",
            "积水深度（厘米）Water depth (cm)",
            "积水大约有多深？ About how deep is the water?",
            required=True,
            datatype_description="厘米 0–300 / centimetres, 0 to 300",
            minimum=0,
            maximum=300,
        ),
        Attribute(
            "observed_at",
            "datetime",
            "发现时间 Seen at",
            "什么时候看到的积水？ When did you see the water?",
            datatype_description="W3C datetime with timezone, e.g. 2026-07-01T08:15:00+08:00",
        ),
    ),
    "illegal_parking": (
        Attribute(
            "plate_number",
            "string",
            "车牌号 Plate number",
            "车牌号（如看得到）The vehicle's plate number, if you can see it",
            datatype_description="例如 e.g. 沪A12345",
            max_length=20,
        ),
    ),
    "idle_land": (
        Attribute(
            "current_use",
            "text",
            "现状 Current use",
            "这块地现在被怎样使用？ How is the land being used now?",
            max_length=500,
        ),
    ),
}


def category(service_code: str) -> Category:
    """The category behind ``service_code``; 404 in the spec's format when there is none."""
    found = CATEGORIES.get(service_code)
    if found is None:
        raise Open311Error(404, f"service_code {service_code[:60]!r} not found: see services.xml for the list")
    return found


def service_name(service_code: str) -> str:
    c = CATEGORIES.get(service_code)
    return f"{c.name_zh} / {c.name_en}" if c else service_code


def department_name(code: str) -> str:
    d = DEPARTMENTS.get(code)
    return f"{d.name_zh} {d.name_en}" if d else code


def agency(departments: list[str]) -> str | None:
    """The department(s) a request was dispatched to, by name (Chinese and English)."""
    return "; ".join(department_name(d) for d in departments) or None


NOT_PUBLIC = (
    "此类诉求不公开：不在公开列表中，也不能按编号查询，进展请询12345。"
    " Requests of this service are not public: neither listed nor found by id; ask the 12345 hotline how it goes."
)
"""What a service whose requests the public does not read (``Category.public``) tells the poster."""


def service_notice(service_code: str) -> str | None:
    c = CATEGORIES.get(service_code)
    if c is None:
        return None
    lead = DEPARTMENTS[c.lead]
    notice = (
        f"立案后派遣{lead.name_zh}处置，时限{c.deadline_hours:g}小时。"
        f" Once filed it goes to the {lead.name_en}, to be handled within {c.deadline_hours:g} hours."
    )
    return notice if c.public else f"{notice} {NOT_PUBLIC}"


def services() -> list[dict[str, Any]]:
    return [
        {
            "service_code": c.code,
            "service_name": service_name(c.code),
            "description": _description(c),
            "metadata": bool(ATTRIBUTES.get(c.code)),
            "type": "realtime",
            "keywords": ", ".join((c.name_zh, c.name_en, _FAMILY_ZH.get(c.family, c.family), c.family)),
            "group": c.family,
        }
        for c in CATEGORIES.values()
    ]


def _description(c: Category) -> str:
    names = "、".join(DEPARTMENTS[d].name_zh for d in c.departments)
    lead = DEPARTMENTS[c.lead].name_en
    together = "；多部门联动 / all listed offices act together" if c.big else ""
    private = "" if c.public else " 不公开 / Requests are not public."
    return f"{c.name_zh}：{names}负责{together}。{c.name_en} in Gaohang town, led by the {lead}.{private}"


def definition(service_code: str) -> dict[str, Any]:
    c = category(service_code)
    return {
        "service_code": c.code,
        "attributes": [
            {
                "variable": a.variable,
                "code": a.code,
                "datatype": a.datatype,
                "required": a.required,
                "datatype_description": a.datatype_description,
                "order": order,
                "description": a.description,
                "values": [{"key": v.key, "name": v.name} for v in a.values],
            }
            for order, a in enumerate(ATTRIBUTES.get(c.code, ()), start=1)
        ],
    }


def answers(service_code: str, given: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """The description lines for the attributes ``given`` (code → values), and the problems found with them."""
    lines: list[str] = []
    problems: list[str] = []
    for a in ATTRIBUTES.get(service_code, ()):
        raw = given.get(a.code, [])
        if not a.variable:
            continue
        if not raw:
            if a.required:
                problems.append(f"attribute[{a.code}] is required: {a.description}")
            continue
        try:
            lines.append(f"{a.label}: {a.answer(raw)}")
        except ValueError as exc:
            problems.append(f"attribute[{a.code}] {exc}")
    return lines, problems
