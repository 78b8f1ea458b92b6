"""The server's side of agent connections: one ``AgentLink`` per QUIC session,
and the ``AgentRegistry`` of links that said HELLO, by client_id.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping, Protocol

import attrs
import trio

from ..model import Command
from ..quic.connection import QuicSession, SessionHandler, format_address
from ..wire import (
    PROTOCOL_VERSION,
    CancelFrame,
    CommandFrame,
    Frame,
    Hello,
    ProgressFrame,
    ProtocolError,
    ProtocolErrorCode,
    ResultFrame,
    Welcome,
)
from .auth import AgentAuthenticator, AgentAuthFailed

logger = logging.getLogger("trio_quiccmd.server")

SERVER_VERSION = "trio_quiccmd/0.1"


class LinkListener(Protocol):
    """What the registry tells the command manager."""

    def agent_connected(self, link: "AgentLink") -> None: ...

    def agent_disconnected(self, link: "AgentLink") -> None: ...

    def result_received(self, link: "AgentLink", frame: ResultFrame) -> None: ...

    def progress_received(self, link: "AgentLink", frame: ProgressFrame) -> None: ...

    def slot_freed(self, link: "AgentLink") -> None: ...


@attrs.frozen
class ClientInfo:
    """A connected agent, as ``GET /api/clients`` shows it."""

    client_id: str
    labels: dict[str, str]
    remote_address: str
    connected_at: float
    in_flight: int
    queued: int


def _format_labels(labels: Mapping[str, str]) -> str:
    # A key or value with "," or "=" is quoted: "zone=eu,role=web" as a value
    # would otherwise read as two labels.
    def part(text: str) -> str:
        return repr(text) if "," in text or "=" in text else text

    return ",".join(f"{part(k)}={part(v)}" for k, v in sorted(labels.items()))


def _is_client_bidi(stream_id: int) -> bool:
    return stream_id % 4 == 0


class AgentLink(SessionHandler):
    """One agent connection: its HELLO, its open command streams."""

    def __init__(self, registry: "AgentRegistry", accepted_at: float):
        self._registry = registry
        self.accepted_at = accepted_at
        self.session: QuicSession | None = None
        self.hello: Hello | None = None
        self.connected_at: float | None = None
        self.session_id = ""
        #: The HELLO deadline passed while the handshake was still going on.
        self.hello_overdue = False
        #: Its HELLO was refused by a limit; the connection is closing.
        self.refused = False
        #: How it proved its client_id ("token", "enrollment", "development";
        #: "" without authentication), and the hash of what it presented.
        self.credential = ""
        self.presented_hash = ""
        self._control_stream: int | None = None
        self._stream_of: dict[str, int] = {}  # command_id -> stream_id
        self._command_on: dict[int, str] = {}  # stream_id -> command_id

    @property
    def client_id(self) -> str | None:
        return self.hello.client_id if self.hello else None

    @property
    def in_flight(self) -> int:
        """Commands open on this connection (each holds one QUIC stream)."""
        return len(self._command_on)

    @property
    def can_send(self) -> bool:
        """Whether one more command stream can be opened now (the agent's stream limit)."""
        return self.session is not None and self.session.can_open_stream

    @property
    def is_open(self) -> bool:
        return self.session is not None and not self.session.is_closing

    @property
    def remote_address(self) -> str:
        addr = self.session.peer_address if self.session else None
        return format_address(addr) if addr else ""

    def has_command(self, command_id: str) -> bool:
        """Whether ``command_id`` has a stream open on this connection."""
        return command_id in self._stream_of

    def send_command(self, command: Command, timeout: float) -> None:
        """Open the command's stream and send COMMAND on it.

        Our side of the stream ends with the COMMAND: the agent's RESULT then
        finishes the stream without another round of packets.
        """
        assert self.session is not None
        stream_id = self.session.open_stream(
            CommandFrame(
                command_id=command.command_id,
                command_type=command.command_type,
                payload=command.payload,
                timeout=timeout,
            ),
            end_stream=True,
        )
        self._stream_of[command.command_id] = stream_id
        self._command_on[stream_id] = command.command_id

    def cancel_command(self, command_id: str, reason: str) -> None:
        """Tell the agent to stop executing ``command_id`` (CANCEL on the control stream).

        The control stream, not the command's: the command's stream is already
        ended on our side, and a command still running on the agent from an
        earlier connection has no stream on this one. What comes on the
        command's stream from now on (the agent's "cancelled" answer) is
        dropped unread, so an agent that never finishes it holds nothing here.
        """
        self._give_up_stream(command_id)
        if self.session is not None and self._control_stream is not None:
            self.session.send_frame(
                self._control_stream, CancelFrame(command_id=command_id, reason=reason)
            )

    def _give_up_stream(self, command_id: str) -> None:
        """Forget ``command_id``'s stream on this connection, if it has one,
        and take nothing more from it."""
        stream_id = self._stream_of.pop(command_id, None)
        if stream_id is not None:
            del self._command_on[stream_id]
            if self.session is not None:
                self.session.discard_stream_input(stream_id)

    def close(self, code: ProtocolErrorCode, reason: str) -> None:
        if self.session is not None:
            self.session.close(code, reason)

    # -- SessionHandler -----------------------------------------------------

    def handshake_completed(self, session: QuicSession) -> None:
        self.session = session
        if self.hello_overdue:
            self.close(ProtocolErrorCode.HELLO_TIMEOUT, "no HELLO received in time")

    def frame_received(self, session: QuicSession, stream_id: int, frame: Frame) -> None:
        self.session = session
        if self.refused:
            return  # closing; later frames in the same datagram change nothing
        if self.hello is None:
            self._hello_received(session, stream_id, frame)
        elif isinstance(frame, ResultFrame):
            command_id = self._command_on.get(stream_id)
            if command_id is None:
                if _is_client_bidi(stream_id) and stream_id != self._control_stream:
                    self._held_result_received(session, stream_id, frame)
                # Otherwise cancelled or timed out here already; the late
                # answer is moot.
                return
            if command_id != frame.command_id:
                raise ProtocolError(
                    ProtocolErrorCode.INVALID_FRAME,
                    f"RESULT for {frame.command_id} on the stream of {command_id}",
                )
            del self._command_on[stream_id]
            del self._stream_of[command_id]
            self._registry.listener.result_received(self, frame)
        elif isinstance(frame, ProgressFrame):
            if self._command_on.get(stream_id) == frame.command_id:
                self._registry.listener.progress_received(self, frame)
        else:
            raise ProtocolError(
                ProtocolErrorCode.UNEXPECTED_FRAME,
                f"unexpected {frame.type} frame on stream {stream_id}",
            )

    def _held_result_received(
        self, session: QuicSession, stream_id: int, frame: ResultFrame
    ) -> None:
        """A RESULT on a stream the agent opened: a result it held across a
        reconnect (or whose command stream was gone when it finished).

        The manager takes it if the command is still executing for this
        client; whatever it decides, ending our side of the stream tells the
        agent the result arrived, and it drops it from its outbox.
        """
        # If the command was re-sent on this connection too, its stream
        # here is done with: free the window slot (the agent's answer on
        # that stream, if it comes, is then ignored).
        self._give_up_stream(frame.command_id)
        logger.debug(
            "Held result received command_id=%s client_id=%s", frame.command_id, self.client_id
        )
        self._registry.listener.result_received(self, frame)
        session.end_stream(stream_id)

    def _hello_received(self, session: QuicSession, stream_id: int, frame: Frame) -> None:
        if not isinstance(frame, Hello) or not _is_client_bidi(stream_id):
            raise ProtocolError(
                ProtocolErrorCode.UNEXPECTED_FRAME, "the first frame must be HELLO"
            )
        if frame.version != PROTOCOL_VERSION:
            raise ProtocolError(
                ProtocolErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {frame.version} is not supported "
                f"(this server speaks {PROTOCOL_VERSION})",
            )
        if not frame.client_id or len(frame.client_id) > 256:
            raise ProtocolError(
                ProtocolErrorCode.INVALID_FRAME, "client_id must be 1 to 256 characters"
            )
        if not frame.client_id.isprintable():
            # It goes into log lines before the agent is authenticated: a
            # newline in it could forge a line (an "Audit ..." one, say).
            raise ProtocolError(
                ProtocolErrorCode.INVALID_FRAME, "client_id must not contain control characters"
            )
        if not all(key.isprintable() and value.isprintable() for key, value in frame.labels.items()):
            # Logged and shown by the API like the client_id.
            raise ProtocolError(
                ProtocolErrorCode.INVALID_FRAME, "labels must not contain control characters"
            )
        # Raises ProtocolError (UNAUTHORIZED / RATE_LIMITED / TOO_MANY_AGENTS):
        # the connection is closed before it is welcomed or registered. The
        # credential first (a stat and a hash): a flood of bad HELLOs must not
        # use up the HELLO budget of the real agents' reconnects.
        try:
            frame = self._registry.authenticate(self, frame)
            self._registry.admit(frame.client_id, self.remote_address)
        except ProtocolError:
            self.refused = True
            raise
        self.hello = frame
        self._control_stream = stream_id
        session.lift_buffer_limit()
        self.connected_at = time.time()
        self.session_id = f"{frame.client_id}@{self.connected_at:.6f}"
        session.send_frame(
            stream_id,
            Welcome(
                server_version=SERVER_VERSION,
                session_id=self.session_id,
                max_in_flight=self._registry.max_in_flight_per_agent,
            ),
        )
        self._registry.attach(self)

    def stream_reset(self, session: QuicSession, stream_id: int, error_code: int) -> None:
        if stream_id == self._control_stream:
            raise ProtocolError(
                ProtocolErrorCode.UNEXPECTED_FRAME, "the control stream was reset"
            )
        # The agent gave up on a command stream; the command keeps its
        # deadline (its result may still come after a reconnect), and its
        # window slot goes to the next queued command.
        command_id = self._command_on.pop(stream_id, None)
        if command_id is not None:
            self._stream_of.pop(command_id, None)
            if self.client_id is not None:
                self._registry.listener.slot_freed(self)

    def stream_stopped(self, session: QuicSession, stream_id: int, error_code: int) -> None:
        if stream_id == self._control_stream:
            raise ProtocolError(
                ProtocolErrorCode.UNEXPECTED_FRAME, "the control stream was stopped"
            )
        # A command stream: the COMMAND is all the server sends on it, and its
        # RESULT may still come on it, so the command stays where it is.

    def streams_available(self, session: QuicSession) -> None:
        if self.client_id is not None:
            self._registry.listener.slot_freed(self)

    def connection_lost(self, session: QuicSession, error_code: int, reason: str) -> None:
        self._registry.detach(self, error_code, reason)


class TokenBucket:
    """``rate`` tokens a second on trio's clock, holding at most ``burst``."""

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._updated: float | None = None

    def take(self) -> bool:
        """Take one token if there is one; False if the bucket is empty."""
        now = trio.current_time()
        if self._updated is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class AgentRegistry:
    """Connected agents by client_id. A new HELLO for a client_id replaces the old link.

    HELLOs are admitted at most ``max_hello_rate`` a second (bursts of up to
    one second's worth), and at most ``max_agents`` client_ids are connected
    at once; a HELLO beyond either is closed with RATE_LIMITED or
    TOO_MANY_AGENTS (a reconnect of a connected client_id, which replaces its
    old link, is not "one more agent"). The credential is checked first, and
    refused credentials count against a budget of their own (the same rate),
    so a flood of bad HELLOs does not starve real agents' reconnects.
    """

    def __init__(
        self,
        listener: LinkListener,
        *,
        max_in_flight_per_agent: int = 256,
        hello_timeout: float = 10.0,
        max_agents: int = 100_000,
        max_hello_rate: float = 200.0,
        authenticator: AgentAuthenticator | None = None,
    ):
        self.listener = listener
        #: None: every HELLO is taken at its word (an embedded server's choice).
        self.authenticator = authenticator
        self.max_in_flight_per_agent = max_in_flight_per_agent
        self.hello_timeout = hello_timeout
        self.max_agents = max_agents
        self.max_hello_rate = max_hello_rate
        self._hello_bucket = TokenBucket(max_hello_rate, max(1.0, max_hello_rate))
        #: Refused credentials have a budget of their own (the same rate): past
        #: it they are closed RATE_LIMITED and not logged one by one.
        self._failed_hello_bucket = TokenBucket(max_hello_rate, max(1.0, max_hello_rate))
        self._failed_hellos_unlogged = 0
        self._links: dict[str, AgentLink] = {}
        self._unidentified: dict[AgentLink, float] = {}

    def __len__(self) -> int:
        return len(self._links)

    def get(self, client_id: str) -> AgentLink | None:
        link = self._links.get(client_id)
        return link if link is not None and link.is_open else None

    def links(self) -> list[AgentLink]:
        return [link for link in self._links.values() if link.is_open]

    def new_link(self) -> AgentLink:
        """Handler factory for the QUIC endpoint: one link per new connection."""
        link = AgentLink(self, trio.current_time())
        self._unidentified[link] = link.accepted_at
        return link

    def admit(self, client_id: str, remote_address: str) -> None:
        """Check a HELLO against the rate and agent limits; raises ProtocolError."""
        if not self._hello_bucket.take():
            logger.warning(
                "HELLO refused client_id=%s remote=%s code=RATE_LIMITED max_hello_rate=%g",
                client_id, remote_address, self.max_hello_rate,
            )
            raise ProtocolError(
                ProtocolErrorCode.RATE_LIMITED,
                f"more than {self.max_hello_rate:g} HELLOs a second; reconnect later",
            )
        if client_id not in self._links and len(self._links) >= self.max_agents:
            logger.warning(
                "HELLO refused client_id=%s remote=%s code=TOO_MANY_AGENTS max_agents=%d",
                client_id, remote_address, self.max_agents,
            )
            raise ProtocolError(
                ProtocolErrorCode.TOO_MANY_AGENTS,
                f"the server already has {self.max_agents} connected agents",
            )

    def authenticate(self, link: AgentLink, hello: Hello) -> Hello:
        """Check ``hello``'s credential; returns it with the labels the server
        asserts and without the secret. Raises ProtocolError(UNAUTHORIZED)."""
        if self.authenticator is None:
            return hello
        try:
            identity = self.authenticator.authenticate(hello.client_id, hello.token)
        except AgentAuthFailed as exc:
            if not self._failed_hello_bucket.take():
                self._failed_hellos_unlogged += 1
                raise ProtocolError(
                    ProtocolErrorCode.RATE_LIMITED,
                    f"more than {self.max_hello_rate:g} refused HELLOs a second; reconnect later",
                ) from None
            logger.warning(
                "Agent rejected client_id=%s remote=%s reason=%r%s%s",
                hello.client_id, link.remote_address, exc.reason,
                f" {exc.detail}" if exc.detail else "",
                f" more_refused_unlogged={self._failed_hellos_unlogged}" if self._failed_hellos_unlogged else "",
            )
            self._failed_hellos_unlogged = 0
            raise ProtocolError(ProtocolErrorCode.UNAUTHORIZED, f"unauthorized: {exc.reason}") from None
        link.credential = identity.credential
        link.presented_hash = identity.presented_hash
        labels = hello.labels
        if identity.labels is not None:
            if dict(identity.labels) != hello.labels:
                # The token's labels are the server's word; the agent's own
                # claim is only logged, so a rogue agent cannot widen its scope.
                logger.info(
                    "Agent labels replaced by its token's client_id=%s claimed=%s bound=%s",
                    hello.client_id, _format_labels(hello.labels), _format_labels(identity.labels),
                )
            labels = dict(identity.labels)
        return attrs.evolve(hello, labels=labels, token=None)

    def labels_of(self, client_id: str) -> Mapping[str, str] | None:
        """The labels to judge ``client_id`` by: its connection's (the token's
        bound labels, else what it said in HELLO), else those bound to its
        token while it is offline; None if unknown."""
        link = self.get(client_id)
        if link is not None and link.hello is not None:
            return link.hello.labels
        if self.authenticator is not None:
            return self.authenticator.labels_of(client_id)
        return None

    async def watch_credentials(self, interval: float = 1.0) -> None:
        """Re-read the agent token file when it changes, and close connections
        whose credential no longer holds (UNAUTHORIZED). Runs until cancelled."""
        assert self.authenticator is not None
        # A HELLO may have reloaded the file since the last look: compare
        # generations rather than trust refresh() to report the change.
        seen = self.authenticator.generation
        while True:
            await trio.sleep(interval)
            self.authenticator.refresh()
            if self.authenticator.generation == seen:
                continue
            seen = self.authenticator.generation
            for link in self.links():
                assert link.client_id is not None
                try:
                    self.authenticator.check(link.client_id, link.presented_hash)
                except AgentAuthFailed as exc:
                    logger.warning(
                        "Agent rejected client_id=%s remote=%s reason=%r action=disconnect",
                        link.client_id, link.remote_address, "credential revoked: " + exc.reason,
                    )
                    link.close(ProtocolErrorCode.UNAUTHORIZED, "unauthorized: credential revoked")

    def attach(self, link: AgentLink) -> None:
        self._unidentified.pop(link, None)
        client_id = link.client_id
        assert client_id is not None
        old = self._links.get(client_id)
        if old is not None and old is not link:
            logger.warning(
                "Agent replaced client_id=%s old_remote=%s new_remote=%s",
                client_id, old.remote_address, link.remote_address,
            )
            old.close(ProtocolErrorCode.REPLACED, "replaced by a newer connection")
        self._links[client_id] = link
        logger.info(
            "Agent connected client_id=%s remote=%s labels=%s%s",
            client_id, link.remote_address, _format_labels(link.hello.labels),
            f" credential={link.credential}" if link.credential else "",
        )
        self.listener.agent_connected(link)

    def detach(self, link: AgentLink, error_code: int, reason: str) -> None:
        self._unidentified.pop(link, None)
        client_id = link.client_id
        if client_id is None:
            return
        if self._links.get(client_id) is link:
            del self._links[client_id]
        logger.info(
            "Agent disconnected client_id=%s remote=%s code=%s reason=%r",
            client_id, link.remote_address, error_code, reason,
        )
        self.listener.agent_disconnected(link)

    async def enforce_hello_timeout(self) -> None:
        """Close connections that have not said HELLO in time. Runs until cancelled."""
        while True:
            await trio.sleep(self.hello_timeout / 2)
            cutoff = trio.current_time() - self.hello_timeout
            for link, accepted_at in list(self._unidentified.items()):
                if accepted_at <= cutoff:
                    if link.session is None:
                        # Still in the handshake: close it the moment it
                        # completes (see handshake_completed).
                        link.hello_overdue = True
                        continue
                    del self._unidentified[link]
                    logger.warning("Closing connection that sent no HELLO remote=%s", link.remote_address)
                    link.close(ProtocolErrorCode.HELLO_TIMEOUT, "no HELLO received in time")
