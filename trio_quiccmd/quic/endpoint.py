"""QuicEndpoint: the server's UDP socket and the sessions behind it.

Datagrams are routed by destination connection ID, never by source address,
so an agent whose address changes (NAT rebinding, migration) keeps its session.
"""

from __future__ import annotations

import logging
from typing import Callable

import trio
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_header,
)

from ..wire import DEFAULT_MAX_FRAME_SIZE, ProtocolErrorCode
from .connection import DatagramSocket, QuicSession, SessionHandler

logger = logging.getLogger("trio_quiccmd.quic")

#: Clients must pad their first datagram to this size (RFC 9000, section 14.1).
MIN_INITIAL_SIZE = 1200


class QuicEndpoint:
    """Accepts QUIC connections on one UDP socket and runs a session for each.

    ``handler_factory`` makes the protocol handler for each new session.
    """

    def __init__(
        self,
        configuration: QuicConfiguration,
        handler_factory: Callable[[], SessionHandler],
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ):
        if configuration.is_client:
            raise ValueError("QuicEndpoint needs a server configuration")
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
        """Close every session and wait (at most ``grace`` s, shielded) for the closes to go out."""
        self.stop_accepting()
        sessions = self.sessions
        for session in sessions:
            session.close(error_code, reason)
        with trio.move_on_after(grace, shield=True):
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
            # Never answer a version negotiation with one (reflection loops).
            assert self._transport is not None
            self._transport.try_send(
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

        quic = QuicConnection(
            configuration=self._configuration,
            original_destination_connection_id=header.destination_cid,
        )
        session = QuicSession(
            quic,
            self._transport,
            self._handler_factory(),
            max_frame_size=self._max_frame_size,
            on_connection_id_issued=lambda cid: self._add_route(cid, session),
            on_connection_id_retired=self._remove_route,
        )
        self._session_cids[session] = set()
        self._add_route(header.destination_cid, session)
        self._add_route(quic.host_cid, session)
        self._nursery.start_soon(self._run_session, session)
        session.datagram_received(data, addr)

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
            for cid in self._session_cids.pop(session, ()):
                self._routes.pop(cid, None)
