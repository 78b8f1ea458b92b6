"""Where commands are kept: the ``Store`` protocol and its implementations.

The manager holds live (unfinished) commands in memory and is the authority
for them; it records every state change with :meth:`Store.save`, which must
not block the event loop. A durable store queues saves and commits them in
batches; :meth:`Store.flush` is the durability point.
"""

from __future__ import annotations

from typing import Protocol

import attrs
import trio

from ...model import Command, CommandStatus


class StoreError(Exception):
    """The command store cannot be opened or used (corrupt, locked, in use,
    newer schema). The message is one line, fit for an operator."""


@attrs.frozen(kw_only=True)
class CommandQuery:
    """Filters for listing commands, newest first."""

    client_id: str | None = None
    status: CommandStatus | None = None
    command_type: str | None = None
    #: Only commands created at or after this wall-clock time (seconds since
    #: the epoch, millisecond precision) ...
    created_after: float | None = None
    #: ... and strictly before this one.
    created_before: float | None = None
    limit: int = 100
    #: Return only commands older than this command id (from ``next_cursor``).
    cursor: str | None = None

    def id_range(self) -> tuple[str | None, str | None]:
        """The filters on time and cursor as bounds on the command id:
        ``(lowest id included, first id excluded)``.

        Command ids begin with their creation time in milliseconds (see
        :func:`~trio_quiccmd.model.new_command_id`), so a time range is an id
        range, which every store keeps in order.
        """
        low = None if self.created_after is None else id_time_prefix(self.created_after)
        high = None if self.created_before is None else id_time_prefix(self.created_before)
        if self.cursor is not None and (high is None or self.cursor < high):
            high = self.cursor
        return low, high


def id_time_prefix(at: float) -> str:
    """The smallest command id created at wall-clock time ``at`` or later."""
    # The tolerance keeps a time written to the millisecond (``...:00.123Z``,
    # as the API shows them) on its millisecond despite binary floating point.
    return f"{max(int(at * 1000 + 1e-3), 0):012x}"


@attrs.frozen
class CommandPage:
    commands: list[Command]
    #: Pass as ``cursor`` to get the next page; None on the last page.
    next_cursor: str | None


@attrs.frozen
class UnfinishedCommand:
    """An unfinished command as a durable store kept it, for recovery at start."""

    command: Command
    #: Wall-clock time (seconds since the epoch) the manager ends it at.
    deadline_at: float
    #: For an executing command, the agent instance it was sent to ("" if unknown).
    sent_to: str


class Store(Protocol):
    #: True if what is saved survives the process: the manager then leaves
    #: unfinished commands as they are at shutdown (they are recovered at the
    #: next start) instead of failing them.
    durable: bool

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The store's background work (committing saves), until cancelled;
        the manager using the store runs it. Returns at once if there is none."""

    @property
    def unwritten(self) -> int:
        """Changes saved and not yet committed (for a metric: a count that
        keeps rising means the store cannot write)."""

    def save(self, command: Command, *, deadline_at: float = 0.0, sent_to: str = "") -> None:
        """Record ``command``'s current state. Never blocks.

        For an unfinished command, ``deadline_at`` (wall clock) and
        ``sent_to`` (the agent instance an executing command went to) are what
        :meth:`unfinished` gives back after a restart.
        """

    async def flush(self) -> None:
        """Return once every earlier ``save`` is durable.

        If cancelled, the saves are still made; only the wait is abandoned.
        """

    async def get(self, command_id: str) -> Command | None:
        """The stored command, or None if unknown (or purged)."""

    async def list(self, query: CommandQuery) -> CommandPage:
        """Commands matching ``query``, newest first."""

    async def unfinished(self) -> list[UnfinishedCommand]:
        """The commands stored as pending or executing, oldest first (empty
        for a store that is not durable)."""

    async def purge(self, *, finished_before: float, keep_at_most: int) -> int:
        """Delete finished commands completed before ``finished_before`` and,
        beyond that, the oldest finished ones over ``keep_at_most``. Returns how
        many were deleted. Unfinished commands are never purged."""

    async def aclose(self) -> None:
        """Flush and release resources."""


from .memory import MemoryStore as MemoryStore  # noqa: E402

__all__ = [
    "CommandPage",
    "CommandQuery",
    "MemoryStore",
    "Store",
    "StoreError",
    "UnfinishedCommand",
    "id_time_prefix",
]
