"""The audit after a chaos run: what the lifecycle log and the services' databases say happened.

* **lost**: an incident whose report was accepted (202) but that never reached the log, or never ended
  (closed 结案, rejected 不予立案 or merged 合并).
* **duplicate transitions**: the same logical step of an incident taken twice under different event ids — two
  IncidentFiled, two WorkOrderDispatched for one work order id, two decisions on one verification, two terminal
  events for one incident, a 催办 reminder repeated for the same deadline… Each such extra event counts once.
* **redeliveries**: the same event id on the log more than once. At-least-once publishing makes these normal
  (consumers dedupe on event id); they are counted, never taken for duplicates.
* **state disagreements**: a service's database that does not match the log (an event it never applied, an
  outbox row never published, a status other than the log's outcome).

Everything here is a pure function of event lists and table rows, so it is tested on hand-made histories.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from schemas.events import TERMINAL_EVENTS

FINAL_STATUS = {"IncidentClosed": "closed", "IncidentRejected": "rejected", "IncidentMerged": "merged"}

HANDLED_TYPES: dict[str, frozenset[str] | None] = {
    "intake": None,
    "opscenter": None,
    "dispatch": frozenset(
        {
            "IncidentReported",
            "WorkOrderReturned",
            "WorkOrderAccepted",
            "ExtensionRequested",
            "WorkOrderHandled",
            "VerificationPassed",
            "VerificationFailed",
        }
    ),
    "handling": frozenset(
        {"WorkOrderDispatched", "IncidentReworked", "ExtensionGranted", "ExtensionRefused", "IncidentClosed"}
    ),
    "verification": frozenset({"VerificationRequested"}),
}
"""The event types each service applies (None: every type on the lifecycle log)."""


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One record of the lifecycle log: the decoded event and where it was."""

    event_id: str
    type: str
    incident_id: str
    body: Mapping[str, Any]
    partition: int = -1
    offset: int = -1
    raw: bytes = b""

    @classmethod
    def decode(cls, value: bytes | str | Mapping[str, Any], partition: int = -1, offset: int = -1) -> LogEvent:
        if isinstance(value, Mapping):
            body, raw = dict(value), orjson.dumps(dict(value))
        else:
            raw = value.encode() if isinstance(value, str) else bytes(value)
            body = orjson.loads(raw)
        return cls(str(body["event_id"]), str(body["type"]), str(body["incident_id"]), body, partition, offset, raw)


@dataclass(slots=True)
class Duplicate:
    """Events that repeat one logical transition: the first is the transition, the rest are duplicates."""

    key: tuple[Any, ...]
    incident_id: str
    event_ids: list[str]
    """Every event of the transition, in log order."""
    types: list[str]
    extra: list[str]
    """The event ids beyond what the transition allows: the duplicates."""

    def describe(self) -> str:
        what = " / ".join(dict.fromkeys(self.types))
        key = " ".join(str(k) for k in self.key[1:])
        return f"{self.incident_id}: {what} [{key}] × {len(self.event_ids)}, extra: {', '.join(self.extra)}"


@dataclass(slots=True)
class AuditResult:
    incidents: int
    """Incidents whose report was answered 202."""
    terminal: int
    missing_from_log: list[str]
    not_terminal: list[str]
    duplicates: list[Duplicate]
    duplicate_event_ids: set[str]
    redeliveries: int
    """Records beyond the first of each event id."""
    redelivered_events: int
    """Event ids that appear more than once."""
    conflicting_redeliveries: list[str]
    """Event ids that appear with different content: an event id reused, never expected."""
    unexpected_incidents: list[str]
    """Incidents on the log whose report no one was told had been accepted."""
    records: int
    events: int
    by_type: Counter[str] = field(default_factory=Counter)
    terminal_by_type: Counter[str] = field(default_factory=Counter)

    @property
    def lost(self) -> list[str]:
        return sorted({*self.missing_from_log, *self.not_terminal})

    @property
    def duplicate_transitions(self) -> int:
        return len(self.duplicate_event_ids)


def _ts(value: Any) -> str:
    """A timestamp as one canonical string, however it was written."""
    try:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


def transition_keys(e: LogEvent) -> list[tuple[Any, ...]]:
    """The logical transitions an event makes, each of which may happen at most once (none where it may recur).

    A report is taken once per incident and once per (reporter, client report id): two incidents made of one
    report are a duplicate too."""
    if e.type == "IncidentReported":
        return [
            ("IncidentReported", e.incident_id),
            ("report", e.body.get("reporter_id"), e.body.get("client_report_id")),
        ]
    key = transition_key(e)
    return [key] if key is not None else []


def transition_key(e: LogEvent) -> tuple[Any, ...] | None:
    """The logical transition an event makes, where each may happen at most once; None where it may recur."""
    b, t, inc = e.body, e.type, e.incident_id
    wo = b.get("work_order_id")
    match t:
        case "IncidentReported":
            return ("IncidentReported", inc)
        case "IncidentFiled":
            return ("IncidentFiled", inc)
        case "IncidentClosed" | "IncidentRejected" | "IncidentMerged":
            return ("terminal", inc)
        case "WorkOrderDispatched" | "WorkOrderAccepted" | "WorkOrderReturned":
            return (t, wo)
        case "VerificationRequested":
            return (t, b.get("verification_id"))
        case "VerificationPassed" | "VerificationFailed":
            return ("VerificationDecided", b.get("verification_id"))
        case "IncidentReworked":
            return (t, wo, b.get("rework_count"))
        case "OverdueReminded":
            return (t, wo, _ts(b.get("deadline")))
        case "ExtensionRequested":
            return (t, wo, _ts(b.get("requested_deadline")))
        case "ExtensionGranted":
            return (t, wo, _ts(b.get("new_deadline")))
        case "IncidentEscalated" if b.get("reason_code") != "overdue":
            return (t, b.get("reason_code"), wo or inc)
    return None


def _first_occurrences(records: Iterable[LogEvent]) -> tuple[list[LogEvent], int, int, list[str], int]:
    """Each event once, in log order of its first record; plus redelivery counts and conflicting ids."""
    first: dict[str, LogEvent] = {}
    seen: Counter[str] = Counter()
    conflicting: list[str] = []
    total = 0
    for r in records:
        total += 1
        seen[r.event_id] += 1
        prior = first.get(r.event_id)
        if prior is None:
            first[r.event_id] = r
        elif r.raw and prior.raw and orjson.loads(r.raw) != orjson.loads(prior.raw):
            conflicting.append(r.event_id)
    redeliveries = sum(n - 1 for n in seen.values())
    redelivered = sum(1 for n in seen.values() if n > 1)
    return list(first.values()), redeliveries, redelivered, sorted(set(conflicting)), total


def find_duplicates(events: Sequence[LogEvent]) -> list[Duplicate]:
    """Distinct events (one per event id, in log order) that repeat a transition already made."""
    keyed: dict[tuple[Any, ...], list[LogEvent]] = defaultdict(list)
    for e in events:
        for key in transition_keys(e):
            keyed[key].append(e)
    dups = [
        Duplicate(
            key,
            group[0].incident_id,
            [e.event_id for e in group],
            [e.type for e in group],
            [e.event_id for e in group[1:]],
        )
        for key, group in keyed.items()
        if len(group) > 1
    ]

    # Steps that may recur, but only as often as what re-opens them: 处置 once per round of rework, a 督办 for
    # lateness once per deadline (rework and granted extensions set new ones), a refusal once per request.
    reworks: Counter[str] = Counter()
    new_deadlines: Counter[str] = Counter()
    requests: Counter[str] = Counter()
    for key in keyed:
        if key[0] == "IncidentReworked":
            reworks[key[1]] += 1
            new_deadlines[key[1]] += 1
        elif key[0] == "ExtensionGranted":
            new_deadlines[key[1]] += 1
        elif key[0] == "ExtensionRequested":
            requests[key[1]] += 1
    counted: dict[tuple[str, str], list[LogEvent]] = defaultdict(list)
    for e in events:
        wo = str(e.body.get("work_order_id"))
        if e.type == "WorkOrderHandled":
            counted[("WorkOrderHandled", wo)].append(e)
        elif e.type == "IncidentEscalated" and e.body.get("reason_code") == "overdue":
            counted[("IncidentEscalated/overdue", wo)].append(e)
        elif e.type == "ExtensionRefused":
            counted[("ExtensionRefused", wo)].append(e)
    for (kind, wo), group in counted.items():
        allowed = {
            "WorkOrderHandled": 1 + reworks[wo],
            "IncidentEscalated/overdue": 1 + new_deadlines[wo],
            "ExtensionRefused": requests[wo],
        }[kind]
        if len(group) > allowed:
            dups.append(
                Duplicate(
                    (kind, wo, f"at most {allowed}"),
                    group[0].incident_id,
                    [e.event_id for e in group],
                    [e.type for e in group],
                    [e.event_id for e in group[allowed:]],
                )
            )
    return dups


def _excess(dups: Iterable[Duplicate]) -> set[str]:
    """The event ids that are duplicates (not the first of their transition)."""
    out: set[str] = set()
    for d in dups:
        out.update(d.extra)
    return out


def audit_log(records: Iterable[LogEvent], accepted: Iterable[str]) -> AuditResult:
    """Audit the lifecycle log (every record, redeliveries included) against the incidents accepted with 202."""
    events, redeliveries, redelivered, conflicting, total = _first_occurrences(records)
    accepted_ids = set(accepted)
    reported = {e.incident_id for e in events if e.type == "IncidentReported"}
    terminal_type: dict[str, str] = {}
    for e in events:
        if e.type in TERMINAL_EVENTS:
            terminal_type.setdefault(e.incident_id, e.type)
    dups = find_duplicates(events)
    return AuditResult(
        incidents=len(accepted_ids),
        terminal=sum(1 for i in accepted_ids if i in terminal_type),
        missing_from_log=sorted(accepted_ids - reported),
        not_terminal=sorted(i for i in accepted_ids & reported if i not in terminal_type),
        duplicates=dups,
        duplicate_event_ids=_excess(dups),
        redeliveries=redeliveries,
        redelivered_events=redelivered,
        conflicting_redeliveries=conflicting,
        unexpected_incidents=sorted(reported - accepted_ids),
        records=total,
        events=len(events),
        by_type=Counter(e.type for e in events),
        terminal_by_type=Counter(t for i, t in terminal_type.items() if i in accepted_ids),
    )


# -- each service's state against the log -------------------------------------------------------------------


@dataclass(slots=True)
class ServiceState:
    """What one service's database holds, read after the run."""

    processed: set[str]
    """Event ids in processed_event."""
    outbox: list[tuple[str, bool]]
    """(event id, published) for every outbox row."""
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _diff(what: str, have: set[str], want: set[str]) -> list[str]:
    problems = []
    if missing := want - have:
        problems.append(f"{what}: {len(missing)} missing (e.g. {', '.join(sorted(missing)[:3])})")
    if extra := have - want:
        problems.append(f"{what}: {len(extra)} not on the log (e.g. {', '.join(sorted(extra)[:3])})")
    return problems


def _statuses(state: ServiceState, table: str, key: str, want: Mapping[str, str], label: str) -> list[str]:
    rows = {str(r[key]): str(r["status"]) for r in state.tables.get(table, [])}
    wrong = sorted(i for i, status in want.items() if rows.get(i) != status)
    if not wrong:
        return []
    sample = ", ".join(f"{i} {rows.get(i)} (log: {want[i]})" for i in wrong[:3])
    return [f"{label}: {len(wrong)} disagree with the log (e.g. {sample})"]


def _ids(state: ServiceState, table: str, column: str) -> set[str]:
    return {str(r[column]) for r in state.tables.get(table, [])}


def _rollups_agree(state: ServiceState) -> list[str]:
    """The KPIs' daily rollups of the whole town add up to the read model's rows: every incident reported once,
    every work order dispatched once, every closed incident closed once."""
    days = [r for r in state.tables.get("ops_daily", []) if r["dim"] == "none"]
    incidents = state.tables.get("ops_incident", [])
    want = {
        "reported": len(incidents),
        "dispatched": len(state.tables.get("ops_work_order", [])),
        "closed": sum(r["status"] == "closed" for r in incidents),
    }
    problems = []
    for counter, n in want.items():
        if (summed := sum(int(r[counter]) for r in days)) != n:
            problems.append(f"rollups: {summed} {counter} over the days, against {n} in the read model")
    return problems


def check_states(records: Iterable[LogEvent], states: Mapping[str, ServiceState]) -> dict[str, list[str]]:
    """Service → disagreements between its database and the log (empty lists where all agree)."""
    events, *_ = _first_occurrences(records)
    ids = {e.event_id for e in events}
    final: dict[str, str] = {}
    for e in events:
        if e.type in FINAL_STATUS:
            final.setdefault(e.incident_id, FINAL_STATUS[e.type])
    incidents = {e.incident_id for e in events if e.type == "IncidentReported"}
    orders = {str(e.body["work_order_id"]) for e in events if e.type == "WorkOrderDispatched"}
    verifications = {str(e.body["verification_id"]) for e in events if e.type == "VerificationRequested"}
    decided = {
        str(e.body["verification_id"]): ("passed" if e.type == "VerificationPassed" else "failed")
        for e in events
        if e.type in ("VerificationPassed", "VerificationFailed")
    }
    out: dict[str, list[str]] = {}
    for service, state in states.items():
        problems: list[str] = []
        unpublished = [eid for eid, published in state.outbox if not published]
        if unpublished:
            problems.append(f"{len(unpublished)} outbox rows never published (e.g. {', '.join(unpublished[:3])})")
        off_log = sorted({eid for eid, _ in state.outbox} - ids)
        if off_log:
            problems.append(f"{len(off_log)} outbox events missing from the log (e.g. {', '.join(off_log[:3])})")
        types = HANDLED_TYPES.get(service)
        expected = {e.event_id for e in events if types is None or e.type in types}
        if not_applied := expected - state.processed:
            problems.append(f"{len(not_applied)} events never applied (e.g. {', '.join(sorted(not_applied)[:3])})")

        if service == "intake":
            problems += _diff("incidents", _ids(state, "intake_incident", "incident_id"), incidents)
            problems += _statuses(state, "intake_incident", "incident_id", final, "incident status")
            problems += _diff("timeline", _ids(state, "intake_transition", "event_id"), ids)
        elif service == "dispatch":
            problems += _diff("cases", _ids(state, "dispatch_case", "incident_id"), incidents)
            problems += _statuses(state, "dispatch_case", "incident_id", final, "case status")
            problems += _diff("work orders", _ids(state, "dispatch_work_order", "work_order_id"), orders)
        elif service == "handling":
            rows = state.tables.get("handling_work_order", [])
            problems += _diff("work orders", {str(r["work_order_id"]) for r in rows}, orders)
            open_after_close = sorted(
                str(r["work_order_id"])
                for r in rows
                if final.get(str(r["incident_id"])) == "closed" and r["status"] not in ("closed", "returned")
            )
            if open_after_close:
                problems.append(
                    f"{len(open_after_close)} work orders of closed incidents still open "
                    f"(e.g. {', '.join(open_after_close[:3])})"
                )
        elif service == "verification":
            rows = state.tables.get("verification_task", [])
            problems += _diff("verification tasks", {str(r["verification_id"]) for r in rows}, verifications)
            problems += _statuses(state, "verification_task", "verification_id", decided, "verification status")
        elif service == "opscenter":
            problems += _diff("incidents", _ids(state, "ops_incident", "incident_id"), incidents)
            problems += _statuses(state, "ops_incident", "incident_id", final, "incident status")
            problems += _rollups_agree(state)
        out[service] = problems
    return out
