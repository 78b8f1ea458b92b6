"""Credentials on disk and the commands that manage them:
``python -m trio_quiccmd.server token|api-token ...`` as real subprocesses,
the files they write, and the running server's view of changes."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
import trio

from trio_quiccmd.tokens import (
    AGENT_TOKENS_FILE,
    API_TOKENS_FILE,
    TokenFileError,
    WatchedFile,
    issue_agent_token,
    load_agent_tokens,
    load_api_tokens,
    token_hash,
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
        assert code == 1 and "client_id 'bad id!' must be" in err


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
    lock = (data / (AGENT_TOKENS_FILE + ".lock")).stat()
    assert (lock.st_uid, lock.st_gid) == (4242, 4243)


def test_the_cli_refuses_to_write_a_file_the_server_could_not_read(tmp_path, monkeypatch):
    import os

    issue_agent_token(tmp_path, "a")
    before = (tmp_path / AGENT_TOKENS_FILE).read_text()
    st = (tmp_path / AGENT_TOKENS_FILE).stat()
    monkeypatch.setattr(os, "geteuid", lambda: st.st_uid + 1)  # someone else runs the CLI

    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", refuse)
    with pytest.raises(TokenFileError, match=f"belongs to uid {st.st_uid} .*run this command as that user"):
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
