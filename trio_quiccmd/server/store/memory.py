"""The in-memory store: fast, and gone when the process exits."""

from __future__ import annotations

from itertools import islice, takewhile

import trio

from ...model import Command
from . import CommandPage, CommandQuery, UnfinishedCommand, id_time_prefix


class MemoryStore:
    durable = False

    def __init__(self) -> None:
        # Insertion order is creation order (ids are created in order), so
        # "newest first" is a reversed walk.
        self._commands: dict[str, Command] = {}
        # The finished commands' completion times, for retention.
        self._finished: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._commands)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()  # nothing to do in the background

    #: Nothing waits to be written in memory.
    unwritten = 0

    def save(self, command: Command, *, deadline_at: float = 0.0, sent_to: str = "") -> None:
        self._commands[command.command_id] = command
        if command.is_terminal and command.command_id not in self._finished:
            self._finished[command.command_id] = command.completed_at or 0.0

    async def flush(self) -> None:
        return None

    async def get(self, command_id: str) -> Command | None:
        return self._commands.get(command_id)

    async def list(self, query: CommandQuery) -> CommandPage:
        matches: list[Command] = []
        limit = query.limit
        low, high = query.id_range()
        for command in reversed(self._commands.values()):
            command_id = command.command_id
            if high is not None and command_id >= high:
                continue
            if low is not None and command_id < low:
                break  # newest first: every later one is older still
            if query.client_id is not None and command.client_id != query.client_id:
                continue
            if query.status is not None and command.status is not query.status:
                continue
            if query.command_type is not None and command.command_type != query.command_type:
                continue
            if len(matches) == limit:
                return CommandPage(matches, matches[-1].command_id)
            matches.append(command)
        return CommandPage(matches, None)

    async def unfinished(self) -> list[UnfinishedCommand]:
        # Nothing here outlives the process, so there is never anything to recover.
        return []

    async def purge(self, *, finished_before: float, keep_at_most: int) -> int:
        # As the SQLite store does: by age, then the oldest created (not the
        # first finished) beyond the count. A command finishes after it is
        # created, so those finished before the cutoff were created before
        # it: a walk from the oldest that stops there.
        finished = self._finished
        created_before = id_time_prefix(finished_before)
        by_age = [
            command_id
            for command_id in takewhile(lambda command_id: command_id < created_before, self._commands)
            if command_id in finished and finished[command_id] < finished_before
        ]
        self._delete(by_age)
        over = max(len(finished) - keep_at_most, 0)
        by_count = list(islice(filter(finished.__contains__, self._commands), over))
        self._delete(by_count)
        return len(by_age) + len(by_count)

    def _delete(self, command_ids: list[str]) -> None:
        for command_id in command_ids:
            del self._commands[command_id]
            del self._finished[command_id]

    async def aclose(self) -> None:
        return None
