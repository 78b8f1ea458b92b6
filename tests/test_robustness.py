"""Hostile peers, races and resource limits in the QUIC driver, manager and agent.

Each test states the behaviour DESIGN.md asks for and came out of a
line-by-line review (F-numbers name its findings). Tests that need a server
which could crash use ``guarded_cluster``: it records a crash instead of
letting it tear down the test, so a regression reads as an assertion.
"""

from __future__ import annotations

import math
import select
import socket
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest
import trio
import trio.testing
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from trio_quiccmd import (
    CommandManager,
    CommandServer,
    CommandStatus,
    ManagerSettings,
    builtin_executor,
)
from trio_quiccmd.agent.handler import CommandHandler
from trio_quiccmd.quic.connection import (
    ConnectionFailed,
    DatagramSocket,
    QuicSession,
    SessionHandler,
    connect,
    dial_order,
)
from trio_quiccmd.quic import connection as connection_module
from trio_quiccmd.server.core import server_quic_configuration
from trio_quiccmd.wire import (
    ALPN,
    CancelFrame,
    CommandFrame,
    Hello,
    ProtocolError,
    ProtocolErrorCode,
    ResultFrame,
    decode_body,
    encode_frame,
)

from .conftest import Cluster, wait_until
from .recording import RecordingSession, answer, connect_agent
from .test_protocol_errors import raw_client_configuration


# -- helpers -------------------------------------------------------------------


def _only_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in exc.exceptions)
    return False


@asynccontextmanager
async def guarded_cluster(
    dev_cert, settings: ManagerSettings | None = None, *, idle_timeout: float = 10.0
) -> AsyncIterator[Cluster]:
    """Like the ``cluster`` fixture, but a crash of ``CommandServer.serve`` is
    recorded in ``cluster.crashes`` instead of propagating."""
    cert, key = dev_cert
    server = CommandServer(
        CommandManager(settings=settings or ManagerSettings()),
        server_quic_configuration(cert, key, idle_timeout=idle_timeout),
    )
    crashes: list[BaseException] = []
    async with trio.open_nursery() as nursery:

        async def serve(task_status=trio.TASK_STATUS_IGNORED) -> None:
            try:
                await server.serve("127.0.0.1", 0, task_status=task_status)
            except BaseException as exc:
                if _only_cancelled(exc):
                    raise
                crashes.append(exc)

        address = await nursery.start(serve)
        cluster = Cluster(nursery, server, address, cert)
        cluster.crashes = crashes  # type: ignore[attr-defined]
        try:
            yield cluster
        finally:
            nursery.cancel_scope.cancel()


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _describe(crashes: list[BaseException]) -> str:
    return "; ".join(repr(leaf) for c in crashes for leaf in _leaves(c))


# -- F1: a peer's STOP_SENDING makes aioquic raise inside a synchronous callback ----


async def test_f1_stop_sending_before_hello_does_not_crash_the_server(dev_cert):
    """F1 (critical). An unauthenticated client sends STOP_SENDING and HELLO on
    its control stream. The server's WELCOME then hits
    ``QuicStreamSender.write`` -> RuntimeError("Cannot send data after the
    stream was reset"), which escapes ``_process_events`` ->
    ``QuicEndpoint._datagram_received`` -> the UDP receive loop: the whole
    server (every agent) goes down."""
    async with guarded_cluster(dev_cert) as cluster:
        with trio.fail_after(15):
            await cluster.start_agent("good")
            async with trio.open_nursery() as nursery:
                session = await connect(
                    nursery, cluster.address, raw_client_configuration(cluster.cert), SessionHandler()
                )
                stream_id = session.quic.get_next_available_stream_id()
                session.quic.send_stream_data(stream_id, encode_frame(Hello(client_id="mallory")))
                session.quic.stop_stream(stream_id, 0)
                session._wake()
                with trio.move_on_after(1):
                    await session.terminated.wait()
                nursery.cancel_scope.cancel()
            await trio.sleep(0.1)
            assert cluster.crashes == [], "server crashed: " + _describe(cluster.crashes)
            command = await cluster.manager.send_and_wait("good", "echo", "alive", timeout=2)
        assert command.status is CommandStatus.COMPLETED


async def test_f1b_stop_sending_after_hello_does_not_crash_the_deadline_task(dev_cert):
    """F1, second site. After HELLO, the agent STOP_SENDINGs its control
    stream; the next execution timeout makes ``_finish`` send CANCEL there, and
    the RuntimeError kills ``CommandManager._enforce_deadlines`` (and with it
    the server)."""
    async with guarded_cluster(dev_cert) as cluster:
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                session = await connect(
                    nursery, cluster.address, raw_client_configuration(cluster.cert), SessionHandler()
                )
                stream_id = session.quic.get_next_available_stream_id()
                session.quic.send_stream_data(stream_id, encode_frame(Hello(client_id="mallory")))
                session._wake()
                await wait_until(lambda: cluster.manager.registry.get("mallory") is not None)
                session.quic.stop_stream(stream_id, 0)
                session._wake()
                await trio.sleep(0.1)
                # mallory never answers: the command times out and CANCEL is sent.
                command = await cluster.manager.send_command("mallory", "echo", timeout=0.3)
                await trio.sleep(0.6)
                nursery.cancel_scope.cancel()
        assert cluster.crashes == [], "server crashed: " + _describe(cluster.crashes)
        # Stopping the server's side of the control stream ends the session.
        final = await cluster.manager.get_command(command.command_id)
        assert (final.status, final.error_code) == (CommandStatus.FAILED, "agent_offline")


async def test_f1c_payload_mutated_after_send_does_not_crash_the_server(dev_cert):
    """F1, third site (an encode error). The manager keeps the caller's payload
    object by reference and encodes it only at dispatch. A queued command
    whose dict the caller reuses is encoded inside ``result_received`` ->
    ``_dispatch`` (a QUIC callback): the TypeError escapes into the receive
    loop and the server dies."""
    settings = ManagerSettings(max_in_flight_per_agent=1)
    async with guarded_cluster(dev_cert, settings) as cluster:
        with trio.fail_after(15):
            await cluster.start_agent("c1")
            first = await cluster.manager.send_command("c1", "sleep", {"seconds": 0.2}, timeout=5)
            payload: dict[str, Any] = {"n": 1}
            queued = await cluster.manager.send_command("c1", "echo", payload, timeout=5)
            assert queued.status is CommandStatus.PENDING
            payload["n"] = {1, 2}  # the caller reuses its dict
            await cluster.manager.wait(first.command_id, timeout=3)
            await trio.sleep(0.3)
            assert cluster.crashes == [], "server crashed: " + _describe(cluster.crashes)
            final = await cluster.manager.wait(queued.command_id, timeout=3)
        # The command as accepted is what runs.
        assert final.status is CommandStatus.COMPLETED and final.result == {"n": 1}


async def test_f1d_hello_with_a_lone_surrogate_does_not_crash_the_server(dev_cert):
    """F1, fourth site, pre-authentication. ``decode_body`` accepts JSON
    ``"\\ud800"`` escapes, so ``client_id`` may hold a lone surrogate; the
    WELCOME echoes it in ``session_id`` and ``encode_frame`` raises
    UnicodeEncodeError inside ``frame_received``: one datagram kills the server."""
    async with guarded_cluster(dev_cert) as cluster:
        with trio.fail_after(15):
            await cluster.start_agent("good")
            body = b'{"type":"hello","client_id":"\\ud800"}'
            async with trio.open_nursery() as nursery:
                session = await connect(
                    nursery, cluster.address, raw_client_configuration(cluster.cert), SessionHandler()
                )
                stream_id = session.quic.get_next_available_stream_id()
                session.quic.send_stream_data(stream_id, len(body).to_bytes(4, "big") + body)
                session._wake()
                with trio.move_on_after(1):
                    await session.terminated.wait()
                nursery.cancel_scope.cancel()
            await trio.sleep(0.1)
            assert cluster.crashes == [], "server crashed: " + _describe(cluster.crashes)
            command = await cluster.manager.send_and_wait("good", "echo", "alive", timeout=2)
        assert command.status is CommandStatus.COMPLETED


# -- F2: sessions sharing the endpoint's socket and the _backlog path ----------------


class _KernelBufferFull(DatagramSocket):
    """The server's one UDP socket while the kernel send buffer is full."""

    def try_send(self, data, addr) -> bool:
        return False


async def test_f2_two_sessions_waiting_on_a_full_shared_socket_do_not_crash():
    """F2 (high). All server sessions share one socket. When the kernel buffer
    is full, each session's timer task calls ``trio.lowlevel.wait_writable``
    on that same socket; trio allows one waiter per socket, so the second
    raises BusyResourceError, which ends ``session.run`` ->
    ``QuicEndpoint._run_session`` -> the endpoint nursery -> the server."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    transport = _KernelBufferFull(a)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    while True:  # really fill it, so the socket is not writable
        try:
            a.send(b"x" * 512)
        except BlockingIOError:
            break
    assert select.select([], [a], [], 0)[1] == []
    sessions = []
    for _ in range(2):
        quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN]))
        quic.connect(("127.0.0.1", 9), now=trio.current_time())
        sessions.append(QuicSession(quic, transport, SessionHandler()))
    errors: list[BaseException] = []
    try:
        with trio.move_on_after(0.5):
            async with trio.open_nursery() as nursery:
                for session in sessions:
                    nursery.start_soon(session.run)
    except BaseExceptionGroup as group:
        errors = _leaves(group)
    finally:
        a.close()
        b.close()
    assert errors == [], f"a session task died: {errors!r}"


# -- F3: a peer-initiated close is not seen until the draining period ends ----------


async def test_f3_peer_close_is_noticed_at_once(cluster):
    """F3 (high). The agent closes its connection. aioquic moves the server's
    connection to DRAINING but emits ConnectionTerminated only after 3 PTO;
    until then the link is "open", and a new command is sent into the dead
    connection and marked executing (it will end execution_timeout, never
    reaching the agent when it comes back)."""
    with trio.fail_after(10):
        agent, _ = await cluster.start_agent("c1")
        quic = cluster.manager.registry.get("c1").session.quic
        agent.stop()
        await wait_until(lambda: quic._close_event is not None, interval=0.001)
        command = await cluster.manager.send_command("c1", "echo", timeout=5, connect_timeout=5)
    assert command.status is CommandStatus.PENDING, command
    assert cluster.manager.registry.get("c1") is None


# -- F4: results are lost across a reconnect -----------------------------------------


async def test_f4_result_produced_during_a_reconnect_is_delivered(cluster):
    """F4 (high; DESIGN "Semantics": a result is not lost because the
    connection dropped). The command keeps running on the agent across the
    reconnect, but ``Agent._execute`` sends its RESULT on the dead session
    (silently dropped), HELLO never carries ``held_results``, and the server
    ignores RESULTs on streams it did not open on this connection."""
    registry = builtin_executor()
    started = trio.Event()
    runs = 0

    @registry.register("slow")
    async def slow(payload):
        nonlocal runs
        runs += 1
        started.set()
        await trio.sleep(0.5)
        return "done"

    with trio.fail_after(15):
        agent, _ = await cluster.start_agent("c1", executor=registry)
        command = await cluster.manager.send_command("c1", "slow", timeout=3)
        await started.wait()
        agent.session.close(ProtocolErrorCode.NO_ERROR, "network blip")  # the agent reconnects
        final = await cluster.manager.wait(command.command_id)
    assert agent.sessions_established >= 2
    assert final.status is CommandStatus.COMPLETED, (final.status, final.error_code)
    assert final.result == "done" and runs == 1


# -- F5: the server opens more streams than the agent allows -------------------------


async def test_f5_commands_beyond_the_agents_stream_limit_stay_pending(cluster):
    """F5 (high). The agent allows 2 concurrent streams; the server's window
    is 256. aioquic silently *blocks* the third stream, yet the command is
    marked executing (sent_at set, execution deadline running). Cancelling it
    sends CANCEL for a command the agent has not got; when a slot frees, the
    blocked COMMAND goes out and the agent runs a command the server already
    reported cancelled."""
    started: list[int] = []
    registry = builtin_executor()

    @registry.register("work")
    async def work(payload):
        started.append(payload)
        await trio.sleep(0.3)
        return payload

    with trio.fail_after(15):
        await cluster.start_agent("c1", executor=registry, max_concurrent_commands=2)
        commands = [await cluster.manager.send_command("c1", "work", i, timeout=10) for i in range(3)]
        third_status = commands[2].status
        await cluster.manager.cancel(commands[2].command_id)
        for command in commands[:2]:
            await cluster.manager.wait(command.command_id)
        await trio.sleep(0.6)
    assert 2 not in started, "a command the server had cancelled ran on the agent"
    assert third_status is CommandStatus.PENDING


class _CommandsSeen(SessionHandler):
    """A hand-driven agent: records on which stream each COMMAND came."""

    def __init__(self) -> None:
        self.stream_of: dict[str, int] = {}

    def frame_received(self, session: QuicSession, stream_id: int, frame: Any) -> None:
        if isinstance(frame, CommandFrame):
            self.stream_of[frame.command_id] = stream_id


@pytest.mark.parametrize("give_up", ["cancel", "timeout"])
async def test_the_stream_of_a_command_given_up_on_holds_nothing_on_the_server(dev_cert, give_up):
    """Once the server gives up on a command (cancelled, or its deadline
    passed), it waits for nothing on the command's stream. An agent that
    started a large RESULT there and never finishes it made the server hold
    the unfinished frame (up to a stream window, 64 KiB) for as long as the
    connection lasted, stream after stream. The server now drops what the
    stream holds and what comes on it, and the agent's connection goes on."""
    async with guarded_cluster(dev_cert) as cluster:
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                agent = _CommandsSeen()
                session = await connect(nursery, cluster.address, raw_client_configuration(cluster.cert), agent)
                control = session.quic.get_next_available_stream_id()
                session.send_frame(control, Hello(client_id="mallory"))
                await wait_until(lambda: cluster.manager.registry.get("mallory") is not None)
                server_session = cluster.manager.registry.get("mallory").session
                command = await cluster.manager.send_command("mallory", "echo", timeout=2)
                await wait_until(lambda: command.command_id in agent.stream_of)
                stream_id = agent.stream_of[command.command_id]
                result = encode_frame(
                    ResultFrame(command_id=command.command_id, status="completed", result="x" * 60_000)
                )
                session.quic.send_stream_data(stream_id, result[:50_000])
                session._wake()
                await wait_until(lambda: server_session._buffered >= 50_000)
                if give_up == "cancel":
                    await cluster.manager.cancel(command.command_id)
                final = await cluster.manager.wait(command.command_id)
                assert server_session._buffered == 0
                assert stream_id not in server_session._decoders
                assert len(server_session.quic._streams[stream_id].receiver._buffer) == 0
                # The rest of the RESULT, and its FIN, change nothing.
                session.quic.send_stream_data(stream_id, result[50_000:], end_stream=True)
                session._wake()
                await wait_until(lambda: stream_id not in server_session.quic._discarding)
                assert not server_session.is_closing
                nursery.cancel_scope.cancel()
        assert cluster.crashes == [], "server crashed: " + _describe(cluster.crashes)
    expected = CommandStatus.CANCELLED if give_up == "cancel" else CommandStatus.TIMEOUT
    assert final.status is expected
    assert (await cluster.manager.get_command(command.command_id)).status is expected


# -- F6: a freed window slot does not dispatch the queue -----------------------------


async def test_f6_execution_timeout_frees_the_slot_for_queued_commands(manager, autojump_clock):
    """F6 (high). ``_finish`` (timeout/cancel of an executing command) frees a
    window slot in ``cancel_command`` but never calls ``_dispatch``; the
    agent's late "cancelled" RESULT is dropped by AgentLink before the
    manager sees it. Queued commands sit pending until their own delivery
    deadline, on an idle agent."""
    link, session = connect_agent(manager, "c1")
    for _ in range(4):
        await manager.send_command("c1", "sleep", timeout=5)
    queued = await manager.send_command("c1", "echo", timeout=100)
    assert queued.status is CommandStatus.PENDING
    await trio.sleep(6)
    assert link.in_flight == 1  # the slots went to the queued command
    assert (await manager.get_command(queued.command_id)).status is CommandStatus.EXECUTING


async def test_f6b_operator_cancel_frees_the_slot_for_queued_commands(manager, autojump_clock):
    """F6, cancel path."""
    link, session = connect_agent(manager, "c1")
    busy = [await manager.send_command("c1", "sleep", timeout=100) for _ in range(4)]
    queued = await manager.send_command("c1", "echo", timeout=100)
    await manager.cancel(busy[0].command_id)
    await trio.sleep(1)
    assert (await manager.get_command(queued.command_id)).status is CommandStatus.EXECUTING


# -- F7: agent crashes on its own command path ----------------------------------------


async def test_f7_deeply_nested_result_fails_the_command_not_the_agent():
    """F7 (medium-high). ``CommandHandler._completed`` catches TypeError and
    ValueError, but the JSON encoder raises RecursionError for a deeply nested
    result, and that call sits outside the handler's ``except Exception``. The
    exception escapes ``Agent._execute`` into the agent's nursery and
    ``Agent.run`` dies with an ExceptionGroup."""

    class Deep:
        async def execute(self, command_type, payload):
            value: list = []
            for _ in range(100_000):
                value = [value]
            return value

    handler = CommandHandler(Deep())
    frame = await handler.handle(CommandFrame(command_id="c", command_type="deep", timeout=5))
    assert frame.status == "failed"


async def test_f7b_duplicate_delivery_runs_once_and_does_not_crash():
    """F7b (medium; DESIGN: "at most once, even if delivered twice"). A second
    COMMAND with the same id runs the executor again and overwrites
    ``_running[id]``; the first to finish deletes the other's entry and the
    second ``del`` raises KeyError, crashing the agent."""
    runs = 0

    class Slow:
        async def execute(self, command_type, payload):
            nonlocal runs
            runs += 1
            await trio.sleep(0.05)
            return "ok"

    handler = CommandHandler(Slow())
    frame = CommandFrame(command_id="dup", command_type="x", timeout=5)
    errors: list[BaseException] = []

    async def deliver() -> None:
        try:
            await handler.handle(frame)
        except Exception as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliver)
        nursery.start_soon(deliver)
    assert errors == []
    assert runs == 1


# -- F8: keepalive deadline busy-loops while closing -----------------------------------


async def test_f8_closing_session_with_keepalive_does_not_spin(cluster):
    """F8 (medium). After our own close, ``run`` stops sending PINGs
    (``not self._lost_notified``) but never moves ``_ping_at``; once it is in
    the past, ``_next_deadline`` returns it every time and the timer task
    spins at 100% CPU for the whole closing period (3 PTO)."""
    with trio.fail_after(10):
        agent, _ = await cluster.start_agent("c1", keepalive_interval=0.005)
        session = agent.session
        flushes = 0
        original = session._flush

        async def counting() -> None:
            nonlocal flushes
            flushes += 1
            await original()

        session._flush = counting  # type: ignore[method-assign]
        session.close(ProtocolErrorCode.NO_ERROR, "bye")
        start = trio.current_time()
        await session.terminated.wait()
        closing = trio.current_time() - start
    # A handful of wake-ups (send the close, answer the peer, the closing timer).
    assert flushes < 30, f"{flushes} timer-loop iterations in a {closing * 1000:.0f} ms closing period"


# -- F9: HELLO timeout misses connections whose handshake is slow --------------------


async def test_f9_hello_timeout_applies_when_the_handshake_outlasts_it(manager, autojump_clock):
    """F9 (medium). ``enforce_hello_timeout`` drops the link from
    ``_unidentified`` even when ``link.session`` is still None (handshake in
    progress), so ``link.close`` does nothing; a client that completes the
    handshake after hello_timeout can then hold a connection without ever
    saying HELLO (PINGs keep it from idling out)."""
    link = manager.registry.new_link()
    await trio.sleep(12)  # handshake still running at the HELLO check
    session = RecordingSession()
    link.handshake_completed(session)
    await trio.sleep(30)  # connected, silent
    assert session.closed_with == ProtocolErrorCode.HELLO_TIMEOUT


# -- F10: CANCEL not sent on shutdown ---------------------------------------------------


async def test_f10_shutdown_tells_the_agent_to_stop_executing(manager, autojump_clock):
    """F10 (medium). ``drain`` ends executing commands ``failed``/
    ``server_shutdown``, but ``_finish`` only sends CANCEL for timeout and
    cancelled; the agents keep running work the server has given up on (and
    keep running it across the reconnect)."""
    link, session = connect_agent(manager, "c1")
    command = await manager.send_command("c1", "sleep", timeout=100)
    assert await manager.drain(0) == 1
    cancels = [f for f in session.streams[0] if isinstance(f, CancelFrame)]
    assert [f.command_id for f in cancels] == [command.command_id]


# -- F11: memory that is never pruned ------------------------------------------------


async def test_f11_queue_of_a_client_that_never_connects_is_pruned(manager, autojump_clock):
    """F11 (medium-low). Heap entries of finished pending commands are only
    dropped when ``_dispatch`` pops them, which needs the agent to connect:
    ``_queues[client_id]`` for a client that never comes grows forever."""
    for i in range(100):
        await manager.send_command("ghost", "echo", i, connect_timeout=1)
    await trio.sleep(2)
    assert manager.unfinished_count == 0
    assert len(manager._queues.get("ghost", ())) == 0


async def test_f11b_deadline_heap_does_not_hold_finished_commands(manager, autojump_clock):
    """F11b (low). Every dispatched command leaves two heap entries (delivery
    and execution deadlines) that stay until their time comes: with long
    timeouts the heap holds every command finished in the last max_timeout."""
    link, session = connect_agent(manager, "c1")
    for i in range(100):
        command = await manager.send_command("c1", "echo", i, timeout=3600)
        answer(link, session, command.command_id)
    assert manager.unfinished_count == 0
    assert len(manager._deadlines) <= 2 * manager.unfinished_count + 64


# -- F12: agent reconnect backoff is reset by any welcomed session ----------------------


# -- F14: keepalive ignores the negotiated idle timeout --------------------------------


async def test_f14_keepalive_follows_the_servers_idle_timeout(dev_cert):
    """F14 (medium-low). The agent pings every ``keepalive_interval`` (10 s)
    whatever idle timeout the server advertises; QUIC uses the smaller of the
    two, so a server configured with idle_timeout below 10 s drops every idle
    agent (and, per F4, the results of commands in flight)."""
    async with guarded_cluster(dev_cert, idle_timeout=1.0) as cluster:
        with trio.fail_after(10):
            agent, _ = await cluster.start_agent("c1")
            await trio.sleep(3)
            established = agent.sessions_established
            agent.stop()
    assert established == 1, f"{established} sessions in 3 s of idleness"


# -- F13: small ones ---------------------------------------------------------------------


def test_f13_udp_send_errors_do_not_escape_try_send():
    """F13 (low). ``try_send`` re-raises errnos outside its list (EACCES,
    ENOBUFS, ...); raised in the endpoint's receive loop (version
    negotiation) or a session's flush it takes the server down."""
    transport = DatagramSocket.bind("127.0.0.1", 0)
    try:
        transport.try_send(b"x", ("255.255.255.255", 9))  # EACCES
    finally:
        transport.close()


def test_f13b_nan_and_infinity_are_not_json_frames():
    """F13b (low). ``decode_body`` uses ``json.loads`` defaults, which accept
    NaN/Infinity; a COMMAND with ``"timeout": NaN`` reaches
    ``CommandHandler.handle`` and ``trio.CancelScope(deadline=nan)`` raises
    ValueError in the agent's nursery."""
    body = b'{"type":"command","command_id":"a","command_type":"echo","timeout":NaN}'
    with pytest.raises(ProtocolError):
        decode_body(body)


def test_f13c_a_decoded_frame_can_be_encoded_again():
    """F13c (low-medium; the root of F1d). ``decode_body`` accepts lone
    surrogates (``"\\ud800"`` escapes) in any string. Whatever the server
    accepted it cannot encode again with ``ensure_ascii=False``: WELCOME
    crashes the server (F1d), and a RESULT holding one makes every HTTP
    response that includes the command fail (Quart's UTF-8 encode raises)."""
    body = b'{"type":"result","command_id":"a","status":"completed","result":"\\ud800"}'
    try:
        frame = decode_body(body)
    except ProtocolError:
        return  # refused: fine
    encode_frame(frame)


# -- F15: abandoned worker threads starve sync handlers ---------------------------------


async def test_f15_timed_out_sync_handlers_do_not_starve_later_ones():
    """F15 (medium; agent/executor.py, on the handler's path). Plain-function
    handlers run in ``trio.to_thread.run_sync(abandon_on_cancel=True)`` with
    trio's default limiter (40). An abandoned thread keeps its limiter token
    until it really ends, so 40 hung sync commands that already timed out
    leave every later sync command of the agent waiting for a token until its
    own deadline."""
    import threading

    from trio_quiccmd import ExecutorRegistry

    release = threading.Event()
    registry = ExecutorRegistry()
    registry.register("hang", lambda payload: release.wait(30))
    registry.register("quick", lambda payload: "ok")
    handler = CommandHandler(registry)
    try:
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(
                    handler.handle, CommandFrame(command_id=f"h{i}", command_type="hang", timeout=0.2)
                )
        frame = await handler.handle(CommandFrame(command_id="q", command_type="quick", timeout=1))
    finally:
        release.set()
    assert frame.status == "completed", frame


def _silent_addresses_first(monkeypatch, address: tuple, silent: list) -> None:
    """Make ``address`` resolve to the ``silent`` sockets' addresses, then its own."""
    real_getaddrinfo = trio.socket.getaddrinfo

    async def getaddrinfo(host, port, *args, **kwargs):
        found = await real_getaddrinfo(host, port, *args, **kwargs)
        if (host, port) != tuple(address):
            return found
        first = [info for sock in silent for info in await real_getaddrinfo(*sock.getsockname(), *args, **kwargs)]
        return first + found

    monkeypatch.setattr(trio.socket, "getaddrinfo", getaddrinfo)


async def _silent_socket() -> trio.socket.SocketType:
    """A UDP socket that takes datagrams and answers none."""
    silent = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await silent.bind(("127.0.0.1", 0))
    return silent


async def test_an_agent_reaches_the_server_at_once_when_its_first_address_does_not_answer(
    cluster, monkeypatch
):
    """A server name that resolves to several addresses, the first unusable
    (``localhost`` as ``::1`` first, with the server on IPv4 only). The
    agent dialled only the first, and later one address after another, each
    costing a whole handshake timeout (10 s by default). It now dials the
    next address a quarter of a second later, as RFC 8305 does, and the
    first handshake to complete wins: with a 60 s handshake timeout it is
    connected within seconds. A reconnect dials the address that worked
    first, so it does not wait for the silent one again."""
    silent = await _silent_socket()
    _silent_addresses_first(monkeypatch, cluster.address, [silent])
    with silent, trio.fail_after(10):
        agent, _scope = await cluster.start_agent("two-addresses", handshake_timeout=60)
        command = await cluster.manager.send_and_wait("two-addresses", "echo", "via the second")
        assert command.status is CommandStatus.COMPLETED
        # Were the silent address dialled first again, this would wait for ever.
        monkeypatch.setattr(connection_module, "NEXT_ADDRESS_DELAY", math.inf)
        agent.session.close(ProtocolErrorCode.NO_ERROR, "network blip")
        await wait_until(lambda: agent.sessions_established >= 2)
        command = await cluster.manager.send_and_wait("two-addresses", "echo", "again")
    assert command.status is CommandStatus.COMPLETED


async def test_a_dial_that_reaches_none_of_the_addresses_names_each_failure(dev_cert, monkeypatch):
    silent = [await _silent_socket(), await _silent_socket()]
    ports = [sock.getsockname()[1] for sock in silent]
    real_getaddrinfo = trio.socket.getaddrinfo

    async def only_the_silent_ones(host, port, *args, **kwargs):
        assert host == "server.test"
        return [info for p in ports for info in await real_getaddrinfo("127.0.0.1", p, *args, **kwargs)]

    monkeypatch.setattr(trio.socket, "getaddrinfo", only_the_silent_ones)
    with silent[0], silent[1], trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            with pytest.raises(ConnectionFailed) as failed:
                await connect(
                    nursery, ("server.test", 8474), raw_client_configuration(dev_cert[0]),
                    SessionHandler(), handshake_timeout=1,
                )
    assert str(failed.value) == (
        f"QUIC handshake with server.test:8474 failed: 127.0.0.1:{ports[0]}: no answer "
        f"(handshake timed out); 127.0.0.1:{ports[1]}: no answer (handshake timed out)"
    )


def test_a_dial_tries_the_address_that_worked_last_first():
    v6, v4, other = (socket.AF_INET6, ("::1", 8474, 0, 0)), (socket.AF_INET, ("127.0.0.1", 8474)), (
        socket.AF_INET, ("192.0.2.1", 8474))
    assert dial_order([v6, v4, other], None) == [v6, v4, other]
    assert dial_order([v6, v4, other], ("127.0.0.1", 8474)) == [v4, v6, other]
    assert dial_order([v6, v4], ("192.0.2.9", 8474)) == [v6, v4]  # no longer among them


async def test_a_server_name_that_is_not_a_dns_name_is_a_failed_dial_not_a_crash():
    """A label over 63 characters makes the resolver raise UnicodeError, not
    OSError: it escaped connect() and ended the agent instead of being a
    dial that failed."""
    async with trio.open_nursery() as nursery:
        with pytest.raises(ConnectionFailed, match="cannot resolve"):
            await connect(nursery, ("a" * 64 + ".example", 8474), QuicConfiguration(is_client=True), SessionHandler())
