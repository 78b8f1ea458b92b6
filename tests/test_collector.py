"""HeapFreezer: when the heap is frozen, collected and unfrozen (sans-IO, virtual clock)."""

from __future__ import annotations

import gc
import weakref

import pytest
import trio

from trio_quiccmd.server import collector as collector_module
from trio_quiccmd.server.collector import HeapFreezer


class FakeCollector:
    """Records what the freezer asks of the garbage collector."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.frozen = False
        self.enabled = True

    def collect(self) -> int:
        # "full" walks everything; with a frozen heap only what is not frozen.
        self.calls.append("collect" if self.frozen else "full")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")
        self.frozen = True

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")
        self.frozen = False

    def isenabled(self) -> bool:
        return self.enabled

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


class Fleet:
    """Connected agents, each a distinct object for as long as its session lasts."""

    def __init__(self) -> None:
        self.links: list[object] = []

    def connect(self, n: int) -> None:
        self.links += [object() for _ in range(n)]

    def leave(self, n: int) -> None:
        del self.links[:n]

    def reconnect(self, n: int) -> None:
        self.leave(n)
        self.connect(n)


def make(min_agents: int = 100) -> tuple[HeapFreezer, Fleet, FakeCollector]:
    fleet, fake = Fleet(), FakeCollector()
    return HeapFreezer(lambda: fleet.links, min_agents=min_agents, collector=fake), fleet, fake


def frozen_with(agents: int) -> tuple[HeapFreezer, Fleet, FakeCollector]:
    """A freezer that has just frozen the heap with ``agents`` connected (its calls taken)."""
    freezer, fleet, fake = make()
    fleet.connect(agents)
    freezer.check()
    assert fake.take() == ["full", "freeze"]
    return freezer, fleet, fake


async def wait_out_the_minimum_gap() -> None:
    await trio.sleep(collector_module.MIN_SECONDS_BETWEEN_FULL_COLLECTIONS)


async def test_nothing_is_frozen_below_the_threshold(autojump_clock):
    freezer, fleet, fake = make()
    fleet.connect(99)
    freezer.check()
    assert fake.take() == [] and not freezer.frozen


async def test_at_the_threshold_one_full_collection_then_a_freeze(autojump_clock):
    freezer, fleet, fake = make()
    fleet.connect(100)
    freezer.check()
    assert fake.take() == ["full", "freeze"] and freezer.frozen
    freezer.check()  # nothing changed: nothing to do
    assert fake.take() == []


async def test_growth_freezes_again_after_a_short_collection(autojump_clock):
    freezer, fleet, fake = frozen_with(100)
    fleet.connect(24)  # less than a quarter more
    freezer.check()
    assert fake.take() == []
    fleet.connect(1)
    freezer.check()
    # Never unfrozen: the collection walks only what is not frozen.
    assert fake.take() == ["collect", "freeze"]


async def test_a_fleet_that_stops_growing_short_of_a_quarter_is_frozen_whole(autojump_clock):
    # A fleet reconnecting after a restart: frozen at 100, then 20 more come
    # and no more. Without a freeze once it settles, those 20 would be walked
    # by every full collection for as long as they stay connected.
    freezer, fleet, fake = frozen_with(100)
    fleet.connect(20)
    freezer.check()  # still changing since the last look
    assert fake.take() == []
    freezer.check()  # the same 120 agents: settled, a sixth of them not frozen
    assert fake.take() == ["collect", "freeze"]
    freezer.check()
    assert fake.take() == []


async def test_a_few_agents_more_do_not_freeze_again(autojump_clock):
    freezer, fleet, fake = frozen_with(100)
    fleet.connect(5)  # under 5 % of the 105
    freezer.check()
    freezer.check()
    assert fake.take() == []
    fleet.connect(1)  # 6 of 106 unfrozen; one session more is still "settled"
    freezer.check()
    assert fake.take() == ["collect", "freeze"]


async def test_growth_after_a_settled_freeze_counts_from_it(autojump_clock):
    freezer, fleet, fake = frozen_with(100)
    fleet.connect(20)
    freezer.check()
    freezer.check()
    assert fake.take() == ["collect", "freeze"]  # settled at 120
    fleet.connect(29)  # 149: a quarter more than 100, not than 120
    freezer.check()
    assert fake.take() == []
    fleet.connect(1)
    freezer.check()
    assert fake.take() == ["collect", "freeze"]


async def test_a_reconnect_or_two_in_a_large_fleet_still_counts_as_settled(autojump_clock):
    freezer, fleet, fake = frozen_with(200)
    fleet.connect(20)
    freezer.check()
    fleet.reconnect(1)  # 2 of 220 sessions changed: under 1 %
    freezer.check()
    assert fake.take() == ["collect", "freeze"]


async def test_a_fleet_that_keeps_changing_is_not_frozen_again_until_it_grows(autojump_clock):
    freezer, fleet, fake = frozen_with(100)
    for _ in range(5):
        fleet.reconnect(10)  # same number of agents, never the same ones
        freezer.check()
        assert fake.take() == []


async def test_a_quarter_of_the_frozen_agents_leaving_costs_one_full_collection(autojump_clock):
    freezer, fleet, fake = frozen_with(200)
    await wait_out_the_minimum_gap()
    fleet.reconnect(49)  # under a quarter of the 200 frozen (their new sessions are not frozen)
    freezer.check()
    assert fake.take() == []
    fleet.leave(1)
    freezer.check()
    # One pause, not two: the collection after unfreezing serves the new freeze.
    assert fake.take() == ["unfreeze", "full", "freeze"]


async def test_agents_that_leave_are_counted_across_a_growth_freeze(autojump_clock):
    freezer, fleet, fake = frozen_with(100)
    await wait_out_the_minimum_gap()
    fleet.leave(20)
    fleet.connect(45)  # 125: frozen again, the 20 that left still frozen with them
    freezer.check()
    assert fake.take()[-2:] == ["collect", "freeze"]
    fleet.leave(16)  # 36 of the 145 agents frozen have left: not yet a quarter
    freezer.check()
    assert fake.take() == []
    fleet.leave(1)
    freezer.check()
    assert fake.take() == ["unfreeze", "full", "freeze"]


async def test_full_collections_are_a_minute_apart_at_least(autojump_clock):
    freezer, fleet, fake = frozen_with(100)
    fleet.reconnect(100)  # every frozen agent left at once
    freezer.check()
    assert fake.take() == []
    await wait_out_the_minimum_gap()
    freezer.check()
    assert fake.take() == ["unfreeze", "full", "freeze"]


async def test_a_freeze_an_hour_old_is_renewed(autojump_clock):
    freezer, fleet, fake = frozen_with(100)
    await trio.sleep(collector_module.MAX_FROZEN_SECONDS - 1)
    freezer.check()
    assert fake.take() == []
    await trio.sleep(1)
    freezer.check()
    assert fake.take() == ["unfreeze", "full", "freeze"]


async def test_below_the_threshold_again_the_heap_is_left_unfrozen(autojump_clock):
    freezer, fleet, fake = frozen_with(100)
    await wait_out_the_minimum_gap()
    fleet.leave(90)
    freezer.check()
    assert fake.take() == ["unfreeze", "full"] and not freezer.frozen


async def test_an_application_that_disabled_the_collector_is_left_alone(autojump_clock):
    freezer, fleet, fake = make()
    fake.enabled = False
    fleet.connect(1000)
    freezer.check()
    assert fake.take() == []


async def test_the_task_looks_every_few_seconds_and_unfreezes_when_cancelled(autojump_clock):
    freezer, fleet, fake = make()
    async with trio.open_nursery() as nursery:
        await nursery.start(freezer.run)
        fleet.connect(100)
        await trio.sleep(collector_module.CHECK_INTERVAL + 0.1)
        assert fake.take() == ["full", "freeze"]
        nursery.cancel_scope.cancel()
    assert fake.take() == ["unfreeze"] and not freezer.frozen


def test_a_threshold_below_one_is_refused():
    with pytest.raises(ValueError, match="min_agents"):
        HeapFreezer(list, min_agents=0)


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_with_the_real_collector_frozen_garbage_waits_for_the_unfreeze(autojump_clock):
    fleet = Fleet()
    freezer = HeapFreezer(lambda: fleet.links, min_agents=1)
    try:
        cycle = _Cycle()
        gone = weakref.ref(cycle)
        fleet.connect(1)
        freezer.check()  # the cycle is alive, so frozen
        del cycle
        gc.collect()
        assert gone() is not None  # garbage, but out of the collector's reach
        await wait_out_the_minimum_gap()
        fleet.leave(1)
        freezer.check()  # unfrozen and collected
        assert gone() is None
    finally:
        gc.unfreeze()


async def test_with_the_real_collector_a_session_seen_at_a_look_does_not_outlive_it(autojump_clock):
    # The freezer's last look must not keep an ended session's objects
    # alive through the collection that precedes a freeze, or they would be
    # frozen with the rest and kept until the next unfreeze.
    fleet = Fleet()
    freezer = HeapFreezer(lambda: fleet.links, min_agents=1)
    try:
        fleet.connect(8)
        freezer.check()  # frozen with these 8
        leaving = _Cycle()  # a session's state: reference cycles
        fleet.links.append(leaving)
        freezer.check()  # seen at this look; not frozen (9 is short of a quarter more)
        gone = weakref.ref(leaving)
        fleet.links.remove(leaving)
        del leaving
        fleet.connect(2)  # 10 agents: grown by a quarter, so collected and frozen again
        freezer.check()
        assert gone() is None
    finally:
        gc.unfreeze()
