"""The benchmark's arithmetic, free of I/O: percentiles, the verdict on a step, the summary line, hop counting."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from schemas.topics import topics_for

# -- percentiles -------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0–100) by linear interpolation between closest ranks; None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """Count, p50, p95, p99 and max of a list of latencies."""
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": float(max(values)) if values else None,
    }


# -- stages of one incident, from its lifecycle ---------------------------------------------------------------

STAGES: tuple[tuple[str, str, str], ...] = (
    # name, from, to: "sent" is the driver's clock just before POST /reports; the rest are lifecycle event types
    ("intake_http", "sent", "IncidentReported"),
    ("report_to_dispatched", "sent", "WorkOrderDispatched"),
    ("dispatched_to_accepted", "WorkOrderDispatched", "WorkOrderAccepted"),
    ("accepted_to_handled", "WorkOrderAccepted", "WorkOrderHandled"),
    ("handled_to_verification", "WorkOrderHandled", "VerificationRequested"),
    ("verification_to_passed", "VerificationRequested", "VerificationPassed"),
    ("passed_to_closed", "VerificationPassed", "IncidentClosed"),
    ("end_to_end", "sent", "IncidentClosed"),
)
"""The latencies measured per incident. The department and grid-worker stages include the actors' poll delay."""
TIMED_EVENTS = frozenset(point for _, start, end in STAGES for point in (start, end) if point != "sent")
"""The lifecycle event types whose times the stages are measured between."""

LOOP_EVENTS: tuple[str, ...] = (
    "IncidentReported",
    "IncidentFiled",
    "WorkOrderDispatched",
    "WorkOrderAccepted",
    "WorkOrderHandled",
    "VerificationRequested",
    "VerificationPassed",
    "IncidentClosed",
)
"""The events of one incident that goes round the loop once (one department, verification passed)."""


def stage_latencies_ms(times: Mapping[str, float]) -> dict[str, float]:
    """Each stage's latency (ms) for one incident, given epoch seconds per point (``sent`` and event types)."""
    out: dict[str, float] = {}
    for name, start, end in STAGES:
        if start in times and end in times:
            out[name] = (times[end] - times[start]) * 1000.0
    return out


# -- hops -----------------------------------------------------------------------------------------------------


def expected_hops(event_types: Iterable[str] = LOOP_EVENTS) -> int:
    """Kafka records the events cause: each goes to its own topic and to the lifecycle log."""
    return sum(len(topics_for(t)) for t in event_types)


def measured_hops(
    before: Mapping[str, int], after: Mapping[str, int], incidents: int
) -> tuple[float | None, dict[str, int]]:
    """Records per incident from end offsets summed per topic before and after; also the records per topic."""
    per_topic = {t: after.get(t, 0) - before.get(t, 0) for t in sorted(set(before) | set(after))}
    per_topic = {t: n for t, n in per_topic.items() if n}
    if incidents <= 0:
        return None, per_topic
    return sum(per_topic.values()) / incidents, per_topic


# -- one step of the ramp -------------------------------------------------------------------------------------


@dataclass
class Criteria:
    """When a step counts as sustained."""

    min_closure_share: float = 0.95
    """Closures per second in the measurement window, as a share of the offered rate. Both this and the next share
    are compared on counts with one incident of slack: a short window at a low rate holds few incidents, and whether
    one closes just inside or just after it is not a verdict on the loop (1/s over a 7.5-s window is 7 or 8)."""
    min_offered_share: float = 0.95
    """Reports the driver actually got accepted, as a share of the rate it was asked to offer."""
    backlog_floor: int = 10
    """Open incidents may always grow this much over a step (noise)…"""
    backlog_share: float = 0.05
    """…or this share of the incidents offered during the measurement window, whichever is larger."""
    max_error_share: float = 0.01
    """HTTP errors (anything but the expected answers) per request sent."""


@dataclass
class StepOutcome:
    offered_rate: float
    """Incidents per second the driver was asked to report."""
    duration_s: float
    """How long reports were sent."""
    sent: int
    """Reports accepted by intake (202)."""
    window_s: float
    """The measurement window (the step after its warm-up)."""
    closed_in_window: int
    """Incidents closed (IncidentClosed.occurred_at) inside the window, whenever they were reported."""
    open_samples: list[tuple[float, int]] = field(default_factory=list)
    """(seconds into the step, incidents reported and not closed yet), inside the window."""
    errors: int = 0
    requests: int = 0

    @property
    def sent_rate(self) -> float:
        return self.sent / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def closure_rate(self) -> float:
        return self.closed_in_window / self.window_s if self.window_s > 0 else 0.0

    @property
    def open_end(self) -> int:
        return self.open_samples[-1][1] if self.open_samples else 0


def slope(samples: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 for fewer than two distinct x)."""
    n = len(samples)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in samples) / n
    my = sum(y for _, y in samples) / n
    sxx = sum((x - mx) ** 2 for x, _ in samples)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in samples) / sxx


def backlog_growth(outcome: StepOutcome) -> float:
    """How much the open-incident count grew across the window (fitted line, robust to single samples)."""
    return slope(outcome.open_samples) * outcome.window_s


def evaluate_step(outcome: StepOutcome, criteria: Criteria | None = None) -> tuple[bool, str]:
    """Whether the step was sustained, and why (or why not)."""
    c = criteria or Criteria()
    offered = outcome.offered_rate
    reasons: list[str] = []
    if outcome.sent + 1 < c.min_offered_share * offered * outcome.duration_s:
        reasons.append(f"only {outcome.sent_rate:.1f}/s of {offered:g}/s reported (intake or driver saturated)")
    if outcome.closed_in_window + 1 < c.min_closure_share * offered * outcome.window_s:
        reasons.append(f"closed {outcome.closure_rate:.1f}/s < {c.min_closure_share:.0%} of {offered:g}/s")
    growth = backlog_growth(outcome)
    bound = max(c.backlog_floor, c.backlog_share * offered * outcome.window_s)
    if growth > bound:
        reasons.append(f"backlog grew by {growth:.0f} (> {bound:.0f})")
    if outcome.requests and outcome.errors > c.max_error_share * outcome.requests:
        reasons.append(f"{outcome.errors} HTTP errors in {outcome.requests} requests")
    if reasons:
        return False, "; ".join(reasons)
    return True, f"closed {outcome.closure_rate:.1f}/s, backlog {growth:+.0f}"


def highest_sustained(verdicts: Iterable[tuple[StepOutcome, bool]]) -> StepOutcome | None:
    """The sustained step with the highest offered rate (ties: the later one)."""
    best: StepOutcome | None = None
    for outcome, ok in verdicts:
        if ok and (best is None or outcome.offered_rate >= best.offered_rate):
            best = outcome
    return best


def next_rate(tried: Mapping[float, bool], ladder: Sequence[float], refine: int) -> float | None:
    """The next offered rate to try: up the ladder while steps pass; once one fails, bisect between the highest
    pass and the lowest failure ``refine`` times (rounded to whole incidents/s). None when done."""
    passed = [r for r, ok in tried.items() if ok]
    failed = [r for r, ok in tried.items() if not ok]
    if not failed:
        higher = [r for r in ladder if r not in tried and (not passed or r > max(passed))]
        return min(higher) if higher else None
    low_fail = min(failed)
    high_pass = max((r for r in passed if r < low_fail), default=0.0)
    bisections = sum(1 for r in tried if r not in ladder)
    if bisections >= refine or high_pass == 0.0:
        return None
    mid = float(round((high_pass + low_fail) / 2))
    if mid <= high_pass or mid >= low_fail or mid in tried:
        return None
    return mid


# -- RSS over a soak -----------------------------------------------------------------------------------------


def rss_growth(samples: Sequence[tuple[float, float]], head_s: float = 300.0, tail_s: float = 300.0) -> dict[str, Any]:
    """Average RSS over the first ``head_s`` and the last ``tail_s`` seconds of (t, rss_mb) samples, and the
    difference. The windows shrink to a third of the run each when it is shorter than both together."""
    if not samples:
        return {"first_mb": None, "last_mb": None, "growth_mb": None, "growth_pct": None}
    t0, t1 = samples[0][0], samples[-1][0]
    span = t1 - t0
    if span < head_s + tail_s:
        head_s = tail_s = span / 3
    first = [r for t, r in samples if t <= t0 + head_s] or [samples[0][1]]
    last = [r for t, r in samples if t >= t1 - tail_s] or [samples[-1][1]]
    a, b = sum(first) / len(first), sum(last) / len(last)
    return {
        "first_mb": round(a, 1),
        "last_mb": round(b, 1),
        "growth_mb": round(b - a, 1),
        "growth_pct": round(100 * (b - a) / a, 1) if a else None,
    }


# -- the summary line ----------------------------------------------------------------------------------------

SUMMARY_KEYS: tuple[str, ...] = (
    "incidents_per_s",
    "raw_hops_per_s",
    "hops_per_incident",
    "ratio_to_limit",
    "p99_report_to_dispatch_ms",
    "p99_end_to_end_ms",
    "peak_rss_mb",
    "duration_s",
)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def summary(
    *,
    incidents_per_s: float,
    raw_hops_per_s: float,
    hops_per_incident: float | None,
    p99_report_to_dispatch_ms: float | None,
    p99_end_to_end_ms: float | None,
    peak_rss_mb: Mapping[str, float],
    duration_s: float,
) -> dict[str, Any]:
    """The run's result, keys in the documented order; ratio_to_limit = incidents/s × hops / raw hops/s."""
    ratio = incidents_per_s * hops_per_incident / raw_hops_per_s if hops_per_incident and raw_hops_per_s > 0 else None
    return {
        "incidents_per_s": round(incidents_per_s, 2),
        "raw_hops_per_s": round(raw_hops_per_s, 1),
        "hops_per_incident": _round(hops_per_incident, 2),
        "ratio_to_limit": _round(ratio, 4),
        "p99_report_to_dispatch_ms": _round(p99_report_to_dispatch_ms, 1),
        "p99_end_to_end_ms": _round(p99_end_to_end_ms, 1),
        "peak_rss_mb": {k: round(v, 1) for k, v in sorted(peak_rss_mb.items())},
        "duration_s": round(duration_s, 1),
    }


def json_line(data: Mapping[str, Any]) -> str:
    """One line of compact JSON (no spaces), in the mapping's key order."""
    return orjson.dumps(dict(data)).decode()
