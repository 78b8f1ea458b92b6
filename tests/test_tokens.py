"""Credentials on disk and the commands that manage them:
``python -m trio_quiccmd.server token|api-token ...`` as real subprocesses,
the files they write, and the running server's view of changes."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import trio

from trio_quiccmd.tokens import (
    AGENT_TOKENS_FILE,
    API_TOKENS_FILE,
    DEV_AGENT_TOKEN_FILE,
    TokenFileError,
    WatchedFile,
    issue_agent_token,
    issue_api_token,
    load_agent_tokens,
    load_api_tokens,
    revoke_agent_token,
    token_hash,
    write_private,
)

from .processes import clean_env

TIMEOUT = 30


async def server_cli(cwd: Path, *args: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "trio_quiccmd.server", *args],
        cwd=str(cwd), env=clean_env(), capture_stdout=True, capture_stderr=True, check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_a_token_created_says_where_and_warns_of_a_data_dir_no_server_used(tmp_path):
    # Found following the docs: run from a directory with no server, token
    # create made a new ./.quiccmd and said nothing; the server never saw it.
    with trio.fail_after(TIMEOUT):
        code, out, err = await server_cli(tmp_path, "token", "create", "web-09")
        assert code == 0 and out.startswith("qca_")
        assert f"Written to {Path('.quiccmd') / AGENT_TOKENS_FILE}." in err
        assert "warning: the data dir .quiccmd did not exist and was created" in err
        code, out, err = await server_cli(tmp_path, "api-token", "create", "ops", "--role", "operate")
        assert code == 0 and out.startswith("qco_")
        assert f"Written to {Path('.quiccmd') / API_TOKENS_FILE}." in err
        assert "warning" not in err  # the data dir exists now


async def test_agent_tokens_are_printed_once_and_stored_as_hashes(tmp_path):
    data = tmp_path / ".quiccmd"
    with trio.fail_after(TIMEOUT):
        code, out, err = await server_cli(tmp_path, "token", "create", "client-001", "--label", "role=web")
        assert code == 0, err
        [secret] = out.splitlines()
        assert secret.startswith("qca_") and len(secret) == 4 + 43
        text = (data / AGENT_TOKENS_FILE).read_text()
        assert secret not in text and token_hash(secret) in text
        assert private(data / AGENT_TOKENS_FILE)
        record = load_agent_tokens(data / AGENT_TOKENS_FILE).agents["client-001"]
        assert record.labels == {"role": "web"}

        # Not twice by accident; --replace issues a new one.
        code, out, err = await server_cli(tmp_path, "token", "create", "client-001")
        assert (code, out) == (1, "")
        assert "client-001 already has a token (use --replace to issue a new one)" in err
        code, out, _ = await server_cli(tmp_path, "token", "create", "client-001", "--replace")
        assert code == 0 and out.strip() != secret

        code, out, _ = await server_cli(tmp_path, "token", "create", "--enrollment")
        assert code == 0 and out.startswith("qce_")
        code, out, _ = await server_cli(tmp_path, "token", "list")
        assert code == 0
        assert out.splitlines()[:2] == ["client_id\tlabels\tcreated_at", out.splitlines()[1]]
        assert out.splitlines()[1].startswith("client-001\trole=web\t")
        assert out.splitlines()[2].startswith("(enrollment token)")
        assert "qca_" not in out and "sha256" not in out

        assert (await server_cli(tmp_path, "token", "revoke", "client-001"))[0] == 0
        assert (await server_cli(tmp_path, "token", "revoke", "--enrollment"))[0] == 0
        assert not load_agent_tokens(data / AGENT_TOKENS_FILE).configured
        code, _, err = await server_cli(tmp_path, "token", "revoke", "client-001")
        assert code == 1 and "client-001 has no token" in err

        # Usage errors: exit 2, one line.
        code, _, err = await server_cli(tmp_path, "token", "create")
        assert code == 2 and "give a CLIENT_ID or --enrollment" in err
        code, _, err = await server_cli(tmp_path, "token", "create", "bad id!")
        assert code == 2 and "client_id 'bad id!' must be" in err


async def test_api_tokens_with_roles_and_restrictions(tmp_path):
    data = tmp_path / "elsewhere"
    with trio.fail_after(TIMEOUT):
        code, out, err = await server_cli(
            tmp_path, "api-token", "create", "deployer", "--role", "operate",
            "--command-type", "restart", "--command-type", "echo", "--label", "env=prod",
            "--data-dir", str(data),
        )
        assert code == 0, err
        assert out.strip().startswith("qco_")
        record = load_api_tokens(data / API_TOKENS_FILE).tokens["deployer"]
        assert (record.role, record.command_types, record.labels) == ("operate", ("restart", "echo"), {"env": "prod"})
        assert record.hash == token_hash(out.strip())
        assert private(data / API_TOKENS_FILE)
        code, out, _ = await server_cli(tmp_path, "api-token", "list", "--data-dir", str(data))
        assert out.splitlines()[1].startswith("deployer\toperate\trestart,echo\tenv=prod\t")
        code, _, err = await server_cli(tmp_path, "api-token", "create", "x", "--role", "admin", "--data-dir", str(data))
        assert code == 2 and "invalid choice: 'admin'" in err
        assert (await server_cli(tmp_path, "api-token", "revoke", "deployer", "--data-dir", str(data)))[0] == 0
        assert load_api_tokens(data / API_TOKENS_FILE).tokens == {}

        # Or the server's own config file names the data dir.
        (tmp_path / "quiccmd.toml").write_text(f'data_dir = "{data}"\n')
        code, out, err = await server_cli(tmp_path, "api-token", "create", "viewer", "--role", "read",
                                          "--config", "quiccmd.toml")
        assert code == 0, err
        assert set(load_api_tokens(data / API_TOKENS_FILE).tokens) == {"viewer"}


def test_a_watched_file_sees_changes_and_keeps_the_last_good_contents(tmp_path):
    path = tmp_path / AGENT_TOKENS_FILE
    watched = WatchedFile(path, load_agent_tokens)
    assert not watched.value.configured and not watched.refresh()
    issue_agent_token(tmp_path, "a")
    assert watched.refresh() and set(watched.value.agents) == {"a"}
    assert not watched.refresh()
    path.write_text("{ broken")
    assert not watched.refresh()
    assert set(watched.value.agents) == {"a"}  # a typo does not lock everyone out


@pytest.mark.parametrize(
    "document, message",
    [
        ("[]", "not a version 1 token file"),
        ('{"version": 1, "agents": {"a": {"hash": "md5:x"}}}', "hash must be sha256:<64 hex digits>"),
        ('{"version": 1, "agents": {"a": {"hash": "sha256:' + "0" * 64 + '", "labels": [1]}}}', "labels must be an object"),
    ],
)
def test_a_malformed_token_file_is_a_clear_error(tmp_path, document, message):
    path = tmp_path / AGENT_TOKENS_FILE
    path.write_text(document)
    with pytest.raises(TokenFileError, match=message):
        load_agent_tokens(path)
    # A server does not start on it.
    with pytest.raises(TokenFileError):
        WatchedFile(path, load_agent_tokens)


def test_api_token_file_roles_are_checked(tmp_path):
    path = tmp_path / API_TOKENS_FILE
    path.write_text(json.dumps({"version": 1, "tokens": {"x": {"hash": "sha256:" + "0" * 64, "role": "root"}}}))
    with pytest.raises(TokenFileError, match="role must be one of read, operate"):
        load_api_tokens(path)


def test_an_unreadable_token_file_is_retried_until_it_loads_and_said_to_block_revocations(tmp_path, caplog):
    # The review's case: the CLI (as root) wrote a file the server's user cannot
    # read. The server kept the old tokens, logged once, and recorded the new
    # stamp, so the later chown that fixed it was never noticed.
    path = tmp_path / AGENT_TOKENS_FILE
    issue_agent_token(tmp_path, "a")
    issue_agent_token(tmp_path, "b")
    readable = {"yes": True}

    def load(p: Path):
        if not readable["yes"]:
            raise TokenFileError(f"{p}: cannot read it: Permission denied")
        return load_agent_tokens(p)

    watched = WatchedFile(path, load)
    readable["yes"] = False
    with caplog.at_level("CRITICAL", logger="trio_quiccmd"):
        from trio_quiccmd.tokens import revoke_agent_token

        revoke_agent_token(tmp_path, "b")
        assert not watched.refresh() and not watched.refresh()
    critical = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert len(critical) == 1  # once per version, not per request
    assert "revocations and new tokens in it are NOT applied" in critical[0].getMessage()
    assert set(watched.value.agents) == {"a", "b"}
    readable["yes"] = True  # e.g. a chown: the file is taken up at the next refresh
    assert watched.refresh() and set(watched.value.agents) == {"a"}


def test_a_chown_alone_is_a_change(tmp_path):
    path = tmp_path / AGENT_TOKENS_FILE
    issue_agent_token(tmp_path, "a")
    loads = []
    watched = WatchedFile(path, lambda p: loads.append(p) or load_agent_tokens(p))
    assert not watched.refresh() and len(loads) == 1
    path.chmod(0o640)  # same inode, size and mtime; only the ctime moves
    watched.refresh()
    assert len(loads) == 2


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() != 0, reason="needs root")
def test_the_cli_keeps_the_files_owner_so_the_server_can_still_read_it(tmp_path):
    import os

    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 4242, 4243)  # the server's user owns the data dir
    issue_agent_token(data, "a")  # run as root (sudo)
    st = (data / AGENT_TOKENS_FILE).stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4242, 4243, 0o600)
    os.chown(data / AGENT_TOKENS_FILE, 4244, 4245)
    issue_agent_token(data, "b")  # replacing it keeps the previous file's owner
    st = (data / AGENT_TOKENS_FILE).stat()
    assert (st.st_uid, st.st_gid) == (4244, 4245)
    assert sorted(p.name for p in data.iterdir()) == [AGENT_TOKENS_FILE]  # no lock file, no leftovers


def test_the_cli_refuses_to_write_a_file_the_server_could_not_read(tmp_path, monkeypatch):
    import os

    issue_agent_token(tmp_path, "a")
    before = (tmp_path / AGENT_TOKENS_FILE).read_text()
    st = (tmp_path / AGENT_TOKENS_FILE).stat()
    monkeypatch.setattr(os, "geteuid", lambda: st.st_uid + 1)  # someone else runs the CLI

    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", refuse)
    with pytest.raises(PermissionError, match=f"belongs to uid {st.st_uid} .*run this command as that user"):
        issue_agent_token(tmp_path, "b")
    assert (tmp_path / AGENT_TOKENS_FILE).read_text() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_empty_development_credential_file_is_replaced_not_a_crash(tmp_path, caplog):
    from trio_quiccmd.server.auth import AgentAuthenticator
    from trio_quiccmd.tokens import DEV_AGENT_TOKEN_FILE, read_token_file

    (tmp_path / DEV_AGENT_TOKEN_FILE).write_text("\n")
    with caplog.at_level("WARNING", logger="trio_quiccmd"):
        AgentAuthenticator.from_data_dir(tmp_path)
    assert read_token_file(tmp_path / DEV_AGENT_TOKEN_FILE).startswith("qcd_")
    assert private(tmp_path / DEV_AGENT_TOKEN_FILE)
    assert any("Development credential file is empty" in r.getMessage() for r in caplog.records)


# -- a token command run as root in a data dir the server's user owns ------------------------


def _fingerprint(path: Path) -> tuple:
    st = path.stat()
    return (path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_ino, st.st_nlink)


def test_a_lock_file_planted_as_a_link_is_neither_opened_nor_chowned(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    victim = tmp_path / "shadow"
    victim.write_text("root:secret\n")
    victim.chmod(0o640)
    for name in (AGENT_TOKENS_FILE, API_TOKENS_FILE):
        (data / (name + ".lock")).symlink_to(victim)
    before = _fingerprint(victim)
    # As if root ran it for the data dir's owner: every file it makes is chowned.
    monkeypatch.setattr(os, "geteuid", lambda: data.stat().st_uid + 1)
    chowned: list[int] = []
    monkeypatch.setattr(os, "fchown", lambda fd, uid, gid: chowned.append(os.fstat(fd).st_ino))

    issue_agent_token(data, "a")
    revoke_agent_token(data, "a")
    issue_api_token(data, "x", role="read")

    assert _fingerprint(victim) == before
    assert victim.stat().st_ino not in chowned
    assert (data / API_TOKENS_FILE).stat().st_ino == chowned[-1]  # only the files it wrote


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
async def test_as_root_links_planted_in_the_data_dir_give_nothing_away(tmp_path):
    # The review's case: the server's user links its lock file to /etc/shadow;
    # the next `sudo ... token create` made that file theirs.
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 4242, 4243)
    victim = tmp_path / "shadow"
    victim.write_text("root:secret\n")
    victim.chmod(0o600)
    (data / (AGENT_TOKENS_FILE + ".lock")).symlink_to(victim)
    before = _fingerprint(victim)
    with trio.fail_after(TIMEOUT):
        code, out, err = await server_cli(tmp_path, "token", "create", "a", "--data-dir", str(data))
    assert code == 0, err
    assert _fingerprint(victim) == before
    st = (data / AGENT_TOKENS_FILE).stat()
    assert (st.st_uid, st.st_gid) == (4242, 4243)

    # A file the server writes for itself: a link there is replaced, and does
    # not lend the new file its target's owner.
    os.chown(victim, 4244, 4245)
    before = _fingerprint(victim)
    for link in (os.symlink, os.link):
        link(victim, data / DEV_AGENT_TOKEN_FILE)
        write_private(data / DEV_AGENT_TOKEN_FILE, "qcd_new\n")
        st = (data / DEV_AGENT_TOKEN_FILE).lstat()
        assert (stat.S_ISREG(st.st_mode), st.st_uid, st.st_gid, st.st_nlink) == (True, 4242, 4243, 1)
        assert _fingerprint(victim) == before
        os.unlink(data / DEV_AGENT_TOKEN_FILE)


@pytest.mark.parametrize("kind", ["symlink", "hard link", "fifo"])
async def test_token_commands_refuse_a_token_file_that_is_not_the_data_dirs_own(tmp_path, kind):
    data = tmp_path / ".quiccmd"
    data.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / AGENT_TOKENS_FILE).write_text(json.dumps({"version": 1, "agents": {}}))
    (elsewhere / API_TOKENS_FILE).write_text(json.dumps({"version": 1, "tokens": {}}))
    for name in (AGENT_TOKENS_FILE, API_TOKENS_FILE):
        if kind == "symlink":
            (data / name).symlink_to(elsewhere / name)
        elif kind == "hard link":
            os.link(elsewhere / name, data / name)
        else:
            os.mkfifo(data / name)
    expected = {
        "symlink": "a symbolic link; a token command does not follow links in the data dir",
        "hard link": "has 2 hard links (it is also a file elsewhere)",
        "fifo": "not a regular file",
    }[kind]

    def state() -> dict:
        return {p: (p.lstat().st_ino, p.lstat().st_mtime_ns, p.lstat().st_mode) for p in [*data.iterdir(), *elsewhere.iterdir()]}

    before = state()
    commands = [
        ("token", "create", "b"), ("token", "create", "--enrollment"), ("token", "list"),
        ("token", "revoke", "a"), ("api-token", "create", "x", "--role", "read"),
        ("api-token", "list"), ("api-token", "revoke", "a"),
    ]
    with trio.fail_after(TIMEOUT):  # a FIFO must not hang a command either
        for command in commands:
            code, out, err = await server_cli(tmp_path, *command)
            file = AGENT_TOKENS_FILE if command[0] == "token" else API_TOKENS_FILE
            assert (code, out) == (1, ""), (command, err)
            assert err.startswith(f"python -m trio_quiccmd.server: error: .quiccmd/{file}: {expected}"), err
            assert err.count("\n") == 1
    assert state() == before


def test_a_new_data_dir_is_readable_by_its_owner_only_and_an_old_one_keeps_its_mode(tmp_path):
    issue_agent_token(tmp_path / "new", "a")
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    (tmp_path / "old").mkdir()
    (tmp_path / "old").chmod(0o750)
    issue_api_token(tmp_path / "old", "x", role="read")
    assert stat.S_IMODE((tmp_path / "old").stat().st_mode) == 0o750


# -- rotation and bad input ------------------------------------------------------------------


async def test_rotating_an_api_token_keeps_its_role_and_scope_unless_given(tmp_path):
    data = tmp_path / ".quiccmd"

    def record():
        return load_api_tokens(data / API_TOKENS_FILE).tokens["deployer"]

    with trio.fail_after(TIMEOUT):
        code, out, err = await server_cli(
            tmp_path, "api-token", "create", "deployer", "--role", "operate",
            "--command-type", "restart", "--label", "env=prod",
        )
        assert code == 0, err
        first = record()
        code, out, err = await server_cli(tmp_path, "api-token", "create", "deployer", "--replace")
        assert code == 0, err
        assert "API token deployer created (its previous role)" in err
        rotated = record()
        assert rotated.hash == token_hash(out.strip()) != first.hash
        assert (rotated.role, rotated.command_types, rotated.labels) == ("operate", ("restart",), {"env": "prod"})

        # What is given replaces, what is not is kept.
        assert (await server_cli(tmp_path, "api-token", "create", "deployer", "--replace", "--role", "read"))[0] == 0
        assert (record().role, record().command_types, record().labels) == ("read", ("restart",), {"env": "prod"})
        assert (await server_cli(tmp_path, "api-token", "create", "deployer", "--replace",
                                 "--command-type", "echo", "--label", "env=dev"))[0] == 0
        assert (record().role, record().command_types, record().labels) == ("read", ("echo",), {"env": "dev"})

        # A new token needs a role, --replace or not; nothing is written without one.
        before = (data / API_TOKENS_FILE).read_bytes()
        code, out, err = await server_cli(tmp_path, "api-token", "create", "other")
        assert (code, out) == (2, "") and "--role is required" in err and err.count("\n") == 1
        code, out, err = await server_cli(tmp_path, "api-token", "create", "other", "--replace")
        assert (code, out) == (2, "") and "no API token named other to keep the role of" in err
        assert (data / API_TOKENS_FILE).read_bytes() == before


@pytest.mark.parametrize(
    "command, message",
    [
        (("api-token", "create", "x", "--role", "operate", "--command-type", ""),
         "command type '' must be a non-empty string"),
        (("api-token", "create", "x", "--role", "read", "--command-type", "echo\udcff"),
         "command type 'echo\\udcff' is not valid UTF-8 text"),
        (("api-token", "create", "x", "--role", "read", "--label", "env=pr\udcffod"),
         "label env's value 'pr\\udcffod' is not valid UTF-8 text"),
        (("api-token", "create", "bad name", "--role", "read"), "token name 'bad name' must be"),
        (("token", "create", "client/1"), "client_id 'client/1' must be"),
        (("token", "create", "a", "--label", "r\udcffle=web"), "label 'r\\udcffle' is not valid UTF-8 text"),
    ],
)
async def test_bad_names_labels_and_command_types_are_usage_errors_and_nothing_is_written(
    tmp_path, command, message
):
    data = tmp_path / ".quiccmd"
    with trio.fail_after(TIMEOUT):
        # On a data dir that does not exist yet: not even it is made.
        code, out, err = await server_cli(tmp_path, *command)
        assert (code, out) == (2, ""), err
        assert err.startswith(f"python -m trio_quiccmd.server: error: {message}"), err
        assert err.count("\n") == 1
        assert not data.exists()
        # On one that has tokens: they stay as they were, usable.
        issue_agent_token(data, "a")
        issue_api_token(data, "y", role="read")
        before = {p.name: p.read_bytes() for p in data.iterdir()}
        code, out, err = await server_cli(tmp_path, *command)
        assert (code, out) == (2, ""), err
        assert {p.name: p.read_bytes() for p in data.iterdir()} == before
        assert (await server_cli(tmp_path, command[0], "list"))[0] == 0


def test_the_issue_functions_refuse_what_the_loader_would(tmp_path):
    for bad in ({"command_types": [""]}, {"command_types": "echo"}, {"command_types": [1]},
                {"labels": {"k": 1}}, {"labels": {1: "v"}}):
        with pytest.raises(ValueError):
            issue_api_token(tmp_path, "x", role="read", **bad)
    with pytest.raises(ValueError):
        issue_agent_token(tmp_path, "a", labels={"k": None})  # type: ignore[dict-item]
    assert not list(tmp_path.iterdir())


def test_a_token_file_that_is_not_utf8_is_a_token_file_error(tmp_path):
    # Not a UnicodeDecodeError escaping a running server's refresh.
    path = tmp_path / AGENT_TOKENS_FILE
    path.write_bytes(b'{"version": 1, "agents": {"\xff": {}}}')
    with pytest.raises(TokenFileError, match="not valid JSON"):
        load_agent_tokens(path)


def test_a_change_written_while_a_watched_file_is_first_loaded_is_seen(tmp_path):
    path = tmp_path / AGENT_TOKENS_FILE
    issue_agent_token(tmp_path, "a")

    def load_then_someone_writes(p: Path):
        value = load_agent_tokens(p)
        if not loads:
            issue_agent_token(tmp_path, "b")  # lands between the read and the stat
        loads.append(p)
        return value

    loads: list[Path] = []
    watched = WatchedFile(path, load_then_someone_writes)
    assert set(watched.value.agents) == {"a"}
    assert watched.refresh() and set(watched.value.agents) == {"a", "b"}
