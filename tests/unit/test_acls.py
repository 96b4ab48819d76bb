"""The services' Kafka ACLs, made from the topic catalog: each may write only what it produces and read only what
it consumes, with its own consumer group. Applying them adds what is missing and removes what is no longer due
(tests/integration/test_broker_acls.py proves them on a real broker with SASL and an authorizer)."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.topics import (
    CATALOG,
    DEADLETTER,
    LIFECYCLE,
    SERVICES,
    VERIFICATION,
    consumed_by,
    consumer_group,
    produced_by,
)
from services.common import acls
from services.common.acls import Grant, grants, kafka_acls_commands, principal


def granted(service: str, resource: str, operation: str) -> set[str]:
    return {
        g.name
        for g in grants()
        if g.principal == principal(service) and g.resource == resource and g.operation == operation
    }


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_writes_only_what_it_produces_and_reads_only_what_it_consumes(service: str) -> None:
    assert granted(service, "TOPIC", "WRITE") == {t.name for t in produced_by(service)}
    assert granted(service, "TOPIC", "READ") == {t.name for t in consumed_by(service)}
    assert granted(service, "GROUP", "READ") == {consumer_group(service)}


def test_only_dispatch_and_verification_may_write_the_verification_topic() -> None:
    writers = {g.principal for g in grants() if g.name == VERIFICATION.name and g.operation == "WRITE"}
    assert writers == {"User:dispatch", "User:verification"}


def test_opscenter_writes_nothing_but_dead_letters() -> None:
    assert granted("opscenter", "TOPIC", "WRITE") == {DEADLETTER.name}
    assert LIFECYCLE.name not in granted("opscenter", "TOPIC", "WRITE")


def test_only_opscenter_describes_other_groups_and_topics_for_the_lag_it_reports() -> None:
    describers = {g.principal for g in grants() if g.operation == "DESCRIBE"}
    assert describers == {"User:opscenter"}
    groups = granted("opscenter", "GROUP", "DESCRIBE") | granted("opscenter", "GROUP", "READ")
    assert groups == {consumer_group(s) for s in SERVICES}
    topics = {g.name for g in grants() if g.principal == "User:opscenter" and g.resource == "TOPIC"}
    assert topics == {t.name for s in SERVICES for t in consumed_by(s)} | {DEADLETTER.name}


def test_no_grant_reaches_beyond_the_namespace_or_the_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRIDLOOP_TOPIC_NAMESPACE", "town2")
    names = {t.name for t in CATALOG}
    for g in grants():
        assert g.name in names if g.resource == "TOPIC" else g.name.startswith("town2-"), g
        assert g.operation in ("READ", "WRITE", "DESCRIBE")


def test_the_kafka_acls_commands_say_the_same() -> None:
    grant = Grant("User:handling", "TOPIC", "gridloop.workorders.feedback", "WRITE")
    assert kafka_acls_commands([grant], "kafka:9094") == [
        "kafka-acls.sh --bootstrap-server kafka:9094 --command-config admin.properties --add "
        "--allow-principal User:handling --operation Write --topic gridloop.workorders.feedback"
    ]
    group = Grant("User:handling", "GROUP", "gridloop-handling", "READ")
    assert kafka_acls_commands([group], "b:1")[0].endswith("--operation Read --group gridloop-handling")


def test_a_grant_gridloop_does_not_make_is_refused() -> None:
    with pytest.raises(ValueError):
        Grant("User:intake", "CLUSTER", "kafka-cluster", "ALTER")


class FakeAdmin:
    """The kafka-python admin client's ACL calls over a list of ACLs."""

    def __init__(self, held: list[Any]) -> None:
        self.held = list(held)
        self.closed = False

    def describe_acls(self, acl_filter: Any) -> tuple[list[Any], Any]:
        return [a for a in self.held if a.principal == acl_filter.principal], None

    def create_acls(self, new: list[Any]) -> dict[str, list[Any]]:
        self.held += [a for a in new if a not in self.held]
        return {"succeeded": new, "failed": []}

    def delete_acls(self, filters: list[Any]) -> list[tuple[Any, list[Any], Any]]:
        result = [(f, [a for a in self.held if a == f], None) for f in filters]
        self.held = [a for a in self.held if a not in filters]
        return result

    def close(self) -> None:
        self.closed = True


def test_applying_adds_what_is_missing_and_removes_only_what_is_no_longer_due(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stale = Grant("User:intake", "TOPIC", VERIFICATION.name, "WRITE")  # granted once, not due
    elsewhere = Grant("User:intake", "TOPIC", "othertown.verification", "WRITE")  # another namespace's: kept
    kept = grants()[0]
    admin = FakeAdmin([stale.acl(), elsewhere.acl(), kept.acl()])
    monkeypatch.setattr(acls, "admin_client", lambda *a, **k: admin)

    applied = acls.apply_acls("b:1")

    assert applied.removed == [stale]
    assert applied.kept == [kept]
    assert sorted(applied.added) == [g for g in grants() if g != kept]
    assert {a for a in admin.held} == {g.acl() for g in grants()} | {elsewhere.acl()}
    assert admin.closed

    again = acls.apply_acls("b:1")
    assert (again.added, again.removed, len(again.kept)) == ([], [], len(grants()))
