"""What an agent sends back, whatever its executor does.

Every result fits in a frame the server takes and carries what the executor
returned at that moment; every command that started is remembered, so a
re-sent copy is answered, not run again. Otherwise one bad result costs the
agent its connection on every reconnect (the server closes it), or a
delivery waits for ever, or a command runs twice.

First CommandHandler on a virtual clock, then a real server and agent over
loopback QUIC.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing

from trio_quiccmd import CommandFailed, CommandStatus, builtin_executor
from trio_quiccmd.agent.handler import CommandHandler
from trio_quiccmd.wire import (
    DEFAULT_MAX_FRAME_SIZE,
    FRAME_HEADER_SIZE,
    CommandFrame,
    FrameDecoder,
    ResultFrame,
    encode_frame,
)

HUGE = 2 << 20  # characters: a message twice the server's frame limit


class Raising:
    """An executor that raises ``exc`` (after ``delay`` seconds), counting its runs."""

    def __init__(self, exc: BaseException, delay: float = 0.0):
        self.exc = exc
        self.delay = delay
        self.runs = 0

    async def execute(self, command_type: str, payload: Any) -> Any:
        self.runs += 1
        await trio.sleep(self.delay)
        raise self.exc


class FailsWhileCancelled:
    """An executor whose own nursery raises while it is being cancelled."""

    def __init__(self) -> None:
        self.runs = 0

    async def execute(self, command_type: str, payload: Any) -> Any:
        self.runs += 1

        async def cleanup_fails() -> None:
            try:
                await trio.sleep_forever()
            finally:
                raise OSError("cleanup failed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cleanup_fails)
            await trio.sleep_forever()


def command(timeout: float = 30) -> CommandFrame:
    return CommandFrame(command_id="c1", command_type="job", payload=None, timeout=timeout)


def as_the_server_reads_it(result: ResultFrame) -> ResultFrame:
    (frame,) = FrameDecoder(DEFAULT_MAX_FRAME_SIZE).feed(encode_frame(result))
    return frame


# -- the handler ---------------------------------------------------------------


@pytest.mark.parametrize(
    "exc, error_code, prefix",
    [
        (RuntimeError("x" * HUGE), "executor_error", "RuntimeError: "),
        (CommandFailed("x" * HUGE, "disk_full"), "disk_full", ""),
    ],
    ids=["exception", "CommandFailed"],
)
async def test_a_huge_error_message_is_cut_and_says_so(exc, error_code, prefix, autojump_clock):
    result = await CommandHandler(Raising(exc)).handle(command())
    assert (result.status, result.error_code) == ("failed", error_code)
    assert result.error.startswith(prefix + "x" * 4000)
    assert result.error.endswith(f"… (truncated, {len(prefix) + HUGE} characters in all)")
    assert len(result.error) < 5000
    assert as_the_server_reads_it(result) == result


@pytest.mark.parametrize(
    "bad_code",
    [42, b"oops", "", "two\nlines", "x" * 200],
    ids=["int", "bytes", "empty", "line-break", "200-characters"],
)
async def test_an_error_code_the_wire_cannot_carry_becomes_executor_error(bad_code, autojump_clock):
    result = await CommandHandler(Raising(CommandFailed("boom", bad_code))).handle(command())
    assert (result.status, result.error, result.error_code) == ("failed", "boom", "executor_error")
    assert as_the_server_reads_it(result) == result


class UnreadableMessage(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message")


class UnreadableCode(CommandFailed):
    def __init__(self) -> None:
        Exception.__init__(self, "boom")

    @property
    def error_code(self) -> str:  # type: ignore[override]
        raise RuntimeError("no code")


@pytest.mark.parametrize(
    "exc, error, error_code",
    [
        (UnreadableMessage(), "UnreadableMessage: <unreadable message>", "executor_error"),
        (UnreadableCode(), "the command's execution ended without a result", "agent_error"),
    ],
    ids=["message", "error_code"],
)
async def test_an_exception_that_cannot_be_read_still_fails_the_command_once(
    exc, error, error_code, autojump_clock
):
    executor = Raising(exc)
    handler = CommandHandler(executor)
    first = await handler.handle(command())
    again = await handler.handle(command())
    assert (first.status, first.error, first.error_code) == ("failed", error, error_code)
    assert again == first
    assert executor.runs == 1


async def test_a_delivery_attached_to_a_bad_failure_gets_its_answer_and_nothing_runs_twice(
    autojump_clock,
):
    # The server re-sends the command while the first delivery still runs.
    executor = Raising(CommandFailed("boom", 42), delay=10)
    handler = CommandHandler(executor)
    answers: list[ResultFrame] = []

    async def deliver(task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        answers.append(await handler.handle(command()))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(deliver)
            await trio.sleep(1)
            nursery.start_soon(deliver)
    answers.append(await handler.handle(command()))  # and once more, after
    assert [(a.status, a.error_code) for a in answers] == [("failed", "executor_error")] * 3
    assert executor.runs == 1


async def test_the_result_is_what_the_executor_returned_even_if_it_changes_it_later(
    autojump_clock,
):
    returned = {"n": 1}

    class Keeps:
        async def execute(self, command_type: str, payload: Any) -> Any:
            return returned

    handler = CommandHandler(Keeps())
    first = await handler.handle(command())
    returned["n"] = 2
    returned["later"] = {1, 2}  # not JSON
    again = await handler.handle(command())  # re-sent: answered from memory
    assert first.result == again.result == {"n": 1}
    assert as_the_server_reads_it(again) == again


async def test_the_largest_result_the_server_takes_completes_and_one_byte_more_fails(
    autojump_clock,
):
    class Returns:
        async def execute(self, command_type: str, payload: Any) -> Any:
            return payload

    body = len(encode_frame(ResultFrame(command_id="c1", status="completed", result=""))) - FRAME_HEADER_SIZE
    limit = body + 100
    handler = CommandHandler(Returns(), max_result_bytes=limit)
    fits = await handler.handle(
        CommandFrame(command_id="c1", command_type="t", payload="y" * 100, timeout=5)
    )
    over = await handler.handle(
        CommandFrame(command_id="c2", command_type="t", payload="y" * 101, timeout=5)
    )
    assert fits.status == "completed"
    assert FrameDecoder(max_frame_size=limit).feed(encode_frame(fits)) == [fits]
    assert (over.status, over.error_code) == ("failed", "result_too_large")


async def test_an_executor_failing_as_its_deadline_cancels_it_is_answered_once(autojump_clock):
    executor = FailsWhileCancelled()
    handler = CommandHandler(executor)
    first = await handler.handle(command(timeout=5))
    again = await handler.handle(command(timeout=5))
    assert (first.status, first.error_code) == ("failed", "executor_error")
    assert again == first
    assert executor.runs == 1


async def test_cancelling_the_task_while_the_executor_fails_only_cancels_it(autojump_clock):
    # The abrupt path (Agent.run cancelled): the cancellation goes on, and
    # the executor's error does not escape to whoever cancelled the agent.
    handler = CommandHandler(FailsWhileCancelled())
    with trio.move_on_after(1) as outer:
        await handler.handle(command())
    assert outer.cancelled_caught
    assert handler.running == 0


async def test_the_log_says_timed_out_for_the_deadline_and_cancelled_for_a_cancel(
    autojump_clock, caplog
):
    # A command that ran out of time was logged "Command cancelled", sending
    # the operator looking for who cancelled it.
    caplog.set_level(logging.INFO, logger="trio_quiccmd.agent")
    handler = CommandHandler(Raising(RuntimeError("unreached"), delay=60))
    timed_out = await handler.handle(command(timeout=5))
    assert timed_out.error_code == "execution_timeout"
    assert caplog.messages[-1] == "Command timed out command_id=c1 timeout=5"

    handler = CommandHandler(Raising(RuntimeError("unreached"), delay=60))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler.handle, command())
        await trio.testing.wait_all_tasks_blocked()
        assert handler.cancel("c1")
    assert caplog.messages[-1] == "Command cancelled command_id=c1"


# -- over real QUIC ------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("x" * HUGE), CommandFailed("boom", b"oops"), CommandFailed("boom", 42)],
    ids=["huge-message", "bytes-error-code", "int-error-code"],
)
async def test_a_bad_failure_fails_the_command_and_the_agent_stays_connected(cluster, exc):
    registry = builtin_executor()
    runs = 0

    @registry.register("bad")
    async def bad(payload: Any) -> Any:
        nonlocal runs
        runs += 1
        raise exc

    with trio.fail_after(15):
        agent, _ = await cluster.start_agent("c1", executor=registry)
        failing = await cluster.manager.send_command("c1", "bad", timeout=5)
        final = await cluster.manager.wait(failing.command_id)
        echo = await cluster.manager.send_command("c1", "echo", "still here", timeout=5)
        echoed = await cluster.manager.wait(echo.command_id)
    assert (final.status, final.error_code) == (CommandStatus.FAILED, "executor_error")
    assert len(final.error) < 5000
    if isinstance(exc, RuntimeError):
        assert final.error.endswith(f"(truncated, {len('RuntimeError: ') + HUGE} characters in all)")
    assert (echoed.status, echoed.result) == (CommandStatus.COMPLETED, "still here")
    assert agent.connected and agent.sessions_established == 1
    assert runs == 1


async def test_results_are_held_to_the_servers_frame_limit_not_the_agents_own(cluster):
    # An agent that takes larger frames than the protocol's must still not
    # send one: the server would close the connection.
    registry = builtin_executor()

    @registry.register("grow")
    async def grow(payload: str) -> str:
        return payload * 3

    with trio.fail_after(15):
        agent, _ = await cluster.start_agent(
            "c1", executor=registry, max_frame_size=4 * DEFAULT_MAX_FRAME_SIZE
        )
        big = await cluster.manager.send_command(
            "c1", "grow", "y" * (DEFAULT_MAX_FRAME_SIZE // 2), timeout=5
        )
        final = await cluster.manager.wait(big.command_id)
    assert (final.status, final.error_code) == (CommandStatus.FAILED, "result_too_large")
    assert agent.connected and agent.sessions_established == 1


async def test_a_result_that_fails_to_send_does_not_take_the_agent_down(cluster):
    with trio.fail_after(15):
        agent, _ = await cluster.start_agent("c1")
        session = agent.session
        send_frame = session.send_frame

        def failing_for_one_result(stream_id, frame, *, end_stream=False):
            if isinstance(frame, ResultFrame) and frame.result == "unlucky":
                raise RuntimeError("injected fault")
            return send_frame(stream_id, frame, end_stream=end_stream)

        session.send_frame = failing_for_one_result
        unlucky = await cluster.manager.send_command("c1", "echo", "unlucky", timeout=1)
        lost = await cluster.manager.wait(unlucky.command_id)
        after = await cluster.manager.send_command("c1", "echo", "after", timeout=5)
        echoed = await cluster.manager.wait(after.command_id)
    assert lost.error_code == "execution_timeout"
    assert (echoed.status, echoed.result) == (CommandStatus.COMPLETED, "after")
    assert agent.connected and agent.sessions_established == 1
