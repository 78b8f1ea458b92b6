"""Credentials on disk: agent tokens, operator (API) tokens, the development credential.

A token is a random secret with a recognisable prefix (``qca_`` agent,
``qce_`` enrollment, ``qcd_`` development, ``qco_`` operator). Only its SHA-256
is stored: the secrets are 256 random bits, so a fast hash is enough (nothing
to brute-force), and a stolen token file lets no one in.

Two JSON files in the server's data dir, each written atomically (a temporary
file renamed over the old one) with mode 0600:

* ``agent_tokens.json``: one token per ``client_id`` (with labels the server
  asserts for that agent), and at most one enrollment token;
* ``api_tokens.json``: operator tokens by name, each with a role and optional
  restrictions.

The server reads them and notices changes (:class:`WatchedFile`), so
``python -m trio_quiccmd.server token create ...`` works on a running server.
The development agent credential is a plain file, ``agent-dev-token``, that a
server writes so an agent started from the same directory can read it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, TypeVar

import attrs

logger = logging.getLogger("trio_quiccmd.tokens")

AGENT_TOKENS_FILE = "agent_tokens.json"
API_TOKENS_FILE = "api_tokens.json"
DEV_AGENT_TOKEN_FILE = "agent-dev-token"

AGENT_PREFIX = "qca_"
ENROLLMENT_PREFIX = "qce_"
DEV_PREFIX = "qcd_"
API_PREFIX = "qco_"

ROLES = ("read", "operate")

_FORMAT_VERSION = 1
_NAME_RE = re.compile(r"[A-Za-z0-9._@:-]{1,256}")


class TokenFileError(ValueError):
    """A token file is unreadable or malformed. ``str()`` is one line naming the file."""


class TokenExists(ValueError):
    """A token was to be issued for a name that has one, without ``replace``."""


def new_token(prefix: str) -> str:
    """A fresh secret: ``prefix`` + 43 characters of URL-safe base64 (256 bits)."""
    return prefix + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """``sha256:<hex>`` of a token, as the files store it."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def hashes_equal(stored: str, presented: str) -> bool:
    """Constant-time comparison of two stored-form hashes."""
    return hmac.compare_digest(stored.encode("ascii", "replace"), presented.encode("ascii", "replace"))


def check_name(name: str, what: str) -> str:
    """A client_id or token name: 1-256 characters of ``A-Za-z0-9._@:-``."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"{what} {name!r} must be 1-256 characters of letters, digits and . _ @ : -")
    return name


# What the loaders accept; the issue_* functions check the same before they
# write, so that a token command cannot write a file the server refuses.


def _is_labels(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _is_command_type(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _check_text(value: str, what: str) -> None:
    # A command-line argument that is not UTF-8 arrives with lone surrogates:
    # JSON stores them, but nothing can print them (``token list`` would crash).
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {value!r} is not valid UTF-8 text") from None


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels to bind to a token, as a token file may hold them. Raises ValueError."""
    if not _is_labels(labels):
        raise ValueError(f"labels {labels!r} must map strings to strings")
    for key, value in labels.items():
        _check_text(key, "label")
        _check_text(value, f"label {key}'s value")
    return dict(labels)


def check_command_types(command_types: Iterable[str]) -> tuple[str, ...]:
    """Command types to restrict a token to, as a token file may hold them. Raises ValueError."""
    if isinstance(command_types, str):  # would be taken letter by letter
        raise ValueError(f"command types {command_types!r} must be a list of strings, not a string")
    checked = tuple(command_types)
    for command_type in checked:
        if not _is_command_type(command_type):
            raise ValueError(f"command type {command_type!r} must be a non-empty string")
        _check_text(command_type, "command type")
    return checked


def _now() -> str:
    moment = datetime.datetime.now(datetime.timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


# -- records -------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class AgentTokenRecord:
    client_id: str
    hash: str
    #: Labels the server asserts for this agent, replacing the ones its HELLO
    #: claims; None: the agent's own labels are taken as they come.
    labels: Mapping[str, str] | None = None
    created_at: str = ""


@attrs.frozen(kw_only=True)
class AgentTokens:
    agents: Mapping[str, AgentTokenRecord] = attrs.field(factory=dict)
    enrollment_hash: str | None = None
    enrollment_created_at: str | None = None
    # hash -> client_id, for naming the owner of a misused token in the log.
    # A dict lookup, not a scan: a bad HELLO must cost the same with 100,000
    # agents as with one. (It is keyed by the SHA-256 of what the peer sent,
    # so its timing tells the peer nothing about any secret.)
    _owners: dict[str, str] = attrs.field(init=False, factory=dict, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._owners.update((record.hash, record.client_id) for record in self.agents.values())

    @property
    def configured(self) -> bool:
        """Whether any agent credential was issued (then the dev credential is refused)."""
        return bool(self.agents) or self.enrollment_hash is not None

    def owner_of(self, presented_hash: str) -> str | None:
        """The client_id whose token has this hash (for log lines only)."""
        return self._owners.get(presented_hash)


@attrs.frozen(kw_only=True)
class ApiTokenRecord:
    name: str
    hash: str
    role: str
    #: Command types this token may send and cancel; None: any.
    command_types: tuple[str, ...] | None = None
    #: Agents this token may send to and cancel on: those whose labels
    #: include all of these; None: any agent.
    labels: Mapping[str, str] | None = None
    created_at: str = ""


@attrs.frozen(kw_only=True)
class ApiTokens:
    tokens: Mapping[str, ApiTokenRecord] = attrs.field(factory=dict)

    def find(self, presented_hash: str) -> ApiTokenRecord | None:
        """The record with this hash. Every record is compared (no early exit)."""
        found = None
        for record in self.tokens.values():
            if hashes_equal(record.hash, presented_hash):
                found = record
        return found


# -- reading and writing -----------------------------------------------------------------


def _document(data: bytes, path: Path) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError included
        raise TokenFileError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("version") != _FORMAT_VERSION:
        raise TokenFileError(f"{path}: not a version {_FORMAT_VERSION} token file")
    return document


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TokenFileError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    return _document(data, path)


def _check_own_file(st: os.stat_result, path: Path) -> None:
    """Refuse anything at ``path`` but a regular file with no other name: a
    token command may run as root in a directory another user owns, who
    could have linked a file from anywhere there."""
    if not stat.S_ISREG(st.st_mode):
        raise TokenFileError(f"{path}: not a regular file; a token command uses only a regular file there")
    if st.st_nlink != 1:
        raise TokenFileError(
            f"{path}: has {st.st_nlink} hard links (it is also a file elsewhere); a token command "
            "uses only a file of the data dir's own: copy it to a new file of that name"
        )


def _read_json_at(dir_fd: int, path: Path) -> dict[str, Any] | None:
    """As :func:`_read_json`, for a token command: the file named ``path`` in
    the directory ``dir_fd``, never through a link (see :func:`_check_own_file`)."""
    try:
        # O_NONBLOCK: opening a FIFO planted there must not hang the command.
        fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TokenFileError(
                f"{path}: a symbolic link; a token command does not follow links in the data dir: "
                "replace it by the file itself"
            ) from None
        raise TokenFileError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    with open(fd, "rb") as f:
        _check_own_file(os.fstat(f.fileno()), path)
        data = f.read()
    return _document(data, path)


def _labels(value: Any, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not _is_labels(value):
        raise TokenFileError(f"{where}: labels must be an object of strings")
    return dict(value)


def _hash_field(value: Any, where: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
        raise TokenFileError(f"{where}: hash must be sha256:<64 hex digits>")
    return value


def _agent_tokens(document: dict[str, Any] | None, path: Path) -> AgentTokens:
    if document is None:
        return AgentTokens()
    agents: dict[str, AgentTokenRecord] = {}
    raw_agents = document.get("agents", {})
    if not isinstance(raw_agents, dict):
        raise TokenFileError(f"{path}: 'agents' must be an object")
    for client_id, raw in raw_agents.items():
        where = f"{path}: agent {client_id!r}"
        if not isinstance(raw, dict):
            raise TokenFileError(f"{where}: must be an object")
        agents[client_id] = AgentTokenRecord(
            client_id=client_id,
            hash=_hash_field(raw.get("hash"), where),
            labels=_labels(raw.get("labels"), where),
            created_at=str(raw.get("created_at", "")),
        )
    enrollment = document.get("enrollment")
    if enrollment is not None and not isinstance(enrollment, dict):
        raise TokenFileError(f"{path}: 'enrollment' must be an object or null")
    return AgentTokens(
        agents=agents,
        enrollment_hash=_hash_field(enrollment.get("hash"), f"{path}: enrollment") if enrollment else None,
        enrollment_created_at=str(enrollment.get("created_at", "")) if enrollment else None,
    )


def _api_tokens(document: dict[str, Any] | None, path: Path) -> ApiTokens:
    if document is None:
        return ApiTokens()
    raw_tokens = document.get("tokens", {})
    if not isinstance(raw_tokens, dict):
        raise TokenFileError(f"{path}: 'tokens' must be an object")
    tokens: dict[str, ApiTokenRecord] = {}
    for name, raw in raw_tokens.items():
        where = f"{path}: token {name!r}"
        if not isinstance(raw, dict):
            raise TokenFileError(f"{where}: must be an object")
        role = raw.get("role")
        if role not in ROLES:
            raise TokenFileError(f"{where}: role must be one of {', '.join(ROLES)}")
        types = raw.get("command_types")
        if types is not None and (not isinstance(types, list) or not all(map(_is_command_type, types))):
            raise TokenFileError(f"{where}: command_types must be a list of strings")
        tokens[name] = ApiTokenRecord(
            name=name,
            hash=_hash_field(raw.get("hash"), where),
            role=role,
            command_types=tuple(types) if types is not None else None,
            labels=_labels(raw.get("labels"), where),
            created_at=str(raw.get("created_at", "")),
        )
    return ApiTokens(tokens=tokens)


def load_agent_tokens(path: Path) -> AgentTokens:
    """The agent tokens in ``path``; empty if it does not exist. Raises TokenFileError."""
    return _agent_tokens(_read_json(path), path)


def load_api_tokens(path: Path) -> ApiTokens:
    """The operator tokens in ``path``; empty if it does not exist. Raises TokenFileError."""
    return _api_tokens(_read_json(path), path)


def _open_directory(path: Path, *, create: bool) -> int:
    if create:
        # It holds credentials: only its owner, the server's user, reads it.
        # (An existing directory keeps its mode.)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _read_in(data_dir: Path, name: str) -> dict[str, Any] | None:
    try:
        dir_fd = _open_directory(data_dir, create=False)
    except FileNotFoundError:
        return None
    try:
        return _read_json_at(dir_fd, data_dir / name)
    finally:
        os.close(dir_fd)


def list_agent_tokens(data_dir: Path) -> AgentTokens:
    """The data dir's agent tokens, read as a token command reads them (never
    through a link). Raises TokenFileError."""
    return _agent_tokens(_read_in(data_dir, AGENT_TOKENS_FILE), data_dir / AGENT_TOKENS_FILE)


def list_api_tokens(data_dir: Path) -> ApiTokens:
    """The data dir's operator tokens, read as a token command reads them. Raises TokenFileError."""
    return _api_tokens(_read_in(data_dir, API_TOKENS_FILE), data_dir / API_TOKENS_FILE)


def _keep_owner(fd: int, dir_fd: int, path: Path) -> None:
    """Give the new file ``fd`` the owner of the file ``path`` it replaces
    (in the directory ``dir_fd``) or, for a new one, of the directory: the
    server, often another user than whoever runs the CLI (root, by sudo),
    must still be able to read it. Raises PermissionError if we may not."""
    reference = path
    try:
        st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        # A link is replaced, not kept: the owner of the file it leads to
        # (anyone's) is not the server's.
        reference, st = path.parent, os.fstat(dir_fd)
    if (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid()):
        return
    try:
        os.fchown(fd, st.st_uid, st.st_gid)
    except PermissionError:
        raise PermissionError(
            f"{path}: the new file would belong to uid {os.geteuid()}, but {reference} belongs to "
            f"uid {st.st_uid} (the server's user, who must be able to read it); run this command "
            "as that user (or as root)"
        ) from None


def write_at(dir_fd: int, path: Path, text: str, *, mode: int = 0o600) -> None:
    """Write ``text`` to ``path``, a file in the open directory ``dir_fd``, as
    :func:`write_private` does; ``mode`` for a file others may read."""
    # O_CREAT | O_EXCL never follows a link: the file is a new one, ours, so
    # it is the only one given an owner below.
    temporary = f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            _keep_owner(f.fileno(), dir_fd, path)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=dir_fd)
        raise


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600, owned by whoever
    owned the file before (see :func:`_keep_owner`): readers see the old file
    or the new one, never half of one. A link at ``path`` is replaced, never
    written through. Creates the directory (0700) if missing."""
    dir_fd = _open_directory(path.parent, create=True)
    try:
        write_at(dir_fd, path, text)
    finally:
        os.close(dir_fd)


def _agent_document(tokens: AgentTokens) -> str:
    document: dict[str, Any] = {
        "version": _FORMAT_VERSION,
        "agents": {
            record.client_id: {
                "hash": record.hash,
                "labels": dict(record.labels) if record.labels is not None else None,
                "created_at": record.created_at,
            }
            for record in sorted(tokens.agents.values(), key=lambda r: r.client_id)
        },
        "enrollment": (
            {"hash": tokens.enrollment_hash, "created_at": tokens.enrollment_created_at}
            if tokens.enrollment_hash is not None
            else None
        ),
    }
    return json.dumps(document, indent=2) + "\n"


def _api_document(tokens: ApiTokens) -> str:
    document = {
        "version": _FORMAT_VERSION,
        "tokens": {
            record.name: {
                "hash": record.hash,
                "role": record.role,
                "command_types": list(record.command_types) if record.command_types is not None else None,
                "labels": dict(record.labels) if record.labels is not None else None,
                "created_at": record.created_at,
            }
            for record in sorted(tokens.tokens.values(), key=lambda r: r.name)
        },
    }
    return json.dumps(document, indent=2) + "\n"


@contextlib.contextmanager
def locked_data_dir(data_dir: Path) -> Iterator[int]:
    """The data dir, open (its descriptor) and locked for a read-modify-write
    of a token file (two CLI invocations at once must not lose each other's
    token), or for making the development certificate (two servers starting
    at once must not write a key and a certificate of different pairs).

    The lock is on the directory itself, not on a lock file in it: its owner
    (the server's user) could make such a file a link to any file, which a
    CLI run as root would open. Files are then named relative to the
    descriptor, so the directory cannot be swapped under the command either.
    """
    dir_fd = _open_directory(data_dir, create=True)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        yield dir_fd
    finally:
        os.close(dir_fd)


# -- issuing (what the CLI does) -----------------------------------------------------------


def issue_agent_token(
    data_dir: Path, client_id: str, *, labels: Mapping[str, str] | None = None, replace: bool = False
) -> str:
    """Create the token of ``client_id``; returns the secret (not stored anywhere).

    Raises ValueError for a bad ``client_id`` or label (before anything is
    written), TokenExists if it already has one and ``replace`` is false. A
    replaced token keeps its bound labels unless ``labels`` are given.
    """
    check_name(client_id, "client_id")
    if labels is not None:
        labels = check_labels(labels)
    path = data_dir / AGENT_TOKENS_FILE
    with locked_data_dir(data_dir) as dir_fd:
        tokens = _agent_tokens(_read_json_at(dir_fd, path), path)
        if client_id in tokens.agents and not replace:
            raise TokenExists(f"{client_id} already has a token (use --replace to issue a new one)")
        secret = new_token(AGENT_PREFIX)
        agents = dict(tokens.agents)
        if labels is None and client_id in agents:
            labels = agents[client_id].labels
        agents[client_id] = AgentTokenRecord(
            client_id=client_id, hash=token_hash(secret),
            labels=dict(labels) if labels else None, created_at=_now(),
        )
        write_at(dir_fd, path, _agent_document(attrs.evolve(tokens, agents=agents)))
    return secret


def revoke_agent_token(data_dir: Path, client_id: str) -> None:
    """Remove the token of ``client_id``. Raises KeyError if it has none."""
    path = data_dir / AGENT_TOKENS_FILE
    with locked_data_dir(data_dir) as dir_fd:
        tokens = _agent_tokens(_read_json_at(dir_fd, path), path)
        if client_id not in tokens.agents:
            raise KeyError(client_id)
        agents = {k: v for k, v in tokens.agents.items() if k != client_id}
        write_at(dir_fd, path, _agent_document(attrs.evolve(tokens, agents=agents)))


def issue_enrollment_token(data_dir: Path) -> str:
    """Create (or replace) the enrollment token; returns the secret."""
    path = data_dir / AGENT_TOKENS_FILE
    with locked_data_dir(data_dir) as dir_fd:
        tokens = _agent_tokens(_read_json_at(dir_fd, path), path)
        secret = new_token(ENROLLMENT_PREFIX)
        tokens = attrs.evolve(tokens, enrollment_hash=token_hash(secret), enrollment_created_at=_now())
        write_at(dir_fd, path, _agent_document(tokens))
    return secret


def revoke_enrollment_token(data_dir: Path) -> bool:
    """Remove the enrollment token; False if there was none."""
    path = data_dir / AGENT_TOKENS_FILE
    with locked_data_dir(data_dir) as dir_fd:
        tokens = _agent_tokens(_read_json_at(dir_fd, path), path)
        if tokens.enrollment_hash is None:
            return False
        tokens = attrs.evolve(tokens, enrollment_hash=None, enrollment_created_at=None)
        write_at(dir_fd, path, _agent_document(tokens))
    return True


def issue_api_token(
    data_dir: Path,
    name: str,
    *,
    role: str | None = None,
    command_types: Iterable[str] | None = None,
    labels: Mapping[str, str] | None = None,
    replace: bool = False,
) -> str:
    """Create the operator token ``name``; returns the secret.

    Raises ValueError for a bad argument (before anything is written),
    TokenExists if the token exists and ``replace`` is false. A replaced
    token keeps its role and scope (command types, labels) unless they are
    given: rotating a restricted token must not widen it. A new token needs a
    ``role``.
    """
    check_name(name, "token name")
    if role is not None and role not in ROLES:
        raise ValueError(f"role {role!r} must be one of {', '.join(ROLES)}")
    if command_types is not None:
        command_types = check_command_types(command_types)
    if labels is not None:
        labels = check_labels(labels)
    path = data_dir / API_TOKENS_FILE
    with locked_data_dir(data_dir) as dir_fd:
        tokens = _api_tokens(_read_json_at(dir_fd, path), path)
        old = tokens.tokens.get(name)
        if old is not None and not replace:
            raise TokenExists(f"an API token named {name} exists (use --replace to issue a new one)")
        if old is not None:
            role = old.role if role is None else role
            command_types = old.command_types if command_types is None else command_types
            labels = old.labels if labels is None else labels
        elif role is None:
            raise ValueError(f"there is no API token named {name} to keep the role of: give its --role")
        secret = new_token(API_PREFIX)
        records = dict(tokens.tokens)
        records[name] = ApiTokenRecord(
            name=name, hash=token_hash(secret), role=role,
            command_types=tuple(command_types) if command_types else None,
            labels=dict(labels) if labels else None, created_at=_now(),
        )
        write_at(dir_fd, path, _api_document(ApiTokens(tokens=records)))
    return secret


def revoke_api_token(data_dir: Path, name: str) -> None:
    """Remove the operator token ``name``. Raises KeyError if there is none."""
    path = data_dir / API_TOKENS_FILE
    with locked_data_dir(data_dir) as dir_fd:
        tokens = _api_tokens(_read_json_at(dir_fd, path), path)
        if name not in tokens.tokens:
            raise KeyError(name)
        records = {k: v for k, v in tokens.tokens.items() if k != name}
        write_at(dir_fd, path, _api_document(ApiTokens(tokens=records)))


# -- the development credential ---------------------------------------------------------------


def ensure_dev_agent_token(data_dir: Path) -> tuple[Path, str, bool]:
    """The data dir's development agent credential, created if missing.

    Returns (path, token, created). Written 0600, like the dev key.
    """
    path = data_dir / DEV_AGENT_TOKEN_FILE
    try:
        token = read_token_file(path)
        return path, token, False
    except FileNotFoundError:
        pass
    except ValueError:  # empty (a truncated write, a hand edit): a new one, said loudly
        logger.warning("Development credential file is empty, writing a new one path=%s", path)
    token = new_token(DEV_PREFIX)
    write_private(path, token + "\n")
    return path, token, True


def read_token_file(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace dropped). Raises OSError,
    or ValueError if the file is empty."""
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"{path} is empty")
    return token


# -- noticing changes ---------------------------------------------------------------------------

T = TypeVar("T")


class WatchedFile(Generic[T]):
    """A file parsed by ``load``, parsed again when it changes on disk.

    A change is a new (inode, size, mtime, ctime) -- a rename over the file,
    as :func:`write_private` does, always makes one, and so does a chown. If
    the new contents cannot be read or do not parse, the last good ones stay
    in force and a CRITICAL line says revocations are not applied (once per
    version); every refresh tries again: a typo in a hand edit must not lock
    the whole fleet out, nor may a fix go unnoticed.
    """

    def __init__(self, path: Path, load: Callable[[Path], T]):
        self.path = path
        self._load = load
        self._stamp: tuple[int, int, int, int] | None = None
        #: The stamp of a version that failed to load (its error is logged once).
        self._failed_stamp: tuple[int, int, int, int] | None = None
        # The stamp before the contents: a change written while they are read
        # must look new to the next refresh, not be taken for what was read.
        self._stamp = self._current_stamp()
        # Raises TokenFileError at start: a server must not start on a broken file.
        self._value: T = load(path)
        #: Counts reloads, so each of several readers can tell it missed one.
        self.generation = 0

    def _current_stamp(self) -> tuple[int, int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        # ctime too: a chown or chmod that makes the file readable is a change.
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @property
    def value(self) -> T:
        return self._value

    def refresh(self) -> bool:
        """Re-read the file if it changed; True if the value changed."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return False
        try:
            value = self._load(self.path)
        except TokenFileError as exc:
            # The stamp is not recorded: the next refresh tries again, so the
            # file is taken up as soon as it is fixed, whatever fixes it.
            if stamp != self._failed_stamp:
                self._failed_stamp = stamp
                logger.critical(
                    "Token file changed but cannot be loaded: the previous tokens stay in force, so "
                    "revocations and new tokens in it are NOT applied until it is fixed path=%s error=%r",
                    self.path, str(exc),
                )
            return False
        self._failed_stamp = None
        self._stamp = stamp
        self._value = value
        self.generation += 1
        logger.info("Token file reloaded path=%s", self.path)
        return True
