"""Long polls: waiters keyed by what they wait for, woken by what a unit of work committed."""

from __future__ import annotations

import asyncio
import threading

from services.common.changes import Changes, key_for, keys_for, long_poll


def test_keys_name_one_owner_and_everyone() -> None:
    assert keys_for("work-orders", "city_ops") == ("work-orders:city_ops", "work-orders:*")
    assert key_for("work-orders", "city_ops") == "work-orders:city_ops"
    assert key_for("work-orders", None) == "work-orders:*"


async def test_a_waiter_wakes_on_its_key_only() -> None:
    changes = Changes()
    mine = asyncio.create_task(changes.wait("work-orders:water", 5))
    other = asyncio.create_task(changes.wait("work-orders:city_ops", 0.3))
    await asyncio.sleep(0.05)
    changes.notify(keys_for("work-orders", "water"))
    assert await asyncio.wait_for(mine, 1) is True
    assert await other is False  # not woken: ran out


async def test_a_notification_from_another_thread_wakes_the_loop() -> None:
    changes = Changes()
    waiting = asyncio.create_task(changes.wait("verifications:gh01", 5))
    await asyncio.sleep(0.05)
    threading.Thread(target=changes.notify, args=(["verifications:gh01"],)).start()
    assert await asyncio.wait_for(waiting, 1) is True


async def test_a_long_poll_reads_again_when_woken_and_gives_up_when_the_wait_ends() -> None:
    changes = Changes()
    rows: list[int] = []
    reads = 0

    def read() -> list[int]:
        nonlocal reads
        reads += 1
        return list(rows)

    assert await long_poll(changes, "k:a", 0.1, read) == []
    polling = asyncio.create_task(long_poll(changes, "k:a", 5, read))
    await asyncio.sleep(0.05)
    changes.notify(["k:a"])  # woken, still nothing: waits on
    await asyncio.sleep(0.05)
    assert not polling.done()
    rows.append(1)
    changes.notify(["k:a"])
    assert await asyncio.wait_for(polling, 1) == [1]
    assert reads == 5  # 2 for the first poll, then: at once, after the empty wake, after the real one
    assert await long_poll(changes, "k:a", 0, read) == [1]  # something there: no wait at all


async def test_a_held_long_poll_also_reads_again_unwoken_every_recheck() -> None:
    # another instance of the service commits to the shared database and wakes nobody here: with a recheck the
    # request still finds the work within that time; without one it would answer empty when its wait ran out
    reads = 0

    def read() -> list[int]:
        nonlocal reads
        reads += 1
        return [7] if reads >= 4 else []

    assert await long_poll(Changes(recheck_s=0.01), "k:a", 5, read) == [7]
    assert reads == 4

    reads = 0
    assert await long_poll(Changes(), "k:a", 0.2, read) == []  # no recheck: read once, then when the wait ends
    assert reads == 2


def test_several_instances_recheck_every_second_unless_told_otherwise() -> None:
    from services.common.settings import ServiceSettings

    assert ServiceSettings().long_poll_recheck_s == 0.0  # alone, every change it makes wakes its own waiters
    assert ServiceSettings(instance="b").long_poll_recheck_s == 1.0
    assert ServiceSettings(instance="b", long_poll_recheck_s=0).long_poll_recheck_s == 0.0
    assert ServiceSettings(long_poll_recheck_s=2.5).long_poll_recheck_s == 2.5
