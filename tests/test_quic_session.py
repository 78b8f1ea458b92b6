"""QuicSession's packet behaviour, with two sessions joined in memory on a virtual clock.

The sessions are real (aioquic, TLS verified against the development
certificate); only the UDP sockets are replaced by queues, so every datagram
each side sends is counted, and time is trio's autojump clock.
"""

from __future__ import annotations

import math
import struct

import trio
import trio.testing
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header
from aioquic.quic.rangeset import RangeSet
from aioquic.quic.stream import QuicStreamReceiver

from trio_quiccmd.quic.connection import QuicSession, SessionHandler
from trio_quiccmd.quic.flow_control import STREAM_WINDOW, FrameCredit, WindowedQuicConnection
from trio_quiccmd.server.core import server_quic_configuration
from trio_quiccmd.wire import ALPN, CommandFrame, Frame, ProgressFrame, ProtocolErrorCode, ResultFrame, encode_frame

from .conftest import wait_until

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


async def _joined_sessions(
    nursery: trio.Nursery,
    dev_cert,
    server_handler: SessionHandler | None = None,
    servers: list[QuicSession] | None = None,
    keepalive_interval: float | None = None,
    client_cafile: str | None = None,
) -> tuple[QuicSession, _Wire, _Wire, _Collect]:
    """A connected (client, server) pair; returns the client session, both
    wires (to the server, to the client) and the client's handler. The
    server session (an echoing agent unless ``server_handler`` is given, on
    the connection class the endpoint uses) is added to ``servers``. With
    ``client_cafile`` (instead of the certificate), returns once the client
    has started its handshake."""
    cert, key = dev_cert
    to_server, to_client = _Wire(), _Wire()
    client_configuration = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name="localhost")
    client_configuration.load_verify_locations(cafile=client_cafile or str(cert))
    collect = _Collect()
    client = QuicSession(
        QuicConnection(configuration=client_configuration), to_server, collect,
        keepalive_interval=keepalive_interval,
    )
    server_configuration = server_quic_configuration(cert, key)

    async def serve() -> None:
        server = None
        async for data in to_server.receive:
            if server is None:  # made from the first datagram, as QuicEndpoint does
                header = pull_quic_header(
                    Buffer(data=data), host_cid_length=server_configuration.connection_id_length
                )
                quic = WindowedQuicConnection(
                    configuration=server_configuration,
                    original_destination_connection_id=header.destination_cid,
                )
                server = QuicSession(quic, to_client, server_handler or _Echo())
                if servers is not None:
                    servers.append(server)
                nursery.start_soon(server.run)
            server.datagram_received(data, CLIENT_ADDRESS)

    async def feed_client() -> None:
        async for data in to_client.receive:
            client.datagram_received(data, SERVER_ADDRESS)

    nursery.start_soon(serve)
    nursery.start_soon(feed_client)
    client.quic.connect(SERVER_ADDRESS, now=trio.current_time())
    nursery.start_soon(client.run)
    if client_cafile is not None:
        return client, to_server, to_client, collect
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


class _Frames(SessionHandler):
    """Records every frame, and raises from connection_lost if told to."""

    def __init__(self, fail_when_lost: bool = False) -> None:
        self.frames: list[tuple[int, Frame]] = []
        self.fail_when_lost = fail_when_lost
        self.lost = False

    def frame_received(self, session: QuicSession, stream_id: int, frame: Frame) -> None:
        self.frames.append((stream_id, frame))

    def connection_lost(self, session: QuicSession, error_code: int, reason: str) -> None:
        self.lost = True
        if self.fail_when_lost:
            raise RuntimeError("a bug in connection_lost")


def _skip_ahead(quic: QuicConnection, stream_id: int, offset: int) -> None:
    """Move the stream's sender to ``offset`` as if all before it had been
    sent and lost: what a hostile peer, or heavy loss, shows the receiver."""
    sender = quic._streams[stream_id].sender
    quic._remote_max_data_used += offset - sender.highest_offset
    sender._buffer_start = sender._buffer_stop = sender.highest_offset = offset
    sender._buffer = bytearray()


async def test_a_peer_naming_far_offsets_cannot_grow_the_receivers_buffers(dev_cert, autojump_clock):
    """aioquic grows a receive window by the highest offset the peer names,
    and fills the gap below it: one byte sent just below the limit, again
    and again, doubled the receiver's buffer each round trip (8 rounds: 1 MiB
    to 128 MiB, before any HELLO). The window now moves only with the data
    handed to the application, so the buffer stays at one window."""
    servers: list[QuicSession] = []
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert, _Frames(), servers)
        quic = client.quic
        stream_id = quic.get_next_available_stream_id()
        quic.send_stream_data(stream_id, b"")
        for _ in range(8):
            limit = min(quic._streams[stream_id].max_stream_data_remote, quic._remote_max_data)
            _skip_ahead(quic, stream_id, limit - 1)  # to the byte below the limit
            quic.send_stream_data(stream_id, b"x")
            client._wake()
            await trio.sleep(1)  # delivered, acknowledged, any new limit sent back
        received = servers[0].quic._streams[stream_id].receiver
        assert received.highest_offset == STREAM_WINDOW  # the peer did reach the limit...
        assert len(received._buffer) <= STREAM_WINDOW  # ...and never beyond it
        assert quic._streams[stream_id].max_stream_data_remote == STREAM_WINDOW
        assert quic._remote_max_data == 1 << 20  # aioquic's default max_data
        nursery.cancel_scope.cancel()


async def test_a_windowed_connection_keeps_granting_credit_as_data_is_read(dev_cert, autojump_clock):
    """The windows do move with the data read: 8 MiB through one stream and
    over several streams, far beyond the first 1 MiB of credit."""
    servers: list[QuicSession] = []
    handler = _Frames()
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert, handler, servers)
        result = ResultFrame(command_id="r", status="completed", result="x" * 500_000)
        stream_id = client.open_stream(result)
        for _ in range(15):
            client.send_frame(stream_id, result)
        for _ in range(4):
            client.open_stream(result, end_stream=True)
        with trio.fail_after(60):
            await wait_until(lambda: len(handler.frames) == 20)
        assert all(frame == result for _, frame in handler.frames)
        nursery.cancel_scope.cancel()


async def test_unfinished_frames_beyond_the_sessions_limit_close_it(dev_cert, autojump_clock):
    """A peer that parks a frame one byte short of complete on stream after
    stream held a megabyte per stream in the decoders, within flow control.
    A session given a limit (the server's, before HELLO) holds at most that
    many bytes of unfinished frames, across streams."""
    servers: list[QuicSession] = []
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert, _Frames(), servers)
        server = servers[0]
        server._max_buffered = 100_000
        for _ in range(3):
            stream_id = client.quic.get_next_available_stream_id()
            client.quic.send_stream_data(stream_id, struct.pack("!I", 60_000) + b"x" * 40_000)
        client._wake()
        with trio.fail_after(10):
            await client.terminated.wait()
        assert client.close_error_code == ProtocolErrorCode.BUFFER_EXCEEDED
        nursery.cancel_scope.cancel()


async def test_stop_sending_does_not_lose_what_the_peer_already_sent(dev_cert, autojump_clock):
    """STOP_SENDING concerns our direction of a stream only. The half of a
    frame already received must still join the rest: dropping it made the
    rest read as a new frame (a spurious FRAME_TOO_LARGE close)."""
    servers: list[QuicSession] = []
    handler = _Frames()
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert, handler, servers)
        data = encode_frame(ResultFrame(command_id="r", status="completed", result="y" * 1000))
        stream_id = client.quic.get_next_available_stream_id()
        client.quic.send_stream_data(stream_id, data[:500])
        client._wake()
        await trio.sleep(1)
        client.quic.stop_stream(stream_id, 7)
        client._wake()
        await trio.sleep(1)
        client.quic.send_stream_data(stream_id, data[500:], end_stream=True)
        client._wake()
        await trio.sleep(1)
        assert not client.terminated.is_set()
        assert [frame.command_id for _, frame in handler.frames] == ["r"]
        nursery.cancel_scope.cancel()


async def test_an_error_in_connection_lost_ends_only_that_session(dev_cert, autojump_clock):
    """A handler that raises while told its connection is gone must not take
    the caller (the endpoint's receive loop, serving every connection) down
    with it, and the session's task still ends."""
    servers: list[QuicSession] = []
    handler = _Frames(fail_when_lost=True)
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert, handler, servers)
        await client.aclose(reason="bye")
        with trio.fail_after(10):
            await servers[0].terminated.wait()
        assert handler.lost
        nursery.cancel_scope.cancel()


async def test_an_error_raised_inside_aioquic_ends_only_that_connection(dev_cert, autojump_clock, tmp_path):
    """aioquic loads a client's CA file only when the server's certificate
    arrives, and raises out of ``receive_datagram`` if it cannot: that
    closed the endpoint's receive loop (every connection) or the agent."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    async with trio.open_nursery() as nursery:
        client, *_ = await _joined_sessions(nursery, dev_cert, client_cafile=str(garbage))
        with trio.fail_after(10):
            await client.terminated.wait()
        assert not client.handshake_done.is_set()
        assert client.close_reason == "internal error"
        nursery.cancel_scope.cancel()


async def test_an_ack_read_as_the_loss_timer_expires_cancels_the_probe(dev_cert, autojump_clock):
    """The RESULT (and its ACK of the COMMAND) is read in the same instant
    the COMMAND's loss timer would fire. The timer task must go by aioquic's
    timer as it is now, not as it was at the last flush: acting on the stale
    one ran a loss probe for data already acknowledged (a needless packet,
    and a doubled probe timeout until the next ACK)."""
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert)
        held: list[bytes] = []

        def hold(data: bytes, addr: tuple) -> bool:
            held.append(data)
            return True

        to_client.try_send = hold  # the server's answers wait here
        autojump_clock.autojump_threshold = math.inf  # time moves only when told
        client.open_stream(CommandFrame(command_id="c", command_type="echo", timeout=30.0), end_stream=True)
        await trio.testing.wait_all_tasks_blocked()
        assert held, "the server answered"
        loss_timer_at = client._quic_timer_at
        sent = to_server.sent
        autojump_clock.jump(loss_timer_at - trio.current_time())
        for data in held:
            client.datagram_received(data, SERVER_ADDRESS)
        await trio.testing.wait_all_tasks_blocked()
        assert [result.command_id for result in collect.results] == ["c"]
        assert client.quic._loss._pto_count == 0
        assert to_server.sent == sent  # no probe (the ACK of the RESULT waits its delay)
        nursery.cancel_scope.cancel()


async def test_datagrams_that_fail_to_decrypt_do_not_keep_a_silent_peer_alive(dev_cert, autojump_clock):
    """The server stops answering; someone sprays the agent's port with
    packets for its connection that do not decrypt. Each used to count as
    hearing from the server, so the agent never noticed it was gone (until
    the idle timeout, a minute here). Only a packet QUIC accepts does now."""
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(
            nursery, dev_cert, keepalive_interval=1.0
        )
        to_client.try_send = lambda data, addr: True  # the server's datagrams go nowhere

        async def spray() -> None:
            while True:
                await trio.sleep(0.2)
                # A short-header packet for the agent's connection id, not decryptable.
                client.datagram_received(bytes([0x40]) + client.quic.host_cid + bytes(40), SERVER_ADDRESS)

        nursery.start_soon(spray)
        with trio.fail_after(20):
            await client.terminated.wait()
        assert "no answer to keepalives" in client.close_reason
        nursery.cancel_scope.cancel()


async def test_streams_the_peer_resets_give_their_credit_back(dev_cert, autojump_clock):
    """A reset stream's final size counts against the connection's window,
    and what was never read of it never will be. Counted as never read,
    twenty resets of 60 kB each left a 200 kB RESULT stuck for good behind a
    window that no longer moved (while keepalives still passed)."""
    servers: list[QuicSession] = []
    handler = _Frames()
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert, handler, servers)
        quic = client.quic
        for _ in range(20):
            stream_id = quic.get_next_available_stream_id()
            quic.send_stream_data(stream_id, b"")
            _skip_ahead(quic, stream_id, 60_000)  # 60 kB sent and lost, then the stream reset
            quic.reset_stream(stream_id, 0)
            client._wake()
            await trio.sleep(1)
        client.open_stream(ResultFrame(command_id="after", status="completed", result="x" * 200_000), end_stream=True)
        with trio.fail_after(30):
            await wait_until(lambda: handler.frames)
        assert [frame.command_id for _, frame in handler.frames] == ["after"]
        nursery.cancel_scope.cancel()


def test_the_aioquic_internals_the_receive_windows_replace_are_still_there():
    """WindowedQuicConnection overrides private aioquic methods; an aioquic
    that renamed them would silently bring its own flow control back (and
    with it the buffers a peer can double at will)."""
    for name in (
        "_write_connection_limits",
        "_write_stream_limits",
        "_handle_reset_stream_frame",
        "_handle_stream_frame",
        "_on_connection_limit_delivery",
        "_on_max_stream_data_delivery",
    ):
        assert hasattr(QuicConnection, name), name
    connection = WindowedQuicConnection(configuration=QuicConfiguration(is_client=True))
    assert connection._local_max_streams_uni.value == 0
    # RESET_STREAM (0x04) and STREAM frames (0x08-0x0f) reach the overrides.
    handler, _epochs = connection._QuicConnection__frame_handlers[0x04]
    assert handler.__func__ is WindowedQuicConnection._handle_reset_stream_frame
    for frame_type in range(0x08, 0x10):
        handler, _epochs = connection._QuicConnection__frame_handlers[frame_type]
        assert handler.__func__ is WindowedQuicConnection._handle_stream_frame
    # What discard_stream_input resets on a stream's receiver.
    receiver = QuicStreamReceiver(stream_id=1, readable=True)
    assert isinstance(receiver._buffer, bytearray) and isinstance(receiver._ranges, RangeSet)


async def test_unfinished_large_frames_wait_for_room_instead_of_filling_memory(dev_cert, autojump_clock):
    """A peer that starts a 1 MiB frame on stream after stream, and finishes
    none, could make the receiver hold a megabyte per stream (384 MiB at
    the server's defaults). A frame larger than a stream's window is now let
    in only once its size fits the session's budget: the rest wait at their
    window, and the connection stays open for frames that do complete."""
    servers: list[QuicSession] = []
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert, _Frames(), servers)
        server = servers[0]
        frame = (1 << 20) + 4
        server._credit = FrameCredit(budget=3 * frame)
        for _ in range(10):
            stream_id = client.quic.get_next_available_stream_id()
            client.quic.send_stream_data(stream_id, struct.pack("!I", 1 << 20) + b"x" * ((1 << 20) - 1))
        client._wake()
        await trio.sleep(10)  # everything the receiver lets in has arrived
        held = sorted(decoder.buffered for decoder in server._decoders.values())
        assert not server.is_closing
        assert len(held) == 10
        assert held[-3:] == [frame - 1] * 3  # three frames had room, and came in whole but a byte
        assert all(size <= STREAM_WINDOW for size in held[:-3])  # the others wait at their window
        nursery.cancel_scope.cancel()


async def test_frames_beyond_the_budget_all_arrive_in_turn(dev_cert, autojump_clock):
    """Ten 900 kB frames at once, three at a time in the budget: each waits
    its turn, and all arrive (a frame always fits once those before it are
    complete, so nothing waits for ever)."""
    servers: list[QuicSession] = []
    handler = _Frames()
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert, handler, servers)
        servers[0]._credit = FrameCredit(budget=3 * ((1 << 20) + 4))
        for n in range(10):
            client.open_stream(
                ResultFrame(command_id=f"r{n}", status="completed", result="x" * 900_000), end_stream=True
            )
        with trio.fail_after(120):
            await wait_until(lambda: len(handler.frames) == 10)
        assert sorted(frame.command_id for _, frame in handler.frames) == [f"r{n}" for n in range(10)]
        nursery.cancel_scope.cancel()


async def test_a_progress_then_a_result_of_a_whole_window_both_arrive(dev_cert, autojump_clock):
    """A small PROGRESS, then on the same stream a RESULT of exactly a
    stream's window: the window had been renewed only once half was used,
    so the RESULT waited for ever at the little the PROGRESS had left."""
    servers: list[QuicSession] = []
    handler = _Frames()
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert, handler, servers)
        stream_id = client.open_stream(ProgressFrame(command_id="c", progress="half way"))
        result = ResultFrame(command_id="c", status="completed", result="")
        padding = STREAM_WINDOW - len(encode_frame(result))
        result = ResultFrame(command_id="c", status="completed", result="x" * padding)
        assert len(encode_frame(result)) == STREAM_WINDOW
        client.send_frame(stream_id, result, end_stream=True)
        with trio.fail_after(60):
            await wait_until(lambda: len(handler.frames) == 2)
        assert handler.frames[-1][1] == result
        nursery.cancel_scope.cancel()


async def test_a_stream_whose_input_is_discarded_holds_nothing_and_gives_its_credit_back(
    dev_cert, autojump_clock
):
    """The server gives up on a command (cancelled, timed out) but the agent
    may never finish its stream. What the agent sent on it, and sends later,
    must then cost the server nothing: not the unfinished frame its decoder
    held, not what aioquic buffered beyond a gap, and not the connection's
    credit (twenty such streams of 60 kB left less than the 900 kB a later
    RESULT needs, for good)."""
    servers: list[QuicSession] = []
    handler = _Frames()
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert, handler, servers)
        server = servers[0]
        streams = [
            server.open_stream(CommandFrame(command_id=f"c{n}", command_type="x", timeout=60), end_stream=True)
            for n in range(20)
        ]
        with trio.fail_after(10):
            await wait_until(lambda: len(collect.results) == 20)
        unfinished = struct.pack("!I", 60_000) + b"x" * 50_000
        for n, stream_id in enumerate(streams):
            if n % 2:  # a gap: aioquic holds what lies beyond it
                _skip_ahead(client.quic, stream_id, 10_000)
                client.quic.send_stream_data(stream_id, b"y" * 50_000)
            else:  # in order: the frame decoder holds the unfinished frame
                client.quic.send_stream_data(stream_id, unfinished)
        client._wake()
        await trio.sleep(1)
        receivers = [server.quic._streams[stream_id].receiver for stream_id in streams]
        assert all(stream_id in server._decoders for stream_id in streams[::2])
        assert all(len(receiver._buffer) >= 50_000 for receiver in receivers[1::2])

        for stream_id in streams:
            server.discard_stream_input(stream_id)
        assert not any(stream_id in server._decoders for stream_id in streams)
        assert all(len(receiver._buffer) == 0 for receiver in receivers)
        assert server._buffered == 0

        # More on those streams, some of it finishing them, is dropped too.
        for n, stream_id in enumerate(streams):
            client.quic.send_stream_data(stream_id, b"z" * 10_000, end_stream=n % 4 == 0)
        client.open_stream(ResultFrame(command_id="after", status="completed", result="x" * 900_000), end_stream=True)
        with trio.fail_after(30):
            await wait_until(lambda: handler.frames)
        assert [frame.command_id for _, frame in handler.frames] == ["after"]
        assert all(len(receiver._buffer) == 0 for receiver in receivers)
        assert not server.is_closing
        # Every byte the peer sent counts against the credit on both sides:
        # one counted by the peer only would shrink its window for good.
        await trio.sleep(1)
        assert server.quic._local_max_data.used == client.quic._remote_max_data_used
        # ...and what the receiver took credit for is all counted as read:
        # what was not would shrink the window the peer gets, for good.
        assert server.quic._delivered == server.quic._local_max_data.used
        nursery.cancel_scope.cancel()


async def test_an_answer_larger_than_the_window_still_finishes_a_discarded_stream(dev_cert, autojump_clock):
    """The agent may have written its whole answer before the server gave up
    on the command. Without more credit on the discarded stream, a 200 kB
    RESULT stayed stuck at the first 64 KiB for good, and the stream open
    on both sides (one of the agent's stream slots, and its drain waiting)."""
    servers: list[QuicSession] = []
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert, _Frames(), servers)
        server = servers[0]
        stream_id = server.open_stream(CommandFrame(command_id="c", command_type="x", timeout=60), end_stream=True)
        with trio.fail_after(10):
            await wait_until(lambda: collect.results)
        server.discard_stream_input(stream_id)
        client.send_frame(stream_id, ResultFrame(command_id="c", status="completed", result="x" * 200_000), end_stream=True)
        with trio.fail_after(30):
            await wait_until(lambda: stream_id not in server.quic._discarding)
        await trio.sleep(1)  # the last acknowledgements
        assert stream_id not in client.quic._streams or client.quic._streams[stream_id].sender.is_finished
        assert server.quic._delivered == server.quic._local_max_data.used
        nursery.cancel_scope.cancel()


class _GiveUpOnAnotherStream(_Frames):
    """As AgentLink does with a held result: a frame on one stream makes it
    give up on another (the re-sent command's), while events are handled."""

    def __init__(self) -> None:
        super().__init__()
        self.give_up: int | None = None

    def frame_received(self, session: QuicSession, stream_id: int, frame: Frame) -> None:
        super().frame_received(session, stream_id, frame)
        if self.give_up is not None and stream_id != self.give_up:
            session.discard_stream_input(self.give_up)


async def test_a_stream_given_up_on_while_its_end_waits_in_the_same_datagram_is_not_misread(
    dev_cert, autojump_clock
):
    """The rest of a frame and the FIN came in the datagram whose earlier
    frame made the server give up on the stream: the stream was finished
    already, its data event was left queued, and read by a new decoder
    from the middle of the frame (a FRAME_TOO_LARGE close)."""
    servers: list[QuicSession] = []
    handler = _GiveUpOnAnotherStream()
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert, handler, servers)
        server = servers[0]
        held_stream = client.quic.get_next_available_stream_id()
        client.quic.send_stream_data(held_stream, b"")  # opened first: its frames go first in a packet
        command_stream = server.open_stream(CommandFrame(command_id="c", command_type="x", timeout=60), end_stream=True)
        with trio.fail_after(10):
            await wait_until(lambda: collect.results)
        handler.give_up = command_stream
        answer = encode_frame(ResultFrame(command_id="c", status="completed", result="x" * 5_000))
        client.quic.send_stream_data(command_stream, answer[:-50])
        client._wake()
        await trio.sleep(1)
        assert server._decoders[command_stream].has_partial_frame
        client.quic.send_stream_data(held_stream, encode_frame(ResultFrame(command_id="held", status="completed")))
        client.quic.send_stream_data(command_stream, answer[-50:], end_stream=True)
        client._wake()
        await trio.sleep(1)
        assert not handler.lost and not server.is_closing
        assert [frame.command_id for _, frame in handler.frames] == ["held"]
        nursery.cancel_scope.cancel()


async def test_wait_acknowledged_returns_once_the_peer_has_what_was_written(dev_cert, autojump_clock):
    """What a polite close waits for (QuicEndpoint.close_all): everything
    written on the connection acknowledged by the peer, a frame just written
    on a stream that stays open included (a CANCEL on the control stream)."""
    servers: list[QuicSession] = []
    async with trio.open_nursery() as nursery:
        client, to_server, to_client, collect = await _joined_sessions(nursery, dev_cert, _Frames(), servers)
        server = servers[0]
        await server.wait_acknowledged()  # nothing written yet: at once
        stream_id = server.open_stream(CommandFrame(command_id="c", command_type="x", timeout=60))
        server.send_frame(stream_id, CommandFrame(command_id="d", command_type="x", timeout=60))
        assert not server._all_acknowledged()
        with trio.fail_after(5):
            await server.wait_acknowledged()
        assert [frame.command_id for frame in collect.results] == ["c", "d"]
        assert server.quic._streams[stream_id].sender._buffer_fin is None  # still open
        nursery.cancel_scope.cancel()
