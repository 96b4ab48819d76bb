"""Throwaway namespaces' topics are deleted from the real broker, and only theirs; the town's are refused."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable

import pytest

from schemas.topics import CATALOG, DEADLETTER, PARTITIONS
from services.common.admin import create_topics, drop_namespace, list_topics, wait_for_topics
from tests.kafka_support import NAMESPACES, fresh_namespace, require_broker

pytestmark = pytest.mark.kafka


def test_dropping_a_namespace_deletes_its_topics_and_no_others() -> None:
    bootstrap = require_broker()
    kept, dropped = fresh_namespace("keep"), fresh_namespace("drop")
    wait_for_topics(bootstrap, [f"{ns}.{t.suffix}" for ns in (kept, dropped) for t in CATALOG], timeout_s=30)

    deleted = drop_namespace(bootstrap, dropped)
    NAMESPACES.remove(dropped)

    assert sorted(deleted) == sorted(f"{dropped}.{t.suffix}" for t in CATALOG)
    names = _settled(bootstrap, lambda names: not any(n.startswith(f"{dropped}.") for n in names))
    assert not {n for n in names if n.startswith(f"{dropped}.")}
    assert {f"{kept}.{t.suffix}" for t in CATALOG} <= names
    assert drop_namespace(bootstrap, dropped) == []  # nothing left: nothing to do


def test_a_namespace_that_is_a_prefix_of_another_keeps_the_other() -> None:
    bootstrap = require_broker()
    longer = fresh_namespace("pfx")
    shorter = longer[:-2]
    os.environ["GRIDLOOP_TOPIC_NAMESPACE"] = shorter
    create_topics(bootstrap)
    NAMESPACES.append(shorter)
    wait_for_topics(bootstrap, [f"{ns}.{t.suffix}" for ns in (longer, shorter) for t in CATALOG], timeout_s=30)

    drop_namespace(bootstrap, shorter)
    NAMESPACES.remove(shorter)

    names = _settled(bootstrap, lambda names: not any(n.startswith(f"{shorter}.") for n in names))
    assert {f"{longer}.{t.suffix}" for t in CATALOG} <= names


def _settled(bootstrap: str, done: Callable[[set[str]], bool], timeout_s: float = 30.0) -> set[str]:
    """The broker's topics once ``done`` holds of them (a deletion reaches every listing a moment later)."""
    deadline = time.monotonic() + timeout_s
    while not done(names := list_topics(bootstrap)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return names


@pytest.mark.parametrize("namespace", ["gridloop", "", "a.b"])
def test_the_towns_namespace_and_odd_names_are_refused(namespace: str) -> None:
    with pytest.raises(ValueError, match="not a throwaway namespace"):
        drop_namespace("127.0.0.1:1", namespace)


@pytest.mark.parametrize("configured", [None, "3"])
def test_the_loops_topics_get_the_configured_partitions_and_the_dead_letters_one(
    monkeypatch: pytest.MonkeyPatch, configured: str | None
) -> None:
    bootstrap = require_broker()
    if configured is not None:
        monkeypatch.setenv("GRIDLOOP_TOPIC_PARTITIONS", configured)
    ns = fresh_namespace("parts")
    wait_for_topics(bootstrap, [f"{ns}.{t.suffix}" for t in CATALOG], timeout_s=30)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(read|open)_text is deprecated", category=DeprecationWarning)
        from kafka import KafkaConsumer
    c = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        counts = {t.suffix: len(c.partitions_for_topic(f"{ns}.{t.suffix}") or ()) for t in CATALOG}
    finally:
        c.close()
    loop = int(configured) if configured else PARTITIONS
    assert counts == {t.suffix: 1 if t is DEADLETTER else loop for t in CATALOG}
