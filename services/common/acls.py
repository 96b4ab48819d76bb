"""Who may do what on the broker: the Kafka ACLs of every service, made from the topic catalog.

Each service connects as a principal of its own, ``User:<service>`` (its SASL user name), and may

* WRITE the topics it produces (``Topic.producers``: its events' topics, the lifecycle log, the dead letters);
* READ the topics it consumes (``Topic.consumers``) and READ its consumer group ``<namespace>-<service>``;
* opscenter only: DESCRIBE every service's consumer group and the topics they read — its ``/metrics`` reports
  each group's lag, from committed and end offsets (DESCRIBE tells offsets, never a record).

Nothing else. On a broker whose authorizer allows nothing that no ACL allows (``allow.everyone.if.no.acl.found``
false, as in ``docker-compose.yml`` and ``infra/kafka/kafka.sh`` with ``KAFKA_SASL_USERS``), handling's credentials
cannot write a ``VerificationPassed`` to the verification topic, nor opscenter's an ``IncidentClosed`` to the
lifecycle log. The administrator (topic creation, dead-letter replay, these ACLs) is a super user of the broker.

What topic-level ACLs cannot tell apart: a topic that two services write (the verification topic: dispatch asks
there, verification answers; the lifecycle log: every service that emits) takes any event from either of them.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.topics import SERVICES, consumed_by, consumer_group, namespace, produced_by

from .admin import Security, admin_client

with warnings.catch_warnings():
    # kafka-python reads its protocol schemas with importlib.resources' legacy API, deprecated on 3.11.
    warnings.filterwarnings("ignore", message=r"(read|open)_text is deprecated", category=DeprecationWarning)
    from kafka.admin import (
        ACL,
        ACLFilter,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePattern,
        ResourcePatternFilter,
        ResourceType,
    )
    from kafka.errors import KafkaError

LAG_READERS = ("opscenter",)
"""Services that read every consumer group's lag (``services.opscenter.metrics.ConsumerLagCollector``)."""

_OPERATIONS = ("READ", "WRITE", "DESCRIBE")
_RESOURCES = ("TOPIC", "GROUP")


@dataclass(frozen=True, order=True, slots=True)
class Grant:
    """One ALLOW ACL: ``principal`` may ``operation`` the ``resource`` (a topic or a group) named ``name``, from
    any host."""

    principal: str
    resource: str
    name: str
    operation: str

    def __post_init__(self) -> None:
        if self.operation not in _OPERATIONS or self.resource not in _RESOURCES:
            raise ValueError(f"not a grant gridloop makes: {self}")

    def __str__(self) -> str:
        return f"{self.principal:22} {self.operation:8} {self.resource.lower():5} {self.name}"

    def kafka_acls_args(self) -> list[str]:
        """The same ACL as ``kafka-acls.sh`` arguments (after ``--bootstrap-server … --add``)."""
        return [
            "--allow-principal",
            self.principal,
            "--operation",
            self.operation.capitalize(),
            f"--{self.resource.lower()}",
            self.name,
        ]

    def acl(self) -> Any:
        """The kafka-python ``ACL``."""
        return ACL(
            principal=self.principal,
            host="*",
            operation=ACLOperation[self.operation],
            permission_type=ACLPermissionType.ALLOW,
            resource_pattern=ResourcePattern(ResourceType[self.resource], self.name, ACLResourcePatternType.LITERAL),
        )


def principal(service: str) -> str:
    """The Kafka principal of ``service``: its SASL user name is the service's name."""
    return f"User:{service}"


def grants(services: Iterable[str] = SERVICES) -> list[Grant]:
    """Every ACL the services need, and no other, for the current namespace; sorted."""
    chosen = tuple(services)
    made: set[Grant] = set()
    for service in chosen:
        who = principal(service)
        made.update(Grant(who, "TOPIC", t.name, "WRITE") for t in produced_by(service))
        consumed = consumed_by(service)
        made.update(Grant(who, "TOPIC", t.name, "READ") for t in consumed)
        if consumed:
            made.add(Grant(who, "GROUP", consumer_group(service), "READ"))
    for service in (s for s in LAG_READERS if s in chosen):
        who = principal(service)
        readers = [s for s in SERVICES if consumed_by(s)]
        made.update(Grant(who, "GROUP", consumer_group(s), "DESCRIBE") for s in readers)
        made.update(Grant(who, "TOPIC", t.name, "DESCRIBE") for s in readers for t in consumed_by(s))
    held = {(g.principal, g.resource, g.name) for g in made if g.operation != "DESCRIBE"}
    # READ and WRITE imply DESCRIBE
    return sorted(g for g in made if g.operation != "DESCRIBE" or (g.principal, g.resource, g.name) not in held)


def kafka_acls_commands(wanted: Sequence[Grant], bootstrap: str, command_config: str = "admin.properties") -> list[str]:
    """``kafka-acls.sh`` command lines that add ``wanted`` (run as the administrator: ``--command-config``)."""
    head = f"kafka-acls.sh --bootstrap-server {bootstrap} --command-config {command_config} --add"
    return [" ".join([head, *g.kafka_acls_args()]) for g in wanted]


@dataclass(frozen=True, slots=True)
class Applied:
    added: list[Grant]
    removed: list[Grant]
    kept: list[Grant]


def _ours(resource: str, name: str) -> bool:
    """Whether a topic or group belongs to the current namespace (only those are pruned)."""
    return name.startswith(f"{namespace()}." if resource == "TOPIC" else f"{namespace()}-")


def existing_grants(admin: Any, services: Iterable[str] = SERVICES) -> list[Grant]:
    """The ALLOW ACLs the broker holds for the services' principals on this namespace's topics and groups, in
    the form gridloop makes them (literal names, any host, one of its operations)."""
    found: list[Grant] = []
    for service in services:
        acls, error = admin.describe_acls(
            ACLFilter(
                principal=principal(service),
                host=None,
                operation=ACLOperation.ANY,
                permission_type=ACLPermissionType.ALLOW,
                resource_pattern=ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY),
            )
        )
        if getattr(error, "errno", 0):  # kafka-python answers NoError (errno 0), or raises
            raise KafkaError(f"ACLs of {principal(service)} not read: {error}")
        for acl in acls:
            pattern = acl.resource_pattern
            resource, operation = ResourceType(pattern.resource_type).name, ACLOperation(acl.operation).name
            if (
                resource in _RESOURCES
                and operation in _OPERATIONS
                and ACLResourcePatternType(pattern.pattern_type) == ACLResourcePatternType.LITERAL
                and acl.host == "*"
                and _ours(resource, pattern.resource_name)
            ):
                found.append(Grant(acl.principal, resource, pattern.resource_name, operation))
    return sorted(set(found))


def apply_acls(
    bootstrap: str, *, security: Security | None = None, prune: bool = True, settle_s: float = 30.0
) -> Applied:
    """Make the broker's ACLs for the services those of :func:`grants`: add what is missing and (``prune``) remove
    the ALLOW ACLs of their principals on this namespace's topics and groups that the catalog no longer grants.
    Idempotent. Run as the administrator (a super user); the broker must have an authorizer.

    Returns once the broker answers with the ACLs as wanted (at most ``settle_s``): the controller has them when
    it says so, the broker's authorizer a moment later, and a service started at once would be refused."""
    wanted = grants()
    admin = admin_client(bootstrap, security=security)
    try:
        have = set(existing_grants(admin))
        missing = [g for g in wanted if g not in have]
        stale = sorted(have - set(wanted)) if prune else []
        if missing:
            result = admin.create_acls([g.acl() for g in missing])
            failed = result.get("failed") or []
            if failed:
                raise KafkaError(f"{len(failed)} of {len(missing)} ACLs not created: {failed}")
        if stale:
            for _filter, _matched, error in admin.delete_acls([g.acl() for g in stale]):
                if getattr(error, "errno", 0):
                    raise KafkaError(f"stale ACL not removed: {_filter}: {error}")
        if missing or stale:
            _settle(admin, set(wanted), set(stale), settle_s)
        return Applied(added=missing, removed=stale, kept=[g for g in wanted if g in have])
    finally:
        admin.close()


def _settle(admin: Any, wanted: set[Grant], stale: set[Grant], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        have = set(existing_grants(admin))
        if wanted <= have and not stale & have:
            return
        if time.monotonic() > deadline:
            raise KafkaError(f"the broker does not show the ACLs applied after {timeout_s:.0f} s")
        time.sleep(0.1)


__all__ = [
    "LAG_READERS",
    "Applied",
    "Grant",
    "apply_acls",
    "existing_grants",
    "grants",
    "kafka_acls_commands",
    "principal",
]
