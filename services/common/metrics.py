"""Prometheus metrics every service exports on /metrics (prefix ``gridloop_``, base units, ``_total`` counters)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_CONSUMED = Counter(
    "gridloop_events_consumed_total", "Kafka records consumed, by topic and event type.", ["service", "topic", "type"]
)
OUTBOX_PUBLISHED = Counter(
    "gridloop_outbox_published_total", "Events published to Kafka through the outbox.", ["service"]
)
DUPLICATES_SKIPPED = Counter(
    "gridloop_duplicate_events_total", "Redelivered events recognised by event id and skipped.", ["service"]
)
DEAD_LETTERS = Counter(
    "gridloop_dead_letters_total", "Records sent to the dead-letter topic, by kind of failure.", ["service", "kind"]
)
HANDLE_SECONDS = Histogram(
    "gridloop_handle_seconds",
    "Time to apply one event in its unit of work.",
    ["service", "type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
OUTBOX_PENDING = Gauge("gridloop_outbox_pending", "Outbox records not yet published.", ["service"])
