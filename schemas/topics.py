"""The topic catalog: every Kafka topic gridloop uses, what it carries, how it is kept and which services write
and read it.

Every record is keyed by incident id (UTF-8), so one incident's history stays in one partition, in order.
Every event also goes to the lifecycle log, the full history from which any read model can be rebuilt.

Who writes and reads each topic is data here, not only code: on a broker with ACLs each service may write only
the topics it produces and read only those it consumes (``services.common.acls``). A unit test holds it to the
code (each service's agents' subscriptions and the events its handlers and API emit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import events as ev
from ._base import Event

DEFAULT_NAMESPACE = "gridloop"

SERVICES = ("intake", "dispatch", "handling", "verification", "opscenter")
"""Every service that runs a consumer; each is a Kafka principal of its own (``User:<service>``) where the
broker asks for credentials."""

PARTITIONS = 2
"""Partitions of each topic of the loop when gridloop creates it (``GRIDLOOP_TOPIC_PARTITIONS`` sets another count).

The most instances of one service that can share its work. Every partition costs every consumer of the topic a
little on every fetch, records or not (it is asked for and answered each time), and most fetches of a quiet or
moderate stream carry one record: two partitions serve one machine and a pair of instances per service."""


def namespace() -> str:
    """Prefix of every topic and consumer group (``GRIDLOOP_TOPIC_NAMESPACE``); lets test runs stay apart."""
    return os.environ.get("GRIDLOOP_TOPIC_NAMESPACE", DEFAULT_NAMESPACE)


def consumer_group(service: str) -> str:
    """The consumer group of ``service``: its faust app id, ``<namespace>-<service>``."""
    return f"{namespace()}-{service}"


@dataclass(frozen=True, slots=True)
class Topic:
    suffix: str
    description: str
    value_types: tuple[type[Event], ...] | None
    """Event classes this topic carries; ``None`` for the dead-letter topic (raw records)."""
    partitions: int = PARTITIONS
    key: str = "incident_id"
    config: dict[str, str] = field(default_factory=dict)
    producers: tuple[str, ...] = ()
    """The services that write this topic (the events of its ``value_types`` they emit, or dead letters)."""
    consumers: tuple[str, ...] = ()
    """The services whose consumer group reads this topic."""

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
    producers=("intake",),
    consumers=("dispatch",),
)
WORKORDERS = Topic(
    "workorders.dispatched",
    "Instructions to departments: new work orders, rework after failed verification, extension decisions.",
    (ev.WorkOrderDispatched, ev.IncidentReworked, ev.ExtensionGranted, ev.ExtensionRefused),
    config={"retention.ms": _WEEK_MS},
    producers=("dispatch",),
    consumers=("handling",),
)
FEEDBACK = Topic(
    "workorders.feedback",
    "Departments' answers: accepted (签收), returned (退回), extension requested (延期), handled (处置).",
    (ev.WorkOrderAccepted, ev.WorkOrderReturned, ev.ExtensionRequested, ev.WorkOrderHandled),
    config={"retention.ms": _WEEK_MS},
    producers=("handling",),
    consumers=("dispatch",),
)
VERIFICATION = Topic(
    "verification",
    "核查: verification tasks for the grid worker and their outcome.",
    (ev.VerificationRequested, ev.VerificationPassed, ev.VerificationFailed),
    config={"retention.ms": _WEEK_MS},
    # dispatch asks for verification here and reads the outcome; verification reads the request and answers
    producers=("dispatch", "verification"),
    consumers=("dispatch", "verification"),
)
INCIDENTS_CLOSED = Topic(
    "incidents.closed",
    "结案: one record per closed incident (compacted: the latest closure per incident is kept).",
    (ev.IncidentClosed,),
    config={"cleanup.policy": "compact"},
    producers=("dispatch",),
    consumers=("handling",),
)
SUPERVISION = Topic(
    "supervision",
    "Filing decisions and supervision: 立案, rejections, merges, 催办 reminders and 督办 escalations.",
    (ev.IncidentFiled, ev.IncidentRejected, ev.IncidentMerged, ev.OverdueReminded, ev.IncidentEscalated),
    config={"retention.ms": _WEEK_MS},
    producers=("dispatch",),
    consumers=(),  # read through the lifecycle log
)
LIFECYCLE = Topic(
    "incidents.lifecycle",
    "The full lifecycle log: every event of every incident, kept forever (read models rebuild from offset 0).",
    tuple(ev.EVENT_TYPES.values()),
    config={"retention.ms": "-1"},
    producers=("intake", "dispatch", "handling", "verification"),  # whoever emits an event
    consumers=("intake", "opscenter"),
)
DEADLETTER = Topic(
    "deadletter",
    "Records no consumer could process, with the reason, source topic, partition and offset.",
    None,
    partitions=1,
    key="source topic/partition/offset",
    config={"retention.ms": "-1"},
    producers=SERVICES,  # every consumer sets aside what it cannot process
    consumers=(),  # read by the operator (`python -m services.admin deadletters`), as the admin
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


def produced_by(service: str) -> tuple[Topic, ...]:
    """The topics ``service`` writes."""
    return tuple(t for t in CATALOG if service in t.producers)


def consumed_by(service: str) -> tuple[Topic, ...]:
    """The topics ``service``'s consumer group reads."""
    return tuple(t for t in CATALOG if service in t.consumers)


def used_by(service: str) -> tuple[Topic, ...]:
    """The topics ``service`` writes or reads: those it waits for at start-up."""
    return tuple(t for t in CATALOG if service in t.producers or service in t.consumers)
