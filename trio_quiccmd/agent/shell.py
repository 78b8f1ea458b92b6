"""The ``shell`` command type: run a program on the agent's machine.

Registered only when the agent is started with ``--allow-shell`` (anyone who
may send it commands can then run anything as the agent's user). Payload::

    {"argv": ["ls", "-l", "/tmp"]}          # run a program directly
    {"command": "df -h | sort"}             # or a line for /bin/sh -c
    ... optional "cwd": "/some/dir"

Result: ``{"exit_code": n, "stdout": "...", "stderr": "...", "truncated": bool}``.
A non-zero exit code is still a completed command (the program did run); a
program that cannot be started, or a ``cwd`` it cannot be started in, fails
the command (``executor_error``, the message naming which of the two).
A payload that is not one of the above, or whose strings hold a NUL
character (no program or path can), fails with ``invalid_payload``.
Output is decoded as UTF-8 (bad bytes replaced) and each stream is capped at
``max_output_bytes``; the program keeps running past the cap, its further
output is read and dropped. The program runs in a process group of its own;
when it exits, or the command is cancelled or times out, the whole group is
killed (SIGKILL): a background child (``sleep 300 &``) neither holds the
command open nor survives it. The child's environment is the agent's without
``QUICCMD_AGENT_*`` (so without the agent's token).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Any

import trio

from .executor import CommandFailed

logger = logging.getLogger("trio_quiccmd.agent")

#: Per stream (stdout, stderr), bytes kept of a shell command's output.
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024
#: Once the program has exited (and its process group is killed), at most
#: this long to read the output still buffered in the pipes.
OUTPUT_DRAIN_SECONDS = 1.0
#: After the kill, at most this long to wait for the program to be reaped.
REAP_SECONDS = 5.0


class ShellExecutor:
    """The ``shell`` handler; register its :meth:`run` on an ExecutorRegistry."""

    def __init__(self, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES):
        self.max_output_bytes = max_output_bytes

    async def run(self, payload: Any) -> dict[str, Any]:
        """Run the program and return its exit code and capped output.

        When the program exits, or on cancellation, its process group is
        killed (SIGKILL) and the program reaped before this returns or the
        cancellation propagates.
        """
        argv = _argv(payload)
        cwd = payload.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise CommandFailed("shell: cwd must be a string", "invalid_payload")
        if cwd is not None and "\0" in cwd:
            raise CommandFailed("shell: cwd must not contain a NUL character", "invalid_payload")
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

        try:
            process = await trio.lowlevel.open_process(
                argv,
                cwd=cwd,
                env=child_environment(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                # Its own process group, so what a shell line started in the
                # background can be killed with it.
                start_new_session=True,
            )
        except OSError as exc:
            reason = exc.strerror or exc
            # subprocess reports a failed chdir with the cwd as the filename;
            # "No such file or directory" otherwise blames the program. (When
            # the program has the same name, which failed is unknowable.)
            if cwd is not None and exc.filename == cwd and argv[0] != cwd:
                raise CommandFailed(f"shell: cannot use working directory {cwd!r}: {reason}") from None
            raise CommandFailed(f"shell: cannot start {argv[0]!r}: {reason}") from None
        try:
            async with trio.open_nursery() as nursery:
                readers_done = trio.Event()

                async def read_both() -> None:
                    async with trio.open_nursery() as readers:
                        readers.start_soon(collect, process.stdout, outputs[0])
                        readers.start_soon(collect, process.stderr, outputs[1])
                    readers_done.set()

                nursery.start_soon(read_both)
                await process.wait()
                # The program is done. Whatever it left running in the
                # background (``sleep 300 &``) goes with it: it would hold the
                # output pipes open and outlive the command. Then read what is
                # buffered, and stop soon even if something that escaped the
                # group (setsid) still holds a pipe.
                _kill_group(process.pid)
                with trio.move_on_after(OUTPUT_DRAIN_SECONDS):
                    await readers_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            # Every way out (cancel, timeout, an error): nothing of it survives.
            _kill_group(process.pid)
            # Shielded, but bounded: a child stuck in the kernel (D state,
            # a hung NFS mount) does not die even of SIGKILL, and must not
            # hold the agent's shutdown with it.
            with trio.move_on_after(REAP_SECONDS, shield=True) as reaping:
                await process.wait()
            if reaping.cancelled_caught:
                logger.warning(
                    "Shell command's program did not exit after SIGKILL pid=%d seconds=%g",
                    process.pid, REAP_SECONDS,
                )
            with trio.CancelScope(shield=True):
                for pipe in (process.stdout, process.stderr):
                    if pipe is not None:
                        await pipe.aclose()
        return {
            "exit_code": process.returncode,
            "stdout": outputs[0].decode("utf-8", errors="replace"),
            "stderr": outputs[1].decode("utf-8", errors="replace"),
            "truncated": truncated,
        }


def child_environment() -> dict[str, str]:
    """The agent's environment without its own settings (``QUICCMD_AGENT_*``,
    among them the agent token): a command must not learn the agent's secret."""
    return {k: v for k, v in os.environ.items() if not k.startswith("QUICCMD_AGENT_")}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone (PermissionError: macOS, for a group of zombies)


def _argv(payload: Any) -> list[str]:
    if not isinstance(payload, dict):
        raise CommandFailed('shell needs {"argv": [...]} or {"command": "..."}', "invalid_payload")
    argv, command = payload.get("argv"), payload.get("command")
    if (argv is None) == (command is None):
        raise CommandFailed('shell needs exactly one of "argv" and "command"', "invalid_payload")
    if command is not None:
        if not isinstance(command, str) or not command.strip():
            raise CommandFailed("shell: command must be a non-empty string", "invalid_payload")
        if "\0" in command:
            raise CommandFailed("shell: command must not contain a NUL character", "invalid_payload")
        return ["/bin/sh", "-c", command]
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise CommandFailed("shell: argv must be a non-empty array of strings", "invalid_payload")
    if any("\0" in a for a in argv):
        raise CommandFailed("shell: argv must not contain a NUL character", "invalid_payload")
    return list(argv)
