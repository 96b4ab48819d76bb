"""The operations center's own Prometheus metrics: how long each stage of the loop takes, and consumer lag.

- :func:`observe_stage` feeds ``gridloop_stage_duration_seconds{stage}`` (accept, handle, verify, close);
- :class:`ConsumerLagCollector` exports ``gridloop_consumer_lag{group,topic}`` of every service's consumer group,
  read from the broker at scrape time (cached a few seconds; a broker that does not answer in time makes the
  scrape report no lag and count ``gridloop_consumer_lag_errors_total``, never hang).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from schemas.topics import SERVICES, consumer_group

with warnings.catch_warnings():
    # kafka-python reads its protocol schemas with importlib.resources' legacy API, deprecated on 3.11.
    warnings.filterwarnings("ignore", message=r"(read|open)_text is deprecated", category=DeprecationWarning)
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

log = logging.getLogger(__name__)

# -- stage durations ----------------------------------------------------------------------------------

STAGES = ("accept", "handle", "verify", "close")
"""accept: dispatched → accepted (签收); handle: accepted → handled (处置); verify: verification requested →
decided (核查); close: reported → closed (结案)."""

STAGE_SECONDS = Histogram(
    "gridloop_stage_duration_seconds",
    "Time an incident spends in one stage of the loop (accept, handle, verify, close).",
    ["stage"],
    buckets=(
        1.0,
        5.0,
        15.0,
        30.0,
        60.0,
        300.0,  # 5 min
        900.0,
        1800.0,
        3600.0,  # 1 h
        7200.0,
        14400.0,
        28800.0,  # 8 h
        43200.0,
        86400.0,  # 1 day
        172800.0,
        259200.0,
        604800.0,  # 1 week
        1209600.0,
    ),
)
_STAGE_CHILDREN = {stage: STAGE_SECONDS.labels(stage) for stage in STAGES}
"""Every stage is exported from the start, empty; a fold observes its child, looked up once here."""


def observe_stage(stage: str, seconds: float) -> None:
    """Record that an incident (or work order) spent ``seconds`` in ``stage`` (one of :data:`STAGES`).

    Seconds are wall-clock seconds between the two events' ``occurred_at``; a negative span (clocks of two
    services disagreeing) counts as 0. An unknown stage is logged and ignored: a metric never fails a fold.
    """
    child = _STAGE_CHILDREN.get(stage)
    if child is None:
        log.warning("stage %r is not one of %s; not recorded", stage, ", ".join(STAGES))
        return
    child.observe(max(0.0, float(seconds)))


# -- consumer lag -------------------------------------------------------------------------------------

CONSUMER_LAG = "gridloop_consumer_lag"
LAG_ERRORS = Counter(
    "gridloop_consumer_lag_errors_total",
    "Consumer-lag reads that failed or timed out (the scrape then reports no lag).",
)


def consumer_groups(services: Iterable[str] = SERVICES) -> list[str]:
    """The consumer group of each service (the faust app id ``<namespace>-<service>``)."""
    return [consumer_group(service) for service in services]


def _known_config(cls: Any, **config: Any) -> dict[str, Any]:
    """``config`` without the keys this kafka-python version does not know (they changed between 2.x and 3.x)."""
    known = getattr(cls, "DEFAULT_CONFIG", None)
    return dict(config) if known is None else {k: v for k, v in config.items() if k in known}


class ConsumerLagCollector(Collector):
    """``gridloop_consumer_lag{group,topic}``: records not yet consumed, summed over the topic's partitions.

    For each group, lag of a partition = end offset − committed offset (partitions the group never committed
    are left out). Offsets come from kafka-python: the admin client's committed group offsets and a group-less
    consumer's end offsets.

    A scrape waits for the broker at most ``timeout_s``; a result is reused for ``cache_s`` seconds, and after
    a failure the broker is not asked again for ``retry_s`` seconds. On any broker error or timeout the scrape
    reports no lag series and ``gridloop_consumer_lag_errors_total`` goes up by one.

    Register it once in the process that serves /metrics, e.g.::

        from prometheus_client import REGISTRY
        REGISTRY.register(ConsumerLagCollector(settings.kafka_bootstrap, consumer_groups()))
    """

    def __init__(
        self,
        bootstrap: str,
        groups: Iterable[str],
        *,
        timeout_s: float = 1.5,
        cache_s: float = 5.0,
        retry_s: float = 15.0,
        security: Mapping[str, Any] | None = None,
    ) -> None:
        self.bootstrap = [h.strip() for h in bootstrap.split(",") if h.strip()]
        self.security = dict(security or {})
        """The Kafka clients' credentials (opscenter's own, which may describe every service's group)."""
        self.groups = list(groups)
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self.retry_s = retry_s
        self._lock = threading.Lock()
        self._value: dict[tuple[str, str], int] | None = None
        self._value_at = 0.0
        self._failed_at: float | None = None
        self._thread: threading.Thread | None = None
        self._counted = False
        """Whether the failure of the refresh under way has been counted already (by a timed-out scrape)."""
        self._admin: Any = None
        self._consumer: Any = None
        self._topics_known: set[str] = set()

    # -- prometheus_client ------------------------------------------------------------------------------

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            CONSUMER_LAG,
            "Records not yet consumed by a consumer group, by topic (end offset minus committed offset).",
            labels=["group", "topic"],
        )

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        lags = self.lags()
        if lags is None:
            return
        family = self._family()
        for (group, topic), lag in sorted(lags.items()):
            family.add_metric([group, topic], lag)
        yield family

    # -- reading, cached ------------------------------------------------------------------------------------

    def lags(self) -> dict[tuple[str, str], int] | None:
        """(group, topic) → lag, at most ``cache_s`` old; None when the broker did not answer in time."""
        now = time.monotonic()
        with self._lock:
            if self._value is not None and now - self._value_at < self.cache_s:
                return self._value
            if self._failed_at is not None and now - self._failed_at < self.retry_s:
                return None
            if self._thread is not None and self._thread.is_alive():
                return None  # an earlier read is still waiting on the broker: do not wait for it again
            self._value, self._counted = None, False
            thread = self._thread = threading.Thread(target=self._refresh, name="gridloop-consumer-lag", daemon=True)
            thread.start()
        thread.join(self.timeout_s)
        with self._lock:
            if thread.is_alive():
                log.warning("consumer lag not read: the broker did not answer within %.1f s", self.timeout_s)
                LAG_ERRORS.inc()
                self._counted, self._failed_at = True, now
                return None
            return self._value

    def _refresh(self) -> None:
        try:
            value = self.read()
        except Exception as exc:
            log.warning("consumer lag not read: %s: %s", type(exc).__name__, exc)
            self._close_clients()
            with self._lock:
                self._failed_at = time.monotonic()
                if not self._counted:
                    LAG_ERRORS.inc()
                    self._counted = True
            return
        with self._lock:
            self._value, self._value_at, self._failed_at = value, time.monotonic(), None

    # -- reading, from the broker ---------------------------------------------------------------------------

    def _clients(self) -> tuple[Any, Any]:
        timeout_ms = max(100, int(self.timeout_s * 1000))
        common = {
            "bootstrap_servers": self.bootstrap,
            "request_timeout_ms": max(timeout_ms, 1000),
            "bootstrap_timeout_ms": timeout_ms,
            "api_version_auto_timeout_ms": timeout_ms,
            "reconnect_backoff_max_ms": 1000,
            **self.security,
        }
        if self._admin is None:
            self._admin = KafkaAdminClient(
                **_known_config(KafkaAdminClient, client_id="gridloop-consumer-lag", **common)
            )
        if self._consumer is None:
            self._consumer = KafkaConsumer(
                **_known_config(
                    KafkaConsumer, client_id="gridloop-consumer-lag", group_id=None, enable_auto_commit=False, **common
                )
            )
        return self._admin, self._consumer

    def _committed(self, admin: Any) -> dict[str, Mapping[Any, Any]]:
        """group → {TopicPartition: OffsetAndMetadata} (kafka-python 3 and 2 name the call differently)."""
        if hasattr(admin, "list_group_offsets"):
            return dict(admin.list_group_offsets({group: None for group in self.groups}))
        return {group: admin.list_consumer_group_offsets(group) for group in self.groups}

    def read(self) -> dict[tuple[str, str], int]:
        """Ask the broker now (blocking; at most about ``timeout_s`` per request)."""
        admin, consumer = self._clients()
        committed: dict[tuple[str, TopicPartition], int] = {}
        for group, offsets in self._committed(admin).items():
            for tp, meta in (offsets or {}).items():
                offset = getattr(meta, "offset", meta)
                if isinstance(offset, int) and offset >= 0:
                    committed[(group, TopicPartition(tp.topic, tp.partition))] = offset
        partitions = sorted({tp for _, tp in committed})
        for topic in sorted({tp.topic for tp in partitions} - self._topics_known):
            # the consumer asks end offsets of the partitions' leaders: it must know the topic first
            consumer.partitions_for_topic(topic)
            self._topics_known.add(topic)
        ends: Mapping[Any, int] = (
            consumer.end_offsets(partitions, timeout_ms=max(100, int(self.timeout_s * 1000))) if partitions else {}
        )
        lags: dict[tuple[str, str], int] = {}
        for (group, tp), offset in committed.items():
            end = ends.get(tp)
            if end is None:
                continue
            key = (group, tp.topic)
            lags[key] = lags.get(key, 0) + max(0, int(end) - offset)
        return lags

    def _close_clients(self) -> None:
        admin, consumer, self._admin, self._consumer = self._admin, self._consumer, None, None
        self._topics_known = set()
        for client in (admin, consumer):
            if client is not None:
                try:
                    client.close()
                except Exception:  # closing a client of a broker that is gone may fail too
                    log.debug("closing a Kafka client failed", exc_info=True)

    def close(self) -> None:
        """Close the Kafka clients (a later scrape opens new ones)."""
        with self._lock:
            self._close_clients()
