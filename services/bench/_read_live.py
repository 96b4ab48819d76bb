"""The live fold's lag while the dashboard is read: fresh events published at a steady rate to the lifecycle log
that opscenter consumes, a dashboard client refreshing every few seconds, and how long each event took from its
send to its fold being visible in the read model (its processed mark, written in the fold's transaction)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from schemas import Event, encode_event

from . import stats
from ._read_db import Marks

TOWN_VIEW = "zoom=13&bbox=121.56,31.27,121.63,31.33"
"""The map of the whole town as the dashboard asks for it once it has fitted the town (its zoom and box)."""
DASHBOARD = (
    "/api/kpis?period=day&by=department",
    "/api/backlog",
    "/api/overdue?limit=50",
    "/api/trend?days=14",
    "/api/map/grids",
    f"/api/map/incidents?{TOWN_VIEW}",
)
"""What the dashboard asks for on each refresh (``static/dashboard.js``: its overdue page of 50, its map's view),
all at once."""
POLL_S = 0.05
"""How often the processed marks are looked at: the lag is measured to within this."""


@dataclass
class LiveResult:
    """The live phase's figures: the lag from send to fold, and the dashboard's refreshes meanwhile."""

    offered_rate: float
    seconds: float
    sent: int
    lag_ms: list[float] = field(default_factory=list)
    unfolded: int = 0
    refresh_ms: list[float] = field(default_factory=list)
    refresh_errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "offered_rate": self.offered_rate,
            "sent_rate": round(self.sent / self.seconds, 1) if self.seconds else None,
            "seconds": round(self.seconds, 1),
            "events": self.sent,
            "lag_ms": _rounded(stats.summarize(self.lag_ms)),
            "unfolded": self.unfolded,
            "poll_ms": POLL_S * 1000,
            "dashboard_refreshes": len(self.refresh_ms),
            "dashboard_refresh_ms": _rounded(stats.summarize(self.refresh_ms)),
            "dashboard_errors": len(self.refresh_errors),
        }


def _rounded(summary: Mapping[str, float | int | None]) -> dict[str, float | int | None]:
    return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in summary.items()}


async def measure_live(
    events: Sequence[Event],
    *,
    bootstrap: str,
    topic: str,
    rate: float,
    base_url: str,
    token: str,
    marks: Marks,
    refresh_s: float = 5.0,
    drain_s: float = 60.0,
    security: Mapping[str, Any] | None = None,
) -> LiveResult:
    """Publish ``events`` at ``rate`` a second (keyed by incident, as the services publish) while a dashboard
    refreshes every ``refresh_s``; then wait up to ``drain_s`` for the last ones to be folded."""
    from aiokafka import AIOKafkaProducer

    if folded := await asyncio.to_thread(marks.processed, [e.event_id for e in events]):
        raise RuntimeError(f"{len(folded)} of the live events are folded before they are sent: not fresh events")
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="gridloop-bench-live",
        acks="all",
        enable_idempotence=True,
        **dict(security or {}),
    )
    await producer.start()
    sent_at: dict[str, float] = {}
    seen_at: dict[str, float] = {}
    result = LiveResult(offered_rate=rate, seconds=0.0, sent=0)
    finished = asyncio.Event()
    """Set once every event is sent."""
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120.0) as client:
            dashboard = asyncio.create_task(_dashboard(client, refresh_s, finished, result))
            poller = asyncio.create_task(_poll(marks, sent_at, seen_at, finished, drain_s))
            started = time.monotonic()
            try:
                for i, event in enumerate(events):
                    delay = started + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    sent_at[event.event_id] = time.monotonic()
                    await producer.send(
                        topic,
                        value=encode_event(event),
                        key=event.incident_id.encode(),
                        headers=[("type", event.type.encode())],
                    )
                await producer.flush()
                result.seconds = time.monotonic() - started
                result.sent = len(sent_at)
            finally:
                finished.set()
                await poller
                await dashboard
    finally:
        await producer.stop()
    result.lag_ms = [(seen_at[e] - sent_at[e]) * 1000 for e in sent_at if e in seen_at]
    result.unfolded = len(sent_at) - len(result.lag_ms)
    return result


async def _poll(
    marks: Marks, sent_at: dict[str, float], seen_at: dict[str, float], finished: asyncio.Event, drain_s: float
) -> None:
    """Look at the processed marks of what was sent and not seen yet, until all are seen once publishing ends
    (or ``drain_s`` after it)."""
    drain_until: float | None = None
    while True:
        pending = [e for e in sent_at if e not in seen_at]
        looked = time.monotonic()
        if pending:
            for event_id in await asyncio.to_thread(marks.processed, pending):
                seen_at[event_id] = looked  # visible when the look began: its commit came before
        if finished.is_set():
            drain_until = drain_until or time.monotonic() + drain_s
            if len(seen_at) >= len(sent_at) or time.monotonic() > drain_until:
                return
        await asyncio.sleep(max(0.0, POLL_S - (time.monotonic() - looked)))


async def _dashboard(client: httpx.AsyncClient, refresh_s: float, finished: asyncio.Event, result: LiveResult) -> None:
    """The dashboard: every endpoint at once, then again ``refresh_s`` after the answers came, while events
    flow."""
    while not finished.is_set():
        began = time.monotonic()
        answers = await asyncio.gather(*(client.get(path) for path in DASHBOARD), return_exceptions=True)
        result.refresh_ms.append((time.monotonic() - began) * 1000)
        for path, answer in zip(DASHBOARD, answers, strict=True):
            if isinstance(answer, BaseException):
                result.refresh_errors.append(f"{path}: {type(answer).__name__}")
            elif answer.status_code != 200:
                result.refresh_errors.append(f"{path}: HTTP {answer.status_code}")
        try:
            await asyncio.wait_for(finished.wait(), timeout=refresh_s)
        except TimeoutError:
            continue


__all__ = ["DASHBOARD", "POLL_S", "TOWN_VIEW", "LiveResult", "measure_live"]
