"""What tests over the real broker share: reaching it, a topic namespace of their own, running the services."""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"(read|open)_text is deprecated", category=DeprecationWarning)
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from schemas.reference import GAOHANG
from services.common.admin import create_topics, drop_namespace, list_topics
from services.common.auth import Role, TokenStore
from services.common.db import make_engine
from services.supervisor import ServiceGroup, start_background

BOOTSTRAP = os.environ.get("GRIDLOOP_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
PORT_OFFSET = int(os.environ.get("GRIDLOOP_TEST_PORT_OFFSET", "0"))
"""Shifts every port the tests' services listen on, so two test runs on one machine stay apart."""


def require_broker() -> str:
    """The broker must be up: a test over Kafka fails (never skips) when it is not."""
    try:
        list_topics(BOOTSTRAP)
    except Exception as exc:
        pytest.fail(
            f"no Kafka broker at {BOOTSTRAP} ({type(exc).__name__}: {exc}). "
            "Start it with `make kafka-up` (`make test` does this for you).",
            pytrace=False,
        )
    return BOOTSTRAP


NAMESPACES: list[str] = []
"""The namespaces this test session created: their topics are deleted when it ends (tests/conftest.py)."""


def fresh_namespace(prefix: str) -> str:
    """A topic namespace of its own (topics created), so runs never see each other's records."""
    ns = f"{prefix}{time.strftime('%H%M%S')}{uuid.uuid4().hex[:6]}"
    os.environ["GRIDLOOP_TOPIC_NAMESPACE"] = ns
    NAMESPACES.append(ns)
    create_topics(BOOTSTRAP)
    return ns


def drop_namespaces() -> list[str]:
    """Delete the topics of every namespace this session created (each tried, whatever another's outcome).
    Returns the topic names deleted; raises the first failure once all were tried."""
    dropped: list[str] = []
    failures: list[Exception] = []
    while NAMESPACES:
        try:
            dropped += drop_namespace(BOOTSTRAP, NAMESPACES.pop())
        except Exception as exc:
            failures.append(exc)
    if failures:
        raise failures[0]
    return dropped


def service_env(ns: str, var_dir: Path, base_port: int, **extra: str) -> dict[str, str]:
    base_port += PORT_OFFSET
    env = {
        "GRIDLOOP_KAFKA_BOOTSTRAP": BOOTSTRAP,
        "GRIDLOOP_TOPIC_NAMESPACE": ns,
        "GRIDLOOP_VAR_DIR": str(var_dir),
        "GRIDLOOP_INTAKE_HTTP_PORT": str(base_port + 1),
        "GRIDLOOP_HANDLING_HTTP_PORT": str(base_port + 2),
        "GRIDLOOP_VERIFICATION_HTTP_PORT": str(base_port + 3),
        "GRIDLOOP_OPSCENTER_HTTP_PORT": str(base_port + 4),
        "GRIDLOOP_DISPATCH_HTTP_PORT": str(base_port + 5),
        "GRIDLOOP_LOG_LEVEL": "warning",
    }
    env.update(extra)
    return env


class Tokens:
    """A bearer token for everyone who acts in a test town: every grid worker, every department's staff,
    the operations center, an administrator and a sensor."""

    def __init__(self, var_dir: Path) -> None:
        store = TokenStore(make_engine(f"sqlite:///{var_dir / 'db' / 'auth.sqlite'}"))
        self.workers = {w: store.issue(Role.GRID_WORKER, w)[0] for g in GAOHANG.grids.values() for w in g.workers}
        self.departments = {d: store.issue(Role.DEPARTMENT, f"staff-{d}", department=d)[0] for d in GAOHANG.departments}
        self.ops_center = store.issue(Role.OPS_CENTER, "ops-duty")[0]
        self.admin = store.issue(Role.ADMIN, "admin")[0]
        self.sensor = store.issue(Role.SENSOR, "sensor-001")[0]
        self.store = store

    @staticmethod
    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


@contextmanager
def running(env: dict[str, str], var_dir: Path, services: list[str] | None = None) -> Iterator[ServiceGroup]:
    group = start_background(env, var_dir / "logs", services=services)
    try:
        group.wait_healthy(180)
        yield group
    finally:
        group.stop()


def consumer(topic: str) -> KafkaConsumer:
    """An independent reader of a whole topic, from the first offset."""
    c = KafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False, consumer_timeout_ms=500)
    parts = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or [])]
    c.assign(parts)
    c.seek_to_beginning(*parts)
    return c


def read_until(topic: str, predicate: Callable[[Any], bool], timeout: float = 60.0) -> Any:
    """The first record of ``topic`` whose JSON value satisfies ``predicate``; fails after ``timeout``."""
    c = consumer(topic)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for batch in c.poll(timeout_ms=500).values():
                for record in batch:
                    value = json.loads(record.value)
                    if predicate(value):
                        return record, value
        raise AssertionError(f"nothing matching on {topic} within {timeout:.0f} s")
    finally:
        c.close()


def producer() -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all")
