"""The shape every service runs in: one faust worker (agents at concurrency 1) serving one FastAPI app.

A consumed record is decoded, applied through the message bus in one unit of work (idempotent on event id,
state and outbox committed together), and the outbox is flushed to Kafka. Records that can never be applied
(bad JSON, unknown schema version, missing fields, unknown incident, a handler bug) go to the dead-letter
topic with the reason; the stream goes on. A database that is down is retried with backoff, never skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import faust
import sqlalchemy as sa
from aiokafka.errors import KafkaError as _KafkaError
from fastapi import Depends
from sqlalchemy.exc import InterfaceError, OperationalError
from tenacity import AsyncRetrying, retry_if_exception_type, retry_if_not_exception_type, wait_exponential

from schemas import GAOHANG, DecodeError, Event, Town, decode_event, utcnow
from schemas.topics import CATALOG, Topic, consumer_group, used_by

from . import metrics
from ._fetch import FetchingApp
from .auth import Role, TokenStore, require
from .bus import Handler, MessageBus, Preload
from .changes import Changes
from .db import UnitOfWork, create_tables, make_engine
from .errors import PoisonMessage
from .kafka import TOO_LARGE, OutboxRelay, Publisher, send_dead_letter
from .retention import Pruned, Pruner, mark_horizons
from .settings import ServiceSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("gridloop")
T = TypeVar("T")

_TRANSIENT = (OperationalError, InterfaceError)
"""A database that cannot be reached (or is locked) now: retried. Anything else a handler raises — another
database error (an IntegrityError, say), an OverflowError, even an OSError — is a bug in the handler or the data:
retried, it would stop the stream for ever; it is dead-lettered."""


class Runtime:
    """Everything one service process owns: settings, database, bus, publisher, outbox relay, faust app."""

    flush_wait_s: float = 2.0
    """How long a caller of :meth:`flush_outbox` waits for the broker; the flush itself goes on."""

    def __init__(
        self,
        settings: ServiceSettings,
        tables: Iterable[sa.Table],
        handlers: Mapping[type[Event], Handler],
        *,
        consumes: Iterable[Topic] = (),
        preload: Preload | None = None,
        town: Town = GAOHANG,
    ) -> None:
        self.settings = settings
        self.town = town
        """The town this service runs for: its rules were given the same value."""
        self.name = settings.service
        self.engine = make_engine(settings.database_url)
        self.tables = tuple(tables)
        self.bus = MessageBus(self.uow, handlers, preload)
        self.publisher = Publisher(
            settings.kafka_bootstrap,
            client_id=f"gridloop-{self.name}",
            linger_ms=settings.kafka_linger_ms,
            **settings.kafka_client_options(),
        )
        self.relay = OutboxRelay(self.engine, self.publisher)
        self.auth = TokenStore(make_engine(settings.auth_database_url))
        self.consumes = tuple(consumes)
        self.pruner = Pruner(
            self.engine,
            mark_horizons(self.consumes, (kind.__name__ for kind in handlers)),
            timedelta(seconds=settings.outbox_keep_s),
        )
        self.changes = Changes(settings.long_poll_max_s, settings.long_poll_recheck_s or 0.0)
        """Long polls of the API waiting for what the consumer commits."""
        self._children: dict[tuple[Any, ...], Any] = {}
        self._publisher_ready = asyncio.Lock()
        self._flushing: asyncio.Task[None] | None = None
        self._flush_wanted = False
        self._flush_expected = False
        self.app = self._faust_app()

    # -- units of work -------------------------------------------------------------------------------

    def allow(self, *roles: Role) -> Any:
        """A FastAPI dependency: the calling principal, if it holds one of ``roles`` (else 401/403)."""
        return Depends(require(self.auth, *roles))

    def uow(self) -> UnitOfWork:
        return UnitOfWork(self.engine, time_scale=self.settings.time_scale, on_commit=self.changes.notify)

    def init_db(self) -> None:
        create_tables(self.engine, self.tables)

    # -- faust ------------------------------------------------------------------------------------------

    def _faust_app(self) -> faust.App:
        s = self.settings
        app = FetchingApp(
            consumer_group(self.name),
            broker=[f"kafka://{h.strip()}" for h in s.kafka_bootstrap.split(",")],
            value_serializer="raw",
            key_serializer="raw",
            topic_allow_declare=False,
            topic_disable_leader=True,
            consumer_auto_offset_reset="earliest",
            broker_commit_every=50,
            broker_commit_interval=0.5,
            web_enabled=True,
            web_bind=s.http_host,
            web_port=s.http_port,
            datadir=str(s.var_dir / "faust" / f"{self.name}{'-' + s.instance if s.instance else ''}"),
            producer_acks=-1,
            # a stopping worker does not wait for the records its agent holds: what is not applied and acked is
            # not committed either, and comes again to the next consumer (which skips what was applied by event
            # id). Waiting could last for ever: a batch held for more records when the flow stopped.
            stream_wait_empty=False,
            logging_config=None,
            broker_credentials=_faust_credentials(s),
            Worker=_Worker,
        )
        app.fetch = (s.fetch_min_bytes, s.fetch_max_wait_ms)
        if self.consumes:
            channel = app.topic(*(t.name for t in self.consumes), key_type=bytes, value_type=bytes)

            @app.agent(channel, concurrency=1, name=f"{self.name}-consumer")  # type: ignore[untyped-decorator]
            async def consume(stream: Any) -> None:
                # Natural batching: records already delivered to this agent join the batch, and it is applied as
                # soon as nothing more is waiting — no timer, so no latency added when the stream is quiet, and
                # bigger batches (cheaper per record) when it is busy. Acks are manual: an offset is committed
                # only after its record's effects are.
                # A consumer whose latency matters less (a read model) may linger a moment for more records.
                # Once faust suspends the flow (a shutdown, a rebalance) the records still queued are skipped, to
                # come again later: a batch is then applied with what it holds, never kept waiting for more.
                manual = stream.noack()
                empty = manual.channel.empty
                flowing = app.flow_control.is_active
                batch: list[Any] = []
                lingered = False
                async for event in manual.events():
                    batch.append(event)
                    room = len(batch) < s.batch_max and flowing()
                    if room and not empty():
                        continue
                    if room and s.batch_linger_s and not lingered:
                        lingered = True
                        await asyncio.sleep(s.batch_linger_s)
                        if not empty() and flowing():
                            continue
                    await self.process_batch([e.message for e in batch])
                    for e in batch:
                        await manual.ack(e)
                    batch.clear()
                    lingered = False

        @app.timer(s.outbox_interval_s)  # type: ignore[untyped-decorator]
        async def relay_outbox() -> None:
            await self.flush_outbox(expected=False)
            with contextlib.suppress(Exception):  # the database may be down: the flush has logged it
                # read, not assumed: rows may wait behind another instance's lease
                metrics.OUTBOX_PENDING.labels(self.name).set(self.relay.pending())

        @app.timer(s.retention_interval_s)  # type: ignore[untyped-decorator]
        async def prune_tables() -> None:
            await self.prune()

        @app.on_before_shutdown.connect  # type: ignore[arg-type]
        async def mark_what_was_sent(_app: Any, *_: Any, **__: Any) -> None:
            try:
                await self.relay.settle()
            except Exception as exc:  # the records go out again once their lease ends; consumers skip them
                log.warning("sent outbox records not marked at shutdown (%s: %s)", type(exc).__name__, exc)

        return app

    def serve(self, api: FastAPI) -> None:
        from faust.contrib.asgi import serve_asgi

        # no proxy-header rewriting (nothing here reads the client's address; one ASGI layer less per request)
        # and no access log (the request metrics count every answer)
        serve_asgi(
            self.app,
            api,
            host=self.settings.http_host,
            port=self.settings.http_port,
            log_level="warning",
            proxy_headers=False,
            access_log=False,
        )

    def timer(self, interval: float) -> Callable[[Callable[[], Any]], Any]:
        return self.app.timer(interval)  # type: ignore[no-any-return]

    # -- processing ------------------------------------------------------------------------------------

    async def ensure_publisher(self) -> None:
        if self.publisher.started:
            return  # the common case, on every flush: no lock, no retry machinery
        async with self._publisher_ready:
            async for attempt in _forever("Kafka producer"):
                with attempt:
                    await self.publisher.start()

    async def process(self, message: Any) -> None:
        """Apply one consumed record (a faust Message: topic, partition, offset, key, value)."""
        event = await self._decode(message)
        if event is not None:
            await self._process_event(message, event)

    async def _decode(self, message: Any) -> Event | None:
        """The record's event, counted; None if it cannot be decoded (then it is dead-lettered)."""
        try:
            event = decode_event(message.value)
        except DecodeError as exc:
            await self.dead_letter(message, exc.reason, kind="decode")
            return None
        except Exception as exc:  # whatever a record does in decoding, the stream goes on without it
            await self.dead_letter(message, f"undecodable record: {type(exc).__name__}: {exc}", kind="decode")
            return None
        self._metric(metrics.EVENTS_CONSUMED, message.topic, event.type).inc()
        return event

    def _metric(self, metric: Any, *labels: str) -> Any:
        """``metric``'s child for this service and ``labels``, looked up once, not per record."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.name, *labels)
        return child

    async def _process_event(self, message: Any, event: Event) -> None:
        if not self.bus.handles(event):
            return
        try:
            emitted = await self.apply(event)
        except PoisonMessage as exc:
            await self.dead_letter(message, f"{type(exc).__name__}: {exc}", kind="poison")
            return
        except Exception as exc:  # a bug must not stop the town's pipeline: park the record, keep going
            log.exception("handler failed on %s %s", event.type, event.event_id)
            await self.dead_letter(message, f"handler error {type(exc).__name__}: {exc}", kind="error")
            return
        if emitted:
            await self.flush_outbox()

    async def process_batch(self, messages: Sequence[Any]) -> None:
        """Apply consumed records in one transaction and publish what they caused with one flush.

        A record that cannot be decoded is dead-lettered on its own. If applying the batch fails (a poison
        record, a handler bug) the transaction is rolled
        back and the records are applied one at a time, so only the bad one is set aside."""
        if len(messages) == 1:
            await self.process(messages[0])
            return
        decoded: list[tuple[Any, Event]] = []
        for message in messages:
            event = await self._decode(message)
            if event is not None and self.bus.handles(event):
                decoded.append((message, event))
        if not decoded:
            return
        events = [event for _, event in decoded]
        started = time.perf_counter()
        try:
            emitted = await self._apply_batch(events)
        except Exception as exc:
            log.info("batch of %d not applied at once (%s: %s); one at a time", len(events), type(exc).__name__, exc)
            metrics.BATCH_FALLBACKS.labels(self.name).inc()
            for message, event in decoded:
                await self._process_event(message, event)
            return
        metrics.BATCH_SIZE.labels(self.name).observe(len(events))
        share = (time.perf_counter() - started) / len(events)
        for event in events:
            self._metric(metrics.HANDLE_SECONDS, event.type).observe(share)
        if emitted:
            await self.flush_outbox()

    async def _apply_batch(self, events: Sequence[Event]) -> list[Event]:
        try:
            return self.bus.handle_batch(events)
        except _TRANSIENT as exc:
            log.warning("database unavailable (%s); retrying", exc)
        async for attempt in _forever("database", _TRANSIENT):
            with attempt:
                return self.bus.handle_batch(events)
        raise AssertionError("unreachable")

    async def apply(self, event: Event) -> list[Event]:
        """Run the bus for ``event``, retrying while the database is unreachable."""
        started = time.perf_counter()
        try:  # the common case first, without the retry machinery's cost per message
            emitted = self.bus.handle(event)
        except _TRANSIENT as exc:
            log.warning("database unavailable (%s); retrying", exc)
        else:
            self._metric(metrics.HANDLE_SECONDS, event.type).observe(time.perf_counter() - started)
            return emitted
        async for attempt in _forever("database", _TRANSIENT):
            with attempt:
                started = time.perf_counter()
                emitted = self.bus.handle(event)
                self._metric(metrics.HANDLE_SECONDS, event.type).observe(time.perf_counter() - started)
                return emitted
        raise AssertionError("unreachable")

    async def command(self, handler: Callable[..., T], *args: Any) -> T:
        """Run a command through the bus (``handler(*args, uow)``, committed) and publish what it emitted: what
        an API route or a timer calls to change anything."""
        result, emitted = self.bus.execute(handler, *args)
        if emitted:
            await self.flush_outbox()
        return result

    def query(self, handler: Callable[..., T], *args: Any) -> T:
        """A read through the bus: ``handler(*args, uow)`` in a unit of work never committed."""
        return self.bus.query(handler, *args)

    async def flush_outbox(self, *, expected: bool = True) -> None:
        """Publish the outbox now, waiting at most ``flush_wait_s``. ``expected``: records were just committed
        (False for the timer's look, which skips the write transaction when nothing waits).

        What is in the outbox is already durable: a caller (an API request, the consumer) must not hang on a
        broker that is down. The flush goes on in the background — one at a time, a call made meanwhile asking
        for one more round — connecting with backoff, and the outbox timer keeps trying."""
        self._flush_wanted = True
        self._flush_expected = self._flush_expected or expected
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush_while_wanted())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.flush_wait_s):
                await asyncio.shield(self._flushing)

    async def _flush_while_wanted(self) -> None:
        while self._flush_wanted:
            self._flush_wanted = False
            expected, self._flush_expected = self._flush_expected, False
            try:
                await self.ensure_publisher()
                sent = await self.relay.flush(expected=expected)
                if sent:
                    metrics.OUTBOX_PUBLISHED.labels(self.name).inc(sent)
            except Exception as exc:  # the records stay in the outbox; the timer tries again
                log.warning("outbox not flushed yet (%s: %s); will retry", type(exc).__name__, exc)
                with contextlib.suppress(Exception):  # the database may be what failed
                    metrics.OUTBOX_PENDING.labels(self.name).set(self.relay.pending())
                return

    async def prune(self) -> Pruned:
        """Delete published outbox records and idempotency marks no longer needed, a batch at a time (yielding to
        the consumer and the API between batches). A failure is logged; the next round tries again."""
        outbox = marks = 0
        try:
            while (done := self.pruner.step(utcnow())) is not None:
                outbox, marks = outbox + done.outbox, marks + done.marks
                await asyncio.sleep(0)
        except Exception as exc:
            log.warning("pruning stopped (%s: %s); will retry", type(exc).__name__, exc)
        if outbox:
            metrics.ROWS_PRUNED.labels(self.name, "outbox").inc(outbox)
        if marks:
            metrics.ROWS_PRUNED.labels(self.name, "processed_event").inc(marks)
        return Pruned(outbox=outbox, marks=marks)

    async def dead_letter(self, message: Any, reason: str, *, kind: str) -> None:
        """Send ``message`` to the dead-letter topic with ``reason``, retrying while the broker is unreachable.

        A dead letter the producer or the broker refuses as too large is never retried (it would be refused for
        ever, and every later record would wait behind it): it is sent again without any of the record — where
        it is, its size and hash, the reason — and if even that is refused, it is logged and counted as lost.
        The record itself stays on its source topic either way."""
        metrics.DEAD_LETTERS.labels(self.name, kind).inc()
        fields: dict[str, Any] = {
            "service": self.name,
            "reason": reason,
            "source_topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "key": message.key,
            "value": message.value,
        }
        await self.ensure_publisher()
        try:
            await self._send_dead_letter(fields)
            return
        except TOO_LARGE as exc:
            refused = exc
        where = f"{message.topic}[{message.partition}]@{message.offset}"
        try:
            await self._send_dead_letter({**fields, "minimal": True})
        except TOO_LARGE as exc:
            metrics.DEAD_LETTERS_UNSENDABLE.labels(self.name, "lost").inc()
            log.error("dead letter of %s not sent, refused as too large (%s): %s", where, exc, reason)
        else:
            metrics.DEAD_LETTERS_UNSENDABLE.labels(self.name, "reduced").inc()
            log.error("dead letter of %s refused as too large (%s); sent without the record", where, refused)

    async def _send_dead_letter(self, fields: dict[str, Any]) -> None:
        async for attempt in _forever("dead-letter topic"):
            with attempt:
                await send_dead_letter(self.publisher, **fields)

    # -- running ---------------------------------------------------------------------------------------

    def run(self) -> None:
        """Wait for the broker and the topics, create tables, then run the faust worker (blocks)."""
        from .admin import wait_for_topics

        logging.basicConfig(
            level=self.settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        _require_free_port(self.settings.http_host, self.settings.http_port, self.name)
        # its own topics only: where the broker has ACLs, a service is not even told of the others
        topics = used_by(self.name) or CATALOG
        wait_for_topics(
            self.settings.kafka_bootstrap, [t.name for t in topics], security=self.settings.kafka_client_options()
        )
        _retry_sync("database", self.init_db)
        Path(self.app.conf.datadir).mkdir(parents=True, exist_ok=True)
        level = {"warning": "warn", "critical": "crit"}.get(self.settings.log_level.lower(), self.settings.log_level)
        sys.argv = [sys.argv[0], "--loop", self.settings.event_loop, "worker", "--loglevel", level]
        use_event_loop(self.settings.event_loop)
        sys.setswitchinterval(self.settings.switch_interval_s)
        _freeze_startup_objects()
        self.app.main()


class _Worker(faust.Worker):
    """faust's worker without its terminal spinner.

    At log level ``warning`` and above, faust turns the spinner on by setting the root logger to DEBUG (its own
    handler keeps the chosen level), and leaves it so after start-up: every debug line of every library (aiokafka
    logs each request it sends) is then built as a record and handed to the handlers, for the life of the worker.
    Without the spinner the root logger stays at the level asked for."""

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        self.spinner = None


def use_event_loop(name: str) -> None:
    """Make ``name`` ("uvloop" or "aio") the loop the worker is about to create.

    faust reads ``--loop`` from the command line once, when ``faust`` is first imported; a service has imported
    it long before its worker starts, so the option alone leaves the standard library's loop in place."""
    if name == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    else:
        asyncio.set_event_loop_policy(None)


def _freeze_startup_objects() -> None:
    """Move what start-up made (modules, models, compiled schemas and statements) out of the collector's reach.

    They live as long as the process, yet every full collection walks them all: in a running service that was a
    pause of 111-237 ms, in the middle of the stream, every few minutes. Frozen, a full collection walks only what
    was made since (7-72 ms). Garbage made later is collected as before."""
    gc.collect()
    gc.freeze()


def _faust_credentials(s: ServiceSettings) -> Any:
    if s.kafka_security_protocol == "PLAINTEXT":
        return None
    return faust.SASLCredentials(
        username=s.kafka_sasl_username,
        password=s.kafka_sasl_password.get_secret_value(),
        mechanism=s.kafka_sasl_mechanism,
        ssl_context=None if s.kafka_security_protocol == "SASL_PLAINTEXT" else ssl.create_default_context(),
    )


def _require_free_port(host: str, port: int, service: str) -> None:
    """Fail at once, with the reason, rather than run a worker whose API could not bind."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SystemExit(
                f"{service}: cannot listen on {host}:{port} ({exc.strerror}); "
                f"free it or set GRIDLOOP_{service.upper()}_HTTP_PORT"
            ) from None


_RETRYABLE = (*_TRANSIENT, OSError, ConnectionError, asyncio.TimeoutError, _KafkaError)
"""A broker or a database that cannot be reached now: retried, except a record refused as too large (TOO_LARGE,
Kafka errors too), which would be refused for ever."""


def _forever(what: str, retryable: tuple[type[BaseException], ...] = _RETRYABLE) -> AsyncRetrying:
    def _log(state: Any) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "%s unavailable (%s: %s); retry %d in %.1f s", what, type(exc).__name__, exc, state.attempt_number, wait
        )

    return AsyncRetrying(
        retry=retry_if_exception_type(retryable) & retry_if_not_exception_type(TOO_LARGE),
        wait=wait_exponential(multiplier=0.2, max=5),
        before_sleep=_log,
        reraise=True,
    )


def _retry_sync(what: str, fn: Callable[[], None]) -> None:
    from tenacity import Retrying

    for attempt in Retrying(
        retry=retry_if_exception_type(_TRANSIENT),
        wait=wait_exponential(multiplier=0.2, max=5),
        before_sleep=lambda s: log.warning(
            "%s unavailable (%s); retry %d", what, s.outcome.exception() if s.outcome else "?", s.attempt_number
        ),
        reraise=True,
    ):
        with attempt:
            fn()
