"""QuicSession: one aioquic ``QuicConnection`` driven from trio.

aioquic's connection is sans-IO; this module is the I/O. The same class serves
the server (one session per agent, fed by :mod:`.endpoint`) and the agent (one
session, fed by :func:`open_client_session`).

The rules it keeps (see DESIGN.md, "Driving aioquic from trio"):

* Every change to the connection ends in a *wake* of the session's one
  long-lived timer task, which drains ``datagrams_to_send`` and re-arms from
  ``get_timer()``. Changes made in the same scheduler batch share one flush,
  so a burst of commands shares packets.
* The timer task sleeps in a ``CancelScope`` whose deadline is the next
  timer; it is never cancelled and restarted from inside itself. A wake
  reschedules it directly rather than cancelling its sleep: a cancellation
  raises and unwinds an exception, and wakes come several times per command.
* ``now`` is always ``trio.current_time()``, clamped to the timer's deadline
  when the timer fires, so tests can run on a virtual clock.
"""

from __future__ import annotations

import functools
import logging
import math
import socket
from collections import deque
from typing import Awaitable, Callable

import trio
from aioquic import tls
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection

from ..wire import (
    DEFAULT_MAX_FRAME_SIZE,
    Frame,
    FrameDecoder,
    ProtocolError,
    ProtocolErrorCode,
    encode_frame,
)
from .flow_control import FrameCredit, WindowedQuicConnection

logger = logging.getLogger("trio_quiccmd.quic")

#: Frames written before a session transmits at once instead of waiting for
#: the end of the scheduler batch. aioquic rescans every stream with unsent
#: data for each packet it builds, so one flush of n frames costs O(n^2):
#: coalescing pays up to about two packets' worth, then costs more than it saves.
FLUSH_BATCH_FRAMES = 16

#: Socket buffer size asked for; bursts of thousands of commands overflow the
#: kernel's small default and every dropped datagram costs a loss-recovery RTT.
SOCKET_BUFFER_BYTES = 4 << 20


def allow_peer_bidi_streams(quic: QuicConnection, count: int) -> None:
    """Let the peer open ``count`` bidirectional streams at once.

    aioquic advertises a fixed 128 and offers no setting; a server that opens
    more is not refused but silently *blocked*. Must be called before the
    transport parameters are sent (before ``connect`` on a client).
    """
    limit = quic._local_max_streams_bidi  # no public API for this (aioquic 1.x)
    limit.value = limit.sent = max(count, limit.used)


class DatagramSocket:
    """A non-blocking UDP socket used from trio without per-datagram yields.

    Receiving drains every queued datagram in one wake-up; sending tries the
    socket synchronously and only waits when the kernel buffer is full.
    """

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        for option, force in (
            (socket.SO_RCVBUF, getattr(socket, "SO_RCVBUFFORCE", None)),
            (socket.SO_SNDBUF, getattr(socket, "SO_SNDBUFFORCE", None)),
        ):
            try:
                # The *FORCE variants pass the sysctl cap when we may (root).
                sock.setsockopt(socket.SOL_SOCKET, force or option, SOCKET_BUFFER_BYTES)
            except OSError:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
                except OSError:
                    pass
        self.sock = sock
        self._writable: trio.Event | None = None

    @classmethod
    def bind(cls, host: str, port: int) -> "DatagramSocket":
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @property
    def local_address(self) -> tuple:
        return self.sock.getsockname()

    def try_send(self, data: bytes, addr: NetworkAddress) -> bool:
        """Send now; False if the kernel buffer is full (caller waits and retries)."""
        try:
            self.sock.sendto(data, addr)
        except BlockingIOError:
            return False
        except OSError as exc:
            # Unreachable peer, vanished route, no buffers: the packet counts
            # as lost and QUIC's recovery deals with it; it must not kill the loop.
            logger.debug("UDP send to %s failed: %s", addr, exc)
        return True

    async def wait_writable(self) -> None:
        """Wait until the socket can take a datagram again.

        Many sessions share the server's socket, and trio lets only one task
        wait on a socket at a time: the first waits, the others wait for it.
        """
        if self._writable is not None:
            await self._writable.wait()
            return
        self._writable = trio.Event()
        try:
            await trio.lowlevel.wait_writable(self.sock)
        finally:
            self._writable.set()
            self._writable = None

    async def receive_forever(
        self,
        on_datagram: Callable[[bytes, NetworkAddress], None],
        *,
        batch: int = 64,
        max_queued: int = 8192,
    ) -> None:
        """Call ``on_datagram`` for every datagram until cancelled.

        The kernel's queue is emptied into our own before each batch is
        handled: a burst (thousands of agents answering at once) then waits in
        process memory instead of overflowing the socket buffer, where every
        drop costs the sender a loss-recovery timeout and a retransmission.
        Batches are small so that sessions get to acknowledge what arrived.
        """
        sock = self.sock
        queue: deque[tuple[bytes, NetworkAddress]] = deque()
        receive = sock.recvfrom
        while True:
            if not queue:
                await trio.lowlevel.wait_readable(sock)
            while len(queue) < max_queued:
                try:
                    queue.append(receive(65536))
                except BlockingIOError:
                    break
                except ConnectionRefusedError:
                    continue  # ICMP from an earlier send; nothing to do with it
            for _ in range(min(batch, len(queue))):
                data, addr = queue.popleft()
                on_datagram(data, addr)
            if queue:
                await trio.lowlevel.checkpoint()  # let the sessions flush

    def close(self) -> None:
        self.sock.close()


class SessionHandler:
    """What a session tells the protocol layer above it. All calls are synchronous.

    A handler may raise :class:`ProtocolError` from ``frame_received`` or
    ``stream_ended``; the session then closes the connection with that code.
    """

    def handshake_completed(self, session: "QuicSession") -> None:
        pass

    def frame_received(self, session: "QuicSession", stream_id: int, frame: Frame) -> None:
        pass

    def stream_ended(self, session: "QuicSession", stream_id: int) -> None:
        pass

    def stream_reset(self, session: "QuicSession", stream_id: int, error_code: int) -> None:
        pass

    def stream_stopped(self, session: "QuicSession", stream_id: int, error_code: int) -> None:
        """The peer will not read what we send on the stream (STOP_SENDING;
        our side is reset). What it sends on it still arrives. By default,
        as a reset."""
        self.stream_reset(session, stream_id, error_code)

    def streams_available(self, session: "QuicSession") -> None:
        """The peer raised its stream limit after :attr:`QuicSession.can_open_stream` was False."""

    def connection_lost(self, session: "QuicSession", error_code: int, reason: str) -> None:
        pass


class QuicSession:
    """One QUIC connection, its streams' frame decoders, and its timer task."""

    def __init__(
        self,
        quic: QuicConnection,
        transport: DatagramSocket,
        handler: SessionHandler,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_buffered_bytes: int | None = None,
        keepalive_interval: float | None = None,
        on_connection_id_issued: Callable[[bytes], None] | None = None,
        on_connection_id_retired: Callable[[bytes], None] | None = None,
        on_handshake_completed: Callable[[], None] | None = None,
    ):
        self.quic = quic
        self.handler = handler
        self._transport = transport
        self._max_frame_size = max_frame_size
        self._decoders: dict[int, FrameDecoder] = {}
        # Most bytes of unfinished frames held across all streams (None: no
        # limit); more is a BUFFER_EXCEEDED protocol error. See lift_buffer_limit.
        self._max_buffered = max_buffered_bytes
        self._buffered = 0
        # Streams' credit by the frames they carry (a WindowedQuicConnection's;
        # a plain QuicConnection keeps aioquic's own flow control).
        self._credit = (
            FrameCredit.for_frame_limit(max_frame_size)
            if isinstance(quic, WindowedQuicConnection)
            else None
        )
        self._keepalive_interval = keepalive_interval
        self._ping_at = (
            trio.current_time() + keepalive_interval if keepalive_interval else math.inf
        )
        self._ping_uid = 0
        # When a keepalive PING went out with nothing heard from the peer
        # since (math.inf: something was heard after the last one).
        self._unanswered_since = math.inf
        self._on_cid_issued = on_connection_id_issued
        self._on_cid_retired = on_connection_id_retired
        self._on_handshake_completed = on_handshake_completed
        self._timer_task: trio.lowlevel.Task | None = None
        # The timer task is blocked in its sleep (wait_task_rescheduled in
        # run) and may be rescheduled by a wake; cleared by that wake, or by
        # _abort_park when the sleep's deadline or a cancellation comes first.
        self._parked = False
        self._wake_pending = True
        self._quic_timer_at: float | None = None
        self._unflushed_frames = 0
        # Stream data was queued since the last transmission (see _datagrams_to_send).
        self._data_queued = False
        self._waiting_for_streams = False
        # Datagrams the kernel had no room for; sent by the timer task first.
        self._backlog: list[tuple[bytes, NetworkAddress]] = []
        self._lost_notified = False
        # Set (and dropped) at the next datagram or loss: see wait_acknowledged.
        self._heard_from_peer: trio.Event | None = None
        #: Set once the handshake completed.
        self.handshake_done = trio.Event()
        #: Set once the connection is over (closed by either side, or idle).
        self.terminated = trio.Event()
        self.close_error_code: int | None = None
        self.close_reason = ""

    # -- state ---------------------------------------------------------------

    @property
    def peer_address(self) -> NetworkAddress | None:
        return self.quic.get_peer_address()

    @property
    def is_closing(self) -> bool:
        return self._lost_notified

    @property
    def can_open_stream(self) -> bool:
        """Whether the peer allows one more bidirectional stream from us now.

        Beyond the peer's limit aioquic does not refuse a stream, it blocks it
        silently; callers must not open one. If this is False, the handler
        hears ``streams_available`` once the peer raises its limit.
        """
        quic = self.quic
        if quic._local_next_stream_id_bidi // 4 < quic._remote_max_streams_bidi:
            return True
        self._waiting_for_streams = True
        return False

    def lift_buffer_limit(self) -> None:
        """Close the connection over unfinished frames no more: for a server,
        once it knows who the peer is (its sessions start with room for one,
        the HELLO). From then on only the streams' credit (FrameCredit)
        bounds them, which makes a peer wait rather than closes it: aioquic
        sends the streams it has data for in turns, a packet each, so every
        frame queued at once is unfinished at the receiver at once, and a
        peer closed over that would send them all again after reconnecting."""
        self._max_buffered = None

    # -- input ---------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        if self.terminated.is_set():
            return
        quic = self.quic
        idle_deadline = quic._close_at
        try:
            quic.receive_datagram(data, addr, trio.current_time())
        except Exception as exc:
            # aioquic raises out of its packet handling only for what it did
            # not foresee (a CA file it cannot load, met mid-handshake): this
            # connection ends, the endpoint and its other connections do not.
            self._failed(exc)
            return
        if quic._close_at != idle_deadline:
            # aioquic restarted its idle timer: it accepted a packet. One that
            # fails to decrypt (anyone can send those) says nothing of the peer.
            self._unanswered_since = math.inf
        self._process_events()
        close = self.quic._close_event
        if close is not None and not self._lost_notified:
            # The peer closed: aioquic only reports it after the draining
            # period, but nothing more can be sent on this connection now.
            self._notify_lost(close.error_code, close.reason_phrase)
        elif self._waiting_for_streams and self.can_open_stream:
            self._waiting_for_streams = False
            try:
                self.handler.streams_available(self)
            except Exception as exc:
                self._failed(exc)
        self._wake_acknowledgement_wait()
        self._wake()

    # -- output (each ends in a wake; the timer task flushes) ------------------

    def send_frame(self, stream_id: int, frame: Frame, *, end_stream: bool = False) -> bool:
        """Queue ``frame`` on the stream; False if the stream or connection can take no more.

        A stream the peer reset or stopped (STOP_SENDING) refuses data: that is
        the peer's choice, reported here rather than raised.
        """
        if not self._send(stream_id, encode_frame(frame), end_stream):
            return False
        self._unflushed_frames += 1
        if self._unflushed_frames >= FLUSH_BATCH_FRAMES:
            self._transmit_now()
        return True

    def end_stream(self, stream_id: int) -> bool:
        """End our side of the stream (FIN, no data); False if it cannot be ended now."""
        return self._send(stream_id, b"", True)

    def _send(self, stream_id: int, data: bytes, end_stream: bool) -> bool:
        if self._lost_notified:
            return False
        try:
            self.quic.send_stream_data(stream_id, data, end_stream)
        except (RuntimeError, ValueError) as exc:  # aioquic: reset, already ended, or not ours
            logger.debug("Nothing sent stream=%d: %s", stream_id, exc)
            return False
        self._data_queued = True
        self._wake()
        return True

    def open_stream(self, frame: Frame, *, end_stream: bool = False) -> int:
        """Open a bidirectional stream and send ``frame`` on it; returns its id.

        Allocation and first send happen together: aioquic does not reserve an
        id until data is sent on it.
        """
        stream_id = self.quic.get_next_available_stream_id()
        self.send_frame(stream_id, frame, end_stream=end_stream)
        return stream_id

    async def wait_acknowledged(self) -> None:
        """Return once the peer has acknowledged everything written on this
        connection so far, or the connection is over. For a polite close:
        once closing, aioquic sends nothing but the CONNECTION_CLOSE, so a
        frame written just before (a CANCEL) would otherwise never arrive.

        If cancelled, only the wait ends.
        """
        while not (self._lost_notified or self._all_acknowledged()):
            self._heard_from_peer = heard = trio.Event()
            await heard.wait()

    def _wake_acknowledgement_wait(self) -> None:
        """Let :meth:`wait_acknowledged` look again (the peer said something,
        or the connection is over)."""
        if self._heard_from_peer is not None:
            self._heard_from_peer.set()
            self._heard_from_peer = None

    def _all_acknowledged(self) -> bool:
        # From the stream senders' acknowledged ranges, which aioquic updates
        # as ACKs arrive (its buffer_is_empty only at the next packet built);
        # they have no public accessor.
        for stream in self.quic._streams.values():
            sender = stream.sender
            if sender.is_finished:
                continue  # its FIN or RESET_STREAM acknowledged
            if sender._reset_error_code is not None or sender._buffer_fin is not None:
                return False  # its RESET_STREAM or FIN not acknowledged yet
            if sender._buffer_start != sender._buffer_stop:
                return False  # written data not acknowledged yet
        return True

    def discard_stream_input(self, stream_id: int) -> None:
        """Take nothing more from ``stream_id``: what arrived of it and what
        arrives later is dropped, and no frame from it reaches the handler.
        For a stream whose answer is no longer wanted, so that a peer that
        never finishes it holds nothing here (see
        :meth:`WindowedQuicConnection.discard_stream_input`)."""
        quic = self.quic
        assert isinstance(quic, WindowedQuicConnection)
        quic.discard_stream_input(stream_id)
        self._drop_decoder(stream_id)
        self._wake()  # the credit given back may be due to the peer now

    def close(self, error_code: int = ProtocolErrorCode.NO_ERROR, reason: str = "") -> None:
        """Close the connection; the handler hears ``connection_lost`` at once.

        aioquic only reports termination after the closing period, so the
        handler is told now and pending work is failed without waiting.
        """
        if self.terminated.is_set():
            return
        self.quic.close(error_code=int(error_code), reason_phrase=reason)
        self._notify_lost(int(error_code), reason)
        self._wake()

    def _wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            if self._parked:
                self._parked = False
                assert self._timer_task is not None
                trio.lowlevel.reschedule(self._timer_task)

    # -- the timer task ------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive timers, keepalives and transmission until the connection ends.

        If cancelled, the connection ends at once: its CONNECTION_CLOSE (the
        one :meth:`close` queued, or a NO_ERROR one) is sent without waiting,
        best effort, so that the peer does not wait out its idle timeout. To
        be sure it was received, call :meth:`aclose` instead.
        """
        self._timer_task = trio.lowlevel.current_task()
        task_status.started()
        try:
            while not self.terminated.is_set():
                if self._wake_pending:
                    # Woken while busy: let the rest of this scheduler batch
                    # add its changes first, so that they share the flush.
                    await trio.lowlevel.checkpoint()
                else:
                    with trio.CancelScope(deadline=self._next_deadline()):
                        # No await between these two lines: a wake that saw
                        # _parked must find the task blocked.
                        self._parked = True
                        await trio.lowlevel.wait_task_rescheduled(self._abort_park)
                self._wake_pending = False
                now = trio.current_time()
                timer_at = self._quic_timer_at
                if timer_at is not None and now >= timer_at:
                    # Read when last flushed: a datagram since (an ACK) may
                    # have moved it, and aioquic acts on the current one.
                    timer_at = self._quic_timer_at = self.quic.get_timer()
                if timer_at is not None and now >= timer_at:
                    self.quic.handle_timer(max(now, timer_at))
                    self._process_events()
                if now >= self._unanswered_since + self._liveness_timeout and not self._lost_notified:
                    self._peer_silent()
                if now >= self._ping_at and not self._lost_notified:
                    self._ping_uid += 1
                    self.quic.send_ping(self._ping_uid)
                    self._ping_at = now + self._keepalive_interval
                    self._unanswered_since = min(self._unanswered_since, now)
                await self._flush()
        finally:
            self._timer_task = None
            if not self.terminated.is_set():
                self._send_close_now()
                self._notify_lost(ProtocolErrorCode.NO_ERROR, "session task stopped")
                self.terminated.set()

    def _send_close_now(self) -> None:
        # A second Ctrl-C, or a caller cancelling the agent: without this the
        # server kept the agent, and sent it commands, until its idle timeout.
        quic = self.quic
        quic.close(error_code=ProtocolErrorCode.NO_ERROR, reason_phrase="session task stopped")
        for data, addr in quic.datagrams_to_send(trio.current_time()):
            self._transport.try_send(data, addr)

    def _abort_park(self, raise_cancel: object) -> trio.lowlevel.Abort:
        # The timer is due (the scope's deadline) or the task is cancelled:
        # from here on a wake must not reschedule the task.
        self._parked = False
        return trio.lowlevel.Abort.SUCCEEDED

    async def drive_with(self, transport: DatagramSocket) -> None:
        """Run :meth:`run` and feed it from ``transport`` (a client's own socket).

        Returns when the connection terminates; closes ``transport`` either way.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transport.receive_forever, self.datagram_received)
                await self.run()
                nursery.cancel_scope.cancel()
        finally:
            transport.close()

    async def aclose(
        self, error_code: int = ProtocolErrorCode.NO_ERROR, reason: str = "", *, grace: float = 1.0
    ) -> None:
        """Close and wait (at most ``grace`` seconds, shielded) until the close is sent.

        Safe to call when cancelled: the wait is shielded, so the peer still
        hears the CONNECTION_CLOSE.
        """
        self.close(error_code, reason)
        with trio.move_on_after(grace, shield=True):
            await self.terminated.wait()

    def _next_deadline(self) -> float:
        timer_at = self._quic_timer_at
        return min(
            self._ping_at,
            self._unanswered_since + self._liveness_timeout,
            math.inf if timer_at is None else timer_at,
        )

    @property
    def _liveness_timeout(self) -> float:
        # Several probe timeouts even on a slow link, and never less than 2 s.
        return max(LIVENESS_MIN_TIMEOUT, (self._keepalive_interval or 0.0) / 2)

    def _peer_silent(self) -> None:
        """Nothing came back from a keepalive PING in time: the peer is gone
        (a server that crashed, or was restarted, answers nothing on this
        connection; aioquic has no stateless reset to say so). Give up now
        rather than at the idle timeout, so the agent reconnects sooner."""
        reason = f"no answer to keepalives for {self._liveness_timeout:g} s"
        logger.info("Peer not answering peer=%s reason=%r", self.peer_address, reason)
        self._notify_lost(ProtocolErrorCode.NO_ERROR, reason)
        self.quic.close(error_code=ProtocolErrorCode.NO_ERROR, reason_phrase=reason)

    def _transmit_now(self) -> None:
        """Send what is ready without waiting (synchronous; see FLUSH_BATCH_FRAMES)."""
        self._unflushed_frames = 0
        if self._backlog:
            return  # the socket is full; the timer task is waiting to send
        datagrams = self._datagrams_to_send(trio.current_time())
        for index, (data, addr) in enumerate(datagrams):
            if not self._transport.try_send(data, addr):
                self._backlog = datagrams[index:]
                break

    async def _flush(self) -> None:
        transport = self._transport
        while self._backlog:
            data, addr = self._backlog[0]
            if transport.try_send(data, addr):
                del self._backlog[0]
            else:
                await transport.wait_writable()
        self._unflushed_frames = 0
        for data, addr in self._datagrams_to_send(trio.current_time()):
            while not transport.try_send(data, addr):
                await transport.wait_writable()
        self._quic_timer_at = self.quic.get_timer()

    def _datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        """What aioquic has to send now, the pending ACK riding with any stream data.

        aioquic writes an ACK only once its delay (1 ms) has passed, even into
        a packet that leaves anyway, and then sends it in a packet of its own.
        An answer sent within the millisecond (an agent's RESULT, the server's
        next COMMAND) would each cost the peer an extra packet to receive,
        decrypt and process, and this side a timer wake-up to send it. So when
        stream data was queued and a packet may leave now (room in the
        congestion window, no pacing delay), the ACK is made due now. If it is
        not written after all (held back by something else), its delay is
        restored: an ACK due now but unsent would make the timer fire at once,
        again and again. With no stream data queued the delay is kept, so
        that ACKs still gather. The packet space and the recovery state are
        private: aioquic has no setting for this.
        """
        quic = self.quic
        space = quic._spaces.get(tls.Epoch.ONE_RTT) if self._data_queued else None
        self._data_queued = False
        delayed_until = None
        if space is not None and space.ack_at is not None and space.ack_at > now:
            recovery = quic._loss
            if (
                recovery.bytes_in_flight + quic._max_datagram_size <= recovery.congestion_window
                and recovery._pacer.next_send_time(now) is None
            ):
                delayed_until, space.ack_at = space.ack_at, now
        datagrams = quic.datagrams_to_send(now)
        if delayed_until is not None and space.ack_at == now:
            space.ack_at = delayed_until
        return datagrams

    # -- events --------------------------------------------------------------

    def _process_events(self) -> None:
        quic = self.quic
        # self.handler is read at each use: a dialling client's handler is
        # replaced as its handshake completes (see connect).
        while (event := quic.next_event()) is not None:
            try:
                if isinstance(event, events.StreamDataReceived):
                    self._stream_data(event)
                elif isinstance(event, events.StopSendingReceived):
                    # The peer will not read this stream any more: end our
                    # side (RFC 9000, 3.5) and treat it like a reset.
                    # Our direction only: what the peer sent on it is still
                    # read (a decoder dropped mid-frame would misread the rest).
                    try:
                        self.quic.reset_stream(event.stream_id, event.error_code)
                    except (RuntimeError, ValueError):
                        pass  # already finished or reset
                    self.handler.stream_stopped(self, event.stream_id, event.error_code)
                elif isinstance(event, events.StreamReset):
                    self._drop_decoder(event.stream_id)
                    self.handler.stream_reset(self, event.stream_id, event.error_code)
                elif isinstance(event, events.HandshakeCompleted):
                    self._fit_keepalive_to_idle_timeout()
                    self.handshake_done.set()
                    if self._on_handshake_completed is not None:
                        self._on_handshake_completed()
                    self.handler.handshake_completed(self)
                elif isinstance(event, events.ConnectionIdIssued):
                    if self._on_cid_issued is not None:
                        self._on_cid_issued(event.connection_id)
                elif isinstance(event, events.ConnectionIdRetired):
                    if self._on_cid_retired is not None:
                        self._on_cid_retired(event.connection_id)
                elif isinstance(event, events.ConnectionTerminated):
                    self._notify_lost(event.error_code, event.reason_phrase)
                    self.terminated.set()
            except Exception as exc:
                self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """Close the connection over ``exc``, raised while handling its input:
        a peer that broke the protocol, or a bug or unforeseen input in this
        connection's handling, which must not take down the endpoint and every
        other connection."""
        if isinstance(exc, ProtocolError):
            logger.warning(
                "Closing connection peer=%s code=%s error=%s",
                self.peer_address, exc.code.name, exc.message,
            )
            self.close(exc.code, exc.message)
        else:
            logger.error(
                "Closing connection after an internal error peer=%s", self.peer_address, exc_info=exc
            )
            self.close(ProtocolErrorCode.INTERNAL_ERROR, "internal error")

    def _fit_keepalive_to_idle_timeout(self) -> None:
        # The peer's idle timeout is only known now (transport parameters); a
        # server configured below our keepalive interval would otherwise drop
        # every quiet connection. aioquic exposes the negotiated value only
        # through this private helper.
        if self._keepalive_interval is None:
            return
        idle_timeout = self.quic._idle_timeout()
        self._keepalive_interval = min(self._keepalive_interval, idle_timeout / 3)
        self._ping_at = trio.current_time() + self._keepalive_interval

    def _stream_data(self, event: events.StreamDataReceived) -> None:
        stream_id = event.stream_id
        decoder = self._decoders.get(stream_id)
        if decoder is None:
            if self._lost_notified:
                return
            decoder = self._decoders[stream_id] = FrameDecoder(self._max_frame_size)
        if event.data:
            held = decoder.buffered
            frames = decoder.feed(event.data)
            self._buffered += decoder.buffered - held
            if self._max_buffered is not None and self._buffered > self._max_buffered:
                raise ProtocolError(
                    ProtocolErrorCode.BUFFER_EXCEEDED,
                    f"{self._buffered} bytes of unfinished frames held; at most "
                    f"{self._max_buffered} allowed",
                )
            if self._credit is not None:
                self._grant(self._credit.update(stream_id, decoder.consumed, decoder.pending_frame_size))
            for frame in frames:
                self.handler.frame_received(self, stream_id, frame)
        if event.end_stream:
            self._drop_decoder(stream_id)
            if decoder.has_partial_frame:
                raise ProtocolError(
                    ProtocolErrorCode.INVALID_FRAME, "stream ended inside a frame"
                )
            self.handler.stream_ended(self, stream_id)

    def _drop_decoder(self, stream_id: int) -> None:
        decoder = self._decoders.pop(stream_id, None)
        if decoder is not None:
            self._buffered -= decoder.buffered
        if self._credit is not None:
            self._grant(self._credit.forget(stream_id))

    def _grant(self, grants: list[tuple[int, int]]) -> None:
        quic = self.quic
        assert isinstance(quic, WindowedQuicConnection)
        for stream_id, offset in grants:
            quic.grant_stream_credit(stream_id, offset)

    def _notify_lost(self, error_code: int, reason: str) -> None:
        if self._lost_notified:
            return
        self._lost_notified = True
        self._wake_acknowledgement_wait()
        self._ping_at = math.inf
        self._unanswered_since = math.inf
        self.close_error_code = error_code
        self.close_reason = reason
        self._decoders.clear()
        self._buffered = 0
        try:
            self.handler.connection_lost(self, error_code, reason)
        except Exception:
            # The connection is over either way; the caller (a datagram, a
            # timer, the task's end) must go on for every other connection.
            logger.exception("Error in handling a lost connection peer=%s", self.peer_address)


#: Least time a keepalive PING may go unanswered before the peer counts as gone.
LIVENESS_MIN_TIMEOUT = 2.0


class ConnectionFailed(Exception):
    """The client could not establish a session (handshake failed or timed out)."""

    def __init__(self, message: str, error_code: int | None = None):
        super().__init__(message)
        self.error_code = error_code


async def wait_any(*waitables: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as one of the ``waitables`` (e.g. ``event.wait``) returns."""
    async with trio.open_nursery() as nursery:
        for wait in waitables:
            async def first(wait: Callable[[], Awaitable[object]] = wait) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(first)


#: How long a dial waits for the handshake with one of a name's addresses
#: before it also dials the next (RFC 8305's "Connection Attempt Delay"):
#: an address that takes datagrams but never answers (``localhost`` as
#: ``::1``, with the server on IPv4 only) then costs a quarter of a second,
#: not a handshake timeout.
NEXT_ADDRESS_DELAY = 0.25


def dial_order(
    targets: list[tuple[int, NetworkAddress]], prefer: NetworkAddress | None
) -> list[tuple[int, NetworkAddress]]:
    """The order to dial a name's addresses in: the resolver's, with
    ``prefer`` (the address a dial last reached) first if it is among them."""
    return sorted(targets, key=lambda target: target[1] != prefer)


def format_address(sockaddr: NetworkAddress) -> str:
    """``host:port``, or ``[host]:port`` for IPv6, as the logs and the API show addresses."""
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Race:
    """The dials of one :func:`connect`: which session won, and why the others failed."""

    def __init__(self) -> None:
        self.winner: QuicSession | None = None
        self.won = trio.Event()
        self.failures: list[tuple[NetworkAddress, str, int | None]] = []


class _Dial(SessionHandler):
    """The handler of one dial while it races the others. The first whose
    handshake completes wins: its session gets the caller's handler there
    and then (so the caller hears of the handshake as it happens, before any
    stream data). A loser's events go nowhere; it is closed."""

    def __init__(self, race: _Race, handler: SessionHandler):
        self._race = race
        self._handler = handler

    def handshake_completed(self, session: "QuicSession") -> None:
        race = self._race
        if race.winner is not None:
            return
        race.winner = session
        race.won.set()
        session.handler = self._handler
        self._handler.handshake_completed(session)


async def connect(
    nursery: trio.Nursery,
    address: tuple[str, int],
    configuration: QuicConfiguration,
    handler: SessionHandler,
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    peer_bidi_streams: int = 128,
    keepalive_interval: float | None = None,
    handshake_timeout: float = 10.0,
    prefer: NetworkAddress | None = None,
) -> QuicSession:
    """Dial ``address`` and return the session once the handshake is done.

    The session's socket and timer run as one task in ``nursery``; they end when
    the connection terminates (see :meth:`QuicSession.aclose`). Raises
    :class:`ConnectionFailed` if the name does not resolve, or no handshake
    succeeds within ``handshake_timeout``. If cancelled while connecting,
    every half-open connection is abandoned and its socket closed.

    A name with several addresses is dialled as RFC 8305 does: one address
    at a time, the next one :data:`NEXT_ADDRESS_DELAY` later (or at once if
    the one before failed), the first handshake to complete winning and the
    other dials closed. ``prefer`` (the session's :attr:`~QuicSession.peer_address`
    from an earlier dial) is dialled first.
    """
    host, port = address
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:  # UnicodeError: not a valid DNS name
        raise ConnectionFailed(f"cannot resolve {host}: {exc}") from None
    targets = dial_order(list(dict.fromkeys((info[0], info[4]) for info in infos)), prefer)
    race = _Race()
    dial = functools.partial(
        _dial,
        nursery,
        race,
        configuration,
        _Dial(race, handler),
        max_frame_size=max_frame_size,
        peer_bidi_streams=peer_bidi_streams,
        keepalive_interval=keepalive_interval,
        handshake_timeout=handshake_timeout,
    )
    async with trio.open_nursery() as dials:
        for family, sockaddr in targets:
            failed = trio.Event()
            dials.start_soon(dial, family, sockaddr, failed)
            with trio.move_on_after(NEXT_ADDRESS_DELAY):
                await wait_any(failed.wait, race.won.wait)
            if race.won.is_set():
                break
    session = race.winner
    if session is None or not session.handshake_done.is_set() or session.terminated.is_set():
        if session is not None:
            race.failures.append((session.peer_address, session.close_reason or "closed", session.close_error_code))
        reason = "; ".join(
            f"{format_address(sockaddr)}: {why}" if len(targets) > 1 else why
            for sockaddr, why, _code in race.failures
        )
        code = next((code for _sockaddr, _why, code in race.failures if code is not None), None)
        raise ConnectionFailed(f"QUIC handshake with {host}:{port} failed: {reason}", code)
    return session


async def _dial(
    nursery: trio.Nursery,
    race: _Race,
    configuration: QuicConfiguration,
    handler: _Dial,
    family: int,
    sockaddr: NetworkAddress,
    failed: trio.Event,
    *,
    max_frame_size: int,
    peer_bidi_streams: int,
    keepalive_interval: float | None,
    handshake_timeout: float,
) -> None:
    """One of :func:`connect`'s dials: the winner's session is left running
    in ``nursery``; any other is closed, its failure noted in ``race``."""
    try:
        transport = DatagramSocket.bind("::" if family == socket.AF_INET6 else "0.0.0.0", 0)
    except OSError as exc:
        race.failures.append((sockaddr, f"cannot open a UDP socket: {exc}", None))
        failed.set()
        return
    quic = WindowedQuicConnection(configuration=configuration)
    allow_peer_bidi_streams(quic, peer_bidi_streams)
    session = QuicSession(
        quic,
        transport,
        handler,
        max_frame_size=max_frame_size,
        keepalive_interval=keepalive_interval,
    )
    drive_scope = trio.CancelScope()

    async def drive() -> None:
        with drive_scope:
            await session.drive_with(transport)

    quic.connect(sockaddr, now=trio.current_time())
    nursery.start_soon(drive)
    try:
        with trio.move_on_after(handshake_timeout):
            await wait_any(session.handshake_done.wait, session.terminated.wait, race.won.wait)
    except BaseException:
        drive_scope.cancel()
        raise
    if race.winner is session:
        return
    drive_scope.cancel()
    if not race.won.is_set():
        race.failures.append(
            (sockaddr, session.close_reason or "no answer (handshake timed out)", session.close_error_code)
        )
        failed.set()
