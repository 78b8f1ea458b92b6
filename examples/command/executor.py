"""An example executor: the command types one agent knows how to run.

The seed's ``CommandExecutor`` was one ``Execute(commandType, payload)`` method
with a ``switch``. In trio_quiccmd the usual way is an :class:`ExecutorRegistry`
with one handler per command type:

* ``async def`` handlers run on the agent's trio loop and are cancelled the
  moment the operator cancels the command or its deadline passes;
* plain ``def`` handlers run in a worker thread, so slow blocking work (disk,
  subprocesses, hashing) never stalls the connection.

Raise :class:`CommandFailed` to fail a command with your own ``error_code``;
any other exception fails it with ``executor_error``. Whatever a handler
returns (anything JSON can carry) is the command's ``result``.

:class:`SeedStyleExecutor` at the bottom shows the other way, the seed's
single-method interface, for people who prefer it.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import trio

from trio_quiccmd import CommandFailed, ExecutorRegistry, UnknownCommandType, builtin_executor

#: Largest file ``file_checksum`` will read (bytes).
MAX_CHECKSUM_BYTES = 1 << 30


def _number(payload: Any, key: str, default: float, *, maximum: float) -> float:
    value = payload.get(key, default) if isinstance(payload, dict) else default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= maximum
    ):
        raise CommandFailed(f"{key} must be a number from 0 to {maximum}", "invalid_payload")
    return float(value)


def _string(payload: Any, key: str, default: str | None = None) -> str:
    value = payload.get(key, default) if isinstance(payload, dict) else default
    if not isinstance(value, str) or not value:
        raise CommandFailed(f'payload needs "{key}": a non-empty string', "invalid_payload")
    return value


async def restart(payload: Any) -> dict[str, Any]:
    """``{"service": "nginx", "delay_seconds": 5}``: a simulated service restart.

    Waits ``delay_seconds`` (cancellable: cancel the command and the restart
    never "happens"), then reports success. The seed's example command.
    """
    service = _string(payload, "service", "app")
    delay = _number(payload, "delay_seconds", 0, maximum=3600)
    started = time.time()
    await trio.sleep(delay)
    return {
        "success": True,
        "service": service,
        "delay_seconds": delay,
        "restarted_at": time.time(),
        "took_seconds": round(time.time() - started, 3),
    }


def disk_usage(payload: Any) -> dict[str, Any]:
    """``{"path": "/"}``: total, used and free bytes of the file system holding path.

    A plain function: it runs in a worker thread.
    """
    path = _string(payload, "path", "/")
    try:
        usage = shutil.disk_usage(path)
    except FileNotFoundError:
        raise CommandFailed(f"no such path: {path}", "not_found") from None
    return {
        "path": path,
        "total": usage.total,
        "used": usage.used,
        "free": usage.free,
        "percent_used": round(100 * usage.used / usage.total, 1) if usage.total else 0.0,
    }


def file_checksum(payload: Any) -> dict[str, Any]:
    """``{"path": "/etc/hostname"}``: the SHA-256 of a file, read in a worker thread."""
    path = Path(_string(payload, "path"))
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise CommandFailed(f"not a regular file: {path}", "invalid_payload")
        if size > MAX_CHECKSUM_BYTES:
            raise CommandFailed(f"{path} is larger than {MAX_CHECKSUM_BYTES} bytes", "too_large")
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        raise CommandFailed(f"no such file: {path}", "not_found") from None
    except PermissionError:
        raise CommandFailed(f"permission denied: {path}", "permission_denied") from None
    return {"path": str(path), "size": size, "sha256": digest.hexdigest()}


async def uptime(payload: Any) -> dict[str, Any]:
    """The agent process's and the machine's uptime, in seconds."""
    result: dict[str, Any] = {"process_seconds": round(time.monotonic() - _STARTED, 3)}
    try:
        result["system_seconds"] = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        result["system_seconds"] = None
    result["pid"] = os.getpid()
    return result


_STARTED = time.monotonic()


def build_registry() -> ExecutorRegistry:
    """The built-in commands (echo, sleep, fail, sysinfo) plus this example's own."""
    registry = builtin_executor()
    registry.register("restart", restart)
    registry.register("disk_usage", disk_usage)
    registry.register("file_checksum", file_checksum)
    registry.register("uptime", uptime)
    return registry


class SeedStyleExecutor:
    """The seed's shape: one ``execute(command_type, payload)`` with a switch.

    Anything with this method is a :class:`trio_quiccmd.CommandExecutor`; pass
    an instance as ``Agent(..., executor=SeedStyleExecutor())``.
    """

    async def execute(self, command_type: str, payload: Any) -> Any:
        match command_type:
            case "restart":
                return await restart(payload)
            case "disk_usage":
                return await trio.to_thread.run_sync(disk_usage, payload)
            case _:
                raise UnknownCommandType(command_type)
