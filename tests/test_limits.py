"""Server limits: queued commands per agent, unfinished commands, connected
agents, the HELLO rate and handshakes in progress. Each refuses with a
clear error and creates nothing.

Unit tests drive the manager on a virtual clock with recording sessions (see
test_manager); the HELLO flood runs over real QUIC.
"""

from __future__ import annotations

import socket
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest
import trio
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import QuicErrorCode, QuicPacketType, pull_quic_header

from trio_quiccmd import (
    CommandManager,
    CommandServer,
    CommandStatus,
    ManagerSettings,
    QueueFull,
    TooManyCommands,
)
from trio_quiccmd.agent.client import Agent
from trio_quiccmd.errors import PayloadTooLarge
from trio_quiccmd.quic.connection import SessionHandler, connect
from trio_quiccmd.quic.admission import HANDSHAKE_SLOT_SECONDS
from trio_quiccmd.server.core import server_quic_configuration
from trio_quiccmd.wire import Hello, ProtocolError, ProtocolErrorCode, Welcome, encode_frame

from .conftest import wait_until
from .recording import RecordingSession, answer, connect_agent
from .test_protocol_errors import raw_client_configuration


@pytest.fixture
async def limited(autojump_clock):
    """A factory: ``await limited(**settings)`` gives a running manager."""
    async with trio.open_nursery() as nursery:

        async def make(**settings) -> CommandManager:
            settings.setdefault("max_in_flight_per_agent", 1)
            manager = CommandManager(settings=ManagerSettings(**settings))
            await nursery.start(manager.run)
            return manager

        yield make
        nursery.cancel_scope.cancel()


async def _stored(manager: CommandManager) -> int:
    return len((await manager.list_commands(limit=1000)).commands)


def hello(manager: CommandManager, client_id: str) -> tuple:
    """Like connect_agent, but a refused HELLO is returned, not raised."""
    link = manager.registry.new_link()
    session = RecordingSession()
    link.handshake_completed(session)
    try:
        link.frame_received(session, 0, Hello(client_id=client_id))
    except ProtocolError as exc:
        return link, session, exc.code
    return link, session, None


# -- queued commands per agent -------------------------------------------------


async def test_queue_full_refuses_and_creates_nothing(limited):
    manager = await limited(max_queued_per_agent=2)
    link, session = connect_agent(manager, "c1")
    running = await manager.send_command("c1", "sleep")
    assert running.status is CommandStatus.EXECUTING
    queued = [await manager.send_command("c1", "echo", i) for i in range(2)]
    assert {c.status for c in queued} == {CommandStatus.PENDING}
    assert manager.queued_count("c1") == 2

    with pytest.raises(QueueFull) as info:
        await manager.send_command("c1", "echo", "one too many")
    assert info.value.code == "queue_full" and info.value.limit == 2
    assert "c1" in str(info.value) and "max_queued_per_agent" in str(info.value)
    assert await _stored(manager) == 3 and manager.unfinished_count == 3
    assert manager.queued_count("c1") == 2

    # Other agents have their own queues.
    connect_agent(manager, "c2")
    await manager.send_command("c2", "sleep")
    assert (await manager.send_command("c2", "echo")).status is CommandStatus.PENDING

    # The queue drains (one is sent when the running one finishes, one is
    # cancelled): room again.
    answer(link, session, running.command_id)
    assert manager.queued_count("c1") == 1
    await manager.cancel(queued[1].command_id)
    assert manager.queued_count("c1") == 0
    for _ in range(2):
        assert (await manager.send_command("c1", "echo")).status is CommandStatus.PENDING
    with pytest.raises(QueueFull):
        await manager.send_command("c1", "echo")


async def test_queue_limit_holds_for_an_offline_agent_and_timeouts_free_it(limited, autojump_clock):
    manager = await limited(max_queued_per_agent=3)
    for _ in range(3):
        await manager.send_command("away", "echo", connect_timeout=5)
    with pytest.raises(QueueFull):
        await manager.send_command("away", "echo", connect_timeout=5)
    # Without connect_timeout the command fails agent_offline as always: it
    # never waits in the queue, so the queue limit does not apply.
    offline = await manager.send_command("away", "echo")
    assert offline.error_code == "agent_offline"
    await trio.sleep(6)  # the queued ones end delivery_timeout
    assert manager.queued_count("away") == 0 and manager.unfinished_count == 0
    await manager.send_command("away", "echo", connect_timeout=5)


# -- unfinished commands on the server -----------------------------------------


async def test_too_many_unfinished_commands_refuses_and_creates_nothing(limited):
    manager = await limited(max_unfinished_commands=3, max_in_flight_per_agent=4)
    link, session = connect_agent(manager, "c1")
    connect_agent(manager, "c2")
    first = await manager.send_command("c1", "sleep")
    await manager.send_command("c1", "sleep")
    await manager.send_command("away", "sleep", connect_timeout=10)
    for client_id, options in (("c2", {}), ("c1", {}), ("away", {"connect_timeout": 10})):
        with pytest.raises(TooManyCommands) as info:
            await manager.send_command(client_id, "echo", **options)
        assert info.value.code == "too_many_commands" and info.value.limit == 3
    assert "max_unfinished_commands" in str(info.value)
    assert await _stored(manager) == 3 and manager.unfinished_count == 3
    # An offline agent without connect_timeout still gets its failed command:
    # it is finished at once, so it holds nothing.
    assert (await manager.send_command("nobody", "echo")).error_code == "agent_offline"

    answer(link, session, first.command_id)
    assert (await manager.send_command("c2", "echo")).status is CommandStatus.EXECUTING
    with pytest.raises(TooManyCommands):
        await manager.send_command("c2", "echo")


# -- one COMMAND frame ---------------------------------------------------------------


async def test_a_command_type_is_measured_as_the_wire_writes_it(limited):
    # The wire writes a non-ASCII character as a 6-byte \uXXXX escape: this
    # type is 400 kB of UTF-8 but a 1.2 MB COMMAND frame, which the agent
    # would answer by closing its connection, again on every re-send.
    manager = await limited()
    link, session = connect_agent(manager, "c1")
    with pytest.raises(PayloadTooLarge) as info:
        await manager.send_command("c1", "é" * 200_000)
    assert info.value.code == "payload_too_large"
    assert await _stored(manager) == 0
    command = await manager.send_command("c1", "redémarrer", {"service": "café"})
    assert command.status is CommandStatus.EXECUTING
    (frame,) = session.commands()
    assert (frame.command_type, frame.payload) == ("redémarrer", {"service": "café"})


# -- connected agents --------------------------------------------------------------


async def test_too_many_agents_closes_the_extra_hello_but_replacement_is_allowed(limited):
    manager = await limited(max_agents=2)
    _, first_a, _ = hello(manager, "a")
    hello(manager, "b")
    link, session, code = hello(manager, "c")
    assert code is ProtocolErrorCode.TOO_MANY_AGENTS
    # Refused before anything happened: no WELCOME, not registered.
    assert session.streams == {} and link.hello is None
    assert manager.registry.get("c") is None and len(manager.registry) == 2
    # Frames after the refusal (same datagram) are ignored, not re-judged.
    link.frame_received(session, 0, Hello(client_id="c"))

    # "a" reconnecting replaces its old link: not one more agent.
    _, second_a, code = hello(manager, "a")
    assert code is None and isinstance(second_a.streams[0][0], Welcome)
    assert first_a.closed_with == ProtocolErrorCode.REPLACED
    assert len(manager.registry) == 2

    # Once an agent leaves, a new one fits.
    b = manager.registry.get("b")
    b.connection_lost(b.session, 0, "bye")
    assert hello(manager, "c")[2] is None
    assert {link.client_id for link in manager.registry.links()} == {"a", "c"}


# -- HELLO rate ------------------------------------------------------------------------


async def test_hello_rate_is_a_token_bucket_on_trios_clock(limited, autojump_clock):
    manager = await limited(max_hello_rate=4)
    # A burst of one second's worth, then refusals.
    assert [hello(manager, f"a{i}")[2] for i in range(5)] == [None] * 4 + [ProtocolErrorCode.RATE_LIMITED]
    refused = hello(manager, "late")
    assert refused[2] is ProtocolErrorCode.RATE_LIMITED
    assert refused[1].streams == {} and manager.registry.get("late") is None
    # Every HELLO counts, a reconnect too.
    assert hello(manager, "a0")[2] is ProtocolErrorCode.RATE_LIMITED
    await trio.sleep(0.25)  # one token back
    assert hello(manager, "late")[2] is None
    assert hello(manager, "later")[2] is ProtocolErrorCode.RATE_LIMITED
    await trio.sleep(10)  # refills, but only up to the burst
    assert [hello(manager, f"b{i}")[2] is None for i in range(5)] == [True] * 4 + [False]
    assert len(manager.registry) == 9


async def test_second_hello_on_a_connection_is_an_unexpected_frame(limited):
    manager = await limited()
    link, session = connect_agent(manager, "c1")
    with pytest.raises(ProtocolError) as info:
        link.frame_received(session, 0, Hello(client_id="c1"))
    assert info.value.code is ProtocolErrorCode.UNEXPECTED_FRAME


def test_agent_retries_after_limit_closes():
    # Not fatal: the agent reconnects with backoff (only UNSUPPORTED_VERSION
    # and REPLACED give up).
    for code in (ProtocolErrorCode.RATE_LIMITED, ProtocolErrorCode.TOO_MANY_AGENTS):
        Agent._raise_if_fatal(code, "limit")


# -- over real QUIC ----------------------------------------------------------------------

FLOOD_RATE = 5.0


@pytest.fixture
def manager_settings() -> ManagerSettings:
    return ManagerSettings(max_hello_rate=FLOOD_RATE)


class _RawHello(SessionHandler):
    def __init__(self) -> None:
        self.welcomed = trio.Event()

    def frame_received(self, session, stream_id, frame) -> None:
        if isinstance(frame, Welcome):
            self.welcomed.set()


async def raw_hello(cluster, client_id: str, *, again: bool = False) -> int | str:
    """Connect, say HELLO at once; returns the close code, or "welcomed".

    With ``again``, a second HELLO follows the WELCOME on the same stream.
    """
    handler = _RawHello()
    async with trio.open_nursery() as nursery:
        session = await connect(nursery, cluster.address, raw_client_configuration(cluster.cert), handler)
        stream_id = session.quic.get_next_available_stream_id()
        session.quic.send_stream_data(stream_id, encode_frame(Hello(client_id=client_id)))
        session._wake()
        with trio.move_on_after(3):
            async with trio.open_nursery() as race:

                async def until(event) -> None:
                    await event.wait()
                    race.cancel_scope.cancel()

                race.start_soon(until, handler.welcomed)
                race.start_soon(until, session.terminated)
        if handler.welcomed.is_set() and not again:
            await session.aclose()
            return "welcomed"
        if again:
            assert handler.welcomed.is_set()
            session.quic.send_stream_data(stream_id, encode_frame(Hello(client_id=client_id)))
            session._wake()
        await session.terminated.wait()
        return session.close_error_code


async def test_hello_flood_is_rate_limited_while_a_connected_agent_keeps_working(cluster):
    with trio.fail_after(30):
        await cluster.start_agent("good")
        flood = 40
        outcomes: list = []
        completed = 0
        flood_done = trio.Event()

        async def keep_sending() -> None:
            nonlocal completed
            while not flood_done.is_set():
                command = await cluster.manager.send_and_wait("good", "echo", completed)
                assert command.status is CommandStatus.COMPLETED and command.result == completed
                completed += 1

        async def one(i: int) -> None:
            outcomes.append(await raw_hello(cluster, f"flood-{i}"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_sending)
            started = trio.current_time()
            async with trio.open_nursery() as flooders:
                for i in range(flood):
                    flooders.start_soon(one, i)
            elapsed = trio.current_time() - started
            flood_done.set()

        welcomed = outcomes.count("welcomed")
        limited = outcomes.count(ProtocolErrorCode.RATE_LIMITED)
        assert welcomed + limited == flood, outcomes
        # No more than the bucket allows (burst + refill while flooding).
        assert 1 <= welcomed <= FLOOD_RATE + FLOOD_RATE * elapsed + 1, (outcomes, elapsed)
        assert limited >= 1, outcomes
        assert completed >= 1
        # The agent already connected was never disturbed.
        assert cluster.manager.registry.get("good") is not None
        assert (await cluster.manager.send_and_wait("good", "echo", "after")).result == "after"
        # A real agent refused RATE_LIMITED is not put off: it retries with
        # backoff and gets in once the bucket refills.
        for i in range(int(FLOOD_RATE) + 1):
            await raw_hello(cluster, f"drain-{i}")
        await cluster.start_agent("late")
        assert (await cluster.manager.send_and_wait("late", "echo", 1)).status is CommandStatus.COMPLETED


async def test_second_hello_on_the_same_connection_is_closed_unexpected_frame(cluster):
    with trio.fail_after(15):
        await cluster.start_agent("good")
        assert await raw_hello(cluster, "twice", again=True) == ProtocolErrorCode.UNEXPECTED_FRAME
        assert (await cluster.manager.send_and_wait("good", "echo", 2)).result == 2


# -- handshakes in progress ----------------------------------------------------------------


class _SilentClients:
    """New connections' first datagrams, all sent from one UDP socket whose
    owner never answers: handshakes that stay in progress, as from forged
    source addresses."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self._retries = 0

    def dial(self, address: tuple, cert, count: int) -> None:
        for _ in range(count):
            client = QuicConnection(configuration=raw_client_configuration(cert))
            client.connect(address, now=trio.current_time())
            for data, _addr in client.datagrams_to_send(now=trio.current_time()):
                self.sock.sendto(data, address)

    def retries(self) -> int:
        """Retry packets received so far."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self._retries
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
            self._retries += header.packet_type == QuicPacketType.RETRY

    def __enter__(self) -> "_SilentClients":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()


@asynccontextmanager
async def _server(dev_cert, **server_options: Any) -> AsyncIterator[tuple[CommandServer, tuple, trio.Nursery]]:
    """A real server on a loopback port: (server, its address, a nursery for agents)."""
    cert, key = dev_cert
    server = CommandServer(CommandManager(), server_quic_configuration(cert, key), **server_options)
    async with trio.open_nursery() as nursery:
        address = ("127.0.0.1", (await nursery.start(server.serve, "127.0.0.1", 0))[1])
        yield server, address, nursery
        await server.shutdown(grace=0.5)
        nursery.cancel_scope.cancel()


async def test_unproven_connections_beyond_half_the_handshake_limit_get_a_retry(
    dev_cert, autojump_clock
):
    cert, _key = dev_cert
    async with _server(dev_cert, max_handshakes=4) as (server, address, _nursery):
        endpoint = server.endpoint
        with trio.fail_after(30), _SilentClients() as silent:
            silent.dial(address, cert, 5)
            await wait_until(lambda: len(endpoint.sessions) + endpoint.admission.deferred == 5)
            # Two handshakes started (half the limit: their addresses are
            # unproven); the other three got only a Retry, which a client
            # that does not answer, or a forged address, never uses.
            assert (len(endpoint.sessions), endpoint.admission.deferred) == (2, 3)
            await wait_until(lambda: silent.retries() == 3)
            # A handshake that makes no progress gives its slot up in time:
            # then a new one is started.
            await trio.sleep(HANDSHAKE_SLOT_SECONDS)
            silent.dial(address, cert, 1)
            await wait_until(lambda: len(endpoint.sessions) == 3)
            assert endpoint.admission.deferred == 3


async def test_handshakes_from_unproven_addresses_do_not_keep_a_real_agent_out(dev_cert):
    # Initials from forged addresses (here: a socket that never answers) take
    # all the slots they may; a real agent answers the Retry from its own
    # address and gets one of the others at once.
    cert, _key = dev_cert
    with trio.fail_after(20):
        async with _server(dev_cert, max_handshakes=2) as (server, address, nursery):
            with _SilentClients() as silent:
                silent.dial(address, cert, 3)
                await wait_until(lambda: silent.retries() == 2)
                assert len(server.endpoint.sessions) == 1
                agent = Agent("real", address, ca_file=cert)
                dialled_at = trio.current_time()
                nursery.start_soon(agent.run)
                await agent.wait_connected()
                # At once: not after the unproven handshake's slot ran out.
                assert trio.current_time() - dialled_at < HANDSHAKE_SLOT_SECONDS / 2
                assert agent.sessions_established == 1
                # The silent ones' two, and the agent's first Initial (or more,
                # should it resend before the Retry reaches it).
                assert server.endpoint.admission.deferred >= 3
                assert (await server.manager.send_and_wait("real", "echo", "in")).result == "in"


async def test_agents_dialling_at_once_beyond_the_handshake_limit_all_connect(dev_cert):
    # Real agents whose first packet was dropped send it again (QUIC's probe
    # timeout) and get in as the handshakes before them finish.
    cert, _key = dev_cert
    with trio.fail_after(30):
        async with _server(dev_cert, max_handshakes=1) as (server, address, nursery):
            agents = [Agent(f"a{i}", address, ca_file=cert) for i in range(3)]
            for agent in agents:
                nursery.start_soon(agent.run)
            for agent in agents:
                await agent.wait_connected()
            assert server.endpoint.admission.deferred >= 1
            assert all(agent.sessions_established == 1 for agent in agents)
            for i in range(3):
                assert (await server.manager.send_and_wait(f"a{i}", "echo", i)).result == i


async def test_an_initial_with_a_token_the_server_did_not_issue_is_closed_invalid_token(dev_cert):
    # E.g. the server restarted between its Retry and the client's answer:
    # told at once, the agent dials afresh instead of waiting out its
    # handshake timeout.
    cert, _key = dev_cert
    with trio.fail_after(10):
        async with _server(dev_cert) as (server, address, _nursery):
            configuration = raw_client_configuration(cert)
            configuration.token = b"not a token of this server"
            client = QuicConnection(configuration=configuration)
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await sock.bind(("127.0.0.1", 0))
            client.connect(address, now=trio.current_time())
            for data, _addr in client.datagrams_to_send(now=trio.current_time()):
                await sock.sendto(data, address)
            client.receive_datagram(await sock.recv(65536), address, now=trio.current_time())
            client.handle_timer(client.get_timer())  # the end of its draining period
            events = []
            while (event := client.next_event()) is not None:
                events.append(event)
            assert [e.error_code for e in events if isinstance(e, ConnectionTerminated)] == [
                QuicErrorCode.INVALID_TOKEN
            ]
            assert server.endpoint.sessions == []
            sock.close()


async def test_many_large_commands_at_once_all_complete_on_one_connection(cluster):
    """Twenty 900 kB commands at once, each echoed back: every frame is
    unfinished at the receiver at the same time, since aioquic sends the
    streams it has data for in turns. A limit of 16 frames' worth closed the
    connection (BUFFER_EXCEEDED) again after every reconnect, and every
    command ran out its deadline. An agent's connection holds any number."""
    with trio.fail_after(60):
        await cluster.start_agent("big")
        session_id = cluster.manager.registry.get("big").session_id
        results: list[Any] = []

        async def one(i: int) -> None:
            results.append(
                await cluster.manager.send_and_wait("big", "echo", {"n": i, "data": "x" * 900_000}, timeout=50)
            )

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
    assert sorted(c.result["n"] for c in results if c.status is CommandStatus.COMPLETED) == list(range(20))
    assert cluster.manager.registry.get("big").session_id == session_id  # no reconnect
