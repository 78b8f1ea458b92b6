"""HeapFreezer: when the heap is frozen, collected and unfrozen (sans-IO, virtual clock)."""

from __future__ import annotations

import gc

import pytest
import trio

from trio_quiccmd.server import collector as collector_module
from trio_quiccmd.server.collector import HeapFreezer


class FakeCollector:
    """Records what the freezer asks of the garbage collector."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.frozen = False

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

    def get_freeze_count(self) -> int:
        return 0

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


class Agents:
    def __init__(self) -> None:
        self.connected = 0
        self.ended = 0


def make(min_agents: int = 100) -> tuple[HeapFreezer, Agents, FakeCollector]:
    agents, fake = Agents(), FakeCollector()
    freezer = HeapFreezer(lambda: agents.connected, lambda: agents.ended, min_agents=min_agents, collector=fake)
    return freezer, agents, fake


async def test_nothing_is_frozen_below_the_threshold(autojump_clock):
    freezer, agents, fake = make()
    agents.connected = 99
    freezer.check()
    assert fake.take() == [] and not freezer.frozen


async def test_at_the_threshold_one_full_collection_then_a_freeze(autojump_clock):
    freezer, agents, fake = make()
    agents.connected = 100
    freezer.check()
    assert fake.take() == ["full", "freeze"] and freezer.frozen
    freezer.check()  # nothing changed: nothing to do
    assert fake.take() == []


async def test_growth_freezes_again_after_a_short_collection(autojump_clock):
    freezer, agents, fake = make()
    agents.connected = 100
    freezer.check()
    fake.take()
    agents.connected = 124  # less than a quarter more
    freezer.check()
    assert fake.take() == []
    agents.connected = 125
    freezer.check()
    # Never unfrozen: the collection walks only what is not frozen.
    assert fake.take() == ["collect", "freeze"]


async def test_sessions_ended_since_the_freeze_are_reclaimed_with_one_full_collection(autojump_clock):
    freezer, agents, fake = make()
    agents.connected, agents.ended = 200, 50  # ended before the freeze: its collection takes them
    freezer.check()
    fake.take()
    agents.ended += 9  # under 5 % of the 200 frozen
    freezer.check()
    assert fake.take() == []
    agents.ended += 1
    agents.connected = 190
    freezer.check()
    # One pause, not two: the collection after unfreezing serves the new freeze.
    assert fake.take() == ["unfreeze", "full", "freeze"]
    agents.ended += 9
    freezer.check()
    assert fake.take() == []  # counted from that collection


async def test_a_freeze_an_hour_old_is_renewed(autojump_clock):
    freezer, agents, fake = make()
    agents.connected = 100
    freezer.check()
    fake.take()
    await trio.sleep(collector_module.MAX_FROZEN_SECONDS - 1)
    freezer.check()
    assert fake.take() == []
    await trio.sleep(1)
    freezer.check()
    assert fake.take() == ["unfreeze", "full", "freeze"]


async def test_below_the_threshold_again_the_heap_is_left_unfrozen(autojump_clock):
    freezer, agents, fake = make()
    agents.connected = 100
    freezer.check()
    fake.take()
    agents.connected, agents.ended = 10, 90
    freezer.check()
    assert fake.take() == ["unfreeze", "full"] and not freezer.frozen


async def test_the_task_looks_every_few_seconds(autojump_clock):
    freezer, agents, fake = make()
    async with trio.open_nursery() as nursery:
        await nursery.start(freezer.run)
        agents.connected = 100
        await trio.sleep(collector_module.CHECK_INTERVAL + 0.1)
        assert fake.take() == ["full", "freeze"]
        nursery.cancel_scope.cancel()


def test_a_threshold_below_one_is_refused():
    with pytest.raises(ValueError, match="min_agents"):
        HeapFreezer(lambda: 0, lambda: 0, min_agents=0)


async def test_the_real_collector_freezes_and_unfreezes(autojump_clock):
    # The gc module is what the stand-in stands for: objects alive at the
    # freeze are out of the collector's reach until the unfreeze.
    agents = Agents()
    freezer = HeapFreezer(lambda: agents.connected, lambda: agents.ended, min_agents=1)
    try:
        agents.connected = 1
        freezer.check()
        assert gc.get_freeze_count() > 0
        agents.connected, agents.ended = 0, 1
        freezer.check()
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
