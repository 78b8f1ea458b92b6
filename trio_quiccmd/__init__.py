"""trio_quiccmd: remote command dispatch over QUIC, with trio."""

from .agent import Agent as Agent
from .agent import AgentRejected as AgentRejected
from .agent import AgentUnauthorized as AgentUnauthorized
from .agent import CommandExecutor as CommandExecutor
from .agent import CommandFailed as CommandFailed
from .agent import ExecutorRegistry as ExecutorRegistry
from .agent import ServerFingerprintMismatch as ServerFingerprintMismatch
from .agent import UnknownCommandType as UnknownCommandType
from .agent import builtin_executor as builtin_executor
from .errors import CommandAlreadyFinished as CommandAlreadyFinished
from .errors import CommandNotFound as CommandNotFound
from .errors import CommandRefused as CommandRefused
from .errors import Forbidden as Forbidden
from .errors import InvalidCommand as InvalidCommand
from .errors import InvalidPayload as InvalidPayload
from .errors import LimitExceeded as LimitExceeded
from .errors import PayloadTooLarge as PayloadTooLarge
from .errors import PolicyDenied as PolicyDenied
from .errors import QueueFull as QueueFull
from .errors import QuicCmdError as QuicCmdError
from .errors import ShuttingDown as ShuttingDown
from .errors import StoreUnavailable as StoreUnavailable
from .errors import TooManyCommands as TooManyCommands
from .errors import Unauthorized as Unauthorized
from .model import Command as Command
from .model import CommandStatus as CommandStatus
from .model import ErrorCode as ErrorCode
from .server import CommandManager as CommandManager
from .server import CommandServer as CommandServer
from .server import ManagerSettings as ManagerSettings
from .server import MemoryStore as MemoryStore
from .server import SqliteStore as SqliteStore
from .server import open_sqlite_store as open_sqlite_store

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentRejected",
    "AgentUnauthorized",
    "Command",
    "CommandAlreadyFinished",
    "CommandExecutor",
    "CommandFailed",
    "CommandManager",
    "CommandNotFound",
    "CommandRefused",
    "CommandServer",
    "CommandStatus",
    "ErrorCode",
    "ExecutorRegistry",
    "Forbidden",
    "InvalidCommand",
    "InvalidPayload",
    "LimitExceeded",
    "ManagerSettings",
    "MemoryStore",
    "PayloadTooLarge",
    "PolicyDenied",
    "QueueFull",
    "QuicCmdError",
    "ServerFingerprintMismatch",
    "ShuttingDown",
    "SqliteStore",
    "StoreUnavailable",
    "TooManyCommands",
    "Unauthorized",
    "UnknownCommandType",
    "builtin_executor",
    "open_sqlite_store",
]
