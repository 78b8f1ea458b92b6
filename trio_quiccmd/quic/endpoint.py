"""QuicEndpoint: the server's UDP socket and the sessions behind it.

Datagrams are routed by destination connection ID, never by source address,
so an agent whose address changes (NAT rebinding, migration) keeps its session.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable

import trio
from aioquic.buffer import Buffer
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import TRANSPORT_CLOSE_FRAME_CAPACITY, NetworkAddress
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicHeader,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.retry import QuicRetryTokenHandler

from ..wire import DEFAULT_MAX_FRAME_SIZE, FRAME_HEADER_SIZE, ProtocolErrorCode
from .admission import DEFAULT_MAX_HANDSHAKES, Admission, HandshakeAdmission
from .connection import DatagramSocket, QuicSession, SessionHandler
from .flow_control import WindowedQuicConnection

logger = logging.getLogger("trio_quiccmd.quic")

#: Clients must pad their first datagram to this size (RFC 9000, section 14.1).
MIN_INITIAL_SIZE = 1200
#: At most one "deferred" warning per this many seconds.
DEFERRED_LOG_INTERVAL = 10.0


class QuicEndpoint:
    """Accepts QUIC connections on one UDP socket and runs a session for each.

    ``handler_factory`` makes the protocol handler for each new session.

    At most ``max_handshakes`` handshakes are in progress at once, at most
    half of them for clients whose address is unproven; beyond that a new
    connection gets a Retry or waits (see :mod:`.admission`).
    """

    def __init__(
        self,
        configuration: QuicConfiguration,
        handler_factory: Callable[[], SessionHandler],
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
    ):
        if configuration.is_client:
            raise ValueError("QuicEndpoint needs a server configuration")
        self.admission = HandshakeAdmission(max_handshakes)
        self._retry = QuicRetryTokenHandler()
        self._deferred_logged = 0
        self._deferred_logged_at = -math.inf
        self._configuration = configuration
        self._handler_factory = handler_factory
        self._max_frame_size = max_frame_size
        self._routes: dict[bytes, QuicSession] = {}
        self._session_cids: dict[QuicSession, set[bytes]] = {}
        self._transport: DatagramSocket | None = None
        self._nursery: trio.Nursery | None = None
        self._accepting = True

    @property
    def sessions(self) -> list[QuicSession]:
        return list(self._session_cids)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[tuple] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind ``host:port`` (port 0 picks one) and serve until cancelled.

        Reports the bound address through ``task_status.started``. When
        cancelled, sessions are dropped without a close; call :meth:`close_all`
        first for a polite shutdown.
        """
        transport = DatagramSocket.bind(host, port)
        self._transport = transport
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(transport.local_address)
                await transport.receive_forever(self._datagram_received)
        finally:
            self._nursery = None
            transport.close()

    def stop_accepting(self) -> None:
        """Ignore new connection attempts from now on (shutdown)."""
        self._accepting = False

    async def close_all(
        self, error_code: int = ProtocolErrorCode.SHUTTING_DOWN, reason: str = "", *, grace: float = 1.0
    ) -> None:
        """Close every session, once what was written on it is acknowledged
        (a CANCEL just sent, say), and wait for the closes to go out: at most
        ``grace`` s in all (shielded), half of it for the acknowledgements."""
        self.stop_accepting()
        sessions = self.sessions
        with trio.move_on_after(grace / 2, shield=True):
            async with trio.open_nursery() as nursery:
                for session in sessions:
                    nursery.start_soon(session.wait_acknowledged)
        for session in sessions:
            session.close(error_code, reason)
        with trio.move_on_after(grace / 2, shield=True):
            for session in sessions:
                await session.terminated.wait()

    def _datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=self._configuration.connection_id_length
            )
        except ValueError:
            return  # not QUIC, or truncated: nothing to answer

        session = self._routes.get(header.destination_cid)
        if session is not None:
            session.datagram_received(data, addr)
            return

        if (
            header.packet_type != QuicPacketType.VERSION_NEGOTIATION
            and header.version is not None
            and header.version not in self._configuration.supported_versions
        ):
            if len(data) < MIN_INITIAL_SIZE:
                # RFC 9000, 5.2.2: only a datagram that could start a
                # connection is answered; smaller ones are dropped.
                return
            # Never answer a version negotiation with one (reflection loops).
            self._send(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=self._configuration.supported_versions,
                ),
                addr,
            )
            return

        if (
            not self._accepting
            or header.packet_type != QuicPacketType.INITIAL
            or len(data) < MIN_INITIAL_SIZE
            or self._nursery is None
        ):
            return
        now = trio.current_time()
        original_destination_cid = header.destination_cid
        retry_source_cid = None
        if header.token:
            try:
                original_destination_cid = self._retry.validate_token(
                    address=addr, destination_cid=header.destination_cid, token=header.token, now=now,
                )
            except ValueError:
                # Not a token of ours (the server restarted since its Retry),
                # too old, or from another address: say so (RFC 9000, 8.1.3),
                # so that the client dials afresh instead of waiting out its
                # handshake timeout. (This server sends no NEW_TOKEN, so every
                # token it can validate is a Retry's.)
                self._send(_invalid_token_close(header), addr)
                return
            retry_source_cid = header.destination_cid
        proven = retry_source_cid is not None
        decision = self.admission.decide(header.destination_cid, proven, now)
        if decision is not Admission.START:
            if decision is Admission.RETRY:
                self._send(self._retry_for(header, addr, now), addr)
            self._log_deferred(addr, now)
            return

        quic = WindowedQuicConnection(
            configuration=self._configuration,
            original_destination_connection_id=original_destination_cid,
            retry_source_connection_id=retry_source_cid,
        )
        session = QuicSession(
            quic,
            self._transport,
            self._handler_factory(),
            max_frame_size=self._max_frame_size,
            # The peer is unknown until its handler accepts it: one frame
            # (its HELLO) is all it may leave unfinished until then.
            max_buffered_bytes=self._max_frame_size + FRAME_HEADER_SIZE,
            on_connection_id_issued=lambda cid: self._add_route(cid, session),
            on_connection_id_retired=self._remove_route,
            on_handshake_completed=lambda: self.admission.finished(session),
        )
        self._session_cids[session] = set()
        self.admission.started(session, proven, now)
        self._add_route(header.destination_cid, session)
        self._add_route(quic.host_cid, session)
        self._nursery.start_soon(self._run_session, session)
        session.datagram_received(data, addr)

    def _send(self, data: bytes, addr: NetworkAddress) -> None:
        assert self._transport is not None
        self._transport.try_send(data, addr)

    def _retry_for(self, header: QuicHeader, addr: NetworkAddress, now: float) -> bytes:
        retry_source_cid = os.urandom(self._configuration.connection_id_length)
        return encode_quic_retry(
            version=header.version,
            source_cid=retry_source_cid,
            destination_cid=header.source_cid,
            original_destination_cid=header.destination_cid,
            retry_token=self._retry.create_token(
                address=addr,
                original_destination_connection_id=header.destination_cid,
                retry_source_connection_id=retry_source_cid,
                now=now,
            ),
        )

    def _log_deferred(self, addr: NetworkAddress, now: float) -> None:
        if now >= self._deferred_logged_at + DEFERRED_LOG_INTERVAL:
            deferred = self.admission.deferred
            logger.warning(
                "New connections deferred: too many handshakes in progress "
                "max_handshakes=%d deferred=%d last_peer=%s",
                self.admission.max_handshakes, deferred - self._deferred_logged, addr,
            )
            self._deferred_logged = deferred
            self._deferred_logged_at = now

    def _add_route(self, cid: bytes, session: QuicSession) -> None:
        self._routes[cid] = session
        self._session_cids[session].add(cid)

    def _remove_route(self, cid: bytes) -> None:
        session = self._routes.pop(cid, None)
        if session is not None:
            self._session_cids[session].discard(cid)

    async def _run_session(self, session: QuicSession) -> None:
        try:
            await session.run()
        finally:
            self.admission.finished(session)
            for cid in self._session_cids.pop(session, ()):
                self._routes.pop(cid, None)


def _invalid_token_close(header: QuicHeader) -> bytes:
    """A server Initial closing the connection with INVALID_TOKEN (its keys
    come from the client's chosen destination connection ID)."""
    crypto = CryptoPair()
    crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
    builder = QuicPacketBuilder(
        host_cid=header.destination_cid,
        is_client=False,
        max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
        peer_cid=header.source_cid,
        version=header.version,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    buf = builder.start_frame(QuicFrameType.TRANSPORT_CLOSE, capacity=TRANSPORT_CLOSE_FRAME_CAPACITY)
    buf.push_uint_var(QuicErrorCode.INVALID_TOKEN)
    buf.push_uint_var(QuicFrameType.PADDING)  # the frame type that caused it: none in particular
    buf.push_uint_var(0)  # no reason phrase
    datagrams, _packets = builder.flush()
    return datagrams[0]
