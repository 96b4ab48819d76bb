"""The outcome of a run, per department and in total, computed from the incidents' public timelines only.

``summarize(incidents)`` takes the bodies of ``GET /incidents/{id}`` (intake) and counts, per department:
work orders received (派遣), accepted (签收), returned (退回), extensions asked/granted (延期), handled (处置),
sent back after a failed verification (返工), overdue reminders (催办), escalations (督办), and incidents closed
(结案) with the department's work in them, on time or late. Intake's timeline details name the department of
most transitions (see ``services.intake.handlers._detail``); where a detail does not (an acceptance, an extension
decision), the department is taken from the acting staff member (``name@department``) or from the work still
open in the incident's timeline.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from schemas.reference import default_town

DEPARTMENTS = default_town().departments
"""The default town's departments, whose work the table counts."""

TERMINAL = frozenset({"closed", "rejected", "merged"})

_CODES = sorted(DEPARTMENTS, key=len, reverse=True)
_CODE_RE = re.compile(r"(?<![a-z0-9_])(" + "|".join(map(re.escape, _CODES)) + r")(?![a-z0-9_])")


@dataclass(slots=True)
class DepartmentStats:
    code: str
    received: int = 0
    """派遣: work orders dispatched to the department."""
    accepted: int = 0
    returned: int = 0
    extensions_asked: int = 0
    extensions_granted: int = 0
    handled: int = 0
    """处置 reports, a rework handled again included."""
    rework: int = 0
    reminders: int = 0
    escalations: int = 0
    closed: int = 0
    """Closed incidents the department's handled work is part of."""
    on_time: int = 0

    @property
    def name_zh(self) -> str:
        d = DEPARTMENTS.get(self.code)
        return d.name_zh if d else self.code

    @property
    def name_en(self) -> str:
        d = DEPARTMENTS.get(self.code)
        return d.name_en if d else self.code


@dataclass(slots=True)
class Totals:
    reported: int = 0
    filed: int = 0
    rejected: int = 0
    merged: int = 0
    closed: int = 0
    on_time: int = 0
    on_spot: int = 0
    """Closed incidents fixed on the spot by the grid worker (小事一格解决)."""
    big: int = 0
    """Filed with all-network linkage (大事全网联动)."""
    reworked: int = 0
    """Incidents sent back at least once (返工)."""
    escalated: int = 0
    overdue: int = 0
    """Incidents reminded at least once (催办)."""
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def open(self) -> int:
        return self.reported - self.rejected - self.merged - self.closed

    @property
    def on_time_rate(self) -> float | None:
        return self.on_time / self.closed if self.closed else None


@dataclass(slots=True)
class Summary:
    departments: dict[str, DepartmentStats]
    totals: Totals
    stuck: list[tuple[str, str]]
    """(incident id, status) of every incident not in a terminal status."""

    def department_total(self) -> DepartmentStats:
        total = DepartmentStats("total")
        for row in self.departments.values():
            for name in (
                "received",
                "accepted",
                "returned",
                "extensions_asked",
                "extensions_granted",
                "handled",
                "rework",
                "reminders",
                "escalations",
                "closed",
                "on_time",
            ):
                setattr(total, name, getattr(total, name) + getattr(row, name))
        return total


def department_in(detail: str) -> str | None:
    """The first department code a timeline detail names, if any."""
    m = _CODE_RE.search(detail)
    return m.group(1) if m else None


def department_of_actor(actor_id: str) -> str | None:
    """``name@department`` (how the simulator's staff sign), or a bare department code."""
    tail = actor_id.rsplit("@", 1)[-1]
    return tail if tail in DEPARTMENTS else None


def _closed_on_time(incident: Mapping[str, Any], detail: str) -> bool:
    if "on time" in detail:
        return True
    if "late" in detail:
        return False
    deadline, closed_at = incident.get("deadline"), incident.get("closed_at")
    if not deadline or not closed_at:
        return True
    return _dt(closed_at) <= _dt(deadline)


def _dt(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))


class _Orders:
    """The work of one incident, per department, as its timeline unfolds."""

    def __init__(self) -> None:
        self.dispatched: list[str] = []
        self.pending: list[str] = []  # dispatched, not yet accepted or returned
        self.extension_asked: list[str] = []  # waiting for a decision
        self.handled: set[str] = set()

    def accept(self, dept: str | None) -> str | None:
        if dept is None and self.pending:
            dept = self.pending[0]
        if dept in self.pending:
            self.pending.remove(dept)
        return dept

    def drop(self, dept: str) -> None:
        if dept in self.pending:
            self.pending.remove(dept)


def summarize(incidents: Iterable[Mapping[str, Any]]) -> Summary:
    """Count everything the demo's table shows from ``GET /incidents/{id}`` bodies (dicts or parsed JSON)."""
    depts: dict[str, DepartmentStats] = {code: DepartmentStats(code) for code in DEPARTMENTS}
    totals = Totals()
    stuck: list[tuple[str, str]] = []

    def row(code: str | None) -> DepartmentStats | None:
        if code is None:
            return None
        return depts.setdefault(code, DepartmentStats(code))

    for incident in incidents:
        status = str(incident.get("status", ""))
        totals.reported += 1
        totals.statuses[status] += 1
        if status not in TERMINAL:
            stuck.append((str(incident.get("incident_id", "?")), status))
        orders = _Orders()
        seen: set[str] = set()
        closed_detail: str | None = None
        for entry in incident.get("timeline", ()):
            kind, detail = str(entry.get("type", "")), str(entry.get("detail", ""))
            actor_id = str(entry.get("actor_id", ""))
            seen.add(kind)
            named = department_in(detail)
            match kind:
                case "IncidentFiled":
                    if "大事全网联动" in detail or "all-network" in detail:
                        totals.big += 1
                case "WorkOrderDispatched":
                    if (r := row(named)) is not None:
                        r.received += 1
                        orders.dispatched.append(r.code)
                        orders.pending.append(r.code)
                case "WorkOrderAccepted":
                    if (r := row(orders.accept(named or department_of_actor(actor_id)))) is not None:
                        r.accepted += 1
                case "WorkOrderReturned":
                    code = named or department_of_actor(actor_id)
                    if (r := row(code)) is not None:
                        r.returned += 1
                        orders.drop(r.code)
                case "ExtensionRequested":
                    if (r := row(named or department_of_actor(actor_id))) is not None:
                        r.extensions_asked += 1
                        orders.extension_asked.append(r.code)
                case "ExtensionGranted" | "ExtensionRefused":
                    code = named or (orders.extension_asked[0] if orders.extension_asked else None)
                    if code in orders.extension_asked:
                        orders.extension_asked.remove(code)
                    if kind == "ExtensionGranted" and (r := row(code)) is not None:
                        r.extensions_granted += 1
                case "WorkOrderHandled":
                    if (r := row(named or department_of_actor(actor_id))) is not None:
                        r.handled += 1
                        orders.handled.add(r.code)
                case "IncidentReworked":
                    if (r := row(named)) is not None:
                        r.rework += 1
                case "OverdueReminded":
                    if (r := row(named)) is not None:
                        r.reminders += 1
                case "IncidentEscalated":
                    if (r := row(named)) is not None:
                        r.escalations += 1
                case "IncidentClosed":
                    closed_detail = detail
        if "IncidentFiled" in seen:
            totals.filed += 1
        if "IncidentReworked" in seen or "VerificationFailed" in seen:
            totals.reworked += 1
        if "IncidentEscalated" in seen:
            totals.escalated += 1
        if "OverdueReminded" in seen:
            totals.overdue += 1
        if status == "rejected":
            totals.rejected += 1
        elif status == "merged":
            totals.merged += 1
        elif status == "closed":
            totals.closed += 1
            on_time = _closed_on_time(incident, closed_detail or "")
            totals.on_time += on_time
            if incident.get("handled_on_spot"):
                totals.on_spot += 1
            for code in orders.handled:
                r = depts[code]
                r.closed += 1
                r.on_time += on_time
    return Summary(depts, totals, stuck)


# -- rendering ---------------------------------------------------------------------------------------------------


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "–"


ENGLISH_NAMES_FROM = 172
"""Console width from which the department table also shows the departments' English names."""


def department_table(summary: Summary, title: str = "Departments 各部门", *, english: bool = True) -> Table:
    table = Table(title=title, title_justify="left", show_lines=False, header_style="bold")
    table.add_column("部门", no_wrap=True)
    if english:
        table.add_column("Department", style="dim", no_wrap=True)
    headers = (
        "派遣\nreceived",
        "签收\naccepted",
        "退回\nreturned",
        "延期\nextensions\nasked/granted",
        "返工\nrework",
        "催办\nreminders",
        "督办\nescalations",
        "结案\nclosed",
        "按时\non time",
        "按时率\non-time %",
    )
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)

    def cells(r: DepartmentStats) -> list[str]:
        return [
            str(r.received),
            str(r.accepted),
            str(r.returned),
            f"{r.extensions_asked}/{r.extensions_granted}",
            str(r.rework),
            str(r.reminders),
            str(r.escalations),
            str(r.closed),
            str(r.on_time),
            _pct(r.on_time, r.closed),
        ]

    for r in summary.departments.values():
        if r.received or r.handled or r.reminders or r.escalations:
            table.add_row(r.name_zh, *([r.name_en] if english else []), *cells(r))
    total = summary.department_total()
    table.add_section()
    names = [Text("合计", style="bold")] + ([Text("All departments", style="bold")] if english else [])
    table.add_row(*names, *cells(total))
    return table


def totals_table(summary: Summary) -> Table:
    t = summary.totals
    table = Table(title="Town 全镇", title_justify="left", header_style="bold")
    for header in (
        "上报\nreported",
        "立案\nfiled",
        "不予立案\nrejected",
        "合并\nmerged",
        "结案\nclosed",
        "按时结案\non time",
        "按时率\non-time rate",
        "小事一格\non the spot",
        "大事联动\nbig",
        "返工\nreworked",
        "催办\noverdue",
        "督办\nescalated",
        "未结\nopen",
    ):
        table.add_column(header, justify="right")
    table.add_row(
        str(t.reported),
        str(t.filed),
        str(t.rejected),
        str(t.merged),
        str(t.closed),
        str(t.on_time),
        _pct(t.on_time, t.closed),
        str(t.on_spot),
        str(t.big),
        str(t.reworked),
        str(t.overdue),
        str(t.escalated),
        str(t.open),
    )
    return table


def render(summary: Summary, width: int = ENGLISH_NAMES_FROM) -> Group:
    """Both tables, for a console ``width`` columns wide."""
    return Group(department_table(summary, english=width >= ENGLISH_NAMES_FROM), Text(""), totals_table(summary))


def stuck_lines(summary: Summary, limit: int = 30) -> Sequence[str]:
    lines = [f"{incident_id}: {status or '?'}" for incident_id, status in summary.stuck[:limit]]
    if len(summary.stuck) > limit:
        lines.append(f"… and {len(summary.stuck) - limit} more")
    return lines
