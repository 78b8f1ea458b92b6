"""The operators' HTTP API: a Quart-Trio app over a :class:`CommandManager`.

Every answer is JSON (except ``/metrics``). Errors are always
``{"error": {"code": ..., "message": ...}}`` with a 4xx/5xx status; bad input
never reaches the manager and never produces a 500. The one documented
exception to the error shape is the 409 of ``POST /api/command`` for an
offline agent, whose body is the (failed) command itself, as the issue asks.

The routes only translate HTTP to :class:`CommandManager` calls; the manager
owns every state change. See ``docs/API.md``.
"""

from __future__ import annotations

import datetime
import json
import logging
import ipaddress
import math
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

import attrs
import trio
from quart import Response, current_app, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, InternalServerError, RequestEntityTooLarge

from ..errors import (
    CommandAlreadyFinished,
    CommandNotFound,
    CommandRefused,
    Forbidden,
    InvalidCommand,
    LimitExceeded,
    PayloadTooLarge,
    QuicCmdError,
    ShuttingDown,
    StoreUnavailable,
    Unauthorized,
)
from ..logs import LONGEST_NAMED_VALUE, clip
from ..model import COMMAND_ID_PATTERN, PRIORITY_RANGE, Command, CommandStatus, ErrorCode, parse_rfc3339
from ..wire import check_unicode, finite_float, reject_constant
from .audit import ACTIONS, OUTCOMES, AuditEntry, AuditLog
from .auth import ANONYMOUS, ApiAuthenticator
from .manager import CommandManager
from .metrics import Metrics
from .openapi import openapi_document
from .registry import ClientInfo

logger = logging.getLogger("trio_quiccmd.http")

#: client_id longer than this can never connect (HELLO refuses it), so a
#: command for it is a mistake, not a wait.
MAX_ID_LENGTH = 256
MAX_REASON_LENGTH = 1024
#: Deepest nesting of arrays/objects a payload may have. Encoding a command
#: frame recurses once per level; far below Python's recursion limit, so a
#: hostile payload gets a 400 here instead of failing inside the dispatcher.
MAX_PAYLOAD_DEPTH = 100

_SEND_FIELDS = frozenset(
    {"client_id", "command_type", "payload", "timeout", "connect_timeout", "priority", "wait"}
)
_LIST_PARAMS = frozenset(
    {"client_id", "status", "command_type", "created_after", "created_before", "limit", "cursor"}
)
_AUDIT_PARAMS = frozenset({"actor", "action", "client_id", "command_id", "outcome", "limit", "cursor"})

#: The role each route needs when the API authenticates (routes not listed:
#: /healthz and /openapi.json, open to all).
_ROUTE_ROLES = {
    "send_command": "operate",
    "cancel_command": "operate",
    "get_command": "read",
    "list_commands": "read",
    "list_clients": "read",
    "metrics_endpoint": "read",
    "list_audit": "read",
}
_AUDITED_ROUTES = {"send_command": "send", "cancel_command": "cancel"}

#: Error codes for statuses werkzeug raises (routing, body size, timeouts).
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
}


@attrs.frozen(kw_only=True)
class ApiLimits:
    """What the HTTP layer enforces beyond the manager's own checks.

    The largest timeout a command may ask for is the manager's
    (``manager.settings.max_timeout``): one number, one place.
    """

    #: Largest request body, bytes (Quart's MAX_CONTENT_LENGTH). Over it: 413.
    max_payload_bytes: int = 1 << 20
    #: ``timeout`` of a command that does not give one, seconds.
    default_timeout: float = 30.0
    default_list_limit: int = 100
    max_list_limit: int = 1000


class ApiError(Exception):
    """An error answer: HTTP status, machine-readable code, one-line message."""

    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


# -- JSON in and out ---------------------------------------------------------------


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def rfc3339(timestamp: float | None) -> str | None:
    """Epoch seconds -> ``2026-11-28T10:00:00.123Z`` (UTC), or None."""
    if timestamp is None:
        return None
    # Rounded down to the millisecond, as a command id takes its creation
    # time (model.new_command_id), so created_after=<a command's created_at>
    # includes it. (fromtimestamp rounds to the microsecond first: x.9996 s
    # came out as the next millisecond.)
    moment = _EPOCH + datetime.timedelta(milliseconds=math.floor(timestamp * 1000))
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def command_json(command: Command) -> dict[str, Any]:
    """A command as the API shows it (the fields and order of issue 3)."""
    code = command.error_code
    return {
        "command_id": command.command_id,
        "client_id": command.client_id,
        "command_type": command.command_type,
        "payload": command.payload,
        "status": command.status.value,
        "result": command.result,
        "error": command.error,
        "error_code": getattr(code, "value", code),
        "priority": command.priority,
        "timeout": command.timeout,
        "connect_timeout": command.connect_timeout,
        "created_at": rfc3339(command.created_at),
        "sent_at": rfc3339(command.sent_at),
        "completed_at": rfc3339(command.completed_at),
    }


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    body = entry.to_json()
    body["at"] = rfc3339(entry.at)
    return body


def client_json(client: ClientInfo) -> dict[str, Any]:
    return {
        "client_id": client.client_id,
        "labels": dict(client.labels),
        "remote_address": client.remote_address,
        "connected_at": rfc3339(client.connected_at),
        "in_flight": client.in_flight,
        "queued": client.queued,
    }


def _finite(value: Any) -> Any:
    """``value`` with NaN/Infinity replaced by null (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _dumps(body: Any) -> str:
    try:
        return json.dumps(body, ensure_ascii=False, allow_nan=False)
    except ValueError:
        # Only an agent's result can get here (requests are checked on the way
        # in): Python's json reads NaN from the wire, strict clients choke on it.
        return json.dumps(_finite(body), ensure_ascii=False, allow_nan=False)


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    text = _dumps(body)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate, which only an agent's result or error can carry
        # (requests are checked on the way in): escaped, the answer is still JSON.
        data = json.dumps(json.loads(text), ensure_ascii=True).encode("ascii")
    return Response(data, status=status, headers=dict(headers or {}), content_type="application/json")


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> Response:
    return json_response({"error": {"code": code, "message": message}, **extra}, status, headers)


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON leaves a repeated key to the reader; taking the last would let
    # ``{"client_id": "web-07", ..., "client_id": "db-1"}`` pass a glance.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key {duplicate!r} appears more than once in an object")
    return obj


def parse_json(data: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no float overflow. Raises ApiError(400)."""
    try:
        text = data.decode("utf-8")
        value = json.loads(
            text, parse_constant=reject_constant, parse_float=finite_float,
            object_pairs_hook=_object_without_duplicates,
        )
        check_unicode(text, value)
        return value
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "the request body is not UTF-8") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the request body is nested too deeply") from None
    except ValueError as exc:
        # Python's own advice in two of its messages is not for the client.
        if "int_max_str_digits" in str(exc):
            detail = "a number has more than 4300 digits"
        elif "BOM" in str(exc):
            detail = "it starts with a byte order mark (BOM)"
        else:
            detail = str(exc)
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {detail}") from None


def _is_json_media_type(content_type: str | None) -> bool:
    """``application/json`` or ``application/<anything>+json``, parameters (charset) allowed."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def _has_body() -> bool:
    if request.headers.get("Transfer-Encoding"):
        return True
    length = request.headers.get("Content-Length")
    return length is not None and length.strip() not in ("", "0")


async def _read_json_object(*, required: bool) -> dict[str, Any]:
    # A body must say it is JSON. Besides being right, this is what stops a web
    # page from posting here: a cross-site form or "simple" fetch can only send
    # text/plain, form or multipart bodies; application/json needs a CORS
    # preflight, which this API never grants.
    if _has_body() and not _is_json_media_type(request.headers.get("Content-Type")):
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        if request.content_length is not None and limit is not None and request.content_length > limit:
            raise RequestEntityTooLarge()  # the same answer as for a JSON body that size
        given = request.headers.get("Content-Type")
        raise ApiError(
            415, "unsupported_media_type",
            "the request body must be sent with Content-Type: application/json, not "
            + (repr(given[:100]) if given else "without a Content-Type"),
        )
    # get_data raises RequestEntityTooLarge (-> 413) both for a Content-Length
    # over MAX_CONTENT_LENGTH and for a chunked body that grows past it.
    data = await request.get_data(as_text=False)
    if not data.strip():
        if required:
            raise ApiError(400, "invalid_json", "the request body must be a JSON object")
        return {}
    body = parse_json(data)
    if not isinstance(body, dict):
        raise ApiError(
            400, "invalid_json", f"the request body must be a JSON object, not {_json_type(body)}"
        )
    return body


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# -- where an unauthenticated request may come from ---------------------------------


def _split_authority(authority: str, default_port: int | None) -> tuple[str, int | None] | None:
    """``host[:port]`` (``[v6]:port`` too) -> (lower-case host, port), or None if malformed."""
    try:
        parts = urlsplit("//" + authority)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return host.lower(), port if port is not None else default_port


def _is_local_name(host: str, bind_host: str | None) -> bool:
    """localhost, a loopback address, or exactly the (specific) address the API is bound to."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and address.is_loopback:
        return True
    if bind_host:
        bound = bind_host.strip("[]").lower()
        try:
            unspecified = ipaddress.ip_address(bound).is_unspecified
        except ValueError:
            unspecified = False
        return not unspecified and host == bound
    return False


def anonymous_origin_refusal(
    host_header: str | None, origin: str | None, bind_host: str | None
) -> str | None:
    """Why a request without a token must be refused, or None.

    A web page in a browser on the server's host can reach a loopback API:
    directly (it cannot read the answers, but it can post) or, with DNS
    rebinding, through a name of its own that now resolves to 127.0.0.1 (and
    then it reads them too). Such a request has a ``Host`` that is the
    attacker's name, or an ``Origin`` that is the attacker's page; a request
    from curl, the Python client or a page served by this API has neither.
    """
    host = _split_authority(host_header or "", None)
    if host is None or not _is_local_name(host[0], bind_host):
        return (
            f"a request without a token must be addressed to localhost, a loopback address "
            f"or the API's own address, not Host {(host_header or '')[:100]!r} "
            "(a web page's DNS rebinding looks like this); send a bearer token"
        )
    if origin is None:
        return None
    scheme, _, authority = origin.partition("://")
    scheme = scheme.lower()
    from_page = (
        _split_authority(authority, {"http": 80, "https": 443}.get(scheme))
        if scheme in ("http", "https")
        else None
    )
    host_port = host[1] if host[1] is not None else 80
    if from_page is None or not _is_local_name(from_page[0], bind_host) or from_page[1] != host_port:
        return (
            f"a request without a token is refused from the web page at Origin {origin[:100]!r}: "
            "only pages served from this API's own loopback address and port may use it "
            "without one; send a bearer token"
        )
    return None


# -- field and parameter checks ----------------------------------------------------


def _invalid(message: str, code: str = "invalid_command") -> ApiError:
    return ApiError(400, code, message)


def _check_unknown(given: Iterable[str], allowed: frozenset[str], what: str, code: str) -> None:
    # Strict on purpose: a misspelt "timout" would otherwise silently run with
    # the default timeout.
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise _invalid(
            f"unknown {what} {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}",
            code,
        )


def _string_field(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if name not in body:
        raise _invalid(f"{name} is required")
    if not isinstance(value, str) or not value:
        got = "an empty string" if value == "" else _json_type(value)
        raise _invalid(f"{name} must be a non-empty string, not {got}")
    if len(value) > MAX_ID_LENGTH:
        raise _invalid(f"{name} must be at most {MAX_ID_LENGTH} characters")
    if not value.isprintable():
        # It goes into log lines and the audit log: no line breaks, no
        # control or other unprintable characters (the document's pattern).
        raise _invalid(f"{name} must be printable text (no control characters), not {value[:100]!r}")
    return value


def _seconds_field(
    body: Mapping[str, Any], name: str, default: float, *, zero_ok: bool, maximum: float
) -> float:
    if name not in body:
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(f"{name} must be a number of seconds, not {_json_type(value)}")
    if value < 0 or (value == 0 and not zero_ok):
        raise _invalid(f"{name} must be {'0 or more' if zero_ok else 'greater than 0'} seconds")
    if value > maximum:
        raise _invalid(f"{name} must be at most {maximum:g} seconds")
    return float(value)


def _payload_depth(payload: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest = 0
    stack = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Iterable[Any] = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_PAYLOAD_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _priority_field(body: Mapping[str, Any]) -> int:
    value = body.get("priority", 0)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"priority must be an integer, not {_json_type(value)}")
    low, high = PRIORITY_RANGE
    if not low <= value <= high:
        raise _invalid(f"priority must be between {low} and {high}")
    return value


_FREE_TEXT_QUERY_PARAMETERS = frozenset({"client_id", "command_type", "cursor", "actor", "command_id"})


def _query(allowed: frozenset[str], hint: str = "") -> dict[str, str]:
    """The query parameters, each at most once, empty ones dropped.

    ``hint`` is added to the refusal of an unknown parameter.
    """
    args = request.args
    if not allowed and args:
        # "allowed: " and nothing after it read like a server bug.
        unknown = ", ".join(map(repr, sorted(args.keys())))
        raise _invalid(
            f"unknown query parameter {unknown}: {request.method} {request.path} "
            f"takes no query parameters{hint}",
            "invalid_request",
        )
    _check_unknown(args.keys(), allowed, "query parameter", "invalid_request")
    params: dict[str, str] = {}
    for key in args:
        values = args.getlist(key)
        if len(values) > 1:
            raise _invalid(f"query parameter {key!r} is given more than once", "invalid_request")
        # ``?client_id=&command_type=`` (a template with blanks) means "no
        # filter"; a blank status or number is not one of its values and is refused.
        if values[0] != "" or key not in _FREE_TEXT_QUERY_PARAMETERS:
            params[key] = values[0]
    return params


def _query_number(params: Mapping[str, str], name: str, *, maximum: float) -> float | None:
    text = params.get(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise _invalid(f"{name} must be a number of seconds, not {text!r}", "invalid_request") from None
    if not math.isfinite(value) or value < 0 or value > maximum:
        raise _invalid(f"{name} must be between 0 and {maximum:g} seconds", "invalid_request")
    return value


def _query_int(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = params.get(name)
    if text is None:
        return default
    # (The length first: int() of thousands of digits is refused, and slow.)
    if not (text.isascii() and text.isdigit() and len(text) <= 12) or not low <= int(text) <= high:
        raise _invalid(f"{name} must be an integer from {low} to {high}, not {text!r}", "invalid_request")
    return int(text)


def _query_time(params: Mapping[str, str], name: str) -> float | None:
    """An RFC 3339 time with an offset (as the API writes them) -> epoch seconds."""
    text = params.get(name)
    if text is None:
        return None
    moment = parse_rfc3339(text)
    if moment is None:
        message = f"{name} must be an RFC 3339 time with an offset, e.g. 2026-11-28T10:00:00Z, not {text!r}"
        if parse_rfc3339(text.replace(" ", "+")) is not None:
            # A URL's query decodes an unencoded "+" to a space. Refused, not
            # read as "+": such a client mangles its other values too.
            message += "; a '+' in a URL query means a space: send the offset's '+' as %2B, or use Z"
        raise _invalid(message, "invalid_request")
    return moment


def _wait_bound(command: Command) -> float:
    """Longest a command can stay unfinished, from the manager's deadline rules.

    A command gets ``connect_timeout`` (offline agent) or ``timeout`` (agent's
    window full) to be delivered, then ``timeout`` to answer; the manager ends
    it at those deadlines whether anyone waits. Bounding a waiting request by
    the same sum (plus slack for the deadline task to run) means a wait can
    never outlive its command, so it never holds up a shutdown.
    """
    return max(command.connect_timeout, command.timeout) + command.timeout + 1.0


# -- connections: an answer that leaves the body unread ends the connection -----------


#: Seconds a request's whole body may take to arrive once a route reads it
#: (Quart's ``BODY_TIMEOUT``); slower is ``408 request_timeout``.
BODY_TIMEOUT = 60.0
#: After an answer that leaves the body unread, the rest of the body is still
#: taken in (and dropped) while it keeps coming, with no pause longer than
#: UNREAD_BODY_PAUSE and for UNREAD_BODY_LINGER seconds at most; then the
#: connection is closed.
UNREAD_BODY_PAUSE = 1.0
UNREAD_BODY_LINGER = 10.0


def _announces_body(scope: Mapping[str, Any]) -> bool:
    for name, value in scope["headers"]:  # (hypercorn gives them lower-case)
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


def end_connections_left_unread(asgi_app: Any) -> Any:
    """ASGI middleware: an answer sent before the request's body was read in
    full (401, 403, 413, 415, 408 ...) says ``Connection: close``, and the
    connection is closed once it is sent and the rest of the body has
    stopped coming (UNREAD_BODY_PAUSE, UNREAD_BODY_LINGER at most), whatever
    the client does. Every other answer leaves the connection to keep-alive.

    hypercorn (0.18, HTTP/1.1) means to do the closing itself: when the app
    ends its answer, ``H11Protocol._maybe_recycle`` sees that the client's
    side is not ``DONE`` and sends ``Closed()``, on which ``TCPServer._close``
    shuts the socket; for a finished request it restarts the keep-alive
    timer instead. Both run in the app's task, inside the ASGI ``send`` of
    the last body message, *after* hypercorn has put ``http.disconnect`` in
    the app's queue, and Quart-Trio's ``handle_messages`` answers that
    message by cancelling the request's nursery, that very task included.
    So ``_close`` is cancelled at its first checkpoint (``send_eof``) and the
    socket stays open for as long as the client likes (a Content-Length whose
    body never comes); and the keep-alive timer is never restarted, so an
    idle connection after a finished request is never closed either. Hence
    the last ``send`` is shielded: what it waits for is hypercorn's own
    ``send_all``, which hypercorn already shields, and its closing.

    Before that last ``send``, while the rest of the body keeps coming (the
    answer itself is out by then), it is let in, for a bounded time: closing
    a socket with unread bytes makes the kernel reset the connection, and a
    client still sending (an oversized upload) would get an error from its
    send instead of the 413 (Python's http.client, so the CLI, for one).

    A client that hangs up as its answer goes out makes hypercorn's reading
    task close the socket (``TCPServer._close``: ``send_eof``, without the
    ``send_lock`` its ``protocol_send`` takes), and the app's ``send`` that
    meets it there raises ``trio.BusyResourceError``, which hypercorn logs as
    an "Error in ASGI Framework" traceback (for 2 in 3 such clients). The
    connection is being closed; what is left to send is dropped instead.
    """

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await asgi_app(scope, receive, send)
            return
        body_unread = _announces_body(scope)
        arrived = trio.Event()  # set, and replaced, at each message the app takes in

        async def receive_reading() -> Any:
            nonlocal body_unread, arrived
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_unread = False
            arrived.set()
            arrived = trio.Event()
            return message

        async def let_the_body_in() -> None:
            # (Quart-Trio's handle_messages goes on taking messages meanwhile.)
            with trio.move_on_after(UNREAD_BODY_LINGER):
                while body_unread:
                    with trio.move_on_after(UNREAD_BODY_PAUSE) as pause:
                        await arrived.wait()
                    if pause.cancelled_caught:
                        return

        closed_under_us = False

        async def send_unless_closed(message: Any) -> None:
            nonlocal closed_under_us
            if closed_under_us:
                return
            try:
                await send(message)
            except trio.BusyResourceError:
                closed_under_us = True
                logger.debug("Answer dropped, the connection is closing path=%s", scope.get("path"))

        async def send_closing(message: Any) -> None:
            if message["type"] == "http.response.start" and body_unread:
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            if message["type"] != "http.response.body" or message.get("more_body", False):
                await send_unless_closed(message)
                return
            if body_unread:
                if message.get("body"):
                    await send_unless_closed({**message, "more_body": True})
                    message = {"type": "http.response.body", "body": b"", "more_body": False}
                await let_the_body_in()
            with trio.CancelScope(shield=True):
                await send_unless_closed(message)

        await asgi_app(scope, receive_reading, send_closing)

    return app


# -- the app --------------------------------------------------------------------------


def create_app(
    manager: CommandManager,
    *,
    limits: ApiLimits | None = None,
    metrics: Metrics | None = None,
    auth: ApiAuthenticator | None = None,
    audit: AuditLog | None = None,
    bind_host: str | None = None,
) -> QuartTrio:
    """The HTTP API over ``manager``. ``metrics`` feeds ``GET /metrics`` (404 without it).

    ``auth`` checks bearer tokens and roles (None: every request may do
    everything); ``audit`` records sends and cancels and feeds ``GET
    /api/audit`` (404 without it). A request without a token (anonymous) is
    refused (403) unless its ``Host`` is localhost, a loopback address or
    ``bind_host`` (the address the API listens on), and its ``Origin``, if
    any, the same: what keeps web pages in a local browser out.

    The app holds no state of its own; serve it with ``hypercorn.trio.serve``.
    """
    limits = limits or ApiLimits()
    max_timeout = manager.settings.max_timeout
    app = QuartTrio(__name__)
    # Not Quart's automatic OPTIONS (200, an empty text/html body): OPTIONS
    # gets the JSON 405 of any method a route does not take, as the API
    # grants no CORS preflight anyway (see _read_json_object).
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.config["MAX_CONTENT_LENGTH"] = limits.max_payload_bytes
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT
    app.asgi_app = end_connections_left_unread(app.asgi_app)
    # Errors are JSON responses, never re-raised into hypercorn's HTML page.
    app.config["PROPAGATE_EXCEPTIONS"] = False
    document = openapi_document(
        default_timeout=limits.default_timeout,
        max_timeout=max_timeout,
        max_payload_bytes=limits.max_payload_bytes,
        default_list_limit=limits.default_list_limit,
        max_list_limit=limits.max_list_limit,
    )
    def refuse_if_shutting_down() -> None:
        if manager.shutting_down:
            raise ShuttingDown()

    def record(
        action: str, client_id: str | None, command_type: str | None, command_id: str | None,
        error_code: str | None = None,
    ) -> None:
        if audit is not None:
            audit.record(
                actor=g.principal.name, action=action, client_id=client_id,
                command_type=command_type, command_id=command_id,
                outcome="refused" if error_code else "accepted", error_code=error_code,
                remote=request.remote_addr or "",
            )

    def refused(exc: QuicCmdError) -> None:
        logger.warning(
            "Operator rejected remote=%s method=%s path=%s reason=%r",
            request.remote_addr, request.method, clip(request.path, LONGEST_NAMED_VALUE), str(exc),
        )
        action = _AUDITED_ROUTES.get(request.endpoint or "")
        if action is not None and isinstance(exc, Forbidden):
            record(action, None, None, (request.view_args or {}).get("command_id"), exc.code)

    @app.before_request
    async def authenticate() -> None:
        g.principal = ANONYMOUS
        role = _ROUTE_ROLES.get(request.endpoint or "")
        if role is None:
            return
        try:
            if auth is not None:
                g.principal = auth.authenticate(request.headers.get("Authorization"))
            if g.principal is ANONYMOUS:
                refusal = anonymous_origin_refusal(
                    request.headers.get("Host"), request.headers.get("Origin"), bind_host
                )
                if refusal is not None:
                    raise Forbidden(refusal)
            if auth is not None:
                auth.require_role(g.principal, role, f"{request.method} {request.url_rule.rule}")
        except (Unauthorized, Forbidden) as exc:
            refused(exc)
            raise

    # -- routes ---------------------------------------------------------------

    @app.post("/api/command")
    async def send_command() -> Response:
        refuse_if_shutting_down()
        # (``?wait=true`` is a field of the body here: refused, not ignored.)
        _query(frozenset(), '; to wait, put "wait": true in the JSON body' if "wait" in request.args else "")
        body = await _read_json_object(required=True)
        _check_unknown(body.keys(), _SEND_FIELDS, "field", "invalid_command")
        client_id = _string_field(body, "client_id")
        command_type = _string_field(body, "command_type")
        payload = body.get("payload", {})
        timeout = _seconds_field(
            body, "timeout", limits.default_timeout, zero_ok=False, maximum=max_timeout
        )
        connect_timeout = _seconds_field(
            body, "connect_timeout", 0.0, zero_ok=True, maximum=max_timeout
        )
        priority = _priority_field(body)
        wait = body.get("wait", False)
        if not isinstance(wait, bool):
            raise _invalid(f"wait must be true or false, not {_json_type(wait)}")
        if _payload_depth(payload) > MAX_PAYLOAD_DEPTH:
            raise _invalid(f"payload is nested more than {MAX_PAYLOAD_DEPTH} levels deep")

        if auth is not None:
            try:
                auth.require_scope(g.principal, client_id, command_type, manager.registry.labels_of(client_id))
            except Forbidden as exc:
                record("send", client_id, command_type, None, exc.code)
                raise
        # The manager audits the send itself (accepted, or refused and why).
        command = await manager.send_command(
            client_id,
            command_type,
            payload,
            timeout=timeout,
            connect_timeout=connect_timeout,
            priority=priority,
            actor=g.principal.name,
            remote=request.remote_addr or "",
        )
        if command.status is CommandStatus.FAILED and command.error_code == ErrorCode.AGENT_OFFLINE.value:
            return json_response(command_json(command), 409)
        if wait and not command.is_terminal:
            command = await manager.wait(command.command_id, _wait_bound(command))
        # 200 means "final", with or without wait: a command can end before
        # its send is answered (a deadline shorter than the store's commit, a
        # cancel meanwhile). 202: still pending or executing.
        return json_response(command_json(command), 200 if command.is_terminal else 202)

    @app.get("/api/command/<command_id>")
    async def get_command(command_id: str) -> Response:
        params = _query(frozenset({"wait"}))
        wait = _query_number(params, "wait", maximum=max_timeout)
        if wait:
            # The command's own deadline ends the wait at the latest.
            command = await manager.wait(command_id, wait)
        else:
            command = await manager.get_command(command_id)
        return json_response(command_json(command))

    @app.get("/api/commands")
    async def list_commands() -> Response:
        params = _query(_LIST_PARAMS)
        status = params.get("status")
        if status is not None and status not in {s.value for s in CommandStatus}:
            raise _invalid(
                f"unknown status {status!r}; one of {', '.join(s.value for s in CommandStatus)}",
                "invalid_request",
            )
        limit = _query_int(
            params, "limit", limits.default_list_limit, 1, limits.max_list_limit
        )
        cursor = params.get("cursor")
        if cursor is not None and not COMMAND_ID_PATTERN.fullmatch(cursor):
            raise _invalid(f"cursor must be a next_cursor from an earlier page, not {cursor!r}", "invalid_request")
        page = await manager.list_commands(
            client_id=params.get("client_id"),
            status=status,
            command_type=params.get("command_type"),
            created_after=_query_time(params, "created_after"),
            created_before=_query_time(params, "created_before"),
            limit=limit,
            cursor=cursor,
        )
        return json_response(
            {"commands": [command_json(c) for c in page.commands], "next_cursor": page.next_cursor}
        )

    @app.post("/api/command/<command_id>/cancel")
    async def cancel_command(command_id: str) -> Response:
        _query(frozenset())
        body = await _read_json_object(required=False)
        _check_unknown(body.keys(), frozenset({"reason"}), "field", "invalid_request")
        reason = body.get("reason", "cancelled by operator")
        if not isinstance(reason, str) or not reason or len(reason) > MAX_REASON_LENGTH:
            raise _invalid(
                f"reason must be a string of 1 to {MAX_REASON_LENGTH} characters", "invalid_request"
            )
        client_id = command_type = None
        try:
            command = await manager.get_command(command_id)
            client_id, command_type = command.client_id, command.command_type
            if auth is not None:
                auth.require_scope(g.principal, client_id, command_type, manager.registry.labels_of(client_id))
        except QuicCmdError as exc:
            record("cancel", client_id, command_type, command_id, exc.code)
            raise
        # The manager audits the cancel itself.
        command = await manager.cancel(
            command_id, reason, actor=g.principal.name, remote=request.remote_addr or ""
        )
        return json_response(command_json(command))

    @app.get("/api/audit")
    async def list_audit() -> Response:
        if audit is None:
            raise ApiError(404, "not_found", "the audit log is not enabled on this server")
        params = _query(_AUDIT_PARAMS)
        for name, allowed in (("action", ACTIONS), ("outcome", OUTCOMES)):
            if name in params and params[name] not in allowed:
                raise _invalid(f"unknown {name} {params[name]!r}; one of {', '.join(allowed)}", "invalid_request")
        cursor = params.get("cursor")
        if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
            raise _invalid(f"cursor must be a next_cursor from an earlier page, not {cursor!r}", "invalid_request")
        limit = _query_int(params, "limit", limits.default_list_limit, 1, limits.max_list_limit)
        entries, next_cursor = audit.query(
            actor=params.get("actor") or None,
            action=params.get("action"),
            client_id=params.get("client_id") or None,
            command_id=params.get("command_id") or None,
            outcome=params.get("outcome"),
            limit=limit,
            before=int(cursor) if cursor else None,
        )
        return json_response(
            {
                "entries": [audit_json(e) for e in entries],
                "next_cursor": str(next_cursor) if next_cursor is not None else None,
            }
        )

    @app.get("/api/clients")
    async def list_clients() -> Response:
        _query(frozenset())
        clients = sorted(manager.clients(), key=lambda c: c.client_id)
        return json_response({"clients": [client_json(c) for c in clients]})

    @app.get("/healthz")
    async def healthz() -> Response:
        body: dict[str, Any] = {
            "status": "shutting_down" if manager.shutting_down else "ok",
            "connected_agents": len(manager.clients()),
            "unfinished_commands": manager.unfinished_count,
        }
        if manager.shutting_down:
            # 503 so a load balancer stops sending new work here while we drain.
            body["error"] = {"code": ShuttingDown.code, "message": str(ShuttingDown())}
            return json_response(body, 503)
        return json_response(body)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        if metrics is None:
            raise ApiError(404, "not_found", "metrics are not enabled on this server")
        return Response(metrics.render(), status=200, content_type=metrics.content_type)

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return json_response(document)

    # -- errors ---------------------------------------------------------------

    @app.errorhandler(ApiError)
    async def api_error(error: ApiError) -> Response:
        # 415 is answered without reading the body: the connection cannot be reused.
        headers = {"Connection": "close"} if error.status == 415 else None
        return error_response(error.status, error.code, error.message, headers, **error.extra)

    @app.errorhandler(QuicCmdError)
    async def manager_error(error: QuicCmdError) -> Response:
        if isinstance(error, CommandNotFound):
            return error_response(404, error.code, str(error))
        if isinstance(error, CommandAlreadyFinished):
            # The command rides along so the caller sees how it ended.
            return error_response(409, error.code, str(error), command=command_json(error.command))
        if isinstance(error, (ShuttingDown, StoreUnavailable)):
            return error_response(503, error.code, str(error))
        if isinstance(error, LimitExceeded):
            # queue_full / too_many_commands: nothing was created; back off and retry.
            return error_response(429, error.code, str(error), headers={"Retry-After": "1"})
        if isinstance(error, Unauthorized):
            challenge = 'Bearer realm="quiccmd"'
            if request.headers.get("Authorization"):
                challenge += ', error="invalid_token"'
            return error_response(401, error.code, str(error), headers={"WWW-Authenticate": challenge})
        if isinstance(error, Forbidden):
            return error_response(403, error.code, str(error))
        if isinstance(error, CommandRefused):
            # policy_denied / invalid_payload: nothing was created or sent.
            return error_response(422, error.code, str(error))
        if isinstance(error, PayloadTooLarge):
            return error_response(413, error.code, str(error))
        if isinstance(error, InvalidCommand):
            return error_response(400, error.code, str(error))
        return error_response(400, error.code, str(error))

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = _HTTP_CODES.get(status) or (error.name or "error").lower().replace(" ", "_")
        if isinstance(error, InternalServerError):
            # Quart has logged the original exception; the client gets no details.
            message = "internal server error"
        elif status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif status == 405:
            allowed = ", ".join(sorted(getattr(error, "valid_methods", None) or ()))
            message = f"method {request.method} is not allowed on {request.path}; allowed: {allowed}"
        elif status == 413:
            message = f"the request body is larger than {limits.max_payload_bytes} bytes"
        else:
            message = error.description or error.name
        headers = {
            name: value
            for name, value in error.get_headers()
            if name.lower() not in {"content-type", "content-length"}
        }
        if status == 413:
            # The unread rest of the body makes the connection unusable.
            headers["Connection"] = "close"
        return error_response(status, code, message, headers)

    return app
