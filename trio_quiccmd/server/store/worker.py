"""A long-lived thread that runs one database connection's blocking calls for trio.

``trio.to_thread.run_sync`` hands each call to a pooled thread with its own
bookkeeping (a limiter, a context copy, naming the thread); the store makes
such a call for every commit, so at low load that hand-off cost more CPU than
the commit itself (about 125 µs against 80 µs for this queue, measured on the
2-core benchmark machine). One thread per connection also keeps the
connection's calls in order, one at a time, without a limiter.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Generic, TypeVar

import outcome
import trio

_T = TypeVar("_T")


class Job(Generic[_T]):
    """One call given to a :class:`ConnectionThread`."""

    def __init__(self, fn: Callable[..., _T], args: tuple[Any, ...], token: trio.lowlevel.TrioToken):
        self._fn = fn
        self._args = args
        self._token = token
        self._done = trio.Event()
        self._outcome: outcome.Outcome[_T] | None = None

    def __call__(self) -> None:
        self._outcome = outcome.capture(self._fn, *self._args)
        try:
            self._token.run_sync_soon(self._done.set)
        except trio.RunFinishedError:
            pass  # nobody is left to tell

    async def result(self) -> _T:
        """Its result, or its exception, once it has run."""
        await self._done.wait()
        assert self._outcome is not None
        return self._outcome.unwrap()


class ConnectionThread:
    """Runs jobs one at a time, in the order given, in a daemon thread."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` run in the thread: its result, or its exception.

        If cancelled, stops waiting at once: the job still runs (a disk that
        hangs must not hold a shutdown), later jobs wait behind it, and its
        outcome is dropped. Raises RuntimeError once :meth:`stop` was called
        (the job would never run).
        """
        return await self.submit(fn, *args).result()

    def submit(self, fn: Callable[..., _T], *args: Any) -> Job[_T]:
        """Queue ``fn(*args)`` at once; await its :meth:`Job.result` (or not)
        later. As :meth:`run` otherwise."""
        if self._stopped:
            raise RuntimeError(f"{self._thread.name} is stopped")
        job = Job(fn, args, trio.lowlevel.current_trio_token())
        self._jobs.put(job)
        return job

    def stop(self) -> None:
        """End the thread once the jobs given so far have run."""
        if not self._stopped:
            self._stopped = True
            self._jobs.put(None)
