"""Reference peer: NATS request/reply with nats-py (asyncio), through a nats-server broker.

What it measures
----------------
Request/reply round trips through a NATS server, the way a competent nats-py
user would write it: the agent subscribes to ``bench.agent.<id>`` and answers
each message with ``msg.respond()``; the controller calls
``nc.request(subject, data, timeout=...)`` from C concurrent requesters (nats-py
multiplexes replies over one wildcard inbox subscription). Every round trip
crosses the broker twice (controller -> server -> agent -> server -> controller),
over plain TCP with no TLS, so compare it with the QUIC systems knowing that.

Requests are ``{"id", "type": COMMAND_TYPE, "payload": make_payload(i)}``;
replies ``{"id", "result": make_result(payload)}``. With ``--agents N`` the
controller targets agents with ids 0..N-1 (round-robin) and first waits until
every one of them answers a ping. After the timed run it sends each agent a
``shutdown`` message.

The NATS server is NOT started here (the runner manages servers): both roles
use ``--nats-url`` (default ``nats://127.0.0.1:4222``). If nothing answers there
within 2 s the controller prints ``{"skipped": ...}`` and exits 0. ``--port`` is
accepted for the common contract and otherwise unused.

Run by hand (a nats-server must already listen on 127.0.0.1:4222)::

    python benchmarks/peers/nats_reqrep.py agent --port 0 --id 0
    python benchmarks/peers/nats_reqrep.py controller --port 0 --requests 2000 --concurrency 16

The agent exits on the controller's shutdown message, on SIGTERM/SIGINT, when
the connection to the server is lost, or after ``--idle-timeout`` seconds
(default 60) without any message. The controller prints one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import COMMAND_TYPE, Recorder, emit, make_payload, make_result, skip  # noqa: E402

try:
    import nats
    from nats.errors import NoRespondersError
except ImportError as exc:  # pragma: no cover - depends on the environment
    nats = None
    NoRespondersError = Exception  # type: ignore[assignment,misc]
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

SYSTEM = "nats-reqrep"
DEFAULT_URL = "nats://127.0.0.1:4222"
WARMUP_REQUESTS = 200
REQUEST_TIMEOUT = 10.0
SERVER_ANSWER_TIMEOUT = 2.0
AGENTS_WAIT_TIMEOUT = 30.0


def subject_for(agent_id: int) -> str:
    return f"bench.agent.{agent_id}"


def require_loopback_url(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise SystemExit(f"refusing non-loopback NATS URL {url!r}")


async def open_connection(url: str, name: str, **callbacks):
    """Connect once, no reconnects; raise on failure within SERVER_ANSWER_TIMEOUT."""
    async with asyncio.timeout(SERVER_ANSWER_TIMEOUT + 0.5):
        return await nats.connect(
            servers=[url],
            name=name,
            connect_timeout=SERVER_ANSWER_TIMEOUT,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            **callbacks,
        )


# --------------------------------------------------------------------------- agent


async def run_agent(args: argparse.Namespace) -> int:
    require_loopback_url(args.nats_url)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def lost(*_args) -> None:
        stop.set()

    async def quiet_error(exc: Exception) -> None:
        print(f"agent {args.id}: nats error: {exc!r}", file=sys.stderr)

    deadline = loop.time() + args.connect_timeout
    nc = None
    while nc is None and not stop.is_set():
        try:
            nc = await open_connection(
                args.nats_url, f"bench-agent-{args.id}",
                disconnected_cb=lost, closed_cb=lost, error_cb=quiet_error,
            )
        except Exception as exc:
            if loop.time() >= deadline:
                print(f"agent {args.id}: no NATS server at {args.nats_url}: {exc!r}",
                      file=sys.stderr)
                return 1
            await asyncio.sleep(0.2)
    if nc is None:
        return 0

    last_seen = loop.time()

    async def on_message(msg) -> None:
        nonlocal last_seen
        last_seen = loop.time()
        try:
            request = json.loads(msg.data)
            kind = request.get("type")
            if kind == "shutdown":
                stop.set()
                return
            if kind == "ping":
                reply = {"id": request.get("id"), "pong": args.id}
            else:
                reply = {"id": request["id"], "result": make_result(request["payload"])}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            reply = {"error": f"bad request: {exc}"}
        if msg.reply:
            await msg.respond(json.dumps(reply).encode())

    try:
        await nc.subscribe(subject_for(args.id), cb=on_message)
        await nc.flush()  # the subscription is registered before we count as up
        while not stop.is_set():
            idle_left = last_seen + args.idle_timeout - loop.time()
            if idle_left <= 0:
                print(f"agent {args.id}: idle for {args.idle_timeout}s, exiting", file=sys.stderr)
                break
            try:
                async with asyncio.timeout(min(idle_left, 1.0)):
                    await stop.wait()
            except TimeoutError:
                pass
    finally:
        if not nc.is_closed:
            try:
                async with asyncio.timeout(2.0):
                    await nc.close()
            except TimeoutError:
                pass
    return 0


# ---------------------------------------------------------------------- controller


async def drive(count: int, first: int, concurrency: int, call, recorder: Recorder | None) -> None:
    """Run `count` calls numbered from `first`, `concurrency` at a time."""
    numbers = iter(range(first, first + count))

    async def worker() -> None:
        for i in numbers:
            t0 = time.perf_counter()
            try:
                ok = await call(i)
            except Exception:  # nats TimeoutError, NoRespondersError, bad reply
                ok = False
            if recorder is not None:
                if ok:
                    recorder.latencies.append(time.perf_counter() - t0)
                else:
                    recorder.errors += 1

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, count)))))


async def wait_for_agent(nc, agent_id: int, deadline: float) -> bool:
    loop = asyncio.get_running_loop()
    ping = json.dumps({"id": -1, "type": "ping"}).encode()
    while loop.time() < deadline:
        try:
            msg = await nc.request(subject_for(agent_id), ping, timeout=0.5)
            if json.loads(msg.data).get("pong") == agent_id:
                return True
        except NoRespondersError:
            await asyncio.sleep(0.05)  # not subscribed yet
        except Exception:
            await asyncio.sleep(0.05)
    return False


async def run_controller(args: argparse.Namespace) -> None:
    if _IMPORT_ERROR is not None:
        skip(f"nats-py not importable: {_IMPORT_ERROR}")
    require_loopback_url(args.nats_url)
    errors: list[Exception] = []

    async def note_error(exc: Exception) -> None:
        errors.append(exc)

    try:
        nc = await open_connection(args.nats_url, "bench-controller", error_cb=note_error)
    except Exception as exc:
        cause = errors[-1] if errors else exc
        skip(f"no NATS server answering at {args.nats_url} within "
             f"{SERVER_ANSWER_TIMEOUT:.0f}s ({type(cause).__name__}: {cause})")

    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.agents_timeout
        subjects = [subject_for(agent_id) for agent_id in range(args.agents)]
        ready = await asyncio.gather(
            *(wait_for_agent(nc, agent_id, deadline) for agent_id in range(args.agents))
        )
        if not all(ready):
            missing = [i for i, ok in enumerate(ready) if not ok]
            print(f"controller: agents {missing} did not answer within "
                  f"{args.agents_timeout}s", file=sys.stderr)
            raise SystemExit(1)

        async def call(i: int) -> bool:
            payload = make_payload(i)
            body = json.dumps({"id": i, "type": COMMAND_TYPE, "payload": payload}).encode()
            msg = await nc.request(subjects[i % len(subjects)], body, timeout=REQUEST_TIMEOUT)
            reply = json.loads(msg.data)
            return reply.get("id") == i and reply["result"]["seq"] == payload["seq"]

        await drive(WARMUP_REQUESTS, 0, args.concurrency, call, None)
        recorder = Recorder()
        recorder.start()
        await drive(args.requests, WARMUP_REQUESTS, args.concurrency, call, recorder)
        recorder.stop()

        bye = json.dumps({"type": "shutdown"}).encode()
        for subject in subjects:
            await nc.publish(subject, bye)
        await nc.flush(timeout=2)
    finally:
        try:
            async with asyncio.timeout(2.0):
                await nc.close()
        except TimeoutError:
            pass
    emit(recorder.report(
        system=SYSTEM, requests=args.requests, concurrency=args.concurrency,
        agents=args.agents, warmup=WARMUP_REQUESTS,
    ))


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)

    agent = roles.add_parser("agent", help="subscribe to bench.agent.<id> and reply")
    agent.add_argument("--port", type=int, default=0, help="unused (common contract)")
    agent.add_argument("--host", default="127.0.0.1", help="unused (see --nats-url)")
    agent.add_argument("--id", type=int, default=0)
    agent.add_argument("--nats-url", default=DEFAULT_URL)
    agent.add_argument("--connect-timeout", type=float, default=5.0)
    agent.add_argument("--idle-timeout", type=float, default=60.0)

    controller = roles.add_parser("controller", help="send requests, report")
    controller.add_argument("--port", type=int, default=0, help="unused (common contract)")
    controller.add_argument("--host", default="127.0.0.1", help="unused (see --nats-url)")
    controller.add_argument("--requests", type=int, required=True)
    controller.add_argument("--concurrency", type=int, required=True)
    controller.add_argument("--agents", type=int, default=1)
    controller.add_argument("--nats-url", default=DEFAULT_URL)
    controller.add_argument("--agents-timeout", type=float, default=AGENTS_WAIT_TIMEOUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "controller":
        asyncio.run(run_controller(args))
        return 0
    if _IMPORT_ERROR is not None:
        print(f"nats-py not importable: {_IMPORT_ERROR}", file=sys.stderr)
        return 1
    return asyncio.run(run_agent(args))


if __name__ == "__main__":
    sys.exit(main())
