"""CommandHandler: turns a COMMAND frame into a RESULT frame by running the executor."""

from __future__ import annotations

import logging
from collections import OrderedDict

import trio

from ..model import ErrorCode
from ..wire import (
    DEFAULT_MAX_FRAME_SIZE,
    FRAME_HEADER_SIZE,
    CommandFrame,
    ResultFrame,
    decode_body,
    encode_frame,
)
from .dedup import RecentCommands
from .executor import CommandExecutor, CommandFailed, UnknownCommandType

logger = logging.getLogger("trio_quiccmd.agent")

#: Characters of a failed command's ``error`` that are sent; the rest is cut
#: (the text says so). An exception's message has no bound of its own, and a
#: result over the server's frame limit would cost the agent its connection.
MAX_ERROR_CHARS = 4096
#: Longest ``error_code`` an executor may choose (ours are a few words).
MAX_ERROR_CODE_CHARS = 128


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
        max_result_bytes: int = DEFAULT_MAX_FRAME_SIZE,
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

        Whatever the executor returns or raises, the result fits in a frame
        the server accepts (:meth:`_final`): an over-long ``error`` is cut to
        :data:`MAX_ERROR_CHARS`, and an ``error_code`` that is not a short
        printable string becomes ``executor_error``.
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
            return running.result if running.result is not None else self._abandoned(command)
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
            execution.result, execution.size = self._final(
                command, await self._run(command, execution)
            )
            return execution.result
        except Exception:
            # The last resort, for a bug of ours or an exception from the
            # executor too broken to report: the work has begun, so it is
            # answered, and remembered, rather than run again.
            logger.exception("Command handling failed command_id=%s", command_id)
            execution.result = self._abandoned(command)
            return execution.result
        finally:
            try:
                del self._running[command_id]
                if execution.result is not None:
                    self.recent.remember(
                        execution.result, timeout=command.timeout, size=execution.size
                    )
            finally:
                # Deliveries attached to this execution wait for it.
                execution.done.set()

    async def _run(self, command: CommandFrame, execution: _Execution) -> ResultFrame:
        command_id = command.command_id
        scope = execution.scope
        # The executor's exceptions are caught outside the scope: one raised
        # while the scope cancels it arrives as a group with the scope's own
        # Cancelled, which only the scope may take out.
        try:
            with scope:
                result = await self.executor.execute(command.command_type, command.payload)
                return ResultFrame(command_id=command_id, status="completed", result=result)
        except Exception as exc:
            return self._failure(command, exc)
        except BaseExceptionGroup as group:
            cancelled, errors = group.split(trio.Cancelled)
            if cancelled is None or not isinstance(errors, Exception):
                raise
            # This task is being cancelled, and the executor failed as it
            # wound down: the cancellation goes on, and there is no one left
            # to report the failure to but the log. (KeyboardInterrupt and
            # the like are not Exceptions, and are not held back.)
            logger.warning(
                "Command execution raised while cancelled command_id=%s command_type=%.100s",
                command_id, command.command_type, exc_info=errors,
            )
            raise cancelled from None
        finally:
            timed_out = trio.current_time() >= scope.deadline
            if scope.cancelled_caught:
                # Its own deadline, not only a CANCEL, ends it here: the log
                # must not send an operator looking for who cancelled it.
                if execution.shutdown:
                    logger.info("Command cancelled for shutdown command_id=%s", command_id)
                elif timed_out:
                    logger.info(
                        "Command timed out command_id=%s timeout=%g", command_id, command.timeout
                    )
                else:
                    logger.info("Command cancelled command_id=%s", command_id)
        if execution.shutdown:
            return ResultFrame(
                command_id=command_id,
                status="cancelled",
                error="the agent shut down before the command finished",
                error_code=ErrorCode.AGENT_SHUTDOWN.value,
            )
        return ResultFrame(
            command_id=command_id,
            status="cancelled",
            error="deadline passed" if timed_out else "cancelled by the server",
            error_code=(ErrorCode.EXECUTION_TIMEOUT if timed_out else ErrorCode.CANCELLED).value,
        )

    def _failure(self, command: CommandFrame, exc: Exception) -> ResultFrame:
        """The failed result for an exception the executor raised."""
        if isinstance(exc, (CommandFailed, UnknownCommandType)):
            return self._failed(command, _message(exc), _error_code(exc))
        logger.info(
            "Command execution raised command_id=%s command_type=%.100s",
            command.command_id, command.command_type, exc_info=exc,
        )
        return self._failed(
            command, f"{type(exc).__name__}: {_message(exc)}", ErrorCode.EXECUTOR_ERROR.value
        )

    def _final(self, command: CommandFrame, result: ResultFrame) -> tuple[ResultFrame, int]:
        """``result`` as it is remembered and sent, and its encoded size.

        Every result of an execution passes here the moment it exists (the
        agent's own fixed answers are small and need no check). The server would
        close the connection on a frame it cannot take (too large, or not
        JSON), and a remembered result is sent again after every reconnect,
        so such a result is replaced by a small failed one. What comes back
        is the frame decoded from its encoding, as the server will see it:
        the executor may keep, and change, the object it returned.
        """
        try:
            data = encode_frame(result)
            snapshot = decode_body(data[FRAME_HEADER_SIZE:])
        # Whatever the encoder meets (a mapping's own items() may raise
        # anything), or what the server's decoder would refuse.
        except Exception as exc:
            problem = self._failed(
                command, f"result is not JSON-serialisable: {exc}", ErrorCode.INVALID_RESULT.value
            )
        else:
            body = len(data) - FRAME_HEADER_SIZE  # the limit counts what follows the length
            if body <= self.max_result_bytes:
                return snapshot, len(data)
            problem = self._failed(
                command,
                f"result of {body} bytes exceeds the limit of {self.max_result_bytes}",
                ErrorCode.RESULT_TOO_LARGE.value,
            )
        return problem, len(encode_frame(problem))

    @staticmethod
    def _abandoned(command: CommandFrame) -> ResultFrame:
        # The execution ended without a result (its task was cancelled, or
        # the agent failed); the work may have run in part.
        return CommandHandler._failed(
            command, "the command's execution ended without a result", ErrorCode.AGENT_ERROR.value
        )

    @staticmethod
    def _failed(command: CommandFrame, error: str, error_code: str) -> ResultFrame:
        if len(error) > MAX_ERROR_CHARS:
            error = f"{error[:MAX_ERROR_CHARS]}… (truncated, {len(error)} characters in all)"
        return ResultFrame(
            command_id=command.command_id, status="failed", error=error, error_code=error_code
        )


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # the executor's own exception class may be broken
        return "<unreadable message>"


def _error_code(exc: Exception) -> str:
    """The executor's chosen error code, if the wire can carry it as one."""
    code = getattr(exc, "error_code", None)
    if isinstance(code, str) and 0 < len(code) <= MAX_ERROR_CODE_CHARS and code.isprintable():
        return code
    logger.warning(
        "Executor gave an error_code that is not 1 to %d printable characters; "
        "reporting executor_error instead error_code=%.100r",
        MAX_ERROR_CODE_CHARS, code,
    )
    return ErrorCode.EXECUTOR_ERROR.value
