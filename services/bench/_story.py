"""One incident's lifecycle as the services would have logged it, drawn at random: the events of its report and
filing, its work orders, their acceptance, returns, extensions and handling, the watchdog's reminders and
escalations, verification, rework and closure — or its rejection, its merge, or the stage where it stands still.

Every event is built as the service that emits it builds it (dispatch's ``domain``, handling's, verification's,
intake's): the same actors, correlation and causation ids, work-order and verification ids, deadlines from the
category's hours, the verifier chosen as dispatch chooses it, ``on_time`` judged against the latest deadline of
the incident's work orders. Times are wall-clock (time scale 1): a service answers an event within a second or
two, a department within minutes to days, a grid worker within hours.
"""

from __future__ import annotations

import contextlib
import random
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from schemas import Actor, ActorKind, Event, Location, Town, WorkOrderStatus
from schemas import events as ev
from schemas.reference import Category, Grid, distance_m
from services.simulator.actors import (
    EXTENSION_REASONS,
    FAIL_NOTES,
    PASS_NOTES,
    REFUSAL_REASONS,
    RESULTS,
    RETURN_REASONS,
    STAFF,
)
from services.simulator.town import (
    CATEGORY_WEIGHTS,
    DESCRIPTIONS,
    DUPLICATE_PREFIXES,
    PLACES,
    ROADS,
    SENSOR_CATEGORIES,
    UNKNOWN_CATEGORIES,
    draw_address,
    draw_citizen,
    draw_photo_urls,
    draw_point,
    offset_m,
)

E = TypeVar("E", bound=Event)

# -- the mix ---------------------------------------------------------------------------------------------------

OUTSIDE_SHARE = 0.012
"""Reports from outside every grid of the town: rejected (不予立案)."""
UNKNOWN_SHARE = 0.008
"""Reports of a category the town does not know: rejected."""
DUPLICATE_SHARE = 0.04
"""Reports of the same category a few metres from an open incident reported within the day: merged."""
ON_SPOT_SHARE = 0.10
"""小事一格解决: fixed by the reporting grid worker, verified and closed within hours."""
MAJOR_SHARE = 0.03
"""Reports of severity major: every department of the category is engaged at once (大事全网联动)."""
STILL_OPEN_SHARE = 0.105
"""Filed incidents that stop at some stage and are open when the history ends (besides those reported in its
last days): the backlog a town carries."""
STILL_OPEN_AT: dict[str, float] = {
    "dispatched": 0.2,
    "accepted": 0.3,
    "extension": 0.08,
    "verifying": 0.2,
    "rework": 0.14,
    "ops_center": 0.08,
}
"""Where an incident left open stands (weights): dispatched and never accepted, accepted and never handled, an
extension request never decided, a verification never decided, sent back for rework and not handled again, at
the operations center after its returns."""
RETURN_SHARE = 0.06
"""退回: a department (never the operations center) returns a small incident's work order."""
EXTENSION_SHARE = 0.05
"""延期: a department asks for more time after accepting."""
GRANT_SHARE = 0.8
LATE_SHARE = 0.12
"""Work handled after its deadline: reminded (催办), and escalated (督办) when a day late."""
FAIL_SHARE = 0.15
"""核查 fails the first check this often, a later one a third as often (at most two reworks)."""
ON_SPOT_FAIL_SHARE = 0.05
"""A fix on the spot that does not hold: the category's lead department takes it properly."""
SOURCES = {
    ev.Source.GRID_WORKER: 0.6,
    ev.Source.HOTLINE_12345: 0.25,
    ev.Source.OPEN311: 0.07,
    ev.Source.SENSOR: 0.08,
}
OPEN311_APPS = ("fixmystreet", "shanghai-citizen-app")
ESCALATE_AFTER = timedelta(hours=24)
"""dispatch's default ``escalate_after_hours``: an overdue work order is escalated a day past its deadline."""
MAX_RETURNS = 2
"""dispatch's default ``max_returns``: the second return sends the case to the operations center."""
DUPLICATE_WINDOW = timedelta(hours=24)
"""dispatch's default ``merge_window_hours``."""
_VERSION_4 = (0x4000 << 64) | (0x8000 << 48)
_NOT_VERSION_OR_VARIANT = ~((0xF000 << 64) | (0xC000 << 48))
"""The bits of a UUID that say it is random (version 4, RFC 4122 variant), and the others."""


@dataclass
class _Order:
    """A work order as dispatch follows it."""

    work_order_id: str
    department: str
    role: ev.WorkOrderRole
    attempt: int
    deadline: datetime
    dispatched_at: datetime
    status: str = WorkOrderStatus.DISPATCHED
    handled_by: list[str] = field(default_factory=list)
    reminded: bool = False
    escalated: bool = False


@dataclass(frozen=True, slots=True)
class _Recent:
    """An incident reported lately, which a duplicate may repeat while it is open."""

    incident_id: str
    category: str
    lat: float
    lon: float
    address: str
    description: str
    reporter_id: str
    reported_at: datetime
    open_until: datetime | None
    """When it was closed (None: not within the history)."""


@dataclass
class _Case:
    """What one incident's story keeps while it is drawn."""

    incident_id: str
    category: Category
    grid: Grid
    report: ev.IncidentReported
    big: bool
    reporter_id: str
    on_spot: bool
    orders: list[_Order] = field(default_factory=list)
    returns: int = 0
    reworks: int = 0
    rounds: int = 0


class StandsStill(Exception):
    """The story of an incident left open stops here (its events so far stand)."""


class Stories:
    """Draws incidents one after the other (in order of report), each as its list of events.

    Deterministic for the ``rng`` it is given: the same draws in the same order give the same events, their ids
    included."""

    def __init__(self, rng: random.Random, town: Town, end: datetime) -> None:
        self.rng = rng
        self.town = town
        self.end = end
        self.grids = list(town.grids.values())
        codes = list(town.categories)
        self._categories = codes
        self._category_weights = [CATEGORY_WEIGHTS.get(c, 3.0) for c in codes]
        self._on_spot = [c for c in codes if town.categories[c].on_spot]
        self._on_spot = [c for c in self._on_spot if c in town.categories] or [
            c for c in codes if not town.categories[c].big
        ]
        self._sensor = [c for c in SENSOR_CATEGORIES if c in town.categories]
        self._unknown = sorted(c for c in UNKNOWN_CATEGORIES if c not in town.categories)
        self._stages = list(STILL_OPEN_AT)
        self._stage_weights = list(STILL_OPEN_AT.values())
        self._recent: deque[_Recent] = deque(maxlen=40)
        self.dispatch = Actor.system("dispatch")
        self.watchdog = Actor.system("dispatch-watchdog")
        self.desk = Actor(kind=ActorKind.OPS_CENTER, id=f"duty@{town.ops_center}")
        self._staff: dict[str, list[Actor]] = {}
        self._workers: dict[str, Actor] = {}
        south = min(g.south for g in self.grids)
        north = max(g.north for g in self.grids)
        west = min(g.west for g in self.grids)
        east = max(g.east for g in self.grids)
        self._box = (south, north, west, east)
        self.events: list[Event] = []

    # -- small draws --------------------------------------------------------------------------------------------

    def _id(self) -> str:
        """A random (version 4) UUID, as the services' event ids, drawn from the story's generator."""
        n = self.rng.getrandbits(128) & _NOT_VERSION_OR_VARIANT | _VERSION_4
        h = f"{n:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def _after(self, t: datetime, lo_s: float = 0.02, hi_s: float = 1.5) -> datetime:
        """A service's answer to what happened at ``t``: a moment later."""
        return t + timedelta(seconds=self.rng.uniform(lo_s, hi_s))

    def _hours(self, lo: float, hi: float) -> timedelta:
        return timedelta(hours=self.rng.uniform(lo, hi))

    def _staff_of(self, department: str) -> Actor:
        actors = self._staff.get(department)
        if actors is None:
            actors = [
                Actor(kind=ActorKind.DEPARTMENT, id=f"{name}@{department}", department=department) for name in STAFF
            ]
            self._staff[department] = actors
        return self.rng.choice(actors)

    def _worker(self, worker_id: str) -> Actor:
        actor = self._workers.get(worker_id)
        if actor is None:
            actor = self._workers[worker_id] = Actor(kind=ActorKind.GRID_WORKER, id=worker_id)
        return actor

    def _description(self, category: str, place: str) -> str:
        templates = DESCRIPTIONS.get(category)
        if not templates:
            known = self.town.categories.get(category)
            return f"{place}{known.name_zh if known else category}"
        return self.rng.choice(templates).format(p=place, n=self.rng.randint(3, 30))

    def _urls(self, incident_id: str, kind: str, at_least: int = 0) -> list[str]:
        return draw_photo_urls(self.rng, self.town.code, kind, incident_id, at_least)

    def _emit(self, event: E) -> E:
        self.events.append(event)
        return event

    def _follow(self, kind: type[E], cause: Event, actor: Actor, at: datetime, **fields: Any) -> E:
        """An event following ``cause`` (its incident, correlation id and cause recorded), as dispatch builds it."""
        return self._emit(kind.following(cause, actor, event_id=self._id(), occurred_at=at, **fields))

    def _by_dispatch(self, kind: type[E], cause: Event, at: datetime, **fields: Any) -> E:
        """dispatch's answer to ``cause``: 立案, 派遣, 核查 asked, 结案, 返工, 督办, a rejection or a merge."""
        return self._follow(kind, cause, self.dispatch, at, **fields)

    def _own(self, kind: type[E], case: _Case, actor: Actor, at: datetime, **fields: Any) -> E:
        """An event that names no cause: a department's action, the watchdog's, the operations center's decision."""
        return self._emit(
            kind(
                event_id=self._id(),
                incident_id=case.incident_id,
                correlation_id=case.incident_id,
                actor=actor,
                occurred_at=at,
                **fields,
            )
        )

    def _on_order(self, kind: type[E], case: _Case, order: _Order, actor: Actor, at: datetime, **fields: Any) -> E:
        """An event of one work order (its id and department recorded) that names no cause."""
        return self._own(
            kind, case, actor, at, work_order_id=order.work_order_id, department_code=order.department, **fields
        )

    # -- the story of one incident ---------------------------------------------------------------------------

    def draw(self, reported_at: datetime) -> list[Event]:
        """The events of the next incident, reported at ``reported_at``, in the order they occur (ties in the
        order the services emit them); those past the history's end included (the caller leaves them out)."""
        self.events = []
        r = self.rng.random()
        if r < OUTSIDE_SHARE:
            self._outside(reported_at)
        elif r < OUTSIDE_SHARE + UNKNOWN_SHARE:
            self._unknown_category(reported_at)
        elif r < OUTSIDE_SHARE + UNKNOWN_SHARE + DUPLICATE_SHARE and self._duplicate(reported_at):
            pass
        elif r < OUTSIDE_SHARE + UNKNOWN_SHARE + DUPLICATE_SHARE + ON_SPOT_SHARE:
            self._filed(reported_at, on_spot=True)
        else:
            self._filed(reported_at, on_spot=False)
        return self.events

    def _incident_id(self, at: datetime) -> str:
        """intake's case number: the day and 48 random bits."""
        return f"GL{at:%Y%m%d}-{self.rng.getrandbits(48):012X}"

    def _reporter(self, grid: Grid, category: str) -> tuple[ev.Source, str, Actor]:
        """Who reports, and who is recorded as reporting (intake's ``reporting_actor``)."""
        sources = list(SOURCES)
        source = self.rng.choices(sources, weights=[SOURCES[s] for s in sources])[0]
        if source is ev.Source.SENSOR and category not in self._sensor:
            source = ev.Source.GRID_WORKER
        if source is ev.Source.GRID_WORKER:
            worker = self.rng.choice(grid.workers)
            return source, worker, self._worker(worker)
        if source is ev.Source.SENSOR:
            kind = SENSOR_CATEGORIES[category][0]
            sensor = f"sensor-{grid.code}-{kind}-{self.rng.randint(1, 9)}"
            return source, sensor, Actor(kind=ActorKind.SENSOR, id=sensor)
        if source is ev.Source.OPEN311:
            app = self.rng.choice(OPEN311_APPS)
            return source, app, Actor(kind=ActorKind.CITIZEN, id=app)
        citizen = draw_citizen(self.rng)
        return source, citizen, self.desk.on_behalf(citizen)

    def _report(
        self,
        at: datetime,
        category: str,
        lat: float,
        lon: float,
        address: str,
        description: str,
        source: ev.Source,
        reporter: str,
        actor: Actor,
        *,
        severity: ev.Severity = ev.Severity.NORMAL,
        on_spot: bool = False,
    ) -> ev.IncidentReported:
        incident_id = self._incident_id(at)
        client_report_id = f"h-{incident_id.lower()}" if source is not ev.Source.OPEN311 else f"o311-{self._id()}"
        return self._emit(
            ev.IncidentReported(
                event_id=self._id(),
                incident_id=incident_id,
                occurred_at=at,
                actor=actor,
                correlation_id=incident_id,
                source=source,
                category_code=category,
                location=Location(lat=lat, lon=lon, address=address),
                description=description,
                photo_urls=self._urls(incident_id, "photo", 1 if on_spot else 0)
                if source is not ev.Source.SENSOR
                else [],
                reporter_id=reporter,
                client_report_id=client_report_id,
                severity=severity,
                handled_on_spot=on_spot,
                evidence_urls=self._urls(incident_id, "evidence", 1) if on_spot else [],
            )
        )

    # rejected, merged ------------------------------------------------------------------------------------------

    def _outside(self, at: datetime) -> None:
        south, north, west, east = self._box
        side = self.rng.choice(("n", "s", "e", "w"))
        step = self.rng.uniform(0.003, 0.02)
        lat = self.rng.uniform(south, north) if side in "ew" else (north + step if side == "n" else south - step)
        lon = self.rng.uniform(west, east) if side in "ns" else (east + step if side == "e" else west - step)
        lat, lon = round(lat, 6), round(lon, 6)
        category = self.rng.choices(self._categories, weights=self._category_weights)[0]
        citizen = draw_citizen(self.rng)
        place = self.rng.choice(PLACES)
        report = self._report(
            at,
            category,
            lat,
            lon,
            f"{self.rng.choice(ROADS)}附近",
            self._description(category, place),
            ev.Source.HOTLINE_12345,
            citizen,
            self.desk.on_behalf(citizen),
        )
        reason = f"location {lat:.5f},{lon:.5f} lies outside every grid of the town"
        self._by_dispatch(
            ev.IncidentRejected,
            report,
            self._after(at),
            reason_code=ev.RejectReason.OUTSIDE_GRIDS,
            reason=reason,
        )

    def _unknown_category(self, at: datetime) -> None:
        grid = self.rng.choice(self.grids)
        code = self.rng.choice(self._unknown) if self._unknown else "unknown_matter"
        lat, lon = draw_point(self.rng, grid)
        address, place = draw_address(self.rng, grid, self.town)
        if self.rng.random() < 0.5:
            source, reporter = ev.Source.HOTLINE_12345, draw_citizen(self.rng)
            actor = self.desk.on_behalf(reporter)
        else:
            source, reporter = ev.Source.GRID_WORKER, self.rng.choice(grid.workers)
            actor = self._worker(reporter)
        words = UNKNOWN_CATEGORIES.get(code, "反映的问题不属于本镇受理范围")
        report = self._report(at, code, lat, lon, address, f"{place}{words}", source, reporter, actor)
        known = ", ".join(sorted(self.town.categories))
        self._by_dispatch(
            ev.IncidentRejected,
            report,
            self._after(at),
            reason_code=ev.RejectReason.UNKNOWN_CATEGORY,
            reason=f"unknown category {code!r}; known: {known}"[:1000],
        )

    def _duplicate(self, at: datetime) -> bool:
        """A report repeating an open incident nearby, merged into it; False when none is open to repeat."""
        filed_at = at + timedelta(seconds=2)
        candidates = [
            r
            for r in self._recent
            if at - r.reported_at <= DUPLICATE_WINDOW and (r.open_until is None or r.open_until > filed_at)
        ]
        if not candidates:
            return False
        original = self.rng.choice(candidates)
        lat, lon = offset_m(original.lat, original.lon, self.rng.uniform(2.0, 20.0), self.rng.uniform(0, 360))
        lat, lon = round(lat, 6), round(lon, 6)
        grid = self.town.grid_at(lat, lon)
        first = self.town.grid_at(original.lat, original.lon)
        if grid is None or first is None or grid.code != first.code:
            return False
        others = [w for w in grid.workers if w != original.reporter_id]
        if self.rng.random() < 0.6 or not others:
            source, reporter = ev.Source.HOTLINE_12345, draw_citizen(self.rng)
            actor = self.desk.on_behalf(reporter)
        else:
            source, reporter = ev.Source.GRID_WORKER, self.rng.choice(others)
            actor = self._worker(reporter)
        description = self.rng.choice(DUPLICATE_PREFIXES) + original.description
        report = self._report(
            at, original.category, lat, lon, original.address, description[:2000], source, reporter, actor
        )
        distance = distance_m(original.lat, original.lon, lat, lon)
        self._by_dispatch(
            ev.IncidentMerged,
            report,
            self._after(at),
            into_incident_id=original.incident_id,
            distance_m=round(distance, 1),
            category_code=original.category,
        )
        return True

    # filed ---------------------------------------------------------------------------------------------------

    def _filed(self, at: datetime, *, on_spot: bool) -> None:
        grid = self.rng.choice(self.grids)
        if on_spot:
            code = self.rng.choice(self._on_spot)
            source, reporter = ev.Source.GRID_WORKER, self.rng.choice(grid.workers)
            actor: Actor = self._worker(reporter)
        else:
            code = self.rng.choices(self._categories, weights=self._category_weights)[0]
            source, reporter, actor = self._reporter(grid, code)
        category = self.town.categories[code]
        severity = ev.Severity.MAJOR if not on_spot and self.rng.random() < MAJOR_SHARE else ev.Severity.NORMAL
        lat, lon = draw_point(self.rng, grid)
        address, place = draw_address(self.rng, grid, self.town)
        description = self._description(code, place)
        if severity is ev.Severity.MAJOR:
            description += "，情况严重，请尽快处置"
        if on_spot:
            description += "，已现场处置"
        report = self._report(
            at,
            code,
            lat,
            lon,
            address,
            description,
            source,
            reporter,
            actor,
            severity=severity,
            on_spot=on_spot,
        )
        case = _Case(
            incident_id=report.incident_id,
            category=category,
            grid=grid,
            report=report,
            big=category.big or severity is ev.Severity.MAJOR,
            reporter_id=reporter,
            on_spot=on_spot,
        )
        still = None
        if not on_spot and self.rng.random() < STILL_OPEN_SHARE:
            still = self.rng.choices(self._stages, weights=self._stage_weights)[0]
            if case.big and still == "ops_center":  # a big incident's work orders are not returned
                still = "accepted"
        closed_at: datetime | None = None
        with contextlib.suppress(StandsStill):
            closed_at = self._loop(case, self._after(at), still)
        self._recent.append(
            _Recent(
                report.incident_id,
                code,
                lat,
                lon,
                address,
                description,
                reporter,
                at,
                closed_at if closed_at is not None and closed_at < self.end else None,
            )
        )

    def _loop(self, case: _Case, t: datetime, still: str | None) -> datetime:
        """立案, then the work and the checks until 结案; returns when it closed (StandsStill if it does not)."""
        report = case.report
        category = case.category
        self._by_dispatch(
            ev.IncidentFiled,
            report,
            t,
            category_code=category.code,
            grid_id=case.grid.code,
            priority=category.priority,
            severity=report.severity,
            big=case.big,
            handled_on_spot=case.on_spot,
        )
        if case.on_spot:
            request = self._request_verification(case, report, t, list(report.evidence_urls))
            t, outcome = self._verify(case, request, t, ON_SPOT_FAIL_SHARE, still)
            if isinstance(outcome, ev.VerificationPassed):
                return self._close(case, outcome, t)
            # the fix did not hold: the lead department takes it properly (a new work order, not a 返工)
            case.reworks += 1
            order = self._dispatch(case, outcome, category.lead, ev.WorkOrderRole.LEAD, 1, self._after(t))
            t, handled = self._work(case, order, order.dispatched_at, still, may_return=False)
            return self._checks(case, handled, t, still)
        departments = category.departments if case.big else (category.lead,)
        orders = [
            self._dispatch(case, report, d, ev.WorkOrderRole.LEAD if i == 0 else ev.WorkOrderRole.SUPPORT, 1, t)
            for i, d in enumerate(departments)
        ]
        done = [
            self._work(case, o, t, still if i == 0 else None, may_return=not case.big) for i, o in enumerate(orders)
        ]
        t, handled = max(done, key=lambda d: d[0])
        return self._checks(case, handled, t, still)

    def _checks(self, case: _Case, handled: ev.WorkOrderHandled, t: datetime, still: str | None) -> datetime:
        """核查 once every work order is handled; 返工 and again until it passes (at most two reworks)."""
        while True:
            request = self._request_verification(case, handled, t, list(handled.evidence_urls))
            share = FAIL_SHARE if case.rounds == 1 else FAIL_SHARE / 3
            if case.reworks >= 2:
                share = 0.0
            elif still == "rework":
                share = 1.0  # it is left open in rework: the first check fails
            t, outcome = self._verify(case, request, t, share, still)
            if isinstance(outcome, ev.VerificationPassed):
                return self._close(case, outcome, t)
            t, handled = self._rework(case, outcome, t, still)

    # the steps dispatch takes ----------------------------------------------------------------------------------

    def _dispatch(
        self, case: _Case, cause: Event, department: str, role: ev.WorkOrderRole, attempt: int, t: datetime
    ) -> _Order:
        """派遣 (dispatch's ``_dispatch``): a work order numbered after the case's, due in the category's hours."""
        category = case.category
        order = _Order(
            work_order_id=f"{case.incident_id}-{len(case.orders) + 1}",
            department=department,
            role=role,
            attempt=attempt,
            deadline=t + timedelta(hours=category.deadline_hours),
            dispatched_at=t,
        )
        case.orders.append(order)
        report = case.report
        self._by_dispatch(
            ev.WorkOrderDispatched,
            cause,
            t,
            work_order_id=order.work_order_id,
            department_code=department,
            role=role,
            coordinator=self.town.ops_center if case.big else None,
            category_code=category.code,
            grid_id=case.grid.code,
            location=report.location,
            description=report.description,
            photo_urls=list(report.photo_urls),
            priority=category.priority,
            deadline=order.deadline,
            attempt=attempt,
        )
        return order

    def _request_verification(
        self, case: _Case, cause: Event, t: datetime, evidence: list[Any]
    ) -> ev.VerificationRequested:
        """核查 asked of a worker of the grid who neither reported it nor did the work (dispatch's ``verifier``)."""
        case.rounds += 1
        handled = [o for o in case.orders if o.status == WorkOrderStatus.HANDLED]
        handled_by = [case.reporter_id] if case.on_spot else []
        for person in (p for o in handled for p in o.handled_by):
            if person not in handled_by:
                handled_by.append(person)
        workers = case.grid.workers
        others = [w for w in workers if w != case.reporter_id and w not in handled_by]
        worker = (others or list(workers) or [case.reporter_id])[0]
        report = case.report
        return self._by_dispatch(
            ev.VerificationRequested,
            cause,
            t,
            verification_id=f"{case.incident_id}-v{case.rounds}",
            grid_id=case.grid.code,
            worker_id=worker,
            category_code=case.category.code,
            location=report.location,
            description=report.description,
            work_order_ids=[o.work_order_id for o in handled],
            evidence_urls=evidence[:10],
            round=case.rounds,
            reporter_id=case.reporter_id,
            handled_by=handled_by[:20],
        )

    def _verify(
        self, case: _Case, request: ev.VerificationRequested, t: datetime, fail_share: float, still: str | None
    ) -> tuple[datetime, ev.VerificationPassed | ev.VerificationFailed]:
        """The grid worker asked decides within hours (most within four): when, and the outcome."""
        if still == "verifying":
            raise StandsStill
        at = t + (self._hours(0.2, 4.0) if self.rng.random() < 0.85 else self._hours(4.0, 30.0))
        worker = self._worker(request.worker_id)
        common: dict[str, Any] = dict(verification_id=request.verification_id)
        if self.rng.random() < fail_share:
            note = self.rng.choice(FAIL_NOTES)
            return at, self._follow(ev.VerificationFailed, request, worker, at, note=note, **common)
        return at, self._follow(ev.VerificationPassed, request, worker, at, note=self.rng.choice(PASS_NOTES), **common)

    def _close(self, case: _Case, passed: ev.VerificationPassed, t: datetime) -> datetime:
        """结案 (dispatch's ``close_incident``): on time when by the latest deadline of its work orders."""
        at = self._after(t)
        deadline = max((o.deadline for o in case.orders), default=None)
        for o in case.orders:
            if o.status == WorkOrderStatus.HANDLED:
                o.status = WorkOrderStatus.CLOSED
        self._by_dispatch(
            ev.IncidentClosed,
            passed,
            at,
            category_code=case.category.code,
            grid_id=case.grid.code,
            departments=sorted({o.department for o in case.orders if o.status == WorkOrderStatus.CLOSED}),
            reported_at=case.report.occurred_at,
            deadline=deadline,
            on_time=deadline is None or at <= deadline,
            rework_count=case.reworks,
            return_count=case.returns,
            handled_on_spot=case.on_spot,
        )
        return at

    def _rework(
        self, case: _Case, failed: ev.VerificationFailed, t: datetime, still: str | None
    ) -> tuple[datetime, ev.WorkOrderHandled]:
        """返工 (dispatch's ``rework_incident``): the handled work orders go back with a new deadline, and are
        handled again."""
        case.reworks += 1
        at = self._after(t)
        handled = [o for o in case.orders if o.status == WorkOrderStatus.HANDLED]
        note = failed.note
        for order in handled:
            order.status = WorkOrderStatus.REWORK
            order.deadline = at + timedelta(hours=case.category.deadline_hours)
            order.reminded = order.escalated = False
            self._by_dispatch(
                ev.IncidentReworked,
                failed,
                at,
                work_order_id=order.work_order_id,
                department_code=order.department,
                rework_count=case.reworks,
                note=note,
                deadline=order.deadline,
            )
        if still == "rework":
            for order in handled:
                self._watch(case, order, self.end)
            raise StandsStill
        done = [self._handle(case, o, at) for o in handled]
        return max(done, key=lambda d: d[0])

    # the department's work -------------------------------------------------------------------------------------

    def _work(
        self, case: _Case, order: _Order, t: datetime, still: str | None, *, may_return: bool
    ) -> tuple[datetime, ev.WorkOrderHandled]:
        """签收 (or 退回, and the work goes elsewhere), maybe 延期, then 处置: returns when it was handled."""
        ops = self.town.ops_center
        if may_return and order.department != ops and self.rng.random() < RETURN_SHARE:
            return self._return(case, order, t, still)
        if still == "ops_center" and order.department == ops:
            self._watch(case, order, self.end)
            raise StandsStill
        if still == "ops_center":  # it gets there through returns
            return self._return(case, order, t, still)
        if still == "dispatched":
            self._watch(case, order, self.end)
            raise StandsStill
        accepted = t + self._accept_delay(case)
        self._watch(case, order, accepted)
        order.status = WorkOrderStatus.ACCEPTED
        staff = self._staff_of(order.department)
        self._on_order(ev.WorkOrderAccepted, case, order, staff, accepted)
        t = accepted
        if still == "accepted":
            self._watch(case, order, self.end)
            raise StandsStill
        if still == "extension" or self.rng.random() < EXTENSION_SHARE:
            t = self._extension(case, order, t, staff, still)
        return self._handle(case, order, t, staff)

    def _accept_delay(self, case: _Case) -> timedelta:
        """Most desks take new work within the hour; an eighth of the deadline at most, unless late anyway."""
        hours = case.category.deadline_hours
        if self.rng.random() < 0.03:
            return self._hours(hours * 0.5, hours * 1.6)  # left lying: accepted past its deadline now and then
        return timedelta(seconds=min(self.rng.expovariate(1 / 1500), hours * 3600 / 8))

    def _return(
        self, case: _Case, order: _Order, t: datetime, still: str | None
    ) -> tuple[datetime, ev.WorkOrderHandled]:
        """退回, and dispatch's ``reroute_work_order``: the next department of the category not tried yet, or the
        operations center after repeated returns or when none is left."""
        staff = self._staff_of(order.department)
        at = t + timedelta(seconds=self.rng.expovariate(1 / 2400))
        if self.rng.random() < 0.3:  # accepted first, returned once looked into
            accepted = t + timedelta(seconds=self.rng.expovariate(1 / 900))
            self._watch(case, order, accepted)
            order.status = WorkOrderStatus.ACCEPTED
            self._on_order(ev.WorkOrderAccepted, case, order, staff, accepted)
            at = accepted + timedelta(seconds=self.rng.expovariate(1 / 2400))
        self._watch(case, order, at)
        order.status = WorkOrderStatus.RETURNED
        case.returns += 1
        returned = self._on_order(ev.WorkOrderReturned, case, order, staff, at, reason=self.rng.choice(RETURN_REASONS))
        t = self._after(at)
        tried = {o.department for o in case.orders}
        candidates = [d for d in case.category.departments if d not in tried]
        ops = self.town.ops_center
        if case.returns < MAX_RETURNS and candidates:
            nxt = self._dispatch(case, returned, candidates[0], order.role, order.attempt + 1, t)
            return self._work(case, nxt, t, still, may_return=True)
        reason = f"returned {case.returns} times" if case.returns >= MAX_RETURNS else "no other department can take it"
        self._by_dispatch(
            ev.IncidentEscalated,
            returned,
            t,
            reason_code=ev.EscalationReason.REPEATED_RETURNS if candidates else ev.EscalationReason.NO_DEPARTMENT,
            reason=f"{reason}; last: {order.department}: {returned.reason}"[:1000],
            work_order_id=order.work_order_id,
            department_code=order.department,
        )
        to_ops = self._dispatch(case, returned, ops, order.role, order.attempt + 1, t)
        return self._work(case, to_ops, t, still, may_return=False)

    def _extension(self, case: _Case, order: _Order, t: datetime, staff: Actor, still: str | None) -> datetime:
        """延期 asked before the deadline, decided by the operations center within hours (most granted)."""
        hours = case.category.deadline_hours
        left = max((order.deadline - t).total_seconds(), 60.0)
        asked_at = t + timedelta(seconds=self.rng.uniform(0.1, 0.6) * left)
        self._watch(case, order, asked_at)
        wanted = max(order.deadline, asked_at) + self._hours(hours * 0.5, hours * 1.5)
        self._on_order(
            ev.ExtensionRequested,
            case,
            order,
            staff,
            asked_at,
            requested_deadline=wanted,
            reason=self.rng.choice(EXTENSION_REASONS),
        )
        if still == "extension":
            self._watch(case, order, self.end)
            raise StandsStill
        decided = asked_at + self._hours(0.1, 3.0)
        self._watch(case, order, decided)
        if self.rng.random() < GRANT_SHARE:
            order.deadline, order.reminded, order.escalated = wanted, False, False
            self._on_order(ev.ExtensionGranted, case, order, self.desk, decided, new_deadline=wanted)
        else:
            self._on_order(
                ev.ExtensionRefused, case, order, self.desk, decided, reason=self.rng.choice(REFUSAL_REASONS)
            )
        return decided

    def _handle(
        self, case: _Case, order: _Order, t: datetime, staff: Actor | None = None
    ) -> tuple[datetime, ev.WorkOrderHandled]:
        """处置: mostly well before the deadline, some after it (then reminded, and escalated a day past it)."""
        staff = staff or self._staff_of(order.department)
        if self.rng.random() < LATE_SHARE or order.deadline <= t:
            late = self._hours(0.2, 8.0) if self.rng.random() < 0.7 else self._hours(8.0, 48.0)
            at = max(order.deadline, t) + late
        else:
            at = t + (order.deadline - t) * self.rng.uniform(0.1, 0.9)
        self._watch(case, order, at)
        order.status = WorkOrderStatus.HANDLED
        order.handled_by = [staff.id]
        results = RESULTS.get(case.category.family, ("已处置完毕",))
        handled = self._on_order(
            ev.WorkOrderHandled,
            case,
            order,
            staff,
            at,
            result=self.rng.choice(results),
            evidence_urls=self._urls(order.work_order_id, "evidence", 1),
        )
        return self._after(at), handled

    def _watch(self, case: _Case, order: _Order, until: datetime) -> None:
        """dispatch's watchdog (``overdue_steps``, every second) on an order still owed until ``until``: 催办 once
        past its deadline, 督办 once a day past it."""
        deadline = order.deadline
        if not order.reminded:
            at = deadline + timedelta(seconds=self.rng.uniform(0.01, 1.0))
            if at >= until:
                return
            order.reminded = True
            late = (at - deadline).total_seconds()
            self._on_order(ev.OverdueReminded, case, order, self.watchdog, at, deadline=deadline, overdue_s=late)
        if not order.escalated:
            at = deadline + ESCALATE_AFTER + timedelta(seconds=self.rng.uniform(0.01, 1.0))
            if at >= until:
                return
            order.escalated = True
            late = (at - deadline).total_seconds()
            self._on_order(
                ev.IncidentEscalated,
                case,
                order,
                self.watchdog,
                at,
                reason_code=ev.EscalationReason.OVERDUE,
                reason=f"{order.department} is {late:.0f} s past its deadline",
            )


__all__ = ["StandsStill", "Stories"]
