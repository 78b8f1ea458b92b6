"""The agent side: connect out to a server and run the commands it sends."""

from .client import Agent as Agent
from .client import AgentRejected as AgentRejected
from .client import AgentUnauthorized as AgentUnauthorized
from .client import ServerFingerprintMismatch as ServerFingerprintMismatch
from .executor import CommandExecutor as CommandExecutor
from .executor import CommandFailed as CommandFailed
from .executor import ExecutorRegistry as ExecutorRegistry
from .executor import UnknownCommandType as UnknownCommandType
from .executor import builtin_executor as builtin_executor
from .handler import CommandHandler as CommandHandler
