"""The operator CLI, ``python -m trio_quiccmd.cli``, as an operator runs it.

Against a real server and agent (the subprocesses of test_e2e), each CLI call
is a subprocess too: what counts is what it prints and its exit status. Bad
usage, which never reaches a server, is checked in-process through ``main``.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import pytest
import trio

from trio_quiccmd import cli

from .processes import clean_env, spawn
from .test_e2e import CLIENT_ID, TIMEOUT, Stack, running_stack


async def run_cli(
    stack: Stack, *args: str, env: dict[str, str] | None = None, stdin: bytes = b""
) -> SimpleNamespace:
    """One ``python -m trio_quiccmd.cli`` run against ``stack``'s API; its exit status and output."""
    host, port = stack.http_address
    result = await trio.run_process(
        [sys.executable, "-m", "trio_quiccmd.cli", *args],
        cwd=str(stack.directory),
        env=clean_env({"QUICCMD_API_URL": f"http://{host}:{port}", **(env or {})}),
        stdin=stdin, capture_stdout=True, capture_stderr=True, check=False,
    )
    out = SimpleNamespace(
        status=result.returncode, stdout=result.stdout.decode(), stderr=result.stderr.decode()
    )
    assert "Traceback" not in out.stderr, out.stderr
    return out


RUN_WITH_SIGINT = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'trio_quiccmd.cli'; runpy.run_module('trio_quiccmd.cli', run_name='__main__')"
)


async def api_command(stack: Stack, command_id: str) -> dict:
    return (await stack.request("GET", f"/api/command/{command_id}")).json()


async def test_send_and_wait_prints_the_result_or_says_why_not(tmp_path: Path):
    async with running_stack(tmp_path) as stack:
        with trio.fail_after(TIMEOUT):
            done = await run_cli(stack, "send", CLIENT_ID, "echo", '{"text": "héllo", "n": [1, 2]}', "--wait")
            assert done.status == 0, done
            assert json.loads(done.stdout) == {"text": "héllo", "n": [1, 2]}
            assert done.stderr.startswith("Waiting for command "), done.stderr

            # The executor raised: exit 1, and the reason on stderr.
            failed = await run_cli(stack, "send", CLIENT_ID, "fail", '{"message": "disk full"}', "--wait")
            assert failed.status == cli.EXIT_COMMAND_NOT_COMPLETED, failed
            assert failed.stdout == ""
            assert "Command failed command_id=" in failed.stderr
            assert "error_code=executor_error error='disk full'" in failed.stderr

            # The deadline passed first.
            late = await run_cli(stack, "send", CLIENT_ID, "sleep", '{"seconds": 5}', "--timeout", "0.3", "--wait")
            assert late.status == cli.EXIT_COMMAND_NOT_COMPLETED, late
            assert "Command timeout " in late.stderr and "error_code=execution_timeout" in late.stderr

            # No such agent: the command exists, failed at once (409), with or without --wait.
            offline = await run_cli(stack, "send", "nobody", "echo", "--json")
            assert offline.status == cli.EXIT_COMMAND_NOT_COMPLETED, offline
            command = json.loads(offline.stdout)
            assert (command["status"], command["error_code"]) == ("failed", "agent_offline")
            assert f"command_id={command['command_id']} client_id=nobody error_code=agent_offline" in offline.stderr

            offline_waited = await run_cli(stack, "send", "nobody", "echo", "--wait")
            assert offline_waited.status == cli.EXIT_COMMAND_NOT_COMPLETED, offline_waited
            assert (offline_waited.stdout, offline_waited.stderr.count("error_code=agent_offline")) == ("", 1)

            # The payload may follow the options, or be given as one (for a payload that starts with -).
            after = await run_cli(stack, "send", CLIENT_ID, "echo", "--wait", '{"a": 1}')
            assert (after.status, json.loads(after.stdout)) == (0, {"a": 1}), after
            negative = await run_cli(stack, "send", CLIENT_ID, "echo", "--payload=-1", "--wait")
            assert (negative.status, json.loads(negative.stdout)) == (0, -1), negative

            # --json with --wait: the whole command, whatever its end.
            whole = await run_cli(stack, "send", CLIENT_ID, "echo", "--payload-file", "-", "--wait", "--json",
                                  stdin=b'{"from": "stdin"}')
            assert whole.status == 0, whole
            command = json.loads(whole.stdout)
            assert command["status"] == "completed" and command["result"] == {"from": "stdin"}
            assert command == await api_command(stack, command["command_id"])


async def test_send_get_list_cancel_and_clients(tmp_path: Path):
    async with running_stack(tmp_path) as stack:
        with trio.fail_after(TIMEOUT):
            sent = await run_cli(stack, "send", CLIENT_ID, "sleep", '{"seconds": 30}', "--priority", "3")
            assert sent.status == 0, sent
            command_id = sent.stdout.strip()  # just the id: id=$(... send ...) works
            assert (await api_command(stack, command_id))["status"] == "executing"

            shown = await run_cli(stack, "get", command_id)
            assert shown.status == 0, shown
            block = dict(line.split(None, 1) for line in shown.stdout.splitlines())
            assert block["command_id"] == command_id
            assert (block["client_id"], block["command_type"], block["status"]) == (CLIENT_ID, "sleep", "executing")
            assert (block["priority"], block["payload"]) == ("3", '{"seconds": 30}')
            assert block["completed_at"] == "-"

            # A long poll that ends before the command does shows it as it is,
            # and says so by its status.
            polled = await run_cli(stack, "get", command_id, "--wait", "0.2", "--json")
            assert json.loads(polled.stdout)["status"] == "executing"
            assert polled.status == cli.EXIT_STILL_RUNNING, polled

            quick = await run_cli(stack, "send", CLIENT_ID, "echo")
            listed = await run_cli(stack, "list", "--client", CLIENT_ID)
            assert listed.status == 0, listed
            lines = listed.stdout.splitlines()
            assert lines[0].split() == ["COMMAND_ID", "CLIENT_ID", "TYPE", "STATUS", "CREATED_AT", "ERROR_CODE"]
            assert [line.split()[0] for line in lines[1:]] == [quick.stdout.strip(), command_id]  # newest first

            page = await run_cli(stack, "list", "--status", "executing", "--json")
            assert [c["command_id"] for c in json.loads(page.stdout)["commands"]] == [command_id]
            first = await run_cli(stack, "list", "--limit", "1")
            assert f"(more: add --cursor {quick.stdout.strip()})" in first.stderr
            second = await run_cli(stack, "list", "--limit", "1", "--cursor", quick.stdout.strip(), "--json")
            assert [c["command_id"] for c in json.loads(second.stdout)["commands"]] == [command_id]

            cancelled = await run_cli(stack, "cancel", command_id, "--reason", "wrong host")
            assert cancelled.status == 0, cancelled
            assert "status        cancelled" in cancelled.stdout
            assert "error         cancelled: wrong host" in cancelled.stdout
            assert (await api_command(stack, command_id))["status"] == "cancelled"
            # Shown, a command that did not complete is exit 1, as for send;
            # one that did is 0, waited for or not.
            shown = await run_cli(stack, "get", command_id, "--wait", "5")
            assert shown.status == cli.EXIT_COMMAND_NOT_COMPLETED, shown
            assert "status        cancelled" in shown.stdout
            done = await run_cli(stack, "get", quick.stdout.strip(), "--wait", "5")
            assert done.status == 0, done
            again = await run_cli(stack, "cancel", command_id)
            assert again.status == cli.EXIT_REFUSED, again
            assert "already_finished: command " in again.stderr and "(HTTP 409)" in again.stderr

            clients = await run_cli(stack, "clients")
            rows = [line.split() for line in clients.stdout.splitlines()]
            assert rows[0] == ["CLIENT_ID", "REMOTE_ADDRESS", "CONNECTED_AT", "IN_FLIGHT", "QUEUED", "LABELS"]
            assert [(r[0], r[-1]) for r in rows[1:]] == [(CLIENT_ID, "env=test")]

            audit = await run_cli(stack, "audit", "--action", "cancel", "--json")
            entries = json.loads(audit.stdout)["entries"]
            assert [(e["command_id"], e["outcome"]) for e in entries] == [
                (command_id, "refused"), (command_id, "accepted"),
            ]


async def test_bad_input_gets_a_clear_error_and_sends_nothing(tmp_path: Path):
    async with running_stack(tmp_path) as stack:
        with trio.fail_after(TIMEOUT):
            # Refused by the CLI itself (exit 2): nothing reaches the server.
            for args, message in [
                (("send", CLIENT_ID, "echo", "{not json"), "the payload is not valid JSON"),
                (("send", CLIENT_ID, "echo", '{"x": NaN}'), "NaN is not JSON"),
                (("send", CLIENT_ID, "echo", "{}", "--payload-file", "p.json"), "give the payload once"),
                (("send", CLIENT_ID, "echo", "--payload-file", "missing.json"), "cannot read it"),
                (("send", CLIENT_ID, "echo", "--timeout", "inf"), "not a finite number of seconds"),
                (("send", CLIENT_ID, "echo", "--timeout", "-1"), "-1 seconds: must be greater than 0"),
                (("send", CLIENT_ID, "echo", "--connect-timeout", "-1"), "must be at least 0"),
                (("get", "x", "--wait", "-5"), "-5 seconds: must be at least 0"),
                (("send", CLIENT_ID, "echo", '{"x": 1e999}'), "1e999 is out of range for a number"),
                (("send", CLIENT_ID, "echo", "[" * 100_000), "is nested too deeply"),
                (("send", CLIENT_ID, "echo", "{}", "--payload", "{}"), "give the payload once"),
                (("send", CLIENT_ID, "echo", "{}", "extra"), "unrecognized arguments: extra"),
                (("send", CLIENT_ID, "echo", "--priority", "high"), "'high': must be an integer from"),
                (("send", CLIENT_ID, "echo", "--priority", str(2**31)), "must be an integer from -2147483648"),
                (("list", "--status", "done"), "invalid choice: 'done'"),
                # Found in review: what the API refuses whatever its settings
                # was a refusal (3), and an empty filter listed everything.
                (("list", "--limit", "0"), "argument --limit: '0': must be an integer from 1 to 1000"),
                (("list", "--limit", "5000"), "must be an integer from 1 to 1000"),
                (("audit", "--limit", "ten"), "must be an integer from 1 to 1000"),
                (("list", "--created-after", "yesterday"), "'yesterday': must be an RFC 3339 time with an offset"),
                (("list", "--created-before", "2026-11-31T00:00:00Z"), "must be an RFC 3339 time"),
                (("list", "--cursor", "bad"), "'bad': must be a cursor that list printed"),
                (("audit", "--cursor", "-1"), "'-1': must be a cursor that audit printed"),
                (("list", "--client", ""), "argument --client: '': must not be empty"),
                (("list", "--type", ""), "argument --type: '': must not be empty"),
                (("audit", "--actor", ""), "argument --actor: '': must not be empty"),
                (("audit", "--command-id", ""), "argument --command-id: '': must not be empty"),
                (("clients", "--api-url", "ftp://localhost"), "the scheme must be http or https"),
            ]:
                result = await run_cli(stack, *args)
                assert result.status == cli.EXIT_USAGE, (args, result)
                assert message in result.stderr, (args, result.stderr)
            not_utf8 = await run_cli(stack, "send", CLIENT_ID, "echo", "--payload-file", "-", stdin=b'"\xff"')
            assert not_utf8.status == cli.EXIT_USAGE and "is not UTF-8" in not_utf8.stderr, not_utf8
            # A token with a line break would be sent as a broken header: refused, and not echoed.
            two_lines = await run_cli(stack, "clients", env={"QUICCMD_API_TOKEN": "secret-one\nsecret-two"})
            assert two_lines.status == cli.EXIT_USAGE, two_lines
            assert "QUICCMD_API_TOKEN is not one API token" in two_lines.stderr
            assert "secret" not in two_lines.stderr
            # Refused by the server (exit 3), with its code and message.
            too_long = await run_cli(stack, "send", CLIENT_ID, "echo", "--timeout", "100000")
            assert too_long.status == cli.EXIT_REFUSED, too_long
            assert "invalid_command: timeout must be at most" in too_long.stderr and "(HTTP 400)" in too_long.stderr
            unknown = await run_cli(stack, "get", "no-such-id")
            assert unknown.status == cli.EXIT_REFUSED
            assert "not_found: no command with id 'no-such-id' (HTTP 404)" in unknown.stderr
            # A time with an offset goes as it is, its "+" encoded.
            offset = await run_cli(stack, "list", "--created-after", "2026-11-28T10:00:00+01:00")
            assert offset.status == 0, offset

            assert (await stack.request("GET", "/api/commands")).json()["commands"] == []


async def test_an_interrupted_wait_names_the_command_which_goes_on(tmp_path: Path):
    async with running_stack(tmp_path) as stack:
        host, port = stack.http_address
        # SIGINT's default action restored first: a test run started in the
        # background inherits it ignored, and so would the CLI.
        async with spawn(
            [sys.executable, "-c", RUN_WITH_SIGINT, "--api-url", f"{host}:{port}",
             "send", CLIENT_ID, "sleep", '{"seconds": 30}', "--wait"],
            cwd=stack.directory, name="cli",
        ) as waiting:
            with trio.fail_after(TIMEOUT):
                line = await waiting.stderr.wait_for("Waiting for command ")
                command_id = line.split()[3]
                waiting.process.send_signal(signal.SIGINT)
                assert await waiting.process.wait() == cli.EXIT_INTERRUPTED
                await waiting.stderr.closed.wait()
        # What to run next, against the same server.
        assert (
            f"interrupted; command {command_id} was accepted and goes on: see it with "
            f"'python -m trio_quiccmd.cli --api-url {host}:{port} get {command_id} --wait 60', "
            f"stop it with 'python -m trio_quiccmd.cli --api-url {host}:{port} cancel {command_id}'"
        ) in str(waiting.stderr)
        assert "Traceback" not in str(waiting.stderr)
        with trio.fail_after(TIMEOUT):
            assert (await api_command(stack, command_id))["status"] == "executing"
            stopped = await run_cli(stack, "cancel", command_id)
            assert stopped.status == 0, stopped


async def test_what_people_read_is_escaped_and_a_closed_pipe_keeps_the_verdict(tmp_path: Path):
    async with running_stack(tmp_path) as stack:
        with trio.fail_after(TIMEOUT):
            command_id = (await run_cli(stack, "send", CLIENT_ID, "sleep", '{"seconds": 30}')).stdout.strip()
            forged = "line1\nstatus        completed\x1b[31m"
            cancelled = await run_cli(stack, "cancel", command_id, "--reason", forged)
            assert cancelled.status == 0, cancelled
            shown = (await run_cli(stack, "get", command_id)).stdout
            assert "error         cancelled: line1\\x0astatus        completed\\x1b[31m" in shown
            assert "\x1b" not in shown
            assert [line for line in shown.splitlines() if line.startswith("status")] == ["status        cancelled"]

            # stdout's reader is gone before anything is written: the failed
            # command is still told on stderr, and the status is SIGPIPE's.
            host, port = stack.http_address
            process = subprocess.Popen(
                [sys.executable, "-m", "trio_quiccmd.cli", "--api-url", f"{host}:{port}",
                 "send", CLIENT_ID, "fail", "--wait", "--json"],
                cwd=stack.directory, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            process.stdout.close()
            _, stderr = await trio.to_thread.run_sync(process.communicate)
            assert process.returncode == 141, stderr
            assert b"Command failed command_id=" in stderr and b"Traceback" not in stderr


async def test_api_tokens_from_a_file_or_the_environment(tmp_path: Path):
    def create(name: str, role: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "trio_quiccmd.server", "api-token", "create", name, "--role", role],
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, check=True,
        ).stdout.strip()

    (tmp_path / "alice.token").write_text(create("alice", "operate") + "\n")
    reader = create("grafana", "read")
    async with running_stack(tmp_path) as stack:
        with trio.fail_after(TIMEOUT):
            # A token that is sent is checked, on loopback too.
            bogus = await run_cli(stack, "clients", env={"QUICCMD_API_TOKEN": "not-a-token"})
            assert bogus.status == cli.EXIT_REFUSED, bogus
            assert "unauthorized: " in bogus.stderr and "(HTTP 401)" in bogus.stderr
            assert "the API token comes from --token-file FILE, QUICCMD_API_TOKEN" in bogus.stderr

            alice = await run_cli(stack, "send", CLIENT_ID, "echo", "--wait", "--token-file", "alice.token")
            assert alice.status == 0, alice
            by_env = await run_cli(stack, "send", CLIENT_ID, "echo", "--wait",
                                   env={"QUICCMD_API_TOKEN_FILE": str(tmp_path / "alice.token")})
            assert by_env.status == 0, by_env

            readonly = await run_cli(stack, "send", CLIENT_ID, "echo", env={"QUICCMD_API_TOKEN": reader})
            assert readonly.status == cli.EXIT_REFUSED, readonly
            assert "forbidden: " in readonly.stderr and "(HTTP 403)" in readonly.stderr
            listed = await run_cli(stack, "audit", "--outcome", "refused", "--json",
                                   env={"QUICCMD_API_TOKEN": reader})
            assert [(e["actor"], e["error_code"]) for e in json.loads(listed.stdout)["entries"]] == [
                ("grafana", "forbidden"),
            ]


# -- without a server -------------------------------------------------------------------


def run_main(*argv: str, environ: dict[str, str] | None = None, stdin: str = "") -> SimpleNamespace:
    streams = cli.Io(io.StringIO(), io.StringIO(), io.StringIO(stdin))
    status = cli.main(list(argv), environ=environ or {}, io=streams)
    return SimpleNamespace(status=status, stdout=streams.stdout.getvalue(), stderr=streams.stderr.getvalue())


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def fake_server(answer: Callable[[socket.socket], None]) -> Iterator[int]:
    """A TCP server on loopback that reads one request and lets ``answer`` respond; its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    requests: list[bytes] = []

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            requests.append(connection.recv(65536))
            answer(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(5)


def proxy_error_page(connection: socket.socket) -> None:
    body = b"<html><body>502 Bad Gateway</body></html>"
    connection.sendall(
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )


def cut_short(connection: socket.socket) -> None:
    connection.sendall(
        b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
        b'{"command_id": "01a2'
    )


def hang_up(connection: socket.socket) -> None:
    pass


@pytest.mark.parametrize("answer, why", [
    (proxy_error_page, "answered 502 Bad Gateway without a quiccmd JSON answer"),
    (cut_short, "no answer from"),
    (hang_up, "no answer from"),
])
def test_a_send_without_a_clear_answer_may_have_been_accepted(answer, why):
    with fake_server(answer) as port:
        result = run_main("--api-url", f"127.0.0.1:{port}", "send", "web 1", "echo")
    assert result.status == cli.EXIT_UNREACHABLE, result
    assert why in result.stderr
    # Where to look, against the same server, the id quoted for the shell.
    assert (
        f"the command may have been accepted: look for it with 'python -m trio_quiccmd.cli "
        f"--api-url 127.0.0.1:{port} list --client 'web 1' --limit 5'"
    ) in result.stderr


def command_answer(http_status: int, **fields: object) -> Callable[[socket.socket], None]:
    """A fake server's answer: HTTP ``http_status`` with a command of ``fields``."""
    command = {
        "command_id": "01a2-1", "client_id": "a", "command_type": "echo", "payload": {},
        "status": "completed", "result": None, "error": None, "error_code": None,
        "priority": 0, "timeout": 30.0, "connect_timeout": 0.0, "created_at": "t", "sent_at": "t",
        "completed_at": "t", **fields,
    }

    def answer(connection: socket.socket) -> None:
        body = json.dumps(command).encode()
        connection.sendall(
            b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (http_status, len(body), body)
        )

    return answer


@pytest.mark.parametrize("answer, exit_status, stdout", [
    # Found in review: the API answers 200 for a command that ended before
    # its send was answered; the CLI took it for no answer of the API.
    (command_answer(200, status="timeout", error="not delivered in time", error_code="delivery_timeout"),
     cli.EXIT_COMMAND_NOT_COMPLETED, ""),
    (command_answer(200, status="cancelled", error="wrong host", error_code="cancelled"),
     cli.EXIT_COMMAND_NOT_COMPLETED, ""),
    (command_answer(200, result={"x": 1}), 0, "01a2-1\n"),
    (command_answer(202, status="executing"), 0, "01a2-1\n"),
])
def test_a_send_without_wait_exits_by_the_command_it_is_answered(answer, exit_status, stdout):
    with fake_server(answer) as port:
        result = run_main("--api-url", f"127.0.0.1:{port}", "send", "a", "echo")
    assert (result.status, result.stdout) == (exit_status, stdout), result
    if exit_status:
        assert result.stderr.startswith("Command "), result.stderr
        assert "command_id=01a2-1 client_id=a error_code=" in result.stderr


def test_an_answer_that_trickles_is_cut_at_the_deadline():
    def trickle(connection: socket.socket) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
        for _ in range(200):
            try:
                connection.sendall(b" ")
            except OSError:
                return
            time.sleep(0.02)

    with fake_server(trickle) as port:
        api = cli.ApiClient(cli._parse_api_url(f"127.0.0.1:{port}"))
        started = time.monotonic()
        with pytest.raises(cli.Unreachable, match="timed out"):
            api.call("GET", "/api/clients", answer_within=0.5)
        assert time.monotonic() - started < 2


def test_a_result_that_is_not_text_is_printed_escaped():
    # An agent may answer a lone surrogate (the server passes it on escaped):
    # printing it must not fail the CLI.
    answer = command_answer(200, result={"text": "x\ud800"})
    for json_flag in ([], ["--json"]):
        with fake_server(answer) as port:
            result = run_main("--api-url", f"127.0.0.1:{port}", "get", "01a2-1", *json_flag)
        assert result.status == 0, result.stderr
        assert "\\ud800" in result.stdout
        result.stdout.encode("utf-8")  # printable as it is


def test_an_answer_of_a_shape_it_does_not_know_is_an_internal_error_not_a_failed_command():
    def odd(connection: socket.socket) -> None:
        body = b'{"clients": [{"name": "x"}]}'
        connection.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )

    with fake_server(odd) as port:
        result = run_main("--api-url", f"127.0.0.1:{port}", "clients")
    assert result.status == cli.EXIT_INTERNAL
    assert "internal error (please report it)" in result.stderr and "KeyError" in result.stderr


def test_a_server_that_does_not_answer_is_exit_4_and_says_where():
    port = closed_port()
    result = run_main("--api-url", f"127.0.0.1:{port}", "clients")
    assert result.status == cli.EXIT_UNREACHABLE
    assert f"cannot reach http://127.0.0.1:{port}/api/clients: connection refused" in result.stderr
    # Refused before anything was sent: a send says so plainly, without a "may have been accepted".
    result = run_main("send", "a", "echo", environ={"QUICCMD_API_URL": f"http://127.0.0.1:{port}"})
    assert result.status == cli.EXIT_UNREACHABLE
    assert "may have been accepted" not in result.stderr


@pytest.mark.parametrize("url, message", [
    ("http://", "has no host"),
    ("http://host:99999", "the port is not a number"),
    ("http://host:8080/?x=1", "without ? or #"),
    ("gopher://host", "the scheme must be http or https"),
    ("http://admin:hunter2@host", "holds a user name or password"),
])
def test_a_bad_api_url_is_a_usage_error(url: str, message: str):
    result = run_main("--api-url", url, "clients")
    assert result.status == cli.EXIT_USAGE
    assert message in result.stderr
    assert "hunter2" not in result.stderr


def test_token_sources_in_order(tmp_path: Path):
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    result = run_main("--token-file", str(empty), "clients")
    assert (result.status, result.stderr.strip()) == (
        cli.EXIT_USAGE, f"python -m trio_quiccmd.cli: error: --token-file {empty} is empty",
    )
    missing = run_main("clients", environ={"QUICCMD_API_TOKEN_FILE": str(tmp_path / "nope")})
    assert missing.status == cli.EXIT_USAGE
    assert "QUICCMD_API_TOKEN_FILE" in missing.stderr and "cannot read the token" in missing.stderr
    # --ca-file only means something for https.
    result = run_main("--ca-file", "ca.pem", "clients")
    assert result.status == cli.EXIT_USAGE and "--ca-file is for an https:// API URL" in result.stderr


def test_connection_options_go_before_or_after_the_subcommand():
    parser = cli.build_parser()
    before = parser.parse_args(["--api-url", "h:1", "--json", "clients"])
    after = parser.parse_args(["clients", "--api-url", "h:1", "--json"])
    neither = parser.parse_args(["clients"])
    assert (before.api_url, before.json) == (after.api_url, after.json) == ("h:1", True)
    assert (neither.api_url, neither.json) == (None, False)
