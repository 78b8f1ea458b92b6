"""Commands, their lifecycle and the error codes an operator sees.

This module is pure data and pure functions: no I/O, no trio. The manager
applies transitions; the store keeps the resulting snapshots.
"""

from __future__ import annotations

import datetime
import enum
import itertools
import os
import re
import time
from typing import Any

import attrs


class CommandStatus(str, enum.Enum):
    PENDING = "pending"
    EXECUTING = "executing"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {
        CommandStatus.COMPLETED,
        CommandStatus.FAILED,
        CommandStatus.TIMEOUT,
        CommandStatus.CANCELLED,
    }
)

#: Every allowed status change. Terminal states have no way out.
TRANSITIONS: dict[CommandStatus, frozenset[CommandStatus]] = {
    CommandStatus.PENDING: frozenset(
        {
            CommandStatus.EXECUTING,
            CommandStatus.FAILED,
            CommandStatus.TIMEOUT,
            CommandStatus.CANCELLED,
        }
    ),
    CommandStatus.EXECUTING: frozenset(
        {
            CommandStatus.COMPLETED,
            CommandStatus.FAILED,
            CommandStatus.TIMEOUT,
            CommandStatus.CANCELLED,
        }
    ),
    CommandStatus.COMPLETED: frozenset(),
    CommandStatus.FAILED: frozenset(),
    CommandStatus.TIMEOUT: frozenset(),
    CommandStatus.CANCELLED: frozenset(),
}


class ErrorCode(str, enum.Enum):
    """Machine-readable reasons a command did not complete."""

    #: The agent was not connected and the command did not ask to wait for it.
    AGENT_OFFLINE = "agent_offline"
    #: The command was never delivered before its deadline (agent offline or busy).
    DELIVERY_TIMEOUT = "delivery_timeout"
    #: The agent received the command but no result came back before the deadline.
    EXECUTION_TIMEOUT = "execution_timeout"
    #: The agent has no executor for this command type.
    UNKNOWN_COMMAND_TYPE = "unknown_command_type"
    #: The executor raised an exception.
    EXECUTOR_ERROR = "executor_error"
    #: An operator cancelled the command.
    CANCELLED = "cancelled"
    #: The server shut down before the command finished.
    SERVER_SHUTDOWN = "server_shutdown"
    #: The agent was shutting down: its grace period ended with the command
    #: still running, so it cancelled it (status ``cancelled``).
    AGENT_SHUTDOWN = "agent_shutdown"
    #: The agent was shutting down when the command arrived, and refused it
    #: without running it (status ``failed``).
    AGENT_SHUTTING_DOWN = "agent_shutting_down"
    #: The agent itself failed while handling the command (a bug, or a first
    #: execution abandoned at shutdown that a duplicate delivery attached to).
    AGENT_ERROR = "agent_error"
    #: The result is not JSON (or not encodable), so it cannot be sent.
    INVALID_RESULT = "invalid_result"
    #: The result does not fit in one frame.
    RESULT_TOO_LARGE = "result_too_large"
    #: The command ran, but its result was dropped from the agent's memory
    #: for space before a re-sent copy asked for it (it is not run again).
    RESULT_UNAVAILABLE = "result_unavailable"


class InvalidTransition(Exception):
    """A status change the lifecycle does not allow (e.g. out of a terminal state)."""

    def __init__(self, command_id: str, current: CommandStatus, wanted: CommandStatus):
        super().__init__(
            f"command {command_id} cannot go from {current.value} to {wanted.value}"
        )
        self.command_id = command_id
        self.current = current
        self.wanted = wanted


@attrs.frozen(kw_only=True)
class Command:
    """One command's state at one moment. Immutable: each change makes a new one.

    Timestamps are wall-clock seconds since the epoch (UTC); ``None`` until the
    event they record has happened.
    """

    command_id: str
    client_id: str
    command_type: str
    payload: Any = attrs.field(factory=dict)
    status: CommandStatus = CommandStatus.PENDING
    result: Any = None
    error: str | None = None
    error_code: str | None = None
    priority: int = 0
    timeout: float = 30.0
    connect_timeout: float = 0.0
    created_at: float
    sent_at: float | None = None
    completed_at: float | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


#: A command's priority is kept to a signed 32-bit range so every store can index it.
PRIORITY_RANGE = (-(2**31), 2**31 - 1)


def transition(
    command: Command,
    status: CommandStatus,
    *,
    at: float,
    result: Any = None,
    error: str | None = None,
    error_code: str | None = None,
) -> Command:
    """Return ``command`` moved to ``status`` at wall-clock time ``at``.

    Raises :class:`InvalidTransition` if the lifecycle forbids the change, so a
    late result can never overwrite a timeout, a cancel, or another result.
    """
    if status not in TRANSITIONS[command.status]:
        raise InvalidTransition(command.command_id, command.status, status)
    if isinstance(error_code, enum.Enum):
        error_code = error_code.value
    executing = status is CommandStatus.EXECUTING
    # Spelled out rather than attrs.evolve, which costs several times more and
    # runs twice for every command.
    return Command(
        command_id=command.command_id,
        client_id=command.client_id,
        command_type=command.command_type,
        payload=command.payload,
        status=status,
        result=command.result if executing else result,
        error=command.error if executing else error,
        error_code=command.error_code if executing else error_code,
        priority=command.priority,
        timeout=command.timeout,
        connect_timeout=command.connect_timeout,
        created_at=command.created_at,
        sent_at=at if executing else command.sent_at,
        completed_at=None if executing else at,
    )


#: What new_command_id makes (a page of the command list names the next by one).
COMMAND_ID_PATTERN = re.compile(r"[0-9a-f]{12}-[0-9a-f]{8}-[0-9a-f]{8}", re.ASCII)
#: RFC 3339's date-time (any number of fraction digits: fromisoformat keeps six).
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)


def parse_rfc3339(text: str) -> float | None:
    """An RFC 3339 date-time with an offset, as the API writes and takes
    them, in epoch seconds; None if ``text`` is not one."""
    # fromisoformat also takes forms RFC 3339 does not (week dates, basic
    # format, a comma): only RFC 3339's own shape is handed to it.
    if not _RFC3339.fullmatch(text):
        return None
    try:
        return datetime.datetime.fromisoformat(text.upper()).timestamp()  # RFC 3339 allows "t" and "z"
    except ValueError:  # a month 13, a day 31 in November
        return None


_sequence = itertools.count()
_process_tag = int.from_bytes(os.urandom(4), "big")
_last_millis = 0


def new_command_id(created_at: float | None = None) -> str:
    """A unique id whose lexical order is creation order within one server.

    48 bits of milliseconds (of ``created_at``, default now), then a
    per-process counter and a random process tag: listing "newest first" is
    then a plain descending sort on the id, which every store can index, and
    a range of creation times is a range of ids.
    """
    global _last_millis
    at = time.time() if created_at is None else created_at
    # Never step back with the wall clock (NTP, resume), or a newer id would sort older.
    millis = max(int(at * 1000) & 0xFFFF_FFFF_FFFF, _last_millis)
    _last_millis = millis
    counter = next(_sequence) & 0xFFFF_FFFF
    return f"{millis:012x}-{counter:08x}-{_process_tag:08x}"
