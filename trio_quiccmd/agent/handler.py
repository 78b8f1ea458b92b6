"""CommandHandler: turns a COMMAND frame into a RESULT frame by running the executor."""

from __future__ import annotations

import logging
from typing import Any

import trio

from ..model import ErrorCode
from ..wire import CommandFrame, ResultFrame, encode_frame
from .executor import CommandExecutor, CommandFailed, UnknownCommandType

logger = logging.getLogger("trio_quiccmd.agent")


class _Execution:
    """A command running here: its cancel scope, and its result once done."""

    __slots__ = ("scope", "done", "result")

    def __init__(self, scope: trio.CancelScope):
        self.scope = scope
        self.done = trio.Event()
        self.result: ResultFrame | None = None


class CommandHandler:
    """Runs commands through an executor, each under its own cancel scope.

    The scope is cancelled by CANCEL from the server (see :meth:`cancel`) or by
    the command's own deadline, so no work runs on after the server gave up.
    """

    def __init__(self, executor: CommandExecutor, *, max_result_bytes: int = 1 << 20):
        self.executor = executor
        self.max_result_bytes = max_result_bytes
        self._running: dict[str, _Execution] = {}

    @property
    def running(self) -> int:
        return len(self._running)

    def cancel(self, command_id: str) -> bool:
        """Cancel a running command; False if it is not running here."""
        execution = self._running.get(command_id)
        if execution is None:
            return False
        execution.scope.cancel()
        return True

    async def handle(self, command: CommandFrame) -> ResultFrame:
        """Execute ``command`` and return its RESULT frame (never raises).

        If the surrounding task is cancelled (agent shutdown), the cancellation
        propagates as usual and no result is produced.
        """
        command_id = command.command_id
        running = self._running.get(command_id)
        if running is not None:
            # Delivered again while running: never run it twice; answer with
            # the same result.
            await running.done.wait()
            assert running.result is not None
            return running.result
        execution = self._running[command_id] = _Execution(
            trio.CancelScope(deadline=trio.current_time() + command.timeout)
        )
        try:
            execution.result = await self._run(command, execution.scope)
            return execution.result
        finally:
            del self._running[command_id]
            execution.done.set()

    async def _run(self, command: CommandFrame, scope: trio.CancelScope) -> ResultFrame:
        command_id = command.command_id
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
                return self._completed(command, result)
        finally:
            if scope.cancelled_caught:
                logger.info("Command cancelled command_id=%s", command_id)
        timed_out = trio.current_time() >= scope.deadline
        return ResultFrame(
            command_id=command_id,
            status="cancelled",
            error="deadline passed" if timed_out else "cancelled by the server",
            error_code=(ErrorCode.EXECUTION_TIMEOUT if timed_out else ErrorCode.CANCELLED).value,
        )

    def _completed(self, command: CommandFrame, result: Any) -> ResultFrame:
        frame = ResultFrame(command_id=command.command_id, status="completed", result=result)
        try:
            size = len(encode_frame(frame))
        except (TypeError, ValueError, RecursionError) as exc:
            return self._failed(
                command, f"result is not JSON-serialisable: {exc}", "invalid_result"
            )
        if size > self.max_result_bytes:
            return self._failed(
                command,
                f"result of {size} bytes exceeds the limit of {self.max_result_bytes}",
                "result_too_large",
            )
        return frame

    @staticmethod
    def _failed(command: CommandFrame, error: str, error_code: str) -> ResultFrame:
        return ResultFrame(
            command_id=command.command_id, status="failed", error=error, error_code=error_code
        )
