"""Reconnects lose nothing and run nothing twice (issue 5: "at most once", "no
lost results").

* The server re-sends a command that is still ``executing`` to the same agent
  instance when it reconnects (unless the agent holds its result), with the
  time left until its deadline; the agent's memory of command ids makes that
  safe.
* A result the agent could not send is held and delivered on a stream of its
  own after the next WELCOME; the server takes it and ends the stream to say so.

First on a virtual clock with recording sessions (as in test_manager.py),
then over real QUIC.
"""

from __future__ import annotations

import pytest
import trio

from trio_quiccmd import CommandManager, CommandStatus, ManagerSettings, builtin_executor
from trio_quiccmd.wire import Hello, ProtocolError, ProtocolErrorCode, ResultFrame

from .conftest import wait_until
from .recording import RecordingSession


class AckingSession(RecordingSession):
    """A RecordingSession that also records the streams we end (FIN)."""

    def __init__(self) -> None:
        super().__init__()
        self.ended: list[int] = []

    def end_stream(self, stream_id) -> bool:
        self.ended.append(stream_id)
        return True


def connect(manager: CommandManager, client_id: str, *, instance: str = "i1", held=()) -> tuple:
    link = manager.registry.new_link()
    session = AckingSession()
    link.handshake_completed(session)
    link.frame_received(
        session, 0, Hello(client_id=client_id, instance_id=instance, held_results=list(held))
    )
    return link, session


def answer_on(link, session, stream_id: int, command_id: str, result=None, status="completed"):
    link.frame_received(
        session, stream_id, ResultFrame(command_id=command_id, status=status, result=result)
    )


def answer(link, session, command_id: str, result=None):
    answer_on(link, session, session.stream_of(command_id), command_id, result)


def sent_ids(session) -> list[str]:
    return [frame.command_id for frame in session.commands()]


@pytest.fixture
async def manager(autojump_clock):
    manager = CommandManager(settings=ManagerSettings(max_in_flight_per_agent=4))
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        yield manager
        nursery.cancel_scope.cancel()


def assert_no_leftovers(manager: CommandManager) -> None:
    assert manager._executing == {}
    assert manager._resend == {}


# -- the server: re-send on reconnect ----------------------------------------------


async def test_executing_commands_are_resent_with_the_time_left(manager, autojump_clock):
    link, session = connect(manager, "c1")
    a = await manager.send_command("c1", "sleep", 1, timeout=10)
    b = await manager.send_command("c1", "sleep", 2, timeout=20)
    await trio.sleep(3)
    link.connection_lost(session, 0, "gone")
    await trio.sleep(1)
    link2, session2 = connect(manager, "c1")
    resent = session2.commands()
    assert [f.command_id for f in resent] == [a.command_id, b.command_id]
    assert [f.payload for f in resent] == [1, 2]
    assert [f.timeout for f in resent] == [pytest.approx(6), pytest.approx(16)]
    assert link2.in_flight == 2
    answer(link2, session2, a.command_id, "A")
    answer(link2, session2, b.command_id, "B")
    assert [(await manager.get_command(c.command_id)).result for c in (a, b)] == ["A", "B"]
    assert link2.in_flight == 0
    assert_no_leftovers(manager)


async def test_resent_commands_keep_their_original_deadline(manager, autojump_clock):
    link, session = connect(manager, "c1")
    start = trio.current_time()
    command = await manager.send_command("c1", "sleep", timeout=10)
    await trio.sleep(4)
    link.connection_lost(session, 0, "gone")
    link2, session2 = connect(manager, "c1")
    assert sent_ids(session2) == [command.command_id]
    final = await manager.wait(command.command_id)
    assert final.error_code == "execution_timeout"
    assert trio.current_time() - start == pytest.approx(10)
    assert link2.in_flight == 0  # the timeout cancelled it and freed the stream
    assert_no_leftovers(manager)


@pytest.mark.parametrize(
    "first, second", [("i1", "i2"), ("", ""), ("i1", "")], ids=["restarted", "no-instance", "lost"]
)
async def test_commands_are_not_resent_to_another_agent_instance(
    manager, first, second, autojump_clock
):
    # A restarted agent forgot what it ran: re-sending could run it twice.
    link, session = connect(manager, "c1", instance=first)
    command = await manager.send_command("c1", "sleep", timeout=10)
    link.connection_lost(session, 0, "gone")
    link2, session2 = connect(manager, "c1", instance=second)
    assert session2.commands() == []
    assert (await manager.get_command(command.command_id)).status is CommandStatus.EXECUTING
    final = await manager.wait(command.command_id)
    assert final.error_code == "execution_timeout"
    assert_no_leftovers(manager)


async def test_replacing_connection_gets_the_commands_resent(manager, autojump_clock):
    # The agent reconnects before the server noticed its old connection died.
    link, session = connect(manager, "c1")
    command = await manager.send_command("c1", "sleep", timeout=10)
    link2, session2 = connect(manager, "c1")
    assert session.closed_with == ProtocolErrorCode.REPLACED
    assert sent_ids(session2) == [command.command_id]
    answer(link2, session2, command.command_id, "ok")
    assert (await manager.get_command(command.command_id)).status is CommandStatus.COMPLETED
    assert_no_leftovers(manager)


async def test_resend_fills_the_window_first_then_the_queue(manager, autojump_clock):
    link, session = connect(manager, "c1")
    executing = [await manager.send_command("c1", "sleep", i, timeout=100) for i in range(4)]
    # Two streams the agent gave up on: their slots go to two more commands,
    # so six are executing, more than the window of four.
    for command in executing[:2]:
        link.stream_reset(session, session.stream_of(command.command_id), 0)
    executing += [await manager.send_command("c1", "sleep", i, timeout=100) for i in (4, 5)]
    queued = await manager.send_command("c1", "echo", "queued", timeout=100)
    assert queued.status is CommandStatus.PENDING
    link.connection_lost(session, 0, "gone")
    link2, session2 = connect(manager, "c1")
    ids = [c.command_id for c in executing]
    assert sent_ids(session2) == ids[:4] and link2.in_flight == 4
    answer(link2, session2, ids[0])
    assert sent_ids(session2) == ids[:5]  # re-sends go before the queue
    answer(link2, session2, ids[1])
    answer(link2, session2, ids[2])
    assert sent_ids(session2) == ids + [queued.command_id]
    assert link2.in_flight == 4
    for command_id in ids[3:] + [queued.command_id]:
        answer(link2, session2, command_id)
    assert link2.in_flight == 0 and manager.unfinished_count == 0
    assert_no_leftovers(manager)


async def test_a_command_finished_while_waiting_to_be_resent_is_not_sent(manager, autojump_clock):
    link, session = connect(manager, "c1")
    commands = [await manager.send_command("c1", "sleep", i, timeout=100) for i in range(4)]
    link.stream_reset(session, session.stream_of(commands[0].command_id), 0)
    extra = await manager.send_command("c1", "sleep", 4, timeout=100)
    link.connection_lost(session, 0, "gone")
    link2, session2 = connect(manager, "c1")
    assert extra.command_id not in sent_ids(session2)
    assert list(manager._resend["c1"]) == [extra.command_id]
    await manager.cancel(extra.command_id)
    assert "c1" not in manager._resend
    answer(link2, session2, commands[0].command_id)
    assert extra.command_id not in sent_ids(session2)


async def test_disconnect_forgets_what_was_to_be_resent(manager, autojump_clock):
    link, session = connect(manager, "c1")
    commands = [await manager.send_command("c1", "sleep", i, timeout=100) for i in range(4)]
    link.stream_reset(session, session.stream_of(commands[0].command_id), 0)
    await manager.send_command("c1", "sleep", 4, timeout=100)
    link.connection_lost(session, 0, "gone")
    link2, session2 = connect(manager, "c1")
    assert "c1" in manager._resend
    link2.connection_lost(session2, 0, "gone again")
    assert "c1" not in manager._resend
    link3, session3 = connect(manager, "c1")
    assert len(session3.commands()) == 4  # recomputed for the new connection


# -- the server: results the agent held ----------------------------------------------


async def test_held_results_are_not_resent_and_are_taken_on_the_agents_stream(
    manager, autojump_clock
):
    link, session = connect(manager, "c1")
    held = await manager.send_command("c1", "echo", "h", timeout=10)
    lost = await manager.send_command("c1", "echo", "l", timeout=10)
    link.connection_lost(session, 0, "gone")
    link2, session2 = connect(manager, "c1", held=[held.command_id])
    assert sent_ids(session2) == [lost.command_id]
    answer_on(link2, session2, 4, held.command_id, "h")
    final = await manager.get_command(held.command_id)
    assert (final.status, final.result) == (CommandStatus.COMPLETED, "h")
    assert session2.ended == [4]  # the acknowledgement
    assert link2.in_flight == 1


async def test_a_held_result_for_a_command_resent_here_frees_its_slot(manager, autojump_clock):
    # The result was held after HELLO was sent, so the command was re-sent too.
    link, session = connect(manager, "c1")
    command = await manager.send_command("c1", "echo", timeout=10)
    link.connection_lost(session, 0, "gone")
    link2, session2 = connect(manager, "c1")
    assert link2.in_flight == 1 and link2.has_command(command.command_id)
    answer_on(link2, session2, 4, command.command_id, "first")
    assert link2.in_flight == 0 and not link2.has_command(command.command_id)
    assert session2.ended == [4]
    # The answer to the re-sent COMMAND comes later and changes nothing.
    answer_on(link2, session2, session2.stream_of(command.command_id), command.command_id, "second")
    final = await manager.get_command(command.command_id)
    assert final.result == "first" and link2.in_flight == 0
    assert_no_leftovers(manager)


async def test_late_unknown_or_foreign_held_results_are_acknowledged_and_ignored(
    manager, autojump_clock
):
    link1, session1 = connect(manager, "c1")
    link2, session2 = connect(manager, "c2")
    theirs = await manager.send_command("c2", "echo", timeout=10)
    timed_out = await manager.send_command("c1", "sleep", timeout=1)
    await trio.sleep(2)
    answer_on(link1, session1, 4, "no-such-command", "x")
    answer_on(link1, session1, 8, theirs.command_id, "forged")
    answer_on(link1, session1, 12, timed_out.command_id, "late")
    assert session1.ended == [4, 8, 12]
    assert (await manager.get_command(theirs.command_id)).status is CommandStatus.EXECUTING
    assert (await manager.get_command(timed_out.command_id)).status is CommandStatus.TIMEOUT
    assert link2.in_flight == 1


async def test_a_held_result_fills_the_freed_slot_from_the_queue(manager, autojump_clock):
    link, session = connect(manager, "c1")
    first = [await manager.send_command("c1", "sleep", i, timeout=100) for i in range(4)]
    queued = await manager.send_command("c1", "echo", "next", timeout=100)
    link.connection_lost(session, 0, "gone")
    link2, session2 = connect(manager, "c1", held=[first[0].command_id])
    assert len(session2.commands()) == 4  # three re-sent, then one from the queue
    assert queued.command_id in sent_ids(session2)
    answer_on(link2, session2, 4, first[0].command_id)
    assert (await manager.get_command(first[0].command_id)).status is CommandStatus.COMPLETED
    assert link2.in_flight == 4


# -- over real QUIC ------------------------------------------------------------------


def counting_executor(gate: trio.Event | None = None):
    registry = builtin_executor()
    state = {"runs": 0, "started": trio.Event(), "connected_at_finish": None}

    @registry.register("work")
    async def work(payload):
        state["runs"] += 1
        state["started"].set()
        if gate is not None:
            await gate.wait()
        state["connected_at_finish"] = state["agent"].connected
        return {"echo": payload}

    return registry, state


def blackhole(session) -> None:
    """Make a live connection silently dead: nothing in, nothing out, and
    neither side is told (as when a network path vanishes)."""
    session._transport.try_send = lambda data, addr: True
    session.quic.receive_datagram = lambda data, addr, now: None


async def test_result_finished_while_disconnected_is_delivered_after_reconnect(cluster):
    gate = trio.Event()
    registry, state = counting_executor(gate)
    with trio.fail_after(15):
        # A long first reconnect delay: the work finishes while disconnected.
        agent, _ = await cluster.start_agent(
            "c1", executor=registry, reconnect_initial_delay=1.0
        )
        state["agent"] = agent
        command = await cluster.manager.send_command("c1", "work", "x", timeout=10)
        await state["started"].wait()
        cluster.manager.registry.get("c1").close(ProtocolErrorCode.NO_ERROR, "network blip")
        await wait_until(lambda: not agent.connected)
        gate.set()
        await wait_until(lambda: agent.held_results == [command.command_id])
        final = await cluster.manager.wait(command.command_id)
        link = cluster.manager.registry.get("c1")
        await wait_until(lambda: agent.held_results == [])  # acknowledged
    assert state["connected_at_finish"] is False
    assert (final.status, final.result) == (CommandStatus.COMPLETED, {"echo": "x"})
    assert state["runs"] == 1
    assert agent.sessions_established == 2
    assert link.hello.held_results == [command.command_id]
    assert link.in_flight == 0  # held, so not re-sent
    assert cluster.manager._executing == {}


async def test_command_sent_into_a_dead_connection_is_resent_and_runs_once(cluster):
    registry, state = counting_executor()
    with trio.fail_after(15):
        agent, _ = await cluster.start_agent("c1", executor=registry)
        state["agent"] = agent
        old = agent.session
        blackhole(old)
        # The server still believes in the connection: the command goes into it.
        command = await cluster.manager.send_command("c1", "work", "y", timeout=10)
        assert command.status is CommandStatus.EXECUTING
        await trio.sleep(0.2)
        assert state["runs"] == 0
        old.close(ProtocolErrorCode.NO_ERROR, "the agent noticed first")  # unheard
        final = await cluster.manager.wait(command.command_id)
        # (The re-sent command may complete before the agent has processed
        # the WELCOME that preceded it.)
        await wait_until(lambda: agent.sessions_established == 2)
    assert (final.status, final.result) == (CommandStatus.COMPLETED, {"echo": "y"})
    assert state["runs"] == 1


async def test_result_lost_with_the_connection_is_answered_from_memory(cluster):
    gate = trio.Event()
    registry, state = counting_executor(gate)
    with trio.fail_after(15):
        agent, _ = await cluster.start_agent("c1", executor=registry)
        state["agent"] = agent
        command = await cluster.manager.send_command("c1", "work", "z", timeout=10)
        await state["started"].wait()
        old = agent.session
        blackhole(old)
        gate.set()  # the RESULT goes into the dead connection and is lost
        await wait_until(lambda: agent.handler.recent.get(command.command_id) is not None)
        assert agent.held_results == []
        old.close(ProtocolErrorCode.NO_ERROR, "the agent noticed first")
        final = await cluster.manager.wait(command.command_id)
    assert (final.status, final.result) == (CommandStatus.COMPLETED, {"echo": "z"})
    assert state["runs"] == 1


async def test_more_held_results_than_the_server_lets_us_open_streams_for(cluster):
    # The server allows 128 agent-opened streams at once; the agent opens
    # more as it acknowledges the first ones.
    count = 200
    gate = trio.Event()
    registry, state = counting_executor(gate)
    with trio.fail_after(30):
        agent, _ = await cluster.start_agent(
            "c1", executor=registry, reconnect_initial_delay=1.0
        )
        state["agent"] = agent
        commands = [
            await cluster.manager.send_command("c1", "work", i, timeout=20) for i in range(count)
        ]
        await wait_until(lambda: state["runs"] == count)
        cluster.manager.registry.get("c1").close(ProtocolErrorCode.NO_ERROR, "network blip")
        await wait_until(lambda: not agent.connected)
        gate.set()
        await wait_until(lambda: len(agent.held_results) == count)
        finals = [await cluster.manager.wait(c.command_id) for c in commands]
        await wait_until(lambda: agent.held_results == [])
    assert [(f.status, f.result) for f in finals] == [
        (CommandStatus.COMPLETED, {"echo": i}) for i in range(count)
    ]
    assert state["runs"] == count and agent.sessions_established == 2


async def test_a_result_after_the_agent_stopped_reading_its_command_stream_is_taken(manager):
    """STOP_SENDING on a command stream stops only what the server sends on
    it (the COMMAND, already whole). The RESULT the agent sends after it on
    that stream used to be dropped as late, and the command ran out its
    deadline although its agent had answered."""
    link, session = connect(manager, "c1")
    command = await manager.send_command("c1", "echo", 1, timeout=100)
    link.stream_stopped(session, session.stream_of(command.command_id), 0)
    answer(link, session, command.command_id, "ok")
    done = await manager.get_command(command.command_id)
    assert (done.status, done.result) == (CommandStatus.COMPLETED, "ok")


async def test_an_agent_that_stops_reading_its_control_stream_is_closed(manager):
    link, session = connect(manager, "c1")
    with pytest.raises(ProtocolError) as raised:
        link.stream_stopped(session, 0, 0)
    assert raised.value.code is ProtocolErrorCode.UNEXPECTED_FRAME
