"""Peer benchmark: JSON commands pushed down one gRPC bidirectional stream per agent.

What it measures
----------------
The same request/reply round trip as trio_quiccmd, with the same shape of
deployment: the AGENT DIALS THE CONTROLLER (as an agent behind NAT would), the
controller is the gRPC server and pushes requests down a stream the agent
opened. Uses ``grpcio``'s asyncio API (``grpc.aio``) with NO protoc code
generation: the controller registers a generic handler
(``grpc.method_handlers_generic_handler`` +
``grpc.stream_stream_rpc_method_handler``) for ``/bench.Agent/Connect`` with
bytes in and out (identity (de)serializers: ``None``, i.e. grpc passes the
bytes through untouched); messages are JSON bytes.

* controller: ``grpc.aio.server`` on loopback. Each agent opens ONE stream and
  writes ``{"hello": <id>}``; once ``--agents`` agents have said hello the
  controller warms up (200 untimed requests), then times ``--requests`` round
  trips with ``--concurrency`` in flight, spread round robin over the agents.
  A request ``{"id": n, "command_type": "echo", "payload": make_payload(i)}``
  is queued for the agent's stream (the handler is an async generator that
  yields from that queue); the agent writes ``{"id": n, "result": ...}`` back on
  the same stream and the controller resolves the future it keeps by id.
  Latency is measured from just before queueing to the resolution of that
  future. At the end the controller finishes every stream with status OK.
* agent: ``grpc.aio.insecure_channel`` (fast reconnect backoff, waits for the
  controller, bounded), reads requests one at a time and writes each reply
  before reading the next; exits on end of stream, on a broken stream (the
  controller went away), or on SIGTERM/SIGINT.

Caveats that favour this peer: insecure channel on loopback, i.e. NO TLS (the
QUIC system always pays for TLS 1.3); no gRPC compression. JSON is stdlib
``json``; the event loop is stock asyncio (no uvloop).

Run it by hand (two shells, any free loopback port)::

    python benchmarks/peers/grpc_bidi.py agent --port 47002 --id 0
    python benchmarks/peers/grpc_bidi.py controller --port 47002 \\
        --requests 2000 --concurrency 16 --agents 1

The controller prints one JSON line (see ``benchmarks/common.py``) as the last
line of stdout; diagnostics go to stderr.
"""

from __future__ import annotations

import asyncio
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

SYSTEM = "grpc_bidi"
SERVICE = "bench.Agent"
METHOD = "Connect"
FULL_METHOD = f"/{SERVICE}/{METHOD}"
WARMUP_REQUESTS = 200
#: How long the controller waits for its agents, and an agent for the controller.
READY_TIMEOUT = 60.0
#: Upper bound on one measured (or warm-up) phase; what is unanswered then is an error.
PHASE_TIMEOUT = 300.0

#: Fail loudly if the port is taken instead of sharing it (grpc sets SO_REUSEPORT by default).
SERVER_OPTIONS = [("grpc.so_reuseport", 0)]
#: Reconnect fast while the agent waits for a controller that is still starting.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
]


def log(msg: str) -> None:
    print(f"[{SYSTEM}] {msg}", file=sys.stderr, flush=True)


def format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --------------------------------------------------------------------------- controller

_CLOSE = object()  # queued to finish a stream


class AgentStream:
    """One agent's open stream, seen from the controller."""

    def __init__(self, agent_id) -> None:
        self.agent_id = agent_id
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.alive = True


class Controller:
    def __init__(self, n_agents: int) -> None:
        self.n_agents = n_agents
        self.agents: list[AgentStream] = []
        self.ready = asyncio.Event()
        self.pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()

    async def connect(self, request_iterator, context):
        """The stream-stream handler: yields requests, a reader task takes replies."""
        hello_seen = asyncio.Event()
        holder: dict = {}

        async def read_replies() -> None:
            pending = self.pending
            try:
                async for raw in request_iterator:
                    msg = json.loads(raw)
                    if "hello" in msg:
                        if len(self.agents) >= self.n_agents:
                            log(f"extra agent {msg['hello']!r} ignored")
                            return
                        stream = AgentStream(msg["hello"])
                        holder["stream"] = stream
                        self.agents.append(stream)
                        log(f"agent {stream.agent_id!r} ready "
                            f"({len(self.agents)}/{self.n_agents})")
                        hello_seen.set()
                        if len(self.agents) == self.n_agents:
                            self.ready.set()
                        continue
                    fut = pending.pop(msg["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg["result"])
            except Exception as exc:  # noqa: BLE001
                log(f"reader stopped: {exc!r}")
            finally:
                stream = holder.get("stream")
                if stream is not None:
                    stream.alive = False
                    # Fail whatever is still waiting on this stream, and end the writer.
                    for req_id, fut in list(pending.items()):
                        if not fut.done() and getattr(fut, "stream", None) is stream:
                            pending.pop(req_id, None)
                            fut.set_exception(ConnectionError("agent stream closed"))
                    stream.outbox.put_nowait(_CLOSE)
                hello_seen.set()

        reader = asyncio.create_task(read_replies())
        try:
            try:
                await asyncio.wait_for(hello_seen.wait(), READY_TIMEOUT)
            except TimeoutError:
                return
            stream = holder.get("stream")
            if stream is None:
                return
            outbox = stream.outbox
            while True:
                item = await outbox.get()
                if item is _CLOSE:
                    return
                yield item
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def request(self, stream: AgentStream, payload: dict) -> dict:
        if not stream.alive:
            raise ConnectionError("agent stream closed")
        req_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        fut.stream = stream  # type: ignore[attr-defined]
        self.pending[req_id] = fut
        try:
            stream.outbox.put_nowait(
                json.dumps(
                    {"id": req_id, "command_type": COMMAND_TYPE, "payload": payload}
                ).encode()
            )
            return await fut
        finally:
            self.pending.pop(req_id, None)

    async def run_phase(self, count: int, concurrency: int, recorder: Recorder | None) -> int:
        """Send ``count`` requests with ``concurrency`` in flight; returns the error count."""
        counter = itertools.count()
        agents = self.agents
        n = len(agents)
        completed = 0

        async def worker() -> None:
            nonlocal completed
            while True:
                i = next(counter)
                if i >= count:
                    return
                payload = make_payload(i)
                t0 = time.perf_counter()
                try:
                    result = await self.request(agents[i % n], payload)
                except Exception:  # noqa: BLE001
                    continue
                latency = time.perf_counter() - t0
                if result.get("seq") != i:
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

    def close_streams(self) -> None:
        for stream in self.agents:
            stream.outbox.put_nowait(_CLOSE)


async def controller_main(args) -> int:
    try:
        import grpc
        import grpc.aio
    except ImportError:
        skip("grpcio is not installed")

    ctl = Controller(args.agents)
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            METHOD: grpc.stream_stream_rpc_method_handler(
                ctl.connect,
                request_deserializer=None,  # identity: bytes in
                response_serializer=None,  # identity: bytes out
            )
        },
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    address = f"{format_host(args.host)}:{args.port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        emit({"error": f"cannot listen on {address}: {exc}", "system": SYSTEM})
        return 1
    if not bound:
        emit({"error": f"cannot listen on {address}", "system": SYSTEM})
        return 1
    await server.start()
    try:
        log(f"listening on {address} (insecure), waiting for {args.agents} agent(s)")
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
    finally:
        ctl.close_streams()  # ends each stream with status OK: agents see EOF and exit
        await server.stop(grace=2)

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
        import grpc
        import grpc.aio
    except ImportError:
        log("grpcio is not installed; agent exits")
        return 0

    target = f"{format_host(args.host)}:{args.port}"
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), READY_TIMEOUT)
        except TimeoutError:
            log(f"agent {args.id}: controller never answered at {target}")
            return 1
        call = channel.stream_stream(
            FULL_METHOD,
            request_serializer=None,  # identity: bytes out
            response_deserializer=None,  # identity: bytes in
        )(wait_for_ready=True)
        try:
            await call.write(json.dumps({"hello": args.id}).encode())
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    break
                req = json.loads(raw)
                if req.get("command_type") != COMMAND_TYPE:
                    reply = {"id": req.get("id"), "error": "unknown command"}
                else:
                    reply = {"id": req["id"], "result": make_result(req["payload"])}
                await call.write(json.dumps(reply).encode())
        except grpc.aio.AioRpcError as exc:
            # The controller went away (UNAVAILABLE) or stopped the server (CANCELLED).
            log(f"agent {args.id}: stream ended: {exc.code().name}")
        except asyncio.InvalidStateError:
            pass  # stream already finished by the controller while we wrote
        finally:
            call.cancel()
    return 0


# --------------------------------------------------------------------------- entry


def main(argv=None) -> int:
    parser, _, _ = contract_parser(__doc__.splitlines()[0], 47002)
    args = parser.parse_args(argv)
    check_loopback(SYSTEM, args.host)
    return run_asyncio_role(args, agent_main, controller_main)


if __name__ == "__main__":
    sys.exit(main())
