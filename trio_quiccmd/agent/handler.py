"""CommandHandler: turns a COMMAND frame into a RESULT frame by running the executor."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import trio

from ..model import ErrorCode
from ..wire import CommandFrame, ResultFrame, encode_frame
from .dedup import RecentCommands
from .executor import CommandExecutor, CommandFailed, UnknownCommandType

logger = logging.getLogger("trio_quiccmd.agent")


class _Execution:
    """A command running here: its cancel scope, and its result once done."""

    __slots__ = ("scope", "done", "result", "size", "shutdown")

    def __init__(self, scope: trio.CancelScope):
        self.scope = scope
        #: Cancelled because the agent is shutting down (see cancel_all).
        self.shutdown = False
        self.done = trio.Event()
        self.result: ResultFrame | None = None
        #: The result's encoded size, when it was measured.
        self.size: int | None = None


#: CANCELs remembered for commands that have not started (oldest forgotten first).
_MAX_EARLY_CANCELS = 1024


class CommandHandler:
    """Runs commands through an executor, each under its own cancel scope.

    The scope is cancelled by CANCEL from the server (see :meth:`cancel`), by
    the command's own deadline, so no work runs on after the server gave up,
    or by the end of the agent's shutdown grace period
    (:meth:`cancel_all_for_shutdown`: the result is ``cancelled`` /
    ``agent_shutdown``).

    A command runs at most once: a COMMAND whose id is running attaches to
    that execution, and one whose id finished recently (``recent``, see
    :class:`~trio_quiccmd.agent.dedup.RecentCommands`) is answered with the
    stored result.
    """

    def __init__(
        self,
        executor: CommandExecutor,
        *,
        max_result_bytes: int = 1 << 20,
        recent: RecentCommands | None = None,
    ):
        self.executor = executor
        self.max_result_bytes = max_result_bytes
        self.recent = recent if recent is not None else RecentCommands()
        self._running: dict[str, _Execution] = {}
        # CANCELs for commands not started yet: a CANCEL can arrive in the
        # same datagram as its COMMAND, before the execution task has run.
        self._cancelled_before_start: OrderedDict[str, None] = OrderedDict()

    @property
    def running(self) -> int:
        return len(self._running)

    def cancel(self, command_id: str) -> bool:
        """Cancel a command; False if it is not running here.

        A command that has not started yet (and has not finished) is
        remembered, so that it is answered ``cancelled`` instead of run.
        """
        execution = self._running.get(command_id)
        if execution is None:
            if command_id not in self.recent:
                self._cancelled_before_start[command_id] = None
                while len(self._cancelled_before_start) > _MAX_EARLY_CANCELS:
                    self._cancelled_before_start.popitem(last=False)
            return False
        execution.scope.cancel()
        return True

    def cancel_all_for_shutdown(self) -> int:
        """Cancel every running command because the agent is shutting down.

        Each one's result is ``cancelled`` / ``agent_shutdown`` (unless it
        finishes on its own first). Returns how many were cancelled.
        """
        for execution in self._running.values():
            execution.shutdown = True
            execution.scope.cancel()
        return len(self._running)

    def is_running(self, command_id: str) -> bool:
        return command_id in self._running

    def knows(self, command_id: str) -> bool:
        """Whether ``command_id`` is running here or finished recently (a
        COMMAND with this id would not be run again)."""
        return command_id in self._running or command_id in self.recent

    async def handle(self, command: CommandFrame) -> ResultFrame:
        """Execute ``command`` and return its RESULT frame (never raises).

        A command already running here is not run again: this waits for that
        execution and returns its result. One that finished recently is
        answered at once with its stored result.

        If the surrounding task is cancelled (the abrupt path: ``Agent.run``
        cancelled), the cancellation propagates as usual and no result is
        produced. A graceful shutdown uses :meth:`cancel_all_for_shutdown`
        instead, which does produce one.
        """
        command_id = command.command_id
        finished = self.recent.get(command_id)
        if finished is not None:
            logger.info(
                "Command delivered again; answered with its stored result command_id=%s",
                command_id,
            )
            await trio.lowlevel.checkpoint()
            return finished
        running = self._running.get(command_id)
        if running is not None:
            # Delivered again while running: never run it twice; answer with
            # the same result.
            logger.info("Command delivered again while running command_id=%s", command_id)
            await running.done.wait()
            if running.result is not None:
                return running.result
            # The first delivery's task was cancelled (agent shutdown) before
            # a result existed; the work may have run in part.
            return self._failed(
                command, "the command's first execution was abandoned", ErrorCode.AGENT_ERROR.value
            )
        if command_id in self._cancelled_before_start:
            del self._cancelled_before_start[command_id]
            logger.info("Command cancelled before it started command_id=%s", command_id)
            await trio.lowlevel.checkpoint()
            return ResultFrame(
                command_id=command_id,
                status="cancelled",
                error="cancelled by the server before it started",
                error_code=ErrorCode.CANCELLED.value,
            )
        execution = self._running[command_id] = _Execution(
            trio.CancelScope(deadline=trio.current_time() + command.timeout)
        )
        try:
            execution.result = await self._run(command, execution)
            return execution.result
        finally:
            del self._running[command_id]
            if execution.result is not None:
                self.recent.remember(
                    execution.result, timeout=command.timeout, size=execution.size
                )
            execution.done.set()

    async def _run(self, command: CommandFrame, execution: _Execution) -> ResultFrame:
        command_id = command.command_id
        scope = execution.scope
        try:
            with scope:
                try:
                    result = await self.executor.execute(command.command_type, command.payload)
                except UnknownCommandType as exc:
                    return self._failed(command, str(exc), exc.error_code)
                except CommandFailed as exc:
                    return self._failed(command, str(exc), exc.error_code)
                except Exception as exc:
                    logger.info(
                        "Command execution raised command_id=%s command_type=%s",
                        command_id, command.command_type, exc_info=True,
                    )
                    return self._failed(
                        command, f"{type(exc).__name__}: {exc}", ErrorCode.EXECUTOR_ERROR.value
                    )
                return self._completed(command, result, execution)
        finally:
            if scope.cancelled_caught:
                logger.info("Command cancelled command_id=%s", command_id)
        if execution.shutdown:
            return ResultFrame(
                command_id=command_id,
                status="cancelled",
                error="the agent shut down before the command finished",
                error_code=ErrorCode.AGENT_SHUTDOWN.value,
            )
        timed_out = trio.current_time() >= scope.deadline
        return ResultFrame(
            command_id=command_id,
            status="cancelled",
            error="deadline passed" if timed_out else "cancelled by the server",
            error_code=(ErrorCode.EXECUTION_TIMEOUT if timed_out else ErrorCode.CANCELLED).value,
        )

    def _completed(self, command: CommandFrame, result: Any, execution: _Execution) -> ResultFrame:
        frame = ResultFrame(command_id=command.command_id, status="completed", result=result)
        try:
            size = len(encode_frame(frame))
        except (TypeError, ValueError, RecursionError) as exc:
            return self._failed(
                command, f"result is not JSON-serialisable: {exc}", ErrorCode.INVALID_RESULT.value
            )
        if size > self.max_result_bytes:
            return self._failed(
                command,
                f"result of {size} bytes exceeds the limit of {self.max_result_bytes}",
                ErrorCode.RESULT_TOO_LARGE.value,
            )
        execution.size = size
        return frame

    @staticmethod
    def _failed(command: CommandFrame, error: str, error_code: str) -> ResultFrame:
        return ResultFrame(
            command_id=command.command_id, status="failed", error=error, error_code=error_code
        )
