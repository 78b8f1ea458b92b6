"""The quiccmd/1 framing: bytes in any chunking <-> frames, and every way a peer
can get it wrong ends in a ProtocolError with the right close code."""

from __future__ import annotations

import json
import struct

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_quiccmd.wire import (
    check_unicode,
    DEFAULT_MAX_FRAME_SIZE,
    FRAME_TYPES,
    CancelFrame,
    CommandFrame,
    FrameDecoder,
    Hello,
    ProgressFrame,
    ProtocolError,
    ProtocolErrorCode,
    ResultFrame,
    Welcome,
    decode_body,
    encode_frame,
)

# --------------------------------------------------------------------------
# helpers and strategies


def raw(obj) -> bytes:
    """A frame (length prefix + body) carrying an arbitrary JSON value."""
    body = json.dumps(obj).encode("utf-8")
    return struct.pack("!I", len(body)) + body


def body_of(frame) -> bytes:
    return encode_frame(frame)[4:]


def assert_protocol_error(code: ProtocolErrorCode, body: bytes) -> None:
    """Both entry points reject ``body`` with ``code``."""
    with pytest.raises(ProtocolError) as info:
        decode_body(body)
    assert info.value.code is code
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(struct.pack("!I", len(body)) + body)
    assert info.value.code is code


SAMPLE_FRAMES = [
    Hello(client_id="agent-1"),
    Hello(
        client_id="agent-ü-🚀",
        labels={"region": "eu-west", "rack": "r7"},
        version=1,
        agent_version="1.2.3",
        capabilities=["shell", "ping"],
        token="s3cr3t",
        held_results=["cmd-a", "cmd-b"],
        instance_id="5f0c2a9e1b7d4c33",
    ),
    Welcome(server_version="0.1.0", session_id="sess-42", max_in_flight=16),
    CommandFrame(command_id="c1", command_type="ping", timeout=30.0),
    CommandFrame(
        command_id="c2",
        command_type="shell",
        payload={"argv": ["ls", "-l"], "env": {"LANG": "C"}, "x": None},
        timeout=0.25,
    ),
    ResultFrame(command_id="c1", status="completed", result={"pong": True}),
    ResultFrame(
        command_id="c2",
        status="failed",
        error="boom",
        error_code="executor_error",
    ),
    ResultFrame(command_id="c3", status="cancelled"),
    ProgressFrame(command_id="c2", progress={"pct": 50}),
    ProgressFrame(command_id="c2"),
    CancelFrame(command_id="c2", reason="operator asked"),
    CancelFrame(command_id="c2"),
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
ids = st.text(min_size=1, max_size=20)

frames = st.one_of(
    st.builds(
        Hello,
        client_id=ids,
        labels=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
        version=st.integers(0, 10),
        agent_version=st.text(max_size=8),
        capabilities=st.lists(st.text(max_size=8), max_size=3),
        token=st.none() | st.text(max_size=8),
        held_results=st.lists(ids, max_size=3),
        instance_id=st.text(max_size=16),
    ),
    st.builds(
        Welcome,
        server_version=st.text(max_size=8),
        session_id=ids,
        max_in_flight=st.integers(0, 2**31),
    ),
    st.builds(
        CommandFrame,
        command_id=ids,
        command_type=ids,
        payload=json_values,
        timeout=st.floats(min_value=0, max_value=1e6),
    ),
    st.builds(
        ResultFrame,
        command_id=ids,
        status=st.sampled_from(["completed", "failed", "cancelled"]),
        result=json_values,
        error=st.none() | st.text(max_size=8),
        error_code=st.none() | st.text(max_size=8),
    ),
    st.builds(ProgressFrame, command_id=ids, progress=json_values),
    st.builds(CancelFrame, command_id=ids, reason=st.text(max_size=8)),
)


def feed_in_chunks(decoder: FrameDecoder, data: bytes, cuts: list[int]) -> list:
    out = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out += decoder.feed(data[start:cut])
        start = cut
    return out


# --------------------------------------------------------------------------
# round trips


def test_samples_cover_every_frame_type():
    # A new frame type must get a round-trip sample here.
    assert {type(f) for f in SAMPLE_FRAMES} == set(FRAME_TYPES.values())


@pytest.mark.parametrize("frame", SAMPLE_FRAMES, ids=repr)
def test_round_trip(frame):
    data = encode_frame(frame)
    (length,) = struct.unpack("!I", data[:4])
    assert length == len(data) - 4
    assert decode_body(data[4:]) == frame
    decoder = FrameDecoder()
    assert decoder.feed(data) == [frame]
    assert not decoder.has_partial_frame


@pytest.mark.parametrize("frame", SAMPLE_FRAMES, ids=repr)
def test_body_is_utf8_json_object_naming_its_type(frame):
    # What a peer written in another language relies on.
    obj = json.loads(body_of(frame).decode("utf-8"))
    assert isinstance(obj, dict)
    assert obj["type"] == frame.type
    # Every field travels under its documented name, nothing else is added.
    assert set(obj) == {"type"} | {f.name for f in attrs.fields(type(frame))}


def test_integer_timeout_is_accepted_as_float():
    frame = decode_body(
        json.dumps(
            {"type": "command", "command_id": "c", "command_type": "t", "timeout": 5}
        ).encode()
    )
    assert frame.timeout == 5.0 and isinstance(frame.timeout, float)


def test_hello_without_the_newer_fields_still_decodes():
    # An agent that predates held results and instances: nothing held, and
    # an unknown instance (the server then re-sends nothing to it).
    frame = decode_body(json.dumps({"type": "hello", "client_id": "old"}).encode())
    assert frame == Hello(client_id="old")
    assert frame.held_results == [] and frame.instance_id == ""


@pytest.mark.parametrize(
    "payload",
    [
        None,
        "",
        "héllo wörld — 日本語 — 🚀🚀",
        {"nested": {"deeper": [1, 2.5, None, {"k": "ü"}, [], {}]}},
        [None, None],
        {"null": None, "": "empty key", "🔑": "emoji key"},
        "line\nbreak\ttab \"quote\" \\ backslash \x00 nul",
        2**62,
        -1.5e-300,
    ],
    ids=repr,
)
def test_payload_values_survive(payload):
    for frame in (
        CommandFrame(command_id="c", command_type="t", payload=payload, timeout=1),
        ResultFrame(command_id="c", status="completed", result=payload),
        ProgressFrame(command_id="c", progress=payload),
    ):
        assert FrameDecoder().feed(encode_frame(frame)) == [frame]


@settings(max_examples=150)
@given(frames)
def test_round_trip_property(frame):
    assert decode_body(body_of(frame)) == frame


# --------------------------------------------------------------------------
# chunking


def test_byte_by_byte():
    data = b"".join(encode_frame(f) for f in SAMPLE_FRAMES)
    decoder = FrameDecoder()
    got = []
    for i in range(len(data)):
        got += decoder.feed(data[i : i + 1])
    assert got == SAMPLE_FRAMES
    assert not decoder.has_partial_frame


def test_frame_is_produced_exactly_when_its_last_byte_arrives():
    data = encode_frame(SAMPLE_FRAMES[1])
    decoder = FrameDecoder()
    for i in range(len(data) - 1):
        assert decoder.feed(data[i : i + 1]) == []
        assert decoder.has_partial_frame
    assert decoder.feed(data[-1:]) == [SAMPLE_FRAMES[1]]
    assert not decoder.has_partial_frame


def test_several_frames_in_one_chunk():
    data = b"".join(encode_frame(f) for f in SAMPLE_FRAMES)
    assert FrameDecoder().feed(data) == SAMPLE_FRAMES


def test_chunk_ending_mid_frame_keeps_the_rest():
    a, b, c = SAMPLE_FRAMES[0], SAMPLE_FRAMES[4], SAMPLE_FRAMES[10]
    data = encode_frame(a) + encode_frame(b) + encode_frame(c)
    split = len(encode_frame(a)) + 7  # inside b's body
    decoder = FrameDecoder()
    assert decoder.feed(data[:split]) == [a]
    assert decoder.has_partial_frame
    assert decoder.feed(data[split:]) == [b, c]
    assert not decoder.has_partial_frame


def test_empty_feed_is_harmless():
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert not decoder.has_partial_frame


@settings(max_examples=150)
@given(
    st.lists(frames, min_size=1, max_size=6),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_any_chunking_gives_the_same_frames(batch, cuts):
    data = b"".join(encode_frame(f) for f in batch)
    cuts = [c % (len(data) + 1) for c in cuts]
    decoder = FrameDecoder()
    assert feed_in_chunks(decoder, data, cuts) == batch
    assert not decoder.has_partial_frame


# --------------------------------------------------------------------------
# size limit


def test_frame_at_the_limit_is_accepted():
    frame = CancelFrame(command_id="c", reason="x" * 50)
    size = len(body_of(frame))
    assert FrameDecoder(max_frame_size=size).feed(encode_frame(frame)) == [frame]


def test_frame_over_the_limit_is_refused_and_poisons_the_decoder():
    frame = CancelFrame(command_id="c", reason="x" * 50)
    size = len(body_of(frame))
    decoder = FrameDecoder(max_frame_size=size - 1)
    with pytest.raises(ProtocolError) as info:
        decoder.feed(encode_frame(frame))
    assert info.value.code is ProtocolErrorCode.FRAME_TOO_LARGE
    # Poisoned: the stream is out of sync, even a good frame is refused now.
    for later in (encode_frame(CancelFrame(command_id="ok")), b""):
        with pytest.raises(ProtocolError) as again:
            decoder.feed(later)
        assert again.value.code is ProtocolErrorCode.FRAME_TOO_LARGE


def test_oversized_frame_is_refused_from_its_length_prefix_alone():
    # Without waiting for (and buffering) the announced gigabytes.
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(struct.pack("!I", DEFAULT_MAX_FRAME_SIZE + 1))
    assert info.value.code is ProtocolErrorCode.FRAME_TOO_LARGE
    assert not decoder.has_partial_frame


def test_oversized_frame_after_good_frames_in_the_same_chunk():
    good = encode_frame(CancelFrame(command_id="c"))
    decoder = FrameDecoder(max_frame_size=100)
    with pytest.raises(ProtocolError) as info:
        decoder.feed(good + struct.pack("!I", 101))
    assert info.value.code is ProtocolErrorCode.FRAME_TOO_LARGE


# --------------------------------------------------------------------------
# malformed bodies


_CANCEL_JSON = json.dumps({"type": "cancel", "command_id": "c"})


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="unterminated"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(_CANCEL_JSON[:-1].encode(), id="truncated"),
        pytest.param(b'{"type": "cancel", "command_id": "\xff\xfe"}', id="bad-utf8"),
        pytest.param(b'{"type": "cancel", "command_id": "\xc3"}', id="cut-utf8-seq"),
        pytest.param(b"\xed\xa0\x80", id="utf8-encoded-surrogate"),
        # The protocol is UTF-8; other encodings json.loads would sniff are refused.
        pytest.param(_CANCEL_JSON.encode("utf-16-le"), id="utf-16"),
        pytest.param(_CANCEL_JSON.encode("utf-32"), id="utf-32"),
        pytest.param(b"\xef\xbb\xbf" + _CANCEL_JSON.encode(), id="utf-8-bom"),
        # Nesting deep enough to blow the parser's recursion, well under 1 MiB.
        pytest.param(
            b'{"type": "progress", "command_id": "c", "progress": '
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}",
            id="deep-nesting",
        ),
    ],
)
def test_invalid_json(body):
    assert_protocol_error(ProtocolErrorCode.INVALID_JSON, body)


@pytest.mark.parametrize(
    "obj", [[], [{"type": "cancel", "command_id": "c"}], "cancel", 3, 1.5, None, True]
)
def test_non_object_json_is_an_invalid_frame(obj):
    assert_protocol_error(ProtocolErrorCode.INVALID_FRAME, json.dumps(obj).encode())


HELLO = {"type": "hello", "client_id": "a"}
WELCOME = {"type": "welcome", "server_version": "1", "session_id": "s", "max_in_flight": 4}
COMMAND = {"type": "command", "command_id": "c", "command_type": "t", "timeout": 1.0}
RESULT = {"type": "result", "command_id": "c", "status": "completed"}
PROGRESS = {"type": "progress", "command_id": "c"}
CANCEL = {"type": "cancel", "command_id": "c"}
MINIMAL = [HELLO, WELCOME, COMMAND, RESULT, PROGRESS, CANCEL]


@pytest.mark.parametrize("obj", MINIMAL, ids=lambda o: o["type"])
def test_minimal_frames_are_valid(obj):
    # Guards the negative tests below: they fail for the reason they name.
    frame = decode_body(json.dumps(obj).encode())
    assert frame.type == obj["type"]


WRONG_TYPES = [
    (HELLO, "client_id", 3),
    (HELLO, "client_id", None),
    (HELLO, "client_id", ["a"]),
    (HELLO, "labels", {"a": 1}),
    (HELLO, "labels", {"a": None}),
    (HELLO, "labels", ["a", "b"]),
    (HELLO, "labels", "a=b"),
    (HELLO, "version", "1"),
    (HELLO, "version", True),
    (HELLO, "version", 1.5),
    (HELLO, "agent_version", 1),
    (HELLO, "capabilities", "shell"),  # a string is not a list of strings
    (HELLO, "capabilities", {"shell": True}),
    (HELLO, "capabilities", ["shell", 1]),
    (HELLO, "token", 3),
    (HELLO, "held_results", "cmd-1"),
    (HELLO, "held_results", [None]),
    (HELLO, "instance_id", 7),
    (HELLO, "instance_id", None),
    (WELCOME, "max_in_flight", "4"),
    (WELCOME, "max_in_flight", 4.5),
    (WELCOME, "max_in_flight", False),
    (WELCOME, "session_id", 7),
    (COMMAND, "timeout", True),
    (COMMAND, "timeout", "30"),
    (COMMAND, "timeout", None),
    (COMMAND, "command_type", 1),
    (COMMAND, "command_id", 1),
    (RESULT, "error", 5),
    (RESULT, "error_code", 5),
    (RESULT, "status", 1),
    (PROGRESS, "command_id", None),
    (CANCEL, "reason", False),
]


@pytest.mark.parametrize(
    "base,field,value", WRONG_TYPES, ids=[f"{b['type']}.{f}={v!r}" for b, f, v in WRONG_TYPES]
)
def test_wrong_field_type_is_an_invalid_frame(base, field, value):
    obj = {**base, field: value}
    assert_protocol_error(ProtocolErrorCode.INVALID_FRAME, json.dumps(obj).encode())


MISSING = [
    (HELLO, "client_id"),
    (WELCOME, "server_version"),
    (WELCOME, "session_id"),
    (WELCOME, "max_in_flight"),
    (COMMAND, "command_id"),
    (COMMAND, "command_type"),
    (COMMAND, "timeout"),
    (RESULT, "command_id"),
    (RESULT, "status"),
    (PROGRESS, "command_id"),
    (CANCEL, "command_id"),
]


@pytest.mark.parametrize(
    "base,field", MISSING, ids=[f"{b['type']}-{f}" for b, f in MISSING]
)
def test_missing_required_field_is_an_invalid_frame(base, field):
    obj = {k: v for k, v in base.items() if k != field}
    assert_protocol_error(ProtocolErrorCode.INVALID_FRAME, json.dumps(obj).encode())


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "bogus", "command_id": "c"},
        {"type": "HELLO", "client_id": "a"},
        {"type": "", "client_id": "a"},
        {"type": 3},
        {"type": None},
        {"type": ["hello"]},
        {"client_id": "a"},  # no type at all
        {},
    ],
    ids=repr,
)
def test_unknown_frame_type(obj):
    assert_protocol_error(ProtocolErrorCode.UNKNOWN_FRAME_TYPE, json.dumps(obj).encode())


@pytest.mark.parametrize(
    "status", ["pending", "executing", "timeout", "COMPLETED", "", "done"]
)
def test_result_with_invalid_status_is_an_invalid_frame(status):
    obj = {**RESULT, "status": status}
    assert_protocol_error(ProtocolErrorCode.INVALID_FRAME, json.dumps(obj).encode())


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
def test_result_valid_statuses(status):
    assert decode_body(json.dumps({**RESULT, "status": status}).encode()).status == status


@pytest.mark.parametrize("obj", MINIMAL, ids=lambda o: o["type"])
def test_unknown_extra_fields_are_ignored(obj):
    # Forward compatibility: a newer peer may add fields.
    expected = decode_body(json.dumps(obj).encode())
    extended = {
        **obj,
        "added_in_v2": {"nested": [1, 2, None]},
        "priority": "high",
        "zz": None,
    }
    assert decode_body(json.dumps(extended).encode()) == expected


def test_error_poisons_the_decoder():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as first:
        decoder.feed(raw({"type": "bogus"}))
    assert first.value.code is ProtocolErrorCode.UNKNOWN_FRAME_TYPE
    with pytest.raises(ProtocolError) as again:
        decoder.feed(encode_frame(CancelFrame(command_id="c")))
    assert again.value.code is ProtocolErrorCode.UNKNOWN_FRAME_TYPE


def test_bad_frame_after_good_ones_in_one_chunk_raises():
    decoder = FrameDecoder()
    data = encode_frame(CancelFrame(command_id="c")) + raw({**RESULT, "status": "x"})
    with pytest.raises(ProtocolError) as info:
        decoder.feed(data)
    assert info.value.code is ProtocolErrorCode.INVALID_FRAME


def test_error_codes_are_stable_wire_values():
    # These travel as QUIC application error codes; peers depend on the numbers.
    assert {c.name: c.value for c in ProtocolErrorCode} == {
        "NO_ERROR": 0x0,
        "FRAME_TOO_LARGE": 0x101,
        "INVALID_JSON": 0x102,
        "UNKNOWN_FRAME_TYPE": 0x103,
        "INVALID_FRAME": 0x104,
        "UNEXPECTED_FRAME": 0x105,
        "HELLO_TIMEOUT": 0x106,
        "UNSUPPORTED_VERSION": 0x107,
        "BUFFER_EXCEEDED": 0x108,
        "REPLACED": 0x201,
        "SHUTTING_DOWN": 0x202,
        "TOO_MANY_AGENTS": 0x203,
        "RATE_LIMITED": 0x204,
        "UNAUTHORIZED": 0x205,
        "INTERNAL_ERROR": 0x2FF,
    }
    err = ProtocolError(ProtocolErrorCode.INVALID_FRAME, "why")
    assert err.code is ProtocolErrorCode.INVALID_FRAME
    assert "INVALID_FRAME" in str(err) and "why" in str(err)


# --------------------------------------------------------------------------
# fuzzing: nothing a peer sends may crash the decoder with anything else


def _feed_expecting_only_protocol_errors(decoder, data, cuts):
    try:
        feed_in_chunks(decoder, data, cuts)
    except ProtocolError as exc:
        assert isinstance(exc.code, ProtocolErrorCode)
        # ...and once broken it stays broken.
        with pytest.raises(ProtocolError):
            decoder.feed(b"")


@settings(max_examples=300)
@given(
    st.binary(max_size=300),
    st.lists(st.integers(min_value=0, max_value=300), max_size=20),
    st.integers(min_value=0, max_value=64),
)
def test_arbitrary_bytes_only_raise_protocol_error(data, cuts, max_frame_size):
    _feed_expecting_only_protocol_errors(FrameDecoder(max_frame_size), data, cuts)


small_json = (
    json_scalars
    | st.lists(json_scalars, max_size=3)
    | st.dictionaries(st.text(max_size=4), json_scalars, max_size=3)
)
json_ish_bodies = st.one_of(
    st.binary(max_size=40),
    small_json.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"type": st.sampled_from(sorted(FRAME_TYPES) + ["nope"])},
        optional={
            k: small_json
            for k in (
                "client_id", "labels", "version", "capabilities", "token",
                "held_results", "instance_id", "server_version", "session_id", "max_in_flight",
                "command_id", "command_type", "payload", "timeout", "status",
                "result", "error", "error_code", "progress", "reason",
            )
        },
    ).map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=200)
@given(
    st.lists(json_ish_bodies, min_size=1, max_size=4),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=20),
)
def test_arbitrary_framed_bodies_only_raise_protocol_error(bodies, cuts):
    # Correct length prefixes, so the bodies reach the JSON and frame checks.
    data = b"".join(struct.pack("!I", len(b)) + b for b in bodies)
    _feed_expecting_only_protocol_errors(FrameDecoder(), data, cuts)


@pytest.mark.parametrize("text, ok", [
    ('"plain"', True),
    ('"\\ud83d\\ude00"', True),  # a surrogate pair: one emoji
    ('"\\\\ud800"', True),  # an escaped backslash, then letters
    ('"\\ud800"', False),
    ('["x", {"k": "\\udc00"}]', False),
    ('{"\\ud800": 1}', False),
    ('"\\ude00\\ud83d"', False),  # a pair the wrong way round
])
def test_text_with_a_lone_surrogate_is_refused(text, ok):
    value = json.loads(text)
    if ok:
        check_unicode(text, value)
    else:
        with pytest.raises(ValueError, match="lone surrogate"):
            check_unicode(text, value)
