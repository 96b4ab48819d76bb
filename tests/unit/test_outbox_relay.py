"""The outbox relay when two instances of one service share a database: each record is published once, records of
one incident in order, and a relay that dies holding a lease does not keep its records from going out."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from schemas import Actor, ActorKind, Location, decode_event
from schemas import events as ev
from services.common.db import UnitOfWork, create_tables, make_engine
from services.common.outbox import OutboxRelay

from .conftest import FakeClock

Record = tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]


class FakePublisher:
    """Keeps what it is given; each send yields to the loop (as a real one waits for the broker)."""

    def __init__(self, sent: list[tuple[str, str]], *, delay: float = 0.0) -> None:
        self.sent = sent
        self.delay = delay
        self.fail: Exception | None = None

    async def send_all(self, records: Sequence[Record]) -> None:
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        self.sent.extend((topic, decode_event(value).event_id) for topic, _key, value, _headers in records)


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    """Two engines on one SQLite file, as two processes of one service see their database."""
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    first, second = make_engine(url), make_engine(url)
    create_tables(first, ())
    yield first, second
    first.dispose()
    second.dispose()


def _report(incident: str) -> ev.IncidentReported:
    return ev.IncidentReported(
        incident_id=incident,
        actor=Actor(kind=ActorKind.GRID_WORKER, id="w-gh01-1"),
        correlation_id=incident,
        source="grid_worker",
        category_code="exposed_garbage",
        location=Location(lat=31.275, lon=121.565),
        description="垃圾",
        reporter_id="w-gh01-1",
        client_report_id=f"r-{incident}",
    )


def _emit(engine: Engine, incidents: Sequence[str]) -> list[ev.IncidentReported]:
    """One committed outbox record per entry of ``incidents`` (an incident may come several times), in order."""
    events = [_report(i) for i in incidents]
    with UnitOfWork(engine) as uow:
        for e in events:
            uow.emit(e)
        uow.commit()
    return events


def _unpublished(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM outbox WHERE published_at IS NULL")).scalar_one())


async def test_two_relays_on_one_database_publish_each_record_once_and_in_order(
    engines: tuple[Engine, Engine], clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GRIDLOOP_TOPIC_NAMESPACE", raising=False)
    sent: list[tuple[str, str]] = []
    relays = [
        OutboxRelay(engine, FakePublisher(sent, delay=0.002), batch=4, clock=clock, owner=name)  # type: ignore[arg-type]
        for engine, name in zip(engines, ("a", "b"), strict=True)
    ]
    incidents = [f"I{n % 5}" for n in range(40)]  # five incidents, eight records each, interleaved
    events = _emit(engines[0], incidents[:20])
    flushes = [asyncio.ensure_future(r.flush()) for r in relays]
    await asyncio.sleep(0.005)
    events += _emit(engines[1], incidents[20:])  # committed while both relays are at work
    counts = await asyncio.gather(*flushes)
    for _ in range(10):  # what waited behind the other relay's lease goes out on the next timer tick
        if not _unpublished(engines[0]):
            break
        counts += await asyncio.gather(*(r.flush() for r in relays))
    assert sum(counts) == len(events)
    assert all(c > 0 for c in counts[:2]), counts  # both relays took part
    per_topic = Counter(topic for topic, _ in sent)
    assert set(per_topic.values()) == {len(events)}, per_topic  # every record on each of its topics …
    assert max(Counter(sent).values()) == 1  # … once
    incident_of = {e.event_id: e.incident_id for e in events}
    by_incident: dict[str, list[str]] = defaultdict(list)
    for topic, event_id in sent:
        if topic.endswith("lifecycle"):
            by_incident[incident_of[event_id]].append(event_id)
    for incident, published in by_incident.items():  # each incident's records in the order they were committed
        assert published == [e.event_id for e in events if e.incident_id == incident], incident


async def test_a_relay_waits_for_a_live_lease_and_takes_over_an_expired_one(
    engines: tuple[Engine, Engine], clock: FakeClock
) -> None:
    sent: list[tuple[str, str]] = []
    dead = OutboxRelay(engines[0], FakePublisher(sent), clock=clock, owner="dead")  # type: ignore[arg-type]
    survivor = OutboxRelay(engines[1], FakePublisher(sent), clock=clock, owner="survivor")  # type: ignore[arg-type]
    events = _emit(engines[0], ["I1", "I2", "I1"])
    token, claimed = dead.claim()  # … and the process is killed before it sends
    assert [r[0] for r in claimed] == [1, 2, 3] and token.startswith("dead/")
    assert await survivor.flush() == 0 and sent == []  # the lease holds
    clock.advance(seconds=dead.lease_s - 1)
    assert await survivor.flush() == 0
    clock.advance(seconds=2)
    assert await survivor.flush() == 3  # the lease ran out: the survivor sends them
    assert [e for t, e in sent if t.endswith("lifecycle")] == [e.event_id for e in events]
    assert await survivor.flush() == 0  # the next look (the timer's) marks them published
    assert _unpublished(engines[0]) == 0
    with engines[0].connect() as conn:
        assert {r[0] for r in conn.execute(sa.text("SELECT claimed_by FROM outbox"))} == {"survivor/3"}


async def test_a_later_record_waits_behind_an_earlier_one_of_its_incident(
    engines: tuple[Engine, Engine], clock: FakeClock
) -> None:
    sent: list[tuple[str, str]] = []
    slow = OutboxRelay(engines[0], FakePublisher(sent), clock=clock, owner="slow")  # type: ignore[arg-type]
    other = OutboxRelay(engines[1], FakePublisher(sent), clock=clock, owner="other")  # type: ignore[arg-type]
    [i1] = _emit(engines[0], ["I1"])
    slow.claim()  # sending I1's first record, slowly
    [i1_again, i2] = _emit(engines[1], ["I1", "I2"])
    assert await other.flush() == 1  # I2 only: I1's second record must not overtake its first
    assert [e for t, e in sent if t.endswith("lifecycle")] == [i2.event_id]
    assert await other.flush() == 0
    clock.advance(seconds=slow.lease_s + 1)
    assert await other.flush() == 2
    assert [e for t, e in sent if t.endswith("lifecycle")] == [i2.event_id, i1.event_id, i1_again.event_id]


async def test_a_failed_send_gives_the_claim_back(engines: tuple[Engine, Engine], clock: FakeClock) -> None:
    sent: list[tuple[str, str]] = []
    broken = FakePublisher(sent)
    broken.fail = ConnectionError("broker unreachable")
    relay = OutboxRelay(engines[0], broken, clock=clock, owner="a")  # type: ignore[arg-type]
    other = OutboxRelay(engines[1], FakePublisher(sent), clock=clock, owner="b")  # type: ignore[arg-type]
    _emit(engines[0], ["I1", "I2"])
    with pytest.raises(ConnectionError):
        await relay.flush()
    assert relay.pending() == 2
    assert await other.flush() == 2  # at once, without waiting out the lease
    assert other.unmarked == 2 and await other.flush() == 0
    assert other.pending() == 0 and other.unmarked == 0


async def test_what_a_flush_sent_is_marked_published_by_the_next_claim(
    engines: tuple[Engine, Engine], clock: FakeClock
) -> None:
    """No transaction of its own for the mark: the records wait, sent, until the relay's next claim (the next
    flush, or the outbox timer's) marks them in its transaction."""
    sent: list[tuple[str, str]] = []
    relay = OutboxRelay(engines[0], FakePublisher(sent), clock=clock, owner="a")  # type: ignore[arg-type]
    _emit(engines[0], ["I1", "I2"])
    statements: list[str] = []
    sa.event.listen(engines[0], "before_cursor_execute", lambda _c, _cur, st, *_: statements.append(st))
    assert await relay.flush() == 2
    assert not any(st.lstrip().upper().startswith("UPDATE") and "published_at=" in st for st in statements)
    assert (_unpublished(engines[0]), relay.unmarked, len(sent)) == (2, 2, 4)
    clock.advance(seconds=0.5)
    assert await relay.flush() == 0  # the timer's look: nothing to send, the two to mark
    assert (_unpublished(engines[0]), relay.unmarked, len(sent)) == (0, 0, 4)
    with engines[0].connect() as conn:
        marked = {r[0] for r in conn.execute(sa.text("SELECT published_at FROM outbox"))}
    assert len(marked) == 1 and None not in marked


async def test_a_relays_own_records_sent_and_not_marked_do_not_hold_back_its_next_ones(
    engines: tuple[Engine, Engine], clock: FakeClock
) -> None:
    """The claim marks before it looks: I1's second record goes out in the next flush, although its first is
    still under this relay's lease and not marked when the flush begins."""
    sent: list[tuple[str, str]] = []
    relay = OutboxRelay(engines[0], FakePublisher(sent), clock=clock, owner="a")  # type: ignore[arg-type]
    [first] = _emit(engines[0], ["I1"])
    assert await relay.flush() == 1 and relay.unmarked == 1
    [second] = _emit(engines[0], ["I1"])
    assert await relay.flush() == 1
    assert [e for t, e in sent if t.endswith("lifecycle")] == [first.event_id, second.event_id]
    assert relay.unmarked == 1 and _unpublished(engines[0]) == 1  # the second, until the next claim


async def test_another_relay_waits_for_records_sent_and_not_marked_yet(
    engines: tuple[Engine, Engine], clock: FakeClock
) -> None:
    """Until they are marked, records sent are under their relay's lease: another relay sends nothing of that
    incident meanwhile (order); once the mark is in, the next record is anyone's."""
    sent: list[tuple[str, str]] = []
    a = OutboxRelay(engines[0], FakePublisher(sent), clock=clock, owner="a")  # type: ignore[arg-type]
    b = OutboxRelay(engines[1], FakePublisher(sent), clock=clock, owner="b")  # type: ignore[arg-type]
    [first] = _emit(engines[0], ["I1"])
    assert await a.flush() == 1
    [second] = _emit(engines[1], ["I1"])
    assert await b.flush() == 0  # behind a's lease
    assert await a.flush() == 1  # a's next claim marks its record, then takes the second
    assert [e for t, e in sent if t.endswith("lifecycle")] == [first.event_id, second.event_id]


async def test_a_relay_that_stops_marks_what_it_sent(engines: tuple[Engine, Engine], clock: FakeClock) -> None:
    sent: list[tuple[str, str]] = []
    relay = OutboxRelay(engines[0], FakePublisher(sent), clock=clock, owner="a")  # type: ignore[arg-type]
    _emit(engines[0], ["I1", "I2", "I1"])
    assert await relay.flush() == 3 and _unpublished(engines[0]) == 3
    assert await relay.settle() == 3
    assert (_unpublished(engines[0]), relay.unmarked) == (0, 0)
    assert await relay.settle() == 0


def test_an_outbox_made_before_the_lease_gets_its_columns_and_indexes(tmp_path: Path, clock: FakeClock) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.sqlite'}")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE outbox (id INTEGER PRIMARY KEY, event_id VARCHAR(64) NOT NULL, "
                "incident_id VARCHAR(64) NOT NULL, type VARCHAR(40) NOT NULL, topics VARCHAR(200) NOT NULL, "
                "payload BLOB NOT NULL, created_at DATETIME NOT NULL, published_at DATETIME)"
            )
        )
    create_tables(engine, ())
    create_tables(engine, ())  # again (a second instance starting): nothing to do
    columns = {c["name"] for c in sa.inspect(engine).get_columns("outbox")}
    assert {"claimed_by", "claimed_until"} <= columns
    indexed = {tuple(i["column_names"]) for i in sa.inspect(engine).get_indexes("outbox")}
    assert ("incident_id",) in indexed and ("published_at",) in indexed
    _emit(engine, ["I1"])
    _, rows = OutboxRelay(engine, FakePublisher([]), clock=clock).claim()  # type: ignore[arg-type]
    assert len(rows) == 1
    engine.dispose()
