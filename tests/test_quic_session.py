"""QuicSession's packet behaviour, with two sessions joined in memory on a virtual clock.

The sessions are real (aioquic, TLS verified against the development
certificate); only the UDP sockets are replaced by queues, so every datagram
each side sends is counted, and time is trio's autojump clock.
"""

from __future__ import annotations

import math

import trio
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header

from trio_quiccmd.quic.connection import QuicSession, SessionHandler
from trio_quiccmd.server.core import server_quic_configuration
from trio_quiccmd.wire import ALPN, CommandFrame, Frame, ResultFrame

SERVER_ADDRESS = ("127.0.0.1", 4433)
CLIENT_ADDRESS = ("127.0.0.1", 50000)


class _Wire:
    """One direction of a loopback path: counts datagrams and delivers them
    later (from a task), as the kernel would, never inside the sender's call."""

    def __init__(self) -> None:
        self.sent = 0
        self.sent_at: list[float] = []
        self._send, self.receive = trio.open_memory_channel[bytes](math.inf)

    def try_send(self, data: bytes, addr: tuple) -> bool:
        self.sent += 1
        self.sent_at.append(trio.current_time())
        self._send.send_nowait(data)
        return True

    async def wait_writable(self) -> None:
        raise AssertionError("an in-memory wire is always writable")

    def close(self) -> None:
        pass


class _Echo(SessionHandler):
    """Answers every COMMAND at once, on its stream, as an agent does."""

    def frame_received(self, session: QuicSession, stream_id: int, frame: Frame) -> None:
        assert isinstance(frame, CommandFrame)
        session.send_frame(
            stream_id, ResultFrame(command_id=frame.command_id, status="completed"), end_stream=True
        )


class _Collect(SessionHandler):
    def __init__(self) -> None:
        self.results: list[ResultFrame] = []
        self.received = trio.Event()

    def frame_received(self, session: QuicSession, stream_id: int, frame: Frame) -> None:
        self.results.append(frame)
        self.received.set()


async def _joined_sessions(nursery: trio.Nursery, dev_cert) -> tuple[QuicSession, _Wire, _Wire, _Collect]:
    """A connected (client, server) pair; returns the client session, both
    wires (to the server, to the client) and the client's handler."""
    cert, key = dev_cert
    to_server, to_client = _Wire(), _Wire()
    client_configuration = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name="localhost")
    client_configuration.load_verify_locations(cafile=str(cert))
    collect = _Collect()
    client = QuicSession(QuicConnection(configuration=client_configuration), to_server, collect)
    server_configuration = server_quic_configuration(cert, key)

    async def serve() -> None:
        server = None
        async for data in to_server.receive:
            if server is None:  # made from the first datagram, as QuicEndpoint does
                header = pull_quic_header(
                    Buffer(data=data), host_cid_length=server_configuration.connection_id_length
                )
                quic = QuicConnection(
                    configuration=server_configuration,
                    original_destination_connection_id=header.destination_cid,
                )
                server = QuicSession(quic, to_client, _Echo())
                nursery.start_soon(server.run)
            server.datagram_received(data, CLIENT_ADDRESS)

    async def feed_client() -> None:
        async for data in to_client.receive:
            client.datagram_received(data, SERVER_ADDRESS)

    nursery.start_soon(serve)
    nursery.start_soon(feed_client)
    client.quic.connect(SERVER_ADDRESS, now=trio.current_time())
    nursery.start_soon(client.run)
    await client.handshake_done.wait()
    await trio.sleep(1)  # the handshake's last ACKs and HANDSHAKE_DONE settle
    return client, to_server, to_client, collect


async def test_an_answer_within_the_ack_delay_carries_the_ack(dev_cert, autojump_clock):
    """An agent answers a COMMAND within aioquic's 1 ms ACK delay. Its RESULT
    packet must acknowledge the COMMAND too: one datagram back per command,
    not a RESULT plus an ACK-only packet a millisecond later (each costing
    the server a receive, a decryption and a wake-up)."""
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert)
        for n in range(5):
            before = to_client.sent
            collect.received = trio.Event()
            client.open_stream(
                CommandFrame(command_id=f"c{n}", command_type="echo", timeout=30.0), end_stream=True
            )
            await collect.received.wait()
            await trio.sleep(1)  # every ACK timer on both sides has long fired
            assert to_client.sent - before == 1, f"command {n}: {to_client.sent - before} datagrams back"
        assert [r.command_id for r in collect.results] == [f"c{n}" for n in range(5)]
        nursery.cancel_scope.cancel()


async def test_acks_still_wait_for_their_delay_when_nothing_is_sent(dev_cert, autojump_clock):
    """The client, which sends nothing after a RESULT, acknowledges it in an
    ACK-only packet after the delay, not at once (and exactly once): the delay
    that lets ACKs gather is kept when no data goes out."""
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert)
        before = to_server.sent
        client.open_stream(CommandFrame(command_id="c", command_type="echo", timeout=30.0), end_stream=True)
        await collect.received.wait()
        received_at = trio.current_time()
        assert to_server.sent - before == 1  # the COMMAND only, so far
        await trio.sleep(0.0005)
        assert to_server.sent - before == 1  # the ACK waits for its delay...
        await trio.sleep(1)
        assert to_server.sent - before == 2  # ...and then goes, once,
        assert to_server.sent_at[-1] - received_at >= 0.0009  # when its delay is over
        nursery.cancel_scope.cancel()


async def test_a_burst_held_back_by_pacing_does_not_spin_the_timer(dev_cert, autojump_clock, monkeypatch):
    """Commands arrive while the server's replies are held back by aioquic's
    pacer. Bringing the ACK forward then would leave it due *now* and unsent,
    so the session's timer would fire at the same instant again and again
    (on this virtual clock, time would never move: a hang). Every pass of
    the timer task is counted; a spin trips the count instead of hanging."""
    passes_at: dict[float, int] = {}
    original_flush = QuicSession._flush

    async def counting_flush(self: QuicSession) -> None:
        now = trio.current_time()
        passes_at[now] = passes_at.get(now, 0) + 1
        if passes_at[now] > 1000:
            raise AssertionError(f"the timer task spins at t={now}")
        await original_flush(self)

    monkeypatch.setattr(QuicSession, "_flush", counting_flush)
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert)
        count = 100
        for n in range(count):
            client.open_stream(
                CommandFrame(command_id=f"c{n}", command_type="echo", timeout=30.0), end_stream=True
            )
        with trio.fail_after(10):
            while len(collect.results) < count:
                collect.received = trio.Event()
                await collect.received.wait()
        nursery.cancel_scope.cancel()
