"""Log lines an operator can grep: ``<UTC time> <LEVEL> <logger> <message key=value ...>``.

For example::

    2026-11-28T10:00:00.123Z INFO trio_quiccmd.command Command sent command_id=... client_id=...

The messages themselves carry the ``key=value`` pairs (the library logs them
that way); this module only frames them. Shared by the server and agent CLIs.
"""

from __future__ import annotations

import copy
import datetime
import functools
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from typing import TextIO


#: C0 controls (line feed, carriage return, ...), DEL, C1 controls and the
#: Unicode line and paragraph separators: what could start a new line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char)
    if named is not None:
        return named
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``)."""
    return _CONTROL.sub(_escape, text)


class _Quoted(str):
    """A str that ``%s`` writes as ``%r`` does."""

    def __str__(self) -> str:
        return repr(self)


def quoted(text: str) -> str:
    """``text`` to log as a ``key=%s`` value, quoted (``%r``) by any
    formatter, ours included, which then does not quote it again."""
    return _Quoted(text)


_SPACE = re.compile(r"\s")
#: A %-conversion (or an escaped %).
_CONVERSION = re.compile(r"%(?:\(\w+\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[a-zA-Z%]")


@functools.lru_cache(maxsize=512)
def _value_slots(msg: str) -> frozenset[int]:
    """Which positional args of ``msg`` are written by a ``key=%s``."""
    slots, index = set(), 0
    for match in _CONVERSION.finditer(msg):
        spec = match.group()
        if spec == "%%":
            continue
        index += spec.count("*")  # a width or precision taken from the args
        if spec.endswith("s") and match.start() > 0 and msg[match.start() - 1] == "=":
            slots.add(index)
        index += 1
    return frozenset(slots)


def _needs_quotes(value: object) -> bool:
    # Not only strings: a path, or an exception whose text a peer chose.
    return (
        not isinstance(value, (int, float, _Quoted)) and _SPACE.search(str(value)) is not None
    )


def clip(text: str, limit: int) -> str:
    """``text`` cut at ``limit`` characters, saying how long it was: for a
    value a peer chose, which may be of any length (a URL's path)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters in all)"


#: Longest value a ``key=%(name)s`` of a mapping-style message keeps.
LONGEST_NAMED_VALUE = 1024
_NAMED_VALUE = re.compile(r"=%\((\w+)\)s")


@functools.lru_cache(maxsize=64)
def _named_value_slots(msg: str) -> frozenset[str]:
    """Which names of ``msg`` are written by a ``key=%(name)s``."""
    return frozenset(_NAMED_VALUE.findall(msg))


class _QuotingArgs(Mapping[str, object]):
    """The arguments of a ``%(name)s`` message (hypercorn's access log
    passes them so), with each ``key=%(name)s`` value quoted as needed and
    cut at LONGEST_NAMED_VALUE: a URL path of ``a%20status=200`` is decoded
    to a space before it gets here."""

    def __init__(self, args: Mapping[str, object], names: frozenset[str]):
        self._args = args
        self._names = names

    def __getitem__(self, key: str) -> object:
        value = self._args[key]
        if key not in self._names or isinstance(value, (int, float)):
            return value
        text = clip(str(value), LONGEST_NAMED_VALUE)
        return _Quoted(text) if _needs_quotes(text) else text

    def __iter__(self) -> Iterator[str]:
        return iter(self._args)

    def __len__(self) -> int:
        return len(self._args)


class KeyValueFormatter(logging.Formatter):
    """One line per record, RFC 3339 UTC timestamp first; tracebacks indented below.

    Control characters in the message are escaped, so a value a peer chose (a
    client_id, a URL path, an agent's error code) can never start a line of
    its own that looks like one the server wrote.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # A value with a space, written as it is, could pass for more
        # key=value pairs (a client_id "x error_code=forged"): a ``key=%s``
        # value with a space is quoted, as ``%r`` writes it. The record
        # itself belongs to the other handlers too.
        args = record.args
        if isinstance(args, tuple) and isinstance(record.msg, str):
            value_slots = _value_slots(record.msg)
            if any(i < len(args) and _needs_quotes(args[i]) for i in value_slots):
                record = copy.copy(record)
                record.args = tuple(
                    _Quoted(str(arg)) if i in value_slots and _needs_quotes(arg) else arg
                    for i, arg in enumerate(args)
                )
        elif isinstance(args, Mapping) and isinstance(record.msg, str):
            names = _named_value_slots(record.msg)
            if names:
                record = copy.copy(record)
                record.args = _QuotingArgs(args, names)  # type: ignore[assignment]
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # Only the message line; exc_info and stack_info are added (indented) after.
        return escape_controls(super().formatMessage(record))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def]
        # Indented, so a grep for the log line's start never matches a traceback line.
        return "\n".join("    " + line for line in super().formatException(ei).splitlines())


def configure_logging(level: str | int = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Send every log record at ``level`` and above to ``stream`` (stderr), one line each.

    Replaces the root logger's handlers (a CLI owns its process's logging).
    Returns the handler.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    return handler
