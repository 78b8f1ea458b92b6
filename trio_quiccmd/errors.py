"""Errors the Python API raises to its callers (the HTTP API maps each to a status)."""

from __future__ import annotations

from .model import Command


class QuicCmdError(Exception):
    """Base class for errors an operator's request can run into."""

    #: A stable, machine-readable name (used as ``error.code`` over HTTP).
    code = "error"


class InvalidCommand(QuicCmdError, ValueError):
    """The command's fields are wrong (empty type, negative timeout, ...)."""

    code = "invalid_command"


class PayloadTooLarge(InvalidCommand):
    """The payload would not fit in one COMMAND frame an agent accepts."""

    code = "payload_too_large"


class CommandNotFound(QuicCmdError, LookupError):
    code = "not_found"

    def __init__(self, command_id: str):
        super().__init__(f"no command with id {command_id!r}")
        self.command_id = command_id


class CommandAlreadyFinished(QuicCmdError):
    """Cancel was asked of a command already in a terminal state."""

    code = "already_finished"

    def __init__(self, command: Command):
        super().__init__(
            f"command {command.command_id} already finished with status "
            f"{command.status.value}"
        )
        self.command = command


class ShuttingDown(QuicCmdError):
    """The server is draining and accepts no new commands."""

    code = "shutting_down"

    def __init__(self) -> None:
        super().__init__("the server is shutting down and accepts no new commands")


class LimitExceeded(QuicCmdError):
    """A server limit refused the command; nothing was created. Retry later."""

    code = "limit_exceeded"


class QueueFull(LimitExceeded):
    """The agent already has ``limit`` commands waiting in its queue."""

    code = "queue_full"

    def __init__(self, client_id: str, limit: int):
        super().__init__(
            f"agent {client_id} already has {limit} queued commands "
            f"(max_queued_per_agent); retry when its queue drains"
        )
        self.client_id = client_id
        self.limit = limit


class TooManyCommands(LimitExceeded):
    """The server already holds ``limit`` unfinished commands."""

    code = "too_many_commands"

    def __init__(self, limit: int):
        super().__init__(
            f"the server already has {limit} unfinished commands "
            f"(max_unfinished_commands); retry when some finish"
        )
        self.limit = limit


class Unauthorized(QuicCmdError):
    """No credential, or one the server does not know (HTTP 401)."""

    code = "unauthorized"


class Forbidden(QuicCmdError):
    """The credential is valid but lacks the role or the scope asked for (HTTP 403)."""

    code = "forbidden"


class CommandRefused(QuicCmdError):
    """The server's command policy refused the command; nothing was created or sent (HTTP 422)."""

    code = "command_refused"


class PolicyDenied(CommandRefused):
    """The policy does not allow this command type for this agent."""

    code = "policy_denied"

    def __init__(self, client_id: str, command_type: str, labels: dict[str, str]):
        shown = ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "no labels"
        super().__init__(
            f"command type {command_type!r} is not allowed for agent {client_id} ({shown})"
        )
        self.client_id = client_id
        self.command_type = command_type


class InvalidPayload(CommandRefused):
    """The payload does not match the JSON Schema configured for its command type."""

    code = "invalid_payload"


class StoreUnavailable(QuicCmdError):
    """The command store did not take a change in time (disk full, I/O
    errors, a lock held elsewhere). A command refused with it was not sent."""

    code = "store_unavailable"
