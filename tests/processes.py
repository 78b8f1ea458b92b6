"""Real subprocesses for the tests: spawn ``python -m ...`` and wait on what it prints."""

from __future__ import annotations

import os
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import AsyncIterator

import trio

REPO = Path(__file__).resolve().parent.parent


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment minus any QUICCMD_* setting, with this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUICCMD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ProcessEnded(AssertionError):
    """The process's output ended before the line waited for appeared."""


class Lines:
    """What a subprocess writes to one pipe, line by line, with a wake-up per chunk."""

    def __init__(self, name: str = "output") -> None:
        self.name = name
        self.lines: list[str] = []
        self.closed = trio.Event()
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        try:
            async for chunk in stream:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                self.lines += [line.decode(errors="replace") for line in complete]
                self._wake()
        finally:
            if pending:
                self.lines.append(pending.decode(errors="replace"))
            self.closed.set()
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def matching(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]

    async def wait_for(self, text: str, count: int = 1, *, after: int = 0) -> str:
        """The ``count``-th line containing ``text`` (among lines from index ``after``)."""
        while len(found := [line for line in self.lines[after:] if text in line]) < count:
            if self.closed.is_set():
                raise ProcessEnded(f"{self.name} ended before {count} x {text!r}:\n{self}")
            await self._changed.wait()
        return found[count - 1]

    def __str__(self) -> str:
        return "\n".join(self.lines)


@asynccontextmanager
async def spawn(
    argv: list[str], *, cwd: Path, env: dict[str, str] | None = None, name: str = "process"
) -> AsyncIterator[SimpleNamespace]:
    """Run ``argv`` in ``cwd``; yields process, stdout and stderr. Killed on exit if still running."""
    process = await trio.lowlevel.open_process(
        argv,
        cwd=str(cwd),
        env=clean_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = Lines(f"{name} stdout"), Lines(f"{name} stderr")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(out.pump, process.stdout)
        nursery.start_soon(err.pump, process.stderr)
        try:
            yield SimpleNamespace(process=process, stdout=out, stderr=err)
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
