"""The quiccmd/1 wire protocol, sans-IO.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON: an object whose ``type`` names one of the frame classes below. This
module only turns frames into bytes and bytes into frames; it knows nothing of
QUIC, sockets or trio, so it is tested synchronously.

See docs/protocol.md for the conversation each frame belongs to.
"""

from __future__ import annotations

import enum
import json
import math
import re
import struct
from typing import Any, ClassVar, NoReturn, Union

import attrs
import cattrs

ALPN = "quiccmd/1"
PROTOCOL_VERSION = 1

#: Largest frame accepted by default (length prefix excluded).
DEFAULT_MAX_FRAME_SIZE = 1 << 20

_LENGTH = struct.Struct("!I")
#: Bytes before each frame's body: its length.
FRAME_HEADER_SIZE = _LENGTH.size


class ProtocolErrorCode(enum.IntEnum):
    """QUIC application error codes used to close a connection, and why.

    0 is a normal close. The 0x1xx range is "the peer sent something wrong";
    0x2xx is "the server decided to end this session".
    """

    NO_ERROR = 0x0
    FRAME_TOO_LARGE = 0x101
    INVALID_JSON = 0x102
    UNKNOWN_FRAME_TYPE = 0x103
    INVALID_FRAME = 0x104
    UNEXPECTED_FRAME = 0x105
    HELLO_TIMEOUT = 0x106
    UNSUPPORTED_VERSION = 0x107
    #: Before its HELLO was accepted, the peer left more than one frame's
    #: worth of bytes unfinished across its streams.
    BUFFER_EXCEEDED = 0x108
    REPLACED = 0x201
    SHUTTING_DOWN = 0x202
    TOO_MANY_AGENTS = 0x203
    RATE_LIMITED = 0x204
    #: The HELLO's credential was refused (or was revoked): the agent stops.
    UNAUTHORIZED = 0x205
    INTERNAL_ERROR = 0x2FF


class ProtocolError(Exception):
    """The peer broke the protocol; ``code`` is the error code to close with."""

    def __init__(self, code: ProtocolErrorCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@attrs.frozen(kw_only=True)
class Hello:
    """Agent → server, first frame on the agent's control stream."""

    type: ClassVar[str] = "hello"
    client_id: str
    labels: dict[str, str] = attrs.field(factory=dict)
    version: int = PROTOCOL_VERSION
    agent_version: str = ""
    capabilities: list[str] = attrs.field(factory=list)
    #: The agent's credential (docs/security.md); checked before WELCOME.
    token: str | None = None
    #: Ids of finished commands whose results the agent still holds; it
    #: delivers them after WELCOME, each on a stream of its own.
    held_results: list[str] = attrs.field(factory=list)
    #: Random id of this agent process's run, the same on each of its
    #: reconnects ("" if unknown). The server re-sends unfinished commands
    #: only to the instance it sent them to, which remembers command ids and
    #: so never runs one twice.
    instance_id: str = ""


@attrs.frozen(kw_only=True)
class Welcome:
    """Server → agent on the control stream: the session is accepted."""

    type: ClassVar[str] = "welcome"
    server_version: str
    session_id: str
    #: Most commands the server will have open on this connection at once.
    max_in_flight: int


@attrs.frozen(kw_only=True)
class CommandFrame:
    """Server → agent, first frame of a server-opened command stream."""

    type: ClassVar[str] = "command"
    command_id: str
    command_type: str
    payload: Any = None
    #: Seconds the agent has before the server gives up on the result.
    timeout: float


@attrs.frozen(kw_only=True)
class ResultFrame:
    """Agent → server on the command's stream: the command is finished."""

    type: ClassVar[str] = "result"
    command_id: str
    #: "completed", "failed" or "cancelled".
    status: str
    result: Any = None
    error: str | None = None
    error_code: str | None = None


@attrs.frozen(kw_only=True)
class ProgressFrame:
    """Agent → server on the command's stream, before RESULT (optional)."""

    type: ClassVar[str] = "progress"
    command_id: str
    progress: Any = None


@attrs.frozen(kw_only=True)
class CancelFrame:
    """Server → agent on the control stream: stop executing ``command_id``."""

    type: ClassVar[str] = "cancel"
    command_id: str
    reason: str = ""


Frame = Union[Hello, Welcome, CommandFrame, ResultFrame, ProgressFrame, CancelFrame]

FRAME_TYPES: dict[str, type] = {
    cls.type: cls
    for cls in (Hello, Welcome, CommandFrame, ResultFrame, ProgressFrame, CancelFrame)
}

RESULT_STATUSES = frozenset({"completed", "failed", "cancelled"})

_converter = cattrs.Converter(forbid_extra_keys=False)
_converter.register_structure_hook(Any, lambda value, _: value)
# Payloads and results are already JSON values: pass them through untouched
# (cattrs would walk them, recursing once per nesting level).
_converter.register_unstructure_hook(Any, lambda value: value)


def _strict(kind: type, accepted: tuple[type, ...]):
    # cattrs would coerce (str(3), float("1")); a wrong JSON type is a bad frame.
    def structure(value: Any, _: Any) -> Any:
        if not isinstance(value, accepted) or isinstance(value, bool) is not (
            kind is bool
        ):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return kind(value)

    return structure


_converter.register_structure_hook(str, _strict(str, (str,)))
_converter.register_structure_hook(int, _strict(int, (int,)))
_converter.register_structure_hook(float, _strict(float, (int, float)))


def _structure_str_list(value: Any, _: Any) -> list[str]:
    # cattrs would turn any iterable into a list: "abc" -> ["a", "b", "c"].
    if not isinstance(value, list):
        raise TypeError(f"expected list, got {type(value).__name__}")
    return [_converter.structure(item, str) for item in value]


_converter.register_structure_hook_func(
    lambda cls: cls == list[str], _structure_str_list
)

# allow_nan=False: NaN and Infinity are not JSON, and a peer may rightly refuse
# them. ensure_ascii=True: a string holding a lone surrogate (valid in JSON as
# an escape, not in UTF-8) must still encode.
_json_encoder = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def reject_constant(name: str) -> NoReturn:
    """``json.loads(parse_constant=...)``: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not JSON")


def finite_float(text: str) -> float:
    """``json.loads(parse_float=...)``: a number too large for a float is refused, not infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range for a number")
    return value

#: Bytes a COMMAND frame adds around its payload and command type, with room
#: for a long command id.
COMMAND_FRAME_OVERHEAD = 160


#: Where a JSON text may carry a surrogate: only as an escape (UTF-8 cannot).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def check_unicode(json_text: str, value: Any) -> None:
    """Raise ValueError if ``value``, decoded from ``json_text``, holds a
    string with a lone surrogate: valid JSON, but not text (UTF-8 cannot
    encode it), so nothing downstream could show or store it as text.

    Surrogate pairs (an emoji as ``\\ud83d\\ude00``) are fine. Costs a
    search of the text, and a walk only when it holds a surrogate escape.
    """
    if _SURROGATE_ESCAPE.search(json_text) is None:
        return
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "a string holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text"
        ) from None


def json_dumps(value: Any) -> str:
    """``value`` as compact JSON, exactly as the wire carries it.

    Raises ValueError if it is not JSON (unserialisable, NaN, nested deeper
    than the encoder can go).
    """
    try:
        return _json_encoder.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON-serialisable: {exc}") from None


def encode_frame(frame: Frame) -> bytes:
    """The bytes for ``frame``: length prefix then JSON."""
    body = _converter.unstructure(frame)
    body["type"] = frame.type
    data = _json_encoder.encode(body).encode("utf-8")
    return _LENGTH.pack(len(data)) + data


def decode_body(data: bytes) -> Frame:
    """One frame from its JSON body (no length prefix)."""
    try:
        # Decode explicitly: json.loads(bytes) would also accept UTF-16/32 and a BOM.
        # Deep nesting overflows the parser's recursion: a bad frame, not a crash.
        obj = json.loads(data.decode("utf-8"), parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(ProtocolErrorCode.INVALID_JSON, str(exc)) from None
    if not isinstance(obj, dict):
        raise ProtocolError(
            ProtocolErrorCode.INVALID_FRAME, "a frame must be a JSON object"
        )
    frame_type = obj.pop("type", None)
    cls = FRAME_TYPES.get(frame_type) if isinstance(frame_type, str) else None
    if cls is None:
        raise ProtocolError(
            ProtocolErrorCode.UNKNOWN_FRAME_TYPE, f"unknown frame type {frame_type!r}"
        )
    try:
        frame = _converter.structure(obj, cls)
    except Exception as exc:  # cattrs reports a bad shape as an exception group
        detail = "; ".join(cattrs.transform_error(exc)) if isinstance(
            exc, cattrs.BaseValidationError
        ) else str(exc)
        raise ProtocolError(
            ProtocolErrorCode.INVALID_FRAME, f"invalid {frame_type} frame: {detail}"
        ) from None
    if isinstance(frame, ResultFrame) and frame.status not in RESULT_STATUSES:
        raise ProtocolError(
            ProtocolErrorCode.INVALID_FRAME, f"invalid result status {frame.status!r}"
        )
    return frame


class FrameDecoder:
    """Turns a byte stream, in any chunking, into frames.

    ``feed`` returns the frames completed by the new bytes. After a
    :class:`ProtocolError` the decoder is poisoned: the stream it reads is no
    longer in sync, so every later ``feed`` raises the same error.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE):
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._error: ProtocolError | None = None
        #: Bytes of the stream taken up by complete frames so far.
        self.consumed = 0

    @property
    def has_partial_frame(self) -> bool:
        """True if bytes of an unfinished frame are buffered (for end-of-stream checks)."""
        return bool(self._buffer)

    @property
    def buffered(self) -> int:
        """Bytes held of the unfinished frame."""
        return len(self._buffer)

    @property
    def pending_frame_size(self) -> int | None:
        """The unfinished frame's whole size (length prefix included), once
        its length has arrived; else None."""
        if len(self._buffer) < FRAME_HEADER_SIZE:
            return None
        return FRAME_HEADER_SIZE + _LENGTH.unpack_from(self._buffer)[0]

    def feed(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        offset = 0
        try:
            while len(buffer) - offset >= 4:
                (length,) = _LENGTH.unpack_from(buffer, offset)
                if length > self.max_frame_size:
                    raise ProtocolError(
                        ProtocolErrorCode.FRAME_TOO_LARGE,
                        f"frame of {length} bytes exceeds the limit of "
                        f"{self.max_frame_size}",
                    )
                end = offset + 4 + length
                if len(buffer) < end:
                    break
                frames.append(decode_body(bytes(buffer[offset + 4 : end])))
                offset = end
        except ProtocolError as exc:
            self._error = exc
            self._buffer = bytearray()
            raise
        del buffer[:offset]
        self.consumed += offset
        return frames
