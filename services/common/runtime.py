"""The shape every service runs in: one faust worker (agents at concurrency 1) serving one FastAPI app.

:class:`Runtime` puts together what one service process owns, each part in a module of its own: the settings
(``settings.py``), the database and its units of work (``db.py``), the message bus that runs events and commands
in them (``bus.py``), the consumer, the one agent that applies what the service consumes (``consumer.py``), the
outbox that publishes what was committed (``outbox.py``), the token check of its API (``http.py``), and the
process that runs it all (``process.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from schemas import GAOHANG, Event, Town, utcnow
from schemas.topics import CATALOG, Topic, used_by

from . import http, metrics, process
from .auth import Role, TokenStore
from .bus import Handler, MessageBus, Preload
from .changes import Changes
from .consumer import Consumer
from .db import UnitOfWork, create_tables, make_engine
from .kafka import Publisher
from .outbox import Outbox, OutboxRelay
from .retention import Pruned, Pruner, mark_horizons
from .retry import retry_sync
from .settings import ServiceSettings

if TYPE_CHECKING:
    import faust
    from fastapi import FastAPI

log = logging.getLogger("gridloop")
T = TypeVar("T")


class Runtime(Consumer):
    """Everything one service process owns: settings, database, bus, publisher, outbox relay, faust app.

    It is the service's :class:`Consumer` (the consumer's steps stay its own methods, so that what a service or a
    test replaces on the runtime, the agent uses too), with the outbox, the timers, the API's token check and the
    process's start-up around it."""

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
        name = settings.service
        self.engine = make_engine(settings.database_url)
        self.tables = tuple(tables)
        publisher = Publisher(
            settings.kafka_bootstrap,
            client_id=f"gridloop-{name}",
            linger_ms=settings.tuning.kafka_linger_ms,
            **settings.kafka_client_options(),
        )
        outbox = Outbox(name, OutboxRelay(self.engine, publisher), publisher)
        super().__init__(name, MessageBus(self.uow, handlers, preload), outbox, settings.tuning)
        self.auth = TokenStore(make_engine(settings.auth_database_url))
        self.consumes = tuple(consumes)
        self.pruner = Pruner(
            self.engine,
            mark_horizons(self.consumes, (kind.__name__ for kind in handlers)),
            timedelta(seconds=settings.outbox_keep_s),
        )
        self.changes = Changes(settings.long_poll_max_s, settings.long_poll_recheck_s or 0.0)
        """Long polls of the API waiting for what the consumer commits."""
        self._readers: ThreadPoolExecutor | None = None
        self.app = self._faust_app()

    @property
    def relay(self) -> OutboxRelay:
        return self.outbox.relay

    @property
    def flush_wait_s(self) -> float:
        """How long a caller of :meth:`flush_outbox` waits for the broker; the flush itself goes on."""
        return self.outbox.wait_s

    # -- units of work -------------------------------------------------------------------------------

    def allow(self, *roles: Role) -> Any:
        """A FastAPI dependency: the calling principal, if it holds one of ``roles`` (else 401/403)."""
        return http.allow(self.auth, *roles)

    def uow(self) -> UnitOfWork:
        return UnitOfWork(self.engine, time_scale=self.settings.time_scale, on_commit=self.changes.notify)

    def init_db(self) -> None:
        create_tables(self.engine, self.tables)

    def replace_engine(self, engine: Engine) -> Engine:
        """Make every unit of work, the outbox relay and the pruner use ``engine`` from now on (a rebuilt read
        model swapped in); returns the engine used so far, still open (a read running on it finishes there)."""
        old, self.engine = self.engine, engine
        self.relay.engine = engine
        self.pruner.engine = engine
        return old

    async def command(self, handler: Callable[..., T], *args: Any) -> T:
        """Run a command through the bus (``handler(*args, uow)``, committed) and publish what it emitted: what
        an API route or a timer calls to change anything."""
        result, emitted = self.bus.execute(handler, *args)
        if emitted:
            await self.flush_outbox()
        return result

    def query(self, handler: Callable[..., T], *args: Any) -> T:
        """A read through the bus: ``handler(*args, uow)`` in a unit of work never committed, on the caller's
        thread. A route awaits :meth:`read` instead."""
        return self.bus.query(handler, *args)

    async def read(self, handler: Callable[..., T], *args: Any) -> T:
        """:meth:`query` off the event loop: the handler runs in one of the service's read threads (at most
        ``read_threads`` at once, the rest wait their turn), on a connection of its own from the engine's pool.

        The loop goes on consuming, publishing and answering while a read takes its time: a slow report delays
        nobody but its caller. (SQLite runs in WAL mode, where readers and the writer do not wait for each other.)
        """
        if isinstance(self.engine.pool, sa.pool.SingletonThreadPool):
            # an in-memory SQLite database is one per thread: it is read where it is written
            return self.bus.query(handler, *args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read_pool(), functools.partial(self.bus.query, handler, *args))

    def _read_pool(self) -> ThreadPoolExecutor:
        if self._readers is None:
            self._readers = ThreadPoolExecutor(
                max_workers=self.settings.read_threads, thread_name_prefix=f"gridloop-{self.name}-read"
            )
        return self._readers

    # -- faust ------------------------------------------------------------------------------------------

    def _faust_app(self) -> faust.App:
        app = process.worker_app(self.settings)
        self.attach(app, self.consumes)
        self.outbox.attach(app, self.settings.outbox_interval_s)

        @app.timer(self.settings.retention_interval_s)  # type: ignore[untyped-decorator]
        async def prune_tables() -> None:
            await self.prune()

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

    # -- running ---------------------------------------------------------------------------------------

    def run(self) -> None:
        """Wait for the broker and the topics, create tables, then run the faust worker (blocks)."""
        from .admin import wait_for_topics

        logging.basicConfig(
            level=self.settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        process._require_free_port(self.settings.http_host, self.settings.http_port, self.name)
        # its own topics only: where the broker has ACLs, a service is not even told of the others
        topics = used_by(self.name) or CATALOG
        wait_for_topics(
            self.settings.kafka_bootstrap, [t.name for t in topics], security=self.settings.kafka_client_options()
        )
        retry_sync("database", self.init_db)
        process.start_worker(self.app, self.settings)
