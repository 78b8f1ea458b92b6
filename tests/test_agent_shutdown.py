"""Agent graceful shutdown (issue 5: "agent shutdown that finishes or hands back
in-flight work within a grace period"), over real loopback QUIC.

``Agent.stop(grace)``: new commands are refused (``failed`` /
``agent_shutting_down``), running ones may finish within the grace period and
their results are delivered, the rest are cancelled and reported ``cancelled``
/ ``agent_shutdown``, then the connection is closed politely.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from trio_quiccmd import CommandStatus

from .conftest import wait_until

#: The cluster's server idle timeout is 10 s: anything seen well before it was
#: a polite close, not the idle timer.
TIMEOUT = 8


class RecordingExecutor:
    """``sleep`` ({"name", "seconds"}) and ``gated`` ({"name"}, waits for
    :attr:`gate`); records what started, finished and saw its cancellation."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.gate = trio.Event()

    async def execute(self, command_type: str, payload: Any) -> Any:
        name = payload["name"]
        self.started.append(name)
        try:
            if command_type == "sleep":
                await trio.sleep(payload["seconds"])
            elif command_type == "gated":
                await self.gate.wait()
            else:
                raise ValueError(f"unexpected command type {command_type!r}")
        except trio.Cancelled:
            self.cancelled.append(name)
            raise
        self.finished.append(name)
        return {"name": name}


async def assert_polite_goodbye(link) -> None:
    await link.session.terminated.wait()
    assert (link.session.close_error_code, link.session.close_reason) == (
        0, "agent shutting down"
    )


async def test_running_command_completes_and_is_delivered_before_the_goodbye(cluster):
    executor = RecordingExecutor()
    agent = cluster.agent("drainer", executor=executor)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            link = cluster.manager.registry.get("drainer")
            command = await cluster.manager.send_command(
                "drainer", "sleep", {"name": "short", "seconds": 0.3}, timeout=60
            )
            await wait_until(lambda: executor.started == ["short"])
            began = trio.current_time()
            agent.stop(grace=5)
        # run() returned once the work was done, not at the end of the grace period.
        assert trio.current_time() - began < 3
        assert executor.finished == ["short"] and executor.cancelled == []
        done = await cluster.manager.wait(command.command_id)
        assert done.status is CommandStatus.COMPLETED, done
        assert done.result == {"name": "short"}
        await assert_polite_goodbye(link)
        assert cluster.manager.clients() == []


async def test_held_results_are_delivered_during_the_drain(cluster, caplog):
    caplog.set_level(logging.INFO, logger="trio_quiccmd.agent")
    executor = RecordingExecutor()
    agent = cluster.agent("holder", executor=executor)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            command = await cluster.manager.send_command(
                "holder", "gated", {"name": "held"}, timeout=60
            )
            await wait_until(lambda: executor.started == ["held"])
            # The server gives up the command's stream: the result will be held
            # and must go out on a stream of its own during the drain.
            link = cluster.manager.registry.get("holder")
            [stream_id] = [s for s, c in link._command_on.items() if c == command.command_id]
            link.session.quic.stop_stream(stream_id, 0)
            link.session._wake()
            agent.stop(grace=5)
            await trio.sleep(0.1)
            executor.gate.set()
        done = await cluster.manager.wait(command.command_id)
        assert done.status is CommandStatus.COMPLETED, done
        assert agent.held_results == []
        assert any("Held result delivered" in m for m in caplog.messages), caplog.messages
        await assert_polite_goodbye(link)


async def test_grace_over_cancels_and_reports_agent_shutdown_at_once(cluster):
    executor = RecordingExecutor()
    agent = cluster.agent("slowpoke", executor=executor)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            link = cluster.manager.registry.get("slowpoke")
            command = await cluster.manager.send_command(
                "slowpoke", "sleep", {"name": "long", "seconds": 60}, timeout=120
            )
            await wait_until(lambda: executor.started == ["long"])
            began = trio.current_time()
            agent.stop(grace=0.3)
            done = await cluster.manager.wait(command.command_id)
            # Well before its 120 s deadline: right after the grace period.
            assert 0.3 <= trio.current_time() - began < 3
        assert done.status is CommandStatus.CANCELLED, done
        assert done.error_code == "agent_shutdown"
        assert executor.cancelled == ["long"] and executor.finished == []
        await assert_polite_goodbye(link)


async def test_command_arriving_during_the_drain_is_refused_and_never_runs(cluster):
    executor = RecordingExecutor()
    agent = cluster.agent("refuser", executor=executor)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            link = cluster.manager.registry.get("refuser")
            first = await cluster.manager.send_command(
                "refuser", "gated", {"name": "first"}, timeout=60
            )
            await wait_until(lambda: executor.started == ["first"])
            agent.stop(grace=5)
            # Still connected while draining: the server dispatches the next one.
            late = await cluster.manager.send_command(
                "refuser", "gated", {"name": "late"}, timeout=60
            )
            assert late.status is CommandStatus.EXECUTING
            refused = await cluster.manager.wait(late.command_id)
            assert refused.status is CommandStatus.FAILED, refused
            assert refused.error_code == "agent_shutting_down"
            # The command being drained is unaffected and finishes.
            executor.gate.set()
        done = await cluster.manager.wait(first.command_id)
        assert done.status is CommandStatus.COMPLETED, done
        assert executor.started == ["first"]
        await assert_polite_goodbye(link)


async def test_stop_again_with_zero_grace_ends_the_drain_now(cluster):
    executor = RecordingExecutor()
    agent = cluster.agent("impatient", executor=executor)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            command = await cluster.manager.send_command(
                "impatient", "gated", {"name": "g"}, timeout=120
            )
            await wait_until(lambda: executor.started == ["g"])
            agent.stop(grace=60)
            await trio.sleep(0.1)
            agent.stop(grace=0)
        done = await cluster.manager.wait(command.command_id)
        assert (done.status, done.error_code) == (CommandStatus.CANCELLED, "agent_shutdown")


async def test_an_agent_cancelled_outright_still_says_goodbye(cluster):
    """Cancelling ``Agent.run`` (an embedding program's own shutdown, or the
    CLI's second signal) skips the drain, not the goodbye: the server hears
    the CONNECTION_CLOSE at once. Before, it kept the agent until its idle
    timeout (10 s here) and sent it new commands, which then ran out their
    deadlines as ``executing`` on a process that was gone."""
    with trio.fail_after(TIMEOUT):
        _agent, scope = await cluster.start_agent("abrupt")
        scope.cancel()
        await wait_until(lambda: cluster.manager.registry.get("abrupt") is None)
        command = await cluster.manager.send_command("abrupt", "echo", 1, connect_timeout=30)
    assert command.status is CommandStatus.PENDING  # queued for the next connection


async def test_connection_lost_while_draining_logs_the_undelivered(cluster, caplog):
    executor = RecordingExecutor()
    agent = cluster.agent("orphan", executor=executor)
    caplog.set_level(logging.INFO, logger="trio_quiccmd.agent")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            await cluster.manager.send_command("orphan", "gated", {"name": "g"}, timeout=120)
            await wait_until(lambda: executor.started == ["g"])
            agent.stop(grace=60)
            # The server drops the agent mid-drain: nothing can be delivered now.
            cluster.manager.registry.get("orphan").session.close(0, "bye")
    assert executor.cancelled == ["g"]
    assert any(
        "Results not delivered, lost with the agent client_id=orphan running=1" in message
        for message in caplog.messages
    ), caplog.messages


def test_stop_refuses_a_negative_grace():
    from trio_quiccmd import Agent

    with pytest.raises(ValueError):
        Agent("x", ("127.0.0.1", 1)).stop(grace=-1)
