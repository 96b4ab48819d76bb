"""Rebuild the read model from the lifecycle log, from offset 0 up to the log's current end.

    python -m services.opscenter rebuild --database-url sqlite:///var/db/opscenter-rebuilt.sqlite \\
        --period day --at 2026-11-24 --by department

Reads with an independent consumer (no group, nothing committed), applies every event through the same fold
as the live service, and prints the KPIs as JSON: the same figures as the live read model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

from schemas import DecodeError, decode_event, utcnow
from schemas.reference import GAOHANG, Town
from schemas.topics import LIFECYCLE
from services.common.bus import MessageBus
from services.common.db import UnitOfWork, make_engine

from . import kpis
from .handlers import bind, preload
from .kpis import Dimension, KpiReport, Period
from .store import Db, ReadModel, fresh_read_model

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"(read|open)_text is deprecated", category=DeprecationWarning)
    from kafka import KafkaConsumer, TopicPartition


def rebuild(
    bootstrap: str,
    database_url: str,
    *,
    poll_timeout_ms: int = 1000,
    security: Mapping[str, Any] | None = None,
    town: Town = GAOHANG,
) -> int:
    """Fold the lifecycle log from offset 0 into a fresh read model at ``database_url``; returns events applied.
    ``security``: the Kafka client's credentials (opscenter's own may read the lifecycle log)."""
    engine = make_engine(database_url)
    fresh_read_model(engine)
    bus = MessageBus(lambda: UnitOfWork(engine), bind(town), preload)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **(security or {}))
    try:
        parts = [TopicPartition(LIFECYCLE.name, p) for p in sorted(consumer.partitions_for_topic(LIFECYCLE.name) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        applied = 0
        while any(consumer.position(tp) < end[tp] for tp in parts):
            for batch in consumer.poll(timeout_ms=poll_timeout_ms).values():
                for record in batch:
                    if record.offset >= end[TopicPartition(record.topic, record.partition)]:
                        continue
                    try:
                        event = decode_event(record.value)
                    except DecodeError:
                        continue  # the live service dead-letters these; a rebuild skips them the same way
                    bus.handle(event)
                    applied += 1
        return applied
    finally:
        consumer.close()
        engine.dispose()


def kpi_report(db: Db, period: Period, at: date, by: Dimension, now: datetime, town: Town = GAOHANG) -> KpiReport:
    """The KPIs of the read model ``db`` reads (a connection or a session of its database): how a rebuilt read
    model is compared with the live one."""
    return kpis.kpi_report(ReadModel(db), period, at, by, now, town)


def report(database_url: str, period: Period, at: date, by: Dimension, now: datetime | None = None) -> KpiReport:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return kpi_report(connection, period, at, by, now or utcnow())
    finally:
        engine.dispose()
