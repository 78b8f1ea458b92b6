"""Agent authentication over real loopback QUIC with verified TLS: a real
server whose agent tokens live in a temporary data dir, real agents.

Every refusal must happen before the agent is registered, must close with
UNAUTHORIZED, and must make ``Agent.run`` raise AgentUnauthorized after one
attempt (no redialling).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import AsyncIterator

import pytest
import trio
from aioquic.quic.connection import QuicConnection

from trio_quiccmd import AgentUnauthorized, CommandManager, CommandServer, ManagerSettings
from trio_quiccmd.quic.tls import ensure_dev_certificate
from trio_quiccmd.server.auth import AgentAuthenticator
from trio_quiccmd.server.core import server_quic_configuration
from trio_quiccmd.tokens import (
    DEV_AGENT_TOKEN_FILE,
    issue_agent_token,
    issue_enrollment_token,
    read_token_file,
    revoke_agent_token,
    token_hash,
)

from .conftest import Cluster, wait_until
from .processes import spawn

TIMEOUT = 15
#: Tests that start an agent process (it imports aioquic first).
CLI_TIMEOUT = 30


@pytest.fixture
async def secured(dev_cert, tmp_path: Path) -> AsyncIterator[Cluster]:
    """A cluster whose server authenticates agents from ``tmp_path/data``
    (the development credential written there), checking the token file for
    changes every 50 ms."""
    cert, key = dev_cert
    authenticator = AgentAuthenticator.from_data_dir(tmp_path / "data")
    server = CommandServer(
        CommandManager(settings=ManagerSettings(), authenticator=authenticator),
        server_quic_configuration(cert, key, idle_timeout=10.0),
        credential_check_interval=0.05,
    )
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        cluster = Cluster(nursery, server, address, cert)
        cluster.data_dir = tmp_path / "data"  # type: ignore[attr-defined]
        yield cluster
        with trio.fail_after(10):
            await server.shutdown(grace=1.0)
        nursery.cancel_scope.cancel()


async def refused(cluster: Cluster, client_id: str, **options) -> AgentUnauthorized:
    """Run an agent that must be refused; returns the exception its run() raised."""
    agent = cluster.agent(client_id, **options)
    with pytest.raises(AgentUnauthorized) as info:
        await agent.run()
    assert agent.sessions_established == 0
    assert cluster.manager.registry.get(client_id) is None
    return info.value


def rejections(caplog, client_id: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records
        if r.getMessage().startswith(f"Agent rejected client_id={client_id} ")
    ]


async def test_own_token_admits_the_agent_and_its_bound_labels_replace_claimed_ones(secured, caplog):
    caplog.set_level(logging.INFO)
    token = issue_agent_token(secured.data_dir, "client-001", labels={"role": "web"})
    with trio.fail_after(TIMEOUT):
        agent, _ = await secured.start_agent(
            "client-001", token=token, labels={"role": "admin", "extra": "x"}
        )
        # The token's labels are the server's word; the agent's claim is ignored.
        assert secured.manager.registry.labels_of("client-001") == {"role": "web"}
        assert [c.labels for c in secured.manager.clients()] == [{"role": "web"}]
        command = await secured.manager.send_and_wait("client-001", "echo", {"x": 1})
        assert command.result == {"x": 1}
    assert any("credential=token" in r.getMessage() for r in caplog.records if "Agent connected" in r.getMessage())
    # The secret is not kept on the server's side of the link.
    assert secured.manager.registry.get("client-001").hello.token is None


async def test_a_wrong_token_is_refused_and_the_agent_stops_after_one_attempt(secured, caplog):
    caplog.set_level(logging.INFO)
    issue_agent_token(secured.data_dir, "client-001")
    with trio.fail_after(TIMEOUT):
        error = await refused(secured, "client-001", token="qca_not-the-right-one")
    assert "invalid token for client_id client-001" in error.reason
    # One HELLO, one refusal: the agent did not redial (its backoff here is 50 ms,
    # so a retrying agent would have tried many times by now).
    assert len(rejections(caplog, "client-001")) == 1
    assert any(
        r.levelno == logging.ERROR and r.getMessage().startswith("Agent unauthorized, stopping client_id=client-001")
        for r in caplog.records
    )


async def test_a_refusal_is_acted_on_as_it_arrives_not_after_the_draining_period(secured, monkeypatch):
    # On a slow path aioquic reports the connection over only 3 x PTO after
    # the server's CONNECTION_CLOSE: the agent waited that long to hear of
    # the refusal, and, with a WELCOME wait shorter than that, took it for a
    # server that did not answer, and redialled for good.
    issue_agent_token(secured.data_dir, "client-001")
    begin_closing = QuicConnection._close_begin

    def slow_path(self: QuicConnection, is_initiator: bool, now: float) -> None:
        begin_closing(self, is_initiator, now)
        if not is_initiator:
            self._close_at = now + 600.0

    monkeypatch.setattr(QuicConnection, "_close_begin", slow_path)
    agent = secured.agent("client-001", token="qca_not-the-right-one", handshake_timeout=60.0,
                          reconnect_initial_delay=60, reconnect_max_delay=60)
    with trio.fail_after(TIMEOUT):
        with pytest.raises(AgentUnauthorized):
            await agent.run()


async def test_a_missing_token_is_refused(secured, caplog):
    caplog.set_level(logging.INFO)
    issue_agent_token(secured.data_dir, "client-001")
    with trio.fail_after(TIMEOUT):
        error = await refused(secured, "client-001")
    assert "no token presented" in error.reason
    assert rejections(caplog, "client-001") == [
        "Agent rejected client_id=client-001 remote=" + rejections(caplog, "client-001")[0].split("remote=")[1]
    ]
    assert "reason='no token presented'" in rejections(caplog, "client-001")[0]


async def test_a_hello_replayed_with_another_client_id_is_refused(secured, caplog):
    caplog.set_level(logging.INFO)
    token_1 = issue_agent_token(secured.data_dir, "client-001")
    issue_agent_token(secured.data_dir, "client-002")
    with trio.fail_after(TIMEOUT):
        await refused(secured, "client-002", token=token_1)
        # A client_id without a token of its own is not open either.
        await refused(secured, "client-003", token=token_1)
        # The real owner still connects.
        await secured.start_agent("client-001", token=token_1)
    (line,) = rejections(caplog, "client-002")
    assert "token_of=client-001" in line  # the server's log says whose token it was


async def test_the_enrollment_token_admits_new_client_ids_only(secured):
    own = issue_agent_token(secured.data_dir, "client-001")
    enrollment = issue_enrollment_token(secured.data_dir)
    with trio.fail_after(TIMEOUT):
        await secured.start_agent("newcomer-7", token=enrollment, labels={"zone": "a"})
        link = secured.manager.registry.get("newcomer-7")
        assert link.credential == "enrollment"
        assert link.hello.labels == {"zone": "a"}  # self-declared: nothing bound
        # A client_id with its own token cannot be claimed with the enrollment token.
        error = await refused(secured, "client-001", token=enrollment)
        assert "invalid token for client_id client-001" in error.reason
        await secured.start_agent("client-001", token=own)


async def disconnected_by(cluster: Cluster, client_id: str, token: str, change) -> AgentUnauthorized:
    """Connect ``client_id``, then ``change()`` the token file; returns what
    the agent's run() raised when the server closed it (it must end by itself)."""
    agent = cluster.agent(client_id, token=token)
    outcome: list[AgentUnauthorized] = []

    async def run() -> None:
        try:
            await agent.run()
        except AgentUnauthorized as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await wait_until(lambda: cluster.manager.registry.get(client_id) is not None)
        change()
    assert len(outcome) == 1 and agent.sessions_established == 1
    assert cluster.manager.registry.get(client_id) is None
    return outcome[0]


async def test_a_revoked_token_disconnects_its_agent_and_is_refused_afterwards(secured, caplog):
    caplog.set_level(logging.INFO)
    token = issue_agent_token(secured.data_dir, "client-001")
    issue_agent_token(secured.data_dir, "client-002")  # so the file keeps agent tokens
    with trio.fail_after(TIMEOUT):
        error = await disconnected_by(
            secured, "client-001", token, lambda: revoke_agent_token(secured.data_dir, "client-001")
        )
        assert error.reason == "unauthorized: credential revoked"
        await refused(secured, "client-001", token=token)
    assert any("action=disconnect" in line for line in rejections(caplog, "client-001"))


async def test_a_revocation_first_noticed_by_a_hello_still_disconnects_the_agent(secured):
    token = issue_agent_token(secured.data_dir, "client-001")
    issue_agent_token(secured.data_dir, "client-002")

    def revoke_then_a_hello_reloads() -> None:
        revoke_agent_token(secured.data_dir, "client-001")
        # What any HELLO does first: re-read the changed file, before the
        # periodic check looks.
        secured.manager.registry.authenticator.refresh()

    with trio.fail_after(TIMEOUT):
        error = await disconnected_by(secured, "client-001", token, revoke_then_a_hello_reloads)
    assert error.reason == "unauthorized: credential revoked"


async def test_a_token_created_on_the_running_server_works_at_once(secured):
    with trio.fail_after(TIMEOUT):
        await refused(secured, "client-009", token="qca_unknown")
        token = issue_agent_token(secured.data_dir, "client-009")
        await secured.start_agent("client-009", token=token)


async def test_the_development_credential_works_only_until_agent_tokens_exist(secured, caplog):
    caplog.set_level(logging.INFO)
    dev = read_token_file(secured.data_dir / DEV_AGENT_TOKEN_FILE)
    with trio.fail_after(TIMEOUT):
        # A fresh data dir: any client_id with the development credential.
        agent, _ = await secured.start_agent("dev-0", token=dev)
        assert secured.manager.registry.get("dev-0").credential == "development"
        agent.stop()
        # The first real token turns it off: a connected agent is closed ...
        await disconnected_by(
            secured, "dev-1", dev, lambda: issue_agent_token(secured.data_dir, "client-001")
        )
        # ... and it is refused from now on, with a reason that says why.
        error = await refused(secured, "dev-2", token=dev)
    assert "the development credential is not accepted: this server has agent tokens" in error.reason


async def test_an_embedded_server_without_an_authenticator_takes_hellos_at_their_word(cluster):
    with trio.fail_after(TIMEOUT):
        await cluster.start_agent("anyone", token=None)
        assert cluster.manager.registry.get("anyone").credential == ""


# -- the agent's command line ----------------------------------------------------------------


@pytest.fixture
async def cli_server(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A secured server whose data dir is ``tmp_path/.quiccmd``, as ``python -m
    trio_quiccmd.server`` started in ``tmp_path`` would have it."""
    data_dir = tmp_path / ".quiccmd"
    cert, key, _ = ensure_dev_certificate(data_dir)
    server = CommandServer(
        CommandManager(authenticator=AgentAuthenticator.from_data_dir(data_dir)),
        server_quic_configuration(cert, key),
    )
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        cluster = Cluster(nursery, server, address, cert)
        cluster.data_dir = data_dir  # type: ignore[attr-defined]
        yield cluster
        with trio.fail_after(10):
            await server.shutdown(grace=1.0)
        nursery.cancel_scope.cancel()


def agent_cli(cluster: Cluster, *args: str, env: dict[str, str] | None = None):
    return spawn(
        [sys.executable, "-m", "trio_quiccmd.agent", "--server", f"127.0.0.1:{cluster.address[1]}", *args],
        cwd=cluster.data_dir.parent, env=env, name="agent",
    )


async def test_the_cli_sends_the_token_from_a_file_or_the_environment(cli_server):
    token = issue_agent_token(cli_server.data_dir, "cli-1")
    (cli_server.data_dir.parent / "cli-1.token").write_text(token + "\n")
    issue_agent_token(cli_server.data_dir, "cli-2")
    token_2 = issue_agent_token(cli_server.data_dir, "cli-2", replace=True)
    with trio.fail_after(CLI_TIMEOUT):
        async with agent_cli(cli_server, "--id", "cli-1", "--token-file", "cli-1.token") as one:
            async with agent_cli(cli_server, "--id", "cli-2", env={"QUICCMD_AGENT_TOKEN": token_2}) as two:
                await wait_until(lambda: {"cli-1", "cli-2"} <= {c.client_id for c in cli_server.manager.clients()})
                line = await one.stderr.wait_for("Agent starting")
                assert "token=--token-file" in line
                assert "token=QUICCMD_AGENT_TOKEN" in await two.stderr.wait_for("Agent starting")
                assert cli_server.manager.registry.get("cli-1").credential == "token"


async def test_the_cli_stops_with_exit_1_and_one_clear_error_on_a_refused_token(cli_server, caplog):
    caplog.set_level(logging.INFO)
    issue_agent_token(cli_server.data_dir, "cli-1")
    with trio.fail_after(CLI_TIMEOUT):
        async with agent_cli(cli_server, "--id", "cli-1", "--token", "qca_wrong") as agent:
            assert await agent.process.wait() == 1
            await agent.stderr.closed.wait()
    [line] = agent.stderr.matching("ERROR")
    assert "Agent unauthorized, stopping client_id=cli-1" in line
    assert "reason='unauthorized: invalid token for client_id cli-1'" in line
    # It tried once: one rejection on the server, one connection attempt in its log.
    assert len(rejections(caplog, "cli-1")) == 1
    assert not agent.stderr.matching("Reconnecting")
    assert not agent.stderr.matching("Traceback")


async def test_a_flood_of_bad_hellos_does_not_use_up_the_real_agents_hello_budget(dev_cert, tmp_path, caplog):
    from trio_quiccmd.wire import Hello, ProtocolErrorCode, encode_frame

    from .test_protocol_errors import send_raw_and_wait_close

    caplog.set_level(logging.INFO, logger="trio_quiccmd")
    cert, key = dev_cert
    data = tmp_path / "data"
    good = issue_agent_token(data, "good")
    # One HELLO of budget (burst 1), refilled every 2 s: longer than this test.
    server = CommandServer(
        CommandManager(
            settings=ManagerSettings(max_hello_rate=0.5),
            authenticator=AgentAuthenticator.from_data_dir(data),
        ),
        server_quic_configuration(cert, key, idle_timeout=10.0),
    )
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve, "127.0.0.1", 0)
            cluster = Cluster(nursery, server, address, cert)
            bad = encode_frame(Hello(client_id="intruder", token="qca_" + "x" * 43))
            codes = [await send_raw_and_wait_close(cluster, bad) for _ in range(4)]
            # The first is refused for its credential; the rest are over the
            # failures' own budget, and not logged one by one.
            assert codes == [ProtocolErrorCode.UNAUTHORIZED] + [ProtocolErrorCode.RATE_LIMITED] * 3
            assert len(rejections(caplog, "intruder")) == 1
            # The real agent's HELLO still finds the budget untouched: admitted at once.
            agent, scope = await cluster.start_agent("good", token=good)
            assert agent.sessions_established == 1
            assert not [r for r in caplog.records if "HELLO refused client_id=good" in r.getMessage()]
            scope.cancel()
            with trio.fail_after(10):
                await server.shutdown(grace=1.0)
            nursery.cancel_scope.cancel()


def test_a_change_of_authentication_mode_is_a_warning(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trio_quiccmd")
    data = tmp_path / "data"
    authenticator = AgentAuthenticator.from_data_dir(data)
    dev = read_token_file(data / DEV_AGENT_TOKEN_FILE)
    assert authenticator.check("x", token_hash(dev)).credential == "development"

    def mode_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and "authentication mode changed" in r.getMessage()]

    issue_agent_token(data, "a")
    authenticator.refresh()
    assert mode_warnings() == [
        "Agent authentication mode changed mode=tokens (agent tokens exist; the development "
        "credential is no longer accepted)"
    ]
    # Revoking the last token silently re-enabled the development credential.
    revoke_agent_token(data, "a")
    authenticator.refresh()
    assert len(mode_warnings()) == 2
    assert "mode=development" in mode_warnings()[1] and "ANY client_id" in mode_warnings()[1]
    authenticator.refresh()
    assert len(mode_warnings()) == 2  # said once per change
