"""The catalog's producers and consumers of each topic are the code's: what each service's agents subscribe to and
what its handlers and API emit. The broker's ACLs are made from the catalog, so a drift here is a service refused
by the broker, or allowed more than it does."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterable
from pathlib import Path

import pytest

from schemas import EVENT_TYPES
from schemas.topics import (
    CATALOG,
    DEADLETTER,
    LIFECYCLE,
    SERVICES,
    Topic,
    consumed_by,
    consumer_group,
    produced_by,
    topics_for,
    used_by,
)
from services.common.settings import REPO_ROOT


def emitted_types(service: str) -> set[str]:
    """The event types ``service``'s code builds: every call of an event class (``ev.WorkOrderAccepted(...)``,
    ``ev.IncidentFiled.following(...)``) or of a builder given one first (``_follow(ev.IncidentMerged, ...)``).
    Type annotations, ``isinstance`` and ``case ev.X(...)`` patterns are not calls of one."""
    found: set[str] = set()
    for path in sorted((REPO_ROOT / "services" / service).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "following":
                func = func.value
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if name in EVENT_TYPES:
                found.add(name)
            elif (
                name not in ("isinstance", "issubclass") and node.args
            ):  # a class handed to a builder: _follow(ev.X, …)
                first = node.args[0]
                kind = (
                    first.attr
                    if isinstance(first, ast.Attribute)
                    else first.id
                    if isinstance(first, ast.Name)
                    else None
                )
                if kind in EVENT_TYPES:
                    found.add(kind)
    return found


def names(topics: Iterable[Topic]) -> set[str]:
    return {t.suffix for t in topics}


def subscribed(service: str) -> set[str]:
    return names(importlib.import_module(f"services.{service}.agents").CONSUMES)


def test_every_service_package_with_agents_is_in_the_catalog() -> None:
    packages = {p.parent.name for p in Path(REPO_ROOT / "services").glob("*/agents.py")}
    assert packages == set(SERVICES)


@pytest.mark.parametrize("service", SERVICES)
def test_the_catalog_says_what_each_service_consumes(service: str) -> None:
    assert names(consumed_by(service)) == subscribed(service)


@pytest.mark.parametrize("service", SERVICES)
def test_the_catalog_says_what_each_service_produces(service: str) -> None:
    emitted = emitted_types(service)
    topics = names(topic for kind in emitted for topic in topics_for(kind))
    if subscribed(service):
        topics.add(DEADLETTER.suffix)  # a record it cannot process is set aside there
    assert names(produced_by(service)) == topics, f"{service} emits {sorted(emitted)}"


def test_every_event_type_is_emitted_by_one_service() -> None:
    emitters = {kind: [s for s in SERVICES if kind in emitted_types(s)] for kind in EVENT_TYPES}
    assert {kind: who for kind, who in emitters.items() if len(who) != 1} == {}


def test_the_scan_finds_the_events_it_should() -> None:
    """The scan itself: it sees calls however written, and nothing else."""
    assert emitted_types("verification") == {"VerificationPassed", "VerificationFailed"}
    assert emitted_types("intake") == {"IncidentReported"}  # intake folds every type, and builds one
    assert emitted_types("opscenter") == set()


def test_every_topic_but_the_dead_letters_and_the_lifecycle_log_has_one_kind_of_writer() -> None:
    """Only the verification topic has two writers (the request and its outcome), and every writer of an event
    writes the lifecycle log."""
    shared = {t.suffix for t in CATALOG if len(t.producers) > 1}
    assert shared == {"verification", LIFECYCLE.suffix, DEADLETTER.suffix}
    emitters = {s for t in CATALOG if t not in (LIFECYCLE, DEADLETTER) for s in t.producers}
    assert set(LIFECYCLE.producers) == emitters


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_waits_for_the_topics_it_uses(service: str) -> None:
    assert names(used_by(service)) == names(produced_by(service)) | names(consumed_by(service))
    assert consumer_group(service).endswith(f"-{service}")


def test_the_chaos_runs_consumer_groups_read_what_the_catalog_says() -> None:
    from services.chaos.cluster import CONSUMES

    assert {s: names(t) for s, t in CONSUMES.items()} == {s: names(consumed_by(s)) for s in SERVICES}
