"""Agent: dials the server, says HELLO, serves commands, reconnects when cut off."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import trio
from aioquic.quic.configuration import QuicConfiguration

from ..quic.connection import ConnectionFailed, QuicSession, SessionHandler, connect, wait_any
from ..wire import (
    ALPN,
    DEFAULT_MAX_FRAME_SIZE,
    CancelFrame,
    CommandFrame,
    Frame,
    Hello,
    ProtocolError,
    ProtocolErrorCode,
    Welcome,
)
from .executor import CommandExecutor, builtin_executor
from .handler import CommandHandler

logger = logging.getLogger("trio_quiccmd.agent")

AGENT_VERSION = "trio_quiccmd/0.1"


class AgentRejected(Exception):
    """The server refused this agent in a way retrying will not fix."""


class _AgentSession(SessionHandler):
    """The agent's side of one connection: WELCOME, COMMAND and CANCEL frames."""

    def __init__(self, agent: "Agent", nursery: trio.Nursery):
        self._agent = agent
        self._nursery = nursery
        self.welcome: Welcome | None = None
        self.welcomed = trio.Event()
        self.control_stream: int | None = None

    def frame_received(self, session: QuicSession, stream_id: int, frame: Frame) -> None:
        if stream_id == self.control_stream:
            if isinstance(frame, Welcome) and self.welcome is None:
                self.welcome = frame
                self.welcomed.set()
                return
        elif isinstance(frame, CommandFrame):
            self._nursery.start_soon(self._agent._execute, session, stream_id, frame)
            return
        elif isinstance(frame, CancelFrame):
            self._agent.handler.cancel(frame.command_id)
            return
        raise ProtocolError(
            ProtocolErrorCode.UNEXPECTED_FRAME, f"unexpected {frame.type} frame on stream {stream_id}"
        )


class Agent:
    """A connection to one server that runs the commands it is sent.

    ``executor`` does the work (default: the built-in ``echo``, ``sleep``,
    ``fail`` and ``sysinfo``). The server's certificate is always verified,
    against ``ca_file``/``ca_data`` (or the system's CAs if neither is given).
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
    ):
        if not client_id:
            raise ValueError("client_id must not be empty")
        self.client_id = client_id
        self.server = server
        self.labels = dict(labels or {})
        self.handler = CommandHandler(
            executor if executor is not None else builtin_executor(),
            max_result_bytes=max_frame_size - 1024,
        )
        self._ca_file = str(ca_file) if ca_file is not None else None
        self._ca_data = ca_data
        self._server_name = server_name or server[0]
        self._max_concurrent = max_concurrent_commands
        self._keepalive_interval = keepalive_interval
        self._idle_timeout = idle_timeout
        self._handshake_timeout = handshake_timeout
        self._reconnect_initial = reconnect_initial_delay
        self._reconnect_max = reconnect_max_delay
        self._max_frame_size = max_frame_size
        self._token = token
        self._session: QuicSession | None = None
        self._connected = trio.Event()
        #: How many sessions were established (1 after the first WELCOME).
        self.sessions_established = 0

    @property
    def connected(self) -> bool:
        return self._session is not None and not self._session.is_closing

    @property
    def session(self) -> QuicSession | None:
        return self._session

    async def wait_connected(self) -> None:
        """Return once the agent has a welcomed session. Cancellable, no side effects."""
        while not self.connected:
            await self._connected.wait()

    def _configuration(self) -> QuicConfiguration:
        configuration = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            server_name=self._server_name,
            idle_timeout=self._idle_timeout,
        )
        if self._ca_file is not None or self._ca_data is not None:
            configuration.load_verify_locations(cafile=self._ca_file, cadata=self._ca_data)
        return configuration

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected until cancelled, reconnecting with backoff and jitter.

        Reports ``started()`` once the first session is welcomed. Raises
        :class:`AgentRejected` if the server refuses this agent for good. When
        cancelled, running commands are cancelled and the connection is closed
        politely.
        """
        attempt = 0
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    await self._serve_one_session(nursery, task_status)
                    task_status = trio.TASK_STATUS_IGNORED
                    attempt = 0
                except ConnectionFailed as exc:
                    logger.warning(
                        "Connection to server failed server=%s:%s error=%s",
                        self.server[0], self.server[1], exc,
                    )
                attempt += 1
                ceiling = min(self._reconnect_max, self._reconnect_initial * 2 ** min(attempt - 1, 30))
                # "Full jitter": a fleet cut off together does not return together.
                delay = random.uniform(ceiling / 2, ceiling)
                logger.info("Reconnecting in %.2f s attempt=%d", delay, attempt)
                await trio.sleep(delay)

    async def _serve_one_session(self, nursery: trio.Nursery, task_status: Any) -> None:
        async with trio.open_nursery() as connection_nursery:
            link = _AgentSession(self, nursery)
            session = await connect(
                connection_nursery,
                self.server,
                self._configuration(),
                link,
                max_frame_size=self._max_frame_size,
                peer_bidi_streams=self._max_concurrent,
                keepalive_interval=self._keepalive_interval,
                handshake_timeout=self._handshake_timeout,
            )
            try:
                link.control_stream = session.open_stream(
                    Hello(
                        client_id=self.client_id,
                        labels=self.labels,
                        agent_version=AGENT_VERSION,
                        capabilities=["cancel"],
                        token=self._token,
                    )
                )
                with trio.move_on_after(self._handshake_timeout):
                    await _wait_any_event(link.welcomed, session.terminated)
                if link.welcome is None:
                    reason = session.close_reason or "no WELCOME from the server"
                    code = session.close_error_code
                    self._raise_if_fatal(code, reason)
                    raise ConnectionFailed(f"session refused: {reason}", code)
                self._session = session
                self.sessions_established += 1
                self._connected.set()
                logger.info(
                    "Connected to server server=%s:%s client_id=%s session_id=%s",
                    self.server[0], self.server[1], self.client_id, link.welcome.session_id,
                )
                task_status.started()
                await session.terminated.wait()
                logger.warning(
                    "Connection lost client_id=%s code=%s reason=%r",
                    self.client_id, session.close_error_code, session.close_reason,
                )
                self._raise_if_fatal(session.close_error_code, session.close_reason)
            finally:
                self._session = None
                self._connected = trio.Event()
                await session.aclose()

    @staticmethod
    def _raise_if_fatal(code: int | None, reason: str) -> None:
        if code == ProtocolErrorCode.UNSUPPORTED_VERSION:
            raise AgentRejected(f"the server refused this agent: {reason}")

    async def _execute(self, session: QuicSession, stream_id: int, command: CommandFrame) -> None:
        result = await self.handler.handle(command)
        # If the connection that carried the command is gone, the result has
        # nowhere to go (the server times the command out).
        session.send_frame(stream_id, result, end_stream=True)


async def _wait_any_event(*events: trio.Event) -> None:
    await wait_any(*(event.wait for event in events))
