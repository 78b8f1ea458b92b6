"""Agent: dials the server, says HELLO, serves commands, reconnects when cut off."""

from __future__ import annotations

import logging
import random
import secrets
import ssl
from pathlib import Path
from typing import Any

import trio
from aioquic.quic.configuration import QuicConfiguration

from ..model import ErrorCode
from ..quic.connection import ConnectionFailed, QuicSession, SessionHandler, connect, wait_any
from ..quic.tls import (
    check_ca_file,
    fingerprint,
    fingerprint_matches,
    parse_fingerprint,
    system_ca_locations,
)
from ..wire import (
    ALPN,
    DEFAULT_MAX_FRAME_SIZE,
    CancelFrame,
    CommandFrame,
    Frame,
    Hello,
    ProtocolError,
    ProtocolErrorCode,
    ResultFrame,
    Welcome,
)
from .dedup import (
    DEFAULT_MAX_HELD_RESULTS,
    DEFAULT_MAX_REMEMBERED,
    DEFAULT_REMEMBER_FOR,
    RecentCommands,
    ResultOutbox,
)
from .executor import CommandExecutor, builtin_executor
from .handler import CommandHandler

logger = logging.getLogger("trio_quiccmd.agent")

AGENT_VERSION = "trio_quiccmd/0.1"

#: A session that lasted this long resets the reconnect backoff.
STABLE_SESSION_SECONDS = 10.0

#: After the shutdown grace period, how long the agent still waits for the
#: commands it cancelled to end and for their results to be acknowledged
#: before it closes the connection anyway.
SHUTDOWN_FLUSH_SECONDS = 2.0

#: How often a draining agent checks whether its work is done and its
#: results acknowledged (aioquic has no event for "the peer acked this stream").
_DRAIN_POLL_SECONDS = 0.01


class AgentRejected(Exception):
    """The server refused this agent in a way retrying will not fix."""


class AgentUnauthorized(AgentRejected):
    """The server refused this agent's credential (or revoked it): close code
    UNAUTHORIZED. The agent stops rather than retry: the same token would be
    refused again, and a fleet of agents redialling with a bad token is a
    flood. ``reason`` is the server's explanation."""

    def __init__(self, reason: str):
        super().__init__(f"the server refused this agent's credential: {reason}")
        self.reason = reason


class ServerFingerprintMismatch(ConnectionFailed):
    """The server's certificate is not the one this agent pinned.

    Retried with backoff like any failed connection (the server may be
    mid-rotation, or someone is in the way), and logged as an error each time.
    """

    def __init__(self, expected: str, presented: str | None):
        super().__init__(
            f"server certificate does not match the pinned fingerprint: "
            f"expected {expected}, server presented {presented or 'no certificate'}"
        )
        self.expected = expected
        self.presented = presented


def _check_ca_file(path: str, whose: str) -> None:
    try:
        check_ca_file(path)
    except ValueError as exc:
        raise ConnectionFailed(f"cannot use {whose} {path}: {exc}") from None


def _is_server_bidi(stream_id: int) -> bool:
    return stream_id % 4 == 1


class _AgentSession(SessionHandler):
    """The agent's side of one connection: WELCOME, COMMAND and CANCEL frames,
    and the delivery of held results."""

    def __init__(self, agent: "Agent", nursery: trio.Nursery):
        self._agent = agent
        self._nursery = nursery
        self.session: QuicSession | None = None
        self.welcome: Welcome | None = None
        self.welcomed = trio.Event()
        #: Set when the connection is lost: a refusal (a CONNECTION_CLOSE in
        #: answer to HELLO) is acted on as it arrives, not once aioquic's
        #: draining period after it is over.
        self.lost = trio.Event()
        self.control_stream: int | None = None
        #: Set (and the connection closed) when the pinned fingerprint does not match.
        self.pin_mismatch: ServerFingerprintMismatch | None = None
        # Held results on their way: stream_id -> command_id, and the ids.
        self._result_streams: dict[int, str] = {}
        self._delivering: set[str] = set()
        # Command streams a result was sent on and whose delivery (the
        # peer's ACK of the data and FIN) may not have been seen yet, for the
        # drain to wait on. Pruned when it doubles, so it stays bounded by
        # the unacknowledged results.
        self._sent_results: set[int] = set()
        self._prune_sent_at = 256

    def connection_lost(self, session: QuicSession, error_code: int, reason: str) -> None:
        self.lost.set()

    def result_sent(self, stream_id: int) -> None:
        self._sent_results.add(stream_id)
        if len(self._sent_results) >= self._prune_sent_at:
            self._prune_sent_results()
            self._prune_sent_at = max(256, 2 * len(self._sent_results))

    def _prune_sent_results(self) -> None:
        session = self.session
        streams = session.quic._streams if session is not None else {}  # no public accessor
        self._sent_results = {
            stream_id for stream_id in self._sent_results
            if (stream := streams.get(stream_id)) is not None and not stream.sender.is_finished
        }

    def all_delivered(self) -> bool:
        """Whether every result sent or held has reached the server, as far
        as this connection can tell: each result sent on a command's stream is
        acknowledged, and each held result was taken (or cannot be sent on
        this connection: its stream was reset)."""
        if self.session is None:
            return True
        self._prune_sent_results()
        if self._sent_results or self._result_streams:
            return False
        return all(
            result.command_id in self._delivering for result in self._agent._outbox.results()
        )

    def deliver_held(self) -> None:
        """Send each held result not yet sent on this connection, each on a new
        stream of its own, while the server lets us open streams.

        The server ends its side of such a stream once it has the result;
        only then is the result dropped from the outbox (:meth:`stream_ended`).
        """
        session = self.session
        if session is None or session.is_closing or self.welcome is None:
            return
        for result in self._agent._outbox.results():
            if result.command_id in self._delivering:
                continue
            if not session.can_open_stream:
                return  # streams_available() calls again
            stream_id = session.open_stream(result, end_stream=True)
            self._result_streams[stream_id] = result.command_id
            self._delivering.add(result.command_id)
            logger.info("Delivering held result command_id=%s", result.command_id)

    def stream_ended(self, session: QuicSession, stream_id: int) -> None:
        command_id = self._result_streams.pop(stream_id, None)
        if command_id is not None:
            # The server has the result (it ends the stream after taking it).
            self._delivering.discard(command_id)
            self._agent._outbox.remove(command_id)
            logger.info("Held result delivered command_id=%s", command_id)

    def stream_reset(self, session: QuicSession, stream_id: int, error_code: int) -> None:
        # Not expected from our server; the result stays held (and in
        # _delivering, so it is not retried on this connection) for the next one.
        self._result_streams.pop(stream_id, None)

    def streams_available(self, session: QuicSession) -> None:
        self.deliver_held()

    def handshake_completed(self, session: QuicSession) -> None:
        # Runs synchronously as the handshake completes, before any stream
        # data from the server is handed to frame_received (aioquic queues the
        # events in order), so nothing from an unpinned server is ever acted on.
        pinned = self._agent._server_fingerprint
        if pinned is None:
            return
        # aioquic keeps the server's leaf certificate on its TLS context and has
        # no public accessor; a missing attribute fails closed.
        tls = getattr(session.quic, "tls", None)
        certificate = getattr(tls, "_peer_certificate", None)
        if certificate is not None and fingerprint_matches(certificate, pinned):
            return
        self.pin_mismatch = ServerFingerprintMismatch(
            pinned, fingerprint(certificate) if certificate is not None else None
        )
        session.close(ProtocolErrorCode.NO_ERROR, "server certificate rejected")

    def frame_received(self, session: QuicSession, stream_id: int, frame: Frame) -> None:
        if self.pin_mismatch is not None:
            return
        if stream_id == self.control_stream:
            if isinstance(frame, Welcome) and self.welcome is None:
                self.welcome = frame
                self.welcomed.set()
                return
            if isinstance(frame, CancelFrame) and self.welcome is not None:
                self._agent.handler.cancel(frame.command_id)
                return
        elif isinstance(frame, CommandFrame) and _is_server_bidi(stream_id):
            agent = self._agent
            if agent._stopping and not agent.handler.knows(frame.command_id):
                # Draining: new work is refused; a command already running or
                # run here is still answered as usual (at most once).
                agent._refuse(session, stream_id, frame)
                return
            logger.debug(
                "Command received command_id=%s command_type=%s",
                frame.command_id, frame.command_type,
            )
            agent._in_flight += 1
            self._nursery.start_soon(agent._execute, session, stream_id, frame)
            return
        raise ProtocolError(
            ProtocolErrorCode.UNEXPECTED_FRAME, f"unexpected {frame.type} frame on stream {stream_id}"
        )


class Agent:
    """A connection to one server that runs the commands it is sent.

    ``executor`` does the work (default: the built-in ``echo``, ``sleep``,
    ``fail`` and ``sysinfo``).

    The server is always authenticated, one of two ways:

    * **CA verification** (the default): the certificate chain must lead to
      ``ca_file``/``ca_data`` -- a development server's self-signed
      ``server-cert.pem`` works as its own CA -- or, if neither is given, to
      the operating system's CA store; and it must name ``server_name``
      (default: the host in ``server``).
    * **Pinning**, ``server_fingerprint="sha256:<hex>"``: the server's leaf
      certificate must have exactly that SHA-256 fingerprint (as the server
      logs it at startup). aioquic cannot pin, so with a pin and no CA the
      chain check is switched off (``CERT_NONE``) and the pin is checked
      instead, in constant time, as soon as the handshake completes and before
      HELLO is sent or any frame from the server is acted on. This is still
      verification, and the same one SSH does: TLS 1.3 makes the server sign
      the handshake with the private key of the certificate it presents
      (aioquic checks that CertificateVerify whatever the verify mode), so
      only the holder of the pinned certificate's key can get past the pin.
      Expiry and host name are not checked: the pin names the certificate
      exactly. If a CA is given as well, both checks apply.

    The agent proves its ``client_id`` with ``token`` (sent in HELLO; see
    docs/security.md). A server that refuses it closes with UNAUTHORIZED, and
    :meth:`run` raises :class:`AgentUnauthorized` instead of reconnecting.

    A pin mismatch raises :class:`ServerFingerprintMismatch` for that attempt;
    :meth:`run` logs it as an error and retries with backoff.

    Delivery across reconnects (docs/protocol.md, "Reconnects"): a command is
    run at most once by this agent (ids are remembered for
    ``max(timeout, remember_for)`` seconds after it finished, at most
    ``max_remembered_commands`` of them), and a result whose connection is
    gone when it is ready is held (at most ``max_held_results``) and
    delivered on the next connection. Both live in memory: a restarted agent
    process starts afresh (with a new :attr:`instance_id`).

    Shutdown: :meth:`stop` with a ``grace`` period drains (new commands are
    refused, running ones may finish and their results are delivered, the
    rest are cancelled and reported ``cancelled`` / ``agent_shutdown``), then
    closes the connection politely and makes :meth:`run` return. Cancelling
    :meth:`run` instead is the abrupt path: running commands are cancelled
    without a result and the server times them out.
    """

    def __init__(
        self,
        client_id: str,
        server: tuple[str, int],
        executor: CommandExecutor | None = None,
        *,
        labels: dict[str, str] | None = None,
        ca_file: str | Path | None = None,
        ca_data: bytes | None = None,
        server_name: str | None = None,
        max_concurrent_commands: int = 1024,
        keepalive_interval: float = 10.0,
        idle_timeout: float = 30.0,
        handshake_timeout: float = 10.0,
        reconnect_initial_delay: float = 0.5,
        reconnect_max_delay: float = 30.0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        token: str | None = None,
        server_fingerprint: str | None = None,
        max_held_results: int = DEFAULT_MAX_HELD_RESULTS,
        max_remembered_commands: int = DEFAULT_MAX_REMEMBERED,
        remember_for: float = DEFAULT_REMEMBER_FOR,
    ):
        if not client_id:
            raise ValueError("client_id must not be empty")
        # What the server refuses in a HELLO: refused here once, rather than
        # by the server on every reconnect for ever.
        if len(client_id) > 256 or not client_id.isprintable():
            raise ValueError(f"client_id must be 1 to 256 printable characters, not {client_id!r}")
        for key, value in (labels or {}).items():
            if not (key.isprintable() and value.isprintable()):
                raise ValueError(f"label {key!r}={value!r}: labels must be printable text")
        self._server_fingerprint = (
            parse_fingerprint(server_fingerprint) if server_fingerprint is not None else None
        )
        self.client_id = client_id
        self.server = server
        self.labels = dict(labels or {})
        self.handler = CommandHandler(
            executor if executor is not None else builtin_executor(),
            # The most a server takes, whatever this agent's own max_frame_size
            # (what it takes): a larger result would cost the connection.
            max_result_bytes=DEFAULT_MAX_FRAME_SIZE,
            recent=RecentCommands(
                max_entries=max_remembered_commands, remember_for=remember_for
            ),
        )
        #: Random id of this Agent's run, sent in every HELLO: the server
        #: re-sends unfinished commands only to the instance that got them.
        self.instance_id = secrets.token_hex(8)
        self._outbox = ResultOutbox(max_results=max_held_results)
        # The welcomed connection's handler, while there is one.
        self._link: _AgentSession | None = None
        self._ca_file = str(ca_file) if ca_file is not None else None
        self._ca_data = ca_data
        self._server_name = server_name or server[0]
        self._max_concurrent = max_concurrent_commands
        self._keepalive_interval = keepalive_interval
        self._idle_timeout = idle_timeout
        self._handshake_timeout = handshake_timeout
        # The server address the last dial reached (of those its name resolves to).
        self._server_address: tuple | None = None
        self._reconnect_initial = reconnect_initial_delay
        self._reconnect_max = reconnect_max_delay
        self._max_frame_size = max_frame_size
        self._token = token
        self._session: QuicSession | None = None
        # The connection being set up or in use (welcomed or not), for stop().
        self._current: QuicSession | None = None
        self._current_link: _AgentSession | None = None
        self._attempt_scope: trio.CancelScope | None = None
        self._stopping = False
        self._stop_requested = trio.Event()
        self._stop_grace = 0.0
        # The drain's cancel scope while one runs, so stop() can shorten it.
        self._drain_scope: trio.CancelScope | None = None
        # COMMANDs taken for execution whose task has not finished yet.
        self._in_flight = 0
        self._connected = trio.Event()
        #: How many sessions were established (1 after the first WELCOME).
        self.sessions_established = 0

    @property
    def connected(self) -> bool:
        return self._session is not None and not self._session.is_closing

    @property
    def session(self) -> QuicSession | None:
        return self._session

    @property
    def running_commands(self) -> int:
        """How many commands are running here now."""
        return self._in_flight

    @property
    def held_results(self) -> list[str]:
        """Ids of results waiting to be delivered (the next HELLO lists them)."""
        return self._outbox.ids()

    async def wait_connected(self) -> None:
        """Return once the agent has a welcomed session. Cancellable, no side effects."""
        while not self.connected:
            event, session = self._connected, self._session
            if session is not None and event.is_set():
                # The welcomed session is closing; a new event follows it.
                await session.terminated.wait()
                await trio.sleep(0.01)
            else:
                await event.wait()

    async def _configuration(self) -> QuicConfiguration:
        """The TLS settings of one dial. Raises ConnectionFailed if ``ca_file``
        (or the system's CA file) cannot be used now."""
        configuration = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            server_name=self._server_name,
            idle_timeout=self._idle_timeout,
        )
        if self._ca_file is not None or self._ca_data is not None:
            if self._ca_file is not None:
                # aioquic reads the file during each handshake (so a rotated CA
                # is used from the next connection on), and raised out of the
                # middle of it, and of the agent, for one gone or damaged
                # since the last: checked first, it fails this dial, saying
                # why, and the agent retries.
                await trio.to_thread.run_sync(_check_ca_file, self._ca_file, "the CA file")
            configuration.load_verify_locations(cafile=self._ca_file, cadata=self._ca_data)
        elif self._server_fingerprint is not None:
            # Authenticated by the pin instead: see the class docstring and
            # _AgentSession.handshake_completed.
            configuration.verify_mode = ssl.CERT_NONE
        else:
            cafile, capath = system_ca_locations()
            if cafile is not None:
                # Checked as OpenSSL will load it during the handshake, for the
                # same reasons as a ca_file (SSL_CERT_FILE may name anything).
                await trio.to_thread.run_sync(_check_ca_file, cafile, "the system CA file")
            if cafile is not None or capath is not None:
                configuration.load_verify_locations(cafile=cafile, capath=capath)
            # else aioquic falls back to certifi's bundle.
        return configuration

    def stop(self, grace: float = 0.0) -> None:
        """Shut down gracefully: drain, close the connection politely, and make
        :meth:`run` return.

        Synchronous, so a signal handler can call it. With a welcomed
        connection open:

        1. From now on a new COMMAND is refused at once: RESULT ``failed`` /
           ``agent_shutting_down``, and it is never run. (One already running
           or run here is answered as usual.) CANCEL still works.
        2. Running commands get ``grace`` seconds to finish; their results,
           and any held ones, are delivered on this connection, and the agent
           waits until the server has acknowledged them.
        3. Commands still running then are cancelled and reported
           ``cancelled`` / ``agent_shutdown`` (the server ends them at once
           rather than at their deadline); the agent waits at most
           :data:`SHUTDOWN_FLUSH_SECONDS` more for them to end and for their
           results to be acknowledged.
        4. The server is sent a CONNECTION_CLOSE (it sees the agent leave at
           once, instead of at its idle timeout) and :meth:`run` returns.

        ``grace=0`` (the default) skips step 2. If the connection is lost
        during the drain, or the agent is not connected when stopped, no
        reconnect is attempted: running commands are cancelled and results
        that could not be delivered are lost with the process (:meth:`run`
        logs how many).

        Calling it again can only shorten the grace period (``stop(0)`` ends
        the drain now). Cancelling :meth:`run` is the abrupt path: it also
        stops the connection's own task, so no results are sent and the
        goodbye may not be either.
        """
        if not grace >= 0:  # also refuses NaN
            raise ValueError(f"grace must be a non-negative number of seconds, got {grace!r}")
        if self._stopping:
            if self._drain_scope is not None:
                self._drain_scope.deadline = min(
                    self._drain_scope.deadline, trio.current_time() + grace
                )
            else:
                self._stop_grace = min(self._stop_grace, grace)
            return
        self._stopping = True
        self._stop_grace = grace
        self._stop_requested.set()
        current = self._current
        link = self._current_link
        if (
            current is not None
            and not current.is_closing
            and link is not None
            and link.welcome is not None
        ):
            # Welcomed (perhaps with commands already taken, in the same
            # datagram as the WELCOME): _one_session drains, then closes.
            return
        if current is not None and not current.is_closing:
            current.close(ProtocolErrorCode.NO_ERROR, "agent shutting down")
        elif self._attempt_scope is not None:
            self._attempt_scope.cancel()

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected until :meth:`stop`, reconnecting with backoff and jitter.

        Reports ``started()`` once the first session is welcomed. Raises
        :class:`AgentRejected` if the server refuses this agent for good
        (:class:`AgentUnauthorized` for a refused or revoked token). Returns
        after :meth:`stop` once the drain is over and the connection is closed.

        If cancelled (the abrupt path), running commands are cancelled without
        a result (the server times them out), held results are dropped, and
        the connection is abandoned -- only a best-effort CONNECTION_CLOSE is
        sent. Use :meth:`stop` to shut down gracefully.
        """
        attempt = 0
        rejected: AgentRejected | None = None
        async with trio.open_nursery() as nursery:
            while not self._stopping:
                with trio.CancelScope() as self._attempt_scope:
                    try:
                        began = trio.current_time()
                        await self._serve_one_session(nursery, task_status)
                        task_status = trio.TASK_STATUS_IGNORED
                        if trio.current_time() - began >= STABLE_SESSION_SECONDS:
                            # Only a session that lasted resets the backoff: a
                            # server that welcomes and then drops us at once
                            # must not be redialled in a tight loop.
                            attempt = 0
                    except AgentUnauthorized as exc:
                        logger.error(
                            "Agent unauthorized, stopping client_id=%s server=%s:%s reason=%r",
                            self.client_id, self.server[0], self.server[1], exc.reason,
                        )
                        rejected = exc
                        break
                    except AgentRejected as exc:
                        rejected = exc
                        break
                    except ServerFingerprintMismatch as exc:
                        logger.error(
                            "Server certificate does not match the pinned fingerprint "
                            "server=%s:%s expected=%s presented=%s",
                            self.server[0], self.server[1], exc.expected, exc.presented,
                        )
                    except ConnectionFailed as exc:
                        if not self._stopping:
                            logger.warning(
                                "Connection to server failed server=%s:%s error=%s",
                                self.server[0], self.server[1], exc,
                            )
                    if self._stopping:
                        break
                    attempt += 1
                    ceiling = min(
                        self._reconnect_max, self._reconnect_initial * 2 ** min(attempt - 1, 30)
                    )
                    # Jitter: a fleet cut off together does not return together.
                    delay = random.uniform(ceiling / 2, ceiling)
                    logger.info("Reconnecting in %.2f s attempt=%d", delay, attempt)
                    await trio.sleep(delay)
            self._attempt_scope = None
            if self._in_flight or len(self._outbox):
                # No connection to report to, and none will come.
                logger.warning(
                    "Results not delivered, lost with the agent client_id=%s "
                    "running=%d held_results=%d",
                    self.client_id, self._in_flight, len(self._outbox),
                )
            # Commands still running have no connection to report to.
            nursery.cancel_scope.cancel()
        if rejected is not None:
            # Raised here, outside the nursery, so callers catch it as itself
            # rather than inside an ExceptionGroup.
            raise rejected
        logger.info("Agent stopped client_id=%s", self.client_id)

    async def _serve_one_session(self, nursery: trio.Nursery, task_status: Any) -> None:
        """One connection, from dialling to its end. Raises ConnectionFailed or
        AgentRejected bare (not wrapped in an ExceptionGroup by the nursery)."""
        failure: ConnectionFailed | AgentRejected | None = None
        async with trio.open_nursery() as connection_nursery:
            try:
                await self._one_session(connection_nursery, nursery, task_status)
            except (ConnectionFailed, AgentRejected) as exc:
                failure = exc
            # The session's socket task ends with the connection; after the
            # polite close (or its grace period) nothing is left to wait for.
            connection_nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _one_session(
        self, connection_nursery: trio.Nursery, nursery: trio.Nursery, task_status: Any
    ) -> None:
        link = _AgentSession(self, nursery)
        try:
            session = await connect(
                connection_nursery,
                self.server,
                await self._configuration(),
                link,
                max_frame_size=self._max_frame_size,
                peer_bidi_streams=self._max_concurrent,
                keepalive_interval=self._keepalive_interval,
                handshake_timeout=self._handshake_timeout,
                prefer=self._server_address,
            )
        except ConnectionFailed as exc:
            if link.pin_mismatch is not None:
                raise link.pin_mismatch from exc
            raise
        self._current = session
        self._current_link = link
        link.session = session
        try:
            if link.pin_mismatch is not None:
                raise link.pin_mismatch
            # Dialled first next time, if the server's name still resolves to it.
            self._server_address = session.peer_address
            if self._stopping:
                return
            link.control_stream = session.open_stream(
                Hello(
                    client_id=self.client_id,
                    labels=self.labels,
                    agent_version=AGENT_VERSION,
                    capabilities=["cancel"],
                    token=self._token,
                    held_results=self._outbox.ids(),
                    instance_id=self.instance_id,
                )
            )
            with trio.move_on_after(self._handshake_timeout):
                await _wait_any_event(link.welcomed, link.lost)
            if link.welcome is None:
                if not link.lost.is_set():
                    raise ConnectionFailed(
                        f"no WELCOME from the server within {self._handshake_timeout:g} s"
                    )
                reason = session.close_reason or "the server closed the connection"
                code = session.close_error_code
                self._raise_if_fatal(code, reason)
                raise ConnectionFailed(f"session refused: {reason}", code)
            self._session = session
            self._link = link
            self.sessions_established += 1
            self._connected.set()
            logger.info(
                "Connected to server server=%s:%s client_id=%s session_id=%s held_results=%d",
                self.server[0], self.server[1], self.client_id, link.welcome.session_id,
                len(self._outbox),
            )
            link.deliver_held()
            task_status.started()
            await _wait_any_event(session.terminated, self._stop_requested)
            if self._stopping:
                if not session.is_closing:
                    await self._drain(session, link)
                logger.info("Disconnected from server client_id=%s reason=stopping", self.client_id)
                return
            logger.warning(
                "Connection lost client_id=%s code=%s reason=%r",
                self.client_id, session.close_error_code, session.close_reason,
            )
            self._raise_if_fatal(session.close_error_code, session.close_reason)
        finally:
            self._session = None
            self._link = None
            self._current = None
            self._current_link = None
            self._connected = trio.Event()
            await session.aclose(
                ProtocolErrorCode.NO_ERROR, "agent shutting down" if self._stopping else ""
            )

    async def _drain(self, session: QuicSession, link: _AgentSession) -> None:
        """The graceful part of :meth:`stop`, on a welcomed connection (the
        caller closes it afterwards). Returns early if the connection is lost."""
        logger.info(
            "Draining before shutdown client_id=%s running=%d held_results=%d grace=%.1f",
            self.client_id, self._in_flight, len(self._outbox), self._stop_grace,
        )
        with trio.CancelScope(deadline=trio.current_time() + self._stop_grace) as scope:
            self._drain_scope = scope
            try:
                await self._until_drained(session, link)
            finally:
                self._drain_scope = None
        if session.is_closing:
            return
        if self._in_flight:
            cancelled = self.handler.cancel_all_for_shutdown()
            logger.warning(
                "Shutdown grace period over, cancelling running commands client_id=%s count=%d",
                self.client_id, cancelled,
            )
        with trio.move_on_after(SHUTDOWN_FLUSH_SECONDS) as flush:
            await self._until_drained(session, link)
        if flush.cancelled_caught:
            logger.warning(
                "Closing with work unfinished or unacknowledged client_id=%s running=%d",
                self.client_id, self._in_flight,
            )

    async def _until_drained(self, session: QuicSession, link: _AgentSession) -> None:
        """Return once nothing runs and every result is delivered, or the
        connection is lost."""
        while not session.is_closing:
            if self._in_flight == 0 and link.all_delivered():
                return
            await trio.sleep(_DRAIN_POLL_SECONDS)

    def _refuse(self, session: QuicSession, stream_id: int, command: CommandFrame) -> None:
        """Answer a COMMAND that arrived while shutting down, without running it."""
        logger.info(
            "Command refused, the agent is shutting down command_id=%s", command.command_id
        )
        self._send_result(
            session,
            stream_id,
            ResultFrame(
                command_id=command.command_id,
                status="failed",
                error="the agent is shutting down",
                error_code=ErrorCode.AGENT_SHUTTING_DOWN.value,
            ),
        )

    @staticmethod
    def _send_result(session: QuicSession, stream_id: int, result: ResultFrame) -> bool:
        """Answer on the command's stream; False if that stream or connection is gone."""
        if not session.send_frame(stream_id, result, end_stream=True):
            return False
        handler = session.handler
        if isinstance(handler, _AgentSession):
            handler.result_sent(stream_id)
        return True

    @staticmethod
    def _raise_if_fatal(code: int | None, reason: str) -> None:
        if code == ProtocolErrorCode.UNAUTHORIZED:
            raise AgentUnauthorized(reason)
        if code == ProtocolErrorCode.UNSUPPORTED_VERSION:
            raise AgentRejected(f"the server refused this agent: {reason}")
        if code == ProtocolErrorCode.REPLACED:
            # Another agent said HELLO with our client_id. Reconnecting would
            # replace it in turn, and the two would evict each other forever.
            raise AgentRejected(
                "another agent connected with the same client_id and replaced this one"
            )

    async def _execute(self, session: QuicSession, stream_id: int, command: CommandFrame) -> None:
        # _in_flight was counted when the COMMAND was taken (frame_received).
        try:
            await self._execute_counted(session, stream_id, command)
        finally:
            self._in_flight -= 1

    async def _execute_counted(
        self, session: QuicSession, stream_id: int, command: CommandFrame
    ) -> None:
        received_at = trio.current_time()
        try:
            result = await self.handler.handle(command)
        except Exception:
            # handle() reports executor errors itself; this is a bug of ours,
            # and it must not take the agent down with it.
            logger.exception("Command handling failed command_id=%s", command.command_id)
            result = ResultFrame(
                command_id=command.command_id,
                status="failed",
                error="internal error in the agent",
                error_code=ErrorCode.AGENT_ERROR.value,
            )
        try:
            if self._send_result(session, stream_id, result):
                return
            # The connection that carried the command is gone (or the server
            # gave up the stream): hold the result until a connection takes
            # it, at most until the command's deadline (the server waits no
            # longer).
            logger.info(
                "Result held: its %s command_id=%s",
                "connection is gone" if session.is_closing else "stream takes no more",
                command.command_id,
            )
            self._outbox.add(result, expires_at=received_at + command.timeout)
            if self._link is not None:
                self._link.deliver_held()
        except Exception:
            # Also a bug of ours. The result is remembered (handle()), so a
            # re-sent command is answered from memory.
            logger.exception("Sending a result failed command_id=%s", command.command_id)


async def _wait_any_event(*events: trio.Event) -> None:
    await wait_any(*(event.wait for event in events))
