"""The ``shell`` command type: run a program on the agent's machine.

Registered only when the agent is started with ``--allow-shell`` (anyone who
may send it commands can then run anything as the agent's user). Payload::

    {"argv": ["ls", "-l", "/tmp"]}          # run a program directly
    {"command": "df -h | sort"}             # or a line for /bin/sh -c
    ... optional "cwd": "/some/dir"

Result: ``{"exit_code": n, "stdout": "...", "stderr": "...", "truncated": bool}``.
A non-zero exit code is still a completed command (the program did run); a
program that cannot be started fails the command (``executor_error``).
Output is decoded as UTF-8 (bad bytes replaced) and each stream is capped at
``max_output_bytes``; the program keeps running past the cap, its further
output is read and dropped. Cancelling the command (or its timeout) kills the
program's whole process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import trio

from .executor import CommandFailed

#: Per stream (stdout, stderr), bytes kept of a shell command's output.
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024


class ShellExecutor:
    """The ``shell`` handler; register its :meth:`run` on an ExecutorRegistry."""

    def __init__(self, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES):
        self.max_output_bytes = max_output_bytes

    async def run(self, payload: Any) -> dict[str, Any]:
        """Run the program and return its exit code and capped output.

        Cancellation kills the program's process group (SIGKILL) and waits for
        it to exit before the cancellation propagates.
        """
        argv = _argv(payload)
        cwd = payload.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise CommandFailed("shell: cwd must be a string", "invalid_payload")
        outputs = [bytearray(), bytearray()]
        truncated = False

        async def collect(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
            nonlocal truncated
            async for chunk in stream:
                room = self.max_output_bytes - len(into)
                if len(chunk) > room:
                    truncated = True
                if room > 0:
                    into += chunk[:room]

        failure: OSError | None = None
        async with trio.open_nursery() as nursery:
            try:
                process: trio.Process = await nursery.start(
                    lambda task_status: trio.run_process(
                        argv,
                        cwd=cwd,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        check=False,
                        # Its own process group, so a cancel kills what a
                        # shell line started too, not just /bin/sh.
                        start_new_session=True,
                        deliver_cancel=_kill_group,
                        task_status=task_status,
                    )
                )
            except OSError as exc:
                failure = exc  # raised below, not wrapped in the nursery's group
            else:
                nursery.start_soon(collect, process.stdout, outputs[0])
                nursery.start_soon(collect, process.stderr, outputs[1])
        if failure is not None:
            raise CommandFailed(f"shell: cannot start {argv[0]!r}: {failure.strerror or failure}")
        return {
            "exit_code": process.returncode,
            "stdout": outputs[0].decode("utf-8", errors="replace"),
            "stderr": outputs[1].decode("utf-8", errors="replace"),
            "truncated": truncated,
        }


async def _kill_group(process: trio.Process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone


def _argv(payload: Any) -> list[str]:
    if not isinstance(payload, dict):
        raise CommandFailed('shell needs {"argv": [...]} or {"command": "..."}', "invalid_payload")
    argv, command = payload.get("argv"), payload.get("command")
    if (argv is None) == (command is None):
        raise CommandFailed('shell needs exactly one of "argv" and "command"', "invalid_payload")
    if command is not None:
        if not isinstance(command, str) or not command.strip():
            raise CommandFailed("shell: command must be a non-empty string", "invalid_payload")
        return ["/bin/sh", "-c", command]
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise CommandFailed("shell: argv must be a non-empty array of strings", "invalid_payload")
    return list(argv)
