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
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import (
    QuicHeader,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.retry import QuicRetryTokenHandler

from ..wire import DEFAULT_MAX_FRAME_SIZE, ProtocolErrorCode
from .connection import DatagramSocket, QuicSession, SessionHandler

logger = logging.getLogger("trio_quiccmd.quic")

#: Clients must pad their first datagram to this size (RFC 9000, section 14.1).
MIN_INITIAL_SIZE = 1200
#: Handshakes in progress at once, by default; see QuicEndpoint.
DEFAULT_MAX_HANDSHAKES = 64
#: A handshake still unfinished after this long (seconds) no longer counts
#: against the limit: its client is gone or about to give up (agents wait 10 s),
#: and Initials sent from forged addresses must not hold the door shut.
HANDSHAKE_SLOT_SECONDS = 5.0
#: At most one "deferred" warning per this many seconds.
DEFERRED_LOG_INTERVAL = 10.0


class QuicEndpoint:
    """Accepts QUIC connections on one UDP socket and runs a session for each.

    ``handler_factory`` makes the protocol handler for each new session.

    At most ``max_handshakes`` handshakes are in progress at once. When thousands
    of agents dial at once (a server restart), every handshake the server
    starts costs it a signature and its share of the CPU: started all
    together they each took longer than their clients' probe timeout, every
    client repeated its flights, and the work multiplied (3,000 agents, 256
    dialling at a time: 22 datagrams received and 15 sent per handshake
    instead of 5 and 3).

    Of these, at most half are for clients whose source address is
    unproven: one more gets a Retry (RFC 9000, 8.1.2), a few bytes and no
    handshake work, carrying a token it must bring back from that address.
    Forged addresses never come back, so they can hold only that half, and
    real agents (which answer a Retry without being told) keep the rest. A
    client with a valid token is started if any slot is free; if none is,
    its Initial is dropped and it sends it again after its probe timeout
    (about 1 s, then 2, 4 s...). A handshake that makes no progress for
    ``HANDSHAKE_SLOT_SECONDS`` stops counting (its client gave up, or never
    existed).
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
        if max_handshakes < 1:
            raise ValueError("max_handshakes must be at least 1")
        self.max_handshakes = max_handshakes
        # Sessions whose handshake is under way: when each began (trio clock),
        # and whether its client proved its address with a Retry token.
        self._handshakes: dict[QuicSession, tuple[float, bool]] = {}
        self._retry = QuicRetryTokenHandler()
        #: New connections not started for want of a handshake slot (answered
        #: with a Retry, or dropped).
        self.deferred_handshakes = 0
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
        original_destination_cid = header.destination_cid
        retry_source_cid = None
        if header.token:
            try:
                original_destination_cid = self._retry.validate_token(
                    address=addr, destination_cid=header.destination_cid,
                    token=header.token, now=trio.current_time(),
                )
            except ValueError:
                # Not a token of ours, too old, or from another address: the
                # client's handshake timeout ends it, and it dials afresh.
                logger.debug("Initial with an invalid token dropped peer=%s", addr)
                return
            retry_source_cid = header.destination_cid
        proven = retry_source_cid is not None
        if not self._may_start_handshake(proven):
            self._defer_handshake(header, addr, proven)
            return

        quic = QuicConnection(
            configuration=self._configuration,
            original_destination_connection_id=original_destination_cid,
            retry_source_connection_id=retry_source_cid,
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
        self._handshakes[session] = (trio.current_time(), proven)
        self._add_route(header.destination_cid, session)
        self._add_route(quic.host_cid, session)
        self._nursery.start_soon(self._run_session, session)
        session.datagram_received(data, addr)

    def _may_start_handshake(self, proven: bool) -> bool:
        handshakes = self._handshakes
        unproven_budget = max(1, self.max_handshakes // 2)
        if len(handshakes) < (self.max_handshakes if proven else unproven_budget):
            return True
        # Looked at only when full: handshakes that ended, or ran out of time, leave.
        expired = trio.current_time() - HANDSHAKE_SLOT_SECONDS
        for session, (began, _proven) in list(handshakes.items()):
            if session.handshake_done.is_set() or session.terminated.is_set() or began <= expired:
                del handshakes[session]
        if len(handshakes) >= self.max_handshakes:
            return False
        return proven or sum(not p for _began, p in handshakes.values()) < unproven_budget

    def _defer_handshake(self, header: QuicHeader, addr: NetworkAddress, proven: bool) -> None:
        self.deferred_handshakes += 1
        now = trio.current_time()
        if not proven:
            assert self._transport is not None
            retry_source_cid = os.urandom(self._configuration.connection_id_length)
            self._transport.try_send(
                encode_quic_retry(
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
                ),
                addr,
            )
        if now >= self._deferred_logged_at + DEFERRED_LOG_INTERVAL:
            logger.warning(
                "New connections deferred: too many handshakes in progress "
                "max_handshakes=%d deferred=%d last_peer=%s",
                self.max_handshakes, self.deferred_handshakes - self._deferred_logged, addr,
            )
            self._deferred_logged = self.deferred_handshakes
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
            self._handshakes.pop(session, None)
            for cid in self._session_cids.pop(session, ()):
                self._routes.pop(cid, None)
