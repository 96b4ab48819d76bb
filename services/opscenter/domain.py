"""The operations center's (城运中心) rules: how every lifecycle event moves its read model of the loop.

- An incident is known from its report (上报): a report opens the row, with the grid its location falls in (the
  town's grid cells; none outside the town) and the status ``reported``.
- Every other event changes a known incident; one that arrives before its incident's report waits (it is
  parked), and is folded as soon as the report comes. An event that changes a work order (签收, 退回, 处置, 返工,
  延期, 催办) likewise waits for the work order's dispatch (派遣).
- The incident's status follows the loop (:data:`STATUS_AFTER`) until it is final (结案, 不予立案, merged): a
  late event never reopens it. A rejection or a merge makes it final; a closure (结案) closes it with its deadline,
  whether on time and its rework count as decided, and closes its handled work orders.
- A dispatch (派遣) adds the work order once: its department joins the incident's departments (in order, each
  once), and the incident's deadline is the latest of its work orders' (a rework (返工) and a granted extension
  (延期) move both). A return (退回) counts against the incident; a reminder (催办) and an escalation (督办) are
  marked, and a new deadline clears both marks of the work order.
- Stage durations (for the metrics), each counted once, from the events' own times: accept (派遣 → 签收), handle
  (派遣 → first 处置), verify (核查 requested → decided), close (上报 → 结案).
- The KPIs' rollups (:class:`Tally`) follow the rows: what an incident or a work order adds to the daily counters
  (in the town's days) is a function of the row alone, so a change of a row takes its old share back and adds
  its new one. Each handling (处置) and rework (返工) adds one to its day as it is folded.

Order across incidents does not matter. One incident's events are keyed by its id, so each producer's copies
arrive in order; across producers they may not (a retried send lands later): hence the parking. Folding the log
from offset 0 gives the same read model.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from types import MappingProxyType

from schemas import INCIDENT_FINAL, Event, IncidentStatus, WorkOrderStatus
from schemas import events as ev
from schemas.reference import Town

# -- state: the read model's rows (their fields are the tables' columns) -----------------------------------


@dataclass(kw_only=True)
class Incident:
    """One row per incident: where it is in the loop and the times KPIs are computed from."""

    incident_id: str
    source: str = ""
    category_code: str
    grid_id: str | None = None
    lat: float = 0.0
    lon: float = 0.0
    address: str = ""
    status: str
    """reported → filed → dispatched → in_progress/handled/verifying/rework → closed; or rejected / merged."""
    handled_on_spot: bool = False
    """小事一格解决: the reporter fixed it on the spot."""
    big: bool = False
    """大事全网联动: several departments engaged."""
    escalated: bool = False
    """督办: the operations center supervises it."""
    rework_count: int = 0
    """返工: how many times the work went back after a failed check."""
    return_count: int = 0
    """退回: how many work orders a department returned."""
    departments: str = ""
    """Every department that received a work order, space-separated, in order."""
    deadline: datetime | None = None
    """The latest deadline of its work orders; at closure, the one the closure was judged by."""
    on_time: bool | None = None
    reported_at: datetime
    filed_at: datetime | None = None
    rejected_at: datetime | None = None
    merged_at: datetime | None = None
    closed_at: datetime | None = None
    verifying_since: datetime | None = None


@dataclass(kw_only=True)
class WorkOrder:
    """One row per work order: its department, deadline and the stage times."""

    work_order_id: str
    incident_id: str
    department_code: str
    category_code: str
    grid_id: str | None = None
    status: str
    """dispatched, accepted, returned, handled, rework, closed."""
    deadline: datetime
    dispatched_at: datetime
    accepted_at: datetime | None = None
    handled_at: datetime | None = None
    """First time it was reported handled."""
    returned_at: datetime | None = None
    reminded: bool = False
    escalated: bool = False


Stage = tuple[str, float]
"""A stage an event completed and the seconds it took: accept, handle, verify or close."""


@dataclass(slots=True)
class Folded:
    """What folding one event did besides changing the rows it was given."""

    stages: list[Stage] = field(default_factory=list)
    order: WorkOrder | None = None
    """The work order the event dispatched, new: the store adds it."""


# -- the rules ------------------------------------------------------------------------------------------

STATUS_AFTER: Mapping[str, IncidentStatus] = MappingProxyType(
    {
        "IncidentFiled": IncidentStatus.FILED,
        "WorkOrderDispatched": IncidentStatus.DISPATCHED,
        "WorkOrderAccepted": IncidentStatus.IN_PROGRESS,
        "WorkOrderHandled": IncidentStatus.HANDLED,
        "VerificationRequested": IncidentStatus.VERIFYING,
        "IncidentReworked": IncidentStatus.REWORK,
    }
)
"""The incident's status after an event of the open loop, unless it is final already. (The operations center's
own view: a return leaves the status as it was, and a failed check shows as rework once the work order goes
back; rejections, merges and closures are set by :func:`fold` with their times.)"""

NEEDS_ORDER: tuple[type[Event], ...] = (
    ev.WorkOrderAccepted,
    ev.WorkOrderReturned,
    ev.WorkOrderHandled,
    ev.IncidentReworked,
    ev.ExtensionGranted,
    ev.OverdueReminded,
)
"""Events that change a work order and mean nothing without it: they wait for its dispatch."""


def open_incident(event: Event, town: Town) -> Incident | None:
    """The incident a report opens, in the town's grid its location falls in; None for any other event (it
    came ahead of its report, and waits for it)."""
    if not isinstance(event, ev.IncidentReported):
        return None
    grid = town.grid_at(event.location.lat, event.location.lon)
    return Incident(
        incident_id=event.incident_id,
        source=event.source.value,
        category_code=event.category_code,
        grid_id=grid.code if grid else None,
        lat=event.location.lat,
        lon=event.location.lon,
        address=event.location.address,
        status=IncidentStatus.REPORTED,
        handled_on_spot=event.handled_on_spot,
        reported_at=event.occurred_at,
    )


def work_order_of(event: Event) -> str | None:
    """The work order an event names (to be looked up before folding it), if any."""
    return getattr(event, "work_order_id", None)


def waits_for_order(event: Event, order: WorkOrder | None) -> bool:
    """Whether an event must wait for its work order's dispatch: it changes a work order not known yet."""
    return order is None and isinstance(event, NEEDS_ORDER)


def closes_orders(event: Event) -> bool:
    """Whether folding ``event`` needs all of its incident's work orders (a closure closes the handled ones)."""
    return isinstance(event, ev.IncidentClosed)


def released_by(event: Event) -> tuple[str, str] | None:
    """What the events waiting on ``event`` are waiting for, as (column, key): a report releases those of its
    incident, a dispatch those of its work order; None for any other event."""
    if isinstance(event, ev.IncidentReported):
        return "incident_id", event.incident_id
    if isinstance(event, ev.WorkOrderDispatched):
        return "work_order_id", event.work_order_id
    return None


def _seconds(later: datetime, earlier: datetime | None) -> float | None:
    return (later - earlier).total_seconds() if earlier else None


def _later(deadline: datetime, current: datetime | None) -> datetime:
    """The incident's deadline once a work order's is ``deadline``: the latest of them."""
    return max(deadline, current) if current else deadline


def fold(event: Event, incident: Incident, order: WorkOrder | None, orders: Iterable[WorkOrder] = ()) -> Folded:
    """Apply one lifecycle event to its incident and the work order it names (``order``, None if it names none
    or that one is unknown); ``orders``: all of the incident's work orders, for a closure (:func:`closes_orders`).
    Changes the rows in place; returns the stage durations it completed and a work order it dispatched."""
    folded = Folded()
    stages = folded.stages
    if incident.status not in INCIDENT_FINAL and (after := STATUS_AFTER.get(event.type)) is not None:
        incident.status = after

    match event:
        case ev.IncidentFiled(grid_id=grid_id, big=big):
            incident.grid_id, incident.big, incident.filed_at = grid_id, big, event.occurred_at
        case ev.IncidentRejected():
            incident.status, incident.rejected_at = IncidentStatus.REJECTED, event.occurred_at
        case ev.IncidentMerged():
            incident.status, incident.merged_at = IncidentStatus.MERGED, event.occurred_at
        case ev.WorkOrderDispatched():
            if order is None:
                folded.order = WorkOrder(
                    work_order_id=event.work_order_id,
                    incident_id=event.incident_id,
                    department_code=event.department_code,
                    category_code=event.category_code,
                    grid_id=event.grid_id,
                    status=WorkOrderStatus.DISPATCHED,
                    deadline=event.deadline,
                    dispatched_at=event.occurred_at,
                )
                depts = incident.departments.split()
                if event.department_code not in depts:
                    incident.departments = " ".join([*depts, event.department_code])
                incident.deadline = _later(event.deadline, incident.deadline)
        case ev.WorkOrderAccepted() if order is not None:
            order.status = WorkOrderStatus.ACCEPTED
            if order.accepted_at is None:  # 签收 is timed once, from the dispatch
                order.accepted_at = event.occurred_at
                stages.append(("accept", (event.occurred_at - order.dispatched_at).total_seconds()))
        case ev.WorkOrderReturned() if order is not None:
            order.status, order.returned_at = WorkOrderStatus.RETURNED, event.occurred_at
            incident.return_count += 1
        case ev.WorkOrderHandled() if order is not None:
            order.status = WorkOrderStatus.HANDLED
            if order.handled_at is None:  # 处置 too: the first report of the work done
                order.handled_at = event.occurred_at
                stages.append(("handle", (event.occurred_at - order.dispatched_at).total_seconds()))
        case ev.IncidentReworked() if order is not None:
            order.status, order.deadline = WorkOrderStatus.REWORK, event.deadline
            order.reminded = order.escalated = False
            incident.rework_count = max(incident.rework_count, event.rework_count)
            incident.deadline = _later(event.deadline, incident.deadline)
        case ev.ExtensionGranted() if order is not None:
            order.deadline = event.new_deadline
            order.reminded = order.escalated = False
            incident.deadline = _later(event.new_deadline, incident.deadline)
        case ev.OverdueReminded() if order is not None:
            order.reminded = True
        case ev.IncidentEscalated():
            incident.escalated = True
            if order is not None:
                order.escalated = True
        case ev.VerificationRequested():
            incident.verifying_since = event.occurred_at
        case ev.VerificationPassed() | ev.VerificationFailed():
            if (t := _seconds(event.occurred_at, incident.verifying_since)) is not None:
                stages.append(("verify", t))
        case ev.IncidentClosed():
            incident.status, incident.closed_at, incident.on_time = (
                IncidentStatus.CLOSED,
                event.occurred_at,
                event.on_time,
            )
            incident.deadline = event.deadline
            incident.rework_count = event.rework_count
            for o in orders:
                if o.status == WorkOrderStatus.HANDLED:
                    o.status = WorkOrderStatus.CLOSED
            if (t := _seconds(event.occurred_at, incident.reported_at)) is not None:
                stages.append(("close", t))
        case _:
            pass
    return folded


# -- the rollups: what each row adds to the KPIs' daily counters -------------------------------------------

TOTAL = "all"
"""The key of the whole town (the dimension ``none``)."""
OUTSIDE = "outside"
"""The grid key of an incident outside every grid cell."""
UNASSIGNED = "unassigned"
"""The department key of work no department is named for."""
OPEN = date.max
"""The close day of a case still open, in :attr:`Tally.due`."""

COUNTED = (
    "reported",
    "filed",
    "rejected",
    "merged",
    "dispatched",
    "returned",
    "handled",
    "reworks",
    "closed",
    "closed_on_time",
    "due_closed",
    "accept_n",
    "handle_n",
    "close_n",
)
"""The daily counters (whole numbers) of a rollup row."""
SUMMED = ("accept_s", "handle_s", "close_s")
"""The daily sums of stage durations, in seconds (a stage's mean is its sum over its count)."""
PER_EVENT = ("handled", "reworks")
"""The daily counters folded event by event (:meth:`Tally.event`); every other figure of the rollups is a function
of the rows (:meth:`Tally.incident`, :meth:`Tally.order`), so it can be worked out again from them alone."""

GAMMA = 2 ** (1 / 16)
"""The ratio of a stage histogram's consecutive bucket bounds: a bucket's middle is within 2.2 % of any
duration in it (the scale of a Prometheus native histogram of schema 4)."""
_LOG_GAMMA = math.log(GAMMA)
FLOOR = -200
"""The bucket of every duration of a millisecond or less (a stage timed at once)."""

Key = tuple[str, str]
"""A dimension (``department``, ``category``, ``grid``, ``none``) and a key of it."""

SPANS = ("day", "week", "month")
"""The periods the KPIs are asked for; the stage histograms are kept whole for each of them."""


def first_day(span: str, day: date) -> date:
    """The first day of the ``span`` (day; week from Monday; month) that holds ``day``."""
    if span == "week":
        return day - timedelta(days=day.weekday())
    if span == "month":
        return day.replace(day=1)
    return day


def bucket(seconds: float) -> int:
    """The histogram bucket of a duration: bucket ``b`` holds (γ^(b-1), γ^b] seconds."""
    if seconds <= 0.001:
        return FLOOR
    return math.ceil(math.log(seconds) / _LOG_GAMMA - 1e-9)


def bucket_value(b: int) -> float:
    """The duration a bucket stands for: the middle of its bounds, as a p90 read off the histogram."""
    return 0.0 if b <= FLOOR else 2 * GAMMA**b / (GAMMA + 1)


@dataclass(slots=True)
class Tally:
    """Additions to the rollups (negative where a changed row takes its old share back), per day of the town.

    - ``daily[(day, dimension, key)][counter]``: the :data:`COUNTED` and :data:`SUMMED` figures of the day;
    - ``due[(deadline day, close day, dimension, key)]``: filed cases whose deadline falls on a day they were not
      closed by (closed on a later day, or still open: :data:`OPEN`): a period holding the deadline counts them
      due (应结案) unless they closed in it;
    - ``stages[(day, dimension, key, stage, bucket)]``: the histograms of the accept, handle and close durations
      (their p90s), kept whole for the day, the week and the month that hold the day (:data:`SPANS`): a period's
      p90 reads its own histogram, never its days'."""

    town: Town
    daily: defaultdict[tuple[date, str, str], defaultdict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    due: Counter[tuple[date, date, str, str]] = field(default_factory=Counter)
    stages: Counter[tuple[date, str, str, str, int]] = field(default_factory=Counter)

    def __bool__(self) -> bool:
        return bool(self.daily or self.due or self.stages)

    def _add(self, when: datetime, keys: Iterable[Key], counter: str, n: float) -> None:
        day = self.town.local_day(when)
        daily = self.daily
        for dim, key in keys:
            daily[(day, dim, key)][counter] += n

    def _stage(self, when: datetime, keys: Iterable[Key], stage: str, seconds: float, sign: int) -> None:
        day, b = self.town.local_day(when), bucket(seconds)
        daily, stages = self.daily, self.stages
        for dim, key in keys:
            row = daily[(day, dim, key)]
            row[stage + "_n"] += sign
            row[stage + "_s"] += sign * seconds
            stages[(day, dim, key, stage, b)] += sign

    def incident(self, i: Incident, sign: int = 1) -> None:
        """What ``i`` adds to the rollups (takes it back with ``sign`` -1).

        - reported, filed, rejected, merged: on the day of each, for the category's lead department;
        - closed (结案), closed on time, due-and-closed, the close duration (上报 → 结案): on the closing day, for
          every department that worked on it (the lead if none did);
        - still due: a filed case whose deadline day passed before it closed (or that is open)."""
        category = self.town.categories.get(i.category_code)
        lead = category.lead if category else UNASSIGNED
        place = (("category", i.category_code), ("grid", i.grid_id or OUTSIDE), ("none", TOTAL))
        keys = (("department", lead), *place)
        for when, counter in (
            (i.reported_at, "reported"),
            (i.filed_at, "filed"),
            (i.rejected_at, "rejected"),
            (i.merged_at, "merged"),
        ):
            if when is not None:
                self._add(when, keys, counter, sign)
        worked = i.departments.split()
        closure = (*(("department", d) for d in worked), *place) if worked else keys
        closed = i.closed_at
        if closed is not None:
            self._add(closed, closure, "closed", sign)
            if i.on_time:
                self._add(closed, closure, "closed_on_time", sign)
            if i.filed_at is not None:
                self._add(closed, closure, "due_closed", sign)
            self._stage(closed, closure, "close", (closed - i.reported_at).total_seconds(), sign)
        if i.filed_at is not None and i.deadline is not None:
            deadline = self.town.local_day(i.deadline)
            closed_on = self.town.local_day(closed) if closed is not None else OPEN
            if closed_on > deadline:
                for dim, key in closure:
                    self.due[(deadline, closed_on, dim, key)] += sign

    def order(self, o: WorkOrder, sign: int = 1) -> None:
        """What ``o`` adds: dispatched (派遣) and returned (退回) on their days; the accept (派遣 → 签收) and
        handle (派遣 → first 处置) durations on the day they ended, for the work order's department."""
        keys = (
            ("department", o.department_code or UNASSIGNED),
            ("category", o.category_code),
            ("grid", o.grid_id or OUTSIDE),
            ("none", TOTAL),
        )
        self._add(o.dispatched_at, keys, "dispatched", sign)
        if o.returned_at is not None:
            self._add(o.returned_at, keys, "returned", sign)
        if o.accepted_at is not None:
            self._stage(o.accepted_at, keys, "accept", (o.accepted_at - o.dispatched_at).total_seconds(), sign)
        if o.handled_at is not None:
            self._stage(o.handled_at, keys, "handle", (o.handled_at - o.dispatched_at).total_seconds(), sign)

    def event(self, event: Event, incident: Incident) -> None:
        """What folding ``event`` adds by itself: every handling (处置) and every rework (返工) counts, not only a
        work order's first, for the department it names, in the incident's category and grid as they stand."""
        if isinstance(event, ev.WorkOrderHandled):
            counter = "handled"
        elif isinstance(event, ev.IncidentReworked):
            counter = "reworks"
        else:
            return
        keys = (
            ("department", event.department_code or UNASSIGNED),
            ("category", incident.category_code),
            ("grid", incident.grid_id or OUTSIDE),
            ("none", TOTAL),
        )
        self._add(event.occurred_at, keys, counter, 1)


__all__ = [
    "COUNTED",
    "FLOOR",
    "GAMMA",
    "NEEDS_ORDER",
    "OPEN",
    "OUTSIDE",
    "PER_EVENT",
    "SPANS",
    "STATUS_AFTER",
    "SUMMED",
    "TOTAL",
    "UNASSIGNED",
    "Folded",
    "Incident",
    "Key",
    "Stage",
    "Tally",
    "WorkOrder",
    "bucket",
    "bucket_value",
    "closes_orders",
    "first_day",
    "fold",
    "open_incident",
    "released_by",
    "waits_for_order",
    "work_order_of",
]
