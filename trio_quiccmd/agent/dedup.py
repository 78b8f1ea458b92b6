"""What the agent remembers across deliveries and connections.

* :class:`RecentCommands` -- ids of commands this agent finished recently, with
  their results, so a COMMAND delivered again (re-sent by the server after a
  reconnect) is answered with the stored result instead of running twice.
* :class:`ResultOutbox` -- results that could not be sent because the
  connection that carried their command was gone; they are listed in
  ``hello.held_results`` and delivered after the next WELCOME.

Both are plain bounded data structures: no I/O, no tasks. Time comes from
``clock`` (``trio.current_time`` by default, so tests run on a virtual clock).
See docs/protocol.md, "Reconnects".
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import OrderedDict
from typing import Callable

import trio

from ..model import ErrorCode
from ..wire import ResultFrame, encode_frame

logger = logging.getLogger("trio_quiccmd.agent")

#: Commands remembered at most (ids; results are bounded by bytes separately).
DEFAULT_MAX_REMEMBERED = 10_000
#: A finished command is remembered at least this long (seconds), and at
#: least as long as its own timeout.
DEFAULT_REMEMBER_FOR = 600.0
#: Bytes of results the memory of finished commands holds at most; beyond it
#: the oldest results are dropped but their ids are kept.
DEFAULT_REMEMBERED_RESULT_BYTES = 64 << 20
#: Results the outbox holds at most, and their bytes at most.
DEFAULT_MAX_HELD_RESULTS = 1_000
DEFAULT_HELD_RESULT_BYTES = 64 << 20

#: Error code of the answer to a command that already ran here but whose
#: result was dropped for space.
RESULT_UNAVAILABLE = ErrorCode.RESULT_UNAVAILABLE.value

#: Seconds between two warnings about commands forgotten for space.
_WARN_INTERVAL = 60.0


def result_size(result: ResultFrame) -> int:
    """Bytes ``result`` takes on the wire (a cheap estimate when it holds no value)."""
    if result.result is None:
        return (
            64
            + len(result.command_id)
            + len(result.error or "")
            + len(result.error_code or "")
        )
    return len(encode_frame(result))


class _Finished:
    __slots__ = ("result", "size", "expires_at", "needed_until")

    def __init__(self, result: ResultFrame, size: int, expires_at: float, needed_until: float):
        self.result = result
        self.size = size
        self.expires_at = expires_at
        # Until then the server may still re-send the command (its deadline
        # is at most ``timeout`` after the agent got it).
        self.needed_until = needed_until


class RecentCommands:
    """Finished commands by id, for at-most-once execution.

    An entry is kept ``max(timeout, remember_for)`` seconds after the command
    finished: the server re-sends a command only before its deadline (at most
    ``timeout`` after the agent first got it), so within that time a re-sent
    command is always recognised. At most ``max_entries`` ids are kept: past
    that, ids whose time is up go first, then those whose ``timeout`` passes
    soonest (with a warning if the server could still re-send them, i.e.
    more than ``max_entries`` finished commands are still within their
    timeouts); results beyond ``max_result_bytes`` in total are dropped
    oldest first, keeping the id: such a command is then answered
    ``failed`` / ``result_unavailable`` instead of being run again.
    """

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_REMEMBERED,
        remember_for: float = DEFAULT_REMEMBER_FOR,
        max_result_bytes: int = DEFAULT_REMEMBERED_RESULT_BYTES,
        clock: Callable[[], float] = trio.current_time,
    ):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.remember_for = remember_for
        self.max_result_bytes = max_result_bytes
        self._clock = clock
        self._entries: dict[str, _Finished] = {}
        # Finishing order says nothing about when an entry expires (timeouts
        # range up to a day), so expiry and eviction each keep a heap:
        # (expires_at | needed_until, tie-break, id, entry). An item whose
        # entry is no longer the id's current one is stale and skipped.
        self._by_expiry: list[tuple[float, int, str, _Finished]] = []
        self._by_need: list[tuple[float, int, str, _Finished]] = []
        # Equal times go oldest first, and the entry itself is never compared.
        self._sequence = itertools.count()
        # Ids whose entry still holds its result, oldest first.
        self._with_result: OrderedDict[str, None] = OrderedDict()
        self._bytes = 0
        #: Ids forgotten for space while the server could still re-send them
        #: (at-most-once no longer guaranteed for them).
        self.evicted_early = 0
        self._warned_at = -float("inf")

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, command_id: str) -> bool:
        return self.get(command_id) is not None

    @property
    def result_bytes(self) -> int:
        return self._bytes

    def get(self, command_id: str) -> ResultFrame | None:
        """The stored answer for ``command_id``, or None if it is not remembered."""
        entry = self._entries.get(command_id)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            self._drop(command_id)
            return None
        return entry.result

    def remember(
        self, result: ResultFrame, *, timeout: float = 0.0, size: int | None = None
    ) -> None:
        """Store ``result`` as the answer to its command, for ``max(timeout, remember_for)`` s."""
        command_id = result.command_id
        now = self._clock()
        if command_id in self._entries:
            self._drop(command_id)
        if size is None:
            size = result_size(result)
        entry = _Finished(result, size, now + max(timeout, self.remember_for), now + timeout)
        self._entries[command_id] = entry
        seq = next(self._sequence)
        heapq.heappush(self._by_expiry, (entry.expires_at, seq, command_id, entry))
        heapq.heappush(self._by_need, (entry.needed_until, seq, command_id, entry))
        self._with_result[command_id] = None
        self._bytes += size
        self._prune(now)

    def _drop(self, command_id: str) -> None:
        entry = self._entries.pop(command_id)
        self._with_result.pop(command_id, None)
        self._bytes -= entry.size  # 0 once its result was dropped

    def _is_current(self, command_id: str, entry: _Finished) -> bool:
        return self._entries.get(command_id) is entry

    def _prune(self, now: float) -> None:
        entries = self._entries
        # Everything expired goes before anything is evicted for space: the
        # count bound must never cost a command that can still be re-sent its
        # place while expired ones hold theirs.
        by_expiry = self._by_expiry
        while by_expiry and by_expiry[0][0] <= now:
            _, _, command_id, entry = heapq.heappop(by_expiry)
            if self._is_current(command_id, entry):
                self._drop(command_id)
        # The nearest deadline goes first: the server stops being able to
        # re-send it soonest, and one already past it is no loss at all.
        while len(entries) > self.max_entries:
            _, _, command_id, entry = heapq.heappop(self._by_need)
            if not self._is_current(command_id, entry):
                continue
            self._drop(command_id)
            if entry.needed_until <= now:
                continue
            self.evicted_early += 1
            if now - self._warned_at >= _WARN_INTERVAL:
                self._warned_at = now
                logger.warning(
                    "Forgot a finished command before its deadline: more than %d commands "
                    "finished within their timeouts; if re-sent, it would run again "
                    "command_id=%s forgotten_so_far=%d",
                    self.max_entries, command_id, self.evicted_early,
                )
        while self._bytes > self.max_result_bytes and self._with_result:
            command_id, _ = self._with_result.popitem(last=False)
            entry = entries[command_id]
            self._bytes -= entry.size
            entry.result = ResultFrame(
                command_id=command_id,
                status="failed",
                error="the command already ran on this agent; its result is no longer held",
                error_code=RESULT_UNAVAILABLE,
            )
            entry.size = 0
        # An entry dropped one way (expiry, eviction, get(), remembered
        # again) leaves stale items behind in the heaps; rebuilding a heap
        # once they outnumber the live ones keeps it within about twice the
        # entries, at O(1) amortised cost per command.
        if len(self._by_expiry) > 2 * len(entries) + 64:
            self._by_expiry = self._live(self._by_expiry)
        if len(self._by_need) > 2 * len(entries) + 64:
            self._by_need = self._live(self._by_need)

    def _live(
        self, heap: list[tuple[float, int, str, _Finished]]
    ) -> list[tuple[float, int, str, _Finished]]:
        live = [item for item in heap if self._is_current(item[2], item[3])]
        heapq.heapify(live)
        return live


class _Held:
    __slots__ = ("result", "size", "expires_at")

    def __init__(self, result: ResultFrame, size: int, expires_at: float):
        self.result = result
        self.size = size
        self.expires_at = expires_at


class ResultOutbox:
    """Results waiting for a connection, oldest first, bounded.

    A result is held until the server acknowledges it or its command's
    deadline passes (the server then no longer waits for it). Beyond
    ``max_results`` results or ``max_bytes`` bytes the oldest is dropped, with
    a warning: the server then still gets the result if it re-sends the
    command (answered from :class:`RecentCommands`), else the command ends
    ``execution_timeout``.
    """

    def __init__(
        self,
        *,
        max_results: int = DEFAULT_MAX_HELD_RESULTS,
        max_bytes: int = DEFAULT_HELD_RESULT_BYTES,
        clock: Callable[[], float] = trio.current_time,
    ):
        if max_results < 1:
            raise ValueError("max_results must be at least 1")
        self.max_results = max_results
        self.max_bytes = max_bytes
        self._clock = clock
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._bytes = 0
        #: Results dropped for space, and expired before delivery.
        self.dropped = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, command_id: str) -> bool:
        return command_id in self._held

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def add(self, result: ResultFrame, *, expires_at: float, size: int | None = None) -> None:
        """Hold ``result`` until :meth:`remove` or ``expires_at`` (clock time)."""
        command_id = result.command_id
        self.remove(command_id)
        if size is None:
            size = result_size(result)
        self._held[command_id] = _Held(result, size, expires_at)
        self._bytes += size
        self._expire()
        while len(self._held) > 1 and (
            len(self._held) > self.max_results or self._bytes > self.max_bytes
        ):
            dropped_id, held = self._held.popitem(last=False)
            self._bytes -= held.size
            self.dropped += 1
            logger.warning(
                "Held result dropped: the outbox is full command_id=%s held=%d bytes=%d",
                dropped_id, len(self._held), self._bytes,
            )

    def remove(self, command_id: str) -> bool:
        """Forget ``command_id``'s result (the server has it); False if not held."""
        held = self._held.pop(command_id, None)
        if held is None:
            return False
        self._bytes -= held.size
        return True

    def results(self) -> list[ResultFrame]:
        """The held results still worth delivering, oldest first."""
        self._expire()
        return [held.result for held in self._held.values()]

    def ids(self) -> list[str]:
        """Ids of the held results, oldest first (for ``hello.held_results``)."""
        self._expire()
        return list(self._held)

    def _expire(self) -> None:
        now = self._clock()
        for command_id in [cid for cid, held in self._held.items() if held.expires_at <= now]:
            self.remove(command_id)
            self.expired += 1
            logger.info(
                "Held result expired undelivered (the server no longer waits for it) "
                "command_id=%s",
                command_id,
            )
