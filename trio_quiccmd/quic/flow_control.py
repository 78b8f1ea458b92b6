"""Receive windows that follow what the application took, not what a peer claims.

aioquic doubles a stream's MAX_STREAM_DATA as soon as the highest offset the
peer has *named* passes half of it, and the connection's MAX_DATA as soon as
those offsets summed do; data beyond a gap is buffered with the gap filled
in. A peer that sends one byte just below each limit thus makes the
receiver's buffer double on every round trip while it sends almost nothing
(aiortc/aioquic#589, closed unfixed): a few dozen packets, before any HELLO,
take a server to gigabytes.

:class:`WindowedQuicConnection` grants credit the usual way instead: a
window beyond the data already handed to the application, renewed once half
of it is used. What one connection can make its receiver buffer is then
bounded by its windows, whatever the peer sends.
"""

from __future__ import annotations

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
from aioquic.quic.stream import QuicStream


class WindowedQuicConnection(QuicConnection):
    """A ``QuicConnection`` whose receive windows are ``configuration.max_data``
    (the connection) and ``configuration.max_stream_data`` (each stream)
    beyond what :meth:`next_event` has handed out, and which lets the peer
    open no unidirectional streams (the protocol has none: opening one is a
    STREAM_LIMIT_ERROR, which aioquic answers by closing the connection).

    The overridden methods replace aioquic's private ones of the same name
    (aioquic 1.x; there is no public hook for flow control): a test checks
    that aioquic still has and calls them.
    """

    def __init__(self, *, configuration: QuicConfiguration, **kwargs: Any):
        super().__init__(configuration=configuration, **kwargs)
        self._data_window = configuration.max_data
        self._stream_window = configuration.max_stream_data
        # Bytes of stream data the peer has used credit for that are handed
        # to the application, or never will be (on streams it reset).
        self._delivered = 0
        uni = self._local_max_streams_uni
        uni.value = uni.sent = 0

    def next_event(self) -> events.QuicEvent | None:
        event = super().next_event()
        if isinstance(event, events.StreamDataReceived):
            self._delivered += len(event.data)
        return event

    def _handle_reset_stream_frame(self, context: Any, frame_type: int, buf: Buffer) -> None:
        # A reset stream's final size counts against the connection's credit,
        # and what was not read of it never will be: count that as read, or
        # each reset would shrink the window for good (a stall, while the
        # keepalives still pass).
        start = buf.tell()
        stream_id = buf.pull_uint_var()
        buf.seek(start)
        stream = self._streams.get(stream_id)
        was_finished = stream is not None and stream.receiver.is_finished
        super()._handle_reset_stream_frame(context, frame_type, buf)
        stream = self._streams.get(stream_id)  # (the reset may have created it)
        if stream is not None and stream.receiver.is_finished and not was_finished:
            receiver = stream.receiver
            self._delivered += receiver.highest_offset - receiver.starting_offset()

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
        # Zero only for a stream we opened that the peer cannot send on.
        if stream.max_stream_data_local:
            credit = stream.receiver.starting_offset() + self._stream_window
            if 2 * (credit - stream.max_stream_data_local) >= self._stream_window:
                stream.max_stream_data_local = credit
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
