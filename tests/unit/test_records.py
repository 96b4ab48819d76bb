"""Records (rows as plain attributes, written back with Core statements at the commit) in the unit of work."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine

from services.common.db import UnitOfWork
from services.opscenter.models import TABLES, OpsIncident, OpsWorkOrder

MakeDb = Callable[[tuple[sa.Table, ...]], Engine]
T0 = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
INCIDENTS: sa.Table = OpsIncident.__table__  # type: ignore[attr-defined]


@pytest.fixture
def db(make_db: MakeDb) -> Engine:
    return make_db(TABLES)


@pytest.fixture
def statements(db: Engine) -> Iterator[list[str]]:
    """The SQL sent to the database, in order."""
    sent: list[str] = []

    def _record(conn: object, cursor: object, statement: str, *_: object) -> None:
        sent.append(statement.split()[0].upper())

    sa_event.listen(db, "before_cursor_execute", _record)
    yield sent
    sa_event.remove(db, "before_cursor_execute", _record)


def _incident(uow: UnitOfWork, incident_id: str = "GL-1") -> None:
    uow.insert(OpsIncident, incident_id=incident_id, category_code="exposed_garbage", status="reported", reported_at=T0)


def _stored_incident(db: Engine) -> None:
    """GL-1 inserted and committed by a unit of its own."""
    with UnitOfWork(db) as uow:
        _incident(uow)
        uow.commit()


def test_an_inserted_record_is_written_with_its_columns_defaults(db: Engine) -> None:
    _stored_incident(db)
    with UnitOfWork(db) as uow:
        row = uow.record(OpsIncident, "GL-1")
        assert row is not None
        assert (row.status, row.source, row.return_count, row.departments, row.big) == ("reported", "", 0, "", False)
        assert row.deadline is None and row.category_code == "exposed_garbage"
        assert uow.record(OpsIncident, "GL-2") is None


def test_the_commit_writes_only_the_columns_that_changed(db: Engine) -> None:
    _stored_incident(db)
    with UnitOfWork(db) as uow:
        row = uow.record(OpsIncident, "GL-1")
        assert row is not None
        row.status = "filed"
        row.return_count += 1
        # meanwhile another writer sets a column this unit read but did not change
        with db.begin() as conn:
            conn.execute(sa.update(INCIDENTS).values(address="浦东大道 1 号"))
        uow.commit()
    with db.connect() as conn:
        status, returns, address = conn.execute(
            sa.select(INCIDENTS.c.status, INCIDENTS.c.return_count, INCIDENTS.c.address)
        ).one()
    assert (status, returns, address) == ("filed", 1, "浦东大道 1 号")


def test_unchanged_records_send_no_update_and_a_second_commit_sends_only_what_changed_since(
    db: Engine, statements: list[str]
) -> None:
    _stored_incident(db)
    statements.clear()
    with UnitOfWork(db) as uow:
        uow.fetch(OpsIncident, ["GL-1", "GL-9"])
        row = uow.record(OpsIncident, "GL-1")
        assert row is not None and uow.record(OpsIncident, "GL-9") is None  # both answered by the one read
        uow.commit()
        assert statements == ["SELECT"]
        row.status = "closed"
        uow.commit()
        assert statements == ["SELECT", "UPDATE"]
        uow.commit()
        assert statements == ["SELECT", "UPDATE"]
    with db.connect() as conn:
        assert conn.execute(sa.select(INCIDENTS.c.status)).scalar_one() == "closed"


def test_records_by_a_column_hold_the_read_and_the_inserted_as_the_same_objects(db: Engine) -> None:
    def order(uow: UnitOfWork, n: int) -> None:
        uow.insert(
            OpsWorkOrder,
            work_order_id=f"GL-1-{n}",
            incident_id="GL-1",
            department_code="city_ops",
            category_code="exposed_garbage",
            status="dispatched",
            deadline=T0,
            dispatched_at=T0,
        )

    with UnitOfWork(db) as uow:
        order(uow, 1)
        uow.commit()
    with UnitOfWork(db) as uow:
        first = uow.record(OpsWorkOrder, "GL-1-1")
        order(uow, 2)  # added before the group is read: the group still has it
        group = uow.records_by(OpsWorkOrder, "incident_id", "GL-1")
        assert sorted(o.work_order_id for o in group) == ["GL-1-1", "GL-1-2"]
        assert any(o is first for o in group)
        order(uow, 3)  # and after
        assert len(uow.records_by(OpsWorkOrder, "incident_id", "GL-1")) == 3
        for o in uow.records_by(OpsWorkOrder, "incident_id", "GL-1"):
            o.status = "closed"
        assert uow.records_by(OpsWorkOrder, "incident_id", "GL-2") == []
        uow.commit()
    with db.connect() as conn:
        table: sa.Table = OpsWorkOrder.__table__  # type: ignore[attr-defined]
        assert sorted(conn.execute(sa.select(table.c.work_order_id, table.c.status))) == [
            ("GL-1-1", "closed"),
            ("GL-1-2", "closed"),
            ("GL-1-3", "closed"),
        ]


def test_inserting_a_key_twice_is_refused_and_nothing_is_written_without_a_commit(db: Engine) -> None:
    with UnitOfWork(db) as uow:
        _incident(uow)
        with pytest.raises(ValueError, match="GL-1"):
            _incident(uow)
    with UnitOfWork(db) as uow:
        assert uow.record(OpsIncident, "GL-1") is None
