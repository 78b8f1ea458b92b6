"""The server side: command manager, agent registry, stores, QUIC endpoint."""

from .audit import AuditLog as AuditLog
from .auth import AgentAuthenticator as AgentAuthenticator
from .auth import ApiAuthenticator as ApiAuthenticator
from .core import CommandServer as CommandServer
from .core import server_quic_configuration as server_quic_configuration
from .manager import CommandManager as CommandManager
from .manager import ManagerSettings as ManagerSettings
from .policy import AllowRule as AllowRule
from .policy import CommandPolicy as CommandPolicy
from .registry import ClientInfo as ClientInfo
from .store import CommandPage as CommandPage
from .store import CommandQuery as CommandQuery
from .store import MemoryStore as MemoryStore
from .store import Store as Store
from .store import StoreError as StoreError
from .store.sqlite import SqliteStore as SqliteStore
from .store.sqlite import open_sqlite_store as open_sqlite_store
