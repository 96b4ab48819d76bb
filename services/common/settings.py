"""Settings shared by every service, from the environment (prefix ``GRIDLOOP_``) with safe local defaults.

A service-specific value can be given as ``GRIDLOOP_<SERVICE>_<NAME>`` (e.g. ``GRIDLOOP_INTAKE_HTTP_PORT``)
or, in a container running one service, plainly as ``GRIDLOOP_<NAME>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from limits import RateLimitItem, parse_many
from pydantic import Field, SecretStr, field_validator, model_validator
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


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRIDLOOP_", extra="ignore", case_sensitive=False)

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
    kafka_linger_ms: int = Field(default=0, ge=0, le=1000)
    """How long the publisher holds a record for more to send with it. 0: sent at once; the outbox hands the
    producer a whole batch at a time, so records go out together all the same."""
    batch_max: int = Field(default=500, ge=1, le=10_000)
    """At most this many consumed records (those already delivered, never waited for) are applied in one
    transaction and flushed with one send."""
    batch_linger_s: float = Field(default=0.02, ge=0, le=5)
    """How long a consumer waits for more records when none is waiting (0: apply at once). 20 ms: records come
    from another service a batch at a time, and the rest of a burst is applied in the same transaction instead
    of one or two records each. The read models (intake's view, opscenter) wait longer to batch more."""
    fetch_min_bytes: int = Field(default=1, ge=1, le=64 * 1024 * 1024)
    """How much the consumer's fetch asks the broker to wait for (1: answer as soon as one record is there)."""
    fetch_max_wait_ms: int = Field(default=1500, ge=0, le=60_000)
    """How long the broker may hold the consumer's fetch to gather ``fetch_min_bytes``. With the default minimum
    only an idle stream waits this long; a read model sets both to fetch less often, in bigger batches."""
    retention_interval_s: float = Field(default=3600.0, gt=0)
    """How often published outbox records and idempotency marks past redelivery are pruned."""
    outbox_keep_s: float = Field(default=86_400.0, ge=0)
    """How long a published outbox record is kept (for looking into) before it is pruned."""
    long_poll_max_s: float = Field(default=30.0, ge=0, le=30)
    """The longest an API request's ``wait`` (a long poll) is held, whatever it asks for."""
    long_poll_recheck_s: float | None = Field(default=None, ge=0, le=30)
    """How often a held long poll reads again without being woken (0: only when this process commits a change).
    Unset: every second where the service runs as several instances (``instance`` set), else 0."""
    topic_partitions: int | None = Field(default=None, ge=1, le=1000)
    """Partitions of each topic of the loop (not the dead-letter topic) when it is created; unset: the catalog's
    count (2). A topic that exists keeps its count: records keyed to a partition stay there."""
    switch_interval_s: float = Field(default=0.001, gt=0, le=0.1)
    """How long the interpreter lets a thread hold the GIL while another waits for it (Python's default is
    5 ms). A worker runs two: the loop that applies records and answers the API, and faust's consumer thread
    fetching from the broker. The loop thread lets go of the GIL on every database call; with 5 ms it could then
    wait up to 5 ms to take it back from the consumer thread, each time."""
    event_loop: Literal["uvloop", "aio"] = "uvloop"
    """The asyncio loop the worker (consumer, producer and API) runs on: uvloop, or the standard library's."""
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
        import os

        if not isinstance(data, dict):
            return data
        prefix = f"GRIDLOOP_{cls.SERVICE.upper()}_"
        for key, value in os.environ.items():
            if key.upper().startswith(prefix):
                data[key[len(prefix) :].lower()] = value  # the service's own setting wins over the shared one
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
