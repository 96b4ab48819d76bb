"""The faust entrypoint, driven with faust's test_context(): decode → bus → outbox, or dead-letter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from schemas import Actor, Location, encode_event
from schemas import events as ev
from services.common.db import OutboxRecord, ProcessedEvent, UnitOfWork
from services.dispatch.app import build
from services.dispatch.settings import DispatchSettings


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    rt = build(DispatchSettings(var_dir=tmp_path, http_port=18105))
    rt.init_db()
    letters: list[tuple[str, str]] = []
    flushes: list[int] = []

    async def dead_letter(message: Any, reason: str, *, kind: str) -> None:
        letters.append((kind, reason))

    async def flush_outbox() -> None:
        flushes.append(1)

    monkeypatch.setattr(rt, "dead_letter", dead_letter)
    monkeypatch.setattr(rt, "flush_outbox", flush_outbox)
    rt.letters, rt.flushes = letters, flushes  # type: ignore[attr-defined]
    return rt


def _report() -> ev.IncidentReported:
    return ev.IncidentReported(
        incident_id="GL-1",
        actor=Actor(kind="grid_worker", id="w-gh01-1"),
        correlation_id="GL-1",
        source="grid_worker",
        category_code="exposed_garbage",
        location=Location(lat=31.275, lon=121.565),
        description="d",
        reporter_id="w-gh01-1",
        client_report_id="r-1",
    )


async def test_agent_applies_once_and_dead_letters_bad_records(runtime: Any) -> None:
    agent = runtime.app.agents["dispatch-consumer"]
    report = encode_event(_report())
    async with agent.test_context() as ctx:
        await ctx.put(report)
        await ctx.put(report)  # redelivered
        await ctx.put(b"{broken json")
        await ctx.put(b'{"schema_version": 9, "type": "IncidentReported"}')
        ghost = ev.WorkOrderAccepted(
            incident_id="ghost",
            actor=Actor.system("x"),
            correlation_id="c",
            work_order_id="ghost-1",
            department_code="city_ops",
        )
        await ctx.put(encode_event(ghost))
    with UnitOfWork(runtime.engine) as uow:
        types = [r.type for r in uow.session.exec(select(OutboxRecord)).all()]
        assert types == ["IncidentFiled", "WorkOrderDispatched"]
        assert len(uow.session.exec(select(ProcessedEvent)).all()) == 1
    kinds = [k for k, _ in runtime.letters]
    assert kinds == ["decode", "decode", "poison"]
    assert "malformed JSON" in runtime.letters[0][1]
    assert "unknown schema_version 9" in runtime.letters[1][1]
    assert "ghost" in runtime.letters[2][1]
    assert runtime.flushes == [1]
