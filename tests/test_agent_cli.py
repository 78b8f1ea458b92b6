"""``python -m trio_quiccmd.agent`` as a user runs it: a real subprocess against a
real in-process server; plus fingerprint pinning and the examples.

Waiting is event-driven: the server side records (dis)connections through an
observing CommandManager, and subprocess output is read line by line with a
wake-up per line. Every test runs under ``trio.fail_after``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import AsyncIterator, Callable

import pytest
import trio

from .conftest import wait_until
from .processes import REPO, clean_env, spawn
from trio_quiccmd import (
    Agent,
    CommandManager,
    CommandServer,
    CommandStatus,
    ServerFingerprintMismatch,
)
from trio_quiccmd.agent.__main__ import build_parser, resolve_settings
from trio_quiccmd.quic.tls import ensure_dev_certificate, fingerprint_of_pem_file, parse_fingerprint
from trio_quiccmd.server.auth import AgentAuthenticator
from trio_quiccmd.server.core import server_quic_configuration
from trio_quiccmd.tokens import issue_agent_token

EXAMPLES = REPO / "examples" / "command"
PROG = "python -m trio_quiccmd.agent: error:"
#: Generous: each test starts at least one Python process that imports aioquic.
TIMEOUT = 30
WRONG_PIN = "sha256:" + "00" * 32


# -- helpers ------------------------------------------------------------------------


class ObservedManager(CommandManager):
    """A CommandManager that records agents coming and going, with a wake-up."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.connects: list[str] = []
        self.disconnects: list[tuple[str, int | None, str]] = []
        self._changed = trio.Event()

    def agent_connected(self, link) -> None:
        super().agent_connected(link)
        self.connects.append(link.client_id)
        self._wake()

    def agent_disconnected(self, link) -> None:
        super().agent_disconnected(link)
        session = link.session
        self.disconnects.append((link.client_id, session.close_error_code, session.close_reason))
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[SimpleNamespace]:
    """A server whose data dir is ``tmp_path/.quiccmd``, as ``python -m
    trio_quiccmd.server`` started in ``tmp_path`` would have it."""
    async with running_server(tmp_path) as running:
        yield running


@pytest.fixture
async def secured_server(tmp_path: Path) -> AsyncIterator[SimpleNamespace]:
    """Like ``server``, but agents need their token (from the data dir)."""
    async with running_server(tmp_path, secured=True) as running:
        yield running


@asynccontextmanager
async def running_server(tmp_path: Path, *, secured: bool = False) -> AsyncIterator[SimpleNamespace]:
    data_dir = tmp_path / ".quiccmd"
    cert, key, _ = ensure_dev_certificate(data_dir)
    manager = ObservedManager(
        authenticator=AgentAuthenticator.from_data_dir(data_dir) if secured else None
    )
    # The default 30 s idle timeout: a disconnect seen within the test's
    # timeout was a polite close, not the idle timer.
    command_server = CommandServer(manager, server_quic_configuration(cert, key))
    async with trio.open_nursery() as nursery:
        address = await nursery.start(command_server.serve, "127.0.0.1", 0)
        yield SimpleNamespace(
            manager=manager,
            directory=tmp_path,
            data_dir=data_dir,
            cert=cert,
            address=f"127.0.0.1:{address[1]}",
            port=address[1],
            fingerprint=fingerprint_of_pem_file(cert),
        )
        with trio.fail_after(10):
            await command_server.shutdown(grace=1.0)
        nursery.cancel_scope.cancel()


def agent_cli(*args: str, cwd: Path, env: dict[str, str] | None = None):
    return spawn([sys.executable, "-m", "trio_quiccmd.agent", *args], cwd=cwd, env=env)


class LogWatch(logging.Handler):
    """Records messages of one logger that contain ``text``; wakes waiters."""

    def __init__(self, text: str):
        super().__init__(logging.DEBUG)
        self.text = text
        self.messages: list[str] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message:
            self.messages.append(message)
            self._changed.set()
            self._changed = trio.Event()

    async def wait(self, count: int) -> None:
        while len(self.messages) < count:
            await self._changed.wait()


@pytest.fixture
def agent_log() -> Callable[[str], LogWatch]:
    logger = logging.getLogger("trio_quiccmd.agent")
    watches: list[LogWatch] = []
    old_level = logger.level
    logger.setLevel(logging.INFO)

    def watch(text: str) -> LogWatch:
        handler = LogWatch(text)
        logger.addHandler(handler)
        watches.append(handler)
        return handler

    yield watch
    for handler in watches:
        logger.removeHandler(handler)
    logger.setLevel(old_level)


# -- the CLI, as a user runs it -------------------------------------------------------


async def test_started_in_the_server_directory_it_connects_with_no_tls_flags(server):
    with trio.fail_after(TIMEOUT):
        async with agent_cli(
            "--id", "cli-1", "--server", server.address, "--label", "env=test",
            "--label", "rack=r7",
            cwd=server.directory,
        ) as agent:
            await server.manager.until(lambda: "cli-1" in server.manager.connects)

            command = await server.manager.send_and_wait("cli-1", "echo", {"hello": ["wörld", 1]})
            assert command.status is CommandStatus.COMPLETED, command
            assert command.result == {"hello": ["wörld", 1]}

            [info] = server.manager.clients()
            assert info.client_id == "cli-1"
            assert info.labels == {"env": "test", "rack": "r7"}

            await agent.stderr.wait_for("Connected to server")
            assert agent.stderr.matching(
                "Using the server certificate from the data dir as CA ca_file=.quiccmd/server-cert.pem"
            ), str(agent.stderr)
            assert agent.stderr.matching("tls=ca-file"), str(agent.stderr)
            # key=value lines in the server's format: "<time>Z INFO <logger> <message>"
            line = await agent.stderr.wait_for("Connected to server")
            assert f"server={server.address} client_id=cli-1" in line
            assert line.split()[1:3] == ["INFO", "trio_quiccmd.agent"]


async def test_settings_come_from_the_environment_and_flags_win(server):
    env = {
        "QUICCMD_AGENT_ID": "env-agent",
        "QUICCMD_AGENT_SERVER": server.address,
        "QUICCMD_AGENT_LABELS": "env=prod, zone=eu-1",
    }
    with trio.fail_after(TIMEOUT):
        async with agent_cli("--label", "env=test", cwd=server.directory, env=env):
            await server.manager.until(lambda: "env-agent" in server.manager.connects)
            [info] = server.manager.clients()
            assert info.labels == {"env": "test", "zone": "eu-1"}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_closes_the_connection_politely_and_exits_zero(server, signum):
    with trio.fail_after(TIMEOUT):
        async with agent_cli("--id", "cli-sig", "--server", server.address,
                             "--shutdown-grace", "0.2", "--log-level", "debug",
                             cwd=server.directory) as agent:
            await server.manager.until(lambda: "cli-sig" in server.manager.connects)
            # One command still running when the signal comes, and longer
            # than the grace period.
            running = await server.manager.send_command("cli-sig", "sleep", {"seconds": 60},
                                                        timeout=120)
            assert running.status is CommandStatus.EXECUTING
            await agent.stderr.wait_for(f"Command received command_id={running.command_id}")

            agent.process.send_signal(signum)
            assert await agent.process.wait() == 0, str(agent.stderr)
            # Cancelled at the end of the grace period and reported, not left
            # to its 120 s deadline.
            cancelled = await server.manager.wait(running.command_id, timeout=1)
            assert cancelled.status is CommandStatus.CANCELLED, (cancelled, str(agent.stderr))
            assert cancelled.error_code == "agent_shutdown"

            # The server hears a CONNECTION_CLOSE at once (its idle timeout is 30 s).
            await server.manager.until(lambda: server.manager.disconnects)
            assert server.manager.disconnects == [("cli-sig", 0, "agent shutting down")]
            assert server.manager.clients() == []
            assert agent.stderr.matching(f"Shutting down signal={signum.name} client_id=cli-sig")
            assert agent.stderr.matching("Agent stopped client_id=cli-sig")
            assert not agent.stderr.matching("Traceback"), str(agent.stderr)


async def test_sigterm_lets_a_running_command_finish_then_exits_zero(server):
    with trio.fail_after(TIMEOUT):
        async with agent_cli("--id", "cli-drain", "--server", server.address,
                             "--log-level", "debug",
                             cwd=server.directory) as agent:
            await server.manager.until(lambda: "cli-drain" in server.manager.connects)
            running = await server.manager.send_command("cli-drain", "sleep", {"seconds": 0.5},
                                                        timeout=30)
            await agent.stderr.wait_for(f"Command received command_id={running.command_id}")

            agent.process.send_signal(signal.SIGTERM)
            assert await agent.process.wait() == 0, str(agent.stderr)
            # The default grace (10 s) was not waited out: the process ended
            # with the command, after delivering its result.
            done = await server.manager.wait(running.command_id, timeout=0)
            assert done.status is CommandStatus.COMPLETED, (done, str(agent.stderr))
            await server.manager.until(lambda: server.manager.disconnects)
            assert server.manager.disconnects == [("cli-drain", 0, "agent shutting down")]
            assert agent.stderr.matching("Shutting down signal=SIGTERM client_id=cli-drain grace=10")
            assert not agent.stderr.matching("Results not delivered"), str(agent.stderr)
            assert not agent.stderr.matching("Traceback"), str(agent.stderr)


async def test_a_second_signal_stops_at_once(server):
    with trio.fail_after(TIMEOUT):
        async with agent_cli("--id", "cli-twice", "--server", server.address,
                             "--log-level", "debug",
                             cwd=server.directory) as agent:
            await server.manager.until(lambda: "cli-twice" in server.manager.connects)
            running = await server.manager.send_command("cli-twice", "sleep", {"seconds": 60},
                                                        timeout=120)
            await agent.stderr.wait_for(f"Command received command_id={running.command_id}")
            agent.process.send_signal(signal.SIGTERM)
            await agent.stderr.wait_for("Draining before shutdown")
            agent.process.send_signal(signal.SIGTERM)
            assert await agent.process.wait() == 0, str(agent.stderr)
            # The command it abandons is counted.
            assert agent.stderr.matching(
                "Second signal, stopping now signal=SIGTERM client_id=cli-twice running=1 held_results=0"
            )
            assert not agent.stderr.matching("Traceback"), str(agent.stderr)


async def test_signal_while_still_connecting_exits_zero(tmp_path):
    # Nothing listens on this port: the agent is stuck in its first handshake.
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with trio.fail_after(TIMEOUT):
            async with agent_cli("--id", "lonely", "--server", f"127.0.0.1:{port}",
                                 cwd=tmp_path) as agent:
                await agent.stderr.wait_for("Agent starting client_id=lonely")
                agent.process.send_signal(signal.SIGTERM)
                assert await agent.process.wait() == 0, str(agent.stderr)
                assert not agent.stderr.matching("Traceback"), str(agent.stderr)


@pytest.mark.parametrize(
    "args, env, message",
    [
        ([], {}, "--id is required (or set QUICCMD_AGENT_ID)"),
        (["--id", "a", "--label", "rack"], {}, "--label: bad label 'rack': expected KEY=VALUE"),
        (["--id", "a", "--label", "=x"], {}, "bad label '=x'"),
        # Found in review: these retried for ever, refused by the server at every HELLO.
        (["--id", "a\nb"], {}, "--id 'a\\nb': control characters (a line break?) in it"),
        (["--id", "a", "--label", "k=v\x1bX"], {}, "bad label 'k=v\\x1bX': control characters"),
        (["--id", "a", "--server", "127.0.0.1:99999"], {}, "--server: bad port in '127.0.0.1:99999'"),
        (["--id", "a", "--server", "localhost:quic"], {}, "bad port in 'localhost:quic'"),
        (["--id", "a", "--server", ":8474"], {}, "no host"),
        (["--id", "a", "--server-fingerprint", "md5:abcd"], {}, "bad fingerprint 'md5:abcd'"),
        (["--id", "a", "--server-fingerprint", "sha256:" + "a" * 63], {}, "expected sha256:<64 hex digits>"),
        (["--id", "a", "--ca-file", "missing.pem"], {}, "--ca-file missing.pem: no such file"),
        (["--id", "a", "--ca-file", "not-a-cert.pem"], {}, "not a PEM certificate file"),
        (["--id", "a", "--max-concurrent", "0"], {},
         "--max-concurrent: expected a whole number from 1 to 65535, got '0'"),
        # Found in review: "²" passed isdigit() and then int() raised; a
        # number past QUIC's 2**62 crashed the agent in its first handshake.
        (["--id", "a", "--max-concurrent", "²"], {},
         "--max-concurrent: expected a whole number from 1 to 65535, got '²'"),
        (["--id", "a", "--max-concurrent", "99999999999999999999"], {},
         "--max-concurrent: expected a whole number from 1 to 65535"),
        (["--id", "a"], {"QUICCMD_AGENT_MAX_CONCURRENT": "65536"},
         "QUICCMD_AGENT_MAX_CONCURRENT: expected a whole number from 1 to 65535"),
        # Found in review: names DNS cannot encode raised UnicodeError at the
        # first dial (and a non-ASCII TLS server name in the handshake),
        # ending the agent with a traceback.
        (["--id", "a", "--server", "a" * 64 + ".example:8474"], {},
         f"--server: bad host '{'a' * 64}.example': not a valid DNS name"),
        (["--id", "a", "--server", "a..example"], {}, "bad host 'a..example': not a valid DNS name"),
        (["--id", "a", "--server-name", "☃.example"], {},
         "--server-name: bad host '☃.example': not a valid DNS name"),
        # Non-ASCII digits that int() or float() would have read as a number.
        (["--id", "a", "--server", "127.0.0.1:８４７４"], {}, "--server: bad port in '127.0.0.1:８４７４'"),
        (["--id", "a", "--shutdown-grace", "١٠"], {}, "--shutdown-grace: expected a number of seconds"),
        (["--id", "a", "--shutdown-grace", "1e9"], {},
         "--shutdown-grace: expected a number of seconds from 0 to 3600, got '1e9'"),
        # `--flag "$UNSET"`: not silently the default, which here means no pin
        # (or another credential).
        (["--id", "a", "--server-fingerprint", ""], {},
         "--server-fingerprint: empty value (an unset shell variable?)"),
        (["--id", "a", "--token-file", " "], {}, "--token-file: empty value"),
        (["--id", "a", "--token-file", "binary.token"], {},
         "--token-file binary.token: not UTF-8 text"),
        (["--id", "a", "--log-level", "loud"], {}, "bad log level 'loud'"),
        (["--id", "a", "--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
        (["--id", "a", "--shutdown-grace", "-1"], {}, "--shutdown-grace: expected a number of seconds"),
        (["--id", "a"], {"QUICCMD_AGENT_SHUTDOWN_GRACE": "soon"},
         "QUICCMD_AGENT_SHUTDOWN_GRACE: expected a number of seconds"),
        (["--id", "a"], {"QUICCMD_AGENT_SERVER": "host:0"}, "QUICCMD_AGENT_SERVER: bad port"),
        (["--id", "a"], {"QUICCMD_AGENT_LABELS": "ok=1,broken"}, "QUICCMD_AGENT_LABELS: bad label 'broken'"),
        (["--id", "a", "--token-file", "missing.token"], {}, "--token-file missing.token: no such file"),
        (["--id", "a", "--token-file", "empty.token"], {}, "--token-file empty.token: the file is empty"),
        (["--id", "a"], {"QUICCMD_AGENT_TOKEN_FILE": "missing.token"},
         "QUICCMD_AGENT_TOKEN_FILE missing.token: no such file"),
        (["--id", "a"], {"QUICCMD_AGENT_ALLOW_SHELL": "maybe"},
         "QUICCMD_AGENT_ALLOW_SHELL: expected 1/0, true/false or yes/no, got 'maybe'"),
    ],
)
async def test_bad_flags_exit_2_with_one_clear_line(tmp_path, args, env, message):
    (tmp_path / "not-a-cert.pem").write_text("hello\n")
    (tmp_path / "empty.token").write_text(" \n")
    (tmp_path / "binary.token").write_bytes(b"\xff\xfe\x00q\x00")
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_quiccmd.agent", *args],
            cwd=str(tmp_path),
            env=clean_env(env),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(PROG), stderr
    assert message in stderr, stderr
    assert result.stdout == b""


async def test_a_token_file_flag_beats_an_old_token_in_the_environment(secured_server):
    server = secured_server
    # Rotation: the new token is in the file, the old one still in the unit's
    # environment (and refused by the server since it was replaced).
    old = issue_agent_token(server.data_dir, "rotated")
    new = issue_agent_token(server.data_dir, "rotated", replace=True)
    (server.directory / "rotated.token").write_text(new + "\n")
    with trio.fail_after(TIMEOUT):
        async with agent_cli("--id", "rotated", "--server", server.address,
                             "--token-file", "rotated.token",
                             cwd=server.directory, env={"QUICCMD_AGENT_TOKEN": old}) as agent:
            await agent.stderr.wait_for("Connected to server")
            assert "token=--token-file" in await agent.stderr.wait_for("Agent starting")
            assert server.manager.registry.get("rotated").credential == "token"


@pytest.mark.parametrize(
    "flags, env, expected",
    [
        (["--token", "flag", "--token-file", "file.token"],
         {"QUICCMD_AGENT_TOKEN": "env", "QUICCMD_AGENT_TOKEN_FILE": "env-file.token"},
         ("flag", "--token")),
        (["--token-file", "file.token"],
         {"QUICCMD_AGENT_TOKEN": "env", "QUICCMD_AGENT_TOKEN_FILE": "env-file.token"},
         ("from-file", "--token-file")),
        ([], {"QUICCMD_AGENT_TOKEN": "env", "QUICCMD_AGENT_TOKEN_FILE": "env-file.token"},
         ("env", "QUICCMD_AGENT_TOKEN")),
        ([], {"QUICCMD_AGENT_TOKEN_FILE": "env-file.token"},
         ("from-env-file", "QUICCMD_AGENT_TOKEN_FILE")),
    ],
)
def test_the_token_is_the_first_of_the_documented_sources(tmp_path, monkeypatch, flags, env, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.token").write_text("from-file\n")
    (tmp_path / "env-file.token").write_text("from-env-file\n")
    settings = resolve_settings(build_parser().parse_args(["--id", "a", *flags]), env)
    assert (settings.token, settings.token_source) == expected


async def test_a_non_ascii_server_name_connects_in_its_ascii_form(server, tmp_path):
    # Sent as is, it crashed the agent in aioquic's ClientHello (ASCII only).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with trio.fail_after(TIMEOUT):
        async with agent_cli("--id", "idn", "--server", server.address,
                             "--server-name", "münchen.example",
                             "--server-fingerprint", server.fingerprint, cwd=elsewhere) as agent:
            await agent.stderr.wait_for("Connected to server")
            await server.manager.until(lambda: "idn" in server.manager.connects)
            assert not agent.stderr.matching("Traceback"), str(agent.stderr)
    # With no --server-name, a non-ASCII --server host is the name, in the
    # same form.
    settings = resolve_settings(build_parser().parse_args(["--id", "a", "--server", "münchen.example"]), {})
    assert settings.server == ("münchen.example", 8474)
    assert settings.server_name == "xn--mnchen-3ya.example"


async def test_wrong_fingerprint_never_connects_and_says_so_on_each_attempt(server):
    with trio.fail_after(TIMEOUT):
        # Started in the server's directory, so a usable CA is right there:
        # the explicit pin still decides, and it is wrong.
        async with agent_cli("--id", "pinned", "--server", server.address,
                             "--server-fingerprint", WRONG_PIN, cwd=server.directory) as agent:
            first = await agent.stderr.wait_for("does not match the pinned fingerprint")
            # Retried with backoff, reported again: not fatal, not a hot loop.
            await agent.stderr.wait_for("Reconnecting in", 1)
            await agent.stderr.wait_for("does not match the pinned fingerprint", 2)
            assert " ERROR trio_quiccmd.agent " in first
            assert f"expected={WRONG_PIN}" in first
            assert f"presented={server.fingerprint}" in first
            assert agent.stderr.matching("tls=fingerprint")
            assert not agent.stderr.matching("Connected to server")
            assert server.manager.connects == []
            assert server.manager.clients() == []

            agent.process.send_signal(signal.SIGTERM)
            assert await agent.process.wait() == 0, str(agent.stderr)


@pytest.mark.parametrize("how", ["ca-file", "fingerprint"])
async def test_from_another_directory_it_needs_and_uses_a_trust_flag(server, tmp_path, how):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    flag = (
        ["--ca-file", str(server.cert)]
        if how == "ca-file"
        # Pasted as OpenSSL prints it: upper case, colon-separated.
        else ["--server-fingerprint", "SHA256:" + ":".join(
            server.fingerprint[7:][i:i + 2].upper() for i in range(0, 64, 2))]
    )
    with trio.fail_after(TIMEOUT):
        async with agent_cli("--id", "far", "--server", server.address, *flag,
                             cwd=elsewhere) as agent:
            await server.manager.until(lambda: "far" in server.manager.connects)
            command = await server.manager.send_and_wait("far", "echo", {"n": 1})
            assert command.status is CommandStatus.COMPLETED
            assert agent.stderr.matching(f"tls={how}")
            assert not agent.stderr.matching("from the data dir")


async def test_without_any_trust_anchor_verification_fails_loudly(server, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with trio.fail_after(TIMEOUT):
        async with agent_cli("--id", "untrusting", "--server", server.address,
                             cwd=elsewhere) as agent:
            await agent.stderr.wait_for("Verifying the server against the system CA store")
            failure = await agent.stderr.wait_for("Connection to server failed")
            assert "certificate" in failure.lower(), failure
            assert server.manager.connects == []


# -- pinning in the library -------------------------------------------------------------


def test_parse_fingerprint_normalises_what_operators_paste():
    hexdigest = hashlib.sha256(b"x").hexdigest()
    colons = ":".join(hexdigest[i:i + 2] for i in range(0, 64, 2))
    for text in (f"sha256:{hexdigest}", f"SHA256:{hexdigest.upper()}", f"sha256:{colons.upper()}",
                 f"  sha256:{hexdigest}\n"):
        assert parse_fingerprint(text) == f"sha256:{hexdigest}"
    for bad in ("", hexdigest, f"sha1:{hexdigest}", f"sha256:{hexdigest}00", "sha256:" + "g" * 64,
                f"sha256:{colons}:"):
        with pytest.raises(ValueError, match="expected sha256:<64 hex digits>"):
            parse_fingerprint(bad)
    with pytest.raises(ValueError):
        Agent("x", ("127.0.0.1", 1), server_fingerprint="sha256:nope")


async def test_pinned_fingerprint_is_enough_without_a_ca(cluster):
    pin = fingerprint_of_pem_file(cluster.cert)
    with trio.fail_after(TIMEOUT):
        agent, scope = await cluster.start_agent("pin-ok", ca_file=None, server_fingerprint=pin)
        command = await cluster.manager.send_and_wait("pin-ok", "echo", [1, 2, 3])
        assert command.status is CommandStatus.COMPLETED and command.result == [1, 2, 3]
        assert agent.sessions_established == 1
        scope.cancel()


@pytest.mark.parametrize("with_ca", [False, True], ids=["pin-only", "pin-and-ca"])
async def test_pin_mismatch_is_refused_before_hello_and_retried(cluster, agent_log, with_ca):
    mismatches = agent_log("does not match the pinned fingerprint")
    agent = cluster.agent(
        "pin-bad",
        ca_file=cluster.cert if with_ca else None,
        server_fingerprint=WRONG_PIN,
        reconnect_initial_delay=0.02,
    )
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await mismatches.wait(3)
            assert f"presented={fingerprint_of_pem_file(cluster.cert)}" in mismatches.messages[0]
            # The server never got a HELLO: no agent, no session.
            assert cluster.manager.clients() == []
            assert cluster.manager.registry.get("pin-bad") is None
            assert agent.sessions_established == 0 and not agent.connected
            agent.stop()  # between attempts: run() returns without another one


async def test_one_attempt_reports_the_mismatch_as_an_exception(cluster):
    agent = cluster.agent("pin-bad", ca_file=None, server_fingerprint=WRONG_PIN)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            with pytest.raises(ServerFingerprintMismatch) as info:
                await agent._serve_one_session(nursery, trio.TASK_STATUS_IGNORED)
    assert info.value.expected == WRONG_PIN
    assert info.value.presented == fingerprint_of_pem_file(cluster.cert)


async def test_unreachable_server_is_retried_not_fatal(agent_log):
    failures = agent_log("Connection to server failed")
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))  # a port nobody answers on
        agent = Agent("nobody", ("127.0.0.1", sock.getsockname()[1]), handshake_timeout=0.1,
                      reconnect_initial_delay=0.01)
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent.run)
                await failures.wait(2)
                agent.stop()


async def test_stop_closes_politely_and_run_returns(cluster):
    agent = cluster.agent("stopper")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            link = cluster.manager.registry.get("stopper")
            agent.stop()
        # run() returned; the server heard the goodbye (its idle timeout is 10 s).
        assert not agent.connected
        await link.session.terminated.wait()
        assert (link.session.close_error_code, link.session.close_reason) == (0, "agent shutting down")
        assert cluster.manager.clients() == []


# -- the examples ---------------------------------------------------------------------


def load_example_executor() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_executor", EXAMPLES / "executor.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_example_executor_through_an_in_process_agent(cluster, tmp_path):
    example = load_example_executor()
    registry = example.build_registry()
    assert {"restart", "disk_usage", "file_checksum", "uptime", "echo"} <= set(registry.command_types)
    data = tmp_path / "blob.bin"
    data.write_bytes(b"quic" * 10_000)
    manager = cluster.manager
    with trio.fail_after(TIMEOUT):
        _, scope = await cluster.start_agent("example", executor=registry)

        restart = await manager.send_and_wait("example", "restart",
                                              {"service": "nginx", "delay_seconds": 0.01})
        assert restart.status is CommandStatus.COMPLETED, restart
        assert restart.result["success"] is True and restart.result["service"] == "nginx"

        usage = await manager.send_and_wait("example", "disk_usage", {"path": str(tmp_path)})
        assert usage.status is CommandStatus.COMPLETED, usage
        assert usage.result["total"] >= usage.result["free"] > 0

        checksum = await manager.send_and_wait("example", "file_checksum", {"path": str(data)})
        assert checksum.result == {
            "path": str(data), "size": 40_000, "sha256": hashlib.sha256(data.read_bytes()).hexdigest()
        }

        uptime = await manager.send_and_wait("example", "uptime")
        assert uptime.status is CommandStatus.COMPLETED and uptime.result["process_seconds"] >= 0

        for command_type, payload, code in [
            ("disk_usage", {"path": 42}, "invalid_payload"),
            ("disk_usage", {"path": str(tmp_path / "missing")}, "not_found"),
            ("file_checksum", {"path": str(tmp_path)}, "invalid_payload"),
            ("restart", {"delay_seconds": -1}, "invalid_payload"),
            ("reboot_the_moon", {}, "unknown_command_type"),
        ]:
            failed = await manager.send_and_wait("example", command_type, payload)
            assert (failed.status, failed.error_code) == (CommandStatus.FAILED, code), failed

        # The async restart is cancellable mid-delay.
        slow = await manager.send_command("example", "restart", {"delay_seconds": 60})
        await manager.cancel(slow.command_id)
        assert (await manager.get_command(slow.command_id)).status is CommandStatus.CANCELLED
        scope.cancel()


async def test_example_seed_style_executor(cluster):
    example = load_example_executor()
    with trio.fail_after(TIMEOUT):
        _, scope = await cluster.start_agent("seed", executor=example.SeedStyleExecutor())
        done = await cluster.manager.send_and_wait("seed", "disk_usage", {"path": "/"})
        assert done.status is CommandStatus.COMPLETED
        unknown = await cluster.manager.send_and_wait("seed", "echo")
        assert unknown.error_code == "unknown_command_type"
        scope.cancel()


async def test_server_example_and_client_example_run_together(tmp_path):
    python = sys.executable
    with trio.fail_after(60):
        async with spawn(
            [python, str(EXAMPLES / "server_example.py"), "--quic", "127.0.0.1:0",
             "--wait-for-agent", "30"],
            cwd=tmp_path,
        ) as server_run:
            line = await server_run.stdout.wait_for("QUIC endpoint listening on")
            address = line.rsplit(" ", 1)[1]
            async with spawn(
                [python, str(EXAMPLES / "client_example.py"), "--id", "client-001",
                 "--server", address],
                cwd=tmp_path,
            ) as client_run:
                assert await server_run.process.wait() == 0, f"{server_run.stdout}\n{server_run.stderr}"
                output = str(server_run.stdout)
                for expected in [
                    "== echo (waited for the agent)",
                    'result={"hello": "world"}',
                    "type=restart status=completed",
                    "type=disk_usage status=completed",
                    "type=file_checksum status=completed",
                    "error_code=execution_timeout",
                    "error_code=cancelled error=changed my mind",
                    "error_code=unknown_command_type",
                    "error_code=invalid_payload",
                    "history for client-001: 11 commands",
                    "Server stopped.",
                ]:
                    assert expected in output, output
                assert client_run.stderr.matching("Trusting the server's dev certificate")
                # Logged inside its signal handling, so SIGINT now means agent.stop().
                await client_run.stderr.wait_for("Agent status client_id=client-001")
                client_run.process.send_signal(signal.SIGINT)
                assert await client_run.process.wait() == 0, str(client_run.stderr)
                assert not client_run.stderr.matching("Traceback"), str(client_run.stderr)


def test_the_agent_class_refuses_an_id_or_labels_the_server_would_refuse_at_every_hello():
    with pytest.raises(ValueError, match="printable"):
        Agent("a\nb", ("127.0.0.1", 8474))
    with pytest.raises(ValueError, match="printable"):
        Agent("x" * 257, ("127.0.0.1", 8474))
    with pytest.raises(ValueError, match="labels must be printable"):
        Agent("a", ("127.0.0.1", 8474), labels={"role": "web\r\nforged"})


async def test_a_ca_file_damaged_while_connected_is_retried_and_a_rotated_one_used(cluster, agent_log, tmp_path):
    # The CA file is read at each dial: one emptied while the agent was
    # connected fails the next dials with its name (aioquic, left to read it
    # mid-handshake, raised out of the agent), and the file put back (a
    # rotation) is used from the next dial on.
    failures = agent_log("Connection to server failed")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(cluster.cert.read_bytes())
    with trio.fail_after(TIMEOUT):
        agent, scope = await cluster.start_agent("rotating", ca_file=ca_file)
        ca_file.write_bytes(b"")
        agent.session.close(reason="test: reconnect")
        await failures.wait(2)
        assert f"cannot use the CA file {ca_file}: not a PEM certificate file" in failures.messages[0]
        ca_file.write_bytes(cluster.cert.read_bytes())
        await wait_until(lambda: agent.sessions_established == 2)
        command = await cluster.manager.send_and_wait("rotating", "echo", {"after": "rotation"})
        assert command.status is CommandStatus.COMPLETED
        scope.cancel()


async def test_a_ca_file_of_openssls_trusted_certificate_form_is_used(cluster, tmp_path):
    # What OpenSSL loads, aioquic (which verifies with OpenSSL) can use: the
    # check before each dial must not refuse it for the cryptography
    # package's narrower idea of PEM.
    trusted = tmp_path / "trusted.pem"
    subprocess.run(
        ["openssl", "x509", "-in", str(cluster.cert), "-trustout", "-out", str(trusted)], check=True
    )
    assert trusted.read_text().startswith("-----BEGIN TRUSTED CERTIFICATE-----")
    with trio.fail_after(TIMEOUT):
        agent, scope = await cluster.start_agent("trusting", ca_file=trusted)
        assert agent.sessions_established == 1
        scope.cancel()


async def test_a_system_ca_file_openssl_cannot_load_fails_the_dial_not_the_agent(server, tmp_path):
    # aioquic loads the system CA file only during the handshake, and raised
    # out of its packet handling, and the agent, if it could not: the dial
    # fails, saying why, and the agent goes on retrying.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    env = {"SSL_CERT_FILE": str(garbage), "SSL_CERT_DIR": str(tmp_path / "none")}
    with trio.fail_after(TIMEOUT):
        async with agent_cli("--id", "bad-system-ca", "--server", server.address,
                             cwd=elsewhere, env=env) as agent:
            failure = await agent.stderr.wait_for("Connection to server failed", count=2)
            assert f"cannot use the system CA file {garbage}" in failure
            assert agent.process.returncode is None
            assert "Traceback" not in str(agent.stderr)
            assert server.manager.connects == []
