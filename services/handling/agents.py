"""What handling consumes (work orders and decisions from the center, closures) and its webhook deliverer timer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from prometheus_client import Counter

from schemas.topics import INCIDENTS_CLOSED, WORKORDERS
from services.common.runtime import Runtime

from . import handlers
from .domain import WebhookJob
from .settings import HandlingSettings

Command = Callable[..., Awaitable[Any]]
"""``runtime.command``: runs ``handler(*args, uow)`` through the bus, committed."""

log = logging.getLogger(__name__)

CONSUMES = (WORKORDERS, INCIDENTS_CLOSED)

PRELOAD = handlers.preload

WEBHOOK_ATTEMPTS = Counter(
    "gridloop_webhook_attempts_total", "Webhook delivery attempts to departments' systems, by outcome.", ["outcome"]
)


async def _post(client: httpx.AsyncClient, job: WebhookJob) -> str | None:
    """Send one delivery; None when the department's system took it (2xx), else why not."""
    try:
        response = await client.post(
            job.url,
            content=job.payload.encode(),
            headers={
                "Content-Type": "application/json",
                "X-Gridloop-Event-Id": job.event_id,
                "X-Gridloop-Event-Type": job.event_type,
                "X-Gridloop-Delivery": str(job.id),
                "X-Gridloop-Attempt": str(job.attempt),
            },
        )
    except Exception as exc:  # timeouts, refused connections, bad URLs: all retried the same way
        return f"{type(exc).__name__}: {exc}"
    if response.is_success:
        return None
    return f"HTTP {response.status_code}: {response.text[:200]}"


def webhook_client(policy: HandlingSettings, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=policy.webhook_timeout_s, transport=transport)


async def deliver_due_webhooks(command: Command, policy: HandlingSettings, client: httpx.AsyncClient) -> int:
    """Send every due delivery once (concurrently) and record each outcome. Returns how many were attempted.

    The claim is committed before anything is sent: its lease keeps other ticks and instances off the claimed
    deliveries while they are on their way."""
    jobs: list[WebhookJob] = await command(handlers.claim_due_webhooks, policy)
    if not jobs:
        return 0
    errors = await asyncio.gather(*(_post(client, job) for job in jobs))
    for job, error in zip(jobs, errors, strict=True):
        status = await command(handlers.record_webhook_attempt, job.id, error, policy)
        WEBHOOK_ATTEMPTS.labels("delivered" if error is None else "error").inc()
        if error is not None:
            log.log(
                logging.ERROR if status == "failed" else logging.WARNING,
                "webhook %s (%s %s) attempt %d to %s: %s%s",
                job.id,
                job.event_type,
                job.event_id,
                job.attempt,
                job.url,
                error,
                "; giving up" if status == "failed" else "; will retry",
            )
    return len(jobs)


def register_webhooks(runtime: Runtime, policy: HandlingSettings) -> None:
    """Deliveries happen only here, never in the consumer: a department's system that is down delays nobody."""

    clients: list[httpx.AsyncClient] = []  # one per process, made inside the running event loop

    @runtime.timer(policy.webhook_interval_s)
    async def deliver_webhooks() -> None:
        if not clients:
            clients.append(webhook_client(policy))
        try:
            await deliver_due_webhooks(runtime.command, policy, clients[0])
        except Exception:  # the database may be down: the rows stay pending, the next tick tries again
            log.exception("webhook deliverer failed; will retry")
