"""Agent links without the network: a session that records what the server
sends, and helpers that feed the agent's side back as frames."""

from __future__ import annotations

from trio_quiccmd import CommandManager
from trio_quiccmd.wire import CommandFrame, Hello, ResultFrame


class RecordingSession:
    """Stands in for a QuicSession: records frames per stream."""

    def __init__(self) -> None:
        self.streams: dict[int, list] = {}
        self.next_stream = 1
        self.is_closing = False
        self.can_open_stream = True
        self.peer_address = ("192.0.2.7", 4433)
        self.closed_with = None
        #: Streams whose input the server dropped (gave up on their command).
        self.discarded: set[int] = set()

    def lift_buffer_limit(self) -> None:
        pass  # a QuicSession's concern (tests/test_limits.py has it end to end)

    def open_stream(self, frame, *, end_stream=False) -> int:
        stream_id = self.next_stream
        self.next_stream += 4
        self.streams[stream_id] = [frame]
        return stream_id

    def send_frame(self, stream_id, frame, *, end_stream=False) -> None:
        self.streams.setdefault(stream_id, []).append(frame)

    def end_stream(self, stream_id) -> None:
        pass

    def discard_stream_input(self, stream_id) -> None:
        self.discarded.add(stream_id)

    def close(self, code, reason="") -> None:
        self.is_closing = True
        self.closed_with = code

    def commands(self) -> list[CommandFrame]:
        return [f[0] for f in self.streams.values() if isinstance(f[0], CommandFrame)]

    def stream_of(self, command_id: str) -> int:
        return next(
            s for s, f in self.streams.items()
            if isinstance(f[0], CommandFrame) and f[0].command_id == command_id
        )


def connect_agent(manager: CommandManager, client_id: str) -> tuple:
    link = manager.registry.new_link()
    session = RecordingSession()
    link.handshake_completed(session)
    link.frame_received(session, 0, Hello(client_id=client_id, labels={"zone": "a"}))
    return link, session


def answer(link, session, command_id: str, status="completed", result=None, **kw) -> None:
    link.frame_received(
        session,
        session.stream_of(command_id),
        ResultFrame(command_id=command_id, status=status, result=result, **kw),
    )
