"""``python -m trio_quiccmd.cli``: the operator's command line, a client of the HTTP API.

::

    python -m trio_quiccmd.cli send CLIENT_ID COMMAND_TYPE [PAYLOAD_JSON] [--wait] ...
    python -m trio_quiccmd.cli get COMMAND_ID [--wait SECONDS]
    python -m trio_quiccmd.cli list [--client ID] [--status S] [--type T] ...
    python -m trio_quiccmd.cli cancel COMMAND_ID [--reason TEXT]
    python -m trio_quiccmd.cli clients
    python -m trio_quiccmd.cli audit [--actor NAME] [--outcome refused] ...

It speaks to the server's HTTP API (``--api-url``, ``QUICCMD_API_URL``, default
``http://127.0.0.1:8080``) with the API token from ``--token-file``,
``QUICCMD_API_TOKEN`` or ``QUICCMD_API_TOKEN_FILE``, if any. It does one
request at a time and nothing concurrently, so it needs no event loop.

Output is for people by default and JSON with ``--json``, except where a
script is the likely reader: ``send`` prints the command id, and ``send
--wait`` prints the command's result (JSON), so ``... send --wait | jq`` works.

Exit status: 0 done (for ``send --wait``: the command completed); 1 the
command ``send`` or ``get`` shows ended but did not complete (failed, timeout
or cancelled, including an agent that was offline); 2 bad usage (a flag, the
payload); 3 the server refused the request (its error code and message are
printed); 4 the server could not be reached or gave no answer of the API; 5
an error of this program; 6 ``get --wait``'s wait ran out with the command
still pending or executing; 130 interrupted; 141 stdout's reader went away
(as for SIGPIPE).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shlex
import signal
import socket
import ssl
import sys
import time
import traceback
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import attrs

from .model import COMMAND_ID_PATTERN, PRIORITY_RANGE, TERMINAL_STATUSES, CommandStatus, parse_rfc3339
from .wire import finite_float, reject_constant

PROG = "python -m trio_quiccmd.cli"
DEFAULT_API_URL = "http://127.0.0.1:8080"

EXIT_OK = 0
EXIT_COMMAND_NOT_COMPLETED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_UNREACHABLE = 4
EXIT_INTERNAL = 5
EXIT_STILL_RUNNING = 6
EXIT_INTERRUPTED = 130

#: How long one request may take, beyond the wait it asked the server for.
ANSWER_MARGIN = 30.0
#: The largest answer read: a page of 1,000 commands with large payloads and
#: results fits; a server that sends without end does not.
MAX_ANSWER_BYTES = 1 << 30
#: The longest single long poll while ``send --wait`` follows a command: the
#: loop asks again, so this bounds only how long a dead link goes unnoticed.
LONG_POLL = 60.0

TERMINAL = {status.value for status in TERMINAL_STATUSES}


class UsageError(Exception):
    """Bad input on the command line: nothing was sent."""


class ApiError(Exception):
    """The server answered with a 4xx/5xx ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message} (HTTP {status})")
        self.status = status
        self.code = code


class Unreachable(Exception):
    """No answer from the server: refused, timed out, TLS failed or the link broke.

    ``maybe_delivered``: the request may have reached the server (the link
    broke after it was sent), so a POST may have taken effect.
    """

    def __init__(self, message: str, *, maybe_delivered: bool) -> None:
        super().__init__(message)
        self.maybe_delivered = maybe_delivered


class Stopped(Exception):
    """The CLI stopped before it knew how a request it made ended."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


@attrs.frozen
class ApiClient:
    """One HTTP/1.1 request per call, on a fresh connection."""

    base_url: urllib.parse.SplitResult
    token: str | None = None
    tls: ssl.SSLContext | None = None

    def call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        answer_within: float = ANSWER_MARGIN,
        accept: Sequence[int] = (200,),
    ) -> tuple[int, Any]:
        """``(status, JSON body)`` for a status in ``accept``; else :class:`ApiError`."""
        target = self.base_url.path.rstrip("/") + path
        params = {k: v for k, v in (query or {}).items() if v is not None}
        if params:
            target += "?" + urllib.parse.urlencode(params)
        headers = {"Accept": "application/json", "Connection": "close"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        encoded = None
        if body is not None:
            encoded = json.dumps(body, allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
        host, port = self.base_url.hostname, self.base_url.port
        connection: http.client.HTTPConnection
        if self.base_url.scheme == "https":
            connection = http.client.HTTPSConnection(host, port, timeout=answer_within, context=self.tls)
        else:
            connection = http.client.HTTPConnection(host, port, timeout=answer_within)
        where = urllib.parse.urlunsplit(self.base_url._replace(path=target, query=""))
        deadline = time.monotonic() + answer_within
        try:
            try:
                connection.connect()
            except OSError as exc:
                raise Unreachable(f"cannot reach {where}: {_describe(exc)}", maybe_delivered=False) from None
            try:
                connection.request(method, target, body=encoded, headers=headers)
                response = connection.getresponse()
                raw = _read_body(response, connection, deadline)
            except (OSError, http.client.HTTPException) as exc:
                raise Unreachable(f"no answer from {where}: {_describe(exc)}", maybe_delivered=True) from None
        finally:
            connection.close()
        document: Any = None
        if response.headers.get_content_type() == "application/json":
            try:
                document = json.loads(raw)
            except (ValueError, RecursionError):
                document = None
        if response.status in accept and isinstance(document, dict):
            return response.status, document
        error = document.get("error") if isinstance(document, dict) else None
        if isinstance(error, dict) and {"code", "message"} <= error.keys():
            raise ApiError(response.status, str(error["code"]), str(error["message"]))
        # Not an answer of the API (a proxy's error page, a body cut short):
        # whether a POST took effect is unknown.
        raise Unreachable(
            f"{where} answered {response.status} {response.reason} without a quiccmd JSON "
            "answer (a proxy in between, or not the quiccmd HTTP API?)",
            maybe_delivered=True,
        )


def _read_body(response: http.client.HTTPResponse, connection: http.client.HTTPConnection, deadline: float) -> bytes:
    """The whole body, within ``deadline`` and :data:`MAX_ANSWER_BYTES`.

    The socket's timeout bounds each read only: a server that trickles a
    byte at a time would otherwise hold the CLI for ever.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError()
        if connection.sock is not None:
            connection.sock.settimeout(left)
        chunk = response.read1(65536)
        if not chunk:
            body = b"".join(chunks)
            if response.length:  # the connection ended before the Content-Length did
                raise http.client.IncompleteRead(body, response.length)
            return body
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise http.client.HTTPException(f"the answer is over {MAX_ANSWER_BYTES // 2**20} MiB")
        chunks.append(chunk)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running, and is this its --http address?)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted: {exc.verify_message}"
    return str(exc) or type(exc).__name__


# -- reading the command line -------------------------------------------------------------


def _parse_api_url(text: str) -> urllib.parse.SplitResult:
    url = urllib.parse.urlsplit(text if "://" in text else f"http://{text}")
    if url.scheme not in ("http", "https"):
        raise UsageError(f"API URL {text!r}: the scheme must be http or https")
    try:
        port = url.port
    except ValueError:
        raise UsageError(f"API URL {text!r}: the port is not a number from 0 to 65535") from None
    if not url.hostname:
        raise UsageError(f"API URL {text!r} has no host")
    if url.query or url.fragment:
        raise UsageError(f"API URL {text!r}: give the server's base URL, without ? or #")
    if url.username is not None or url.password is not None:
        # Not echoed: it may hold a password.
        raise UsageError("the API URL holds a user name or password: give the API token with --token-file")
    if port is None:
        url = url._replace(netloc=f"{url.netloc}:{443 if url.scheme == 'https' else 80}")
    return url


def _read_token(args: argparse.Namespace, environ: dict[str, str]) -> str | None:
    if args.token_file:
        source, path = "--token-file", args.token_file
    elif "QUICCMD_API_TOKEN" in environ:
        return _checked_token(environ["QUICCMD_API_TOKEN"], "QUICCMD_API_TOKEN")
    elif environ.get("QUICCMD_API_TOKEN_FILE"):
        source, path = "QUICCMD_API_TOKEN_FILE", environ["QUICCMD_API_TOKEN_FILE"]
    else:
        return None
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{source} {path}: cannot read the token: {exc}") from None
    return _checked_token(text, f"{source} {path}")


def _checked_token(text: str, source: str) -> str:
    """The token, without the line end a file or ``$(...)`` leaves; never echoed in an error."""
    token = text.strip()
    if not token:
        raise UsageError(f"{source} is empty")
    if any(ch.isspace() or not ch.isprintable() or not ch.isascii() for ch in token):
        raise UsageError(
            f"{source} is not one API token: it holds spaces, line breaks or other "
            "characters a token does not have"
        )
    return token


def _client(args: argparse.Namespace, environ: dict[str, str]) -> ApiClient:
    url = _parse_api_url(args.api_url or environ.get("QUICCMD_API_URL") or DEFAULT_API_URL)
    ca_source, ca_file = (
        ("--ca-file", args.ca_file) if args.ca_file
        else ("QUICCMD_API_CA_FILE", environ.get("QUICCMD_API_CA_FILE") or None)
    )
    tls = None
    if url.scheme == "https":
        try:
            tls = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"{ca_source} {ca_file}: {exc}") from None
    elif args.ca_file:
        raise UsageError("--ca-file is for an https:// API URL")
    return ApiClient(url, _read_token(args, environ), tls)


def _payload(args: argparse.Namespace, stdin: TextIO) -> Any:
    given = [x for x in (args.payload, args.payload_option, args.payload_file) if x is not None]
    if len(given) > 1:
        raise UsageError("give the payload once: as an argument, with --payload or with --payload-file")
    if args.payload_file == "-":
        source = "the payload on standard input"
        try:
            # As bytes where there are any: the text layer may be lenient
            # (surrogateescape in a C locale) and let bad bytes through.
            raw = getattr(stdin, "buffer", None)
            text = raw.read().decode("utf-8") if raw is not None else stdin.read()
        except UnicodeDecodeError as exc:
            raise UsageError(f"{source} is not UTF-8: {exc}") from None
    elif args.payload_file is not None:
        source = f"--payload-file {args.payload_file}"
        try:
            text = Path(args.payload_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{source}: cannot read it: {exc}") from None
    elif given:
        source, text = "the payload", given[0]
    else:
        return {}
    try:
        return json.loads(text, parse_constant=reject_constant, parse_float=finite_float)
    except ValueError as exc:
        raise UsageError(f"{source} is not valid JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"{source} is nested too deeply") from None


# -- what is printed ----------------------------------------------------------------------

#: Control characters shown escaped in text for people: a stored error text or
#: label must not be able to move the cursor or forge a line of output.
_VISIBLE = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]}


def _visible(value: Any) -> str:
    if value is None or value == "":
        return "-"
    # (A lone surrogate, which an agent's text may hold, written as an escape.)
    return str(value).translate(_VISIBLE).encode("utf-8", "backslashreplace").decode("utf-8")


def _dump(document: Any, indent: int | None = 2) -> str:
    text = json.dumps(document, indent=indent, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # An agent's result may hold a lone surrogate: escaped, it is still JSON.
        text = json.dumps(document, indent=indent, ensure_ascii=True)
    return text


def _compact(document: Any) -> str:
    return _dump(document, indent=None)


def _command_block(command: dict[str, Any]) -> str:
    rows = [
        ("command_id", command["command_id"]),
        ("client_id", command["client_id"]),
        ("command_type", command["command_type"]),
        ("status", command["status"]),
        ("priority", command["priority"]),
        ("timeout", f"{command['timeout']:g} s (connect_timeout {command['connect_timeout']:g} s)"),
        ("created_at", command["created_at"]),
        ("sent_at", command["sent_at"]),
        ("completed_at", command["completed_at"]),
        ("payload", _compact(command["payload"])),
    ]
    if command["status"] == CommandStatus.COMPLETED.value:
        rows.append(("result", _compact(command["result"])))
    if command["error_code"] is not None:
        rows.append(("error", f"{command['error_code']}: {command['error']}"))
    return "\n".join(f"{name:<13} {_visible(value)}" for name, value in rows)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(header)] + [[_visible(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells
    )


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


#: An error longer than this is cut in the one-line verdict (``get`` shows it whole).
VERDICT_ERROR_CHARS = 500


def _not_completed(command: dict[str, Any]) -> str:
    error = command["error"]
    if isinstance(error, str) and len(error) > VERDICT_ERROR_CHARS:
        error = error[:VERDICT_ERROR_CHARS] + "…"
    return (
        f"Command {command['status']} command_id={command['command_id']} "
        f"client_id={_visible(command['client_id'])} error_code={_visible(command['error_code'])} "
        f"error={error!r}"
    )


# -- the subcommands ----------------------------------------------------------------------


@attrs.define
class Io:
    stdout: TextIO
    stderr: TextIO
    stdin: TextIO


def _again(args: argparse.Namespace, *words: str) -> str:
    """The command line that runs ``words`` against the same server as this one."""
    options = []
    for flag, value in (("--api-url", args.api_url), ("--token-file", args.token_file),
                        ("--ca-file", args.ca_file)):
        if value:
            options += [flag, value]
    return " ".join([PROG, *map(shlex.quote, [*options, *words])])


def _command_path(command_id: str, action: str = "") -> str:
    return f"/api/command/{urllib.parse.quote(command_id, safe='')}{action}"


def _stopped(exc: BaseException, then: str) -> Stopped:
    """Why the CLI stopped before it knew how a request ended, and what to do ``then``."""
    if isinstance(exc, KeyboardInterrupt):
        why, exit_status = "interrupted", EXIT_INTERRUPTED
    elif isinstance(exc, ApiError):
        why, exit_status = f"the server refused to say more: {exc}", EXIT_REFUSED
    else:
        why, exit_status = str(exc), EXIT_UNREACHABLE
    return Stopped(f"{why}; {then}", exit_status)


def _post(
    api: ApiClient, path: str, body: Any, *, unsure: str, accept: Sequence[int] = (200,)
) -> tuple[int, Any]:
    """POST once. If it may have taken effect unseen (interrupted, or the link
    broke after it was sent), stop, saying ``unsure``: never send it again."""
    try:
        return api.call("POST", path, body=body, accept=accept)
    except (Unreachable, KeyboardInterrupt) as exc:
        if isinstance(exc, Unreachable) and not exc.maybe_delivered:
            raise
        raise _stopped(exc, unsure) from None


def cmd_send(args: argparse.Namespace, api: ApiClient, io: Io) -> int:
    body: dict[str, Any] = {
        "client_id": args.client_id,
        "command_type": args.command_type,
        "payload": _payload(args, io.stdin),
    }
    for field in ("timeout", "connect_timeout", "priority"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    # Sent without the API's own wait, then followed by long polls: the id is
    # known at once, so an interrupted or broken wait can say which command
    # it was (the command itself goes on).
    _, command = _post(
        api, "/api/command", body, accept=(200, 202, 409),
        unsure="the command may have been accepted: look for it with "
        f"'{_again(args, 'list', '--client', args.client_id, '--limit', '5')}'",
    )
    if args.wait and command["status"] not in TERMINAL:
        command = _follow(args, api, command, io)
    completed = command["status"] == CommandStatus.COMPLETED.value
    # Waited for or not, a command can be final in the answer: failed at once
    # for an offline agent (409), or ended before the send was answered (200).
    failed = command["status"] in TERMINAL and not completed
    # The verdict first: if stdout's reader goes away, stderr has said it.
    if failed:
        print(_not_completed(command), file=io.stderr)
    if args.json:
        print(_dump(command), file=io.stdout)
    elif not args.wait and not failed:
        print(command["command_id"], file=io.stdout)
    elif completed:
        print(_dump(command["result"]), file=io.stdout)
    return EXIT_COMMAND_NOT_COMPLETED if failed else EXIT_OK


def _follow(args: argparse.Namespace, api: ApiClient, command: dict[str, Any], io: Io) -> dict[str, Any]:
    command_id = command["command_id"]
    # A poll never asks for more than the command's longest limit, which the
    # server accepted, so it is within the server's max_timeout.
    poll = min(LONG_POLL, max(command["timeout"], command["connect_timeout"]))
    try:
        # Said first thing inside the try: from here on, an interrupt names the command.
        print(f"Waiting for command {command_id} (Ctrl-C stops waiting, not the command)", file=io.stderr)
        while command["status"] not in TERMINAL:
            _, command = api.call(
                "GET", _command_path(command_id),
                query={"wait": f"{poll:g}"}, answer_within=poll + ANSWER_MARGIN,
            )
    except (KeyboardInterrupt, Unreachable, ApiError) as exc:
        raise _stopped(
            exc,
            f"command {command_id} was accepted and goes on: see it with "
            f"'{_again(args, 'get', command_id, '--wait', '60')}', "
            f"stop it with '{_again(args, 'cancel', command_id)}'",
        ) from None
    return command


def cmd_get(args: argparse.Namespace, api: ApiClient, io: Io) -> int:
    wait = args.wait or 0.0
    _, command = api.call(
        "GET", _command_path(args.command_id),
        query={"wait": f"{wait:g}" if wait else None}, answer_within=wait + ANSWER_MARGIN,
    )
    print(_dump(command) if args.json else _command_block(command), file=io.stdout)
    if command["status"] not in TERMINAL:
        # Shown as it is: only a wait that ran out is a status of its own.
        return EXIT_STILL_RUNNING if wait else EXIT_OK
    if command["status"] != CommandStatus.COMPLETED.value:
        return EXIT_COMMAND_NOT_COMPLETED
    return EXIT_OK


def cmd_list(args: argparse.Namespace, api: ApiClient, io: Io) -> int:
    _, page = api.call("GET", "/api/commands", query={
        "client_id": args.client, "status": args.status, "command_type": args.type,
        "created_after": args.created_after, "created_before": args.created_before,
        "limit": args.limit, "cursor": args.cursor,
    })
    if args.json:
        print(_dump(page), file=io.stdout)
        return EXIT_OK
    rows = [
        (c["command_id"], c["client_id"], c["command_type"], c["status"], c["created_at"], c["error_code"])
        for c in page["commands"]
    ]
    print(_table(("COMMAND_ID", "CLIENT_ID", "TYPE", "STATUS", "CREATED_AT", "ERROR_CODE"), rows), file=io.stdout)
    _more(page, io)
    return EXIT_OK


def _more(page: dict[str, Any], io: Io) -> None:
    if page.get("next_cursor"):
        print(f"(more: add --cursor {_visible(page['next_cursor'])})", file=io.stderr)


def cmd_cancel(args: argparse.Namespace, api: ApiClient, io: Io) -> int:
    body = {"reason": args.reason} if args.reason is not None else None
    _, command = _post(
        api, _command_path(args.command_id, "/cancel"), body,
        unsure=f"the cancel may have been taken: see with '{_again(args, 'get', args.command_id)}'",
    )
    print(_dump(command) if args.json else _command_block(command), file=io.stdout)
    return EXIT_OK


def cmd_clients(args: argparse.Namespace, api: ApiClient, io: Io) -> int:
    _, document = api.call("GET", "/api/clients")
    if args.json:
        print(_dump(document), file=io.stdout)
        return EXIT_OK
    rows = [
        (c["client_id"], c["remote_address"], c["connected_at"], c["in_flight"], c["queued"], _labels(c["labels"]))
        for c in document["clients"]
    ]
    print(_table(("CLIENT_ID", "REMOTE_ADDRESS", "CONNECTED_AT", "IN_FLIGHT", "QUEUED", "LABELS"), rows),
          file=io.stdout)
    return EXIT_OK


def cmd_audit(args: argparse.Namespace, api: ApiClient, io: Io) -> int:
    _, page = api.call("GET", "/api/audit", query={
        "actor": args.actor, "action": args.action, "client_id": args.client,
        "command_id": args.command_id, "outcome": args.outcome, "limit": args.limit,
        "cursor": args.cursor,
    })
    if args.json:
        print(_dump(page), file=io.stdout)
        return EXIT_OK
    rows = [
        (e["at"], e["actor"], e["action"], e["client_id"], e["command_type"], e["command_id"],
         e["outcome"], e["error_code"], e["remote"])
        for e in page["entries"]
    ]
    print(_table(("AT", "ACTOR", "ACTION", "CLIENT_ID", "TYPE", "COMMAND_ID", "OUTCOME", "ERROR_CODE",
                  "REMOTE"), rows), file=io.stdout)
    _more(page, io)
    return EXIT_OK


# -- the parser ---------------------------------------------------------------------------


def _seconds(minimum: float, *, inclusive: bool) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds, at least (or above) ``minimum``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds")
        if value < minimum or (value == minimum and not inclusive):
            bound = "at least" if inclusive else "greater than"
            raise argparse.ArgumentTypeError(f"{text} seconds: must be {bound} {minimum:g}")
        return value

    return parse


# What the API takes whatever the server's configuration (docs/API.md), checked
# here so that a mistake on the command line is bad usage (2), not a refusal (3).
LIST_LIMIT = (1, 1000)


def _argument(check: Callable[[str], bool], expected: str) -> Callable[[str], str]:
    """An argparse type: the text as given, if ``check`` accepts it."""

    def parse(text: str) -> str:
        if not check(text):
            raise argparse.ArgumentTypeError(f"{text!r}: {expected}")
        return text

    return parse


def _in_range(low: int, high: int) -> Callable[[str], bool]:
    def check(text: str) -> bool:
        digits = text[1:] if text.startswith("-") else text
        # (The length before int(): thousands of digits are refused, and slow.)
        return digits.isascii() and digits.isdigit() and len(digits) <= 20 and low <= int(text) <= high

    return check


def _is_audit_cursor(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 18


# An empty filter would be sent as none at all, and list everything.
_FILTER = _argument(bool, "must not be empty")
_TIME = _argument(lambda text: parse_rfc3339(text) is not None, "must be an RFC 3339 time with an offset, e.g. 2026-11-28T10:00:00Z")
_LIMIT = _argument(_in_range(*LIST_LIMIT), f"must be an integer from {LIST_LIMIT[0]} to {LIST_LIMIT[1]}")


def _priority(text: str) -> int:
    low, high = PRIORITY_RANGE
    if not _in_range(low, high)(text):
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer from {low} to {high}")
    return int(text)


def _connection_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    # The same options before or after the subcommand: the subcommand's copy
    # has no default, so it only overrides what was given before it.
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--api-url", metavar="URL", default=default(None),
        help=f"the server's HTTP API (also QUICCMD_API_URL; default {DEFAULT_API_URL})",
    )
    parser.add_argument(
        "--token-file", metavar="FILE", default=default(None),
        help="a file holding the API token (also QUICCMD_API_TOKEN, QUICCMD_API_TOKEN_FILE)",
    )
    parser.add_argument(
        "--ca-file", metavar="PEM", default=default(None),
        help="CA certificates for an https:// API URL (also QUICCMD_API_CA_FILE; default: the system's)",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False),
        help="print the API's JSON answer instead of text for people",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Send commands to agents, follow them and look up the history, "
        "through the server's HTTP API.",
        epilog="Exit status: 0 done; 1 the command sent or shown failed, timed out or was "
        "cancelled; 2 bad usage; 3 the server refused the request; 4 the server did not "
        "answer; 5 an error of this program; 6 get --wait ran out, the command unfinished; "
        "130 interrupted.",
    )
    _connection_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, defaults=False)

    def add(name: str, handler: Callable[..., int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    send = add("send", cmd_send, "send a command to an agent; prints its id, or with --wait its result")
    send.add_argument("client_id", metavar="CLIENT_ID")
    send.add_argument("command_type", metavar="COMMAND_TYPE")
    send.add_argument("payload", metavar="PAYLOAD_JSON", nargs="?",
                      help="the payload, JSON (default {}); may also come after the options")
    send.add_argument("--payload", dest="payload_option", metavar="JSON",
                      help="the payload as an option (for one that starts with -: --payload=-1)")
    send.add_argument("--payload-file", metavar="FILE", help="read the payload (JSON) from FILE, - for stdin")
    send.add_argument("--timeout", type=_seconds(0, inclusive=False), metavar="SECONDS",
                      help="the command's deadline once sent (default: the server's, 30)")
    send.add_argument("--connect-timeout", type=_seconds(0, inclusive=True), metavar="SECONDS",
                      help="how long to wait for an offline agent (default 0: fail at once)")
    send.add_argument("--priority", type=_priority, metavar="N", help="higher goes first when the agent is busy")
    send.add_argument("--wait", action="store_true",
                      help="wait for the command to finish; print its result, exit 1 unless it completed")

    get = add("get", cmd_get, "show one command")
    get.add_argument("command_id", metavar="COMMAND_ID")
    get.add_argument("--wait", type=_seconds(0, inclusive=True), metavar="SECONDS",
                     help="wait up to SECONDS for the command to finish first (exit 6 if it does not)")

    list_ = add("list", cmd_list, "list commands, newest first")
    list_.add_argument("--client", type=_FILTER, metavar="CLIENT_ID")
    list_.add_argument("--status", choices=[s.value for s in CommandStatus])
    list_.add_argument("--type", type=_FILTER, metavar="COMMAND_TYPE")
    list_.add_argument("--created-after", type=_TIME, metavar="TIME", help="RFC 3339, e.g. 2026-11-28T10:00:00Z")
    list_.add_argument("--created-before", type=_TIME, metavar="TIME")
    list_.add_argument("--limit", type=_LIMIT, metavar="N", help="at most N (1-1000, default 100)")
    list_.add_argument("--cursor", type=_argument(COMMAND_ID_PATTERN.fullmatch, "must be a cursor that list printed"),
                       metavar="CURSOR", help="the page after this one (printed with the list)")

    cancel = add("cancel", cmd_cancel, "cancel a pending or executing command")
    cancel.add_argument("command_id", metavar="COMMAND_ID")
    cancel.add_argument("--reason", metavar="TEXT", help="kept as the command's error")

    add("clients", cmd_clients, "list the connected agents")

    audit = add("audit", cmd_audit, "the audit log of sends and cancels, newest first")
    audit.add_argument("--actor", type=_FILTER, metavar="NAME", help="an API token's name, or anonymous")
    audit.add_argument("--action", choices=["send", "cancel"])
    audit.add_argument("--client", type=_FILTER, metavar="CLIENT_ID")
    audit.add_argument("--command-id", type=_FILTER, metavar="COMMAND_ID")
    audit.add_argument("--outcome", choices=["accepted", "refused"])
    audit.add_argument("--limit", type=_LIMIT, metavar="N", help="at most N (1-1000, default 100)")
    audit.add_argument("--cursor", type=_argument(_is_audit_cursor, "must be a cursor that audit printed"),
                       metavar="CURSOR")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; exits 2 (argparse's way) for bad usage.

    argparse takes positionals only before the options that follow them, so
    ``send ID TYPE --wait '{...}'`` leaves the payload over: it is taken as
    the payload here, as an operator means it.
    """
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        if args.subcommand == "send" and args.payload is None and len(extras) == 1 \
                and not extras[0].startswith("-"):
            args.payload = extras[0]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: dict[str, str] | None = None,
    io: Io | None = None,
) -> int:
    """Run one subcommand; returns the exit status (see the module docstring)."""
    io = io or Io(sys.stdout, sys.stderr, sys.stdin)
    environ = dict(os.environ if environ is None else environ)
    args = parse_args(argv)
    try:
        api = _client(args, environ)
        return args.handler(args, api, io)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=io.stderr)
        return EXIT_USAGE
    except ApiError as exc:
        print(f"{PROG}: error: {exc}", file=io.stderr)
        if exc.status == 401:
            print("(the API token comes from --token-file FILE, QUICCMD_API_TOKEN or QUICCMD_API_TOKEN_FILE)",
                  file=io.stderr)
        return EXIT_REFUSED
    except Unreachable as exc:
        print(f"{PROG}: error: {exc}", file=io.stderr)
        return EXIT_UNREACHABLE
    except Stopped as exc:
        print(f"{PROG}: {exc}", file=io.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=io.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise  # stdout's reader left: see below
    except Exception:
        # A bug, or an answer of a shape this CLI does not know: its own
        # status, so that no script reads it as the command's failure.
        print(f"{PROG}: internal error (please report it):", file=io.stderr)
        traceback.print_exc(file=io.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of stdout went away (``| head``). Point stdout at
        # /dev/null so that the interpreter's last flush stays quiet, and say
        # so as a program killed by SIGPIPE would: what mattered (a failed
        # command) was said on stderr first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 128 + signal.SIGPIPE
    sys.exit(status)
