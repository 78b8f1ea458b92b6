"""CommandManager on a virtual clock, with agent links fed by a recording session.

The session records what the manager sends instead of putting it on the
network; the agent's answers are fed back as frames. This isolates the
lifecycle, queue and deadline logic from QUIC (which the integration tests run
for real).
"""

from __future__ import annotations

import sqlite3

import pytest
import trio
import trio.testing

from trio_quiccmd import (
    CommandAlreadyFinished,
    CommandNotFound,
    CommandStatus,
    CommandManager,
    InvalidCommand,
    ManagerSettings,
    MemoryStore,
    ShuttingDown,
)
from trio_quiccmd.wire import CancelFrame, ResultFrame

from .recording import answer, connect_agent


async def test_result_resolves_the_promise(manager, autojump_clock):
    link, session = connect_agent(manager, "c1")
    command = await manager.send_command("c1", "echo", {"a": 1})
    assert command.status is CommandStatus.EXECUTING
    assert session.commands()[0].payload == {"a": 1}
    answer(link, session, command.command_id, result={"a": 1})
    done = await manager.wait(command.command_id, timeout=1)
    assert done.status is CommandStatus.COMPLETED and done.result == {"a": 1}


async def test_execution_deadline_is_enforced_without_waiters(manager, autojump_clock):
    link, session = connect_agent(manager, "c1")
    command = await manager.send_command("c1", "sleep", timeout=5)
    await trio.sleep(4.9)
    assert (await manager.get_command(command.command_id)).status is CommandStatus.EXECUTING
    await trio.sleep(0.2)
    timed_out = await manager.get_command(command.command_id)
    assert timed_out.status is CommandStatus.TIMEOUT
    assert timed_out.error_code == "execution_timeout"
    # The agent is told to stop (on the control stream), and its late result
    # changes nothing.
    assert session.streams[0][-1] == CancelFrame(
        command_id=command.command_id, reason="no result within 5 s"
    )
    link.frame_received(
        session,
        session.stream_of(command.command_id),
        ResultFrame(command_id=command.command_id, status="completed", result=1),
    )
    assert (await manager.get_command(command.command_id)).status is CommandStatus.TIMEOUT


async def test_waiter_patience_is_not_the_command_deadline(manager, autojump_clock):
    connect_agent(manager, "c1")
    start = trio.current_time()
    command = await manager.send_command("c1", "sleep", timeout=10)
    early = await manager.wait(command.command_id, timeout=1)
    assert early.status is CommandStatus.EXECUTING
    final = await manager.wait(command.command_id)
    assert final.status is CommandStatus.TIMEOUT
    assert trio.current_time() - start == pytest.approx(10, abs=0.01)


async def test_many_waiters_all_resolved_and_table_emptied(manager, autojump_clock):
    link, session = connect_agent(manager, "c1")
    command = await manager.send_command("c1", "echo")
    seen = []

    async def waiter():
        seen.append(await manager.wait(command.command_id))

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        answer(link, session, command.command_id, result="ok")
    assert len(seen) == 100 and {c.result for c in seen} == {"ok"}
    assert manager._waiters == {}


async def test_cancelled_waiter_leaves_nothing_behind(manager, autojump_clock):
    connect_agent(manager, "c1")
    command = await manager.send_command("c1", "echo")
    with trio.move_on_after(1):
        await manager.wait(command.command_id)
    assert manager._waiters == {}
    assert (await manager.get_command(command.command_id)).status is CommandStatus.EXECUTING


async def test_window_then_priority_then_age(manager, autojump_clock):
    link, session = connect_agent(manager, "c1")
    first = [await manager.send_command("c1", "echo", i) for i in range(4)]
    assert all(c.status is CommandStatus.EXECUTING for c in first)
    low = await manager.send_command("c1", "echo", "low", priority=0)
    high = await manager.send_command("c1", "echo", "high", priority=5)
    low2 = await manager.send_command("c1", "echo", "low2", priority=0)
    assert {low.status, high.status, low2.status} == {CommandStatus.PENDING}
    assert manager.queued_count("c1") == 3
    for command in first:
        answer(link, session, command.command_id)
    sent_order = [frame.payload for frame in session.commands()[4:]]
    assert sent_order == ["high", "low", "low2"]


async def test_every_send_is_a_checkpoint(manager, autojump_clock):
    # A loop sending to many agents must let the connections transmit (and
    # the results come in) as it goes, not hold the event loop until the
    # last command is made: whether the command went out, was queued or
    # failed at once.
    link, session = connect_agent(manager, "c1")
    for expected in [CommandStatus.EXECUTING] * 4 + [CommandStatus.PENDING]:
        with trio.testing.assert_checkpoints():
            command = await manager.send_command("c1", "sleep", timeout=100)
        assert command.status is expected
    with trio.testing.assert_checkpoints():
        offline = await manager.send_command("nobody", "echo")
    assert offline.error_code == "agent_offline"


async def test_pending_command_times_out_as_delivery_timeout(manager, autojump_clock):
    link, session = connect_agent(manager, "c1")
    for i in range(4):
        await manager.send_command("c1", "sleep", timeout=100)
    queued = await manager.send_command("c1", "echo", timeout=2)
    final = await manager.wait(queued.command_id)
    assert final.status is CommandStatus.TIMEOUT and final.error_code == "delivery_timeout"
    assert final.sent_at is None


async def test_cancel_pending_removes_it_from_the_queue(manager, autojump_clock):
    link, session = connect_agent(manager, "c1")
    busy = [await manager.send_command("c1", "sleep", timeout=100) for _ in range(4)]
    queued = await manager.send_command("c1", "echo")
    cancelled = await manager.cancel(queued.command_id)
    assert cancelled.status is CommandStatus.CANCELLED
    answer(link, session, busy[0].command_id)
    assert queued.command_id not in [f.command_id for f in session.commands()]
    with pytest.raises(CommandAlreadyFinished):
        await manager.cancel(queued.command_id)


async def test_offline_agent_and_connect_timeout(manager, autojump_clock):
    offline = await manager.send_command("c9", "echo")
    assert offline.status is CommandStatus.FAILED and offline.error_code == "agent_offline"
    waiting = await manager.send_command("c9", "echo", 7, connect_timeout=30)
    assert waiting.status is CommandStatus.PENDING
    await trio.sleep(20)
    link, session = connect_agent(manager, "c9")
    assert session.commands()[0].payload == 7
    answer(link, session, waiting.command_id, result=7)
    assert (await manager.get_command(waiting.command_id)).status is CommandStatus.COMPLETED


async def test_disconnect_keeps_executing_until_deadline(manager, autojump_clock):
    link, session = connect_agent(manager, "c1")
    command = await manager.send_command("c1", "sleep", timeout=10)
    link.connection_lost(session, 0, "gone")
    assert manager.registry.get("c1") is None
    assert (await manager.get_command(command.command_id)).status is CommandStatus.EXECUTING
    final = await manager.wait(command.command_id)
    assert final.status is CommandStatus.TIMEOUT and final.error_code == "execution_timeout"


async def test_failed_and_cancelled_results_keep_agent_codes(manager, autojump_clock):
    link, session = connect_agent(manager, "c1")
    failed = await manager.send_command("c1", "x")
    answer(link, session, failed.command_id, status="failed", error="nope", error_code="unknown_command_type")
    plain = await manager.send_command("c1", "x")
    answer(link, session, plain.command_id, status="failed", error="boom")
    failed = await manager.get_command(failed.command_id)
    plain = await manager.get_command(plain.command_id)
    assert (failed.status, failed.error_code) == (CommandStatus.FAILED, "unknown_command_type")
    assert (plain.error, plain.error_code) == ("boom", "executor_error")


async def test_history_is_trimmed_by_age_and_count(manager, autojump_clock):
    link, session = connect_agent(manager, "c1")
    old = await manager.send_command("c1", "echo")
    answer(link, session, old.command_id)
    for i in range(60):
        c = await manager.send_command("c1", "echo", i)
        answer(link, session, c.command_id)
    unfinished = await manager.send_command("c1", "sleep", timeout=1000)
    await trio.sleep(11)  # one cleanup pass: count limit
    page = await manager.list_commands(limit=1000)
    assert len([c for c in page.commands if c.is_terminal]) == 50
    with pytest.raises(CommandNotFound):
        await manager.get_command(old.command_id)
    # Age limit: everything finished is gone after the retention period; the
    # unfinished command is never purged.
    manager._wall = lambda: 10**10
    await trio.sleep(10)
    page = await manager.list_commands(limit=1000)
    assert [c.command_id for c in page.commands] == [unfinished.command_id]


async def test_list_filters_and_paginates_newest_first(manager, autojump_clock):
    link, session = connect_agent(manager, "c1")
    connect_agent(manager, "c2")
    ids = []
    for i in range(7):
        c = await manager.send_command("c1" if i % 2 == 0 else "c2", "echo" if i < 5 else "other", i)
        ids.append(c.command_id)
    answer(link, session, ids[0])
    page = await manager.list_commands(limit=3)
    assert [c.command_id for c in page.commands] == ids[::-1][:3]
    page2 = await manager.list_commands(limit=3, cursor=page.next_cursor)
    assert [c.command_id for c in page2.commands] == ids[::-1][3:6]
    page3 = await manager.list_commands(limit=3, cursor=page2.next_cursor)
    assert [c.command_id for c in page3.commands] == ids[:1] and page3.next_cursor is None
    by_client = await manager.list_commands(client_id="c2")
    assert [c.payload for c in by_client.commands] == [5, 3, 1]
    by_status = await manager.list_commands(status="completed")
    assert [c.command_id for c in by_status.commands] == [ids[0]]
    by_type = await manager.list_commands(command_type="other")
    assert [c.payload for c in by_type.commands] == [6, 5]
    with pytest.raises(InvalidCommand):
        await manager.list_commands(status="bogus")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(client_id="", command_type="echo"),
        dict(client_id="c1", command_type=""),
        dict(client_id="c1", command_type="echo", timeout=0),
        dict(client_id="c1", command_type="echo", timeout=-1),
        dict(client_id="c1", command_type="echo", timeout=float("nan")),
        dict(client_id="c1", command_type="echo", timeout=10**9),
        dict(client_id="c1", command_type="echo", timeout="5"),
        dict(client_id="c1", command_type="echo", connect_timeout=-1),
        dict(client_id="c1", command_type="echo", priority=1.5),
    ],
)
async def test_bad_arguments_are_refused_and_create_nothing(manager, kwargs, autojump_clock):
    client_id = kwargs.pop("client_id")
    command_type = kwargs.pop("command_type")
    with pytest.raises(InvalidCommand):
        await manager.send_command(client_id, command_type, **kwargs)
    assert (await manager.list_commands()).commands == []


async def test_unknown_id_is_not_found(manager, autojump_clock):
    with pytest.raises(CommandNotFound):
        await manager.get_command("nope")
    with pytest.raises(CommandNotFound):
        await manager.wait("nope")
    with pytest.raises(CommandNotFound):
        await manager.cancel("nope")


async def test_shutdown_refuses_new_and_drains(manager, autojump_clock):
    link, session = connect_agent(manager, "c1")
    running = await manager.send_command("c1", "sleep", timeout=100)
    stuck = await manager.send_command("c1", "sleep", timeout=100)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.drain, 5.0)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(ShuttingDown):
            await manager.send_command("c1", "echo")
        answer(link, session, running.command_id, result="done")
    assert (await manager.get_command(running.command_id)).status is CommandStatus.COMPLETED
    left = await manager.get_command(stuck.command_id)
    assert (left.status, left.error_code) == (CommandStatus.FAILED, "server_shutdown")
    assert trio.current_time() - start == pytest.approx(5.0, abs=0.01)


async def test_a_drain_ends_once_no_connected_agent_can_finish_anything(manager, autojump_clock):
    # Queued for an agent that is not connected, executing on one that left:
    # neither can finish while the server shuts down, so the drain does not
    # wait the grace period out for them (it did, for every restart).
    link, session = connect_agent(manager, "c1")
    left_behind = await manager.send_command("c1", "sleep", timeout=100)
    link.connection_lost(session, 0, "gone")
    offline = await manager.send_command("c9", "echo", timeout=100, connect_timeout=100)
    start = trio.current_time()
    assert await manager.drain(60.0) == 2
    assert trio.current_time() - start < 1
    for command in (left_behind, offline):
        final = await manager.get_command(command.command_id)
        assert (final.status, final.error_code) == (CommandStatus.FAILED, "server_shutdown")


def _deep(levels: int):
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    "payload",
    [object(), {"x": float("nan")}, {"x": float("inf")}, _deep(5000), {1j: 2}, ["\ud800"], {"\udfff": 1}],
    ids=["object", "nan", "inf", "deep", "complex-key", "lone-surrogate", "lone-surrogate-key"],
)
async def test_payload_that_is_not_json_is_refused(manager, payload, autojump_clock):
    connect_agent(manager, "c1")
    with pytest.raises(InvalidCommand, match="payload"):
        await manager.send_command("c1", "echo", payload)
    assert (await manager.list_commands()).commands == []


async def test_payload_too_large_for_a_frame_is_refused(manager, autojump_clock):
    from trio_quiccmd.errors import PayloadTooLarge

    link, session = connect_agent(manager, "c1")
    with pytest.raises(PayloadTooLarge):
        await manager.send_command("c1", "echo", "x" * (1 << 20))
    fits = await manager.send_command("c1", "echo", "x" * ((1 << 20) - 1000))
    assert fits.status is CommandStatus.EXECUTING
    assert len(session.commands()) == 1


async def test_a_timed_out_or_cancelled_command_frees_its_slot_for_the_queue(manager, autojump_clock):
    link, session = connect_agent(manager, "c1")
    slow = [await manager.send_command("c1", "sleep", timeout=5) for _ in range(3)]
    stuck = await manager.send_command("c1", "sleep", timeout=100)
    queued = [await manager.send_command("c1", "echo", i, timeout=100) for i in range(4)]
    assert all(c.status is CommandStatus.PENDING for c in queued)
    await manager.cancel(stuck.command_id)
    assert (await manager.get_command(queued[0].command_id)).status is CommandStatus.EXECUTING
    await trio.sleep(5.1)  # the three slow ones time out
    statuses = [(await manager.get_command(c.command_id)).status for c in queued]
    assert statuses == [CommandStatus.EXECUTING] * 4
    assert manager.queued_count("c1") == 0
    assert {(await manager.get_command(c.command_id)).status for c in slow} == {CommandStatus.TIMEOUT}


async def test_send_and_wait_returns_the_final_command_or_its_state_when_the_wait_runs_out(
    manager, autojump_clock
):
    link, session = connect_agent(manager, "c1")

    async def answer_soon():
        await trio.sleep(1)
        answer(link, session, session.commands()[0].command_id, result="done")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_soon)
        final = await manager.send_and_wait("c1", "echo", timeout=10)
    assert (final.status, final.result) == (CommandStatus.COMPLETED, "done")
    assert manager.waiter_count(final.command_id) == 0

    started = trio.current_time()
    still = await manager.send_and_wait("c1", "sleep", timeout=10, wait_timeout=2)
    assert still.status is CommandStatus.EXECUTING
    assert trio.current_time() - started == pytest.approx(2)
    assert manager.waiter_count(still.command_id) == 0


async def test_an_agent_stopping_a_command_at_its_deadline_is_a_timeout_not_a_cancel(
    manager, autojump_clock
):
    # On a busy server the agent's report can be handled before our own
    # deadline task runs; the outcome must not depend on which comes first.
    link, session = connect_agent(manager, "c1")
    command = await manager.send_command("c1", "sleep", timeout=1)
    answer(
        link, session, command.command_id, status="cancelled",
        error="deadline passed", error_code="execution_timeout",
    )
    final = await manager.get_command(command.command_id)
    assert (final.status, final.error_code) == (CommandStatus.TIMEOUT, "execution_timeout")


async def test_a_failing_history_trim_is_logged_and_retried_not_fatal(autojump_clock, caplog):
    class FlakyStore(MemoryStore):
        failures = 2

        async def purge(self, **limits):
            if self.failures:
                self.failures -= 1
                raise sqlite3.OperationalError("database is locked")
            return await super().purge(**limits)

    store = FlakyStore()
    manager = CommandManager(store, ManagerSettings(cleanup_interval=1, max_history=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await trio.sleep(3.5)  # three trims: two fail, the third works
        assert store.failures == 0
        nursery.cancel_scope.cancel()
    assert [r.getMessage() for r in caplog.records if "trim failed" in r.getMessage()] == [
        "Command history trim failed error='database is locked'"
    ] * 2


async def test_the_history_is_first_trimmed_soon_after_start(autojump_clock):
    # Found in review: the first trim came a whole cleanup_interval after
    # start, so a server restarted more often than that never trimmed.
    class WatchedStore(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.trimmed = trio.Event()

        async def purge(self, **limits):
            deleted = await super().purge(**limits)
            self.trimmed.set()
            return deleted

    store = WatchedStore()
    settings = ManagerSettings(max_history=1, cleanup_interval=3600)
    for _ in range(3):  # an earlier run's history: failed at once, agent offline
        await CommandManager(store, settings).send_command("offline", "echo")
    manager = CommandManager(store, settings)
    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        await nursery.start(manager.run)
        await store.trimmed.wait()
        assert trio.current_time() - started <= 5
        assert len(store) == 1
        nursery.cancel_scope.cancel()
