"""A server restart loses nothing (issue 6): the manager over a real SQLite
store, stopped and started again, with recording agent sessions.

Real clock (the store's commits run in threads, which a virtual clock would
jump over), short waits bounded by ``fail_after``; "the server was down for
an hour" is an injected wall clock.
"""

from __future__ import annotations

import threading
import time
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import AsyncIterator, Callable

import attrs
import pytest
import trio
import trio.testing

from trio_quiccmd import CommandManager, CommandStatus, InvalidCommand, ManagerSettings
from trio_quiccmd.errors import StoreUnavailable
from trio_quiccmd.model import ErrorCode
from trio_quiccmd.server.manager import NEVER_SENT
from trio_quiccmd.server.policy import AllowRule, CommandPolicy
from trio_quiccmd.server.store import CommandQuery
from trio_quiccmd.server.store import sqlite as sqlite_store
from trio_quiccmd.server.store.sqlite import SqliteStore, open_sqlite_store
from trio_quiccmd.wire import CancelFrame, Hello

from .conftest import wait_until
from .httpclient import samples
from .test_http_api import running_server
from .test_redelivery import AckingSession, answer, answer_on, connect, sent_ids


@asynccontextmanager
async def server_run(
    path: Path,
    *,
    wall_clock: Callable[[], float] = time.time,
    policy: CommandPolicy | None = None,
    **settings: float,
) -> AsyncIterator[CommandManager]:
    """One run of the server's command side: store opened, manager running, recovered."""
    async with open_sqlite_store(path) as store:
        manager = CommandManager(store, ManagerSettings(**settings), wall_clock=wall_clock, policy=policy)
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            await manager.recover()
            yield manager
            nursery.cancel_scope.cancel()


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "commands.db"


async def test_pending_and_executing_commands_are_taken_up_after_a_restart(db):
    with trio.fail_after(10):
        async with server_run(db) as manager:
            link, session = connect(manager, "c1", instance="i1")
            done = await manager.send_command("c1", "echo", "done", timeout=30)
            answer(link, session, done.command_id, "done")
            running = await manager.send_command("c1", "sleep", 1, timeout=30)
            queued = await manager.send_command("c2", "echo", "q", timeout=30, connect_timeout=60)
            assert queued.status is CommandStatus.PENDING
            assert await manager.drain(0) == 2
            # Nothing was failed, and the agent was not told to cancel anything.
            assert (await manager.get_command(running.command_id)).status is CommandStatus.EXECUTING
            sent = [frame for frames in session.streams.values() for frame in frames]
            assert not any(isinstance(frame, CancelFrame) for frame in sent)

        async with server_run(db) as manager:
            assert manager.unfinished_count == 2
            assert manager.queued_count("c2") == 1
            # The agent instance that had it reconnects without its result: re-sent.
            link, session = connect(manager, "c1", instance="i1")
            assert sent_ids(session) == [running.command_id]
            assert session.commands()[0].timeout == pytest.approx(30, abs=2)
            answer(link, session, running.command_id, "slept")
            # The offline agent connects: its queued command goes out, once
            # stored as executing on this agent process.
            link2, session2 = connect(manager, "c2", instance="j1")
            await wait_all_stored(manager)
            assert sent_ids(session2) == [queued.command_id]
            answer(link2, session2, queued.command_id, "q")
            final = {
                c.command_id: (c.status, c.result)
                for c in (await manager.list_commands(limit=10)).commands
            }
            assert final == {
                done.command_id: (CommandStatus.COMPLETED, "done"),
                running.command_id: (CommandStatus.COMPLETED, "slept"),
                queued.command_id: (CommandStatus.COMPLETED, "q"),
            }
            assert manager.unfinished_count == 0


async def test_a_result_the_agent_held_through_the_restart_is_taken(db):
    with trio.fail_after(10):
        async with server_run(db) as manager:
            connect(manager, "c1", instance="i1")
            command = await manager.send_command("c1", "echo", timeout=30)
            await manager.drain(0)

        async with server_run(db) as manager:
            link, session = connect(manager, "c1", instance="i1", held=[command.command_id])
            assert sent_ids(session) == []  # it has the result: nothing to re-send
            answer_on(link, session, 4, command.command_id, "held")
            assert session.ended == [4]
            final = await manager.wait(command.command_id, 5)
            assert (final.status, final.result) == (CommandStatus.COMPLETED, "held")


async def test_deadlines_that_passed_while_the_server_was_down_end_in_timeout(db):
    with trio.fail_after(10):
        async with server_run(db) as manager:
            connect(manager, "c1", instance="i1")
            running = await manager.send_command("c1", "sleep", timeout=30)
            queued = await manager.send_command("c2", "echo", timeout=30, connect_timeout=60)
            fresh = await manager.send_command("c2", "echo", timeout=30, connect_timeout=7200)
            await manager.drain(0)

        an_hour_later = lambda: time.time() + 3600  # noqa: E731
        async with server_run(db, wall_clock=an_hour_later) as manager:
            timed_out = {
                c.command_id: c.error_code
                for c in (await manager.list_commands(status="timeout")).commands
            }
            assert timed_out == {
                running.command_id: ErrorCode.EXECUTION_TIMEOUT.value,
                queued.command_id: ErrorCode.DELIVERY_TIMEOUT.value,
            }
            assert (await manager.get_command(fresh.command_id)).status is CommandStatus.PENDING
            assert manager.unfinished_count == 1 and manager.queued_count("c2") == 1


async def test_commands_that_end_at_recovery_are_counted_in_the_metrics(tmp_path):
    # Found in review: the server recovered before its metrics observed the
    # manager, so what timed out while it was down was never counted.
    an_hour_ago = lambda: time.time() - 3600  # noqa: E731
    with trio.fail_after(20):
        async with server_run(tmp_path / "data" / "commands.db", wall_clock=an_hour_ago) as manager:
            await manager.send_command("c1", "echo", connect_timeout=60)
            await manager.drain(0)
        async with running_server(tmp_path) as server:  # the same data dir and store
            values = samples((await server.request("GET", "/metrics")).body.decode())
    assert values["command_timeout_total"] == 1


async def test_a_recovered_command_still_ends_at_its_deadline(db):
    with trio.fail_after(10):
        async with server_run(db) as manager:
            connect(manager, "c1", instance="i1")
            command = await manager.send_command("c1", "sleep", timeout=1.5)
            await trio.sleep(0.5)  # half a second of its time passes before the restart
            await manager.drain(0)

        async with server_run(db) as manager:
            started = trio.current_time()
            final = await manager.wait(command.command_id)
            assert final.status is CommandStatus.TIMEOUT
            assert final.error_code == ErrorCode.EXECUTION_TIMEOUT.value
            # Its deadline was kept, 1.5 s from the first send (about 1 s from
            # here), not restarted (1.5 s from here).
            assert trio.current_time() - started < 1.25


async def test_a_durable_drain_answers_long_polls_with_the_current_state(db):
    with trio.fail_after(10):
        async with server_run(db) as manager:
            link, session = connect(manager, "c1", instance="i1")
            command = await manager.send_command("c1", "sleep", timeout=30)
            answers = []

            async def long_poll():
                answers.append(await manager.wait(command.command_id))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_poll)
                await trio.testing.wait_all_tasks_blocked()
                assert await manager.drain(0.05) == 1
            assert [a.status for a in answers] == [CommandStatus.EXECUTING]


async def test_a_durable_drain_gives_executing_commands_the_grace_to_finish(db):
    with trio.fail_after(10):
        async with server_run(db) as manager:
            link, session = connect(manager, "c1", instance="i1")
            command = await manager.send_command("c1", "sleep", timeout=30)
            queued = await manager.send_command("c2", "echo", timeout=30, connect_timeout=60)
            async with trio.open_nursery() as nursery:

                async def drain():
                    assert await manager.drain(30) == 1  # only the queued one is left

                nursery.start_soon(drain)
                await trio.testing.wait_all_tasks_blocked()
                answer(link, session, command.command_id, "in time")

        async with server_run(db) as manager:
            final = await manager.get_command(command.command_id)
            assert (final.status, final.result) == (CommandStatus.COMPLETED, "in time")
            assert (await manager.get_command(queued.command_id)).status is CommandStatus.PENDING


async def test_a_durable_drain_does_not_wait_for_commands_whose_agent_is_gone(db):
    # Found in review: a command executing on an agent that had left (and a
    # shutting-down server takes no new connections) held every drain for
    # the whole grace period, so each restart of a real fleet took it.
    with trio.fail_after(10):
        async with server_run(db) as manager:
            gone_link, gone_session = connect(manager, "gone", instance="i1")
            orphan = await manager.send_command("gone", "sleep", timeout=3000)
            gone_link.connection_lost(gone_session, 0, "network lost")
            link, session = connect(manager, "c1", instance="i1")
            running = await manager.send_command("c1", "sleep", timeout=3000)
            async with trio.open_nursery() as nursery:

                async def drain():
                    assert await manager.drain(600) == 1  # the orphan, still executing
                    nursery.cancel_scope.cancel()

                nursery.start_soon(drain)
                await trio.testing.wait_all_tasks_blocked()
                answer(link, session, running.command_id, "done")  # the last one that could finish
                await trio.sleep_forever()
            # Waits after the drain return the command as it is, at once.
            assert (await manager.wait(orphan.command_id)).status is CommandStatus.EXECUTING
        async with server_run(db) as manager:
            assert (await manager.get_command(running.command_id)).result == "done"
            assert (await manager.get_command(orphan.command_id)).status is CommandStatus.EXECUTING


async def test_a_drain_stops_waiting_for_a_command_that_can_no_longer_go_out(db, monkeypatch):
    # Staged to go out as the drain began, it found the agent's stream limit
    # reached once stored: it will not be sent (the drain stopped sending),
    # so nothing is left that can finish.
    with trio.fail_after(10):
        async with server_run(db) as manager:
            link, session = connect(manager, "c1", instance="i1")
            async with trio.open_nursery() as nursery:
                async with held_commits(monkeypatch) as held:
                    nursery.start_soon(manager.send_command, "c1", "sleep", None)
                    await wait_until(lambda: held.rows)
                    session.can_open_stream = False
                    drained = trio.Event()

                    async def drain():
                        assert await manager.drain(600) == 1
                        drained.set()

                    nursery.start_soon(drain)
                    await trio.testing.wait_all_tasks_blocked()
                    held.release.set()
                    with trio.fail_after(5):
                        await drained.wait()
            assert sent_ids(session) == []


async def test_history_is_queryable_after_a_restart(db):
    with trio.fail_after(10):
        async with server_run(db) as manager:
            link, session = connect(manager, "c1", instance="i1")
            ids = []
            for n in range(20):
                command = await manager.send_command("c1", "echo", n, timeout=30)
                answer(link, session, command.command_id, n)
                ids.append(command.command_id)
            await manager.send_command("c9", "echo", timeout=30)  # agent offline: failed at once

        async with server_run(db) as manager:
            page = await manager.list_commands(client_id="c1", limit=15)
            assert [c.command_id for c in page.commands] == ids[::-1][:15]
            rest = await manager.list_commands(client_id="c1", limit=15, cursor=page.next_cursor)
            assert [c.result for c in rest.commands] == [4, 3, 2, 1, 0]
            failed = await manager.store.list(CommandQuery(status=CommandStatus.FAILED))
            assert [c.error_code for c in failed.commands] == [ErrorCode.AGENT_OFFLINE.value]


async def test_a_command_is_sent_to_its_agent_only_once_it_is_stored(db, monkeypatch):
    # A command that ran on an agent but that a crash left out of the store
    # would be invisible to the operator (and could be sent again).
    with trio.fail_after(10):
        async with server_run(db) as manager, held_commits(monkeypatch) as held:
            link, session = connect(manager, "c1", instance="i1")
            sent: list = []
            async with trio.open_nursery() as nursery:

                async def send():
                    sent.append(await manager.send_command("c1", "echo", "x", timeout=30))

                nursery.start_soon(send)
                await trio.testing.wait_all_tasks_blocked()
                assert session.commands() == []  # not stored yet: not sent
                held.release.set()
            assert [frame.command_id for frame in session.commands()] == [sent[0].command_id]
            assert sent[0].status is CommandStatus.EXECUTING
            # Its one row write already said "executing, sent to agent process
            # i1": a crash after it went out cannot make it look unsent.
            (row,) = held.rows_of(sent[0].command_id)
            assert (row["status"], row["sent_to"]) == ("executing", "i1")


async def test_a_command_taken_from_the_queue_is_sent_only_once_stored_as_executing(db, monkeypatch):
    # Found in review: a queued command went out when a slot freed, and its
    # "executing" was committed only later; a crash in between left it
    # pending, and the restarted server sent it again (to whichever process
    # of the agent connected next).
    with trio.fail_after(10):
        async with server_run(db, max_in_flight_per_agent=1) as manager:
            link, session = connect(manager, "c1", instance="i1")
            first = await manager.send_command("c1", "echo", 1, timeout=30)
            queued = await manager.send_command("c1", "echo", 2, timeout=30)
            assert queued.status is CommandStatus.PENDING
            async with held_commits(monkeypatch) as held:
                answer(link, session, first.command_id)
                await trio.testing.wait_all_tasks_blocked()
                assert sent_ids(session) == [first.command_id]  # its slot is free, but not stored yet
                held.release.set()
                await wait_all_stored(manager)
            assert sent_ids(session) == [first.command_id, queued.command_id]
            assert [(row["status"], row["sent_to"]) for row in held.rows_of(queued.command_id)] == [
                ("executing", "i1"),
            ]
            answer(link, session, queued.command_id, "two")
            assert (await manager.get_command(queued.command_id)).result == "two"


async def test_a_staged_command_that_ends_before_it_goes_out_frees_its_slot_for_the_queue(db, monkeypatch):
    # Found in review of the fix above: B, taken from the queue, was cancelled
    # while its move to executing was being stored; its place in the window
    # was released only when that commit ended, and then nothing moved the
    # queue: C waited for its delivery deadline while the agent was idle.
    with trio.fail_after(10):
        async with server_run(db, max_in_flight_per_agent=1) as manager:
            link, session = connect(manager, "c1", instance="i1")
            first = await manager.send_command("c1", "echo", 1, timeout=30)
            b = await manager.send_command("c1", "echo", 2, timeout=30)
            c = await manager.send_command("c1", "echo", 3, timeout=30)
            async with held_commits(monkeypatch) as held:
                answer(link, session, first.command_id)  # B is staged
                await trio.testing.wait_all_tasks_blocked()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(manager.cancel, b.command_id)
                    await trio.testing.wait_all_tasks_blocked()
                    held.release.set()
            await wait_all_stored(manager)
            await wait_all_stored(manager)
            assert sent_ids(session) == [first.command_id, c.command_id]
            assert (await manager.get_command(b.command_id)).status is CommandStatus.CANCELLED


async def test_the_agents_window_holds_with_commands_being_stored(db):
    with trio.fail_after(10):
        async with server_run(db, max_in_flight_per_agent=2) as manager:
            link, session = connect(manager, "c1", instance="i1")
            async with trio.open_nursery() as nursery:
                for n in range(5):
                    nursery.start_soon(manager.send_command, "c1", "echo", n)
            assert len(sent_ids(session)) == 2
            assert manager.queued_count("c1") == 3
            answer(link, session, sent_ids(session)[0])
            await manager.store.flush()
            await wait_all_stored(manager)
            assert len(sent_ids(session)) == 3


async def test_a_command_whose_agent_left_while_it_was_stored_goes_to_it_when_it_returns(db, monkeypatch):
    with trio.fail_after(10):
        async with server_run(db) as manager, held_commits(monkeypatch) as held:
            link, session = connect(manager, "c1", instance="i1")
            async with trio.open_nursery() as nursery:
                await send_then_lose_the_agent(manager, nursery, link, session)
                held.release.set()
            (command,) = (await manager.list_commands()).commands
            assert command.status is CommandStatus.EXECUTING and session.commands() == []
            link, session = connect(manager, "c1", instance="i1")  # the same agent process
            await wait_all_stored(manager)
            assert sent_ids(session) == [command.command_id]
            answer(link, session, command.command_id, "done")
            assert (await manager.get_command(command.command_id)).result == "done"


async def test_an_agent_back_while_its_command_is_being_stored_gets_it_once(db, monkeypatch):
    # Found in review: the reconnect re-sent it at once (before it was stored),
    # and the end of the commit sent it a second time.
    with trio.fail_after(10):
        async with server_run(db) as manager, held_commits(monkeypatch) as held:
            link, session = connect(manager, "c1", instance="i1")
            async with trio.open_nursery() as nursery:
                await send_then_lose_the_agent(manager, nursery, link, session)
                link, session = connect(manager, "c1", instance="i1")
                assert session.commands() == []  # still not stored: not sent
                held.release.set()
            await wait_all_stored(manager)
            (command,) = (await manager.list_commands()).commands
            assert sent_ids(session) == [command.command_id]


async def test_an_agent_restarted_while_its_command_is_being_stored_gets_it_once_stored(db, monkeypatch):
    # Found in review: the new process connected before the commit ended, and
    # the command, stored as going to the old one, was never sent at all.
    with trio.fail_after(10):
        async with server_run(db) as manager, held_commits(monkeypatch) as held:
            link, session = connect(manager, "c1", instance="i1")
            async with trio.open_nursery() as nursery:
                await send_then_lose_the_agent(manager, nursery, link, session)
                link, session = connect(manager, "c1", instance="i2")  # restarted
                assert session.commands() == []
                held.release.set()
            await wait_all_stored(manager)
            (command,) = (await manager.list_commands()).commands
            assert sent_ids(session) == [command.command_id]
            assert [u.sent_to for u in await manager.store.unfinished()] == ["i2"]


@pytest.mark.parametrize("next_instance", ["i2", ""])  # "": an agent that names no instance
async def test_a_command_never_sent_goes_to_the_agents_next_process(db, monkeypatch, next_instance):
    # Its agent left while it was being stored and came back restarted (a new
    # instance): nobody ever had it, so the new process gets it.
    with trio.fail_after(10):
        async with server_run(db) as manager:
            await never_sent_command(manager, monkeypatch)
            await the_next_process_gets_it(manager, next_instance)


@pytest.mark.parametrize("next_instance", ["i2", ""])
async def test_a_command_never_sent_goes_to_the_agents_next_process_after_a_restart(
    db, monkeypatch, caplog, next_instance
):
    # Found in review: that nobody had it lived only in memory; after a
    # restart it counted as sent to the old process, so the new one never got
    # it, and it ended execution_timeout although it never ran.
    with trio.fail_after(10):
        async with server_run(db) as manager:
            await never_sent_command(manager, monkeypatch)
            assert [u.sent_to for u in await manager.store.unfinished()] == [NEVER_SENT]
            await manager.drain(0)

        async with server_run(db) as manager:
            await the_next_process_gets_it(manager, next_instance)
    assert "earlier agent instance" not in caplog.text


async def the_next_process_gets_it(manager: CommandManager, next_instance: str) -> None:
    """c1's one command, never sent, goes to the process that connects now,
    the store records it went there (a restart re-sends it there only), and
    its answer is taken."""
    link, session = connect(manager, "c1", instance=next_instance)
    await wait_all_stored(manager)
    (command,) = (await manager.list_commands()).commands
    assert sent_ids(session) == [command.command_id]
    assert [u.sent_to for u in await manager.store.unfinished()] == [next_instance]
    answer(link, session, command.command_id, "done")
    assert (await manager.get_command(command.command_id)).result == "done"


async def test_a_command_the_stream_limit_held_back_goes_out_once_stored_as_sent_there(db, monkeypatch):
    with trio.fail_after(10):
        async with server_run(db) as manager:
            link, session, command = await stream_limited_command(manager, monkeypatch)
            # Stored as received by nobody: a restart now gives it to whichever
            # process connects, not only to this one.
            assert [u.sent_to for u in await manager.store.unfinished()] == [NEVER_SENT]
            async with held_commits(monkeypatch) as held:
                session.can_open_stream = True
                link.streams_available(session)
                await trio.testing.wait_all_tasks_blocked()
                # Not before the store says it went to this process: a crash in
                # between would let another process have it too.
                assert sent_ids(session) == []
                held.release.set()
                await wait_all_stored(manager)
            assert sent_ids(session) == [command.command_id]
            assert held.rows_of(command.command_id)[-1]["sent_to"] == "i1"


async def test_an_agent_that_calls_its_process_never_sent_is_not_taken_at_its_word(db):
    with trio.fail_after(10):
        async with server_run(db) as manager:
            connect(manager, "c1", instance=NEVER_SENT)
            command = await manager.send_command("c1", "echo", timeout=30)
            await manager.drain(0)

        async with server_run(db) as manager:
            link, session = connect(manager, "c1", instance="i2")
            await wait_all_stored(manager)
            # It went to a process, which may have run it: no other gets it.
            assert sent_ids(session) == []
            assert (await manager.get_command(command.command_id)).status is CommandStatus.EXECUTING


async def stream_limited_command(manager: CommandManager, monkeypatch, timeout: float = 30.0) -> tuple:
    """Send a command to c1 (process i1), which reaches its stream limit
    while the command is being stored: it is stored executing, not sent."""
    link, session = connect(manager, "c1", instance="i1")
    async with held_commits(monkeypatch) as held:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(manager.send_command, "c1", "echo", "x", timeout=timeout))
            await trio.testing.wait_all_tasks_blocked()
            session.can_open_stream = False
            held.release.set()
    await wait_all_stored(manager)
    (command,) = (await manager.list_commands()).commands
    assert command.status is CommandStatus.EXECUTING and sent_ids(session) == []
    return link, session, command


async def send_then_lose_the_agent(
    manager: CommandManager, nursery, link, session, command_type: str = "echo", timeout: float = 30.0
) -> None:
    """Send a command to c1 (its commit held), then drop the agent's connection."""
    nursery.start_soon(partial(manager.send_command, "c1", command_type, "x", timeout=timeout))
    await trio.testing.wait_all_tasks_blocked()
    link.connection_lost(session, 0, "gone")


async def never_sent_command(manager: CommandManager, monkeypatch, **send) -> None:
    """A command to c1 stored as executing that no agent process received:
    its agent (process i1) left while it was being stored."""
    async with held_commits(monkeypatch) as held:
        link, session = connect(manager, "c1", instance="i1")
        async with trio.open_nursery() as nursery:
            await send_then_lose_the_agent(manager, nursery, link, session, **send)
            held.release.set()
        await wait_all_stored(manager)


async def wait_all_stored(manager: CommandManager) -> None:
    """Until what the manager saved is committed and what waited for that is sent."""
    await manager.store.flush()
    await trio.testing.wait_all_tasks_blocked()


async def test_a_queued_command_the_new_policy_forbids_is_not_sent_after_a_restart(db):
    with trio.fail_after(10):
        async with server_run(db) as manager:
            allowed = await manager.send_command("c1", "shell", {"command": "id"}, connect_timeout=600)
            also_queued = await manager.send_command("c1", "echo", "e", connect_timeout=600)
            await manager.drain(0)

        # Restarted with a policy that no longer lets anyone have "shell".
        tightened = CommandPolicy(rules=(AllowRule(labels={}, command_types=frozenset({"echo"})),))
        async with server_run(db, policy=tightened) as manager:
            link, session = connect(manager, "c1", instance="i1")
            await wait_all_stored(manager)
            assert sent_ids(session) == [also_queued.command_id]
            refused = await manager.get_command(allowed.command_id)
            assert (refused.status, refused.error_code) == (CommandStatus.FAILED, "policy_denied")
            assert manager.queued_count("c1") == 0


async def test_a_queued_command_is_judged_again_by_the_labels_of_the_process_that_connects(db):
    # Found in review: accepted for an agent labelled role=web, it was sent to
    # the agent's next process, labelled role=db, which the policy does not let
    # have it (a restart of the server would have refused it).
    web_only = CommandPolicy(rules=(
        AllowRule(labels={"role": "web"}, command_types=frozenset({"sleep", "echo"})),
        AllowRule(labels={}, command_types=frozenset({"echo"})),
    ))
    with trio.fail_after(10):
        async with server_run(db, policy=web_only, max_in_flight_per_agent=1) as manager:
            link, session = connect_labelled(manager, "b1", {"role": "web"}, instance="i1")
            running = await manager.send_command("b1", "sleep", {"seconds": 20})
            queued = await manager.send_command("b1", "sleep", {"seconds": 1})
            echo = await manager.send_command("b1", "echo", "e")
            await wait_all_stored(manager)
            assert sent_ids(session) == [running.command_id]
            link.connection_lost(session, 0, "restarted")
            link, session = connect_labelled(manager, "b1", {"role": "db"}, instance="i2")
            await wait_all_stored(manager)
            refused = await manager.get_command(queued.command_id)
            assert (refused.status, refused.error_code) == (CommandStatus.FAILED, "policy_denied")
            assert sent_ids(session) == [echo.command_id]


def connect_labelled(manager: CommandManager, client_id: str, labels: dict, *, instance: str) -> tuple:
    link = manager.registry.new_link()
    session = AckingSession()
    link.handshake_completed(session)
    link.frame_received(session, 0, Hello(client_id=client_id, labels=labels, instance_id=instance))
    return link, session


# -- a store that cannot write -----------------------------------------------------


@attrs.define
class HeldCommits:
    release: threading.Event
    rows: list = attrs.Factory(list)  # every row a commit was given

    def rows_of(self, command_id: str) -> list[dict]:
        """The rows written for ``command_id``, by column name, in order."""
        columns = sqlite_store._COLUMNS.split(", ")
        return [dict(zip(columns, row)) for row in self.rows if row[0] == command_id]


@asynccontextmanager
async def held_commits(monkeypatch) -> AsyncIterator[HeldCommits]:
    """Commits hang (a disk that stopped answering) until ``release`` is set,
    at the latest when the block ends."""
    held = HeldCommits(threading.Event())
    original = SqliteStore._write

    def hanging_write(self, rows):
        held.rows.extend(rows)
        held.release.wait(30)
        return original(self, rows)

    monkeypatch.setattr(SqliteStore, "_write", hanging_write)
    try:
        yield held
    finally:
        held.release.set()


async def test_a_send_the_store_cannot_take_fails_clearly_and_is_never_sent(db, monkeypatch):
    with trio.fail_after(10):
        async with server_run(db, store_timeout=0.3) as manager:
            link, session = connect(manager, "c1", instance="i1")
            async with held_commits(monkeypatch):
                with pytest.raises(StoreUnavailable, match="has not been sent"):
                    await manager.send_command("c1", "echo", "x", timeout=30)
                (refused,) = [c for c in manager.store._dirty.values()]
                assert refused[0].error_code == "store_unavailable"
                assert session.commands() == []
                # A cancel is acknowledged only once stored, too.
                queued = manager._accept("c9", "echo", None, 30.0, 60.0, 0)
                with pytest.raises(StoreUnavailable, match="did not store it"):
                    await manager.cancel(queued.command_id)
                # A send that fails at once (agent offline) is bounded too.
                with pytest.raises(StoreUnavailable, match="did not store the command"):
                    await manager.send_command("nobody", "echo")
                with pytest.raises(StoreUnavailable, match="did not store the command"):
                    await manager.send_and_wait("nobody", "echo")
                # And a shutdown does not wait for the store forever.
                started = trio.current_time()
                await manager.drain(0)
                assert trio.current_time() - started < 2
            assert session.commands() == []  # not even once the store recovers
        async with server_run(db) as manager:
            page = await manager.list_commands()
            assert {(c.status, c.error_code) for c in page.commands} == {
                (CommandStatus.FAILED, "store_unavailable"), (CommandStatus.CANCELLED, "cancelled"),
                (CommandStatus.FAILED, "agent_offline"),  # stored once the store took writes again
            }


@pytest.mark.parametrize(
    "store_timeout, timeout", [(0.2, 30.0), (0.5, 0.2)], ids=["store-timeout-first", "deadline-first"]
)
async def test_a_command_sent_at_once_that_the_store_cannot_take_ends_unsent(
    db, monkeypatch, store_timeout, timeout
):
    # Found in review: the agent was sent CANCEL for a command it never saw;
    # and with its deadline first, it ended timeout / execution_timeout.
    # Then in a later review: a deadline shorter than a commit (0.001 s) ended
    # failed / store_unavailable on a healthy disk; it was not delivered in time.
    with trio.fail_after(10):
        async with server_run(db, store_timeout=store_timeout) as manager:
            link, session = connect(manager, "c1", instance="i1")
            async with held_commits(monkeypatch):
                with pytest.raises(StoreUnavailable, match="has not been sent"):
                    await manager.send_command("c1", "echo", timeout=timeout)
            await wait_all_stored(manager)
            (final,) = (await manager.list_commands()).commands
            if store_timeout < timeout:
                assert_ended_unsent(final, CommandStatus.FAILED, "store_unavailable")
            else:
                assert_ended_unsent(final, CommandStatus.TIMEOUT, "delivery_timeout")
            assert sent_ids(session) == [] and cancels(session) == []


async def test_a_deadline_shorter_than_a_commit_is_a_delivery_timeout_not_store_trouble(db):
    with trio.fail_after(10):
        async with server_run(db) as manager:
            link, session = connect(manager, "c1", instance="i1")
            command = await manager.send_command("c1", "echo", timeout=1e-9)
            final = await manager.wait(command.command_id)
            assert_ended_unsent(final, CommandStatus.TIMEOUT, "delivery_timeout")
            assert sent_ids(session) == [] and cancels(session) == []


async def test_a_queued_command_whose_deadline_passes_before_it_is_stored_as_executing_ends_unsent(
    db, monkeypatch
):
    with trio.fail_after(10):
        async with server_run(db, max_in_flight_per_agent=1) as manager:
            link, session = connect(manager, "c1", instance="i1")
            first = await manager.send_command("c1", "echo", 1, timeout=30)
            queued = await manager.send_command("c1", "echo", 2, timeout=0.2)
            async with held_commits(monkeypatch):
                answer(link, session, first.command_id)  # its slot frees: queued is staged
                final = await manager.wait(queued.command_id)
            assert_ended_unsent(final, CommandStatus.TIMEOUT, "delivery_timeout")
            await wait_all_stored(manager)
            assert await manager.get_command(queued.command_id) == final
            assert sent_ids(session) == [first.command_id] and cancels(session) == []


@pytest.mark.parametrize("ending", ["cancel", "deadline"])
async def test_a_command_no_agent_process_received_ends_without_a_cancel_to_the_agent(db, monkeypatch, ending):
    with trio.fail_after(10):
        async with server_run(db) as manager:
            link, session, command = await stream_limited_command(manager, monkeypatch, timeout=1.0)
            if ending == "cancel":
                final = await manager.cancel(command.command_id)
                assert_ended_unsent(final, CommandStatus.CANCELLED, "cancelled")
            else:
                final = await manager.wait(command.command_id)
                assert_ended_unsent(final, CommandStatus.TIMEOUT, "delivery_timeout")
            assert cancels(session) == []


def assert_ended_unsent(command, status: CommandStatus, error_code: str) -> None:
    assert (command.status, command.error_code, command.sent_at) == (status, error_code, None)


def cancels(session) -> list[CancelFrame]:
    """The CANCEL frames the agent was sent."""
    return [frame for frames in session.streams.values() for frame in frames if isinstance(frame, CancelFrame)]


async def test_a_client_id_the_store_could_not_encode_is_refused(db):
    with trio.fail_after(10):
        async with server_run(db) as manager:
            for bad in ("web\ud800", "web-1\nAudit action=send", "x\x00"):
                with pytest.raises(InvalidCommand, match="printable"):
                    await manager.send_command(bad, "echo")
                with pytest.raises(InvalidCommand, match="printable"):
                    await manager.send_command("c1", bad)


async def test_a_disk_that_hangs_does_not_hold_the_shutdown(db, monkeypatch):
    monkeypatch.setattr(sqlite_store, "CLOSE_TIMEOUT", 0.3)
    with trio.fail_after(10):
        async with held_commits(monkeypatch):
            started = trio.current_time()
            async with server_run(db, store_timeout=0.3) as manager:
                connect(manager, "c1", instance="i1")
                manager._accept("c1", "echo", None, 30.0, 0.0, 0)  # a save the disk never takes
                await manager.drain(0)
            # drain (0.3 s) + cancelling the writer + the store's close (0.3 s)
            assert trio.current_time() - started < 2


async def test_a_never_sent_command_the_new_policy_forbids_is_not_sent_after_a_restart(db, monkeypatch):
    # Found in review: queued commands were judged again by the policy after a
    # restart, but not those stored as executing that no agent ever received.
    with trio.fail_after(10):
        async with server_run(db) as manager:
            await never_sent_command(manager, monkeypatch, command_type="shell")
            assert [u.sent_to for u in await manager.store.unfinished()] == [NEVER_SENT]
            await manager.drain(0)

        tightened = CommandPolicy(rules=(AllowRule(labels={}, command_types=frozenset({"echo"})),))
        async with server_run(db, policy=tightened) as manager:
            link, session = connect(manager, "c1", instance="i2")
            await wait_all_stored(manager)
            assert sent_ids(session) == []
            (refused,) = (await manager.list_commands()).commands
            assert_ended_unsent(refused, CommandStatus.FAILED, "policy_denied")
            assert cancels(session) == []


async def test_a_never_sent_command_whose_deadline_passes_while_it_is_stored_again_timed_out_waiting(
    db, monkeypatch
):
    # Its deadline passed in the few milliseconds of its second staging (for
    # the agent process that came back): that is the wait for an agent, not a
    # store that failed to answer; it was reported store_unavailable.
    with trio.fail_after(10):
        async with server_run(db) as manager:
            await never_sent_command(manager, monkeypatch, timeout=1.0)
            (command,) = (await manager.list_commands()).commands
            async with held_commits(monkeypatch) as held:
                connect(manager, "c1", instance="i2")  # restaged, its commit held
                done = await manager.wait(command.command_id)  # until its deadline
                held.release.set()
            assert_ended_unsent(done, CommandStatus.TIMEOUT, "delivery_timeout")
