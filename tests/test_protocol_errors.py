"""Bad peers over real QUIC: the offender's connection is closed with a clear
code, and everyone else keeps being served."""

from __future__ import annotations

import os
import socket
import struct

import pytest
import trio
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicErrorCode

from trio_quiccmd import CommandStatus
from trio_quiccmd.quic.connection import SessionHandler, connect
from trio_quiccmd.quic.endpoint import QuicEndpoint
from trio_quiccmd.server.core import server_quic_configuration
from trio_quiccmd.wire import ALPN, CommandFrame, Hello, ProtocolErrorCode, encode_frame


def raw_client_configuration(cert) -> QuicConfiguration:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name="localhost")
    configuration.load_verify_locations(cafile=str(cert))
    return configuration


async def send_raw_and_wait_close(cluster, data: bytes) -> int | None:
    async with trio.open_nursery() as nursery:
        session = await connect(
            nursery, cluster.address, raw_client_configuration(cluster.cert), SessionHandler()
        )
        stream_id = session.quic.get_next_available_stream_id()
        session.quic.send_stream_data(stream_id, data)
        session._wake()
        await session.terminated.wait()
        return session.close_error_code


@pytest.mark.parametrize(
    "data, code",
    [
        (b"\x00\x00\x00\x05hello", ProtocolErrorCode.INVALID_JSON),
        (struct.pack("!I", 50 << 20), ProtocolErrorCode.FRAME_TOO_LARGE),
        (b"\x00\x00\x00\x0f{\"type\":\"nope\"}", ProtocolErrorCode.UNKNOWN_FRAME_TYPE),
        (b"\x00\x00\x00\x10{\"type\":\"hello\"}", ProtocolErrorCode.INVALID_FRAME),
        (
            encode_frame(CommandFrame(command_id="x", command_type="echo", timeout=1)),
            ProtocolErrorCode.UNEXPECTED_FRAME,
        ),
        # A newline in the client_id could forge a log line: refused before it is logged.
        (encode_frame(Hello(client_id="a\n2026 INFO Audit action=send")), ProtocolErrorCode.INVALID_FRAME),
        # Labels are logged too (and shown by the API): the same for their keys and values.
        (encode_frame(Hello(client_id="l", labels={"role": "web\n2026 INFO Audit action=send"})),
         ProtocolErrorCode.INVALID_FRAME),
        (encode_frame(Hello(client_id="l", labels={"ro\rle": "web"})), ProtocolErrorCode.INVALID_FRAME),
    ],
)
async def test_bad_frames_close_only_the_offender(cluster, data, code):
    with trio.fail_after(15):
        await cluster.start_agent("good")
        assert await send_raw_and_wait_close(cluster, data) == code
        command = await cluster.manager.send_and_wait("good", "echo", "still here")
    assert command.status is CommandStatus.COMPLETED and command.result == "still here"


async def test_non_quic_datagrams_and_unknown_versions(cluster):
    with trio.fail_after(15):
        await cluster.start_agent("good")
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind(("127.0.0.1", 0))
        await sock.sendto(b"not quic at all", cluster.address)
        # A long-header Initial-sized packet with a version nobody speaks:
        # the server answers with version negotiation listing its versions.
        dcid, scid = os.urandom(8), os.urandom(8)
        packet = bytes([0xC0]) + struct.pack("!I", 0x1A2A3A4A)
        packet += bytes([8]) + dcid + bytes([8]) + scid
        packet += b"\x00" * (1200 - len(packet))
        await sock.sendto(packet, cluster.address)
        reply, _ = await sock.recvfrom(2048)
        sock.close()
        command = await cluster.manager.send_and_wait("good", "echo", 1)
    assert struct.unpack("!I", reply[1:5])[0] == 0  # a version negotiation packet
    assert reply[6:14] == scid and reply[15:23] == dcid
    versions = {struct.unpack("!I", reply[i : i + 4])[0] for i in range(23, len(reply), 4)}
    assert 0x00000001 in versions
    assert command.status is CommandStatus.COMPLETED


async def test_wrong_alpn_is_refused_in_the_handshake(cluster):
    configuration = raw_client_configuration(cluster.cert)
    configuration.alpn_protocols = ["h3"]
    from trio_quiccmd.quic.connection import ConnectionFailed

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            with pytest.raises(ConnectionFailed):
                await connect(nursery, cluster.address, configuration, SessionHandler())


async def test_agent_refuses_a_server_it_cannot_verify(cluster, tmp_path):
    from trio_quiccmd.quic.tls import ensure_dev_certificate

    other_cert, _, _ = ensure_dev_certificate(tmp_path / "other")
    agent = cluster.agent("suspicious", ca_file=other_cert, handshake_timeout=2.0)
    with trio.fail_after(15):
        with trio.move_on_after(1.5):
            await agent.run()
    assert agent.sessions_established == 0
    assert cluster.manager.registry.get("suspicious") is None


async def test_before_hello_a_peer_may_leave_only_one_frame_unfinished(cluster):
    """Unauthenticated, a peer could park a frame one byte short of complete
    on each of 256 streams: a quarter of a GiB per connection. Until its
    HELLO is accepted it may hold one frame's worth (the HELLO's), and the
    server closes it beyond that."""
    with trio.fail_after(15):
        await cluster.start_agent("good")
        async with trio.open_nursery() as nursery:
            session = await connect(
                nursery, cluster.address, raw_client_configuration(cluster.cert), SessionHandler()
            )
            for _ in range(2):
                stream_id = session.quic.get_next_available_stream_id()
                session.quic.send_stream_data(stream_id, struct.pack("!I", 1 << 20) + b"x" * 600_000)
            session._wake()
            await session.terminated.wait()
        assert session.close_error_code == ProtocolErrorCode.BUFFER_EXCEEDED
        command = await cluster.manager.send_and_wait("good", "echo", "still here")
    assert command.status is CommandStatus.COMPLETED


async def test_a_unidirectional_stream_closes_the_connection(cluster):
    """The protocol has no unidirectional streams; the server grants none, so
    a peer that opens one breaks QUIC's stream limit and is closed, instead
    of being read (and buffered) on a stream nobody looks at."""
    with trio.fail_after(15):
        await cluster.start_agent("good")
        async with trio.open_nursery() as nursery:
            session = await connect(
                nursery, cluster.address, raw_client_configuration(cluster.cert), SessionHandler()
            )
            assert session.quic._remote_max_streams_uni == 0  # granted none...
            session.quic._remote_max_streams_uni = 1  # ...and a hostile peer ignores that
            stream_id = session.quic.get_next_available_stream_id(is_unidirectional=True)
            session.quic.send_stream_data(stream_id, b"x" * 1000)
            session._wake()
            await session.terminated.wait()
        assert session.close_error_code == QuicErrorCode.STREAM_LIMIT_ERROR
        command = await cluster.manager.send_and_wait("good", "echo", "still here")
    assert command.status is CommandStatus.COMPLETED


class _SentDatagrams:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def try_send(self, data: bytes, addr: tuple) -> bool:
        self.sent.append(data)
        return True


@pytest.mark.parametrize("size, answered", [(100, False), (1200, True)])
async def test_only_a_datagram_that_could_start_a_connection_gets_a_version_negotiation(
    dev_cert, size, answered
):
    """RFC 9000, 5.2.2: a packet of an unknown version is answered with the
    versions spoken here only if its datagram is large enough to start a
    connection (1,200 bytes); smaller ones are dropped."""
    cert, key = dev_cert
    endpoint = QuicEndpoint(server_quic_configuration(cert, key), SessionHandler)
    endpoint._transport = transport = _SentDatagrams()
    dcid, scid = os.urandom(8), os.urandom(8)
    packet = bytes([0xC0]) + struct.pack("!I", 0x1A2A3A4A) + bytes([8]) + dcid + bytes([8]) + scid
    endpoint._datagram_received(packet + b"\x00" * (size - len(packet)), ("192.0.2.1", 1234))
    assert len(transport.sent) == (1 if answered else 0)
