"""Where commands are kept: the ``Store`` protocol and its implementations.

The manager holds live (unfinished) commands in memory and is the authority
for them; it records every state change with :meth:`Store.save`, which must
not block the event loop. A durable store queues saves and commits them in
batches; :meth:`Store.flush` is the durability point.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from ...model import Command, CommandStatus


@attrs.frozen(kw_only=True)
class CommandQuery:
    """Filters for listing commands, newest first."""

    client_id: str | None = None
    status: CommandStatus | None = None
    command_type: str | None = None
    limit: int = 100
    #: Return only commands older than this command id (from ``next_cursor``).
    cursor: str | None = None


@attrs.frozen
class CommandPage:
    commands: list[Command]
    #: Pass as ``cursor`` to get the next page; None on the last page.
    next_cursor: str | None


class Store(Protocol):
    def save(self, command: Command) -> None:
        """Record ``command``'s current state. Never blocks."""

    async def flush(self) -> None:
        """Return once every earlier ``save`` is durable.

        If cancelled, the saves are still made; only the wait is abandoned.
        """

    async def get(self, command_id: str) -> Command | None:
        """The stored command, or None if unknown (or purged)."""

    async def list(self, query: CommandQuery) -> CommandPage:
        """Commands matching ``query``, newest first."""

    async def purge(self, *, finished_before: float, keep_at_most: int) -> int:
        """Delete finished commands completed before ``finished_before`` and,
        beyond that, the oldest finished ones over ``keep_at_most``. Returns how
        many were deleted. Unfinished commands are never purged."""

    async def aclose(self) -> None:
        """Flush and release resources."""


from .memory import MemoryStore as MemoryStore  # noqa: E402

__all__ = ["CommandPage", "CommandQuery", "MemoryStore", "Store"]
