"""A service's process: the faust app its worker runs, and the start-up of that worker with its opt-in tuning
(the command line faust reads, the event loop, the GIL's switch interval, the start-up objects frozen out of the
collector's reach)."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import faust

from schemas.topics import consumer_group

from ._fetch import FetchingApp
from .settings import ServiceSettings, Tuning

log = logging.getLogger("gridloop")


def worker_app(settings: ServiceSettings) -> FetchingApp:
    """The faust app of a service's worker: its consumer group, its broker, the web server its API is served on."""
    s = settings
    name = s.service
    return FetchingApp(
        consumer_group(name),
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
        datadir=str(s.var_dir / "faust" / f"{name}{'-' + s.instance if s.instance else ''}"),
        producer_acks=-1,
        # a stopping worker does not wait for the records its agent holds: what is not applied and acked is
        # not committed either, and comes again to the next consumer (which skips what was applied by event
        # id). Waiting could last for ever: a batch held for more records when the flow stopped.
        stream_wait_empty=False,
        logging_config=None,
        broker_credentials=_faust_credentials(s),
        Worker=_Worker,
    )


def start_worker(app: faust.App, settings: ServiceSettings) -> None:
    """Run ``app``'s worker (blocks), with the tuning the settings ask for."""
    Path(app.conf.datadir).mkdir(parents=True, exist_ok=True)
    level = {"warning": "warn", "critical": "crit"}.get(settings.log_level.lower(), settings.log_level)
    tuning: Tuning = settings.tuning
    sys.argv = [sys.argv[0], "--loop", tuning.event_loop, "worker", "--loglevel", level]
    use_event_loop(tuning.event_loop)
    sys.setswitchinterval(tuning.switch_interval_s)
    _freeze_startup_objects()
    app.main()


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

    They live as long as the process, yet every full collection would walk them all, a pause in the middle of the
    stream; frozen, a full collection walks only what was made since (docs/performance.md has the pauses
    measured). Garbage made later is collected as before."""
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
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SystemExit(
                f"{service}: cannot listen on {host}:{port} ({exc.strerror}); "
                f"free it or set GRIDLOOP_{service.upper()}_HTTP_PORT"
            ) from None
