"""trio_quiccmd: remote command dispatch over QUIC, with trio."""

from .agent import Agent as Agent
from .agent import AgentRejected as AgentRejected
from .agent import CommandExecutor as CommandExecutor
from .agent import CommandFailed as CommandFailed
from .agent import ExecutorRegistry as ExecutorRegistry
from .agent import ServerFingerprintMismatch as ServerFingerprintMismatch
from .agent import UnknownCommandType as UnknownCommandType
from .agent import builtin_executor as builtin_executor
from .errors import CommandAlreadyFinished as CommandAlreadyFinished
from .errors import CommandNotFound as CommandNotFound
from .errors import InvalidCommand as InvalidCommand
from .errors import LimitExceeded as LimitExceeded
from .errors import QueueFull as QueueFull
from .errors import QuicCmdError as QuicCmdError
from .errors import ShuttingDown as ShuttingDown
from .errors import TooManyCommands as TooManyCommands
from .model import Command as Command
from .model import CommandStatus as CommandStatus
from .model import ErrorCode as ErrorCode
from .server import CommandManager as CommandManager
from .server import CommandServer as CommandServer
from .server import ManagerSettings as ManagerSettings
from .server import MemoryStore as MemoryStore

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentRejected",
    "Command",
    "CommandAlreadyFinished",
    "CommandExecutor",
    "CommandFailed",
    "CommandManager",
    "CommandNotFound",
    "CommandServer",
    "CommandStatus",
    "ErrorCode",
    "ExecutorRegistry",
    "InvalidCommand",
    "LimitExceeded",
    "ManagerSettings",
    "MemoryStore",
    "QueueFull",
    "QuicCmdError",
    "ServerFingerprintMismatch",
    "ShuttingDown",
    "TooManyCommands",
    "UnknownCommandType",
    "builtin_executor",
]
