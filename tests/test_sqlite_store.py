"""The SQLite store on its own: what it keeps, how it lists, how it refuses bad files."""

from __future__ import annotations

import json
import os
import random
import threading
import sqlite3
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Callable

import attrs
import pytest
import trio

import trio.testing

from trio_quiccmd.model import Command, CommandStatus, transition
from trio_quiccmd.server.store import CommandQuery, MemoryStore, StoreError
from trio_quiccmd.server.store import sqlite as sqlite_store
from trio_quiccmd.server.store.sqlite import SqliteStore, list_statement, open_sqlite_store

from .conftest import wait_until

T0 = 1_800_000_000.0


def make_command(
    n: int,
    *,
    client_id: str = "c1",
    command_type: str = "echo",
    created_at: float | None = None,
    status: CommandStatus = CommandStatus.PENDING,
) -> Command:
    created_at = T0 + n if created_at is None else created_at
    command = Command(
        command_id=f"{int(created_at * 1000):012x}-{n:08x}-0000abcd",
        client_id=client_id,
        command_type=command_type,
        payload={"n": n, "text": "é"},
        created_at=created_at,
    )
    if status is not CommandStatus.PENDING:
        command = transition(command, CommandStatus.EXECUTING, at=created_at + 0.1)
    if status.is_terminal:
        command = transition(
            command, status, at=created_at + 0.2, result={"n": n} if status is CommandStatus.COMPLETED else None
        )
    return command


def before_each_write(monkeypatch, step: Callable[[list], object]) -> None:
    """Run ``step(rows)`` in the writer thread before each write of rows; an
    exception it raises fails that write, as a disk's error would."""
    original = SqliteStore._write

    def write(self: SqliteStore, rows: list) -> object:
        step(rows)
        return original(self, rows)

    monkeypatch.setattr(SqliteStore, "_write", write)


@asynccontextmanager
async def running(path: Path, **options) -> AsyncIterator[SqliteStore]:
    """An open store with its writer running, as a manager would run it."""
    async with open_sqlite_store(path, **options) as store:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            yield store
            nursery.cancel_scope.cancel()


async def test_saved_commands_survive_reopening(tmp_path):
    path = tmp_path / "commands.db"
    commands = [make_command(n, status=CommandStatus.COMPLETED) for n in range(10)]
    async with running(path) as store:
        for command in commands:
            store.save(command)
        await store.flush()
    async with running(path) as store:
        for command in commands:
            assert await store.get(command.command_id) == command
        assert await store.get("nope") is None


async def test_saves_left_at_close_are_committed(tmp_path):
    path = tmp_path / "commands.db"
    async with open_sqlite_store(path) as store:
        # No writer running, no flush: closing must still write it.
        store.save(make_command(1))
    async with running(path) as store:
        assert (await store.get(make_command(1).command_id)) == make_command(1)


async def test_the_latest_save_of_a_command_wins(tmp_path):
    async with running(tmp_path / "c.db") as store:
        pending = make_command(1)
        executing = transition(pending, CommandStatus.EXECUTING, at=T0 + 1)
        done = transition(executing, CommandStatus.COMPLETED, at=T0 + 2, result={"ok": True})
        store.save(pending)
        store.save(executing)
        # Visible before it is committed.
        assert await store.get(pending.command_id) == executing
        store.save(done)
        await store.flush()
        assert await store.get(pending.command_id) == done
        page = await store.list(CommandQuery())
        assert page.commands == [done]


async def test_many_saves_are_committed_in_few_transactions(tmp_path, monkeypatch):
    transactions = []
    before_each_write(monkeypatch, lambda rows: transactions.append(len(rows)))
    async with running(tmp_path / "c.db") as store:
        for n in range(2000):
            store.save(make_command(n))
        await store.flush()
        assert sum(transactions) == 2000
        assert len(transactions) <= 3, transactions
        assert len((await store.list(CommandQuery(limit=1000))).commands) == 1000


@pytest.mark.parametrize("size", [1, 2, 32, 33, 128, 161, 300])
async def test_a_batch_of_any_size_is_stored_whole(tmp_path, size):
    # One statement up to SMALL_BATCH rows, several in one transaction
    # beyond: every row is stored, with its own values.
    async with running(tmp_path / "c.db") as store:
        saved = [make_command(n, status=CommandStatus.COMPLETED) for n in range(size)]
        for command in saved:
            store.save(command)
        await store.flush()
    async with running(tmp_path / "c.db") as store:
        page = await store.list(CommandQuery(limit=1000))
    assert sorted(page.commands, key=lambda c: c.command_id) == saved


async def test_batches_fit_a_sqlite_that_takes_fewer_parameters(tmp_path):
    # SQLite before 3.32 takes at most 999 parameters per statement; a
    # statement of 128 rows has 2,048, and would fail every commit.
    async with running(tmp_path / "c.db") as store:
        store._writer.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        for n in range(300):
            store.save(make_command(n))
        with trio.fail_after(5):
            await store.flush()
        assert len((await store.list(CommandQuery(limit=1000))).commands) == 300


async def test_a_transaction_left_open_by_a_failure_does_not_swallow_later_commits(tmp_path):
    # A failed write whose ROLLBACK failed too leaves the writer inside a
    # transaction; a later batch must still be committed, not join it.
    path = tmp_path / "c.db"
    async with running(path) as store:
        store._writer.execute("BEGIN")
        for n in range(5):
            store.save(make_command(n))
        await store.flush()
        db = sqlite3.connect(path)
        assert db.execute("SELECT count(*) FROM commands").fetchone() == (5,)
        db.close()


@pytest.mark.parametrize("size", [100, 300])
async def test_a_batch_that_fails_part_way_stores_none_of_it(tmp_path, monkeypatch, size):
    # Its last row is refused (by a trigger standing in for a disk error):
    # the rows before it, in the same statement or in earlier ones, are not
    # committed either; once the cause is gone, the retry stores them all.
    monkeypatch.setattr(sqlite_store, "RETRY_DELAY", 0.2)
    path = tmp_path / "c.db"
    async with running(path):
        pass
    saved = [make_command(n) for n in range(size)]
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TRIGGER refuse_last BEFORE INSERT ON commands "
        f"WHEN NEW.command_id = '{saved[-1].command_id}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    db.commit()
    async with running(path) as store:
        for command in saved:
            store.save(command)
        with trio.move_on_after(0.1):
            await store.flush()  # fails, and waits for the retry
        assert store.unwritten == size
        assert db.execute("SELECT count(*) FROM commands").fetchone() == (0,)
        db.execute("DROP TRIGGER refuse_last")
        db.commit()
        with trio.fail_after(5):
            await store.flush()
        assert db.execute("SELECT count(*) FROM commands").fetchone() == (size,)
    db.close()


def _corpus() -> list[Command]:
    rng = random.Random(7)
    statuses = list(CommandStatus)
    return [
        make_command(
            n,
            client_id=rng.choice(["c1", "c2", "c3"]),
            command_type=rng.choice(["echo", "sleep"]),
            status=rng.choice(statuses),
        )
        for n in range(300)
    ]


QUERIES = [
    CommandQuery(),
    CommandQuery(limit=7),
    CommandQuery(client_id="c2", limit=13),
    CommandQuery(status=CommandStatus.TIMEOUT, limit=5),
    CommandQuery(command_type="sleep", status=CommandStatus.COMPLETED, limit=4),
    CommandQuery(client_id="c1", command_type="echo", status=CommandStatus.PENDING, limit=3),
    CommandQuery(created_after=T0 + 100, created_before=T0 + 200, limit=9),
    CommandQuery(client_id="c3", created_after=T0 + 250.5, limit=50),
    CommandQuery(client_id="nobody"),
]


@pytest.mark.parametrize("query", QUERIES, ids=repr)
async def test_lists_match_the_memory_store_page_by_page(tmp_path, query):
    corpus = _corpus()
    memory = MemoryStore()
    async with running(tmp_path / "c.db") as store:
        for command in corpus:
            memory.save(command)
            store.save(command)
        pages = 0
        expected_page = await memory.list(query)
        while True:
            page = await store.list(query)
            assert page == expected_page
            pages += 1
            if page.next_cursor is None:
                break
            query = CommandQuery(**{**_fields(query), "cursor": page.next_cursor})
            expected_page = await memory.list(query)
        if query.client_id is None and query.status is None and query.created_after is None:
            assert pages > 1


def _fields(query: CommandQuery) -> dict:
    return {
        name: getattr(query, name)
        for name in ("client_id", "status", "command_type", "created_after", "created_before", "limit")
    }


async def test_time_filters_select_by_creation_time(tmp_path):
    async with running(tmp_path / "c.db") as store:
        for n in range(10):
            store.save(make_command(n))
        page = await store.list(CommandQuery(created_after=T0 + 3, created_before=T0 + 6))
        assert [c.created_at for c in page.commands] == [T0 + 5, T0 + 4, T0 + 3]


@pytest.mark.parametrize(
    "query",
    [q for q in QUERIES if q != CommandQuery() and q != CommandQuery(limit=7)]
    + [CommandQuery(cursor="0001a0000000")],
    ids=repr,
)
async def test_every_filtered_list_searches_an_index_and_never_sorts(tmp_path, query):
    async with running(tmp_path / "c.db") as store:
        store.save(make_command(1))
        await store.flush()
    db = sqlite3.connect(tmp_path / "c.db")
    sql, parameters = list_statement(query)
    plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, parameters))
    db.close()
    assert "SEARCH commands USING" in plan, plan
    assert "TEMP B-TREE" not in plan, plan


async def test_purge_deletes_old_and_excess_finished_commands_only(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "PURGE_BATCH", 50)
    async with running(tmp_path / "c.db") as store:
        old = [make_command(n, status=CommandStatus.COMPLETED) for n in range(120)]
        unfinished = [make_command(n, status=CommandStatus.EXECUTING) for n in range(120, 130)]
        recent = [make_command(n, status=CommandStatus.FAILED) for n in range(130, 200)]
        for command in old + unfinished + recent:
            store.save(command)
        # By age: everything finished before T0 + 120.
        assert await store.purge(finished_before=T0 + 120, keep_at_most=1000) == 120
        # By count: keep the 30 most recently finished.
        assert await store.purge(finished_before=0, keep_at_most=30) == 40
        left = (await store.list(CommandQuery(limit=1000))).commands
        assert {c.command_id for c in left} == {
            c.command_id for c in unfinished + recent[40:]
        }


async def test_retention_on_a_slow_disk_deletes_in_transactions_that_keep_to_the_time_budget(
    tmp_path, monkeypatch
):
    # Found in review: 500 rows a transaction took 45-75 ms at half a million
    # rows, and a send's commit waiting behind each went from 1 ms to 43 ms.
    # Here a row costs 0.1 ms to delete: 10 ms is 100 rows.
    transactions = []
    original = SqliteStore._delete_oldest

    def slow_disk(self, where, parameters, limit):
        deleted = original(self, where, parameters, limit)
        time.sleep(deleted * 0.0001)
        transactions.append(deleted)
        return deleted

    monkeypatch.setattr(SqliteStore, "_delete_oldest", slow_disk)
    async with running(tmp_path / "c.db") as store:
        for n in range(1500):
            store.save(make_command(n, status=CommandStatus.COMPLETED))
        store.save(make_command(2000))
        assert await store.purge(finished_before=T0 + 1000, keep_at_most=100) == 1400
        assert sum(transactions) == 1400
        assert max(transactions) <= 100, transactions
        assert len((await store.list(CommandQuery(limit=1000))).commands) == 101


async def test_both_stores_purge_the_oldest_created_finished_commands_first(tmp_path):
    # Found in review: the memory store purged by count in the order commands
    # finished; the documented order (and the SQLite store's) is by creation.
    # Here the older a command, the later it finished.
    def finished_late(n: int) -> Command:
        executing = make_command(n, status=CommandStatus.EXECUTING)
        return transition(executing, CommandStatus.COMPLETED, at=T0 + 100 - n, result=None)

    commands = [finished_late(n) for n in range(1, 7)] + [make_command(7)]
    survivors = {}
    memory = MemoryStore()
    async with running(tmp_path / "c.db") as sqlite:
        for store in (memory, sqlite):
            for n in range(1, 8):
                store.save(make_command(n))
            for command in reversed(commands[:6]):  # as they finish
                store.save(command)
            # By age: only 6 finished before T0 + 95 (created before it, all).
            assert await store.purge(finished_before=T0 + 95, keep_at_most=100) == 1
            assert await store.purge(finished_before=0, keep_at_most=3) == 2
            survivors[store] = [c.command_id for c in (await store.list(CommandQuery())).commands]
    assert survivors[memory] == survivors[sqlite] == [commands[n].command_id for n in (6, 4, 3, 2)]


async def test_a_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "commands.db"
    path.write_bytes(b"this is not a database" * 1000)
    with pytest.raises(StoreError, match="not a readable database.*move it away"):
        async with open_sqlite_store(path):
            pass


async def test_another_applications_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE invoices (id INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="not a trio_quiccmd command store"):
        async with open_sqlite_store(path):
            pass


async def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "c.db"
    async with open_sqlite_store(path):
        pass
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {sqlite_store.SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this server knows"):
        async with open_sqlite_store(path):
            pass


async def test_a_database_locked_by_another_process_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT", 0.2)
    path = tmp_path / "c.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="locked by another process"):
            async with open_sqlite_store(path):
                pass
    finally:
        holder.execute("ROLLBACK")
        holder.close()


async def test_two_servers_never_share_one_store(tmp_path):
    path = tmp_path / "c.db"
    async with open_sqlite_store(path):
        with pytest.raises(StoreError, match="in use by another server"):
            async with open_sqlite_store(path):
                pass
    # Released on close.
    async with open_sqlite_store(path):
        pass


def _posix_locks_on(path: Path) -> list[str]:
    """This process's fcntl locks on ``path`` (as /proc/locks lists them)."""
    inode = f":{os.stat(path).st_ino} "
    with open("/proc/locks") as locks:
        return [
            line.split(":", 1)[1].strip() for line in locks
            if " POSIX " in line and f" {os.getpid()} " in line and inode in line
        ]


async def test_a_store_in_use_is_refused_under_any_of_its_names(tmp_path):
    # The lock was on "<name>.lock": a symlink or a hard link to the database
    # got a lock of its own, and two servers dispatched the same commands.
    path = tmp_path / "c.db"
    async with open_sqlite_store(path) as store:
        sqlite_locks = _posix_locks_on(path)
        assert sqlite_locks  # (SQLite holds a shared lock on a WAL database)
        (tmp_path / "symlink.db").symlink_to(path)
        with pytest.raises(StoreError, match=rf"in use by another server \(pid {os.getpid()}"):
            async with open_sqlite_store(tmp_path / "symlink.db"):
                pass
        # Refused without touching the database: closing a descriptor of its
        # file would have dropped the locks SQLite holds on it in this process.
        assert _posix_locks_on(path) == sqlite_locks
        mine = make_command(1)
        store.save(mine)
        await store.flush()
    async with open_sqlite_store(tmp_path / "symlink.db") as store:
        assert await store.get(mine.command_id) == mine
    (tmp_path / "hardlink.db").hardlink_to(path)
    for name in ("c.db", "hardlink.db"):
        with pytest.raises(StoreError, match="has 2 hard links; give it one name"):
            async with open_sqlite_store(tmp_path / name):
                pass


async def test_a_lock_file_that_cannot_be_written_is_a_clear_error_and_holds_nothing(tmp_path):
    path = tmp_path / "c.db"
    (tmp_path / "c.db.lock").mkdir()
    with pytest.raises(StoreError, match=r"cannot write the command store's lock file .*c\.db\.lock: Is a directory"):
        async with open_sqlite_store(path):
            pass
    # Nothing is left locked: once the cause is gone, the same process opens it.
    (tmp_path / "c.db.lock").rmdir()
    async with open_sqlite_store(path):
        pass


# -- schema versions ------------------------------------------------------------------


def _schema_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


async def test_an_empty_file_gets_the_current_schema(tmp_path):
    path = tmp_path / "commands.db"
    path.touch()  # e.g. made by a provisioning tool
    async with running(path) as store:
        store.save(make_command(1))
    assert _schema_version(path) == sqlite_store.SCHEMA_VERSION


def _body(command: Command) -> str:
    """A command as versions 1 and 2 stored it: all of it, as JSON."""
    fields = attrs.asdict(command)
    fields["status"] = command.status.value
    return json.dumps(fields)


def _version_1_database(path: Path, commands: list[Command]) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    for statement in sqlite_store.MIGRATIONS[0].split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.executemany(
        "INSERT INTO commands (command_id, client_id, command_type, status, completed_at, body)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [
            (c.command_id, c.client_id, c.command_type, c.status.value, c.completed_at, _body(c))
            for c in commands
        ],
    )
    db.close()


async def test_a_version_1_database_is_migrated_with_its_history_and_unfinished_commands(tmp_path):
    path = tmp_path / "commands.db"
    queued = attrs.evolve(make_command(1), timeout=30.0, connect_timeout=60.0)
    running_ = make_command(2, status=CommandStatus.EXECUTING)
    finished = make_command(3, status=CommandStatus.COMPLETED)
    _version_1_database(path, [queued, running_, finished])

    async with running(path) as store:
        page = await store.list(CommandQuery())
        assert page.commands == [finished, running_, queued]
        unfinished = await store.unfinished()
        # The deadlines version 1's rules gave them: delivery within the
        # longer of the two timeouts, execution within timeout of sending.
        assert [(u.command, u.deadline_at, u.sent_to) for u in unfinished] == [
            (queued, pytest.approx(queued.created_at + 60), ""),
            (running_, pytest.approx(running_.sent_at + running_.timeout), ""),
        ]
    assert _schema_version(path) == sqlite_store.SCHEMA_VERSION == 3


async def test_a_version_2_database_keeps_every_field_through_the_change_to_columns(tmp_path):
    path = tmp_path / "commands.db"
    db = sqlite3.connect(path, isolation_level=None)
    for script in sqlite_store.MIGRATIONS[:2]:
        for statement in script.split(";"):
            if statement.strip():
                db.execute(statement)
    db.execute("PRAGMA user_version = 2")
    # Payloads and results of every JSON kind (a string must stay a string,
    # a JSON null result must stay None), errors, priorities, timestamps.
    done = attrs.evolve(
        make_command(1, status=CommandStatus.COMPLETED),
        payload="just text", result={"lines": ["a", "b"], "ok": True, "n": 1.5}, priority=7,
    )
    failed = attrs.evolve(
        make_command(2, status=CommandStatus.FAILED),
        payload=[1, None, {"é": "ü"}], error="boom", error_code="execution_error",
    )
    null_result = attrs.evolve(make_command(3, status=CommandStatus.COMPLETED), payload=None, result=None)
    number_result = attrs.evolve(
        make_command(4, status=CommandStatus.COMPLETED), payload=0.30000000000000004, result=2**77
    )
    bool_result = attrs.evolve(
        make_command(6, status=CommandStatus.COMPLETED), payload='say "hi"\n', result=False
    )
    running_ = make_command(5, status=CommandStatus.EXECUTING)
    db.executemany(
        "INSERT INTO commands (command_id, client_id, command_type, status, completed_at, body,"
        " deadline_at, sent_to) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (c.command_id, c.client_id, c.command_type, c.status.value, c.completed_at, _body(c),
             None if c.is_terminal else T0 + 99, "" if c.is_terminal else "inst-7")
            for c in (done, failed, null_result, number_result, running_, bool_result)
        ],
    )
    db.close()

    async with running(path) as store:
        page = await store.list(CommandQuery())
        assert page.commands == [bool_result, running_, number_result, null_result, failed, done]
        for command in page.commands:
            assert await store.get(command.command_id) == command
        assert [(u.command, u.deadline_at, u.sent_to) for u in await store.unfinished()] == [
            (running_, T0 + 99, "inst-7")
        ]
        # And it goes on from there: a change to a migrated command is stored.
        store.save(transition(running_, CommandStatus.COMPLETED, at=T0 + 5, result="done"))
    async with running(path) as store:
        assert (await store.get(running_.command_id)).result == "done"
        assert await store.unfinished() == []
    assert _schema_version(path) == 3


async def test_unfinished_commands_come_back_with_their_deadline_and_agent_instance(tmp_path):
    path = tmp_path / "commands.db"
    async with running(path) as store:
        store.save(make_command(1), deadline_at=T0 + 61)
        store.save(make_command(2, status=CommandStatus.EXECUTING), deadline_at=T0 + 62, sent_to="inst-1")
        store.save(make_command(3, status=CommandStatus.CANCELLED), deadline_at=T0 + 63)
    async with running(path) as store:
        assert [(u.command.command_id, u.deadline_at, u.sent_to) for u in await store.unfinished()] == [
            (make_command(1).command_id, T0 + 61, ""),
            (make_command(2).command_id, T0 + 62, "inst-1"),
        ]


async def test_changes_nobody_waits_for_ride_with_the_next_awaited_commit(tmp_path, monkeypatch):
    transactions: list[list[str]] = []
    before_each_write(monkeypatch, lambda rows: transactions.append(sorted(row[0] for row in rows)))
    # Long enough that a slow machine cannot commit it alone by accident.
    monkeypatch.setattr(sqlite_store, "COMMIT_LINGER", 60.0)
    a, b, c = (make_command(n) for n in range(3))
    with trio.fail_after(5):
        async with running(tmp_path / "c.db") as store:
            store.save(a)  # e.g. a result: nobody flushes for it
            await trio.testing.wait_all_tasks_blocked()
            assert transactions == []  # lingering, not committed alone
            store.save(b)  # a send, which is acknowledged after its commit
            await store.flush()
            assert transactions == [sorted([a.command_id, b.command_id])]
        # Alone, a change is still committed after the linger, without any flush.
        monkeypatch.setattr(sqlite_store, "COMMIT_LINGER", 0.01)
        async with running(tmp_path / "c.db") as store:
            store.save(c)
            await wait_until(lambda: len(transactions) == 2)
            assert transactions[1] == [c.command_id]


async def test_recently_finished_commands_are_read_without_the_database(tmp_path, monkeypatch):
    async with running(tmp_path / "c.db") as store:
        finished = [make_command(n, status=CommandStatus.COMPLETED) for n in range(5)]
        unfinished = make_command(9, status=CommandStatus.EXECUTING)
        for command in [*finished, unfinished]:
            store.save(command)
        await store.flush()

        def no_reads(*args):
            raise AssertionError("read the database")

        monkeypatch.setattr(SqliteStore, "_get", no_reads)
        for command in finished:
            assert await store.get(command.command_id) == command
        # Only finished ones are kept (the manager holds the unfinished).
        with pytest.raises(AssertionError, match="read the database"):
            await store.get(unfinished.command_id)
        # A purge forgets them, so a purged command is not served from memory.
        monkeypatch.undo()
        await store.purge(finished_before=T0 + 100, keep_at_most=100)
        assert await store.get(finished[0].command_id) is None


async def test_a_new_store_is_readable_only_by_the_servers_user(tmp_path):
    path = tmp_path / "data" / "commands.db"
    async with running(path) as store:
        store.save(make_command(1, status=CommandStatus.COMPLETED))
        await store.flush()
        for name in ("commands.db", "commands.db-wal", "commands.db-shm", "commands.db.lock"):
            assert (path.parent / name).stat().st_mode & 0o777 == 0o600, name
    assert path.parent.stat().st_mode & 0o777 == 0o700


async def test_an_unwritable_store_location_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open the command store"):
        async with open_sqlite_store(blocker / "commands.db"):
            pass


async def test_a_damaged_database_met_while_reading_is_a_store_error(tmp_path, monkeypatch):
    async with running(tmp_path / "c.db") as store:
        def damaged(*args):
            raise sqlite3.DatabaseError("database disk image is malformed")

        monkeypatch.setattr(SqliteStore, "_unfinished", damaged)
        monkeypatch.setattr(SqliteStore, "_get", damaged)
        with pytest.raises(StoreError, match="is not a readable database"):
            await store.unfinished()
        with pytest.raises(StoreError, match="is not a readable database"):
            await store.get("x")


@pytest.mark.parametrize("column, damage", [
    ("payload", "'{\"n\":1,'"), ("result", "'[1'"), ("result", "X'FF'"), ("status", "'finished-ish'"),
])
async def test_a_row_that_cannot_be_decoded_is_a_store_error_naming_it(tmp_path, column, damage):
    # Found in review: a row whose JSON was cut short raised a bare
    # JSONDecodeError, a traceback at start and HTTP 500 on a read (not 503).
    path = tmp_path / "c.db"
    unfinished, sound = make_command(1), make_command(3)
    finished = make_command(2, status=CommandStatus.COMPLETED)
    async with running(path) as store:
        for command in (unfinished, finished, sound):
            store.save(command, deadline_at=T0 + 60)
    db = sqlite3.connect(path)
    damaged = finished if column == "result" else unfinished
    db.execute(f"UPDATE commands SET {column} = {damage} WHERE command_id = ?", (damaged.command_id,))
    db.commit()
    db.close()
    message = (
        f"the command store {path} is damaged: the row of command '{damaged.command_id}' cannot be"
        f" read ({column}: "
    )
    async with running(path) as store:
        reads = [lambda: store.get(damaged.command_id), lambda: store.list(CommandQuery())]
        if column == "payload":  # (a row of no known status is not looked for there)
            reads.append(store.unfinished)
        for read in reads:
            with pytest.raises(StoreError) as raised:
                await read()
            text = str(raised.value)
            assert text.startswith(message), text
            assert text.endswith("move it away to start with an empty history") and "\n" not in text, text
        # The rest of the history is still there.
        assert await store.get(sound.command_id) == sound


async def test_a_row_whose_text_is_not_utf8_is_a_one_line_store_error(tmp_path):
    # sqlite3 quotes the whole text it cannot decode, line breaks and all
    # (and a "locked" in it made it "locked by another process").
    path = tmp_path / "c.db"
    async with running(path) as store:
        store.save(make_command(1), deadline_at=T0 + 60)
    db = sqlite3.connect(path)
    db.execute("UPDATE commands SET payload = CAST(X'FF0A6C6F636B6564' AS TEXT)")  # \xff, "\nlocked"
    db.commit()
    db.close()
    async with running(path) as store:
        for read in (store.unfinished, lambda: store.list(CommandQuery())):
            with pytest.raises(StoreError) as raised:
                await read()
            assert str(raised.value) == (
                f"the command store {path} is not a readable database (Could not decode to UTF-8 column"
                " 'payload'); restore it from a backup or move it away to start with an empty history"
            )


async def test_unfinished_commands_are_read_even_with_no_writer_running(tmp_path):
    # At start the manager recovers before it runs the store's writer.
    async with open_sqlite_store(tmp_path / "c.db") as store:
        store.save(make_command(1), deadline_at=T0 + 60)
        with trio.fail_after(5):
            assert [u.command.command_id for u in await store.unfinished()] == [make_command(1).command_id]


async def test_a_purge_that_fails_half_way_forgets_the_cache_of_what_it_deleted(tmp_path, monkeypatch):
    async with running(tmp_path / "c.db") as store:
        old = make_command(1, status=CommandStatus.COMPLETED)
        store.save(old)
        await store.flush()
        assert await store.get(old.command_id) == old  # from the cache

        def count_fails(self):
            raise sqlite3.OperationalError("database is locked")

        monkeypatch.setattr(SqliteStore, "_count_finished", count_fails)
        with pytest.raises(StoreError):
            await store.purge(finished_before=T0 + 100, keep_at_most=0)
        assert await store.get(old.command_id) is None


async def test_unwritten_counts_what_waits_for_a_commit(tmp_path):
    async with open_sqlite_store(tmp_path / "c.db") as store:
        store.save(make_command(1))
        store.save(make_command(2))
        store.save(make_command(1, status=CommandStatus.EXECUTING))
        assert store.unwritten == 2  # two commands; the second save of one replaced its first
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await store.flush()
            assert store.unwritten == 0
            nursery.cancel_scope.cancel()


async def test_a_command_that_cannot_be_encoded_is_skipped_not_the_batch(tmp_path, caplog):
    async with running(tmp_path / "c.db") as store:
        good = make_command(1)
        bad = attrs.evolve(make_command(2), payload={"not json": object()})
        store.save(good)
        store.save(bad)
        await store.flush()
        store.save(make_command(3))
        await store.flush()  # the writer is still running
    async with running(tmp_path / "c.db") as store:
        page = await store.list(CommandQuery())
        assert [c.command_id for c in page.commands] == [make_command(3).command_id, good.command_id]
    assert any("Command not stored" in r.getMessage() for r in caplog.records)


async def test_text_an_agent_chose_is_stored_even_when_it_is_not_valid_utf8(tmp_path):
    # An agent's RESULT may carry lone surrogates (JSON escapes allow them) in
    # its error and error code; one such row must not stop the writer.
    odd = transition(
        attrs.evolve(make_command(1), status=CommandStatus.EXECUTING),
        CommandStatus.FAILED, at=T0 + 1, error="bad \ud800 text", error_code="code\udfff",
    )
    async with running(tmp_path / "c.db") as store:
        store.save(odd)
        store.save(make_command(2))
        await store.flush()
    async with running(tmp_path / "c.db") as store:
        stored = await store.get(odd.command_id)
        assert (stored.error, stored.error_code) == ("bad \\ud800 text", "code\\udfff")
        assert await store.get(make_command(2).command_id) == make_command(2)


async def test_a_commit_failing_while_the_writer_waits_for_it_is_retried(tmp_path, monkeypatch):
    # The writer task waits for a flush's commit to end; that commit fails.
    # Someone must still retry it, or every later send waits forever.
    monkeypatch.setattr(sqlite_store, "COMMIT_LINGER", 0.01)
    monkeypatch.setattr(sqlite_store, "RETRY_DELAY", 0.01)
    release = threading.Event()
    failures = [sqlite3.OperationalError("disk I/O error")]

    def failing_once(rows):
        release.wait(5)
        if failures:
            raise failures.pop()

    before_each_write(monkeypatch, failing_once)
    with trio.fail_after(5):
        async with running(tmp_path / "c.db") as store:
            async with trio.open_nursery() as nursery:
                store.save(make_command(1))
                nursery.start_soon(store.flush)  # leads a commit, which hangs
                await trio.testing.wait_all_tasks_blocked()
                store.save(make_command(2))
                # The writer's linger ends: it waits for that commit to end...
                await wait_until(lambda: store._commit_ended.statistics().tasks_waiting > 0)
                release.set()  # ...which fails
            await store.flush()
            assert store.unwritten == 0
            assert len((await store.list(CommandQuery())).commands) == 2


async def test_a_closed_store_refuses_reads_instead_of_hanging(tmp_path):
    async with running(tmp_path / "c.db") as store:
        store.save(make_command(1))
    with trio.fail_after(5):
        with pytest.raises(StoreError, match="closed"):
            await store.list(CommandQuery())


def _stored_ids(path: Path) -> set[str]:
    """The command ids committed to ``path``, read as another process would."""
    db = sqlite3.connect(path)
    try:
        return {command_id for (command_id,) in db.execute("SELECT command_id FROM commands")}
    finally:
        db.close()


async def test_a_store_whose_close_timed_out_on_a_hung_write_can_be_opened_once_it_ends(
    tmp_path, monkeypatch, caplog
):
    # Found in review: the close jobs were never queued behind the stuck
    # write, so the lock file stayed held, and the process's own next open
    # was refused "in use by another server (pid <its own>)" for good.
    path = tmp_path / "c.db"
    monkeypatch.setattr(sqlite_store, "CLOSE_TIMEOUT", 0.05)
    stuck, release = threading.Event(), threading.Event()
    original = SqliteStore._write

    def hanging(rows):
        stuck.set()
        release.wait(10)

    before_each_write(monkeypatch, hanging)
    with trio.fail_after(10):
        async with open_sqlite_store(path) as store:
            store.save(make_command(1))
            # Stuck before the close begins (its window is short): a flush's
            # commit, abandoned, which the close's own then waits behind.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.flush)
                await trio.to_thread.run_sync(stuck.wait, 5)
                nursery.cancel_scope.cancel()
        assert any("did not close in time" in r.getMessage() for r in caplog.records)
        with pytest.raises(StoreError, match="in use by another server"):
            async with open_sqlite_store(path):
                pass
        release.set()  # the disk answers again
        await trio.to_thread.run_sync(store._write_thread._thread.join, 5)
        monkeypatch.setattr(SqliteStore, "_write", original)
        async with open_sqlite_store(path) as store:
            assert await store.get(make_command(1).command_id) == make_command(1)


async def test_a_commit_failing_for_a_moment_at_close_is_retried(tmp_path, monkeypatch, caplog):
    # Found in review: the close tried its last commit once, and a passing
    # "database is locked" lost the last results.
    monkeypatch.setattr(sqlite_store, "RETRY_DELAY", 0.01)
    failures = [sqlite3.OperationalError("database is locked")] * 2

    def locked_for_a_moment(rows):
        if failures:
            raise failures.pop()

    before_each_write(monkeypatch, locked_for_a_moment)
    with trio.fail_after(5):
        async with open_sqlite_store(tmp_path / "c.db") as store:
            store.save(make_command(1, status=CommandStatus.COMPLETED))
    assert not failures
    assert _stored_ids(tmp_path / "c.db") == {make_command(1).command_id}
    assert not [r for r in caplog.records if "could not write" in r.getMessage()]


async def test_a_commit_failing_for_good_at_close_is_not_retried(tmp_path, monkeypatch, caplog):
    # A full disk does not empty itself within a shutdown: retrying it only
    # held the shutdown for the whole close window (10 s).
    monkeypatch.setattr(sqlite_store, "RETRY_DELAY", 0.01)
    monkeypatch.setattr(sqlite_store, "CLOSE_TIMEOUT", 0.5)
    attempts = 0

    def disk_full(rows):
        nonlocal attempts
        attempts += 1
        raise sqlite3.OperationalError("database or disk is full")

    with trio.fail_after(5):
        async with open_sqlite_store(tmp_path / "c.db") as store:
            before_each_write(monkeypatch, disk_full)
            store.save(make_command(1, status=CommandStatus.COMPLETED))
    assert attempts == 1
    assert [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()] == [
        f"Command store closed with changes it could not write path={tmp_path / 'c.db'} lost=1"
    ]


@pytest.mark.parametrize("beside", ["unfinished", "aclose"])
async def test_a_flush_returns_only_once_its_saves_are_committed_whatever_commits_beside_it(
    tmp_path, monkeypatch, beside
):
    # Found in review: unfinished() and aclose() started a commit of their
    # own while a flush's was under way; the flush's then failed, the other
    # succeeded, and counted the flush's saves as committed: flush returned
    # with command 1 not stored (and the close lost it, without a word).
    path = tmp_path / "c.db"
    release = threading.Event()
    failures = [sqlite3.OperationalError("disk I/O error")]

    def failing_once(rows):
        if failures:
            release.wait(5)
            raise failures.pop()

    before_each_write(monkeypatch, failing_once)
    flushed: list[set[str]] = []
    with trio.fail_after(5):
        async with open_sqlite_store(path) as store:  # no writer task: nobody else retries
            async def flush() -> None:
                await store.flush()
                flushed.append(_stored_ids(path))

            async with trio.open_nursery() as nursery:
                store.save(make_command(1))
                nursery.start_soon(flush)  # leads a commit, which hangs, then fails
                await trio.testing.wait_all_tasks_blocked()
                store.save(make_command(2))
                nursery.start_soon(getattr(store, beside))
                await trio.testing.wait_all_tasks_blocked()
                release.set()
    assert flushed and make_command(1).command_id in flushed[0]
    assert _stored_ids(path) == {make_command(1).command_id, make_command(2).command_id}


@pytest.mark.parametrize("version", [(3, 37, 2), (3, 40, 1)])
def test_the_v3_migration_keeps_json_values_with_or_without_the_arrow_operator(monkeypatch, version):
    # SQLite before 3.38 has no ->: the migration then rebuilds the JSON text.
    monkeypatch.setattr(sqlite3, "sqlite_version_info", version)
    db = sqlite3.connect(":memory:")
    values = ["text", 'say "hi"', 0, -7, 2**40, [1, None], {"a": {"b": [True]}}, True, False, None]
    for value in values:
        body = json.dumps({"payload": value, "result": value})
        payload_sql = sqlite_store._json_text_at("$.payload", null="'null'")
        result_sql = sqlite_store._json_text_at("$.result", null="NULL")
        payload, result = db.execute(
            f"SELECT {payload_sql}, {result_sql} FROM (SELECT ? AS body)", (body,)
        ).fetchone()
        assert json.loads(payload) == value
        assert (None if result is None else json.loads(result)) == value


class _RecordingReader:
    """The store's reading connection, noting when it is used and closed."""

    def __init__(self, connection: sqlite3.Connection, order: list[str]):
        self._connection = connection
        self._order = order

    def execute(self, *args):
        return self._connection.execute(*args)

    def close(self) -> None:
        self._order.append("reader closed")
        self._connection.close()


async def test_closing_waits_for_a_read_whose_caller_gave_up(tmp_path):
    """A read still running in the reading thread after its caller was
    cancelled (a request cut short at shutdown): the connection was closed
    under it from the writing thread, which crashed the server process
    (a segfault in sqlite3) in one run of five."""
    order: list[str] = []
    started, release = threading.Event(), threading.Event()
    async with open_sqlite_store(tmp_path / "c.db") as store:
        store._reader = _RecordingReader(store._reader, order)

        def slow_read() -> None:
            started.set()
            release.wait(10)
            store._reader.execute("SELECT count(*) FROM commands").fetchone()
            order.append("read done")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._read, slow_read)
            await trio.to_thread.run_sync(started.wait)
            nursery.cancel_scope.cancel()  # the caller gives up; the read goes on
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.aclose)
            # Time for a close that does not wait to happen (as it did).
            await trio.testing.wait_all_tasks_blocked(cushion=0.2)
            order.append("read released")
            release.set()
    assert order == ["read released", "read done", "reader closed"]
