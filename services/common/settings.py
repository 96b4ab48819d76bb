"""Settings shared by every service, from the environment (prefix ``GRIDLOOP_``) with safe local defaults.

A service-specific value can be given as ``GRIDLOOP_<SERVICE>_<NAME>`` (e.g. ``GRIDLOOP_INTAKE_HTTP_PORT``)
or, in a container running one service, plainly as ``GRIDLOOP_<NAME>``. The tuning knobs are one nested group,
``GRIDLOOP_TUNING__<NAME>`` (or ``GRIDLOOP_<SERVICE>_TUNING__<NAME>``); see :class:`Tuning`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

from limits import RateLimitItem, parse_many
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


LOAD_RATE_LIMITS = {
    "GRIDLOOP_RATE_LIMIT_PER_TOKEN": "1000000/minute",
    "GRIDLOOP_RATE_LIMIT_PER_ADDRESS": "1000000/minute",
}
"""The rate limits of the services a benchmark or a chaos run starts: they drive each service hundreds of times a
second with a handful of tokens from one address, far past what a person is allowed. Limits that high hold nobody,
yet every request is still counted: what they measure includes the cost of the limits."""


def rate_limits(text: str) -> list[RateLimitItem]:
    """The limits a rate setting names (``100/second;6000/minute``); none for an empty one."""
    if not text.strip():
        return []
    try:
        items = parse_many(text)
    except ValueError:
        items = []
    if not items or any(item.amount < 1 for item in items):
        raise ValueError(
            f"a rate limit is COUNT/UNIT (second, minute, hour, day), several joined by ';', or empty; not {text!r}"
        )
    return items


class Tuning(BaseModel):
    """What the pipeline costs, never what it does: knobs for the benchmark, left at their defaults elsewhere.

    Each default was measured (docs/performance.md says with what and when); a service whose consumer differs (a
    read model) overrides them in a subclass of its own. Given as ``GRIDLOOP_TUNING__<NAME>``, or for one service
    ``GRIDLOOP_<SERVICE>_TUNING__<NAME>``. The names of the release before (``GRIDLOOP_BATCH_MAX`` ...) are still
    read, with a warning, for one release: see :data:`RENAMED`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    batch_max: int = Field(default=500, ge=1, le=10_000)
    """At most this many consumed records (those already delivered, never waited for) are applied in one
    transaction and flushed with one send: bigger batches cost less per record and hold the loop longer."""
    batch_linger_s: float = Field(default=0.02, ge=0, le=5)
    """How long a consumer waits for more records when none is waiting (0: apply at once): records come from
    another service a batch at a time, and the rest of a burst then joins the same transaction."""
    fetch_min_bytes: int = Field(default=1, ge=1, le=64 * 1024 * 1024)
    """How much the consumer's fetch asks the broker to gather (1: answer as soon as one record is there);
    more means fewer fetches, each a request and a hand-over between threads."""
    fetch_max_wait_ms: int = Field(default=1500, ge=0, le=60_000)
    """How long the broker may hold that fetch to gather ``fetch_min_bytes``: with a minimum of 1 only an idle
    stream ever waits this long."""
    kafka_linger_ms: int = Field(default=0, ge=0, le=1000)
    """How long the publisher holds a record for more to send with it (0: at once): the outbox hands the producer
    a whole batch at a time, so records go out together all the same."""
    switch_interval_s: float = Field(default=0.001, gt=0, le=0.1)
    """How long a thread may keep the GIL while another waits for it (Python's default 0.005): the loop thread
    lets go of it on every database call and must take it back from faust's consumer thread."""
    event_loop: Literal["uvloop", "aio"] = "uvloop"
    """The asyncio loop the worker (consumer, producer and API) runs on: uvloop costs less per callback than the
    standard library's (``aio``)."""


RENAMED = {f"GRIDLOOP_{name.upper()}": f"GRIDLOOP_TUNING__{name.upper()}" for name in Tuning.model_fields}
"""The tuning variables of the release before, and their names now. Still read for this release, each with a
``FutureWarning``; a value given under the new name wins. To be removed in the next release."""


def _tuning_given(value: Any) -> dict[str, Any]:
    """The tuning values a source gave (a dict from the environment, or a :class:`Tuning` passed in), as a dict of
    what was set: what was not set takes the service's own defaults."""
    if value is None:
        return {}
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_unset=True)
    if isinstance(value, dict):
        return dict(value)
    return value  # type: ignore[no-any-return]  # left for validation to refuse with its reason


def _renamed(old: str, new: str) -> None:
    warnings.warn(f"{old} is now {new}: the old name is read for this release only", FutureWarning, stacklevel=2)


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GRIDLOOP_", extra="ignore", case_sensitive=False, env_nested_delimiter="__"
    )

    SERVICE: ClassVar[str] = "service"
    DEFAULT_HTTP_PORT: ClassVar[int] = 8100

    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: str = Field(default="PLAINTEXT", pattern=r"^(PLAINTEXT|SASL_PLAINTEXT|SASL_SSL)$")
    kafka_sasl_mechanism: str = Field(default="PLAIN", pattern=r"^(PLAIN|SCRAM-SHA-256|SCRAM-SHA-512)$")
    kafka_sasl_username: str = ""
    """Each service its own Kafka credentials where the broker asks for SASL (see docker-compose.yml)."""
    kafka_sasl_password: SecretStr = SecretStr("")
    var_dir: Path = REPO_ROOT / "var"
    database_url: str = ""
    """SQLAlchemy URL; empty means a SQLite file var/db/<service>.sqlite."""
    auth_database_url: str = ""
    """The token store every service reads; empty means var/db/auth.sqlite."""
    http_host: str = "127.0.0.1"
    http_port: int = 0
    """0 means the service's default port."""
    time_scale: float = Field(default=1.0, gt=0)
    """How many times faster than the wall clock deadlines run (3600: one business hour per second)."""
    outbox_interval_s: float = Field(default=0.5, gt=0)
    tuning: Tuning = Field(default_factory=Tuning)
    """Knobs that change what the pipeline costs, never what it does (see :class:`Tuning`)."""
    retention_interval_s: float = Field(default=3600.0, gt=0)
    """How often published outbox records and idempotency marks past redelivery are pruned."""
    outbox_keep_s: float = Field(default=86_400.0, ge=0)
    """How long a published outbox record is kept (for looking into) before it is pruned."""
    read_threads: int = Field(default=4, ge=1, le=8)
    """How many reads an API runs at once, each in a thread of its own with its own database connection (the
    event loop, which consumes and answers, never waits for one); more wait their turn. At most 8: a PostgreSQL
    engine pools 10 connections, which the consumer and the outbox share with the reads."""
    long_poll_max_s: float = Field(default=30.0, ge=0, le=30)
    """The longest an API request's ``wait`` (a long poll) is held, whatever it asks for."""
    long_poll_recheck_s: float | None = Field(default=None, ge=0, le=30)
    """How often a held long poll reads again without being woken (0: only when this process commits a change).
    Unset: every second where the service runs as several instances (``instance`` set), else 0."""
    topic_partitions: int | None = Field(default=None, ge=1, le=1000)
    """Partitions of each topic of the loop (not the dead-letter topic) when it is created; unset: the catalog's
    count (2). A topic that exists keeps its count: records keyed to a partition stay there."""
    body_limit_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    """The largest request body an API takes: one declared larger is refused (413) before a byte of it is read,
    one streamed (chunked) as soon as it passes this; both before the caller's token is looked at. 1 MiB: the
    largest request the APIs take, a batch of 100 handled work orders, is some 700 KB when each result holds 2000
    characters of Chinese (3 bytes each in UTF-8, more only when a client escapes every character)."""
    rate_limit_per_token: str = "6000/minute"
    """How often one token may call a service, in the ``limits`` package's notation (``100/second;6000/minute``);
    empty: no limit. More is answered 429 with ``Retry-After``. 6000 a minute (100 a second) is far more than any
    person or device asks (the simulation's busiest desk asks a few hundred a minute): it holds a client run amok,
    never a working one. The benchmark and the chaos run drive a service hundreds of times a second with a few
    tokens from one address: they set both limits high for the services they start."""
    rate_limit_per_address: str = "12000/minute"
    """How often one client address may call a service (whatever tokens it sends, none included); empty: no
    limit. Behind a proxy every client has the proxy's address (the services take no forwarded-for header)."""
    docs_enabled: bool = True
    """Serve the API's docs pages (``/docs``, ``/redoc``). They load Swagger UI and ReDoc from a CDN and start
    them with inline code, the one thing a strict Content Security Policy forbids: they alone are allowed it. Off
    where nobody reads them (a deployment open to the town); ``/openapi.json`` stays either way."""
    log_level: str = "info"
    instance: str = ""
    """Distinguishes two instances of one service in one consumer group (they share the database)."""

    @field_validator("rate_limit_per_token", "rate_limit_per_address")
    @classmethod
    def _rate(cls, value: str) -> str:
        rate_limits(value)  # says what is wrong with it
        return value.strip()

    @model_validator(mode="before")
    @classmethod
    def _service_specific(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        prefix = f"GRIDLOOP_{cls.SERVICE.upper()}_"
        tuning = _tuning_given(data.get("tuning"))
        own: dict[str, Any] = {}
        legacy: dict[str, Any] = {}
        for key, value in os.environ.items():
            upper = key.upper()
            if upper in RENAMED:  # the shared tuning variable of the release before
                legacy.setdefault(upper[len("GRIDLOOP_") :].lower(), value)
                _renamed(upper, RENAMED[upper])
            elif upper.startswith(prefix):
                name = key[len(prefix) :].lower()
                if name.startswith("tuning__"):
                    own[name[len("tuning__") :]] = value
                else:
                    data[name] = value  # the service's own setting wins over the shared one
        for name in Tuning.model_fields:
            if name in data:  # the old name: given as an argument, or for this service in the environment
                legacy[name] = data.pop(name)
                if f"{prefix}{name.upper()}" in os.environ:
                    _renamed(f"{prefix}{name.upper()}", f"{prefix}TUNING__{name.upper()}")
                else:
                    _renamed(f"the setting {name}", f"tuning.{name}")
        if tuning or own or legacy:
            data["tuning"] = {**legacy, **tuning, **own}
        return data

    @model_validator(mode="after")
    def _defaults(self) -> ServiceSettings:
        if not self.http_port:
            self.http_port = self.DEFAULT_HTTP_PORT
        if not self.database_url:
            self.database_url = f"sqlite:///{self.var_dir / 'db' / f'{self.SERVICE}.sqlite'}"
        if not self.auth_database_url:
            self.auth_database_url = f"sqlite:///{self.var_dir / 'db' / 'auth.sqlite'}"
        if self.long_poll_recheck_s is None:
            # another instance's commits wake nobody here: read again every second while holding a request
            self.long_poll_recheck_s = 1.0 if self.instance else 0.0
        return self

    @property
    def service(self) -> str:
        return self.SERVICE

    def kafka_client_options(self) -> dict[str, Any]:
        """Security options in the form aiokafka and kafka-python both take; empty for plain connections."""
        if self.kafka_security_protocol == "PLAINTEXT":
            return {}
        return {
            "security_protocol": self.kafka_security_protocol,
            "sasl_mechanism": self.kafka_sasl_mechanism,
            "sasl_plain_username": self.kafka_sasl_username,
            "sasl_plain_password": self.kafka_sasl_password.get_secret_value(),
        }
