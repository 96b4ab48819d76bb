"""gridloop's categories as Open311 services, the extra questions (attributes) some of them ask, and their answers.

An answer to an attribute is checked against its definition and written into the incident's description, on
lines of their own after the reporter's text, so the department that handles the incident reads it on the work
order (gridloop's incident has no other place for it). Attributes a service does not define are ignored: clients
such as FixMyStreet send attributes of their own (``attribute[fixmystreet_id]`` and the like).
"""

from __future__ import annotations

import math
from typing import Any

from schemas.reference import Category, Choice, Question, Town

from ._open311_wire import Open311Error, parse_w3c, w3c

CHANGESET = "2026-12-08T00:00:00+08:00"
"""When the service list or a service definition last changed (Service Discovery's changeset): bump it then."""

_FAMILY_ZH = {
    "violations": "违法违章",
    "appearance": "市容",
    "garbage": "垃圾",
    "parking": "停车",
    "water": "河道",
    "greenery": "绿化",
    "safety": "安全",
    "facilities": "公共设施",
    "community": "社区",
    "housing": "房屋",
    "land": "土地",
}


def answer(q: Question, raw: list[str]) -> str:
    """The answer to ``q``, as written into the description; ValueError says what is wrong with it."""
    if q.datatype == "multivaluelist":
        keys = list(dict.fromkeys(raw))
        return "、".join(_choice(q, k).name for k in keys)
    if len(raw) > 1:
        raise ValueError("takes one value")
    value = raw[0]
    match q.datatype:
        case "singlevaluelist":
            return _choice(q, value).name
        case "number":
            return _number(q, value)
        case "datetime":
            try:
                return w3c(parse_w3c(q.code, value)) or ""
            except Open311Error as exc:
                raise ValueError(str(exc)) from None
        case "string" if "\n" in value or "\r" in value:
            raise ValueError("is one line of text (no line breaks)")
    if len(value) > q.max_length:
        raise ValueError(f"is at most {q.max_length} characters")
    return value


def _choice(q: Question, key: str) -> Choice:
    for choice in q.values:
        if choice.key == key:
            return choice
    keys = ", ".join(c.key for c in q.values)
    raise ValueError(f"{key[:40]!r} is not one of its values ({keys})")


def _number(q: Question, text: str) -> str:
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{text[:40]!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{text[:40]!r} is not a number")
    if q.whole and not number.is_integer():
        raise ValueError(f"{text[:40]!r} is not a whole number")
    if q.minimum is not None and number < q.minimum:
        raise ValueError(f"{number:g} is below the minimum, {q.minimum:g}")
    if q.maximum is not None and number > q.maximum:
        raise ValueError(f"{number:g} is above the maximum, {q.maximum:g}")
    return f"{number:g}"


def category(service_code: str, town: Town) -> Category:
    """The category behind ``service_code``; 404 in the spec's format when there is none."""
    found = town.categories.get(service_code)
    if found is None:
        raise Open311Error(404, f"service_code {service_code[:60]!r} not found: see services.xml for the list")
    return found


def service_name(service_code: str, town: Town) -> str:
    c = town.categories.get(service_code)
    return f"{c.name_zh} / {c.name_en}" if c else service_code


def department_name(code: str, town: Town) -> str:
    d = town.departments.get(code)
    return f"{d.name_zh} {d.name_en}" if d else code


def agency(departments: list[str], town: Town) -> str | None:
    """The department(s) a request was dispatched to, by name (Chinese and English)."""
    return "; ".join(department_name(d, town) for d in departments) or None


NOT_PUBLIC = (
    "此类诉求不公开：不在公开列表中，也不能按编号查询，进展请询12345。"
    " Requests of this service are not public: neither listed nor found by id; ask the 12345 hotline how it goes."
)
"""What a service whose requests the public does not read (``Category.public``) tells the poster."""


def service_notice(service_code: str, town: Town) -> str | None:
    c = town.categories.get(service_code)
    if c is None:
        return None
    lead = town.departments[c.lead]
    notice = (
        f"立案后派遣{lead.name_zh}处置，时限{c.deadline_hours:g}小时。"
        f" Once filed it goes to the {lead.name_en}, to be handled within {c.deadline_hours:g} hours."
    )
    return notice if c.public else f"{notice} {NOT_PUBLIC}"


def services(town: Town) -> list[dict[str, Any]]:
    return [
        {
            "service_code": c.code,
            "service_name": service_name(c.code, town),
            "description": _description(c, town),
            "metadata": bool(c.questions),
            "type": "realtime",
            "keywords": ", ".join((c.name_zh, c.name_en, _FAMILY_ZH.get(c.family, c.family), c.family)),
            "group": c.family,
        }
        for c in town.categories.values()
    ]


def _description(c: Category, town: Town) -> str:
    names = "、".join(town.departments[d].name_zh for d in c.departments)
    lead = town.departments[c.lead].name_en
    together = "；多部门联动 / all listed offices act together" if c.big else ""
    private = "" if c.public else " 不公开 / Requests are not public."
    return f"{c.name_zh}：{names}负责{together}。{c.name_en} in {town.name_en} town, led by the {lead}.{private}"


def definition(service_code: str, town: Town) -> dict[str, Any]:
    c = category(service_code, town)
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
            for order, a in enumerate(c.questions, start=1)
        ],
    }


def answers(service_code: str, given: dict[str, list[str]], town: Town) -> tuple[list[str], list[str]]:
    """The description lines for the attributes ``given`` (code → values), and the problems found with them."""
    lines: list[str] = []
    problems: list[str] = []
    c = town.categories.get(service_code)
    for a in c.questions if c else ():
        raw = given.get(a.code, [])
        if not a.variable:
            continue
        if not raw:
            if a.required:
                problems.append(f"attribute[{a.code}] is required: {a.description}")
            continue
        try:
            lines.append(f"{a.label}: {answer(a, raw)}")
        except ValueError as exc:
            problems.append(f"attribute[{a.code}] {exc}")
    return lines, problems
