"""What a service's own tables no longer need: published outbox records and idempotency marks past redelivery.

Both tables grow by a row for every event a service emits or applies. Neither is history (the lifecycle topic
and the read models are), so both can be pruned — each by its own rule:

* an outbox record is needed until it is published; it is kept ``outbox_keep`` longer, for looking into;
* an idempotency mark (``processed_event``) is needed while its event can still be delivered again. Kafka
  deletes a record once its whole log segment is older than the topic's ``retention.ms``, so a record can be
  read up to ``retention.ms + segment.ms`` after it was written; a mark is kept that long and a day more. An
  event that comes from a topic kept for ever (the lifecycle log, the compacted closures) may be read again at
  any time — a group reset to the earliest offset, say — so its marks are kept for ever.

Rows are deleted in small batches, each its own short transaction, so neither the consumer nor the API waits
long behind a prune.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from schemas.topics import Topic

from .db import OutboxRecord, ProcessedEvent

KAFKA_DEFAULT_RETENTION_MS = 7 * 24 * 3600 * 1000
"""Kafka's ``log.retention.hours`` default (168), for a topic that does not set ``retention.ms``."""
KAFKA_DEFAULT_SEGMENT_MS = 7 * 24 * 3600 * 1000
"""Kafka's ``log.segment.ms`` default, for a topic that does not set ``segment.ms``."""
MARGIN = timedelta(days=1)

_OUTBOX: sa.Table = OutboxRecord.__table__  # type: ignore[attr-defined]
_PROCESSED: sa.Table = ProcessedEvent.__table__  # type: ignore[attr-defined]


def redelivery_horizon(topic: Topic) -> timedelta | None:
    """How long after it was written a record of ``topic`` may still be read; None: for ever."""
    if "compact" in topic.config.get("cleanup.policy", "delete"):
        return None
    retention = int(topic.config.get("retention.ms", str(KAFKA_DEFAULT_RETENTION_MS)))
    if retention < 0:
        return None
    segment = int(topic.config.get("segment.ms", str(KAFKA_DEFAULT_SEGMENT_MS)))
    return timedelta(milliseconds=retention + segment)


def mark_horizons(consumes: Iterable[Topic], handled: Iterable[str]) -> dict[str, timedelta]:
    """For each handled event type whose marks may go, how long they are kept. A type missing from the answer is
    kept for ever: it arrives on a topic kept for ever, or on no topic this service consumes."""
    topics = tuple(consumes)
    out: dict[str, timedelta] = {}
    for name in handled:
        horizons = [redelivery_horizon(t) for t in topics if name in t.value_type_names]
        if horizons and all(h is not None for h in horizons):
            out[name] = max(h for h in horizons if h is not None) + MARGIN
    return out


@dataclass(frozen=True, slots=True)
class Pruned:
    outbox: int
    marks: int


class Pruner:
    """Deletes what :func:`mark_horizons` and ``outbox_keep`` allow, in batches of ``batch`` rows (the service's
    timer runs :meth:`step` until it answers None, yielding between batches)."""

    def __init__(
        self, engine: Engine, marks: Mapping[str, timedelta], outbox_keep: timedelta, batch: int = 2000
    ) -> None:
        self.engine = engine
        self.marks = dict(marks)
        self.outbox_keep = outbox_keep
        self.batch = batch
        o, p = _OUTBOX.c, _PROCESSED.c
        self._outbox = sa.delete(_OUTBOX).where(
            o.id.in_(
                sa.select(o.id)
                .where(o.published_at.is_not(None), o.published_at < sa.bindparam("cut"))
                .limit(batch)
                .scalar_subquery()
            )
        )
        self._marks = sa.delete(_PROCESSED).where(
            p.event_id.in_(
                sa.select(p.event_id)
                .where(p.type == sa.bindparam("type"), p.processed_at < sa.bindparam("cut"))
                .limit(batch)
                .scalar_subquery()
            )
        )

    def step(self, now: datetime) -> Pruned | None:
        """Delete one batch of what may go; None when nothing is left to delete."""
        cut = now - self.outbox_keep
        with self.engine.begin() as conn:
            n = conn.execute(self._outbox, {"cut": cut}).rowcount
        if n:
            return Pruned(outbox=n, marks=0)
        for kind, keep in self.marks.items():
            with self.engine.begin() as conn:
                n = conn.execute(self._marks, {"type": kind, "cut": now - keep}).rowcount
            if n:
                return Pruned(outbox=0, marks=n)
        return None
