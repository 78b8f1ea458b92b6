"""End to end, as a new user runs it: ``python -m trio_quiccmd.server`` and
``python -m trio_quiccmd.agent`` as real subprocesses on free loopback ports,
started from one directory (the agent finds ``.quiccmd/server-cert.pem`` there
and verifies the server with it; no TLS flags), driven over HTTP/1.1.

Nothing here imports the server or the agent: the only ways in are the
command lines, the HTTP API and the processes' output, exit codes and signals.

Waiting is event-driven where the processes say something (a wake-up per
output chunk); where only the API can tell (an agent listed by
``/api/clients``), polling is bounded. Every test runs under ``trio.fail_after``.
"""

from __future__ import annotations

import signal
import socket
import sys
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator

import attrs
import h11
import pytest
import trio

from .processes import ProcessEnded, spawn
from .httpclient import NO_BODY, HttpResponse, check_openapi, http, samples

#: Per test. Each test starts two Python processes that import aioquic/quart.
TIMEOUT = 30
CLIENT_ID = "e2e-1"
#: The servers here take small bodies, so 413 is cheap to provoke.
MAX_PAYLOAD_BYTES = 16384
SHUTDOWN_GRACE = 1.0
LISTENING = "quiccmd server listening "

COMMAND_FIELDS = [
    "command_id", "client_id", "command_type", "payload", "status", "result", "error",
    "error_code", "priority", "timeout", "connect_timeout", "created_at", "sent_at",
    "completed_at",
]
API_PATHS = {
    "/api/command", "/api/command/{command_id}", "/api/command/{command_id}/cancel",
    "/api/commands", "/api/clients", "/api/audit", "/healthz", "/metrics", "/openapi.json",
}


# -- subprocesses -------------------------------------------------------------------


def free_port(kind: int) -> int:
    """A port nothing listens on right now (the server is told it explicitly)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the stack: one server and one agent, both real processes ---------------------------------


@attrs.define
class Stack:
    directory: Path
    http_address: tuple[str, int]
    quic_address: str
    server: SimpleNamespace
    agent: SimpleNamespace
    document: dict = attrs.field(factory=dict)

    async def request(self, method: str, target: str, json_body: Any = NO_BODY, **kw: Any) -> HttpResponse:
        return await http(self.http_address, method, target, json_body, **kw)

    async def send(self, expect: int, **fields: Any) -> dict:
        """POST /api/command; checks the status and the OpenAPI schema; returns the body."""
        response = await self.request("POST", "/api/command", fields)
        assert response.status == expect, (fields, response.status, response.body[:300])
        check_openapi(self.document, "POST", "/api/command", response)
        return response.json()

    async def get(self, target: str, path: str, expect: int = 200) -> Any:
        response = await self.request("GET", target)
        assert response.status == expect, (target, response.status, response.body[:300])
        check_openapi(self.document, "GET", path, response)
        return response.json()

    def output(self) -> str:
        return (
            f"--- server stdout\n{self.server.stdout}\n--- server stderr\n{self.server.stderr}\n"
            f"--- agent stderr\n{self.agent.stderr}"
        )


async def start_server(
    directory: Path, exits: AsyncExitStack, extra_args: tuple[str, ...] = ()
) -> tuple[SimpleNamespace, str]:
    """``python -m trio_quiccmd.server`` on free ports; returns it and its "listening" line.

    A port picked free can be taken by someone else before the server binds
    it; then the server says "cannot listen" and exits 1, and we pick again.
    """
    for attempt in range(3):
        http_port, quic_port = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
        server = await exits.enter_async_context(spawn(name="server", argv=[
            sys.executable, "-m", "trio_quiccmd.server",
            "--http", f"127.0.0.1:{http_port}",
            "--quic", f"127.0.0.1:{quic_port}",
            "--max-payload-bytes", str(MAX_PAYLOAD_BYTES),
            "--shutdown-grace", str(SHUTDOWN_GRACE),
            *extra_args,
        ], cwd=directory))
        try:
            with trio.fail_after(TIMEOUT):
                line = await server.stdout.wait_for(LISTENING)
        except ProcessEnded:
            with trio.fail_after(TIMEOUT):
                await server.process.wait()
                await server.stderr.closed.wait()
            if attempt < 2 and server.process.returncode == 1 and server.stderr.matching("cannot listen on"):
                continue
            raise AssertionError(f"the server did not start:\n{server.stderr}") from None
        # It listens exactly where it was told, and says so on stdout.
        assert line == f"{LISTENING}http=http://127.0.0.1:{http_port} quic=127.0.0.1:{quic_port}", line
        return server, line
    raise AssertionError("unreachable")


@asynccontextmanager
async def running_stack(directory: Path, server_args: tuple[str, ...] = ()) -> AsyncIterator[Stack]:
    """A server (with ``server_args`` too) and an agent started from ``directory``, as the README says.

    On a normal exit both are stopped with SIGTERM and must exit 0, with no
    traceback in their logs.
    """
    # Setup is bounded wait by wait: a cancel scope may not span the
    # nurseries the exit stack opens for the processes.
    async with AsyncExitStack() as exits:
        server, line = await start_server(directory, exits, server_args)
        http_url = line.split("http=", 1)[1].split()[0]
        host, port = http_url.removeprefix("http://").rsplit(":", 1)
        quic_address = line.rsplit("quic=", 1)[1]
        with trio.fail_after(TIMEOUT):
            health = await http((host, int(port)), "GET", "/healthz")
            assert health.status == 200, health
            assert health.json() == {"status": "ok", "connected_agents": 0, "unfinished_commands": 0}
            assert (directory / ".quiccmd" / "server-cert.pem").is_file()
            # (stderr is its own pipe: the line may come after stdout's.)
            await server.stderr.wait_for(
                "Created development TLS certificate path=.quiccmd/server-cert.pem fingerprint=sha256:"
            )

        agent = await exits.enter_async_context(spawn(name="agent", argv=[
            sys.executable, "-m", "trio_quiccmd.agent",
            "--id", CLIENT_ID, "--server", quic_address, "--label", "env=test",
        ], cwd=directory))
        stack = Stack(directory, (host, int(port)), quic_address, server, agent)
        with trio.fail_after(TIMEOUT):
            try:
                await agent.stderr.wait_for("Connected to server")
            except ProcessEnded:
                raise AssertionError(f"the agent did not connect\n{stack.output()}") from None
            # No TLS flags: it found the server's certificate in ./.quiccmd and verifies with it.
            assert agent.stderr.matching(
                "Using the server certificate from the data dir as CA ca_file=.quiccmd/server-cert.pem"
            ), stack.output()
            assert agent.stderr.matching("tls=ca-file"), stack.output()
            # Nor credential flags: the server wrote a development credential
            # into ./.quiccmd, the agent found and sent it, the server took it.
            assert (directory / ".quiccmd" / "agent-dev-token").stat().st_mode & 0o777 == 0o600
            assert server.stderr.matching(
                "Agent authentication mode=development credential=.quiccmd/agent-dev-token created=True"
            ), stack.output()
            assert agent.stderr.matching(
                "Using the development credential from the data dir token_file=.quiccmd/agent-dev-token"
            ), stack.output()
            await server.stderr.wait_for(f"Agent connected client_id={CLIENT_ID} ")
            assert server.stderr.matching("credential=development"), stack.output()
            # The agent says it is connected once the server welcomed it; the API
            # should list it by then. Bounded, in case it lags.
            for _ in range(100):
                clients = (await stack.request("GET", "/api/clients")).json()["clients"]
                if clients:
                    break
                await trio.sleep(0.01)
            assert [c["client_id"] for c in clients] == [CLIENT_ID], stack.output()

            openapi = await stack.request("GET", "/openapi.json")
            assert openapi.status == 200
            stack.document = openapi.json()

        yield stack

        for name, proc in [("agent", agent), ("server", server)]:
            if proc.process.returncode is None:
                proc.process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                code = await proc.process.wait()
                await proc.stderr.closed.wait()
            assert code == 0, f"{name} exited {code}\n{stack.output()}"
            assert not proc.stderr.matching("Traceback"), stack.output()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(tmp_path) as running:
        yield running


async def test_the_heap_is_frozen_once_enough_agents_are_connected(tmp_path: Path):
    # With the threshold at one agent, the server's periodic look (every 5 s)
    # freezes the heap; at shutdown it is unfrozen and the server exits 0.
    async with running_stack(tmp_path, ("--gc-freeze-agents", "1")) as stack:
        with trio.fail_after(TIMEOUT):
            await stack.server.stderr.wait_for("Heap frozen agents=1")
        assert stack.server.stderr.matching("Heap collected before freezing unreachable="), stack.output()


def command_url(command: dict) -> str:
    return f"/api/command/{command['command_id']}"


# -- sending, getting, long-polling, listing, cancelling ---------------------------------------


async def test_send_get_long_poll_list_and_cancel(stack: Stack):
    with trio.fail_after(TIMEOUT):
        # Send and wait: 200 with the final command, the payload echoed back.
        payload = {"hello": ["wörld", 1], "nested": {"n": None}}
        echoed = await stack.send(200, client_id=CLIENT_ID, command_type="echo", payload=payload, wait=True)
        assert list(echoed) == COMMAND_FIELDS
        assert echoed["status"] == "completed" and echoed["result"] == payload
        assert echoed["error"] is None and echoed["error_code"] is None
        assert (echoed["timeout"], echoed["connect_timeout"], echoed["priority"]) == (30, 0, 0)
        for stamp in ("created_at", "sent_at", "completed_at"):
            assert echoed[stamp].endswith("Z"), echoed
        assert echoed["created_at"] <= echoed["sent_at"] <= echoed["completed_at"]

        # Send without waiting: 202 while it runs, then look it up.
        slow = await stack.send(202, client_id=CLIENT_ID, command_type="sleep",
                                payload={"seconds": 1}, priority=3)
        assert slow["status"] == "executing" and slow["completed_at"] is None
        assert slow["sent_at"] is not None and slow["priority"] == 3
        now = await stack.get(command_url(slow), "/api/command/{command_id}")
        assert now["status"] == "executing"
        assert {k: v for k, v in now.items() if k != "status"} == {k: v for k, v in slow.items() if k != "status"}

        # A long poll that runs out answers with the state it found, after the wait.
        start = trio.current_time()
        short = await stack.get(command_url(slow) + "?wait=0.2", "/api/command/{command_id}")
        assert trio.current_time() - start >= 0.2
        assert short["status"] == "executing"

        # A long poll answers when the command ends, well before its wait.
        start = trio.current_time()
        done = await stack.get(command_url(slow) + "?wait=30", "/api/command/{command_id}")
        assert trio.current_time() - start < 10
        assert done["status"] == "completed" and done["result"] == {"slept": 1}
        assert done["completed_at"] is not None

        # More outcomes, to list: an executor failure, an offline agent.
        failed = await stack.send(200, client_id=CLIENT_ID, command_type="fail",
                                  payload={"message": "disk full"}, wait=True)
        assert (failed["status"], failed["error"], failed["error_code"]) == ("failed", "disk full", "executor_error")
        ghosts = [await stack.send(409, client_id="ghost", command_type="echo", payload=i) for i in range(3)]
        info = await stack.send(200, client_id=CLIENT_ID, command_type="sysinfo", wait=True)
        assert info["status"] == "completed" and info["result"]["pid"] > 0

        newest_first = [info, *reversed(ghosts), failed, slow, echoed]
        ids = [c["command_id"] for c in newest_first]
        everything = await stack.get("/api/commands", "/api/commands")
        assert [c["command_id"] for c in everything["commands"]] == ids
        assert everything["next_cursor"] is None
        assert everything["commands"][0] == info

        # Pages of two, following next_cursor, add up to the whole list.
        seen, pages, target = [], 0, "/api/commands?limit=2"
        while True:
            page = await stack.get(target, "/api/commands")
            assert 1 <= len(page["commands"]) <= 2
            seen += [c["command_id"] for c in page["commands"]]
            pages += 1
            if page["next_cursor"] is None:
                break
            target = f"/api/commands?limit=2&cursor={page['next_cursor']}"
        assert (seen, pages) == (ids, 4)

        # Filters, alone and together, with a cursor.
        mine = await stack.get(f"/api/commands?client_id={CLIENT_ID}", "/api/commands")
        assert [c["command_id"] for c in mine["commands"]] == [info["command_id"], failed["command_id"],
                                                               slow["command_id"], echoed["command_id"]]
        first = await stack.get("/api/commands?client_id=ghost&limit=2", "/api/commands")
        assert [c["command_id"] for c in first["commands"]] == ids[1:3]
        rest = await stack.get(f"/api/commands?client_id=ghost&limit=2&cursor={first['next_cursor']}",
                               "/api/commands")
        assert [c["command_id"] for c in rest["commands"]] == ids[3:4] and rest["next_cursor"] is None
        by_status = await stack.get("/api/commands?status=failed", "/api/commands")
        assert [c["command_id"] for c in by_status["commands"]] == ids[1:5]
        by_type = await stack.get("/api/commands?command_type=echo&status=completed", "/api/commands")
        assert [c["command_id"] for c in by_type["commands"]] == [echoed["command_id"]]
        both = await stack.get(f"/api/commands?client_id={CLIENT_ID}&status=failed&command_type=fail",
                               "/api/commands")
        assert [c["command_id"] for c in both["commands"]] == [failed["command_id"]]
        nothing = await stack.get("/api/commands?status=cancelled", "/api/commands")
        assert nothing == {"commands": [], "next_cursor": None}
        blank = await stack.get("/api/commands?client_id=&command_type=&cursor=", "/api/commands")
        assert [c["command_id"] for c in blank["commands"]] == ids

        # Cancel a long sleep: 200 cancelled, the agent stops it, a second cancel is 409.
        long = await stack.send(202, client_id=CLIENT_ID, command_type="sleep",
                                payload={"seconds": 60}, timeout=120)
        assert long["status"] == "executing"
        cancel_url = command_url(long) + "/cancel"
        response = await stack.request("POST", cancel_url, {"reason": "e2e says stop"})
        assert response.status == 200, response.body
        check_openapi(stack.document, "POST", "/api/command/{command_id}/cancel", response)
        cancelled = response.json()
        assert (cancelled["status"], cancelled["error"], cancelled["error_code"]) == (
            "cancelled", "e2e says stop", "cancelled")
        assert cancelled["completed_at"] is not None
        await stack.agent.stderr.wait_for(f"Command cancelled command_id={long['command_id']}")

        again = await stack.request("POST", cancel_url)
        assert again.status == 409, again.body
        check_openapi(stack.document, "POST", "/api/command/{command_id}/cancel", again)
        body = again.json()
        assert body["error"]["code"] == "already_finished"
        assert body["command"] == cancelled
        # Cancelling a command that completed on its own is 409 too.
        finished = await stack.request("POST", command_url(echoed) + "/cancel")
        assert finished.status == 409
        assert finished.json()["command"]["status"] == "completed"

        # The operator's log lines, key=value.
        server_log = stack.server.stderr
        await server_log.wait_for(f"Command cancelled command_id={long['command_id']} client_id={CLIENT_ID}")
        assert server_log.matching(f"Command sent command_id={echoed['command_id']} client_id={CLIENT_ID} command_type=echo")
        assert server_log.matching(f"Command execution completed command_id={echoed['command_id']} client_id={CLIENT_ID} status=completed")
        assert server_log.matching(f"Command execution failed command_id={failed['command_id']} client_id={CLIENT_ID} error_code=executor_error error='disk full'")
        assert server_log.matching(f"Command failed command_id={ghosts[0]['command_id']} client_id=ghost error_code=agent_offline")


# -- clients, health, metrics, openapi ---------------------------------------------------------------


async def test_clients_healthz_metrics_and_openapi(stack: Stack):
    openapi_spec_validator = pytest.importorskip("openapi_spec_validator")
    with trio.fail_after(TIMEOUT):
        health = await stack.get("/healthz", "/healthz")
        assert health == {"status": "ok", "connected_agents": 1, "unfinished_commands": 0}

        [client] = (await stack.get("/api/clients", "/api/clients"))["clients"]
        assert client["client_id"] == CLIENT_ID
        assert client["labels"] == {"env": "test"}
        host, port = client["remote_address"].rsplit(":", 1)
        assert host == "127.0.0.1" and 0 < int(port) < 65536, client
        assert client["connected_at"].endswith("Z")
        assert (client["in_flight"], client["queued"]) == (0, 0)
        assert stack.server.stderr.matching(
            f"Agent connected client_id={CLIENT_ID} remote={client['remote_address']} labels=env=test"
        )

        # One command of each outcome.
        await stack.send(200, client_id=CLIENT_ID, command_type="echo", payload="a", wait=True)
        await stack.send(200, client_id=CLIENT_ID, command_type="echo", payload="b", wait=True)
        await stack.send(200, client_id=CLIENT_ID, command_type="fail", wait=True)
        await stack.send(409, client_id="offline", command_type="echo")
        timed_out = await stack.send(200, client_id=CLIENT_ID, command_type="sleep",
                                     payload={"seconds": 30}, timeout=0.3, wait=True)
        assert (timed_out["status"], timed_out["error_code"]) == ("timeout", "execution_timeout")
        assert stack.server.stderr.matching(
            f"Command timeout command_id={timed_out['command_id']} client_id={CLIENT_ID} error_code=execution_timeout"
        )
        running = await stack.send(202, client_id=CLIENT_ID, command_type="sleep", payload={"seconds": 30})

        # While it runs, the agent shows it in flight, and health counts it.
        [client] = (await stack.get("/api/clients", "/api/clients"))["clients"]
        assert (client["in_flight"], client["queued"]) == (1, 0)
        assert (await stack.get("/healthz", "/healthz"))["unfinished_commands"] == 1
        assert (await stack.request("POST", command_url(running) + "/cancel")).status == 200

        response = await stack.request("GET", "/metrics")
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain")
        check_openapi(stack.document, "GET", "/metrics", response)
        values = samples(response.body.decode())
        assert values["command_sent_total"] == 5  # the offline one never was
        assert values["command_completed_total"] == 2
        assert values["command_failed_total"] == 2  # the executor failure and the offline agent
        assert values["command_timeout_total"] == 1
        assert values["command_cancelled_total"] == 1
        assert values["connected_agents"] == 1
        assert values["commands_unfinished"] == 0
        assert values["command_duration_seconds_count{status=completed}"] == 2
        assert values["command_duration_seconds_count{status=timeout}"] == 1
        assert values["command_duration_seconds_sum{status=timeout}"] >= 0.3
        # No label a caller chooses (client_id, command_type) in the scrape.
        label_names = {part.split("=")[0] for key in values if "{" in key
                       for part in key[key.index("{") + 1:-1].split(",")}
        assert label_names <= {"status", "le"}, label_names

        # The API describes itself; every response above matched it.
        openapi = await stack.request("GET", "/openapi.json")
        assert openapi.status == 200
        document = openapi.json()
        assert document == stack.document
        assert document["openapi"].startswith("3.1")
        assert set(document["paths"]) == API_PATHS
        openapi_spec_validator.validate(document)
        # This server's limit is filled in.
        assert str(MAX_PAYLOAD_BYTES) in openapi.body.decode()


# -- every error code ---------------------------------------------------------------------------------


def assert_error(response: HttpResponse, status: int, code: str) -> dict:
    """A JSON error with exactly {"error": {"code", "message"}} (+ extras), never HTML."""
    assert response.status == status, (response.status, response.body[:300])
    assert b"<html" not in response.body.lower() and b"<!doctype" not in response.body.lower()
    body = response.json()
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"] and "\n" not in body["error"]["message"], body
    return body


async def test_error_codes(stack: Stack):
    with trio.fail_after(TIMEOUT):
        send_path = "/api/command"
        # 400: bad JSON, wrong types, negative or absurd timeouts, unknown fields.
        for raw, code in [
            (b"{bad", "invalid_json"),
            (b"", "invalid_json"),
            (b"[1, 2]", "invalid_json"),
            (b'{"client_id": "e2e-1", "command_type": "echo", "payload": [NaN]}', "invalid_json"),
            (b'{"client_id": "e2e-1"}', "invalid_command"),
            (b'{"client_id": 7, "command_type": "echo"}', "invalid_command"),
            (b'{"client_id": "e2e-1", "command_type": "echo", "timeout": "5"}', "invalid_command"),
            (b'{"client_id": "e2e-1", "command_type": "echo", "wait": "yes"}', "invalid_command"),
            (b'{"client_id": "e2e-1", "command_type": "echo", "priority": 1.5}', "invalid_command"),
            (b'{"client_id": "e2e-1", "command_type": "echo", "connect_timeout": -1}', "invalid_command"),
            (b'{"client_id": "e2e-1", "command_type": "echo", "timeout": 0}', "invalid_command"),
            (b'{"client_id": "e2e-1", "command_type": "echo", "timeout": 1e12}', "invalid_command"),
            (b'{"client_id": "e2e-1", "command_type": "echo", "timout": 5}', "invalid_command"),
        ]:
            response = await stack.request("POST", send_path, body=raw)
            assert_error(response, 400, code)
            check_openapi(stack.document, "POST", send_path, response)
        negative = await stack.request("POST", send_path, {"client_id": CLIENT_ID, "command_type": "echo", "timeout": -1})
        assert assert_error(negative, 400, "invalid_command")["error"]["message"] == "timeout must be greater than 0 seconds"

        # 400 for bad query parameters and cancel bodies.
        offline = await stack.send(409, client_id="ghost", command_type="echo")
        for method, target, path, json_body in [
            ("GET", "/api/commands?status=bogus", "/api/commands", NO_BODY),
            ("GET", "/api/commands?limit=0", "/api/commands", NO_BODY),
            ("GET", "/api/commands?clientid=x", "/api/commands", NO_BODY),
            ("GET", command_url(offline) + "?wait=-1", "/api/command/{command_id}", NO_BODY),
            ("GET", command_url(offline) + "?wait=soon", "/api/command/{command_id}", NO_BODY),
            ("POST", command_url(offline) + "/cancel", "/api/command/{command_id}/cancel", {"reason": 5}),
        ]:
            response = await stack.request(method, target, json_body)
            assert_error(response, 400, "invalid_request")
            check_openapi(stack.document, method, path, response)

        # 404: unknown ids (also when long-polling), unknown routes, as JSON.
        for method, target, path in [
            ("GET", "/api/command/nope", "/api/command/{command_id}"),
            ("GET", "/api/command/nope?wait=5", "/api/command/{command_id}"),
            ("POST", "/api/command/nope/cancel", "/api/command/{command_id}/cancel"),
        ]:
            response = await stack.request(method, target)
            assert_error(response, 404, "not_found")
            check_openapi(stack.document, method, path, response)
        page = await stack.request("GET", "/no/such/page")
        assert assert_error(page, 404, "not_found")["error"]["message"] == "no such endpoint: GET /no/such/page"
        assert_error(await stack.request("POST", "/api/nothing", {}), 404, "not_found")
        # 405 with Allow.
        wrong_method = await stack.request("DELETE", "/api/command")
        assert_error(wrong_method, 405, "method_not_allowed")
        assert "POST" in wrong_method.headers["allow"]

        # 409: the agent is offline; the body is the failed command itself.
        assert list(offline) == COMMAND_FIELDS
        assert (offline["client_id"], offline["status"], offline["error_code"]) == ("ghost", "failed", "agent_offline")
        assert offline["error"] == "agent ghost is not connected"
        assert offline["sent_at"] is None and offline["completed_at"] is not None
        assert await stack.get(command_url(offline), "/api/command/{command_id}") == offline
        waited = await stack.send(409, client_id="ghost", command_type="echo", wait=True)
        assert waited["error_code"] == "agent_offline"

        # 413: over --max-payload-bytes by Content-Length, by a Content-Length
        # announcing a body never sent, and by a chunked body that outgrows it.
        big = {"client_id": CLIENT_ID, "command_type": "echo", "payload": "x" * MAX_PAYLOAD_BYTES}
        response = await stack.request("POST", "/api/command", json_body=big)
        assert_error(response, 413, "payload_too_large")
        assert response.json()["error"]["message"] == f"the request body is larger than {MAX_PAYLOAD_BYTES} bytes"
        assert response.headers["connection"].lower() == "close"
        check_openapi(stack.document, "POST", send_path, response)
        response = await stack.request("POST", "/api/command", headers=[("Content-Length", str(10**9))], finish_body=False)
        assert_error(response, 413, "payload_too_large")
        response = await stack.request("POST", "/api/command", chunks=[
            b'{"client_id": "e2e-1", "command_type": "echo", "payload": "', b"y" * MAX_PAYLOAD_BYTES, b'"}'
        ])
        assert_error(response, 413, "payload_too_large")
        # Just under the limit goes through to the agent and back.
        fits = "z" * (MAX_PAYLOAD_BYTES - 200)
        done = await stack.send(200, client_id=CLIENT_ID, command_type="echo", payload=fits, wait=True)
        assert done["result"] == fits

        # None of the refused requests created a command.
        listing = await stack.get("/api/commands", "/api/commands")
        assert [c["command_id"] for c in listing["commands"]] == [
            done["command_id"], waited["command_id"], offline["command_id"]
        ]
        # And no 500 anywhere.
        assert not stack.server.stderr.matching("status=500"), stack.output()


async def test_413_for_a_body_never_sent_closes_the_connection(stack: Stack):
    # (It used to stay open until the client or a shutdown ended it: see
    # http_api.end_connections_left_unread.)
    with trio.fail_after(TIMEOUT):
        host, port = stack.http_address
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            await stream.send_all(conn.send(h11.Request(
                method="POST", target="/api/command",
                headers=[("Host", f"{host}:{port}"), ("Content-Length", str(10**9))],
            )))
            while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    assert event.status_code == 413
                    assert (b"connection", b"close") in [(k, v.lower()) for k, v in event.headers]
            # The server said it closes the connection; it should, promptly
            # (once no more of the body has come for 1 s, UNREAD_BODY_PAUSE).
            closed = False
            with trio.move_on_after(3):
                closed = await stream.receive_some(65536) == b""
            assert closed, "the server kept the connection open after its 413 'Connection: close'"


# -- SIGTERM: 503, drain, exit 0; the agent notices and carries on --------------------------------------


async def test_sigterm_refuses_new_work_drains_and_exits_zero(stack: Stack):
    server, agent = stack.server, stack.agent
    with trio.fail_after(TIMEOUT):
        stuck = await stack.send(202, client_id=CLIENT_ID, command_type="sleep",
                                 payload={"seconds": 60}, timeout=120)
        spare = await stack.send(202, client_id=CLIENT_ID, command_type="sleep",
                                 payload={"seconds": 60}, timeout=120)
        agent_lines_before = len(agent.stderr.lines)
        sigterm_at = trio.current_time()
        server.process.send_signal(signal.SIGTERM)
        await server.stderr.wait_for("Signal received signal=SIGTERM action=graceful_shutdown")
        # Logged just before the manager starts refusing, with no checkpoint
        # between: any request from now on sees the drain.
        await server.stderr.wait_for(f"Shutting down grace={SHUTDOWN_GRACE} unfinished=2")

        # New work: 503, and /healthz says so for load balancers.
        refused = await stack.request("POST", "/api/command", {"client_id": CLIENT_ID, "command_type": "echo"})
        assert_error(refused, 503, "shutting_down")
        check_openapi(stack.document, "POST", "/api/command", refused)
        health = await stack.request("GET", "/healthz")
        assert health.status == 503
        check_openapi(stack.document, "GET", "/healthz", health)
        assert health.json()["status"] == "shutting_down"
        assert health.json()["error"]["code"] == "shutting_down"
        assert health.json()["unfinished_commands"] == 2
        # Reads and cancels still work during the drain.
        assert (await stack.get(command_url(stuck), "/api/command/{command_id}"))["status"] == "executing"
        cancelled = await stack.request("POST", command_url(spare) + "/cancel")
        assert cancelled.status == 200 and cancelled.json()["status"] == "cancelled"

        # A long poll during the drain is answered when the grace period ends,
        # with the one-minute command still executing: the store keeps it for
        # the next start (tests/test_restart.py), so it is not failed.
        final = await stack.get(command_url(stuck) + "?wait=60", "/api/command/{command_id}")
        assert trio.current_time() - sigterm_at >= SHUTDOWN_GRACE
        assert (final["status"], final["error_code"]) == ("executing", None), final

        # The server exits 0 within its grace (plus HTTP's own stop).
        with trio.fail_after(SHUTDOWN_GRACE + 8):
            code = await server.process.wait()
        elapsed = trio.current_time() - sigterm_at
        assert code == 0, stack.output()
        assert SHUTDOWN_GRACE <= elapsed < SHUTDOWN_GRACE + 8, elapsed
        await server.stderr.closed.wait()
        for text in [
            "Shutdown grace period over unfinished=1",
            f"Agent disconnected client_id={CLIENT_ID}",
            "Server stopped",
        ]:
            assert server.stderr.matching(text), (text, stack.output())
        assert not server.stderr.matching("Traceback"), stack.output()
        assert not server.stderr.matching("error_code=server_shutdown"), stack.output()

        # Once it is gone, the port refuses connections (no half-alive HTTP server).
        with pytest.raises(OSError):
            await stack.request("POST", "/api/command", {"client_id": CLIENT_ID, "command_type": "echo"})

        # The agent heard the polite close, and keeps trying to reconnect.
        lost = await agent.stderr.wait_for("Connection lost", after=agent_lines_before)
        assert f"client_id={CLIENT_ID}" in lost and "reason='server shutting down'" in lost, lost
        await agent.stderr.wait_for("Reconnecting in", after=agent_lines_before)
        assert agent.process.returncode is None, stack.output()

        # SIGTERM to the agent: it stops and exits 0.
        agent.process.send_signal(signal.SIGTERM)
        assert await agent.process.wait() == 0, stack.output()
        await agent.stderr.closed.wait()
        assert agent.stderr.matching(f"Shutting down signal=SIGTERM client_id={CLIENT_ID}"), stack.output()
        assert agent.stderr.matching(f"Agent stopped client_id={CLIENT_ID}"), stack.output()
        assert not agent.stderr.matching("Traceback"), stack.output()
