"""The lifecycle under any interleaving of results, timeouts, cancels,
disconnects and reconnects (hypothesis, on a virtual clock).

Whatever happens and in whatever order, every command ends in exactly one
terminal state, that state never changes afterwards, every waiter is released
with it, and the manager keeps nothing for it once it has ended.
"""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_quiccmd import CommandAlreadyFinished, CommandManager, CommandStatus, ManagerSettings
from trio_quiccmd.wire import CommandFrame, Hello, ResultFrame

from .recording import RecordingSession

N_COMMANDS = 6

step = st.one_of(
    st.tuples(st.just("send"), st.integers(0, N_COMMANDS - 1), st.sampled_from([0.5, 2.0, 5.0]), st.booleans()),
    st.tuples(st.just("result"), st.integers(0, N_COMMANDS - 1), st.sampled_from(["completed", "failed", "cancelled"])),
    st.tuples(st.just("cancel"), st.integers(0, N_COMMANDS - 1)),
    st.tuples(st.just("sleep"), st.sampled_from([0.1, 0.6, 2.5])),
    st.tuples(st.just("disconnect")),
    st.tuples(st.just("connect")),
)


class Fleet:
    """One agent, connected and disconnected at will, answering by frames."""

    def __init__(self, manager: CommandManager):
        self.manager = manager
        self.link = None
        self.session = None

    def connect(self) -> None:
        if self.link is not None:
            return
        self.link = self.manager.registry.new_link()
        self.session = RecordingSession()
        self.link.handshake_completed(self.session)
        self.link.frame_received(self.session, 0, Hello(client_id="agent"))

    def disconnect(self) -> None:
        if self.link is None:
            return
        self.session.is_closing = True
        self.link.connection_lost(self.session, 0, "gone")
        self.link = self.session = None

    def answer(self, command_id: str, status: str) -> None:
        if self.link is None:
            return
        for stream_id, frames in list(self.session.streams.items()):
            first = frames[0]
            if isinstance(first, CommandFrame) and first.command_id == command_id:
                self.link.frame_received(
                    self.session, stream_id,
                    ResultFrame(command_id=command_id, status=status, result=status),
                )


async def run_scenario(steps) -> None:
    manager = CommandManager(settings=ManagerSettings(max_in_flight_per_agent=2))
    fleet = Fleet(manager)
    ids: dict[int, str] = {}
    final: dict[str, CommandStatus] = {}
    released: dict[str, CommandStatus] = {}
    waited: set[str] = set()

    async def waiter(command_id: str) -> None:
        released[command_id] = (await manager.wait(command_id)).status

    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        fleet.connect()
        for action, *args in steps:
            if action == "send" and args[0] not in ids:
                index, timeout, wait_for_agent = args
                command = await manager.send_command(
                    "agent", "x", index, timeout=timeout, connect_timeout=1.0 if wait_for_agent else 0
                )
                ids[index] = command.command_id
                if not command.is_terminal:
                    waited.add(command.command_id)
                    nursery.start_soon(waiter, command.command_id)
            elif action == "result" and args[0] in ids:
                fleet.answer(ids[args[0]], args[1])
            elif action == "cancel" and args[0] in ids:
                try:
                    await manager.cancel(ids[args[0]])
                except CommandAlreadyFinished:
                    pass
            elif action == "sleep":
                await trio.sleep(args[0])
            elif action == "disconnect":
                fleet.disconnect()
            elif action == "connect":
                fleet.connect()
            await trio.testing.wait_all_tasks_blocked()
            # Invariant after every step: a terminal state, once reached, stays.
            for command_id in ids.values():
                status = (await manager.get_command(command_id)).status
                if command_id in final:
                    assert status is final[command_id], (command_id, final[command_id], status)
                elif status.is_terminal:
                    final[command_id] = status
        # Let every deadline pass: nothing may stay unfinished.
        await trio.sleep(10)
        await trio.testing.wait_all_tasks_blocked()
        for command_id in ids.values():
            command = await manager.get_command(command_id)
            assert command.is_terminal, command
            if command_id in final:
                assert command.status is final[command_id]
        # Every waiter was released, with the command's final state.
        assert set(released) == waited
        for command_id, status in released.items():
            assert status is (await manager.get_command(command_id)).status
        assert manager.unfinished_count == 0
        assert manager._waiters == {}
        assert manager._deadline_of == {}
        nursery.cancel_scope.cancel()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, min_size=1, max_size=25))
def test_no_transition_out_of_a_terminal_state_under_any_interleaving(steps):
    trio.run(run_scenario, steps, clock=trio.testing.MockClock(autojump_threshold=0))
