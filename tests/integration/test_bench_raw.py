"""The raw limit's measurement over the real broker: every record produced is consumed, and its CPU is counted."""

from __future__ import annotations

import pytest

from services.bench.monitor import broker_pid
from services.bench.raw import RAW_TOPIC_SUFFIX, measure_raw
from tests.kafka_support import fresh_namespace, require_broker

pytestmark = pytest.mark.kafka


def test_a_counted_raw_run_consumes_every_record_and_counts_the_cpu_it_took() -> None:
    bootstrap = require_broker()
    ns = fresh_namespace("raw")
    pid = broker_pid()

    result = measure_raw(bootstrap, f"{ns}.{RAW_TOPIC_SUFFIX}", count=3000, broker_pid=pid)

    assert result.produced == result.consumed == 3000
    assert result.hops_per_s > 0
    assert result.client_cpu_s is not None and result.client_cpu_s > 0
    if pid is None:  # a broker started elsewhere (its pid file not in var/): the clients alone are counted
        assert result.broker_cpu_s is None and result.cpu_ms_per_hop is None
    else:
        assert result.broker_cpu_s is not None and result.broker_cpu_s > 0
        assert result.cpu_ms_per_hop == pytest.approx((result.client_cpu_s + result.broker_cpu_s) * 1000 / 3000)
    assert result.as_dict()["cpu_ms_per_hop"] == (
        None if result.cpu_ms_per_hop is None else pytest.approx(result.cpu_ms_per_hop, abs=1e-4)
    )
