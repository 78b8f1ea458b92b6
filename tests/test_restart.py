"""Issue 6, end to end: restart the real server process in the middle of a load
of commands, gracefully (SIGTERM) and not (SIGKILL), and check that every
command the server accepted ends exactly once, with the right result, and
ran at most once on the agent.

The setup is a new user's: ``python -m trio_quiccmd.server`` (default store:
SQLite in ``./.quiccmd``) and an agent started from the same directory (it
finds the dev certificate there), as real subprocesses. The agent is the
bundled one run through ``tests/journal_agent.py``, which appends one line per
*execution* to a journal file (O_APPEND), so "ran at most once" is counted,
not inferred. Every command carries a unique ``token`` in its payload; the
journal names tokens, the API maps them to command ids.

Several HTTP clients send ``echo`` (result: the payload) and short ``sleep``
commands, with ``connect_timeout`` so that commands sent while the agent is
reconnecting wait for it, and a long ``timeout`` so they outlive the restart.
Each client keeps at most 25 of its commands unfinished (with a full window
it long-polls its oldest one, retrying that GET across the restart), so
while the agent is away the queue grows by a window's worth, not thousands.
The server's window per agent is small (16), so some commands are queued
(``pending``) at the restart and others executing.
Each request ends one of three ways:

- **accepted**: 202 with a command id. The command must exist after the
  restart (a 404 for it at any time fails the test at once) and end
  ``completed`` with its result.
- **not created**: the connection was refused (server down) or 503
  ``shutting_down`` (draining). The client waits for the new server (an
  event the test sets when the new server prints its "listening" line) and
  goes on with a new command.
- **unknown**: the connection broke mid-request (the server died). The
  command may or may not exist; it must not exist twice, and if it exists it
  must end like an accepted one. It is never retried (that could create a
  legitimate second command). (The server dispatches a command before its
  POST commits it, so such a command may also have run on the agent without
  being recorded; that is allowed for these only.)

Just before the restart the test sends a few 2 s ``sleep`` commands, so
that some commands are surely executing when the server goes away (in the
graceful case the grace period, 0.3 s, is shorter than them); the new server
must log ``Recovered unfinished commands`` for them.

After the restart the load goes on until the new server has accepted a good
number of commands; then the test waits (bounded) until every accepted
command is final, walks ``GET /api/commands`` page by page, stops the agent
and the server (exit 0, no traceback) and reads the journal.

The server's QUIC idle timeout is set to 3 s so that after a SIGKILL the
agent notices the dead connection (QUIC has no "connection refused") within
3 s rather than the default 30 s. Ports are picked below the ephemeral range,
so that neither the clients' own connections (while the server is down, a
connect to a free port in the ephemeral range can connect to itself) nor
anyone's outgoing connection can take them between the two runs.

By hand: ``TEST_RESTART_STORE=memory python -m pytest tests/test_restart.py``
runs the same test with ``--store memory``; it must fail. (It does: after a
SIGTERM the old server failed its unfinished commands ``server_shutdown``,
after a SIGKILL the new one recovered nothing; without those two checks, a
client's long-poll of an accepted command gets a 404.)
"""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import socket
import sys
from collections import Counter, deque
from contextlib import AsyncExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import h11
import pytest
import trio

from .httpclient import HttpResponse, check_openapi, http
from .processes import ProcessEnded, spawn

CLIENT_ID = "restart-1"
#: Concurrent HTTP clients sending commands.
CLIENTS = 4
#: Every SLEEP_EVERY-th command of a client is a sleep of LOAD_SLEEP seconds.
SLEEP_EVERY = 5
LOAD_SLEEP = 0.3
#: Unfinished commands a client may have before it waits for its oldest.
CLIENT_WINDOW = 25
#: Sleeps sent just before the restart: executing when the server goes away.
HELD_SLEEPS = 3
HELD_SLEEP = 2.0
#: Commands accepted before the restart, and by the new server, at least.
LOAD_BEFORE = 80
LOAD_AFTER = 80
#: Long enough to outlive the restart; none of them may time out.
COMMAND_TIMEOUT = 60
SHUTDOWN_GRACE = 0.3
#: The server's QUIC idle timeout: after a SIGKILL, the agent notices within it.
IDLE_TIMEOUT = 3
#: A small window, so that some commands are queued (pending) at the restart.
MAX_IN_FLIGHT = 16
LISTENING = "quiccmd server listening "
FINAL = {"completed", "failed", "timeout", "cancelled"}
#: Bounds: starting a process (imports aioquic, quart), a restart, the final wait.
START_TIMEOUT = 20
STOP_TIMEOUT = 15
LOAD_TIMEOUT = 30
FINAL_TIMEOUT = 40

#: By hand only: another --store for the server (e.g. "memory", which must fail).
STORE = os.environ.get("TEST_RESTART_STORE")


# -- ports ---------------------------------------------------------------------------


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def is_free(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports() -> tuple[int, int]:
    """A TCP port and a UDP port nothing uses now, below the ephemeral range."""
    low, high = ephemeral_range()
    candidates = range(10000, low) if low > 11000 else range(high + 1, 65536)
    while True:
        http_port, quic_port = random.sample(candidates, 2)
        if is_free(http_port, socket.SOCK_STREAM) and is_free(quic_port, socket.SOCK_DGRAM):
            return http_port, quic_port


# -- the stack: one server (restarted), one agent ---------------------------------------


@attrs.define
class Stack:
    directory: Path
    journal: Path
    http_port: int
    quic_port: int
    server: SimpleNamespace | None = None
    agent: SimpleNamespace | None = None
    #: Every server process started, in order.
    servers: list[SimpleNamespace] = attrs.field(factory=list)
    #: Set while a server is listening; replaced by a fresh one before it is stopped.
    up: trio.Event = attrs.field(factory=trio.Event)
    document: dict = attrs.field(factory=dict)

    @property
    def http_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.http_port)

    async def request(self, method: str, target: str, json_body: Any = None) -> HttpResponse:
        if json_body is None:
            return await http(self.http_address, method, target)
        return await http(self.http_address, method, target, json_body)

    async def get(self, target: str, path: str) -> Any:
        response = await self.request("GET", target)
        assert response.status == 200, (target, response.status, response.body[:300])
        check_openapi(self.document, "GET", path, response)
        return response.json()

    def output(self) -> str:
        parts = []
        for n, server in enumerate(self.servers, 1):
            parts.append(f"--- server run {n} stdout\n{server.stdout}\n--- server run {n} stderr\n{server.stderr}")
        if self.agent is not None:
            parts.append(f"--- agent stderr\n{self.agent.stderr}")
        return "\n".join(parts)


def server_argv(http_port: int, quic_port: int) -> list[str]:
    argv = [
        sys.executable, "-m", "trio_quiccmd.server",
        "--http", f"127.0.0.1:{http_port}",
        "--quic", f"127.0.0.1:{quic_port}",
        "--shutdown-grace", str(SHUTDOWN_GRACE),
        "--idle-timeout", str(IDLE_TIMEOUT),
        "--max-in-flight-per-agent", str(MAX_IN_FLIGHT),
    ]
    return argv + (["--store", STORE] if STORE else [])


async def start_server(stack: Stack, exits: AsyncExitStack, *, first: bool) -> None:
    """Start the server on the stack's ports and wait for its "listening" line.

    The first start picks other ports if the ones picked were taken in
    between (the server says "cannot listen" and exits 1); a restart must
    use the same ports, the QUIC one at least, since the agent dials it.
    """
    for attempt in range(3):
        server = await exits.enter_async_context(spawn(
            server_argv(stack.http_port, stack.quic_port), cwd=stack.directory,
            name=f"server run {len(stack.servers) + 1}",
        ))
        stack.servers.append(server)
        try:
            with trio.fail_after(START_TIMEOUT):
                line = await server.stdout.wait_for(LISTENING)
        except ProcessEnded:
            with trio.fail_after(STOP_TIMEOUT):
                await server.process.wait()
                await server.stderr.closed.wait()
            taken = server.process.returncode == 1 and server.stderr.matching("cannot listen on")
            if first and taken and attempt < 2:
                stack.servers.pop()
                stack.http_port, stack.quic_port = pick_ports()
                continue
            raise AssertionError(
                f"the server did not start{' again' if not first else ''}"
                f"{' (its port was taken while it was down)' if taken else ''}:\n{stack.output()}"
            ) from None
        assert line == (
            f"{LISTENING}http=http://127.0.0.1:{stack.http_port} quic=127.0.0.1:{stack.quic_port}"
        ), line
        stack.server = server
        stack.up.set()
        return
    raise AssertionError("unreachable")


async def start_agent(stack: Stack, exits: AsyncExitStack) -> None:
    stack.agent = await exits.enter_async_context(spawn(name="agent", argv=[
        sys.executable, "-m", "tests.journal_agent", "--journal", str(stack.journal),
        "--id", CLIENT_ID, "--server", f"127.0.0.1:{stack.quic_port}",
    ], cwd=stack.directory))
    with trio.fail_after(START_TIMEOUT):
        try:
            await stack.agent.stderr.wait_for("Connected to server")
        except ProcessEnded:
            raise AssertionError(f"the agent did not connect\n{stack.output()}") from None
    assert stack.agent.stderr.matching("tls=ca-file"), stack.output()


async def stop(stack: Stack, name: str, proc: SimpleNamespace) -> None:
    """SIGTERM; it must exit 0 without a traceback."""
    proc.process.send_signal(signal.SIGTERM)
    with trio.fail_after(STOP_TIMEOUT):
        code = await proc.process.wait()
        await proc.stderr.closed.wait()
    assert code == 0, f"{name} exited {code}\n{stack.output()}"
    assert not proc.stderr.matching("Traceback"), stack.output()


# -- the load ----------------------------------------------------------------------------


@attrs.define
class Sent:
    token: str
    command_type: str
    payload: Any
    result: Any  # what the command must complete with


@attrs.define
class Load:
    """What the clients sent and what became of it."""

    #: command_id -> what was sent: the server answered 202.
    accepted: dict[str, Sent] = attrs.field(factory=dict)
    #: token -> what was sent: the connection broke mid-request.
    unknown: dict[str, Sent] = attrs.field(factory=dict)
    #: Requests that created nothing: connection refused, 503.
    refused: int = 0
    unavailable: int = 0
    #: Requests (POST or GET) that broke or were refused because the server went away.
    interrupted: int = 0
    stop: trio.Event = attrs.field(factory=trio.Event)
    #: Clients still running, and set once none is.
    running: int = 0
    idle: trio.Event = attrs.field(factory=trio.Event)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def accept(self, command_id: str, sent: Sent) -> None:
        assert command_id not in self.accepted, f"command id {command_id} was given out twice"
        self.accepted[command_id] = sent
        self._changed.set()
        self._changed = trio.Event()

    async def wait_accepted(self, count: int) -> None:
        while len(self.accepted) < count:
            await self._changed.wait()


def load_command(client: int, n: int) -> Sent:
    token = f"c{client}-{n}"
    if n % SLEEP_EVERY == SLEEP_EVERY - 1:
        return Sent(token, "sleep", {"seconds": LOAD_SLEEP, "token": token}, {"slept": LOAD_SLEEP})
    payload = {"token": token, "text": f"héllo {client}/{n}", "n": [client, n, None]}
    return Sent(token, "echo", payload, payload)


def never_connected(exc: OSError) -> bool:
    """Whether the request failed at connect with "connection refused" (nothing sent)."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        _, rest = cause.split(ConnectionRefusedError)
        return rest is None
    return False


async def call(stack: Stack, method: str, target: str, json_body: Any = None) -> HttpResponse | str:
    """One request; "refused" if the connection was refused (nothing was sent),
    "broken" if it broke before a whole response came (the server died)."""
    try:
        response = await stack.request(method, target, json_body)
    except OSError as exc:  # in http(), only trio.open_tcp_stream raises OSError
        return "refused" if never_connected(exc) else "broken"
    except (trio.BrokenResourceError, h11.ProtocolError):
        return "broken"
    return "broken" if response.status == 0 else response


class Retry:
    """Waiting for the next server after a request was refused or broke.

    The test replaces ``stack.up`` before it stops the server and sets the new
    one when the next server listens. A refusal while it is set can be one
    seen just before the new server bound its port, so a few in a row are
    retried; more is a server that does not serve.
    """

    def __init__(self, stack: Stack, load: Load) -> None:
        self.stack, self.load, self.in_a_row = stack, load, 0

    async def after(self, outcome: str) -> None:
        self.load.interrupted += 1
        self.in_a_row = self.in_a_row + 1 if outcome == "refused" else 0
        assert self.in_a_row <= 5 or not self.stack.up.is_set(), (
            f"connection refused while the server is up\n{self.stack.output()}"
        )
        await self.stack.up.wait()


async def post(stack: Stack, load: Load, sent: Sent, *, priority: int = 0) -> str:
    """POST one command; returns "accepted", "refused", "unavailable" or "broken"."""
    body = {
        "client_id": CLIENT_ID, "command_type": sent.command_type, "payload": sent.payload,
        "timeout": COMMAND_TIMEOUT, "connect_timeout": COMMAND_TIMEOUT, "priority": priority,
    }
    response = await call(stack, "POST", "/api/command", body)
    if response == "refused":
        load.refused += 1
        return "refused"
    if response == "broken":  # it may or may not exist
        load.unknown[sent.token] = sent
        return "broken"
    assert isinstance(response, HttpResponse)
    if response.status == 503:
        assert response.json()["error"]["code"] == "shutting_down", response
        load.unavailable += 1
        return "unavailable"
    assert response.status == 202, (sent, response.status, response.body[:300])
    command = response.json()
    assert command["status"] in ("pending", "executing"), command
    assert (command["client_id"], command["command_type"], command["payload"]) == (
        CLIENT_ID, sent.command_type, sent.payload
    ), command
    load.accept(command["command_id"], sent)
    return "accepted"


async def wait_final(stack: Stack, load: Load, command_id: str) -> dict:
    """Long-poll an accepted command until it is final, across a restart."""
    retry = Retry(stack, load)
    while True:
        response = await call(stack, "GET", f"/api/command/{command_id}?wait=30")
        if isinstance(response, str):
            await retry.after(response)
            continue
        retry.in_a_row = 0
        # 404: the server does not know a command it accepted.
        assert response.status == 200, (
            f"accepted command {command_id} ({load.accepted[command_id].token}) was lost: "
            f"GET answered {response.status} {response.body[:200]!r}\n{stack.output()}"
        )
        command = response.json()
        if command["status"] in FINAL:
            return command


async def run_client(stack: Stack, load: Load, client: int) -> None:
    """Send commands until the load stops, at most CLIENT_WINDOW of them unfinished.

    With a full window the client long-polls its oldest command, so while
    the agent is away each client queues a window's worth, not thousands.
    """
    window: deque[str] = deque()
    retry = Retry(stack, load)
    try:
        for n in itertools.count():
            while len(window) >= CLIENT_WINDOW and not load.stop.is_set():
                await wait_final(stack, load, window.popleft())
            if load.stop.is_set():
                return
            outcome = await post(stack, load, load_command(client, n))
            if outcome == "accepted":
                window.append(next(reversed(load.accepted)))
                retry.in_a_row = 0
            else:
                await retry.after(outcome)
    finally:
        load.running -= 1
        if load.running == 0:
            load.idle.set()


# -- restarting ----------------------------------------------------------------------------


async def send_held_sleeps(stack: Stack, load: Load) -> list[str]:
    """A few 2 s sleeps, executing on the agent (and stored so) when this returns.

    They go before the load's commands (priority 1), so they leave the queue
    at the next free slot of the agent's window; whether they have is only
    visible through the API, so it is polled (bounded by the caller).
    """
    ids = []
    for n in range(HELD_SLEEPS):
        token = f"held-{len(stack.servers)}-{n}"
        sent = Sent(token, "sleep", {"seconds": HELD_SLEEP, "token": token}, {"slept": HELD_SLEEP})
        assert await post(stack, load, sent, priority=1) == "accepted", stack.output()
        ids.append(next(reversed(load.accepted)))
    for command_id in ids:
        while (await stack.get(f"/api/command/{command_id}", "/api/command/{command_id}"))["status"] == "pending":
            await trio.sleep(0.01)
    # GET answers from memory; a 202 is sent once everything saved before it is
    # committed. One more 202 to a client, and "executing" is on disk too.
    await load.wait_accepted(len(load.accepted) + 1)
    return ids


async def restart(stack: Stack, exits: AsyncExitStack, how: str) -> None:
    """Stop the server (SIGTERM and wait for exit 0, or SIGKILL) and start it again."""
    old = stack.server
    assert old is not None
    stack.up = trio.Event()  # from now on clients that cannot get through wait for this
    if how == "sigterm":
        old.process.send_signal(signal.SIGTERM)
        with trio.fail_after(STOP_TIMEOUT):
            code = await old.process.wait()
            await old.stderr.closed.wait()
        assert code == 0, f"the server exited {code} after SIGTERM\n{stack.output()}"
        assert not old.stderr.matching("Traceback"), f"a traceback in the server's log\n{stack.output()}"
        # The durable store keeps what is unfinished: nothing is failed at shutdown.
        assert old.stderr.matching("Shutdown grace period over unfinished="), (
            f"nothing was left unfinished at the SIGTERM (the held sleeps should be)\n{stack.output()}"
        )
        assert not old.stderr.matching("server_shutdown"), (
            f"the server failed unfinished commands (server_shutdown) at a SIGTERM\n{stack.output()}"
        )
    else:
        old.process.kill()
        with trio.fail_after(STOP_TIMEOUT):
            code = await old.process.wait()
        assert code == -signal.SIGKILL, code
    await start_server(stack, exits, first=False)


def recovered_counts(server: SimpleNamespace) -> dict[str, int]:
    [line] = server.stderr.matching("Recovered unfinished commands")
    return {k: int(v) for k, v in re.findall(r"(pending|executing|expired)=(\d+)", line)}


# -- the checks ------------------------------------------------------------------------------


async def list_all(stack: Stack) -> list[dict]:
    """Every command, walking GET /api/commands page by page with the cursor."""
    commands: list[dict] = []
    target = "/api/commands?limit=200"
    while True:
        page = await stack.get(target, "/api/commands")
        commands += page["commands"]
        if page["next_cursor"] is None:
            return commands
        target = f"/api/commands?limit=200&cursor={page['next_cursor']}"


async def wait_all_final(stack: Stack, load: Load) -> list[dict]:
    """Long-poll every accepted command that is not final yet; then list everything."""
    listed = {c["command_id"]: c for c in await list_all(stack)}
    lost = sorted(set(load.accepted) - set(listed))
    assert not lost, f"accepted commands lost in the restart: {lost[:10]} ({len(lost)})\n{stack.output()}"
    for command_id, command in listed.items():
        while command["status"] not in FINAL:
            command = await stack.get(f"/api/command/{command_id}?wait=30", "/api/command/{command_id}")
    return await list_all(stack)


def read_journal(path: Path) -> Counter[str]:
    """token -> how many times the agent executed it."""
    runs: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        _command_type, token = line.split(" ", 1)
        runs[token] += 1
    return runs


def check_outcome(stack: Stack, load: Load, listed: list[dict], journal: Counter[str]) -> dict:
    """Every assertion of issue 6 about what became of the commands; returns numbers."""
    output = stack.output
    ids = [c["command_id"] for c in listed]
    twice = [i for i, k in Counter(ids).items() if k > 1]
    assert not twice, f"command ids listed twice: {twice[:10]}"
    by_id = {c["command_id"]: c for c in listed}

    # Every accepted command is there, completed with exactly its result.
    for command_id, sent in load.accepted.items():
        command = by_id.get(command_id)
        assert command is not None, f"accepted command {command_id} ({sent.token}) was lost\n{output()}"
        assert (command["status"], command["error_code"], command["result"]) == (
            "completed", None, sent.result,
        ), (f"accepted command {command_id} ({sent.token}) ended wrong: {command}\n{output()}")
        assert command["payload"] == sent.payload, command

    # No command was created twice (a second id for one request) and none came
    # from nowhere: each token is one accepted request, or one unknown one.
    tokens = Counter(c["payload"]["token"] for c in listed)
    duplicated = [t for t, k in tokens.items() if k > 1]
    assert not duplicated, f"requests that became more than one command: {duplicated[:10]}\n{output()}"
    accepted_tokens = {sent.token for sent in load.accepted.values()}
    phantoms = set(tokens) - accepted_tokens - set(load.unknown)
    assert not phantoms, f"commands nobody sent: {sorted(phantoms)[:10]}"
    # An unknown request that did create a command: it ends like an accepted one.
    for command in listed:
        sent = load.unknown.get(command["payload"]["token"])
        if sent is not None:
            assert (command["status"], command["result"]) == ("completed", sent.result), (
                f"command {command['command_id']} of a broken request ended wrong: {command}\n{output()}"
            )

    # Each command ran at most once on the agent, and each completed one exactly once.
    ran_twice = {t: k for t, k in journal.items() if k > 1}
    assert not ran_twice, (
        f"commands the agent executed more than once (token: runs): {ran_twice}\n{output()}"
    )
    # The server dispatches a command before its POST commits it: a request cut
    # by the SIGKILL may have run on the agent without being recorded. Any
    # other command the agent ran must be listed.
    unrecorded = set(journal) - set(tokens)
    assert unrecorded <= set(load.unknown), (
        f"the agent ran commands the server does not list: {sorted(unrecorded - set(load.unknown))[:10]}"
    )
    never_ran = sorted(t for t in tokens if journal[t] != 1)
    assert not never_ran, f"completed commands the agent never ran: {never_ran[:10]}\n{output()}"
    return {
        "accepted": len(load.accepted),
        "unknown": len(load.unknown),
        "unknown_created": sum(1 for t in load.unknown if t in tokens),
        "unknown_ran_unrecorded": len(unrecorded),
        "refused": load.refused,
        "interrupted": load.interrupted,
        "unavailable": load.unavailable,
        "listed": len(listed),
    }


# -- the test --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_restart_under_load_loses_and_duplicates_nothing(tmp_path: Path, how: str):
    http_port, quic_port = pick_ports()
    stack = Stack(tmp_path, tmp_path / "executions.journal", http_port, quic_port)
    load = Load()
    times = {"start": trio.current_time()}
    # Bounded wait by wait: a cancel scope may not span the nurseries the exit
    # stack opens for the processes. The clients' nursery is entered first,
    # so it closes last, after every process is gone.
    async with AsyncExitStack() as exits:
        clients = await exits.enter_async_context(trio.open_nursery())
        try:
            await start_server(stack, exits, first=True)
            await start_agent(stack, exits)
            with trio.fail_after(START_TIMEOUT):
                stack.document = (await stack.request("GET", "/openapi.json")).json()

            # Load on the first server.
            load.running = CLIENTS
            for client in range(CLIENTS):
                clients.start_soon(run_client, stack, load, client)
            with trio.fail_after(LOAD_TIMEOUT):
                await load.wait_accepted(LOAD_BEFORE)
                held = await send_held_sleeps(stack, load)
            agent_lines = len(stack.agent.stderr.lines)
            times["restart"] = trio.current_time()

            # The restart, with the clients still sending.
            await restart(stack, exits, how)
            before_restart = len(load.accepted)
            times["up_again"] = trio.current_time()

            with trio.fail_after(LOAD_TIMEOUT):
                # The new server took up what was unfinished (at least the held
                # sleeps), before it listened.
                await stack.server.stderr.wait_for("HTTP API listening")
                recovered = recovered_counts(stack.server) if stack.server.stderr.matching(
                    "Recovered unfinished commands") else {}
                assert recovered.get("executing", 0) >= HELD_SLEEPS, (
                    f"the new server did not recover the executing commands: {recovered}\n{stack.output()}"
                )
                assert recovered["expired"] == 0, recovered
                # The same agent process reconnects on its own, and the load goes on.
                await stack.agent.stderr.wait_for("Connected to server", after=agent_lines)
                times["agent_back"] = trio.current_time()
                await load.wait_accepted(len(load.accepted) + LOAD_AFTER)
                load.stop.set()
                # Each client finishes the request it has in flight (a 202 still counts).
                await load.idle.wait()
            times["load_stopped"] = trio.current_time()

            with trio.fail_after(FINAL_TIMEOUT):
                await wait_all_final(stack, load)
                held_final = [await stack.get(f"/api/command/{i}", "/api/command/{command_id}") for i in held]
                assert all(c["status"] == "completed" for c in held_final), held_final

            times["all_final"] = trio.current_time()
            # Stop the agent first (no late execution can sneak into the journal
            # after it is read), then the server; both exit 0.
            await stop(stack, "agent", stack.agent)
            with trio.fail_after(FINAL_TIMEOUT):
                listed = await list_all(stack)
            await stop(stack, "server", stack.server)
            for server in stack.servers:
                assert not server.stderr.matching("Traceback"), stack.output()
                assert not server.stderr.matching("status=500"), stack.output()

            numbers = check_outcome(stack, load, listed, read_journal(stack.journal))
            numbers["accepted_before_restart"] = before_restart
            numbers["recovered"] = recovered
            numbers["agent_redeliveries"] = len(stack.agent.stderr.matching("delivered again"))
            numbers["held_results_delivered"] = len(stack.agent.stderr.matching("Delivering held result"))
            numbers["seconds"] = {k: round(v - times["start"], 2) for k, v in times.items()}
            print(f"\n{how}: {numbers}")
        except BaseException:
            # Stop the clients before the exit stack kills the processes:
            # they would only add "connection refused" failures to the real one.
            clients.cancel_scope.cancel()
            raise
