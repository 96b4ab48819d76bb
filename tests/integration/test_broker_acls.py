"""Forged events are refused by a broker with SASL and ACLs: a service's credentials write only the topics it
produces and read only those it consumes, with its own consumer group.

The module starts a broker of its own (``infra/kafka/kafka.sh`` in SASL mode, on free ports, state in a temporary
directory; stopped at the end), creates the catalog's topics and applies the ACLs as the administrator, as the
compose deployment's init does, then connects as each service with gridloop's own publisher and aiokafka consumers.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    TopicAuthorizationFailedError,
)

from schemas import events as ev
from schemas import topics as catalog
from schemas._base import Actor, ActorKind, Location, utcnow
from schemas.codec import decode_event, encode_event
from schemas.topics import CATALOG, LIFECYCLE, SERVICES, VERIFICATION, consumed_by, consumer_group, produced_by
from services.common.acls import Grant, apply_acls
from services.common.admin import admin_client, create_topics
from services.common.kafka import Publisher
from services.common.settings import REPO_ROOT

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"(read|open)_text is deprecated", category=DeprecationWarning)
    from kafka import KafkaConsumer
    from kafka import TopicPartition as SyncPartition

pytestmark = pytest.mark.kafka

KAFKA_SH = REPO_ROOT / "infra" / "kafka" / "kafka.sh"
NAMESPACE = "acltown"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class SaslBroker:
    bootstrap: str
    passwords: dict[str, str]
    var_dir: Path

    def security(self, user: str, password: str | None = None) -> dict[str, Any]:
        return {
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "PLAIN",
            "sasl_plain_username": user,
            "sasl_plain_password": self.passwords[user] if password is None else password,
        }

    def env(self, user: str) -> dict[str, str]:
        """A gridloop process's environment as ``user``."""
        return {
            "GRIDLOOP_KAFKA_BOOTSTRAP": self.bootstrap,
            "GRIDLOOP_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "GRIDLOOP_KAFKA_SASL_MECHANISM": "PLAIN",
            "GRIDLOOP_KAFKA_SASL_USERNAME": user,
            "GRIDLOOP_KAFKA_SASL_PASSWORD": self.passwords[user],
            "GRIDLOOP_TOPIC_NAMESPACE": NAMESPACE,
        }


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SaslBroker]:
    var_dir = tmp_path_factory.mktemp("sasl-broker")
    passwords = {user: secrets.token_hex(12) for user in ("admin", *SERVICES)}
    users = var_dir / "kafka-users"
    users.write_text("".join(f"{user}={password}\n" for user, password in passwords.items()))
    port, controller_port = free_port(), free_port()
    env = {
        **os.environ,
        "GRIDLOOP_VAR_DIR": str(var_dir),
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(controller_port),
        "KAFKA_SASL_USERS": str(users),
        "KAFKA_HEAP_OPTS": "-Xms128m -Xmx512m",
        "KAFKA_START_TIMEOUT": "120",
        "KAFKA_STOP_TIMEOUT": "20",
    }

    def sh(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(KAFKA_SH), command], env=env, capture_output=True, text=True, timeout=180, check=False
        )

    before = os.environ.get("GRIDLOOP_TOPIC_NAMESPACE")
    os.environ["GRIDLOOP_TOPIC_NAMESPACE"] = NAMESPACE
    try:
        started = sh("up")
        if started.returncode != 0:
            pytest.fail(f"the SASL broker did not start:\n{started.stdout}{started.stderr}", pytrace=False)
        found = SaslBroker(f"127.0.0.1:{port}", passwords, var_dir)
        admin = found.security("admin")
        create_topics(found.bootstrap, security=admin)
        apply_acls(found.bootstrap, security=admin)
        yield found
    finally:
        sh("down")
        if before is None:
            os.environ.pop("GRIDLOOP_TOPIC_NAMESPACE", None)
        else:
            os.environ["GRIDLOOP_TOPIC_NAMESPACE"] = before


# -- writing ----------------------------------------------------------------------------------------------


def incident_id() -> str:
    return f"GL20260601-{secrets.token_hex(6).upper()}"


def verification_passed(iid: str) -> ev.VerificationPassed:
    return ev.VerificationPassed(
        incident_id=iid,
        correlation_id=iid,
        actor=Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-2"),
        verification_id=f"{iid}-v1",
        note="forged",
    )


def incident_closed(iid: str) -> ev.IncidentClosed:
    return ev.IncidentClosed(
        incident_id=iid,
        correlation_id=iid,
        actor=Actor.system("dispatch"),
        category_code="exposed_garbage",
        grid_id="gh01",
        departments=["city_ops"],
        reported_at=utcnow(),
        deadline=None,
        on_time=True,
        rework_count=0,
        return_count=0,
    )


async def writable(broker: SaslBroker, user: str, topics: list[str]) -> set[str]:
    """The topics of ``topics`` that ``user`` can write a record to, through gridloop's own publisher."""
    publisher = Publisher(broker.bootstrap, client_id=f"acl-{user}", **broker.security(user))
    await publisher.start()
    allowed: set[str] = set()
    try:
        for topic in topics:
            try:
                await asyncio.wait_for(publisher.send_all([(topic, b"k", b"{}", [])]), 30)
            except TopicAuthorizationFailedError:
                continue
            allowed.add(topic)
    finally:
        await publisher.stop()
    return allowed


def end_offsets(broker: SaslBroker, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, **broker.security("admin"))
    try:
        parts = [SyncPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        return {tp.partition: int(offset) for tp, offset in consumer.end_offsets(parts).items()}
    finally:
        consumer.close()


@pytest.mark.parametrize("service", SERVICES)
async def test_a_service_writes_exactly_the_topics_it_produces(broker: SaslBroker, service: str) -> None:
    allowed = await writable(broker, service, [t.name for t in CATALOG])
    assert allowed == {t.name for t in produced_by(service)}


async def test_handlings_credentials_cannot_pass_a_verification(broker: SaslBroker) -> None:
    """The forgery that closed a case: a VerificationPassed written straight to the verification topic."""
    before = end_offsets(broker, VERIFICATION.name)
    publisher = Publisher(broker.bootstrap, client_id="forger", **broker.security("handling"))
    await publisher.start()
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            await publisher.send_all([(VERIFICATION.name, b"k", encode_event(verification_passed(incident_id())), [])])
    finally:
        await publisher.stop()
    assert end_offsets(broker, VERIFICATION.name) == before


async def test_a_reader_cannot_write_incident_closed_to_the_lifecycle_log(broker: SaslBroker) -> None:
    """The forgery that made intake and Open311 show `closed`: opscenter reads the log and may not write it."""
    before = end_offsets(broker, LIFECYCLE.name)
    publisher = Publisher(broker.bootstrap, client_id="forger", **broker.security("opscenter"))
    await publisher.start()
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            await publisher.publish([incident_closed(incident_id())])
    finally:
        await publisher.stop()
    assert end_offsets(broker, LIFECYCLE.name) == before


@pytest.mark.parametrize("password", ["wrong", None])
async def test_a_wrong_password_or_none_at_all_gets_nowhere(broker: SaslBroker, password: str | None) -> None:
    security = broker.security("verification", password) if password else {}
    publisher = Publisher(broker.bootstrap, client_id="stranger", **security)
    with pytest.raises((KafkaConnectionError, asyncio.TimeoutError)):
        await asyncio.wait_for(publisher.start(), 20)
    await publisher.stop()


async def test_a_service_publishes_its_own_events_through_the_outbox_path(broker: SaslBroker) -> None:
    publisher = Publisher(broker.bootstrap, client_id="verification", **broker.security("verification"))
    await publisher.start()
    try:
        await publisher.publish([verification_passed(incident_id())])  # its topic and the lifecycle log
    finally:
        await publisher.stop()


# -- reading ----------------------------------------------------------------------------------------------


async def consume_one(broker: SaslBroker, user: str, group: str, topic: str) -> int:
    """Join ``group`` as ``user``, read ``topic`` from its start and commit; returns the records read."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **broker.security(user),
    )
    try:
        await asyncio.wait_for(consumer.start(), 30)
        records = await asyncio.wait_for(consumer.getmany(timeout_ms=5000), 30)
        await consumer.commit()
        return sum(len(batch) for batch in records.values())
    finally:
        await consumer.stop()


@pytest.mark.parametrize("service", SERVICES)
async def test_a_service_reads_what_it_consumes_with_its_own_group_only(broker: SaslBroker, service: str) -> None:
    mine = consumed_by(service)
    assert await writable(broker, "admin", [t.name for t in mine]) == {t.name for t in mine}  # a record each
    for topic in mine:
        assert await consume_one(broker, service, consumer_group(service), topic.name) >= 1

    someone_else = next(s for s in SERVICES if s != service)
    with pytest.raises(GroupAuthorizationFailedError):
        await consume_one(broker, service, consumer_group(someone_else), mine[0].name)

    for topic in (t for t in CATALOG if t not in mine):
        with pytest.raises(TopicAuthorizationFailedError):
            await consume_one(broker, service, consumer_group(service), topic.name)


# -- the administrator and the operations center ------------------------------------------------------------


async def test_applying_again_takes_back_a_grant_the_catalog_does_not_make(broker: SaslBroker) -> None:
    stray = Grant("User:intake", "TOPIC", VERIFICATION.name, "WRITE")
    admin = admin_client(broker.bootstrap, security=broker.security("admin"))
    try:
        assert not admin.create_acls([stray.acl()])["failed"]
    finally:
        admin.close()
    await wait_until(lambda: writable(broker, "intake", [VERIFICATION.name]), {VERIFICATION.name})

    applied = apply_acls(broker.bootstrap, security=broker.security("admin"))

    assert (applied.added, applied.removed) == ([], [stray])
    assert await writable(broker, "intake", [VERIFICATION.name]) == set()


async def wait_until(probe: Any, wanted: Any, timeout_s: float = 20.0) -> None:
    """Until ``await probe()`` answers ``wanted`` (an ACL reaches the broker's authorizer a moment after it is
    created)."""
    deadline = time.monotonic() + timeout_s
    while (seen := await probe()) != wanted:
        assert time.monotonic() < deadline, f"saw {seen}, not {wanted}"
        await asyncio.sleep(0.2)


async def test_opscenter_reads_every_groups_lag_with_its_own_credentials(broker: SaslBroker) -> None:
    from services.opscenter.metrics import ConsumerLagCollector, consumer_groups

    await writable(broker, "dispatch", [VERIFICATION.name])
    await consume_one(broker, "verification", consumer_group("verification"), VERIFICATION.name)
    await writable(broker, "dispatch", [VERIFICATION.name])  # one more the group has not read

    collector = ConsumerLagCollector(
        broker.bootstrap, consumer_groups(), timeout_s=10, security=broker.security("opscenter")
    )
    try:
        lags = collector.read()
    finally:
        collector.close()
    assert lags[(consumer_group("verification"), VERIFICATION.name)] >= 1


async def test_dead_letters_are_written_by_a_service_and_read_by_the_administrator(
    broker: SaslBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.admin.deadletters import read_dead_letters
    from services.common.kafka import send_dead_letter

    reason = f"unreadable {secrets.token_hex(4)}"
    publisher = Publisher(broker.bootstrap, client_id="handling", **broker.security("handling"))
    await publisher.start()
    try:
        await send_dead_letter(
            publisher,
            service="handling",
            reason=reason,
            source_topic=catalog.WORKORDERS.name,
            partition=0,
            offset=0,
            key=b"k",
            value=b"not json",
        )
    finally:
        await publisher.stop()

    for name, value in broker.env("admin").items():
        monkeypatch.setenv(name, value)
    letters = await asyncio.to_thread(read_dead_letters, broker.bootstrap)
    assert reason in [d.reason for d in letters]


async def test_opscenter_rebuilds_its_read_model_from_the_log_with_its_own_credentials(
    broker: SaslBroker, tmp_path: Path
) -> None:
    from services.opscenter.rebuild import rebuild

    iid = incident_id()
    reported = ev.IncidentReported(
        incident_id=iid,
        correlation_id=iid,
        actor=Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-1"),
        source=ev.Source.GRID_WORKER,
        category_code="exposed_garbage",
        location=Location(lat=31.271, lon=121.561),
        description="垃圾暴露",
        reporter_id="w-gh01-1",
        client_report_id=iid,
    )
    publisher = Publisher(broker.bootstrap, client_id="intake", **broker.security("intake"))
    await publisher.start()
    try:
        await publisher.publish([reported])
    finally:
        await publisher.stop()

    applied = await asyncio.to_thread(
        rebuild, broker.bootstrap, f"sqlite:///{tmp_path / 'rebuilt.sqlite'}", security=broker.security("opscenter")
    )
    assert applied >= 1


# -- a service ------------------------------------------------------------------------------------------------


async def test_the_verification_service_works_on_its_own_credentials(broker: SaslBroker, tmp_path: Path) -> None:
    """faust's consumer (its group), the outbox's producer and the start-up topic wait, all as `verification`:
    dispatch asks for a verification, the grid worker passes it, dispatch reads the outcome."""
    from services.common.auth import Role, TokenStore
    from services.common.db import make_engine
    from services.supervisor import start_background

    port = free_port()
    env = {
        **broker.env("verification"),
        "GRIDLOOP_VAR_DIR": str(tmp_path),
        "GRIDLOOP_VERIFICATION_HTTP_PORT": str(port),
        "GRIDLOOP_LOG_LEVEL": "warning",
    }
    store = TokenStore(make_engine(f"sqlite:///{tmp_path / 'db' / 'auth.sqlite'}"))
    (tmp_path / "db").mkdir(exist_ok=True)
    token, _ = store.issue(Role.GRID_WORKER, "w-gh01-2")
    iid = incident_id()
    requested = ev.VerificationRequested(
        incident_id=iid,
        correlation_id=iid,
        actor=Actor.system("dispatch"),
        verification_id=f"{iid}-v1",
        grid_id="gh01",
        worker_id="w-gh01-2",
        category_code="exposed_garbage",
        location=Location(lat=31.271, lon=121.561),
        description="垃圾暴露",
    )
    dispatch = Publisher(broker.bootstrap, client_id="dispatch", **broker.security("dispatch"))
    await dispatch.start()
    try:
        await dispatch.publish([requested])
    finally:
        await dispatch.stop()

    group = await asyncio.to_thread(start_background, env, tmp_path / "logs", services=["verification"])
    try:
        await asyncio.to_thread(group.wait_healthy, 120)
        url = f"{group.urls['verification']}/verifications/{requested.verification_id}"
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
            deadline = time.monotonic() + 60
            while (found := await client.get(url)).status_code != 200:
                assert time.monotonic() < deadline, f"no task: {found.status_code} {found.text}"
                await asyncio.sleep(0.3)
            decided = await client.post(f"{url}/pass", json={"note": "已核查"})
            assert decided.status_code == 202, decided.text
        outcome = await read_outcome(broker, requested.verification_id)
    finally:
        codes = await asyncio.to_thread(group.stop)
    assert isinstance(outcome, ev.VerificationPassed) and outcome.actor.id == "w-gh01-2"
    assert codes["verification"] == 0, group.tail("verification")


async def read_outcome(broker: SaslBroker, verification_id: str, timeout_s: float = 60.0) -> Any:
    """The verification's outcome, read from the verification topic as dispatch (its own group)."""
    consumer = AIOKafkaConsumer(
        VERIFICATION.name,
        bootstrap_servers=broker.bootstrap,
        group_id=consumer_group("dispatch"),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **broker.security("dispatch"),
    )
    await asyncio.wait_for(consumer.start(), 30)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=1000)).values():
                for record in batch:
                    if b"VerificationRequested" in record.value or b'"type"' not in record.value:
                        continue
                    event = decode_event(record.value)
                    if getattr(event, "verification_id", None) == verification_id:
                        return event
        raise AssertionError(f"no outcome of {verification_id} within {timeout_s:.0f} s")
    finally:
        await consumer.stop()
