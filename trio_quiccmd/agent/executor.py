"""What an agent can do: the ``CommandExecutor`` protocol, a registry of
handlers, and the built-in command types.
"""

from __future__ import annotations

import inspect
import math
import os
import platform
import socket
import sys
import time
from typing import Any, Awaitable, Callable, Protocol, TypeVar, Union, runtime_checkable

import trio

from ..model import ErrorCode


@runtime_checkable
class CommandExecutor(Protocol):
    """Runs one command and returns its result (anything JSON can carry).

    The seed's interface: ``execute(command_type, payload) -> result``. Raise
    :class:`UnknownCommandType` for a type you do not handle, and any other
    exception to fail the command with its message. The result is encoded as
    soon as the call returns: changing the object afterwards changes nothing
    sent. The call runs in the agent's nursery and is cancelled if the
    operator cancels the command or its deadline passes.
    """

    async def execute(self, command_type: str, payload: Any) -> Any: ...


class UnknownCommandType(Exception):
    error_code = ErrorCode.UNKNOWN_COMMAND_TYPE.value

    def __init__(self, command_type: str):
        super().__init__(f"unknown command type {command_type!r}")
        self.command_type = command_type


class CommandFailed(Exception):
    """Raise from a handler to fail a command with a specific ``error_code``.

    The code must be 1 to 128 printable characters, or the command fails
    with ``executor_error`` instead; a message longer than 4,096 characters
    is cut (see :mod:`~trio_quiccmd.agent.handler`).
    """

    def __init__(self, message: str, error_code: str = ErrorCode.EXECUTOR_ERROR.value):
        super().__init__(message)
        self.error_code = error_code


Handler = Union[Callable[[Any], Awaitable[Any]], Callable[[Any], Any]]
H = TypeVar("H", bound=Handler)


class ExecutorRegistry:
    """A :class:`CommandExecutor` built from one handler per command type.

    ``async def`` handlers run on the agent's trio loop. Plain functions run in
    a worker thread so they cannot stall the connection; if their command is
    cancelled the agent stops waiting for them at once, but Python cannot stop
    the thread itself, which runs to completion with its result discarded.
    """

    def __init__(self, *, max_threads: int = 64) -> None:
        self._handlers: dict[str, tuple[Handler, bool]] = {}
        # Our own limiter, not trio's shared default of 40: a thread abandoned
        # by a timed-out command keeps its token until it really ends, and
        # must not starve the rest of the program's threads.
        self._threads = trio.CapacityLimiter(max_threads)

    def register(self, command_type: str, handler: H | None = None) -> Any:
        """Register ``handler(payload) -> result`` for ``command_type``.

        Use directly, or as a decorator: ``@registry.register("restart")``.
        """
        def add(func: H) -> H:
            self._handlers[command_type] = (func, inspect.iscoroutinefunction(func))
            return func

        return add if handler is None else add(handler)

    @property
    def command_types(self) -> list[str]:
        return sorted(self._handlers)

    async def execute(self, command_type: str, payload: Any) -> Any:
        try:
            handler, is_async = self._handlers[command_type]
        except KeyError:
            raise UnknownCommandType(command_type) from None
        if is_async:
            return await handler(payload)
        return await trio.to_thread.run_sync(
            handler, payload, abandon_on_cancel=True, limiter=self._threads
        )


# -- built-in command types ----------------------------------------------------

async def echo(payload: Any) -> Any:
    """Return the payload unchanged."""
    return payload


async def sleep(payload: Any) -> Any:
    """``{"seconds": n}``: sleep n seconds (cancellable), return ``{"slept": n}``."""
    seconds = payload.get("seconds") if isinstance(payload, dict) else None
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or seconds < 0
    ):
        raise CommandFailed('sleep needs {"seconds": <non-negative number>}', "invalid_payload")
    await trio.sleep(seconds)
    return {"slept": seconds}


async def fail(payload: Any) -> Any:
    """``{"message": m}``: fail with message m."""
    message = payload.get("message") if isinstance(payload, dict) else None
    raise CommandFailed(str(message) if message is not None else "failed on request")


def sysinfo(payload: Any) -> Any:
    """Facts about the agent's machine."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "pid": os.getpid(),
        "time": time.time(),
    }


def builtin_executor() -> ExecutorRegistry:
    """A registry with ``echo``, ``sleep``, ``fail`` and ``sysinfo``; add your own to it."""
    registry = ExecutorRegistry()
    registry.register("echo", echo)
    registry.register("sleep", sleep)
    registry.register("fail", fail)
    registry.register("sysinfo", sysinfo)
    return registry
