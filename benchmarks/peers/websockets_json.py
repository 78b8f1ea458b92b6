"""Peer benchmark: JSON commands pushed over one WebSocket per agent (``websockets``).

What it measures
----------------
The same request/reply round trip as trio_quiccmd, with the same shape of
deployment: the AGENT DIALS THE CONTROLLER (as an agent behind NAT would), the
controller is the server and pushes requests to the connected agents.

* controller: ``websockets.asyncio.server.serve`` on loopback. Each agent opens
  one WebSocket and sends ``{"hello": <id>}``; once ``--agents`` agents have
  said hello the controller warms up (200 untimed requests), then times
  ``--requests`` round trips with ``--concurrency`` in flight, spread round
  robin over the agents. A request is a text frame
  ``{"id": n, "command_type": "echo", "payload": make_payload(i)}``; the agent
  answers ``{"id": n, "result": make_result(payload)}`` and the controller
  resolves the future it keeps in a dict by id. Latency is measured from just
  before ``send`` to the resolution of that future.
* agent: ``websockets.asyncio.client.connect`` (retrying until the controller
  listens, bounded), answers each request inline, exits when the controller
  closes the connection or goes away, or on SIGTERM/SIGINT.

Caveats that favour this peer: plain ``ws://`` on loopback, i.e. NO TLS (the
QUIC system always pays for TLS 1.3), and permessage-deflate is switched off
(``compression=None``), which is cheaper for ~100-byte messages. JSON is
stdlib ``json``; the event loop is stock asyncio (no uvloop).

Run it by hand (two shells, any free loopback port)::

    python benchmarks/peers/websockets_json.py agent --port 47001 --id 0
    python benchmarks/peers/websockets_json.py controller --port 47001 \\
        --requests 2000 --concurrency 16 --agents 1

The controller prints one JSON line (see ``benchmarks/common.py``) as the last
line of stdout; diagnostics go to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    COMMAND_TYPE,
    Recorder,
    emit,
    make_payload,
    make_result,
    check_loopback,
    contract_parser,
    run_asyncio_role,
    skip,
)

SYSTEM = "websockets_json"
WARMUP_REQUESTS = 200
#: How long the controller waits for its agents, and an agent for the controller.
READY_TIMEOUT = 60.0
#: Upper bound on one measured (or warm-up) phase; what is unanswered then is an error.
PHASE_TIMEOUT = 300.0
#: Max frame size (bytes); our messages are ~110 bytes.
MAX_SIZE = 1 << 20


def log(msg: str) -> None:
    print(f"[{SYSTEM}] {msg}", file=sys.stderr, flush=True)


def format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --------------------------------------------------------------------------- controller


class AgentConn:
    """One connected agent, seen from the controller."""

    def __init__(self, ws, agent_id) -> None:
        self.ws = ws
        self.agent_id = agent_id


class Controller:
    def __init__(self, n_agents: int) -> None:
        self.n_agents = n_agents
        self.agents: list[AgentConn] = []
        self.ready = asyncio.Event()
        self.pending: dict[int, asyncio.Future] = {}
        self.done = asyncio.Event()  # set at the end: handlers return, closing the sockets
        self._ids = itertools.count()

    async def handler(self, ws) -> None:
        """Serve one agent's WebSocket: wait for hello, then read replies."""
        try:
            hello = json.loads(await asyncio.wait_for(ws.recv(), READY_TIMEOUT))
        except Exception as exc:  # noqa: BLE001 - a bad peer is just dropped
            log(f"agent connection without hello: {exc!r}")
            return
        conn = AgentConn(ws, hello.get("hello"))
        if len(self.agents) >= self.n_agents:
            log(f"extra agent {conn.agent_id!r} ignored")
            return
        self.agents.append(conn)
        log(f"agent {conn.agent_id!r} ready ({len(self.agents)}/{self.n_agents})")
        if len(self.agents) == self.n_agents:
            self.ready.set()

        reader = asyncio.create_task(self._read_replies(ws))
        done_wait = asyncio.create_task(self.done.wait())
        try:
            await asyncio.wait({reader, done_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (reader, done_wait):
                t.cancel()
            await asyncio.gather(reader, done_wait, return_exceptions=True)

    async def _read_replies(self, ws) -> None:
        pending = self.pending
        try:
            async for raw in ws:
                msg = json.loads(raw)
                fut = pending.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg["result"])
        except Exception as exc:  # noqa: BLE001
            log(f"reader stopped: {exc!r}")
        finally:
            # The connection is gone: fail whatever is still waiting on it.
            for req_id, fut in list(pending.items()):
                if not fut.done() and getattr(fut, "ws", None) is ws:
                    pending.pop(req_id, None)
                    fut.set_exception(ConnectionError("agent connection closed"))

    async def request(self, conn: AgentConn, payload: dict) -> dict:
        req_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        fut.ws = conn.ws  # type: ignore[attr-defined]
        self.pending[req_id] = fut
        try:
            await conn.ws.send(
                json.dumps({"id": req_id, "command_type": COMMAND_TYPE, "payload": payload})
            )
            return await fut
        finally:
            self.pending.pop(req_id, None)

    async def run_phase(self, count: int, concurrency: int, recorder: Recorder | None) -> int:
        """Send ``count`` requests with ``concurrency`` in flight; returns the error count."""
        counter = itertools.count()
        agents = self.agents
        n = len(agents)
        errors = 0
        completed = 0

        async def worker() -> None:
            nonlocal errors, completed
            while True:
                i = next(counter)
                if i >= count:
                    return
                payload = make_payload(i)
                t0 = time.perf_counter()
                try:
                    result = await self.request(agents[i % n], payload)
                except Exception:  # noqa: BLE001
                    errors += 1
                    continue
                latency = time.perf_counter() - t0
                if result.get("seq") != i:
                    errors += 1
                    continue
                completed += 1
                if recorder is not None:
                    recorder.latencies.append(latency)

        tasks = [asyncio.create_task(worker()) for _ in range(max(1, min(concurrency, count)))]
        try:
            async with asyncio.timeout(PHASE_TIMEOUT):
                await asyncio.gather(*tasks)
        except TimeoutError:
            log(f"phase timed out after {PHASE_TIMEOUT}s")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return count - completed


async def controller_main(args) -> int:
    try:
        from websockets.asyncio.server import serve
    except ImportError:
        skip("websockets (>=13, asyncio API) is not installed")

    ctl = Controller(args.agents)
    try:
        server = await serve(
            ctl.handler,
            args.host,
            args.port,
            compression=None,
            max_size=MAX_SIZE,
            ping_interval=None,
        )
    except OSError as exc:
        emit({"error": f"cannot listen on {args.host}:{args.port}: {exc}", "system": SYSTEM})
        return 1
    async with server:
        log(f"listening on ws://{format_host(args.host)}:{args.port}, waiting for {args.agents} agent(s)")
        try:
            await asyncio.wait_for(ctl.ready.wait(), READY_TIMEOUT)
        except TimeoutError:
            emit({"error": f"only {len(ctl.agents)}/{args.agents} agents connected "
                           f"within {READY_TIMEOUT:.0f}s", "system": SYSTEM})
            return 1

        warm_errors = await ctl.run_phase(WARMUP_REQUESTS, args.concurrency, None)
        if warm_errors:
            log(f"{warm_errors} errors during warm-up")

        recorder = Recorder()
        recorder.start()
        recorder.errors = await ctl.run_phase(args.requests, args.concurrency, recorder)
        recorder.stop()

        ctl.done.set()
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)

    emit(recorder.report(
        system=SYSTEM,
        requests=args.requests,
        concurrency=args.concurrency,
        agents=args.agents,
        tls=False,
    ))
    return 0


# --------------------------------------------------------------------------- agent


async def agent_main(args) -> int:
    try:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake
    except ImportError:
        log("websockets (>=13, asyncio API) is not installed; agent exits")
        return 0

    uri = f"ws://{format_host(args.host)}:{args.port}/"
    deadline = time.monotonic() + READY_TIMEOUT
    ws = None
    while ws is None:
        try:
            ws = await connect(uri, compression=None, max_size=MAX_SIZE,
                               ping_interval=None, open_timeout=5)
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            if time.monotonic() > deadline:
                log(f"agent {args.id}: controller never answered at {uri}: {exc!r}")
                return 1
            await asyncio.sleep(0.05)

    async with ws:
        await ws.send(json.dumps({"hello": args.id}))
        try:
            async for raw in ws:
                req = json.loads(raw)
                if req.get("command_type") != COMMAND_TYPE:
                    reply = {"id": req.get("id"), "error": "unknown command"}
                else:
                    reply = {"id": req["id"], "result": make_result(req["payload"])}
                await ws.send(json.dumps(reply))
        except ConnectionClosed:
            pass
    return 0


# --------------------------------------------------------------------------- entry


def main(argv=None) -> int:
    parser, _, _ = contract_parser(__doc__.splitlines()[0], 47001)
    args = parser.parse_args(argv)
    check_loopback(SYSTEM, args.host)
    return run_asyncio_role(args, agent_main, controller_main)


if __name__ == "__main__":
    sys.exit(main())
