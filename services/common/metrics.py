"""Prometheus metrics every service exports on /metrics (prefix ``gridloop_``, base units, ``_total`` counters).

Three kinds:

- technical, labelled by ``service``: records consumed, time to apply them, the outbox, dead letters, skipped
  redeliveries, HTTP requests (by route template, never the raw path, so the number of series stays bounded);
- domain, counted when an event leaves through the outbox (:func:`observe_outbox`), so a rolled-back change is
  never counted: reports, rejections, merges, work orders dispatched / returned / handled, reworks, reminders,
  escalations, closures. Their labels come from closed vocabularies only: category and department codes of
  the default town (anything else is ``other``) and the enums of ``schemas.events``;
- read at scrape time from a service's database: open and overdue work orders by department
  (:class:`WorkOrderBacklogCollector`, registered by handling).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas import Event, utcnow
from schemas.reference import default_town

log = logging.getLogger(__name__)

OTHER = "other"
"""The label value of a category or department code outside the reference data."""


def _counted(what: str, doc: str, labels: list[str]) -> Counter:
    """A counter under the project's naming: ``gridloop_<what>_total``."""
    return Counter(f"gridloop_{what}_total", doc, labels)


# -- technical ------------------------------------------------------------------------------------------

EVENTS_CONSUMED = _counted(
    "events_consumed", "Kafka records consumed, by topic and event type.", ["service", "topic", "type"]
)
OUTBOX_PUBLISHED = _counted("outbox_published", "Events published to Kafka through the outbox.", ["service"])
DUPLICATES_SKIPPED = _counted("duplicate_events", "Redelivered events recognised by event id and skipped.", ["service"])
DEAD_LETTERS = _counted(
    "dead_letters", "Records sent to the dead-letter topic, by kind of failure.", ["service", "kind"]
)
DEAD_LETTER_KINDS = ("decode", "poison", "error")
"""Kinds of dead letter the runtime writes: undecodable record, record that can never apply, handler bug."""
DEAD_LETTERS_UNSENDABLE = _counted(
    "dead_letters_unsendable",
    "Dead letters refused as too large: sent again without the record (reduced), or not at all (lost; the record "
    "stays on its source topic only).",
    ["service", "outcome"],
)
UNSENDABLE_OUTCOMES = ("reduced", "lost")
HANDLE_SECONDS = Histogram(
    "gridloop_handle_seconds",
    "Time to apply one event in its unit of work.",
    ["service", "type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
BATCH_SIZE = Histogram(
    "gridloop_batch_events",
    "Events applied together in one transaction by the consumer.",
    ["service"],
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
)
BATCH_FALLBACKS = _counted(
    "batch_fallbacks",
    "Consumed batches rolled back and applied one event at a time (a poison record or a handler error).",
    ["service"],
)
ROWS_PRUNED = _counted(
    "rows_pruned",
    "Rows deleted by retention: published outbox records, idempotency marks past redelivery.",
    ["service", "table"],
)
OUTBOX_PENDING = Gauge("gridloop_outbox_pending", "Outbox records not yet published.", ["service"])
HTTP_REQUESTS = _counted(
    "http_requests",
    "HTTP requests answered, by method, route template and status code.",
    ["service", "method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "gridloop_http_request_duration_seconds",
    "Time to answer one HTTP request, by method and route template.",
    ["service", "method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"
"""The route label of a request no route matched (404s of unknown paths)."""

# -- domain ---------------------------------------------------------------------------------------------


INCIDENTS_REPORTED = _counted(
    "incidents_reported", "Incidents reported (上报), by category and source.", ["category", "source"]
)
INCIDENTS_REJECTED = _counted("incidents_rejected", "Reports not filed (不予立案), by reason.", ["reason"])
INCIDENTS_MERGED = _counted("incidents_merged", "Reports merged into an open case of the same category.", ["category"])
WORK_ORDERS_DISPATCHED = _counted(
    "work_orders_dispatched",
    "Work orders dispatched (派遣) to a department, by department and category.",
    ["department", "category"],
)
WORK_ORDERS_RETURNED = _counted("work_orders_returned", "Work orders returned (退回) by a department.", ["department"])
WORK_ORDERS_HANDLED = _counted(
    "work_orders_handled", "Work orders reported handled (处置) by a department.", ["department"]
)
REWORKS = _counted("reworks", "Work orders sent back after failed verification (返工), by department.", ["department"])
OVERDUE_REMINDERS = _counted("overdue_reminders", "Overdue reminders (催办) sent, by department.", ["department"])
ESCALATIONS = _counted("escalations", "Incidents escalated to the operations center (督办), by reason.", ["reason"])
INCIDENTS_CLOSED = _counted(
    "incidents_closed",
    "Incidents closed (结案), by category and whether before the deadline.",
    ["category", "on_time"],
)


def category_label(code: str | None) -> str:
    """A category code of the reference data, or ``other``."""
    return code if code is not None and code in default_town().categories else OTHER


def department_label(code: str | None) -> str:
    """A department code of the reference data, or ``other``."""
    return code if code is not None and code in default_town().departments else OTHER


def observe_published(event: Event) -> None:
    """Count one event that has just been published (the domain counters); other event types count nothing."""
    _observe(event.model_dump(mode="json"))


def _observe(e: Mapping[str, Any]) -> None:
    """:func:`observe_published` on the event's JSON form (the outbox's records are counted without being decoded
    into models: a flush counts every record it sends)."""
    code = e.get("category_code")
    match e["type"]:
        case "IncidentReported":
            INCIDENTS_REPORTED.labels(category_label(code), e["source"]).inc()
        case "IncidentRejected":
            INCIDENTS_REJECTED.labels(e["reason_code"]).inc()
        case "IncidentMerged":
            INCIDENTS_MERGED.labels(category_label(code)).inc()  # the case it joins is of the same category
        case "WorkOrderDispatched":
            WORK_ORDERS_DISPATCHED.labels(department_label(e["department_code"]), category_label(code)).inc()
        case "WorkOrderReturned":
            WORK_ORDERS_RETURNED.labels(department_label(e["department_code"])).inc()
        case "WorkOrderHandled":
            WORK_ORDERS_HANDLED.labels(department_label(e["department_code"])).inc()
        case "IncidentReworked":
            REWORKS.labels(department_label(e["department_code"])).inc()
        case "OverdueReminded":
            OVERDUE_REMINDERS.labels(department_label(e["department_code"])).inc()
        case "IncidentEscalated":
            ESCALATIONS.labels(e["reason_code"]).inc()
        case "IncidentClosed":
            INCIDENTS_CLOSED.labels(category_label(code), "true" if e["on_time"] else "false").inc()
        case _:
            pass


def observe_outbox(payloads: Iterable[bytes]) -> None:
    """Count the events of outbox records just published. Never raises: metrics must not fail a flush."""
    for payload in payloads:
        try:
            _observe(orjson.loads(payload))
        except Exception:  # the outbox only holds encoded events; this would be a bug, not data
            log.exception("outbox record not counted")


# -- the service of this process --------------------------------------------------------------------------

_service = "unknown"


def current_service() -> str:
    """The service this process runs (set by :func:`instrument` when its API is created)."""
    return _service


def duplicate_skipped() -> None:
    """Count a redelivered event the bus recognised and skipped."""
    DUPLICATES_SKIPPED.labels(_service).inc()


def instrument(api: Any, service: str) -> None:
    """Make ``api`` (a FastAPI/Starlette app) count its requests, and start the service's series at zero.

    Series that exist from the start make ``increase()`` see the first dead letter or duplicate too.
    One process runs one service: this also names the service for :func:`duplicate_skipped`.
    """
    global _service
    _service = service
    for kind in DEAD_LETTER_KINDS:
        DEAD_LETTERS.labels(service, kind)
    for outcome in UNSENDABLE_OUTCOMES:
        DEAD_LETTERS_UNSENDABLE.labels(service, outcome)
    DUPLICATES_SKIPPED.labels(service)
    OUTBOX_PUBLISHED.labels(service)
    OUTBOX_PENDING.labels(service)
    BATCH_FALLBACKS.labels(service)
    api.add_middleware(HttpMetricsMiddleware, service=service)


def _route_template(scope: Scope, root_path: str) -> str:
    """The template of the route that answered (``/work-orders/{work_order_id}/accept``), the prefix of the mounted
    app that answered (``/metrics``), or ``unmatched``."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if isinstance(template, str) and template:
        return template
    mounted = scope.get("root_path", "")  # a mount appends its prefix to root_path in the shared scope
    if isinstance(mounted, str) and len(mounted) > len(root_path) and mounted.startswith(root_path):
        return mounted[len(root_path) :]
    return UNMATCHED_ROUTE


class HttpMetricsMiddleware:
    """ASGI middleware: ``gridloop_http_requests_total`` and ``gridloop_http_request_duration_seconds``."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        root_path = str(scope.get("root_path", ""))
        status = 500  # what the client gets if the app fails before it answers

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            method = str(scope.get("method", "")).upper()
            method = method if method in _HTTP_METHODS else OTHER
            route = _route_template(scope, root_path)
            HTTP_REQUESTS.labels(self.service, method, route, str(status)).inc()
            HTTP_SECONDS.labels(self.service, method, route).observe(time.perf_counter() - started)


# -- work orders, read at scrape time ----------------------------------------------------------------------

WORK_ORDERS_OPEN = "gridloop_work_orders_open"
WORK_ORDERS_OVERDUE = "gridloop_work_orders_overdue"


class WorkOrderBacklogCollector(Collector):
    """Open and overdue work orders by department, counted in a service's database at each scrape.

    ``table`` is a table with ``department_code``, ``status`` and ``deadline`` columns; ``active`` are the
    statuses of work still owed. Open: status active; overdue: open and past its deadline. Every department of
    the reference data is reported (0 when it owes nothing). If the database cannot be read, nothing is
    reported (and a warning logged): a scrape never fails because of it.
    """

    def __init__(
        self,
        engine: Engine,
        table: sa.Table,
        active: Sequence[str],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.table = table
        self.active = tuple(active)
        self.clock = clock

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                WORK_ORDERS_OPEN, "Work orders a department still owes, by department.", labels=["department"]
            ),
            GaugeMetricFamily(
                WORK_ORDERS_OVERDUE,
                "Work orders past their deadline and still owed, by department.",
                labels=["department"],
            ),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def counts(self) -> dict[str, tuple[int, int]]:
        """department label → (open, overdue), read now."""
        now: datetime = self.clock()
        c = self.table.c
        overdue = sa.func.sum(sa.case((c.deadline < now, 1), else_=0))
        query = (
            sa.select(c.department_code, sa.func.count(), overdue)
            .where(c.status.in_(self.active))
            .group_by(c.department_code)
        )
        result = dict.fromkeys(default_town().departments, (0, 0))
        with self.engine.connect() as conn:
            for department, n_open, n_overdue in conn.execute(query):
                label = department_label(department)
                was_open, was_overdue = result.get(label, (0, 0))
                result[label] = (was_open + int(n_open or 0), was_overdue + int(n_overdue or 0))
        return result

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.counts()
        except SQLAlchemyError as exc:
            log.warning("work order gauges not reported: database unavailable (%s)", type(exc).__name__)
            return
        open_family, overdue_family = self._families()
        for department, (n_open, n_overdue) in sorted(counts.items()):
            open_family.add_metric([department], n_open)
            overdue_family.add_metric([department], n_overdue)
        yield open_family
        yield overdue_family


_backlog_collectors: dict[int, WorkOrderBacklogCollector] = {}


def register_work_order_gauges(
    engine: Engine, model: Any, active: Sequence[str], registry: CollectorRegistry = REGISTRY
) -> WorkOrderBacklogCollector:
    """Export ``gridloop_work_orders_open`` / ``_overdue`` of ``model`` (a SQLModel table class) from ``engine``.

    Registering again (a rebuilt app in the same process) replaces the previous collector.
    """
    collector = WorkOrderBacklogCollector(engine, model.__table__, active)
    previous = _backlog_collectors.pop(id(registry), None)
    if previous is not None:
        with contextlib.suppress(KeyError):  # already unregistered by hand
            registry.unregister(previous)
    registry.register(collector)
    _backlog_collectors[id(registry)] = collector
    return collector
