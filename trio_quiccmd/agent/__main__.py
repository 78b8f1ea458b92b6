"""``python -m trio_quiccmd.agent``: run an agent with the built-in commands.

::

    python -m trio_quiccmd.agent --id client-001 [--server HOST:PORT]
        [--label k=v ...] [--data-dir DIR] [--ca-file PEM]
        [--server-fingerprint sha256:HEX] [--server-name NAME]
        [--log-level LEVEL] [--max-concurrent N] [--shutdown-grace SECONDS]
        [--token-file FILE | --token TOKEN] [--allow-shell]

Every flag also has an environment variable, ``QUICCMD_AGENT_<FLAG>`` (e.g.
``QUICCMD_AGENT_ID``, ``QUICCMD_AGENT_SERVER``; ``QUICCMD_AGENT_LABELS`` holds
comma-separated ``k=v`` pairs). A flag wins over its variable; ``--label`` flags
are added to the variable's labels, replacing the same keys. An empty variable
counts as unset; an empty flag is refused.

The server is always verified, by the first of:

1. ``--ca-file``: the chain must lead to these CA certificates (and, if
   ``--server-fingerprint`` is given too, the pin must match as well);
2. ``--server-fingerprint``: the server's certificate must be exactly this one;
3. ``<data-dir>/server-cert.pem``, if it exists: the development certificate a
   server started from the same directory generated, used as the CA;
4. the operating system's CA store.

The agent proves its id with a token, the first of: ``--token``,
``--token-file``, ``QUICCMD_AGENT_TOKEN``, ``QUICCMD_AGENT_TOKEN_FILE``, and
``<data-dir>/agent-dev-token`` (the development credential a server started
from the same directory wrote). A refused token stops the agent (exit 1).

``--allow-shell`` adds the ``shell`` command type (agent/shell.py): anyone who
may send this agent commands can then run programs as its user.

On the first SIGINT/SIGTERM the agent drains (``Agent.stop``): it refuses new
commands (``failed`` / ``agent_shutting_down``), gives running ones
``--shutdown-grace`` seconds (default 10) to finish and delivers their results,
cancels the rest (reported ``cancelled`` / ``agent_shutdown``), and closes the
connection politely. A second signal stops at once.

Exit status: 0 after SIGINT/SIGTERM (the connection is closed politely), 2 for
bad flags, 1 if the server refuses this agent for good (a refused token included).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Mapping, Sequence

import attrs
import idna  # trio's own dependency: the IDNA 2008 encoder its getaddrinfo uses
import trio

from ..logs import configure_logging
from ..quic.tls import DEV_CERT_NAME, check_ca_file, parse_fingerprint
from ..tokens import DEV_AGENT_TOKEN_FILE, read_token_file
from .client import Agent, AgentRejected, AgentUnauthorized
from .executor import ExecutorRegistry, builtin_executor
from .shell import ShellExecutor

logger = logging.getLogger("trio_quiccmd.agent")

PROG = "python -m trio_quiccmd.agent"
ENV_PREFIX = "QUICCMD_AGENT_"
DEFAULT_PORT = 8474
DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_DATA_DIR = "./.quiccmd"
DEFAULT_MAX_CONCURRENT = 1024
#: The QUIC stream limit the agent advertises. QUIC itself allows 2**60, but a
#: value that large only hides a typo; the server's window is far smaller.
MAX_CONCURRENT_LIMIT = 65535
DEFAULT_SHUTDOWN_GRACE = 10.0
#: The same bound the server puts on its own shutdown grace.
MAX_SHUTDOWN_GRACE = 3600.0
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class UsageError(Exception):
    """A bad flag or environment variable: reported on one line, exit status 2."""


@attrs.frozen(kw_only=True)
class AgentSettings:
    client_id: str
    server: tuple[str, int]
    labels: dict[str, str]
    data_dir: Path
    ca_file: Path | None
    server_fingerprint: str | None
    server_name: str | None
    log_level: str
    max_concurrent: int
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    #: The credential sent in HELLO, and where it came from (for the log).
    token: str | None = None
    token_source: str = "none"
    allow_shell: bool = False

    def tls_description(self) -> str:
        """How the server will be verified, for the startup log line."""
        if self.ca_file is not None and self.server_fingerprint is not None:
            return "ca-file+fingerprint"
        if self.ca_file is not None:
            return "ca-file"
        if self.server_fingerprint is not None:
            return "fingerprint"
        return "system-ca"


# -- parsing ---------------------------------------------------------------------


def parse_address(text: str, *, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, or a bare host (default port) -> (host, port)."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r}: expected [IPV6]:PORT")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:  # a bare IPv6 address
        host, port_text = text, None
    else:
        host, _, port_text = text.partition(":")
        port_text = port_text if ":" in text else None
    if not host:
        raise ValueError(f"bad address {text!r}: no host")
    check_host_name(host)
    if port_text is None:
        return host, default_port
    port = _whole_number(port_text)
    if port is None or not 1 <= port <= 65535:
        raise ValueError(f"bad port in {text!r}: expected a number from 1 to 65535")
    return host, port


def _whole_number(text: str) -> int | None:
    # str.isdigit() also takes "²" (which int() refuses) and "８" (which it
    # takes): only ASCII digits are a number here. The length cap keeps int()
    # away from its 4300-digit limit, another ValueError with its own wording.
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        return None
    return int(text)


def check_host_name(host: str) -> str:
    """``host`` as it goes into DNS and TLS: IDNA A-labels for a non-ASCII name.

    Raises ValueError for a name a dial could not even encode (a label over 63
    characters or empty, a code point IDNA refuses): the resolver raises
    UnicodeError for those, not OSError, so the agent would otherwise only
    find out at its first connection attempt.
    """
    if not host.isprintable():
        raise ValueError(f"bad host {host!r}: control characters (a line break?) in it")
    try:
        # The two encodings a dial applies: socket.getaddrinfo's IDNA 2003
        # codec on any str, then trio's IDNA 2008 for the actual lookup.
        host.encode("idna")
        return host if host.isascii() else idna.encode(host, uts46=True).decode("ascii")
    except UnicodeError as exc:
        reason = exc.__cause__ or exc
        raise ValueError(
            f"bad host {host!r}: not a valid DNS name ({reason}; each dot-separated "
            "label is 1 to 63 characters)"
        ) from None


def parse_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key:
        raise ValueError(f"bad label {text!r}: expected KEY=VALUE")
    if not (key.isprintable() and value.isprintable()):
        raise ValueError(f"bad label {text!r}: control characters (a line break?) in it")
    return key, value


def _check_ca_file(path: Path, source: str) -> Path:
    try:
        check_ca_file(path)
    except ValueError as exc:
        raise UsageError(f"{source} {path}: {exc}") from None
    return path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line an operator can act on, not the whole usage block.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Connect to a trio_quiccmd server over QUIC and run the commands it sends "
        "(built-in command types: echo, sleep, fail, sysinfo).",
        epilog="Each flag can also be set as QUICCMD_AGENT_<FLAG> in the environment "
        "(QUICCMD_AGENT_LABELS=k=v,k2=v2 for labels).",
    )
    parser.add_argument("--id", dest="client_id", metavar="CLIENT_ID",
                        help="this agent's client id (required) [QUICCMD_AGENT_ID]")
    parser.add_argument("--server", metavar="HOST:PORT",
                        help=f"the server's QUIC address (default {DEFAULT_SERVER})")
    parser.add_argument("--label", dest="labels", action="append", metavar="KEY=VALUE",
                        help="a label the server shows for this agent; repeatable")
    parser.add_argument("--data-dir", metavar="DIR",
                        help=f"where to look for the server's dev certificate "
                        f"(default {DEFAULT_DATA_DIR})")
    parser.add_argument("--ca-file", metavar="PEM",
                        help="verify the server's certificate chain against these CA certificates")
    parser.add_argument("--server-fingerprint", metavar="sha256:HEX",
                        help="accept exactly the server certificate with this SHA-256 "
                        "fingerprint (the server logs it at startup)")
    parser.add_argument("--server-name", metavar="NAME",
                        help="the name the server's certificate must carry "
                        "(default: the host in --server)")
    parser.add_argument("--log-level", type=str.lower, metavar="LEVEL",
                        help="debug, info, warning, error or critical (default info)")
    parser.add_argument("--max-concurrent", metavar="N",
                        help=f"commands run at once, 1 to {MAX_CONCURRENT_LIMIT} "
                        f"(default {DEFAULT_MAX_CONCURRENT})")
    parser.add_argument("--token-file", metavar="FILE",
                        help="file holding this agent's token (preferred over --token, "
                        "which other users can see in the process list)")
    parser.add_argument("--token", metavar="TOKEN",
                        help="this agent's token; default: --token-file, then "
                        "QUICCMD_AGENT_TOKEN, QUICCMD_AGENT_TOKEN_FILE, then "
                        f"<data-dir>/{DEV_AGENT_TOKEN_FILE} if it exists")
    parser.add_argument("--allow-shell", action="store_true", default=None,
                        help="add the 'shell' command type: whoever may command this agent "
                        "can run programs as its user [QUICCMD_AGENT_ALLOW_SHELL=1]")
    parser.add_argument("--shutdown-grace", metavar="SECONDS",
                        help="on SIGINT/SIGTERM, how long running commands may still finish "
                        f"before they are cancelled, 0 to {MAX_SHUTDOWN_GRACE:g} (default "
                        f"{DEFAULT_SHUTDOWN_GRACE:g}; a second signal stops at once)")
    return parser


def resolve_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> AgentSettings:
    """Flags, then ``QUICCMD_AGENT_*`` variables, then defaults. Raises UsageError."""

    def from_flag(flag: str, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            # Typically `--flag "$VAR"` with VAR unset: falling back to the
            # default would, for --server-fingerprint or --token, quietly
            # trust or authenticate differently than asked.
            raise UsageError(f"{flag}: empty value (an unset shell variable?)")
        return value.strip()

    def from_env(flag: str) -> tuple[str | None, str]:
        env = ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()
        # An empty variable counts as unset, as the shell's ${VAR:-default} has it.
        return environ.get(env, "").strip() or None, env

    def pick(flag: str, value: str | None, default: str | None = None) -> tuple[str | None, str]:
        value = from_flag(flag, value)
        if value is not None:
            return value, flag
        env_value, env = from_env(flag)
        if env_value is not None:
            return env_value, env
        return default, flag

    client_id, _ = pick("--id", args.client_id)
    if not client_id:
        raise UsageError("--id is required (or set QUICCMD_AGENT_ID)")
    if len(client_id) > 256:
        raise UsageError("--id must be at most 256 characters")
    if not client_id.isprintable():
        raise UsageError(f"--id {client_id!r}: control characters (a line break?) in it")

    server_text, source = pick("--server", args.server, DEFAULT_SERVER)
    try:
        server = parse_address(server_text or "")
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}") from None

    labels: dict[str, str] = {}
    env_labels = environ.get(ENV_PREFIX + "LABELS", "")
    for item in filter(None, (part.strip() for part in env_labels.split(","))):
        try:
            key, value = parse_label(item)
        except ValueError as exc:
            raise UsageError(f"{ENV_PREFIX}LABELS: {exc}") from None
        labels[key] = value
    for item in args.labels or ():
        try:
            key, value = parse_label(item)
        except ValueError as exc:
            raise UsageError(f"--label: {exc}") from None
        labels[key] = value

    data_dir_text, _ = pick("--data-dir", args.data_dir, DEFAULT_DATA_DIR)
    data_dir = Path(data_dir_text or DEFAULT_DATA_DIR)

    ca_text, source = pick("--ca-file", args.ca_file)
    ca_file = _check_ca_file(Path(ca_text), source) if ca_text else None

    pin_text, source = pick("--server-fingerprint", args.server_fingerprint)
    try:
        pin = parse_fingerprint(pin_text) if pin_text else None
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}") from None

    server_name, source = pick("--server-name", args.server_name)
    try:
        if server_name is not None:
            server_name = check_host_name(server_name)
        elif not server[0].isascii():
            # aioquic sends the name in the TLS ClientHello as ASCII and fails
            # on anything else; certificates carry the A-label form anyway.
            server_name = check_host_name(server[0])
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}") from None

    level, source = pick("--log-level", args.log_level, "info")
    level = (level or "info").lower()
    if level not in LOG_LEVELS:
        raise UsageError(f"{source}: bad log level {level!r}: one of {', '.join(LOG_LEVELS)}")

    concurrent_text, source = pick("--max-concurrent", args.max_concurrent,
                                   str(DEFAULT_MAX_CONCURRENT))
    # It is the QUIC stream limit sent in every handshake: aioquic cannot
    # encode 2**62 or more and would fail at the first dial, not here.
    max_concurrent = _whole_number(concurrent_text or "")
    if max_concurrent is None or not 1 <= max_concurrent <= MAX_CONCURRENT_LIMIT:
        raise UsageError(
            f"{source}: expected a whole number from 1 to {MAX_CONCURRENT_LIMIT}, "
            f"got {concurrent_text!r}"
        )

    grace_text, source = pick("--shutdown-grace", args.shutdown_grace,
                              f"{DEFAULT_SHUTDOWN_GRACE:g}")
    try:
        # float() also reads "١٠" and "１０" as 10: ASCII only, as for integers.
        shutdown_grace = float(grace_text or "") if (grace_text or "").isascii() else math.nan
    except ValueError:
        shutdown_grace = math.nan
    if not 0 <= shutdown_grace <= MAX_SHUTDOWN_GRACE:  # also refuses NaN
        raise UsageError(
            f"{source}: expected a number of seconds from 0 to {MAX_SHUTDOWN_GRACE:g}, "
            f"got {grace_text!r}"
        )

    # Flags before variables, as everywhere else: an operator rotating tokens
    # with --token-file must not be overruled by an old QUICCMD_AGENT_TOKEN.
    token, token_source = None, "none"
    env_token, env_token_name = from_env("--token")
    env_file, env_file_name = from_env("--token-file")
    for value, source, is_file in (
        (from_flag("--token", args.token), "--token", False),
        (from_flag("--token-file", args.token_file), "--token-file", True),
        (env_token, env_token_name, False),
        (env_file, env_file_name, True),
    ):
        if value is not None:
            token = _read_token(Path(value), source) if is_file else value
            token_source = source
            break

    allow_shell = bool(args.allow_shell)
    if not allow_shell:
        shell_text = environ.get(ENV_PREFIX + "ALLOW_SHELL", "").strip().lower()
        if shell_text not in ("", "0", "false", "no", "1", "true", "yes"):
            raise UsageError(f"{ENV_PREFIX}ALLOW_SHELL: expected 1/0, true/false or yes/no, got {shell_text!r}")
        allow_shell = shell_text in ("1", "true", "yes")

    return AgentSettings(
        client_id=client_id,
        server=server,
        labels=labels,
        data_dir=data_dir,
        ca_file=ca_file,
        server_fingerprint=pin,
        server_name=server_name,
        log_level=level,
        max_concurrent=max_concurrent,
        shutdown_grace=shutdown_grace,
        token=token,
        token_source=token_source,
        allow_shell=allow_shell,
    )


def _read_token(path: Path, source: str) -> str:
    try:
        return read_token_file(path)
    except FileNotFoundError:
        raise UsageError(f"{source} {path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{source} {path}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:  # a ValueError too: not "empty"
        raise UsageError(f"{source} {path}: not UTF-8 text (the wrong file?)") from None
    except ValueError:
        raise UsageError(f"{source} {path}: the file is empty") from None


def with_dev_credential(settings: AgentSettings) -> AgentSettings:
    """Use ``<data-dir>/agent-dev-token`` when no token was given and it exists."""
    if settings.token is not None:
        return settings
    candidate = settings.data_dir / DEV_AGENT_TOKEN_FILE
    if not candidate.is_file():
        return settings
    token = _read_token(candidate, "data dir credential")
    logger.info("Using the development credential from the data dir token_file=%s", candidate)
    return attrs.evolve(settings, token=token, token_source=str(candidate))


def build_executor(settings: AgentSettings) -> ExecutorRegistry:
    """The built-in command types, plus ``shell`` with --allow-shell."""
    registry = builtin_executor()
    if settings.allow_shell:
        registry.register("shell", ShellExecutor().run)
    return registry


def with_dev_certificate(settings: AgentSettings) -> AgentSettings:
    """Trust ``<data-dir>/server-cert.pem`` when nothing else was said and it exists."""
    if settings.ca_file is not None or settings.server_fingerprint is not None:
        return settings
    candidate = settings.data_dir / DEV_CERT_NAME
    if not candidate.is_file():
        return settings
    _check_ca_file(candidate, "data dir certificate")
    logger.info(
        "Using the server certificate from the data dir as CA ca_file=%s", candidate
    )
    return attrs.evolve(settings, ca_file=candidate)


def _format_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


# -- running ---------------------------------------------------------------------


async def run_agent(settings: AgentSettings) -> int:
    """Run until SIGINT/SIGTERM (-> 0) or a final refusal (-> 1)."""
    executor = build_executor(settings)
    agent = Agent(
        settings.client_id,
        settings.server,
        executor,
        token=settings.token,
        labels=settings.labels,
        ca_file=settings.ca_file,
        server_fingerprint=settings.server_fingerprint,
        server_name=settings.server_name,
        max_concurrent_commands=settings.max_concurrent,
    )
    # Signals are ours from here on; "Agent starting" says so.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        logger.info(
            "Agent starting client_id=%s server=%s:%s tls=%s token=%s labels=%s command_types=%s",
            settings.client_id, _format_host(settings.server[0]), settings.server[1],
            settings.tls_description(), settings.token_source,
            ",".join(f"{k}={v}" for k, v in sorted(settings.labels.items())),
            ",".join(executor.command_types),
        )
        if settings.allow_shell:
            logger.warning(
                "The shell command type is enabled: whoever may command this agent can run "
                "programs as its user client_id=%s", settings.client_id,
            )
        if settings.tls_description() == "system-ca":
            logger.info(
                "Verifying the server against the system CA store "
                "(no --ca-file, no --server-fingerprint, no %s in the data dir) data_dir=%s",
                DEV_CERT_NAME, settings.data_dir,
            )
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    if not agent.stopping:
                        logger.info(
                            "Shutting down signal=%s client_id=%s grace=%g",
                            signal.Signals(signum).name, settings.client_id,
                            settings.shutdown_grace,
                        )
                        agent.stop(grace=settings.shutdown_grace)
                    else:  # a second signal: stop at once
                        # Said here: run() is cancelled, and reports nothing.
                        logger.warning(
                            "Second signal, stopping now signal=%s client_id=%s "
                            "running=%d held_results=%d",
                            signal.Signals(signum).name, settings.client_id,
                            agent.running_commands, len(agent.held_results),
                        )
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            try:
                await agent.run()
            except AgentUnauthorized:
                return 1  # Agent.run logged "Agent unauthorized, stopping ..."
            except AgentRejected as exc:
                logger.error("Agent rejected by the server client_id=%s error=%s",
                             settings.client_id, exc)
                return 1
            finally:
                nursery.cancel_scope.cancel()
    return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = resolve_settings(args, os.environ if environ is None else environ)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.log_level != "debug":
        # aioquic logs every handshake at INFO; that is debugging detail here.
        logging.getLogger("quic").setLevel(logging.WARNING)
    try:
        settings = with_dev_credential(with_dev_certificate(settings))
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return trio.run(run_agent, settings)


if __name__ == "__main__":
    sys.exit(main())
