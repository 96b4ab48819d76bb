"""How the faust worker's Kafka consumer asks the broker for records: how much to wait for, and how long.

faust builds its aiokafka consumer with ``fetch_min_bytes`` left at 1: the broker answers a fetch as soon as one
record is there, and the consumer sends the next fetch at once. At a steady rate nearly every record then costs a
fetch of its own — a request encoded, a response decoded, a hand-over from faust's consumer thread to the worker —
on the consumer and on the broker. A consumer that can wait a moment (a read model) asks for more at a time: the
broker holds the fetch until ``fetch_min_bytes`` have come or ``fetch_max_wait_ms`` have passed, whichever is
first. A busy stream fills the minimum at once and loses nothing; a quiet one waits at most the maximum.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.transport.drivers import aiokafka as _driver


class _ConsumerThread(_driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        fetch = getattr(self.app, "fetch", None)
        if fetch is not None:
            # read when the consumer starts, to make its fetcher (aiokafka's own attributes: the package is pinned)
            consumer._fetch_min_bytes, consumer._fetch_max_wait_ms = fetch
        return consumer


class _Consumer(_driver.Consumer):
    def _new_consumer_thread(self) -> _driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(_driver.Transport):
    Consumer = _Consumer


class FetchingApp(faust.App):
    """A faust app whose worker consumer fetches per ``fetch``: (min bytes, max wait ms); None leaves faust's."""

    fetch: tuple[int, int] | None = None

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)
