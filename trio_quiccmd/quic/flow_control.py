"""Receive windows that follow what the application took, not what a peer claims.

aioquic doubles a stream's MAX_STREAM_DATA as soon as the highest offset the
peer has *named* passes half of it, and the connection's MAX_DATA as soon as
those offsets summed do; data beyond a gap is buffered with the gap filled
in. A peer that sends one byte just below each limit thus makes the
receiver's buffer double on every round trip while it sends almost nothing
(aiortc/aioquic#589, closed unfixed): a few dozen packets, before any HELLO,
take a server to gigabytes.

:class:`WindowedQuicConnection` grants credit the usual way instead: the
connection, a window beyond the data already handed to the application,
renewed once half of it is used; each stream, what its reader grants
(:meth:`WindowedQuicConnection.grant_stream_credit`), starting from
:data:`STREAM_WINDOW`. What one connection can make its receiver buffer is
then bounded by its windows and its reader's grants, whatever the peer sends.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    CONNECTION_LIMIT_FRAME_CAPACITY,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
)
from aioquic.quic.packet import QuicFrameType
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.rangeset import RangeSet
from aioquic.quic.stream import QuicStream

from ..wire import FRAME_HEADER_SIZE


#: Each stream's credit before its reader grants more: what a peer can make
#: the receiver hold on a stream without the reader's consent.
STREAM_WINDOW = 64 * 1024
#: Frames larger than a stream's window that a session lets in at once,
#: counted at the largest frame size (see FrameCredit.for_frame_limit).
LARGE_FRAMES_AT_ONCE = 16


class WindowedQuicConnection(QuicConnection):
    """A ``QuicConnection`` whose connection receive window is
    ``configuration.max_data`` beyond what :meth:`next_event` has handed
    out, whose streams get the credit their reader grants
    (:meth:`grant_stream_credit`; :data:`STREAM_WINDOW` to begin with), and
    which lets the peer open no unidirectional streams (the protocol has
    none: opening one is a STREAM_LIMIT_ERROR, which aioquic answers by
    closing the connection).

    The overridden methods replace aioquic's private ones of the same name
    (aioquic 1.x; there is no public hook for flow control): a test checks
    that aioquic still has and calls them.
    """

    def __init__(self, *, configuration: QuicConfiguration, **kwargs: Any):
        super().__init__(configuration=configuration, **kwargs)
        self._data_window = configuration.max_data
        self._local_max_stream_data_bidi_local = STREAM_WINDOW
        self._local_max_stream_data_bidi_remote = STREAM_WINDOW
        # Bytes of stream data the peer has used credit for that are handed
        # to the application, or never will be (on streams it reset).
        self._delivered = 0
        # Streams whose input is dropped as it comes (discard_stream_input),
        # until the peer finishes them.
        self._discarding: set[int] = set()
        uni = self._local_max_streams_uni
        uni.value = uni.sent = 0

    def grant_stream_credit(self, stream_id: int, offset: int) -> None:
        """Let the peer send on ``stream_id`` up to ``offset`` (never less
        than already granted); sent with the next packet."""
        stream = self._streams.get(stream_id)
        if stream is not None and offset > stream.max_stream_data_local:
            stream.max_stream_data_local = offset

    def next_event(self) -> events.QuicEvent | None:
        event = super().next_event()
        if isinstance(event, events.StreamDataReceived):
            self._delivered += len(event.data)
        return event

    def discard_stream_input(self, stream_id: int) -> None:
        """Read nothing more of ``stream_id``: what it holds is dropped (its
        events not yet handed out too), what arrives on it later is dropped
        as it arrives, no more credit is granted on it, and its credit on the
        connection is given back. For a stream whose answer nobody waits for
        any more: a peer that never finishes it makes the receiver hold
        nothing for it.

        No STOP_SENDING: the peer may finish the stream as it meant to (an
        agent's answer to a command given up on), and that costs nothing here.
        The stream stays open until then, so that what comes on it is still
        checked and counted against the connection's credit (aioquic ignores
        frames of a stream it has forgotten, uncounted).
        """
        # Its events not handed out yet go first, even if the stream is
        # finished (its FIN came in the same datagram) or already forgotten:
        # one reaching the reader now would be read from the middle of a frame.
        kept = deque()
        for event in self._events:
            if isinstance(event, events.StreamDataReceived) and event.stream_id == stream_id:
                self._delivered += len(event.data)
            else:
                kept.append(event)
        self._events = kept
        stream = self._streams.get(stream_id)
        if stream is None or stream.receiver.is_finished or stream_id in self._discarding:
            return
        self._discarding.add(stream_id)
        receiver = stream.receiver
        self._delivered += receiver.highest_offset - receiver.starting_offset()
        self._forget_received(stream)

    def _forget_received(self, stream: QuicStream) -> None:
        """Drop what the stream holds (aioquic's receiver cannot be told to
        stop buffering; the caller has counted it as read), and keep its
        window a STREAM_WINDOW ahead of what came: a peer must be able to
        finish a stream (an answer written before the server gave up on it,
        of any size), or the stream would stay open on both sides for good."""
        receiver = stream.receiver
        receiver._buffer = bytearray()
        receiver._ranges = RangeSet()
        receiver._buffer_start = receiver.highest_offset
        if receiver._final_size == receiver.highest_offset:
            receiver.is_finished = True  # all of it has come: aioquic may forget the stream
        if receiver.is_finished:
            self._discarding.discard(stream.stream_id)
        else:
            stream.max_stream_data_local = max(
                stream.max_stream_data_local, receiver.highest_offset + STREAM_WINDOW
            )

    def _handle_stream_frame(self, context: Any, frame_type: int, buf: Buffer) -> None:
        if not self._discarding or (stream_id := _peek_stream_id(buf)) not in self._discarding:
            super()._handle_stream_frame(context, frame_type, buf)
            return
        used = self._local_max_data.used
        queued = len(self._events)
        super()._handle_stream_frame(context, frame_type, buf)
        if len(self._events) > queued:
            self._events.pop()  # its data, which nobody will read
        self._delivered += self._local_max_data.used - used
        self._forget_received(self._streams[stream_id])

    def _handle_reset_stream_frame(self, context: Any, frame_type: int, buf: Buffer) -> None:
        # A reset stream's final size counts against the connection's credit,
        # and what was not read of it never will be: count that as read, or
        # each reset would shrink the window for good (a stall, while the
        # keepalives still pass).
        stream_id = _peek_stream_id(buf)
        stream = self._streams.get(stream_id)
        was_finished = stream is not None and stream.receiver.is_finished
        super()._handle_reset_stream_frame(context, frame_type, buf)
        stream = self._streams.get(stream_id)  # (the reset may have created it)
        if stream is not None and stream.receiver.is_finished and not was_finished:
            receiver = stream.receiver
            self._delivered += receiver.highest_offset - receiver.starting_offset()
            self._discarding.discard(stream_id)

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: Any) -> None:
        max_data = self._local_max_data
        credit = self._delivered + self._data_window
        if 2 * (credit - max_data.value) >= self._data_window:
            max_data.value = credit
        for limit in (max_data, self._local_max_streams_bidi, self._local_max_streams_uni):
            # aioquic's batching of MAX_STREAMS: only once the peer has fewer
            # streams left to open than the update would grant.
            if limit is not max_data and limit.sent - limit.used >= limit.value - limit.sent:
                continue
            if limit.value != limit.sent:
                buf = builder.start_frame(
                    limit.frame_type,
                    capacity=CONNECTION_LIMIT_FRAME_CAPACITY,
                    handler=self._on_connection_limit_delivery,
                    handler_args=(limit,),
                )
                buf.push_uint_var(limit.value)
                limit.sent = limit.value

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: Any, stream: QuicStream) -> None:
        if stream.receiver.is_finished:
            return  # nothing more will come on it: no credit to give
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


def _peek_stream_id(buf: Buffer) -> int:
    """The stream id a STREAM or RESET_STREAM frame starts with, left unread."""
    start = buf.tell()
    stream_id = buf.pull_uint_var()
    buf.seek(start)
    return stream_id


class FrameCredit:
    """Which stream may receive how far, given the frames its reader is
    assembling (sans-IO: the session feeds it each stream's progress and
    makes the grants it returns).

    A stream may always hold :data:`STREAM_WINDOW` beyond its last complete
    frame. A frame larger than that is let in only once its size is reserved
    from ``budget``, so that at most ``budget`` bytes of such frames are
    held at once on a connection, however many streams the peer has; the
    streams that do not fit wait their turn, in order. The peer cannot be
    made to wait for ever: one frame (at most the frame limit, below the
    budget) always fits once the frames before it are complete. Closing the
    connection over the total instead would close honest peers: aioquic
    sends the streams it has data for in turns, so every frame queued at
    once is unfinished at the receiver at once.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self._reserved_bytes = 0
        # stream -> (offset where its reserved frame starts, the frame's size)
        self._reserved: dict[int, tuple[int, int]] = {}
        # The same for streams waiting for room in the budget, oldest first.
        self._waiting: dict[int, tuple[int, int]] = {}
        # stream -> the offset granted so far (STREAM_WINDOW if absent)
        self._granted: dict[int, int] = {}

    @classmethod
    def for_frame_limit(cls, max_frame_size: int) -> "FrameCredit":
        """The credit of a session whose frames are at most ``max_frame_size``
        bytes (length prefix excluded)."""
        return cls(LARGE_FRAMES_AT_ONCE * (max_frame_size + FRAME_HEADER_SIZE))

    def update(self, stream_id: int, consumed: int, pending: int | None) -> list[tuple[int, int]]:
        """Stream ``stream_id``'s reader has taken ``consumed`` bytes as
        complete frames, and holds the start of one of ``pending`` bytes
        (None: no frame begun, or its length not arrived). Returns the
        grants to make, as (stream, offset)."""
        grants: list[tuple[int, int]] = []
        reservation = self._reserved.get(stream_id)
        if reservation is not None and reservation[0] != consumed:
            self._release(stream_id, grants)  # its frame is complete
            reservation = None
        if pending is not None and pending > STREAM_WINDOW and reservation is None:
            if stream_id not in self._waiting:
                self._waiting[stream_id] = (consumed, pending)
                self._serve_waiting(grants)
            return grants
        # Renewed once half is used, to send few updates; and whenever the
        # frame begun does not fit what is left (one of up to STREAM_WINDOW
        # bytes after others would otherwise wait for ever).
        window_end = consumed + STREAM_WINDOW
        granted = self._granted.get(stream_id, STREAM_WINDOW)
        if 2 * (window_end - granted) >= STREAM_WINDOW or (
            pending is not None and consumed + pending > granted
        ):
            self._grant(stream_id, window_end, grants)
        return grants

    def forget(self, stream_id: int) -> list[tuple[int, int]]:
        """The stream is over (ended, reset): what it reserved goes to the
        streams waiting. Returns the grants to make."""
        grants: list[tuple[int, int]] = []
        self._waiting.pop(stream_id, None)
        self._granted.pop(stream_id, None)
        if stream_id in self._reserved:
            self._release(stream_id, grants)
        return grants

    def _release(self, stream_id: int, grants: list[tuple[int, int]]) -> None:
        _start, size = self._reserved.pop(stream_id)
        self._reserved_bytes -= size
        self._serve_waiting(grants)

    def _serve_waiting(self, grants: list[tuple[int, int]]) -> None:
        # In order: a large frame is not overtaken for ever by smaller ones.
        while self._waiting:
            stream_id, (start, size) = next(iter(self._waiting.items()))
            if self._reserved_bytes + size > self.budget:
                return
            del self._waiting[stream_id]
            self._reserved[stream_id] = (start, size)
            self._reserved_bytes += size
            self._grant(stream_id, start + size, grants)

    def _grant(self, stream_id: int, offset: int, grants: list[tuple[int, int]]) -> None:
        if offset > self._granted.get(stream_id, STREAM_WINDOW):
            self._granted[stream_id] = offset
            grants.append((stream_id, offset))
