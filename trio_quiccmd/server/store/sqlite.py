"""The SQLite store: the default, durable and embedded.

One writer: :meth:`SqliteStore.save` only notes the command's latest state
(several changes of one command before the next commit are one row write);
a writer task commits everything noted so far in one transaction, in a
worker thread, and starts on the next batch as soon as it is done. A busy
server therefore commits many status changes per transaction (and per
fsync) while an idle one commits each change at once. :meth:`flush` returns
when everything saved before it is committed: that is the durability point.

Reads run on a second connection in their own thread; SQLite's write-ahead
log lets them proceed while a batch is being written.

Open it with :func:`open_sqlite_store`, which closes it (after a last
commit) when its block ends; the writer task is :meth:`SqliteStore.run`,
which the :class:`~trio_quiccmd.server.manager.CommandManager` using the
store runs.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal, Sequence, TypeVar

import trio

from ...model import TERMINAL_STATUSES, Command, CommandStatus
from . import CommandPage, CommandQuery, StoreError, UnfinishedCommand, id_time_prefix
from .worker import ConnectionThread

logger = logging.getLogger("trio_quiccmd.store")

def _json_text_at(path: str, null: str) -> str:
    """SQL for the JSON text of ``body``'s value at ``path`` (``null`` for a
    JSON null): exactly as stored with the -> operator (SQLite 3.38+); before
    that, rebuilt from the value, which rounds a bare non-integer number (not
    one inside an array or object) to 15 significant digits."""
    if sqlite3.sqlite_version_info >= (3, 38):
        return f"CASE json_type(body, '{path}') WHEN 'null' THEN {null} ELSE body -> '{path}' END"
    return (
        f"CASE json_type(body, '{path}')"
        f" WHEN 'text' THEN json_quote(json_extract(body, '{path}'))"
        f" WHEN 'null' THEN {null} WHEN 'true' THEN 'true' WHEN 'false' THEN 'false'"
        f" ELSE CAST(json_extract(body, '{path}') AS TEXT) END"
    )


#: The schema, one script per version; a database at version N gets scripts
#: N+1... applied in one transaction at open. Never edit a released script:
#: add the next one.
MIGRATIONS: tuple[str, ...] = (
    # 1: the history. Each command's latest state as JSON, beside the columns
    # that lists filter and sort on; every list is "newest first", i.e. by
    # command_id descending, so each filter's index ends in command_id.
    """
    CREATE TABLE commands (
        command_id   TEXT PRIMARY KEY,
        client_id    TEXT NOT NULL,
        command_type TEXT NOT NULL,
        status       TEXT NOT NULL,
        completed_at REAL,
        body         TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX commands_by_client ON commands (client_id, command_id);
    CREATE INDEX commands_by_status ON commands (status, command_id);
    CREATE INDEX commands_by_type ON commands (command_type, command_id);
    CREATE INDEX commands_by_completion ON commands (completed_at)
        WHERE completed_at IS NOT NULL;
    """,
    # 2: what a restart needs to take unfinished commands up again: when the
    # manager ends each, and which agent instance an executing one went to.
    # Unfinished rows of a version-1 database get the deadline its rules gave.
    # And one agent's, or one type's, commands in one state ("what failed on
    # web-3?") without walking all of that agent's or type's history.
    """
    ALTER TABLE commands ADD COLUMN deadline_at REAL;
    ALTER TABLE commands ADD COLUMN sent_to TEXT NOT NULL DEFAULT '';
    UPDATE commands SET deadline_at = CASE status
        WHEN 'executing' THEN json_extract(body, '$.sent_at') + json_extract(body, '$.timeout')
        ELSE json_extract(body, '$.created_at')
            + max(json_extract(body, '$.timeout'), json_extract(body, '$.connect_timeout'))
        END
        WHERE completed_at IS NULL;
    CREATE INDEX commands_unfinished ON commands (command_id) WHERE completed_at IS NULL;
    CREATE INDEX commands_by_client_status ON commands (client_id, status, command_id);
    CREATE INDEX commands_by_type_status ON commands (command_type, status, command_id);
    """,
    # 3: a column per field instead of the whole command as JSON, so a state
    # change writes a few columns and encodes no JSON (the payload is encoded
    # once, the result once); and no partial indexes, two fewer b-trees to
    # update per write: retention walks the primary key (a command is
    # created before it finishes) and a restart finds unfinished commands
    # through the status index.
    f"""
    CREATE TABLE commands_v3 (
        command_id      TEXT PRIMARY KEY,
        client_id       TEXT NOT NULL,
        command_type    TEXT NOT NULL,
        status          TEXT NOT NULL,
        priority        INTEGER NOT NULL,
        timeout         REAL NOT NULL,
        connect_timeout REAL NOT NULL,
        created_at      REAL NOT NULL,
        sent_at         REAL,
        completed_at    REAL,
        deadline_at     REAL,
        sent_to         TEXT NOT NULL DEFAULT '',
        error           TEXT,
        error_code      TEXT,
        payload         TEXT NOT NULL,
        result          TEXT
    ) WITHOUT ROWID;
    INSERT INTO commands_v3 SELECT
        command_id, client_id, command_type, status,
        json_extract(body, '$.priority'), json_extract(body, '$.timeout'),
        json_extract(body, '$.connect_timeout'), json_extract(body, '$.created_at'),
        json_extract(body, '$.sent_at'), completed_at, deadline_at, sent_to,
        json_extract(body, '$.error'), json_extract(body, '$.error_code'),
        {_json_text_at("$.payload", null="'null'")},
        {_json_text_at("$.result", null="NULL")}
        FROM commands;
    DROP TABLE commands;
    ALTER TABLE commands_v3 RENAME TO commands;
    CREATE INDEX commands_by_client ON commands (client_id, command_id);
    CREATE INDEX commands_by_status ON commands (status, command_id);
    CREATE INDEX commands_by_type ON commands (command_type, command_id);
    CREATE INDEX commands_by_client_status ON commands (client_id, status, command_id);
    CREATE INDEX commands_by_type_status ON commands (command_type, status, command_id);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

#: Retention deletes in transactions that take about this long (seconds), so
#: that a save batch waiting behind one is not held up noticeably: a row's
#: cost varies manyfold with the store's size and the disk (a fixed 500 rows
#: took 45-75 ms at half a million rows with synchronous=full, 60 times
#: what a send's commit takes).
PURGE_BATCH_TIME = 0.01
#: Rows in the first retention transaction; each next one is fitted to
#: PURGE_BATCH_TIME by the last one's pace, growing at most twofold, within
#: PURGE_BATCH_RANGE: with fewer rows a transaction's own cost (its fsync)
#: would stretch the purge of a large backlog out many times over.
PURGE_BATCH = 100
PURGE_BATCH_RANGE = (50, 5000)
#: How long a statement waits for a lock another process holds, seconds.
BUSY_TIMEOUT = 2.0
#: Changes nobody waits for are committed at most this long (seconds) after
#: they are saved, or with the next commit someone waits for, or at once if
#: this many are already waiting when the writer task looks (at the first
#: change after a commit, and when a linger ends). A crash in between loses
#: only such changes, which the restart recovers: the command is still
#: executing, and its agent answers it again.
COMMIT_LINGER = 0.01
LINGER_BATCH = 1000
#: How many of the latest finished commands are also kept in memory.
RECENT_FINISHED = 4096
#: Longest aclose() spends on its last commit and closing, seconds.
CLOSE_TIMEOUT = 10.0
#: Longest a list waits for earlier changes to be committed, seconds.
LIST_FLUSH_WAIT = 2.0
#: After a failed commit (disk full, I/O error), wait this long and retry.
RETRY_DELAY = 1.0

Synchronous = Literal["full", "normal"]

#: A command's columns in the order rows are written and read.
_COLUMNS = (
    "command_id, client_id, command_type, status, priority, timeout, connect_timeout,"
    " created_at, sent_at, completed_at, error, error_code, payload, result, deadline_at, sent_to"
)
#: Most rows written by one statement (fewer where the SQLite library takes
#: fewer parameters: 999 before 3.32). Each statement steps once, and each
#: step gives up the GIL and then waits to take it back from the event loop:
#: executemany() steps once per row, and a commit of 200 rows took 15 ms that
#: way (74 us a row, against 17 us on an idle loop).
MAX_ROWS_PER_STATEMENT = 128
#: A batch of at most this many rows (what a server that is not busy
#: commits; at 16 commands in flight, 16 results and 16 new commands) is
#: written by one statement of exactly its size, without BEGIN and COMMIT:
#: one statement is one transaction, and two steps fewer are two waits fewer
#: for the GIL (at one command in flight, 10-20 % less time in the writer
#: thread). A larger batch is BEGIN, statements of MAX_ROWS_PER_STATEMENT and
#: of SMALL_BATCH rows, one of the rest, COMMIT. Only these sizes are ever
#: compiled (and cached by the connection): a statement's compiled form
#: grows with its rows; every size up to 32 holds under half a MiB, up to
#: 128 it would be 16 MiB.
SMALL_BATCH = 32
_COLUMN_COUNT = len(_COLUMNS.split(", "))
_ROW_VALUES = "(" + ", ".join("?" * _COLUMN_COUNT) + ")"
_UPSERT_TEMPLATE = f"""
    INSERT INTO commands ({_COLUMNS}) VALUES {{values}}
    ON CONFLICT (command_id) DO UPDATE SET
        status = excluded.status,
        sent_at = excluded.sent_at,
        completed_at = excluded.completed_at,
        error = excluded.error,
        error_code = excluded.error_code,
        result = excluded.result,
        deadline_at = excluded.deadline_at,
        sent_to = excluded.sent_to
"""
#: The columns a Command is made of (the first 14 of _COLUMNS).
_COMMAND_COLUMNS = _COLUMNS.rsplit(", deadline_at", 1)[0]
_UNFINISHED = tuple(status.value for status in CommandStatus if status not in TERMINAL_STATUSES)
_FINISHED = tuple(status.value for status in TERMINAL_STATUSES)
#: WHERE clauses for them (through the status index), with _UNFINISHED or _FINISHED as parameters.
_IS_UNFINISHED = f"status IN ({', '.join('?' * len(_UNFINISHED))})"
_IS_FINISHED = f"status IN ({', '.join('?' * len(_FINISHED))})"

_Entry = tuple[Command, float, str]
_Row = tuple[Any, ...]
_T = TypeVar("_T")


@functools.cache
def _upsert(rows: int) -> str:
    """The upsert of ``rows`` rows (compiled once per size by the connection)."""
    return _UPSERT_TEMPLATE.format(values=", ".join([_ROW_VALUES] * rows))


def _values(rows: list[_Row]) -> list[Any]:
    return [value for row in rows for value in row]


#: One encoder for every row (json.dumps with options builds one per call).
_json = json.JSONEncoder(separators=(",", ":")).encode


def _text(value: str | None) -> str | None:
    """``value`` as SQLite can store it: a lone surrogate (which JSON input can
    carry) cannot be encoded as UTF-8, and would fail the whole batch."""
    if value is None:
        return None
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode()
    return value


class _DamagedRow(Exception):
    """A row not as the store writes them (damaged): made a :class:`StoreError`
    by :meth:`SqliteStore._read`, which knows the store's path."""

    def __init__(self, command_id: Any, reason: str):
        super().__init__(command_id, reason)
        self.command_id = command_id
        self.reason = reason


def _decoded(command_id: Any, column: str, decode: Callable[[Any], _T], value: Any) -> _T:
    try:
        return decode(value)
    except (ValueError, TypeError) as exc:
        raise _DamagedRow(command_id, f"{column}: {exc}") from None


def _command(row: Sequence[Any]) -> Command:
    (command_id, client_id, command_type, status, priority, timeout, connect_timeout,
     created_at, sent_at, completed_at, error, error_code, payload, result) = row[:14]
    return Command(
        command_id=command_id,
        client_id=client_id,
        command_type=command_type,
        payload=_decoded(command_id, "payload", json.loads, payload),
        status=_decoded(command_id, "status", CommandStatus, status),
        result=None if result is None else _decoded(command_id, "result", json.loads, result),
        error=error,
        error_code=error_code,
        priority=priority,
        timeout=timeout,
        connect_timeout=connect_timeout,
        created_at=created_at,
        sent_at=sent_at,
        completed_at=completed_at,
    )


class SqliteStore:
    """Commands in a SQLite database file. See the module docstring."""

    durable = True

    def __init__(
        self,
        path: Path,
        writer: sqlite3.Connection,
        reader: sqlite3.Connection,
        lock_file: int,
    ):
        self.path = path
        self._writer = writer
        self._reader = reader
        self._lock_file = lock_file
        # Each connection's calls run in a thread of its own, never on the event loop.
        self._write_thread = ConnectionThread("quiccmd-store-writer")
        self._read_thread = ConnectionThread("quiccmd-store-reader")
        # Saved, not yet being written; then the batch being written.
        self._dirty: dict[str, _Entry] = {}
        self._dirty_since = 0.0  # when the oldest of them was saved (trio clock)
        self._writing: dict[str, _Entry] = {}
        # The latest finished commands, committed: "send, then look it up"
        # (a wait that starts after the command finished, a GET right after)
        # is answered without a read in a worker thread.
        self._recent: OrderedDict[str, Command] = OrderedDict()
        # Unfinished commands' payloads as stored, so that each is encoded once.
        self._payload_json: dict[str, str] = {}
        self._saves = 0
        self._committed_saves = 0
        self._dirty_event = trio.Event()
        self._committing = False
        # The last commit failed; the writer task retries until one succeeds.
        self._failing = False
        # Set (and replaced) at the end of each commit, however it ended:
        # whoever waits for one looks again at what is left to do.
        self._commit_ended = trio.Event()
        self._closed = False
        self._write_error: Exception | None = None  # of the last write that failed
        self._purge_batch = PURGE_BATCH

    # -- writing -----------------------------------------------------------------

    @property
    def unwritten(self) -> int:
        return len(self._dirty) + len(self._writing)

    def save(self, command: Command, *, deadline_at: float = 0.0, sent_to: str = "") -> None:
        if self._closed:
            raise StoreError(f"the command store {self.path} is closed")
        if not self._dirty:
            self._dirty_since = trio.current_time()
            self._dirty_event.set()
        self._dirty[command.command_id] = (command, deadline_at, sent_to)
        self._saves += 1

    async def flush(self) -> None:
        """Return once everything saved before the call is committed.

        Group commit with a leader: if no commit is under way, the caller
        commits everything saved so far itself, with no hand-off to the
        writer task; otherwise it waits for that commit, and leads the next
        one if its saves came too late for it. While the store fails to
        write, the writer task retries and callers wait. If cancelled while
        leading, the batch is kept and committed by the next commit.
        """
        target = self._saves
        while self._committed_saves < target:
            if self._committing or self._failing:
                await self._commit_ended.wait()
            else:
                await self._commit_dirty()  # if it fails, the writer task retries

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit the changes nobody flushes, and retry failed commits, until
        cancelled.

        If cancelled while a batch is being written, the thread is abandoned
        (a disk that hangs must not hold a shutdown) and the batch is kept,
        with what is saved later, for :meth:`aclose`.
        """
        task_status.started()
        while True:
            await self._dirty_event.wait()
            self._dirty_event = trio.Event()
            while self._dirty:
                if self._committing:
                    await self._commit_ended.wait()  # a flush's; then see what is left
                    continue
                if self._failing:
                    await trio.sleep(RETRY_DELAY)
                else:
                    # Nobody waits for these changes (a result, a state
                    # change): let them join the next flush's commit, or
                    # gather for a moment, rather than paying a commit each.
                    # Woken by the clock only: not by each save or commit.
                    due = self._dirty_since + COMMIT_LINGER
                    if len(self._dirty) < LINGER_BATCH and trio.current_time() < due:
                        await trio.sleep_until(due)
                        continue  # a flush may have committed them meanwhile
                if not self._committing and self._dirty:
                    await self._commit_dirty()

    async def _commit_dirty(self) -> bool:
        """Commit everything saved so far; False (and kept for a retry) if that failed."""
        batch, self._dirty = self._dirty, {}
        target = self._saves
        self._writing = batch
        self._committing = True
        try:
            # Made here, on the event loop: the thread then only waits for the
            # disk, and does not compete with the loop for the GIL meanwhile.
            rows = self._rows(batch)
            # Abandoned if cancelled (a shutdown must not wait for a disk that
            # hangs): later writes queue behind it in the thread, and the
            # batch is kept for aclose, whose writes are idempotent.
            await self._write_thread.run(self._write, rows)
        except Exception as exc:
            # sqlite3 errors (disk full, I/O); anything else is a bug, which
            # must not stop the writer, and with it the server.
            logger.error(
                "Command store write failed path=%s commands=%d error=%r; retrying",
                self.path, len(batch), f"{type(exc).__name__}: {exc}",
            )
            self._keep_for_retry(batch)
            self._failing = True
            self._write_error = exc
            return False
        except BaseException:
            # Cancelled: not written, or (abandoned) not known to be.
            self._keep_for_retry(batch)
            raise
        finally:
            self._writing = {}
            self._committing = False
            ended, self._commit_ended = self._commit_ended, trio.Event()
            ended.set()
        self._committed_saves = target
        self._failing = False
        recent = self._recent
        for command, _deadline_at, _sent_to in batch.values():
            if command.is_terminal:
                recent[command.command_id] = command
        while len(recent) > RECENT_FINISHED:
            recent.popitem(last=False)
        return True

    def _keep_for_retry(self, batch: dict[str, _Entry]) -> None:
        # A newer save of the same command (made while this batch was being
        # written) wins over the one that was not written.
        for command_id, entry in batch.items():
            self._dirty.setdefault(command_id, entry)
        if self._dirty:
            self._dirty_event.set()

    def _rows(self, batch: dict[str, _Entry]) -> list[_Row]:
        rows = []
        payloads = self._payload_json
        for command_id, (command, deadline_at, sent_to) in batch.items():
            finished = command.is_terminal
            try:
                payload = payloads.pop(command_id, None) if finished else payloads.get(command_id)
                if payload is None:
                    payload = _json(command.payload)
                    if not finished:
                        payloads[command_id] = payload
                result = None if command.result is None else _json(command.result)
            except Exception:
                # Payloads and results are checked to be JSON before they get
                # here, so this is a bug upstream: keep the rest of the batch,
                # and the writer (and with it the server) running.
                logger.exception("Command not stored command_id=%s", command_id)
                continue
            rows.append((
                command_id,
                # Both checked printable (so valid UTF-8) when the command was
                # made, and the priority to fit 32 bits; errors, their codes
                # and instance ids come from agents.
                command.client_id,
                command.command_type,
                command.status.value,
                command.priority,
                command.timeout,
                command.connect_timeout,
                command.created_at,
                command.sent_at,
                command.completed_at,
                _text(command.error),
                _text(command.error_code),
                payload,
                result,
                None if finished else deadline_at,
                _text(sent_to),
            ))
        return rows

    def _write(self, rows: list[_Row]) -> None:
        db = self._writer
        if db.in_transaction:
            # Left open by an earlier failure whose ROLLBACK failed too: these
            # rows would join it, and never be committed.
            db.execute("ROLLBACK")
        if len(rows) <= SMALL_BATCH:
            if rows:  # (none if every command of the batch failed to encode)
                db.execute(_upsert(len(rows)), _values(rows))
            return
        most = min(MAX_ROWS_PER_STATEMENT, db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _COLUMN_COUNT)
        db.execute("BEGIN IMMEDIATE")
        try:
            start = 0
            for size in (most, SMALL_BATCH):
                while len(rows) - start >= size:
                    db.execute(_upsert(size), _values(rows[start:start + size]))
                    start += size
            if start < len(rows):
                db.execute(_upsert(len(rows) - start), _values(rows[start:]))
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    # -- reading -----------------------------------------------------------------

    async def get(self, command_id: str) -> Command | None:
        entry = self._dirty.get(command_id) or self._writing.get(command_id)
        if entry is not None:
            return entry[0]
        recent = self._recent.get(command_id)
        if recent is not None:
            return recent
        return await self._read(self._get, command_id)

    async def _read(self, read: Callable[..., _T], *args: Any) -> _T:
        """Run ``read`` on the reading connection, in its thread. A damaged
        database raises :class:`StoreError` with the message the server
        gives at start, rather than a bare sqlite3 error."""
        if self._closed:
            raise StoreError(f"the command store {self.path} is closed")
        try:
            return await self._read_thread.run(read, *args)
        except sqlite3.Error as exc:
            raise StoreError(_describe(self.path, exc)) from None
        except _DamagedRow as exc:
            # Quoted (repr) as SQL quotes it: a damaged id is shown on one
            # line, and the operator can paste it into a DELETE.
            raise StoreError(
                f"the command store {self.path} is damaged: the row of command {exc.command_id!r}"
                f" cannot be read ({exc.reason}); {_RESTORE}"
            ) from None

    def _get(self, command_id: str) -> Command | None:
        row = self._reader.execute(
            f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE command_id = ?", (command_id,)
        ).fetchone()
        return None if row is None else _command(row)

    async def list(self, query: CommandQuery) -> CommandPage:
        # Commit first, so the list shows every change made before it was
        # asked; but a store failing to write still answers from what it has.
        with trio.move_on_after(LIST_FLUSH_WAIT):
            await self.flush()
        return await self._read(self._list, query)

    def _list(self, query: CommandQuery) -> CommandPage:
        sql, parameters = list_statement(query)
        rows = self._reader.execute(sql, parameters).fetchall()
        commands = [_command(row) for row in rows[: query.limit]]
        more = len(rows) > query.limit
        return CommandPage(commands, commands[-1].command_id if more else None)

    async def unfinished(self) -> list[UnfinishedCommand]:
        # Commit what is saved here rather than wait for the writer task:
        # this is called at start, before the manager runs it. But not beside
        # a flush's commit: this one's end would count that one's saves as
        # committed even if it failed.
        while self._committing:
            await self._commit_ended.wait()
        if self._dirty:
            await self._commit_dirty()
        return await self._read(self._unfinished)

    def _unfinished(self) -> list[UnfinishedCommand]:
        rows = self._reader.execute(
            f"SELECT {_COLUMNS} FROM commands WHERE {_IS_UNFINISHED} ORDER BY command_id",
            _UNFINISHED,
        ).fetchall()
        return [UnfinishedCommand(_command(row), row[14] or 0.0, row[15]) for row in rows]

    # -- retention ---------------------------------------------------------------

    async def purge(self, *, finished_before: float, keep_at_most: int) -> int:
        """Delete in transactions of about :data:`PURGE_BATCH_TIME` each, so
        that save batches get their turn in between; by count, the oldest (first
        created) finished commands go first. If cancelled, what was deleted
        stays deleted."""
        await self.flush()  # judge the commands by their latest state
        deleted = 0
        # By age. A command finishes after it is created, so those finished
        # before the cutoff were created before it: a walk of the primary key
        # from its oldest end, with no index on completion to keep up.
        by_age = ("command_id < ? AND completed_at < ?", (id_time_prefix(finished_before), finished_before))
        while True:
            limit = self._purge_batch
            count = await self._delete_oldest_finished(*by_age, limit)
            deleted += count
            if count < limit:
                break
        # By count: counted once, on the reading connection (no write lock held).
        over = await self._read(self._count_finished) - keep_at_most
        while over > 0:
            count = await self._delete_oldest_finished(
                "completed_at IS NOT NULL", (), min(over, self._purge_batch)
            )
            deleted += count
            over -= count
            if count == 0:
                break
        return deleted

    async def _delete_oldest_finished(self, where: str, parameters: tuple, limit: int) -> int:
        try:
            count, took = await self._write_thread.run(
                _timed, self._delete_oldest, where, parameters, limit
            )
        finally:
            # The cache may hold some of them; forget it at once, also if a
            # later batch fails (then the purge ends with an error).
            self._recent.clear()
        if count == limit:
            # Timed in the thread: the wait behind save batches is not the
            # rows' cost. (A purge's last, partial, batch says little of
            # the pace, and would start the next purge small again.)
            low, high = PURGE_BATCH_RANGE
            fitted = int(count * PURGE_BATCH_TIME / max(took, 1e-6))
            self._purge_batch = max(low, min(high, 2 * self._purge_batch, fitted))
        return count

    def _delete_oldest(self, where: str, parameters: tuple, limit: int) -> int:
        db = self._writer
        db.execute("BEGIN IMMEDIATE")
        try:
            deleted = db.execute(
                "DELETE FROM commands WHERE command_id IN (SELECT command_id FROM commands"
                f" WHERE {where} ORDER BY command_id LIMIT ?)",
                (*parameters, limit),
            ).rowcount
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        return deleted

    def _count_finished(self) -> int:
        return self._reader.execute(
            f"SELECT count(*) FROM commands WHERE {_IS_FINISHED}", _FINISHED,
        ).fetchone()[0]

    # -- closing -----------------------------------------------------------------

    async def aclose(self) -> None:
        """Commit what is still saved, then close the database.

        Runs shielded, so a cancelled caller still leaves nothing unwritten,
        but for at most :data:`CLOSE_TIMEOUT` seconds, retrying a commit that
        fails meanwhile because another process holds the database: a store
        whose disk hangs is left behind (logged) rather than holding the
        shutdown, and closed whenever its stuck write ends.
        """
        if self._closed:
            return
        deadline = trio.current_time() + CLOSE_TIMEOUT
        write_failed = False  # the last attempt failed (was not cut off in its write)
        with trio.move_on_at(deadline, shield=True) as committing:
            while self._dirty or self._committing:
                if self._committing:
                    # A flush's: a commit beside it would count that one's
                    # saves as committed even if it failed.
                    await self._commit_ended.wait()
                    continue
                write_failed = False
                if await self._commit_dirty():
                    continue
                write_failed = True
                if not _may_pass(self._write_error):
                    break  # a full disk, a read-only file: waiting would only hold the shutdown
                await trio.sleep(RETRY_DELAY)
        self._closed = True
        unwritten = len(self._dirty)
        # Each connection closed by its own thread, behind the jobs it still
        # has, also when the time is up: a read abandoned by its cancelled
        # caller may still be running, and closing its connection under it
        # crashed the process (a segfault in sqlite3); and a write stuck on a
        # disk that hangs is followed by the close of the writer and of the
        # lock file, so that the store can be opened again once it ends.
        closes = [
            self._read_thread.submit(self._reader.close),
            self._write_thread.submit(self._close),
        ]
        # The threads end once their jobs are done (a stuck one, never: they
        # are daemons, and do not hold the process's exit).
        self._write_thread.stop()
        self._read_thread.stop()
        closed = False
        if not committing.cancelled_caught:
            with trio.move_on_at(deadline, shield=True):
                for close in closes:
                    await close.result()
                closed = True
        if unwritten and write_failed:
            logger.error(
                "Command store closed with changes it could not write path=%s lost=%d",
                self.path, unwritten,
            )
        elif not closed:
            # A write (or a read) still in its thread: a disk that hangs.
            logger.error(
                "Command store did not close in time path=%s unwritten=%d", self.path, unwritten,
            )

    def _close(self) -> None:
        try:
            self._writer.execute("PRAGMA optimize")
        except sqlite3.Error:
            pass  # only statistics for the query planner; the data is committed
        self._writer.close()
        os.close(self._lock_file)


def _timed(fn: Callable[..., _T], *args: Any) -> tuple[_T, float]:
    """``fn(*args)`` and how long it took, seconds."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def _may_pass(error: Exception | None) -> bool:
    """Whether a failed write may succeed if tried again within seconds:
    another process holds the database."""
    return isinstance(error, sqlite3.OperationalError) and _held_elsewhere(str(error))


def _held_elsewhere(text: str) -> bool:
    """Whether sqlite3's error ``text`` says another process holds the database."""
    return "locked" in text or "busy" in text


def _rollback(db: sqlite3.Connection) -> None:
    # A failed COMMIT may already have rolled back (then ROLLBACK would raise
    # and hide the real error).
    if db.in_transaction:
        db.execute("ROLLBACK")


def list_statement(query: CommandQuery) -> tuple[str, list[Any]]:
    """The SELECT for ``query``: one row more than the page, to know if there is a next."""
    clauses: list[str] = []
    parameters: list[Any] = []
    for column, value in (
        ("client_id", query.client_id),
        ("status", None if query.status is None else query.status.value),
        ("command_type", query.command_type),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            parameters.append(value)
    low, high = query.id_range()
    if low is not None:
        clauses.append("command_id >= ?")
        parameters.append(low)
    if high is not None:
        clauses.append("command_id < ?")
        parameters.append(high)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    # One agent's commands are few next to those of a type or a state, but
    # without statistics the planner cannot know: with a million rows it
    # picked the type index for client + type + time and walked 33,000 rows.
    if query.client_id is None:
        both = query.command_type is not None and query.status is not None
        index = " INDEXED BY commands_by_type_status" if both else ""
    elif query.status is not None:
        index = " INDEXED BY commands_by_client_status"
    else:
        index = " INDEXED BY commands_by_client"
    parameters.append(query.limit + 1)
    return (
        f"SELECT {_COMMAND_COLUMNS} FROM commands{index}{where} ORDER BY command_id DESC LIMIT ?",
        parameters,
    )


# -- opening ---------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: a statement outside BEGIN ... COMMIT is a transaction
    # of its own. Used from the connection's own thread, one call at a time.
    return sqlite3.connect(
        path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
    )


def _lock(path: Path) -> int:
    """Hold an exclusive lock on ``<db>.lock`` beside the file ``path``
    resolves to, for as long as the store is open, so two servers never
    share one database: not under another name either (a symlink; a hard
    link is refused by :func:`_open`), nor with a server of an earlier
    version, which locks the same file. The holder's pid is written in it.

    A file of its own, not the database: closing any descriptor of the
    database would drop the locks SQLite holds on it in this process.
    """
    lock_path = Path(os.path.realpath(path) + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(
            f"cannot write the command store's lock file {lock_path}: {exc.strerror or exc}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(
            f"the command store {path} is in use by another server (pid {holder}, lock file {lock_path})"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"cannot lock the command store {path}: {exc.strerror or exc}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError as exc:
        os.close(fd)  # and with it the lock: a retry here must not find it "in use"
        raise StoreError(
            f"cannot write the command store's lock file {lock_path}: {exc.strerror or exc}"
        ) from None
    return fd


def migrate(db: sqlite3.Connection, path: Path) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`; returns the version found."""
    db.execute("BEGIN IMMEDIATE")
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the command store {path} has schema version {version}, newer than this "
                f"server knows ({SCHEMA_VERSION}); upgrade trio_quiccmd or choose another --store"
            )
        if version == 0:
            tables = db.execute(
                "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
            ).fetchone()[0]
            if tables:
                raise StoreError(
                    f"{path} is an SQLite database but not a trio_quiccmd command store "
                    "(it has tables and no schema version)"
                )
        for script in MIGRATIONS[version:]:
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise
    return version


def _open(path: Path, synchronous: Synchronous) -> SqliteStore:
    # Payloads and results may be secrets: only the server's user reads them.
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot open the command store {path}: {exc.strerror or exc}") from None
    lock_file = _lock(path)
    writer = reader = None
    try:
        try:
            # A new database is created 0600; SQLite gives its -wal and -shm
            # files the same mode. An existing file keeps the mode it was given.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            links = os.stat(path).st_nlink
        except OSError as exc:
            raise StoreError(f"cannot open the command store {path}: {exc.strerror or exc}") from None
        if links > 1:
            # Another name for the same file would have a lock file of its
            # own, and SQLite itself cannot lock such a file reliably.
            raise StoreError(
                f"the command store {path} has {links} hard links; give it one name (copy it, "
                "with the server stopped, and remove the other names)"
            )
        writer = _connect(path)
        (mode,) = writer.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise StoreError(f"the command store {path} cannot use write-ahead logging (mode {mode})")
        writer.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        found = migrate(writer, path)
        reader = _connect(path)
        reader.execute("PRAGMA query_only = ON")
    except BaseException as exc:
        for db in (reader, writer):
            if db is not None:
                db.close()
        os.close(lock_file)
        if isinstance(exc, sqlite3.Error):
            raise StoreError(_describe(path, exc)) from None
        raise
    if found != SCHEMA_VERSION:
        logger.info(
            "Command store migrated path=%s from_version=%d to_version=%d", path, found, SCHEMA_VERSION
        )
    return SqliteStore(path, writer, reader, lock_file)


_RESTORE = "restore it from a backup or move it away to start with an empty history"


def _describe(path: Path, error: sqlite3.Error) -> str:
    text = str(error)
    damaged_row = text.startswith("Could not decode to UTF-8 column ")
    if damaged_row:
        # sqlite3 quotes the row's text whole: any length, any line breaks,
        # any words (a "locked" among them).
        text = text.split(" with text ", 1)[0]
    elif _held_elsewhere(text):
        return f"the command store {path} is locked by another process ({text})"
    if damaged_row or "not a database" in text or "malformed" in text or "corrupt" in text:
        return f"the command store {path} is not a readable database ({text}); {_RESTORE}"
    return f"cannot open the command store {path}: {text}"


@asynccontextmanager
async def open_sqlite_store(
    path: Path | str, *, synchronous: Synchronous = "full"
) -> AsyncIterator[SqliteStore]:
    """Open (creating and migrating as needed) the store at ``path`` for the
    block; then commit what is left and close it.

    ``synchronous="full"`` makes each commit survive a power loss;
    ``"normal"`` only a crash of the process (faster: no fsync per commit).
    Raises :class:`StoreError` if the file is corrupt, locked, in use by
    another server, or of a newer schema. If cancelled, the last commit still
    happens (shielded).
    """
    if synchronous not in ("full", "normal"):
        raise ValueError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
    store = await trio.to_thread.run_sync(_open, Path(path), synchronous)
    try:
        yield store
    finally:
        await store.aclose()
