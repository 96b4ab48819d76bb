"""The topic catalog: every Kafka topic gridloop uses, what it carries and how it is kept.

Every record is keyed by incident id (UTF-8), so one incident's history stays in one partition, in order.
Every event also goes to the lifecycle log, the full history from which any read model can be rebuilt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import events as ev
from ._base import Event

DEFAULT_NAMESPACE = "gridloop"

PARTITIONS = 2
"""Partitions of each topic of the loop when gridloop creates it (``GRIDLOOP_TOPIC_PARTITIONS`` sets another count).

The most instances of one service that can share its work. Every partition costs every consumer of the topic a
little on every fetch, records or not (it is asked for and answered each time), and most fetches of a quiet or
moderate stream carry one record: two partitions serve one machine and a pair of instances per service."""


def namespace() -> str:
    """Prefix of every topic and consumer group (``GRIDLOOP_TOPIC_NAMESPACE``); lets test runs stay apart."""
    return os.environ.get("GRIDLOOP_TOPIC_NAMESPACE", DEFAULT_NAMESPACE)


@dataclass(frozen=True, slots=True)
class Topic:
    suffix: str
    description: str
    value_types: tuple[type[Event], ...] | None
    """Event classes this topic carries; ``None`` for the dead-letter topic (raw records)."""
    partitions: int = PARTITIONS
    key: str = "incident_id"
    config: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{namespace()}.{self.suffix}"

    @property
    def value_type_names(self) -> tuple[str, ...]:
        return tuple(t.__name__ for t in self.value_types or ())


_WEEK_MS = str(7 * 24 * 3600 * 1000)

INCIDENTS_REPORTED = Topic(
    "incidents.reported",
    "Reports from grid workers, the 12345 hotline, sensors and Open311, as received by intake.",
    (ev.IncidentReported,),
    config={"retention.ms": _WEEK_MS},
)
WORKORDERS = Topic(
    "workorders.dispatched",
    "Instructions to departments: new work orders, rework after failed verification, extension decisions.",
    (ev.WorkOrderDispatched, ev.IncidentReworked, ev.ExtensionGranted, ev.ExtensionRefused),
    config={"retention.ms": _WEEK_MS},
)
FEEDBACK = Topic(
    "workorders.feedback",
    "Departments' answers: accepted (签收), returned (退回), extension requested (延期), handled (处置).",
    (ev.WorkOrderAccepted, ev.WorkOrderReturned, ev.ExtensionRequested, ev.WorkOrderHandled),
    config={"retention.ms": _WEEK_MS},
)
VERIFICATION = Topic(
    "verification",
    "核查: verification tasks for the grid worker and their outcome.",
    (ev.VerificationRequested, ev.VerificationPassed, ev.VerificationFailed),
    config={"retention.ms": _WEEK_MS},
)
INCIDENTS_CLOSED = Topic(
    "incidents.closed",
    "结案: one record per closed incident (compacted: the latest closure per incident is kept).",
    (ev.IncidentClosed,),
    config={"cleanup.policy": "compact"},
)
SUPERVISION = Topic(
    "supervision",
    "Filing decisions and supervision: 立案, rejections, merges, 催办 reminders and 督办 escalations.",
    (ev.IncidentFiled, ev.IncidentRejected, ev.IncidentMerged, ev.OverdueReminded, ev.IncidentEscalated),
    config={"retention.ms": _WEEK_MS},
)
LIFECYCLE = Topic(
    "incidents.lifecycle",
    "The full lifecycle log: every event of every incident, kept forever (read models rebuild from offset 0).",
    tuple(ev.EVENT_TYPES.values()),
    config={"retention.ms": "-1"},
)
DEADLETTER = Topic(
    "deadletter",
    "Records no consumer could process, with the reason, source topic, partition and offset.",
    None,
    partitions=1,
    key="source topic/partition/offset",
    config={"retention.ms": "-1"},
)

CATALOG: tuple[Topic, ...] = (
    INCIDENTS_REPORTED,
    SUPERVISION,
    WORKORDERS,
    FEEDBACK,
    VERIFICATION,
    INCIDENTS_CLOSED,
    LIFECYCLE,
    DEADLETTER,
)

_BY_TYPE: dict[str, Topic] = {}
for _topic in CATALOG:
    if _topic is LIFECYCLE:
        continue
    for _name in _topic.value_type_names:
        if _name in _BY_TYPE:
            raise RuntimeError(f"{_name} is routed to two topics")
        _BY_TYPE[_name] = _topic


def topics_for(event: Event | str) -> tuple[Topic, Topic]:
    """Where an event is published: its own topic, then the lifecycle log."""
    name = event if isinstance(event, str) else event.type
    return _BY_TYPE[name], LIFECYCLE


def by_name(name: str) -> Topic:
    for topic in CATALOG:
        if topic.name == name:
            return topic
    raise KeyError(name)
