"""Server settings: command-line flags > ``QUICCMD_*`` environment > TOML file > defaults.

Every option has one name, used in all three places: ``shutdown_grace`` is
``--shutdown-grace``, ``QUICCMD_SHUTDOWN_GRACE`` and ``shutdown_grace = 10`` in
the TOML file. Values are checked as they are read, and a bad one raises
:class:`ConfigError` with a one-line message that says where it came from
(the CLI prints it and exits 2; never a traceback).
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import tomllib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import attrs

from .quic.admission import DEFAULT_MAX_HANDSHAKES
from .quic.connection import format_address
from .server.policy import CommandPolicy, parse_policy

ENV_PREFIX = "QUICCMD_"

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: A command's timeout can never be asked beyond this (one week); a larger
#: ``max_timeout`` setting is a typo, not a policy.
ABSOLUTE_MAX_TIMEOUT = 7 * 24 * 3600.0


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range. ``str()`` is one line."""


# -- value parsers (shared by flags, environment and TOML) -----------------------


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port). Port 0 means "pick one"."""
    if not isinstance(text, str):
        raise ValueError(f"expected HOST:PORT as a string, got {_describe(text)}")
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"{text!r} is not [IPv6]:PORT")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {text!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
        if ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:8080")
    if not host:
        raise ValueError(f"{text!r} has no host (use 0.0.0.0 or [::] for every interface)")
    return host, _port(port_text, text)


def format_host_port(host: str, port: int) -> str:
    """The inverse of :func:`parse_host_port` (brackets around IPv6 hosts)."""
    return format_address((host, port))


def _port(port_text: str, whole: str) -> int:
    if not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"port {port_text!r} in {whole!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} in {whole!r} is out of range 0-65535")
    return port


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _number(value: Any) -> float:
    # bool is an int in Python; "true" seconds is a mistake, not 1.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {_describe(value)}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {_describe(value)}")
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_describe(value)}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {_describe(value)}")
    return value.strip()


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {_describe(value)}")


def _log_level(value: Any) -> str:
    level = _string(value).upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def _path(value: Any) -> Path:
    return Path(os.path.expanduser(_string(value)))


# -- attrs validators ------------------------------------------------------------


STORE_SYNC_MODES = ("full", "normal")


def parse_store(value: Any) -> str:
    """``memory``, ``sqlite`` (the file ``commands.db`` in the data dir), or
    ``sqlite:///relative/path.db`` / ``sqlite:////absolute/path.db`` (the
    SQLAlchemy spelling: the path is what follows the third slash)."""
    text = _string(value).strip()
    if text in ("memory", "sqlite"):
        return text
    if text.startswith("sqlite:///") and len(text) > len("sqlite:///"):
        return text
    raise ValueError(
        f"store must be 'memory', 'sqlite' or 'sqlite:///PATH', got {_describe(value)}"
    )


def _store_sync(value: Any) -> str:
    text = _string(value).strip().lower()
    if text not in STORE_SYNC_MODES:
        raise ValueError(f"store_sync must be 'full' or 'normal', got {_describe(value)}")
    return text


def _positive(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be greater than 0, got {value!r}")


def _not_negative(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be 0 or more, got {value!r}")


def _valid_port(_inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be 0-65535, got {value!r}")


def _at_least(limit: float) -> Callable[[Any, attrs.Attribute, float], None]:
    def check(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
        if not value >= limit:
            raise ValueError(f"{attribute.name} must be at least {limit:g}, got {value!r}")

    return check


def _at_most(limit: float) -> Callable[[Any, attrs.Attribute, float], None]:
    def check(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
        if value > limit:
            raise ValueError(f"{attribute.name} must be at most {limit:g}, got {value!r}")

    return check


@attrs.frozen(kw_only=True)
class ServerSettings:
    """Everything ``python -m trio_quiccmd.server`` can be told.

    Construct it directly to embed the server (validation runs here too), or
    with :func:`load_settings` to honour flags, environment and a TOML file.
    """

    http_host: str = "127.0.0.1"
    http_port: int = attrs.field(default=8080, validator=_valid_port)
    quic_host: str = "0.0.0.0"
    quic_port: int = attrs.field(default=8474, validator=_valid_port)
    #: Holds the development certificate and the default command store.
    data_dir: Path = attrs.field(default=Path(".quiccmd"), converter=Path)
    #: Where commands are kept: see :func:`parse_store`.
    store: str = attrs.field(default="sqlite", converter=parse_store)
    #: ``full``: a stored command survives a power loss; ``normal``: only a
    #: crash of the server process (no fsync per commit).
    store_sync: str = attrs.field(default="full", converter=_store_sync)
    log_level: str = attrs.field(default="INFO", converter=str.upper, validator=attrs.validators.in_(LOG_LEVELS))
    #: A real certificate and key; without them a self-signed one is made in data_dir.
    cert_file: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    key_file: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    #: Seconds in-flight commands get to finish after SIGINT/SIGTERM.
    shutdown_grace: float = attrs.field(default=10.0, validator=[_not_negative, _at_most(3600)])
    #: Largest HTTP request body (so the largest command payload), bytes.
    max_payload_bytes: int = attrs.field(
        default=1 << 20, validator=[_positive, _at_most(64 << 20)]
    )
    #: ``timeout`` of a command that does not give one, seconds: any a
    #: command could give itself (a short one shows at once, as timeouts).
    default_timeout: float = attrs.field(default=30.0, validator=_positive)
    #: Largest ``timeout`` / ``connect_timeout`` (and ``?wait=``) accepted, seconds.
    max_timeout: float = attrs.field(
        default=24 * 3600.0, validator=[_positive, _at_most(ABSOLUTE_MAX_TIMEOUT)]
    )
    #: Commands open at once on one agent; more wait in its queue.
    max_in_flight_per_agent: int = attrs.field(default=256, validator=[_positive, _at_most(100_000)])
    #: Finished commands are kept this many seconds: at least a minute, so a
    #: result is still there for a client that polls for it ...
    history_retention: float = attrs.field(default=24 * 3600.0, validator=_at_least(60))
    #: ... and at most this many of them.
    max_history: int = attrs.field(default=100_000, validator=_positive)
    #: A QUIC connection silent this long is closed, seconds. Agents send a
    #: keepalive every third of it; below a second a connection would not
    #: outlast a few lost packets, or even its handshake on a slow link.
    idle_timeout: float = attrs.field(default=30.0, validator=[_at_least(1), _at_most(3600)])
    #: Pending commands one agent may have queued; more are refused (HTTP 429 queue_full).
    max_queued_per_agent: int = attrs.field(default=10_000, validator=[_positive, _at_most(10_000_000)])
    #: Unfinished commands on the server; more are refused (HTTP 429 too_many_commands).
    max_unfinished_commands: int = attrs.field(
        default=1_000_000, validator=[_positive, _at_most(100_000_000)]
    )
    #: Connected agents; a HELLO from one more is closed with TOO_MANY_AGENTS.
    max_agents: int = attrs.field(default=100_000, validator=[_positive, _at_most(10_000_000)])
    #: HELLOs accepted per second (bursts of one second's worth); more are
    #: closed with RATE_LIMITED.
    max_hello_rate: float = attrs.field(default=200.0, validator=[_positive, _at_most(1_000_000)])
    #: QUIC handshakes in progress at once; beyond that a new connection must
    #: prove its address (Retry) and may wait (see quic/admission.py).
    max_handshakes: int = attrs.field(default=DEFAULT_MAX_HANDSHAKES, validator=[_positive, _at_most(10_000)])
    #: Once this many agents are connected, their state is kept out of the
    #: garbage collector's full collections (see server/collector.py); 0: never.
    gc_freeze_agents: int = attrs.field(default=1000, validator=[_not_negative, _at_most(10_000_000)])
    #: Ask for an API bearer token on loopback too (off loopback it always is).
    require_api_token: bool = False
    #: Serve the HTTP API off loopback with no API token configured (not advised).
    allow_unauthenticated_http: bool = False
    #: Which command types agents may get, and payload schemas ([policy] in the TOML file).
    policy: CommandPolicy = attrs.field(factory=CommandPolicy)

    def __attrs_post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        if self.default_timeout > self.max_timeout:
            raise ValueError(
                f"default_timeout ({self.default_timeout:g}) must not exceed "
                f"max_timeout ({self.max_timeout:g})"
            )

    @property
    def store_path(self) -> Path | None:
        """The SQLite file commands are kept in, or None for the memory store."""
        if self.store == "memory":
            return None
        if self.store == "sqlite":
            return self.data_dir / "commands.db"
        return Path(os.path.expanduser(self.store[len("sqlite:///"):]))

    @property
    def http_address(self) -> str:
        return format_host_port(self.http_host, self.http_port)

    @property
    def quic_address(self) -> str:
        return format_host_port(self.quic_host, self.quic_port)


# -- one table of options: what each is called where, and how it is parsed -------


@attrs.frozen
class _Option:
    name: str  # TOML key; flag is --name-with-dashes; env is QUICCMD_NAME
    parse: Callable[[Any], Any]
    help: str
    metavar: str | None = None
    #: A flag without a value (it means true); the variable and key take true/false.
    switch: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


_OPTIONS: tuple[_Option, ...] = (
    _Option("http", parse_host_port, "HTTP API address (default 127.0.0.1:8080)", "HOST:PORT"),
    _Option("quic", parse_host_port, "QUIC (UDP) address agents dial (default 0.0.0.0:8474)", "HOST:PORT"),
    _Option("data_dir", _path, "directory for the dev certificate and data (default ./.quiccmd)", "DIR"),
    _Option("store", parse_store, "where commands are kept: sqlite (default: commands.db in the data dir), sqlite:///PATH or memory", "STORE"),
    _Option("store_sync", _store_sync, "full (default: commits survive power loss) or normal (survive a server crash)", "MODE"),
    _Option("log_level", _log_level, "DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO)", "LEVEL"),
    _Option("cert_file", _path, "TLS certificate (PEM); default: a self-signed one in the data dir", "FILE"),
    _Option("key_file", _path, "TLS private key (PEM) for --cert-file", "FILE"),
    _Option("shutdown_grace", _number, "seconds in-flight commands get at shutdown (default 10)", "SECONDS"),
    _Option("max_payload_bytes", _integer, "largest HTTP request body, bytes (default 1048576)", "BYTES"),
    _Option("default_timeout", _number, "a command's timeout when it gives none (default 30)", "SECONDS"),
    _Option("max_timeout", _number, "largest timeout a command may ask for (default 86400)", "SECONDS"),
    _Option("max_in_flight_per_agent", _integer, "commands open at once per agent (default 256)", "N"),
    _Option("history_retention", _number, "keep finished commands this long (default 86400)", "SECONDS"),
    _Option("max_history", _integer, "keep at most this many finished commands (default 100000)", "N"),
    _Option("idle_timeout", _number, "close a silent QUIC connection after this (default 30)", "SECONDS"),
    _Option("max_queued_per_agent", _integer, "queued commands per agent; more get 429 (default 10000)", "N"),
    _Option("max_unfinished_commands", _integer, "unfinished commands on the server; more get 429 (default 1000000)", "N"),
    _Option("max_agents", _integer, "connected agents; more are refused TOO_MANY_AGENTS (default 100000)", "N"),
    _Option("max_hello_rate", _number, "HELLOs accepted per second; more are refused RATE_LIMITED (default 200)", "PER_SECOND"),
    _Option("max_handshakes", _integer, f"QUIC handshakes in progress at once; agents dialling beyond it wait a moment (default {DEFAULT_MAX_HANDSHAKES})", "N"),
    _Option("gc_freeze_agents", _integer, "from this many connected agents on, keep their state out of full garbage collections; 0: never (default 1000)", "N"),
    _Option("require_api_token", _boolean, "require an API bearer token on loopback too", switch=True),
    _Option("allow_unauthenticated_http", _boolean, "serve HTTP off loopback with no API token (not advised; bind the address clients use, not 0.0.0.0: a request without a token must be addressed to it)", switch=True),
)
_BY_NAME = {option.name: option for option in _OPTIONS}


class _ArgumentParser(argparse.ArgumentParser):
    # argparse prints usage plus an error and exits; we want one line, exit 2,
    # from the same place every other configuration error comes from.
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise ConfigError(message)


def build_argument_parser(prog: str = "python -m trio_quiccmd.server") -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=prog,
        description="Run the trio_quiccmd server: QUIC endpoint for agents, HTTP API for operators.",
        epilog=(
            "Each option can also be set as QUICCMD_<NAME> in the environment "
            "(e.g. QUICCMD_HTTP=0.0.0.0:8080) or as <name> = ... in the --config "
            "TOML file. Flags win over the environment, which wins over the file. "
            "Credentials: python -m trio_quiccmd.server token --help / api-token --help."
        ),
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings (also QUICCMD_CONFIG)")
    for option in _OPTIONS:
        # Strings only: every value goes through the option's own parser, so a
        # flag, a variable and a TOML key fail with the same message.
        if option.switch:
            parser.add_argument(option.flag, dest=option.name, action="store_const", const="true", help=option.help)
        else:
            parser.add_argument(option.flag, dest=option.name, metavar=option.metavar, help=option.help)
    return parser


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerSettings:
    """Settings from ``argv`` (without the program name), ``environ`` and the
    TOML file they name, over the defaults. Raises :class:`ConfigError`."""
    environ = os.environ if environ is None else environ
    args = build_argument_parser().parse_args(list(argv) if argv is not None else None)

    values: dict[str, Any] = {}
    #: Where each value came from, to name it in an out-of-range error.
    sources: dict[str, str] = {}
    config_file = args.config or environ.get(ENV_PREFIX + "CONFIG")
    if config_file:
        values.update(_read_toml(Path(config_file)))
        sources.update((name, f"config file {config_file!r}: {name}") for name in values)
    for option in _OPTIONS:
        raw = environ.get(option.env)
        if raw is not None and raw.strip() != "":
            where = f"environment variable {option.env}"
            values[option.name] = _parse(option, raw, where)
            sources[option.name] = where
    for option in _OPTIONS:
        raw = getattr(args, option.name)
        if raw is not None:
            where = f"option {option.flag}"
            values[option.name] = _parse(option, raw, where)
            sources[option.name] = where

    settings = _build(values, sources)
    for name in ("cert_file", "key_file"):
        path = getattr(settings, name)
        if path is not None and not path.is_file():
            raise ConfigError(f"{name}: {str(path)!r} is not a readable file")
    return settings


def _parse(option: _Option, raw: Any, where: str) -> Any:
    try:
        return option.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    # Settings may sit at the top level or in a [server] table (so one file can
    # later also hold other tables); a key in both is an ambiguity, not a merge.
    table = dict(document)
    values: dict[str, Any] = {}
    if "policy" in table:
        try:
            values["policy"] = parse_policy(table.pop("policy"), path.parent)
        except ValueError as exc:
            raise ConfigError(f"config file {str(path)!r}: {exc}") from None
    server = table.pop("server", None)
    if isinstance(server, dict):
        for key in server.keys() & table.keys():
            raise ConfigError(f"config file {str(path)!r}: {key!r} is set both at the top level and in [server]")
        table.update(server)
    elif server is not None:
        raise ConfigError(f"config file {str(path)!r}: 'server' must be a table")
    for key, raw in table.items():
        option = _BY_NAME.get(key)
        if option is None:
            raise ConfigError(
                f"config file {str(path)!r}: unknown setting {key!r} "
                f"(known: {', '.join(sorted(_BY_NAME))}, and a [policy] table)"
            )
        values[key] = _parse(option, raw, f"config file {str(path)!r}: {key}")
    return values


def _build(values: dict[str, Any], sources: Mapping[str, str] | None = None) -> ServerSettings:
    kwargs = dict(values)
    if "http" in kwargs:
        kwargs["http_host"], kwargs["http_port"] = kwargs.pop("http")
    if "quic" in kwargs:
        kwargs["quic_host"], kwargs["quic_port"] = kwargs.pop("quic")
    try:
        return ServerSettings(**kwargs)
    except (TypeError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else repr(exc)
        # The validators name the field first; say which flag/variable/key set it.
        field = message.split(" ", 1)[0]
        where = (sources or {}).get(field)
        raise ConfigError(f"{where}: {message}" if where else message) from None
