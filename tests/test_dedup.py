"""The agent's memory of finished commands (at most once) and its outbox of
results waiting for a connection (no lost results): bounds, expiry, and the
handler answering a command delivered again without running it."""

from __future__ import annotations

import logging

import trio
import trio.testing

from trio_quiccmd.agent.dedup import (
    RESULT_UNAVAILABLE,
    RecentCommands,
    ResultOutbox,
    result_size,
)
from trio_quiccmd.agent.handler import CommandHandler
from trio_quiccmd.wire import CommandFrame, ResultFrame, encode_frame


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def done(command_id: str, result="ok") -> ResultFrame:
    return ResultFrame(command_id=command_id, status="completed", result=result)


# -- RecentCommands ------------------------------------------------------------


def test_recent_remembers_results_for_max_of_timeout_and_the_minimum():
    clock = FakeClock()
    recent = RecentCommands(remember_for=600, clock=clock)
    recent.remember(done("short"), timeout=30)
    recent.remember(done("long"), timeout=3600)
    assert recent.get("short") == done("short") and "long" in recent
    clock.now += 599.9
    assert "short" in recent
    clock.now += 0.2
    assert recent.get("short") is None and "short" not in recent
    assert "long" in recent
    clock.now += 3000
    assert "long" not in recent
    assert len(recent) == 0 and recent.result_bytes == 0


def test_recent_unknown_id_is_none():
    assert RecentCommands(clock=FakeClock()).get("nope") is None


def test_recent_is_bounded_by_count_oldest_first(caplog):
    clock = FakeClock()
    recent = RecentCommands(max_entries=3, clock=clock)
    with caplog.at_level(logging.WARNING, logger="trio_quiccmd.agent"):
        for i in range(5):
            recent.remember(done(f"c{i}"), timeout=10)
            clock.now += 1
    assert len(recent) == 3
    assert [("c0" in recent), ("c1" in recent)] == [False, False]
    assert all(f"c{i}" in recent for i in (2, 3, 4))
    assert recent.evicted_early == 2
    # One warning per minute, not one per eviction.
    assert len([r for r in caplog.records if "Forgot a finished command" in r.message]) == 1


def test_recent_forgetting_a_command_past_its_timeout_is_no_warning(caplog):
    clock = FakeClock()
    recent = RecentCommands(max_entries=2, clock=clock)
    with caplog.at_level(logging.WARNING, logger="trio_quiccmd.agent"):
        recent.remember(done("a"), timeout=5)
        clock.now += 6  # "a" can no longer be re-sent, though still remembered
        recent.remember(done("b"), timeout=5)
        recent.remember(done("c"), timeout=5)
    assert "a" not in recent and "b" in recent
    assert recent.evicted_early == 0 and caplog.records == []


def test_a_long_command_is_not_forgotten_for_space_while_expired_ones_are_kept(caplog):
    # One command with an hour's timeout, then a steady three short commands a
    # second: only ~1,800 ids are unexpired at any time, far under the cap,
    # yet the expired ones queued behind the long one filled it, and the long
    # one was forgotten after 3,333 s, before its deadline; re-sent, it would
    # have run twice (and the warning claimed >10,000 were within timeouts).
    clock = FakeClock()
    start = clock.now
    recent = RecentCommands(clock=clock)
    with caplog.at_level(logging.WARNING, logger="trio_quiccmd.agent"):
        recent.remember(done("backup"), timeout=3600)
        n = 0
        while clock.now < start + 3599:
            clock.now += 1
            for _ in range(3):
                recent.remember(done(f"short-{n}"), timeout=30)
                n += 1
            assert "backup" in recent, f"forgotten at t={clock.now - start:g}s"
    assert recent.evicted_early == 0
    assert not [r for r in caplog.records if "Forgot a finished command" in r.message]
    assert len(recent) <= 1 + 3 * 600


def test_recent_over_its_bound_forgets_the_nearest_deadline_first(caplog):
    clock = FakeClock()
    recent = RecentCommands(max_entries=2, clock=clock)
    with caplog.at_level(logging.WARNING, logger="trio_quiccmd.agent"):
        recent.remember(done("long"), timeout=3600)
        recent.remember(done("short"), timeout=10)
        recent.remember(done("middle"), timeout=60)
    assert "long" in recent and "middle" in recent and "short" not in recent
    assert recent.evicted_early == 1
    (warning,) = [r.message for r in caplog.records if "Forgot a finished command" in r.message]
    assert "command_id=short" in warning


def test_recent_expired_entries_are_pruned_without_counting_as_early():
    clock = FakeClock()
    recent = RecentCommands(max_entries=2, remember_for=10, clock=clock)
    recent.remember(done("a"))
    recent.remember(done("b"))
    clock.now += 11
    recent.remember(done("c"))
    assert len(recent) == 1 and recent.evicted_early == 0


def test_recent_drops_results_beyond_the_byte_bound_but_keeps_the_ids():
    clock = FakeClock()
    big = "x" * 1000
    size = result_size(done("c0", big))
    recent = RecentCommands(max_result_bytes=3 * size, clock=clock)
    for i in range(5):
        recent.remember(done(f"c{i}", big))
    assert recent.result_bytes <= 3 * size
    assert len(recent) == 5
    for i in (0, 1):
        answer = recent.get(f"c{i}")
        assert answer is not None and answer.status == "failed"
        assert answer.error_code == RESULT_UNAVAILABLE and answer.command_id == f"c{i}"
    assert recent.get("c4") == done("c4", big)


def test_recent_remembering_an_id_again_replaces_it():
    clock = FakeClock()
    recent = RecentCommands(clock=clock)
    recent.remember(done("a", "x" * 100))
    recent.remember(done("a", "y"))
    assert recent.get("a") == done("a", "y")
    assert len(recent) == 1 and recent.result_bytes == result_size(done("a", "y"))


def test_result_size_is_the_encoded_size_for_values():
    frame = done("a", {"k": [1, 2, 3]})
    assert result_size(frame) == len(encode_frame(frame))
    failed = ResultFrame(command_id="a", status="failed", error="boom", error_code="x")
    assert result_size(failed) >= len(encode_frame(failed)) - 64


# -- ResultOutbox --------------------------------------------------------------


def test_outbox_holds_until_removed_oldest_first():
    clock = FakeClock()
    outbox = ResultOutbox(clock=clock)
    outbox.add(done("a"), expires_at=200)
    outbox.add(done("b"), expires_at=200)
    assert outbox.ids() == ["a", "b"] and "a" in outbox
    assert outbox.results() == [done("a"), done("b")]
    assert outbox.remove("a") and not outbox.remove("a")
    assert outbox.ids() == ["b"]
    outbox.remove("b")
    assert len(outbox) == 0 and outbox.held_bytes == 0


def test_outbox_drops_the_oldest_beyond_its_bound_and_says_so(caplog):
    outbox = ResultOutbox(max_results=2, clock=FakeClock())
    with caplog.at_level(logging.WARNING, logger="trio_quiccmd.agent"):
        for i in range(4):
            outbox.add(done(f"c{i}"), expires_at=1000)
    assert outbox.ids() == ["c2", "c3"]
    assert outbox.dropped == 2
    dropped = [r.message for r in caplog.records if "Held result dropped" in r.message]
    assert len(dropped) == 2 and "command_id=c0" in dropped[0]


def test_outbox_is_bounded_by_bytes_but_keeps_the_newest():
    big = "x" * 1000
    size = result_size(done("c0", big))
    outbox = ResultOutbox(max_bytes=2 * size, clock=FakeClock())
    for i in range(3):
        outbox.add(done(f"c{i}", big), expires_at=1000)
    assert outbox.ids() == ["c1", "c2"] and outbox.held_bytes == 2 * size
    huge = ResultOutbox(max_bytes=10, clock=FakeClock())
    huge.add(done("h", big), expires_at=1000)
    assert huge.ids() == ["h"]  # one result over the bound is still held


def test_outbox_forgets_results_whose_deadline_passed():
    clock = FakeClock()
    outbox = ResultOutbox(clock=clock)
    outbox.add(done("soon"), expires_at=clock.now + 5)
    outbox.add(done("later"), expires_at=clock.now + 50)
    clock.now += 5
    assert outbox.ids() == ["later"] and outbox.expired == 1
    clock.now += 100
    assert outbox.results() == [] and outbox.held_bytes == 0


def test_outbox_adding_an_id_again_replaces_it():
    outbox = ResultOutbox(clock=FakeClock())
    outbox.add(done("a", 1), expires_at=1000)
    outbox.add(done("b", 2), expires_at=1000)
    outbox.add(done("a", 3), expires_at=1000)
    assert outbox.results() == [done("b", 2), done("a", 3)]


async def test_outbox_uses_trios_clock_by_default(autojump_clock):
    outbox = ResultOutbox()
    outbox.add(done("a"), expires_at=trio.current_time() + 30)
    await trio.sleep(29)
    assert outbox.ids() == ["a"]
    await trio.sleep(2)
    assert outbox.ids() == []


# -- CommandHandler: at most once ------------------------------------------------


class Counting:
    def __init__(self, seconds: float = 0.0):
        self.runs = 0
        self.seconds = seconds

    async def execute(self, command_type, payload):
        self.runs += 1
        if self.seconds:
            await trio.sleep(self.seconds)
        return {"run": self.runs, "payload": payload}


async def test_a_finished_command_delivered_again_is_answered_without_running(autojump_clock):
    executor = Counting()
    handler = CommandHandler(executor)
    command = CommandFrame(command_id="c", command_type="x", payload=7, timeout=5)
    first = await handler.handle(command)
    again = await handler.handle(command)
    assert first == again == ResultFrame(
        command_id="c", status="completed", result={"run": 1, "payload": 7}
    )
    assert executor.runs == 1


async def test_the_memory_lasts_max_of_timeout_and_ten_minutes(autojump_clock):
    executor = Counting()
    handler = CommandHandler(executor)
    short = CommandFrame(command_id="s", command_type="x", timeout=5)
    long = CommandFrame(command_id="l", command_type="x", timeout=3600)
    await handler.handle(short)
    await handler.handle(long)
    await trio.sleep(599)
    await handler.handle(short)
    assert executor.runs == 2
    await trio.sleep(2)  # 10 min passed: "s" is forgotten, "l" is not
    await handler.handle(short)
    await handler.handle(long)
    assert executor.runs == 3
    await trio.sleep(3600)
    await handler.handle(long)
    assert executor.runs == 4


async def test_failed_and_cancelled_outcomes_are_remembered_too(autojump_clock):
    class Failing:
        runs = 0

        async def execute(self, command_type, payload):
            Failing.runs += 1
            if command_type == "boom":
                raise RuntimeError("boom")
            await trio.sleep(100)

    handler = CommandHandler(Failing())
    boom = CommandFrame(command_id="b", command_type="boom", timeout=5)
    slow = CommandFrame(command_id="s", command_type="slow", timeout=1)
    assert (await handler.handle(boom)).status == "failed"
    assert (await handler.handle(slow)).error_code == "execution_timeout"
    assert (await handler.handle(boom)).status == "failed"
    assert (await handler.handle(slow)).error_code == "execution_timeout"
    assert Failing.runs == 2


async def test_a_duplicate_attaches_to_the_running_execution_then_to_its_memory(autojump_clock):
    executor = Counting(seconds=1)
    handler = CommandHandler(executor)
    command = CommandFrame(command_id="c", command_type="x", timeout=5)
    results = []

    async def deliver():
        results.append(await handler.handle(command))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliver)
        await trio.testing.wait_all_tasks_blocked()
        assert handler.is_running("c")
        nursery.start_soon(deliver)
    results.append(await handler.handle(command))
    assert executor.runs == 1 and len(set(map(repr, results))) == 1
    assert handler.running == 0


async def test_an_execution_abandoned_by_shutdown_is_not_remembered_or_rerun(autojump_clock):
    executor = Counting(seconds=10)
    handler = CommandHandler(executor)
    command = CommandFrame(command_id="c", command_type="x", timeout=60)
    attached: list[ResultFrame] = []
    async with trio.open_nursery() as outer:
        with trio.CancelScope() as first:
            async def attach():
                attached.append(await handler.handle(command))

            async with trio.open_nursery() as inner:
                inner.start_soon(handler.handle, command)
                await trio.testing.wait_all_tasks_blocked()
                outer.start_soon(attach)
                await trio.testing.wait_all_tasks_blocked()
                first.cancel()
    assert executor.runs == 1
    assert attached[0].status == "failed" and attached[0].error_code == "agent_error"
    assert handler.recent.get("c") is None


async def test_remembered_commands_are_bounded(autojump_clock):
    count = 3
    executor = Counting()
    handler = CommandHandler(executor, recent=RecentCommands(max_entries=count))
    for i in range(count + 1):
        await handler.handle(CommandFrame(command_id=f"c{i}", command_type="x", timeout=5))
    assert len(handler.recent) == count
    await handler.handle(CommandFrame(command_id="c0", command_type="x", timeout=5))
    assert executor.runs == count + 2  # c0 was forgotten for space: it ran again


async def test_a_cancel_that_overtakes_its_command_stops_it_from_running(autojump_clock):
    # CANCEL can arrive in the same datagram as its COMMAND, before the
    # execution task has started: the command must not run afterwards.
    from trio_quiccmd import ExecutorRegistry
    from trio_quiccmd.agent.handler import CommandHandler
    from trio_quiccmd.wire import CommandFrame

    ran = []
    registry = ExecutorRegistry()

    @registry.register("work")
    async def work(payload):
        ran.append(payload)
        return "done"

    handler = CommandHandler(registry)
    assert handler.cancel("c-1") is False  # not running yet
    early = await handler.handle(CommandFrame(command_id="c-1", command_type="work", payload=1, timeout=5))
    assert (early.status, early.error_code) == ("cancelled", "cancelled")
    assert ran == []
    # Another command is unaffected, and a cancel for a finished one is moot.
    done = await handler.handle(CommandFrame(command_id="c-2", command_type="work", payload=2, timeout=5))
    assert done.status == "completed" and ran == [2]
    handler.cancel("c-2")
    again = await handler.handle(CommandFrame(command_id="c-2", command_type="work", payload=2, timeout=5))
    assert again.status == "completed" and ran == [2]
