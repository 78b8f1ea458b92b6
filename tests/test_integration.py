"""A real server and real agents over loopback QUIC, with TLS verified."""

from __future__ import annotations

import trio

from trio_quiccmd import (
    Agent,
    AgentRejected,
    CommandManager,
    CommandServer,
    CommandStatus,
    ExecutorRegistry,
    builtin_executor,
)
from trio_quiccmd.server.core import server_quic_configuration
from trio_quiccmd.wire import ProtocolErrorCode

from .conftest import wait_until


async def test_echo_round_trip_completes_with_payload(cluster):
    with trio.fail_after(10):
        await cluster.start_agent("client-001")
        command = await cluster.manager.send_and_wait(
            "client-001", "echo", {"text": "héllo", "n": [1, 2, None]}
        )
    assert command.status is CommandStatus.COMPLETED
    assert command.result == {"text": "héllo", "n": [1, 2, None]}
    assert command.error is None and command.error_code is None
    assert command.created_at <= command.sent_at <= command.completed_at


async def test_executor_exception_fails_with_its_message(cluster):
    with trio.fail_after(10):
        await cluster.start_agent("a")
        command = await cluster.manager.send_and_wait("a", "fail", {"message": "disk full"})
    assert command.status is CommandStatus.FAILED
    assert command.error == "disk full"
    assert command.error_code == "executor_error"


async def test_unhandled_exception_in_custom_executor_is_reported(cluster):
    registry = ExecutorRegistry()

    @registry.register("divide")
    def divide(payload):  # a sync handler: runs in a worker thread
        return payload["a"] / payload["b"]

    with trio.fail_after(10):
        await cluster.start_agent("a", executor=registry)
        ok = await cluster.manager.send_and_wait("a", "divide", {"a": 6, "b": 3})
        bad = await cluster.manager.send_and_wait("a", "divide", {"a": 1, "b": 0})
    assert ok.status is CommandStatus.COMPLETED and ok.result == 2.0
    assert bad.status is CommandStatus.FAILED
    assert bad.error_code == "executor_error"
    assert "ZeroDivisionError" in bad.error


async def test_unknown_command_type_fails_with_code(cluster):
    with trio.fail_after(10):
        await cluster.start_agent("a")
        command = await cluster.manager.send_and_wait("a", "reboot-the-moon")
    assert command.status is CommandStatus.FAILED
    assert command.error_code == "unknown_command_type"
    assert "reboot-the-moon" in command.error


async def test_slow_command_times_out_and_is_cancelled_on_agent(cluster):
    observed = trio.Event()
    registry = builtin_executor()

    @registry.register("hang")
    async def hang(payload):
        try:
            await trio.sleep_forever()
        finally:
            observed.set()

    with trio.fail_after(10):
        await cluster.start_agent("a", executor=registry)
        command = await cluster.manager.send_and_wait("a", "hang", timeout=0.3)
        assert command.status is CommandStatus.TIMEOUT
        assert command.error_code == "execution_timeout"
        await observed.wait()  # no work runs on after the deadline
    # A late result cannot overwrite the terminal state.
    assert (await cluster.manager.get_command(command.command_id)).status is CommandStatus.TIMEOUT


def hang_until_cancelled(registry: ExecutorRegistry, command_type: str) -> tuple[trio.Event, trio.Event]:
    """Register ``command_type`` as work that runs until cancelled; returns
    the events set when it starts and when it is cancelled."""
    started, cancelled = trio.Event(), trio.Event()

    @registry.register(command_type)
    async def hang(payload):
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    return started, cancelled


async def test_cancel_executing_command_reaches_the_executor(cluster):
    registry = builtin_executor()
    started, cancelled = hang_until_cancelled(registry, "long")

    with trio.fail_after(10):
        await cluster.start_agent("a", executor=registry)
        command = await cluster.manager.send_command("a", "long", timeout=60)
        await started.wait()
        result = await cluster.manager.cancel(command.command_id)
        assert result.status is CommandStatus.CANCELLED
        assert result.error_code == "cancelled"
        await cancelled.wait()
        # The window slot is free again: another command runs at once.
        echo = await cluster.manager.send_and_wait("a", "echo", {"after": "cancel"})
    assert echo.result == {"after": "cancel"}


async def test_thousand_concurrent_commands_to_one_agent(cluster):
    manager = cluster.manager
    results: dict[int, object] = {}
    with trio.fail_after(60):
        await cluster.start_agent("busy")

        async def one(i: int) -> None:
            command = await manager.send_and_wait("busy", "echo", {"i": i})
            assert command.status is CommandStatus.COMPLETED, command
            results[i] = command.result

        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(one, i)
    assert results == {i: {"i": i} for i in range(1000)}
    # More than the window (256) were queued, and the queue drained.
    assert manager.queued_count("busy") == 0
    assert manager.unfinished_count == 0


async def test_commands_reach_the_right_agent_among_several(cluster):
    registry_for = {}
    for name in ("alpha", "beta", "gamma"):
        registry = ExecutorRegistry()
        registry.register("whoami", lambda payload, name=name: {"me": name, "got": payload})
        registry_for[name] = registry
    with trio.fail_after(20):
        for name, registry in registry_for.items():
            await cluster.start_agent(name, executor=registry, labels={"role": name})
        results = {}

        async def ask(name: str, i: int) -> None:
            command = await cluster.manager.send_and_wait(name, "whoami", i)
            results[(name, i)] = command.result

        async with trio.open_nursery() as nursery:
            for name in registry_for:
                for i in range(50):
                    nursery.start_soon(ask, name, i)
    assert all(result == {"me": name, "got": i} for (name, i), result in results.items())
    assert len(results) == 150
    clients = {c.client_id: c for c in cluster.manager.clients()}
    assert set(clients) == {"alpha", "beta", "gamma"}
    assert clients["beta"].labels == {"role": "beta"}
    assert clients["beta"].remote_address.startswith("127.0.0.1:")


async def test_offline_agent_fails_at_once(cluster):
    with trio.fail_after(5):
        command = await cluster.manager.send_command("nobody", "echo", {})
    assert command.status is CommandStatus.FAILED
    assert command.error_code == "agent_offline"


async def test_connect_timeout_waits_for_the_agent(cluster):
    manager = cluster.manager
    with trio.fail_after(10):
        queued = await manager.send_command("late", "echo", {"x": 1}, connect_timeout=5)
        assert queued.status is CommandStatus.PENDING
        await cluster.start_agent("late")
        done = await manager.wait(queued.command_id)
    assert done.status is CommandStatus.COMPLETED
    assert done.result == {"x": 1}


async def test_connect_timeout_expires_with_delivery_timeout(cluster):
    with trio.fail_after(10):
        command = await cluster.manager.send_and_wait("never", "echo", connect_timeout=0.2)
    assert command.status is CommandStatus.TIMEOUT
    assert command.error_code == "delivery_timeout"


async def test_agent_reconnects_after_the_connection_drops(cluster):
    manager = cluster.manager
    with trio.fail_after(20):
        agent, _ = await cluster.start_agent("flaky")
        first = await manager.send_and_wait("flaky", "echo", 1)
        assert first.status is CommandStatus.COMPLETED
        old_link = manager.registry.get("flaky")
        old_link.close(ProtocolErrorCode.NO_ERROR, "test drops the connection")
        assert manager.registry.get("flaky") is None
        await wait_until(lambda: manager.registry.get("flaky") not in (None, old_link))
        await wait_until(lambda: agent.sessions_established == 2)
        second = await manager.send_and_wait("flaky", "echo", 2)
    assert second.status is CommandStatus.COMPLETED and second.result == 2


async def test_second_connection_with_same_id_replaces_the_first(cluster):
    manager = cluster.manager
    first_registry = ExecutorRegistry()
    first_registry.register("who", lambda p: "first")
    second_registry = ExecutorRegistry()
    second_registry.register("who", lambda p: "second")
    first = cluster.agent("dup", executor=first_registry)
    outcome = []

    async def run_first(task_status=trio.TASK_STATUS_IGNORED):
        try:
            await first.run(task_status=task_status)
        except AgentRejected as exc:
            outcome.append(exc)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_first)
            first_link = manager.registry.get("dup")
            second, _ = await cluster.start_agent("dup", executor=second_registry)
            await wait_until(lambda: manager.registry.get("dup") not in (None, first_link))
        # The replaced agent stops instead of evicting the new one in turn.
        assert len(outcome) == 1 and "same client_id" in str(outcome[0])
        command = await manager.send_and_wait("dup", "who")
    assert command.result == "second"
    assert [c.client_id for c in manager.clients()] == ["dup"]
    assert (first.sessions_established, second.sessions_established) == (1, 1)


async def test_waiters_all_get_the_result(cluster):
    gate = trio.Event()
    registry = ExecutorRegistry()

    @registry.register("gated")
    async def gated(payload):
        await gate.wait()
        return "open"

    with trio.fail_after(10):
        await cluster.start_agent("a", executor=registry)
        command = await cluster.manager.send_command("a", "gated")
        seen = []

        async def waiter():
            seen.append(await cluster.manager.wait(command.command_id))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(waiter)
            await wait_until(lambda: cluster.manager.waiter_count(command.command_id) == 20)
            gate.set()
    assert len(seen) == 20
    assert all(c.status is CommandStatus.COMPLETED and c.result == "open" for c in seen)


async def test_keepalive_follows_a_short_server_idle_timeout(dev_cert):
    # A server idle timeout below the agent's keepalive interval must not
    # drop quiet agents: the agent pings at a third of the negotiated timeout.
    from trio_quiccmd import CommandManager, CommandServer
    from trio_quiccmd.server.core import server_quic_configuration
    from trio_quiccmd import Agent

    cert, key = dev_cert
    server = CommandServer(CommandManager(), server_quic_configuration(cert, key, idle_timeout=1.5))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, "127.0.0.1", 0)
            agent = Agent("quiet", ("127.0.0.1", address[1]), ca_file=cert, keepalive_interval=10.0)
            await nursery.start(agent.run)
            await trio.sleep(4.0)  # the test is about what happens to an idle connection
            assert agent.sessions_established == 1
            command = await server.manager.send_and_wait("quiet", "echo", "still here")
            assert command.result == "still here"
            await server.shutdown(grace=0.5)
            nursery.cancel_scope.cancel()


async def test_an_agent_notices_a_server_that_died_without_a_word_long_before_its_idle_timeout(
    dev_cert,
):
    # A crashed server sends no CONNECTION_CLOSE, and aioquic has no stateless
    # reset: without its own check the agent would wait out the 30 s idle timeout.
    cert, key = dev_cert
    server = CommandServer(CommandManager(), server_quic_configuration(cert, key, idle_timeout=30.0))
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            server_scope = trio.CancelScope()

            async def run_server(task_status=trio.TASK_STATUS_IGNORED):
                with server_scope:
                    await server.serve("127.0.0.1", 0, task_status=task_status)

            address = await nursery.start(run_server)
            agent = Agent(
                "silent-1", ("127.0.0.1", address[1]), ca_file=cert,
                keepalive_interval=0.5, idle_timeout=30.0,
                reconnect_initial_delay=60.0, reconnect_max_delay=60.0,
            )
            nursery.start_soon(agent.run)
            await agent.wait_connected()
            server_scope.cancel()  # gone, without a goodbye
            lost_at = trio.current_time()
            await wait_until(lambda: not agent.connected, interval=0.05)
            # keepalive (0.5 s) + the liveness timeout (2 s), with room to spare
            assert trio.current_time() - lost_at < 5
            nursery.cancel_scope.cancel()


async def test_a_shutdown_with_the_memory_store_stops_the_work_on_the_agent(dev_cert):
    # The commands left unfinished end failed / server_shutdown, and their
    # agents are sent CANCEL. The CANCEL was written just before the
    # connection's close, which aioquic sends alone: the agent never got it
    # and ran the work to its end (found by following the docs).
    cert, key = dev_cert
    server = CommandServer(CommandManager(), server_quic_configuration(cert, key))
    registry = builtin_executor()
    started, cancelled = hang_until_cancelled(registry, "hang")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, "127.0.0.1", 0)
            agent = Agent("busy", ("127.0.0.1", address[1]), ca_file=cert, executor=registry)
            await nursery.start(agent.run)
            command = await server.manager.send_command("busy", "hang", timeout=60)
            await started.wait()
            await server.shutdown(grace=0.1)
            final = await server.manager.get_command(command.command_id)
            assert (final.status, final.error_code) == (CommandStatus.FAILED, "server_shutdown")
            await cancelled.wait()
            nursery.cancel_scope.cancel()
