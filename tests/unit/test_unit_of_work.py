"""The unit of work's one transaction: Core statements on its connection and an ORM session made on demand."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from services.common.auth import Role, TokenStore
from services.common.db import ProcessedEvent, Rows, UnitOfWork, make_engine
from services.opscenter.domain import Incident
from services.opscenter.models import TABLES, OpsIncident, OpsParked

MakeDb = Callable[[tuple[sa.Table, ...]], Engine]
T0 = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)


@pytest.fixture
def db(make_db: MakeDb) -> Engine:
    return make_db(TABLES)


def _write_all_three(uow: UnitOfWork, n: int) -> None:
    """A record, an appended row and an ORM object: three ways into the one transaction."""
    uow.insert(OpsIncident, incident_id=f"GL-{n}", category_code="exposed_garbage", status="reported", reported_at=T0)
    uow.append(ProcessedEvent, event_id=f"e{n}", type="IncidentReported", processed_at=T0)
    uow.session.add(OpsParked(event_id=f"p{n}", incident_id=f"GL-{n}", occurred_at=T0, payload=b"{}"))


def _counts(db: Engine) -> tuple[int, int, int]:
    with db.connect() as conn:
        return tuple(  # type: ignore[return-value]
            conn.execute(sa.text(f"select count(*) from {t}")).scalar_one()
            for t in ("ops_incident", "processed_event", "ops_parked")
        )


def test_records_appended_rows_and_orm_objects_commit_together(db: Engine) -> None:
    with UnitOfWork(db) as uow:
        _write_all_three(uow, 1)
        uow.commit()
    assert _counts(db) == (1, 1, 1)


def test_leaving_without_a_commit_writes_none_of_them(db: Engine) -> None:
    with UnitOfWork(db) as uow:
        _write_all_three(uow, 1)
        uow.session.flush()  # even what the session already sent to the database
    assert _counts(db) == (0, 0, 0)


def test_after_a_commit_the_unit_goes_on_in_a_new_transaction(db: Engine) -> None:
    with UnitOfWork(db) as uow:
        _write_all_three(uow, 1)
        uow.commit()
        _write_all_three(uow, 2)
        uow.commit()
        _write_all_three(uow, 3)  # not committed
    assert _counts(db) == (2, 2, 2)


def test_a_rollback_undoes_everything_since_the_last_commit_and_the_unit_goes_on(db: Engine) -> None:
    with UnitOfWork(db) as uow:
        _write_all_three(uow, 1)
        uow.commit()
        _write_all_three(uow, 2)
        uow.session.flush()
        uow.rollback()
        assert uow.record(OpsIncident, "GL-2") is None
        assert uow.session.get(OpsParked, "p2") is None
        _write_all_three(uow, 3)
        uow.commit()
    with db.connect() as conn:
        ids = sorted(conn.execute(sa.text("select incident_id from ops_incident")).scalars())
    assert ids == ["GL-1", "GL-3"]
    assert _counts(db) == (2, 2, 2)


def test_a_unit_is_used_inside_with_only(db: Engine) -> None:
    uow = UnitOfWork(db)
    with pytest.raises(RuntimeError, match="outside"):
        _ = uow.connection
    with pytest.raises(RuntimeError, match="outside"):
        _ = uow.session


def test_a_token_store_opened_while_another_process_creates_its_table_starts(tmp_path: Path) -> None:
    """Every service opens the shared token store at start-up: on a new database one of them creates the table
    between another's look for it and that one's CREATE TABLE. The late one starts all the same."""
    url = f"sqlite:///{tmp_path / 'auth.sqlite'}"
    late, early = make_engine(url), make_engine(url)
    raced: list[str] = []

    @sa.event.listens_for(late, "before_cursor_execute")
    def _the_other_process_first(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("CREATE TABLE") and not raced:
            raced.append(statement)
            TokenStore(early)  # it looked too, found nothing, and creates the table now

    store = TokenStore(late)
    assert raced  # the race did happen
    token, _ = store.issue(Role.OPS_CENTER, "duty-desk")
    assert store.check(token) is not None
    late.dispose()
    early.dispose()


def test_a_span_of_business_time_too_long_for_a_timedelta_is_the_longest_there_is(db: Engine) -> None:
    """At a time scale of 1e-12, 24 business hours are a trillion days of wall-clock time: never reached."""
    assert UnitOfWork(db, time_scale=1e-12).business_hours(24) == timedelta.max
    assert UnitOfWork(db, time_scale=3600).business_hours(24) == timedelta(seconds=24)


def test_a_commit_first_calls_back_with_the_rows_changed_as_read_and_as_now(db: Engine) -> None:
    incidents = Rows(OpsIncident, Incident)
    with UnitOfWork(db) as uow:
        uow.insert(OpsIncident, incident_id="GL-1", category_code="exposed_garbage", status="reported", reported_at=T0)
        uow.insert(OpsIncident, incident_id="GL-2", category_code="exposed_garbage", status="reported", reported_at=T0)
        uow.commit()
    seen: list[list[tuple[str | None, str, str]]] = []
    with UnitOfWork(db) as uow:
        uow.fetch(incidents, ["GL-1", "GL-2"])

        def look() -> None:
            seen.append([(b.status if b else None, a.incident_id, a.status) for b, a in uow.changed(incidents)])

        uow.before_commit(look)
        changed = uow.record(incidents, "GL-1")
        assert changed is not None
        changed.status = "filed"
        uow.add(incidents, Incident(incident_id="GL-3", category_code="c", status="reported", reported_at=T0))
        uow.commit()
        uow.commit()  # nothing changed since: the rows count as read as they were written
    assert seen == [[("reported", "GL-1", "filed"), (None, "GL-3", "reported")], []]
