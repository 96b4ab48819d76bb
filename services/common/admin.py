"""Kafka administration through kafka-python: create the catalog's topics, wait for the broker and topics."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from schemas.topics import CATALOG, DEFAULT_NAMESPACE, Topic

with warnings.catch_warnings():
    # kafka-python reads its protocol schemas with importlib.resources' legacy API, deprecated on 3.11.
    warnings.filterwarnings("ignore", message=r"(read|open)_text is deprecated", category=DeprecationWarning)
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError, UnknownTopicOrPartitionError

log = logging.getLogger(__name__)

_UNKNOWN_TOPIC = UnknownTopicOrPartitionError.errno


class KafkaUnavailable(RuntimeError):
    pass


Security = Mapping[str, Any]
"""A client's security options (``ServiceSettings.kafka_client_options``); None: those of the environment."""


def admin_client(bootstrap: str, timeout_s: float = 10.0, security: Security | None = None) -> KafkaAdminClient:
    from .settings import ServiceSettings

    return KafkaAdminClient(
        bootstrap_servers=bootstrap.split(","),
        client_id="gridloop-admin",
        request_timeout_ms=int(timeout_s * 1000),
        **(ServiceSettings().kafka_client_options() if security is None else security),
    )


def partitions_for(topic: Topic) -> int:
    """How many partitions ``topic`` is created with: the catalog's count, or ``GRIDLOOP_TOPIC_PARTITIONS`` for the
    topics of the loop (those keyed by incident id; the dead-letter topic keeps its one)."""
    from .settings import ServiceSettings

    wanted = ServiceSettings().topic_partitions
    return wanted if wanted is not None and topic.key == "incident_id" else topic.partitions


def create_topics(bootstrap: str, topics: Iterable[Topic] = CATALOG, *, security: Security | None = None) -> list[str]:
    """Create missing topics; existing ones are left as they are. Returns the names created."""
    admin = admin_client(bootstrap, security=security)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t.name not in existing]
        created: list[str] = []
        for topic in missing:
            try:
                admin.create_topics(
                    [
                        NewTopic(
                            topic.name,
                            num_partitions=partitions_for(topic),
                            replication_factor=1,
                            topic_configs=dict(topic.config),
                        )
                    ]
                )
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()


def drop_namespace(bootstrap: str, namespace: str) -> list[str]:
    """Delete every topic of a throwaway namespace (a test's, a benchmark's): ``<namespace>.*``. Returns the names
    deleted. The town's own namespace is refused: its lifecycle log is the record of every incident.

    A broker that keeps every run's topics grows without end, and each Kafka client that refreshes the metadata of
    all topics (every five minutes by default) holds all of them in memory."""
    if not namespace or namespace == DEFAULT_NAMESPACE or "." in namespace:
        raise ValueError(f"not a throwaway namespace: {namespace!r}")
    admin = admin_client(bootstrap)
    try:
        names = sorted(t for t in admin.list_topics() if t.startswith(f"{namespace}."))
        if not names:
            return []
        result = admin.delete_topics(names, raise_errors=False)
        failed = {
            t["name"]: t.get("error_message") or f"error {t['error_code']}"
            for t in result["topics"]
            if t["error_code"] not in (0, _UNKNOWN_TOPIC)  # deleted, or gone already (another clean-up)
        }
        if failed:
            raise KafkaError(f"topics not deleted: {failed}")
        return names
    finally:
        admin.close()


def list_topics(bootstrap: str, *, security: Security | None = None) -> set[str]:
    """The topics the broker tells this client of (where it has ACLs: those the principal may at least describe)."""
    admin = admin_client(bootstrap, security=security)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def wait_for_topics(
    bootstrap: str, names: Iterable[str], timeout_s: float = 120.0, *, security: Security | None = None
) -> None:
    """Block until the broker answers and every topic exists; log clearly while waiting."""
    wanted = set(names)
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        try:
            missing = wanted - list_topics(bootstrap, security=security)
            if not missing:
                return
            problem = (
                f"topics missing: {', '.join(sorted(missing))} (run `make topics`; where the broker has ACLs, "
                "the principal may not be allowed to see them: `python -m services.admin acls apply`)"
            )
        except (KafkaError, OSError) as exc:
            problem = f"Kafka at {bootstrap} unavailable ({type(exc).__name__}); start it with `make kafka-up`"
        if time.monotonic() > deadline:
            raise KafkaUnavailable(problem)
        log.warning("%s; retrying in %.1fs", problem, delay)
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
