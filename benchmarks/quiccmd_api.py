"""trio_quiccmd through its Python API: CommandManager.send_and_wait, full lifecycle.

The controller runs CommandManager + CommandServer (QUIC, TLS verified by the
agents) in one trio process; agents are separate processes running the
`Agent` library with an ``echo``-style handler. Every command is tracked
through pending -> executing -> completed, kept in history (``--store
memory`` or ``sqlite``, the server's default), and observed by
the Prometheus metrics, exactly as in the server. Log level is WARNING (the
per-command INFO lines are for operators, not for this measurement).

By hand:
    python benchmarks/quiccmd_api.py controller --port 9555 --requests 5000 --concurrency 256 --cert-dir /tmp/qc &
    python benchmarks/quiccmd_api.py agent --port 9555 --ca-file /tmp/qc/server-cert.pem
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import COMMAND_TYPE, Recorder, emit, make_payload, make_result  # noqa: E402

from trio_quiccmd import Agent, CommandManager, CommandServer, CommandStatus, ExecutorRegistry  # noqa: E402
from trio_quiccmd.quic.tls import ensure_dev_certificate  # noqa: E402
from trio_quiccmd.server.core import server_quic_configuration  # noqa: E402
from trio_quiccmd.server.metrics import Metrics  # noqa: E402
from trio_quiccmd.server.store import MemoryStore  # noqa: E402
from trio_quiccmd.server.store.sqlite import open_sqlite_store  # noqa: E402
from trio_quiccmd.tokens import DEV_AGENT_TOKEN_FILE, read_token_file  # noqa: E402


async def run_controller(args: argparse.Namespace) -> None:
    if args.store == "memory":
        await measure(args, MemoryStore())
    else:
        # In the cert dir, a fresh temporary directory per run.
        async with open_sqlite_store(Path(args.cert_dir) / "commands.db", synchronous=args.store_sync) as store:
            await measure(args, store)


async def measure(args: argparse.Namespace, store) -> None:
    cert, key, _ = ensure_dev_certificate(Path(args.cert_dir))
    manager = CommandManager(store)
    manager.add_observer(
        Metrics(connected_agents=lambda: len(manager.registry), unfinished_commands=lambda: manager.unfinished_count)
    )
    server = CommandServer(manager, server_quic_configuration(cert, key))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, args.host, args.port)
        agent_ids = [f"bench-{i}" for i in range(args.agents)]
        with trio.fail_after(60):
            while any(manager.registry.get(a) is None for a in agent_ids):
                await trio.sleep(0.05)
        recorder = Recorder()
        latencies = recorder.latencies

        async def worker(indices: range, timed: bool) -> None:
            for i in indices:
                start = trio.current_time()
                command = await manager.send_and_wait(
                    agent_ids[i % len(agent_ids)], COMMAND_TYPE, make_payload(i)
                )
                if command.status is not CommandStatus.COMPLETED:
                    recorder.errors += 1
                elif timed:
                    latencies.append(trio.current_time() - start)

        async def load(total: int, timed: bool) -> None:
            async with trio.open_nursery() as workers:
                for w in range(args.concurrency):
                    workers.start_soon(worker, range(w, total, args.concurrency), timed)

        await load(200, False)
        recorder.start()
        await load(args.requests, True)
        recorder.stop()
        system = "quiccmd_api" if args.store == "memory" else "quiccmd_api_sqlite"
        emit(recorder.report(system=system if args.store_sync == "full" else system + "_normal"))
        await server.shutdown(grace=1.0)
        nursery.cancel_scope.cancel()


async def run_agent(args: argparse.Namespace) -> None:
    registry = ExecutorRegistry()

    async def echo(payload):
        return make_result(payload)

    registry.register(COMMAND_TYPE, echo)
    # The real server (quiccmd_http) writes its development agent credential
    # beside its certificate; the in-process one here authenticates no one.
    token_file = Path(args.ca_file).with_name(DEV_AGENT_TOKEN_FILE) if args.ca_file else None
    agent = Agent(
        f"bench-{args.id}",
        (args.host, args.port),
        registry,
        ca_file=args.ca_file,
        token=read_token_file(token_file) if token_file and token_file.is_file() else None,
        reconnect_max_delay=1.0,
    )
    await agent.run()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["controller", "agent"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--agents", type=int, default=1)
    parser.add_argument("--id", type=int, default=0)
    parser.add_argument("--cert-dir", default=".bench-cert")
    parser.add_argument("--ca-file")
    parser.add_argument("--store", choices=["memory", "sqlite"], default="memory")
    parser.add_argument("--store-sync", choices=["full", "normal"], default="full")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        trio.run(run_controller if args.role == "controller" else run_agent, args)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
