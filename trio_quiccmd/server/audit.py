"""The audit log: every send and cancel through the HTTP API, who asked, and what came of it.

Each entry is written three ways: a log line (``Audit action=send actor=...``,
logger ``trio_quiccmd.audit``), a JSON line appended to ``<data_dir>/audit.jsonl``
(read back at start, so the API's view survives a restart), and an in-memory
ring of the newest ``max_entries`` that ``GET /api/audit`` pages through. The
file is never trimmed by the server: rotate it as any log (move it away; a new
one is started at the next entry).

Payloads are not recorded: they may hold secrets, and the command itself (by
``command_id``) has them for those allowed to read it.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import attrs

from ..logs import clip, quoted

logger = logging.getLogger("trio_quiccmd.audit")

AUDIT_FILE = "audit.jsonl"
DEFAULT_MAX_ENTRIES = 10_000

ACTIONS = ("send", "cancel")
OUTCOMES = ("accepted", "refused")


@attrs.frozen(kw_only=True)
class AuditEntry:
    #: Increasing within the file (continues from it after a restart; a file
    #: moved away starts the numbering again at 1).
    id: int
    #: Epoch seconds.
    at: float
    #: The API token's name; "anonymous" without one.
    actor: str
    action: str
    client_id: str | None
    command_type: str | None
    command_id: str | None
    outcome: str
    #: Why it was refused (an API error code), or None.
    error_code: str | None = None
    remote: str = ""

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _entry_from(document: Any) -> AuditEntry:
    """An entry read back from the file; ValueError/TypeError unless every
    field has its type (a hand-edited or damaged line must not stop a start)."""
    entry = AuditEntry(**document)
    if isinstance(entry.id, bool) or not isinstance(entry.id, int):
        raise ValueError("id must be an integer")
    if isinstance(entry.at, bool) or not isinstance(entry.at, (int, float)) or not 0 <= entry.at < _LATEST:
        raise ValueError("at must be a time (epoch seconds)")
    if entry.action not in ACTIONS or entry.outcome not in OUTCOMES:
        raise ValueError(f"action must be one of {ACTIONS}, outcome one of {OUTCOMES}")
    if not all(isinstance(v, str) for v in (entry.actor, entry.action, entry.outcome, entry.remote)):
        raise ValueError("actor, action, outcome and remote must be strings")
    if not all(v is None or isinstance(v, str)
               for v in (entry.client_id, entry.command_type, entry.command_id, entry.error_code)):
        raise ValueError("client_id, command_type, command_id and error_code must be strings or null")
    return entry


#: Past the last time the API can write (year 9999): a damaged "at" beyond it
#: would make every page of GET /api/audit fail.
_LATEST = 253402300800.0
#: Longest text an entry keeps of a caller-chosen value (the ids the API
#: takes are at most 256 characters; a URL's command id is any length).
MAX_FIELD = 256


def _clipped(text: str | None) -> str | None:
    return None if text is None else clip(text, MAX_FIELD)


def _value(text: str | None) -> str:
    """A caller-chosen value as a log token: quoted (escaped) when it has a
    space or a control character, so it can neither split its line's
    key=value pairs nor start a forged line."""
    if text is None:
        return "None"
    return text if text.isprintable() and " " not in text and text else quoted(text)


class AuditLog:
    """Records entries; answers queries newest first. File I/O is a short
    append per entry, done inline so the file's order is the entries' order."""

    def __init__(
        self,
        path: Path | None,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.path = path
        self._wall = wall_clock
        self._entries: collections.deque[AuditEntry] = collections.deque(maxlen=max_entries)
        self._next_id = 1
        # The file ends in part of a line (a crash or a full disk mid-write):
        # the next entry starts on a line of its own, not glued to it.
        self._torn_tail = False
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            # Bytes that are not UTF-8 (a damaged line) become U+FFFD and fail
            # as JSON below, instead of failing the start.
            with path.open("r", encoding="utf-8", errors="replace") as f:
                lines: Iterable[str] = collections.deque(f, maxlen=self._entries.maxlen)
        except FileNotFoundError:
            return
        self._torn_tail = bool(lines) and not lines[-1].endswith("\n")  # type: ignore[index]
        skipped = 0
        for line in lines:
            try:
                entry = _entry_from(json.loads(line))
            except (ValueError, TypeError, RecursionError):
                skipped += 1
                continue
            self._entries.append(entry)
            self._next_id = max(self._next_id, entry.id + 1)
        if skipped:
            logger.warning("Audit file lines not understood, skipped path=%s count=%d", path, skipped)
        logger.info("Audit log loaded path=%s entries=%d", path, len(self._entries))

    def record(
        self,
        *,
        actor: str,
        action: str,
        client_id: str | None,
        command_type: str | None,
        command_id: str | None,
        outcome: str,
        error_code: str | None = None,
        remote: str = "",
    ) -> AuditEntry:
        """Add an entry: in memory, to the file and as a log line. A value
        longer than :data:`MAX_FIELD` is kept cut there."""
        entry = AuditEntry(
            id=self._next_id, at=self._wall(), actor=actor, action=action,
            client_id=_clipped(client_id), command_type=_clipped(command_type),
            command_id=_clipped(command_id), outcome=outcome, error_code=error_code, remote=remote,
        )
        self._next_id += 1
        self._entries.append(entry)
        logger.info(
            "Audit action=%s actor=%s client_id=%s command_type=%s command_id=%s outcome=%s "
            "error_code=%s remote=%s",
            action, actor, _value(entry.client_id), _value(entry.command_type),
            _value(entry.command_id), outcome, error_code, remote or "-",
        )
        if self.path is not None:
            # Written, not fsync'd: an fsync per send would cost more than the
            # send; the entry survives a server crash, not a power cut.
            try:
                # O_APPEND: each line lands whole at the end, even if the file
                # was rotated (moved away) since the last entry.
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                with os.fdopen(fd, "a", encoding="utf-8") as f:
                    line = json.dumps(entry.to_json(), separators=(",", ":")) + "\n"
                    f.write("\n" + line if self._torn_tail else line)
                self._torn_tail = False
            except OSError as exc:
                # The log line above still holds the entry; refusing the
                # command over a full disk would take the fleet down with it.
                logger.error("Audit file not written path=%s error=%r", self.path, str(exc))
        return entry

    def query(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        client_id: str | None = None,
        command_id: str | None = None,
        outcome: str | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> tuple[list[AuditEntry], int | None]:
        """Matching entries, newest first, with ids below ``before``; and the
        cursor of the next page (None on the last)."""
        found: list[AuditEntry] = []
        for entry in reversed(self._entries):
            if before is not None and entry.id >= before:
                continue
            if (
                (actor is not None and entry.actor != actor)
                or (action is not None and entry.action != action)
                or (client_id is not None and entry.client_id != client_id)
                or (command_id is not None and entry.command_id != command_id)
                or (outcome is not None and entry.outcome != outcome)
            ):
                continue
            if len(found) == limit:
                return found, found[-1].id
            found.append(entry)
        return found, None
