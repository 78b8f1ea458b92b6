"""``python -m trio_quiccmd.server`` with a store it cannot use: one clear line, no traceback.

Real processes, as an operator meets them: a damaged file, a second server on
the same data dir, a lock file it cannot write, a database another program
holds locked, a bad ``--store``.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import trio

from trio_quiccmd.model import Command
from trio_quiccmd.server.store.sqlite import open_sqlite_store

from .processes import spawn

TIMEOUT = 30
PROG = "python -m trio_quiccmd.server"


def server_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "trio_quiccmd.server", "--http", "127.0.0.1:0", "--quic", "127.0.0.1:0", *extra]


async def refused(directory: Path, *extra: str) -> tuple[int, str]:
    """Start a server that must not start; its exit status and stderr."""
    async with spawn(server_argv(*extra), cwd=directory, name="server") as server:
        code = await server.process.wait()
        await server.stderr.closed.wait()
        await server.stdout.closed.wait()
        assert server.stdout.lines == [], server.stdout.lines  # never said "listening"
        return code, "\n".join(server.stderr.lines)


def the_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"{PROG}: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


async def test_a_damaged_store_file_stops_the_server_with_a_clear_error(tmp_path):
    store = tmp_path / ".quiccmd" / "commands.db"
    store.parent.mkdir()
    store.write_bytes(b"\x00garbage, not SQLite\x00" * 500)
    with trio.fail_after(TIMEOUT):
        code, stderr = await refused(tmp_path)
    assert code == 1
    line = the_error_line(stderr)
    assert "the command store .quiccmd/commands.db is not a readable database" in line, line
    assert "move it away" in line
    # Nothing was overwritten.
    assert store.read_bytes().startswith(b"\x00garbage")


async def test_a_damaged_row_of_an_unfinished_command_stops_the_server_with_a_clear_error(tmp_path):
    # Found in review: a row whose payload was cut short stopped the start
    # with a JSONDecodeError traceback. Such rows are read at start, to take
    # unfinished commands up again.
    store = tmp_path / ".quiccmd" / "commands.db"
    store.parent.mkdir()
    command = Command(
        command_id="01a3185c53e8-00000001-0000abcd", client_id="web-1", command_type="echo",
        payload={"n": 1}, created_at=1_800_000_000.0,
    )
    async with open_sqlite_store(store) as opened:
        opened.save(command, deadline_at=command.created_at + 60)
    db = sqlite3.connect(store)
    db.execute("""UPDATE commands SET payload = '{"n":1,'""")
    db.commit()
    db.close()
    with trio.fail_after(TIMEOUT):
        code, stderr = await refused(tmp_path)
    assert code == 1
    line = the_error_line(stderr)
    assert (
        f"the command store .quiccmd/commands.db is damaged: the row of command '{command.command_id}'"
        " cannot be read (payload: " in line
    ), line
    assert "move it away" in line


async def test_a_second_server_on_the_same_store_is_refused(tmp_path):
    with trio.fail_after(TIMEOUT):
        async with spawn(server_argv(), cwd=tmp_path, name="first") as first:
            await first.stdout.wait_for("quiccmd server listening ")
            code, stderr = await refused(tmp_path)
            assert code == 1
            line = the_error_line(stderr)
            assert "is in use by another server" in line and f"pid {first.process.pid}" in line, line
            # The first one is unharmed.
            assert first.process.returncode is None
            first.process.terminate()
            assert await first.process.wait() == 0


async def test_a_lock_file_the_server_cannot_write_is_a_clear_error(tmp_path):
    lock = tmp_path / ".quiccmd" / "commands.db.lock"
    lock.mkdir(parents=True)
    with trio.fail_after(TIMEOUT):
        code, stderr = await refused(tmp_path)
    assert code == 1
    line = the_error_line(stderr)
    assert f"cannot write the command store's lock file {lock}: Is a directory" in line, line


async def test_a_store_locked_by_another_program_is_a_clear_error(tmp_path):
    path = tmp_path / "elsewhere.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with trio.fail_after(TIMEOUT):
            code, stderr = await refused(tmp_path, "--store", f"sqlite:///{path}")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert code == 1
    assert "is locked by another process" in the_error_line(stderr)


async def test_a_bad_store_setting_is_a_configuration_error(tmp_path):
    with trio.fail_after(TIMEOUT):
        code, stderr = await refused(tmp_path, "--store", "postgres://db/commands")
    assert code == 2
    line = the_error_line(stderr)
    assert "option --store" in line and "'memory', 'sqlite' or 'sqlite:///PATH'" in line, line
    with trio.fail_after(TIMEOUT):
        code, stderr = await refused(tmp_path, "--store-sync", "sometimes")
    assert code == 2 and "'full' or 'normal'" in the_error_line(stderr)


async def test_the_server_says_where_its_store_is_as_an_absolute_path(tmp_path):
    (tmp_path / "history").mkdir()
    with trio.fail_after(TIMEOUT):
        async with spawn(server_argv("--store", "sqlite:///history/c.db"), cwd=tmp_path, name="server") as server:
            await server.stdout.wait_for("quiccmd server listening ")
            line = await server.stderr.wait_for("Command store kind=sqlite")
            assert f"path={tmp_path / 'history' / 'c.db'} sync=full" in line, line
            assert (tmp_path / "history" / "c.db").is_file()
            server.process.terminate()
            assert await server.process.wait() == 0


async def test_a_store_path_in_a_directory_that_does_not_exist_is_refused(tmp_path):
    # Found in review: --store sqlite:////missing/dir/x.db made the missing
    # directories and started an empty history there, a typo unnoticed.
    with trio.fail_after(TIMEOUT):
        code, stderr = await refused(tmp_path, "--store", "sqlite:///typo/commands.db")
    assert code == 1
    line = the_error_line(stderr)
    assert "the directory of the command store typo/commands.db does not exist" in line, line
    assert not (tmp_path / "typo").exists()
