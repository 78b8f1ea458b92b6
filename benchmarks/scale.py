"""Many agents on one server: handshake rate, memory per agent, fan-out time.

Starts a server (CommandManager + CommandServer, as in the real service) in
this process, then N agents spread over several agent processes, each running
many `Agent` instances (each its own UDP socket and QUIC connection, TLS
verified). Measures:

* handshake rate: agents connected (HELLO done) per second while they connect;
* server memory per connected agent: growth of the server's RSS / N;
* fan-out: one `echo` command sent to every agent at once, time until every
  result is back, and how long the server's garbage collector ran meanwhile
  (a full collection walks every connected agent's state).

    python benchmarks/scale.py                  # 1,000 agents
    python benchmarks/scale.py --agents 10000   # the big one
    python benchmarks/scale.py --agents 3000 --gc-freeze-agents 0   # no heap freezing

As in the server, agents' state is kept out of full garbage collections
(``HeapFreezer``) once ``--gc-freeze-agents`` (default 1000, the server's
default) are connected; its periodic look is made twice more just before
the fan-out, as a server whose agents have been connected a while has made
it (two looks at the same agents: the fleet has settled; a real fleet's
reconnects may keep it from settling, see HeapFreezer).

Each agent process here stands in for thousands of machines, each of which
would run one agent: it holds the state of all of them (2,500 agents each
at 10,000 agents in four processes: 1.25 million objects the garbage
collector tracks), so a full collection stalls every agent in it for 0.7 s,
which no real agent would do. Those stalls then show up as the server's
retransmissions. So each agent process collects and freezes its heap once
all its agents are first connected, and says so; the fan-out starts once
every process has (``--no-agent-heap-freeze``: they only say they are
connected).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

from trio_quiccmd import Agent, CommandManager, CommandServer, CommandStatus, ManagerSettings  # noqa: E402
from trio_quiccmd.quic.admission import DEFAULT_MAX_HANDSHAKES  # noqa: E402
from trio_quiccmd.quic.tls import ensure_dev_certificate  # noqa: E402
from trio_quiccmd.server.collector import HeapFreezer  # noqa: E402
from trio_quiccmd.server.core import server_quic_configuration  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CollectorClock:
    """Time the garbage collector spends, by generation, while installed."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._started = 0.0

    def __enter__(self) -> "CollectorClock":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            generation = info["generation"]
            self.seconds[generation] += time.perf_counter() - self._started
            self.collections[generation] += 1


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run_server(args: argparse.Namespace) -> None:
    raise_fd_limit()
    data = Path(tempfile.mkdtemp(prefix="quiccmd-scale-"))
    cert, key, _ = ensure_dev_certificate(data)
    # The HELLO rate limit (200/s by default) would measure itself, not the
    # server's handshake capacity: lift it here.
    manager = CommandManager(
        settings=ManagerSettings(hello_timeout=60.0, max_hello_rate=1e6, max_agents=10**7)
    )
    server = CommandServer(
        manager, server_quic_configuration(cert, key, idle_timeout=60.0), max_handshakes=args.max_handshakes
    )
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        freezer = None
        if args.gc_freeze_agents:
            freezer = HeapFreezer(manager.registry.links, min_agents=args.gc_freeze_agents)
            await nursery.start(freezer.run)
        for _ in range(3):  # settle allocator before the baseline
            await trio.sleep(0.1)
        baseline = rss_mib()
        per_proc = -(-args.agents // args.procs)
        procs = []
        started = time.perf_counter()
        server_cpu_at_start = cpu_seconds(os.getpid())
        for p in range(args.procs):
            count = min(per_proc, args.agents - p * per_proc)
            if count <= 0:  # fewer agents than processes
                break
            procs.append(
                await trio.lowlevel.open_process(
                    [sys.executable, __file__, "agents", "--port", str(address[1]),
                     "--ca-file", str(cert), "--offset", str(p * per_proc), "--count", str(count),
                     "--connect-concurrency", str(args.connect_concurrency),
                     *([] if args.agent_heap_freeze else ["--no-agent-heap-freeze"])],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                )
            )
        first_at = None
        with trio.fail_after(args.connect_timeout):
            while (connected := len(manager.registry)) < args.agents:
                if connected and first_at is None:
                    first_at = time.perf_counter()
                await trio.sleep(0.05)
        all_at = time.perf_counter()
        # The agent processes' CPU until now is their start-up and handshakes.
        connect_cpu = [cpu_seconds(os.getpid()) - server_cpu_at_start, *(cpu_seconds(p.pid) for p in procs)]
        with trio.fail_after(args.connect_timeout):
            for proc in procs:  # each is ready: its agents connected, its heap frozen (unless told not to)
                if not await proc.stdout.receive_some(64):
                    raise RuntimeError(f"agent process {proc.pid} exited before it was ready")
        await trio.sleep(0.5)
        connected_rss = rss_mib()

        ids = [f"scale-{i}" for i in range(args.agents)]
        pids = [os.getpid(), *(proc.pid for proc in procs)]
        # Both ways alike: what a fan-out meets is the collector's steady
        # state, not the garbage of the connect phase.
        gc.collect()
        if freezer is not None:
            freezer.check()
            freezer.check()
        cpu_before = [cpu_seconds(pid) for pid in pids]
        with CollectorClock() as collector:
            fanout_start = time.perf_counter()
            commands = [await manager.send_command(client_id, "echo", {"n": 1}) for client_id in ids]
            sent_at = time.perf_counter()
            finished = 0
            async with trio.open_nursery() as waiters:
                async def wait_one(command_id: str) -> None:
                    nonlocal finished
                    if (await manager.wait(command_id)).status is CommandStatus.COMPLETED:
                        finished += 1
                for command in commands:
                    waiters.start_soon(wait_one, command.command_id)
            fanout = time.perf_counter() - fanout_start
        cpu_used = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before)]

        emit({
            "agents": args.agents,
            "agent_processes": len(procs),
            "connect_seconds": all_at - started,
            "handshakes_per_second": args.agents / (all_at - (first_at or started)),
            # CPU per agent connected (handshake, HELLO, and the keepalives of
            # those already connected meanwhile), server and agents.
            "connect_server_cpu_ms_per_agent": connect_cpu[0] * 1000 / args.agents,
            "connect_agents_cpu_ms_per_agent": sum(connect_cpu[1:]) * 1000 / args.agents,
            # New connections' Initials not started at once (each answered
            # with a Retry, or dropped): --max-handshakes were in progress.
            "handshakes_deferred": server.endpoint.admission.deferred,
            "max_handshakes": args.max_handshakes,
            "server_rss_baseline_mib": baseline,
            "server_rss_connected_mib": connected_rss,
            "server_kib_per_agent": (connected_rss - baseline) * 1024 / args.agents,
            "fanout_send_seconds": sent_at - fanout_start,
            "fanout_seconds": fanout,
            "fanout_completed": finished,
            # CPU the fan-out cost, server and agents: on this machine's cores
            # (all processes share them) the fan-out cannot take less than
            # their sum / cores, nor less than the server's own (one thread).
            "fanout_server_cpu_seconds": cpu_used[0],
            "fanout_agents_cpu_seconds": sum(cpu_used[1:]),
            "fanout_cpu_floor_seconds": max(cpu_used[0], sum(cpu_used) / (os.cpu_count() or 1)),
            # The server's garbage collector during the fan-out (the event
            # loop stands still meanwhile); full collections are generation 2.
            "fanout_server_gc_seconds": sum(collector.seconds),
            "fanout_server_full_collections": collector.collections[2],
            "fanout_server_full_collection_seconds": collector.seconds[2],
            "gc_freeze_agents": args.gc_freeze_agents,
            "agent_heap_freeze": args.agent_heap_freeze,
        })
        for proc in procs:
            proc.terminate()
        with trio.move_on_after(10):
            for proc in procs:
                await proc.wait()
        nursery.cancel_scope.cancel()


async def run_agents(args: argparse.Namespace) -> None:
    raise_fd_limit()
    limiter = trio.Semaphore(args.connect_concurrency)
    connected = 0

    async def connect(nursery: trio.Nursery, agent: Agent) -> None:
        nonlocal connected
        async with limiter:  # bounded connects in flight, so handshakes do not time out
            await nursery.start(agent.run)
        connected += 1
        if connected == args.count:
            if args.agent_heap_freeze:
                gc.collect()
                gc.freeze()
            print("ready", flush=True)

    async with trio.open_nursery() as nursery:
        for index in range(args.offset, args.offset + args.count):
            agent = Agent(
                f"scale-{index}", ("127.0.0.1", args.port), ca_file=args.ca_file,
                idle_timeout=60.0, handshake_timeout=30.0, keepalive_interval=20.0,
                max_concurrent_commands=16,
            )
            nursery.start_soon(connect, nursery, agent)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", nargs="?", default="server", choices=["server", "agents"])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument("--connect-timeout", type=float, default=600.0)
    parser.add_argument(
        "--gc-freeze-agents", type=int, default=1000,
        help="keep agents' state out of full collections from this many on, as the server does; 0: never",
    )
    parser.add_argument(
        "--max-handshakes", type=int, default=DEFAULT_MAX_HANDSHAKES,
        help="the server's limit on handshakes in progress (default: the server's)",
    )
    parser.add_argument(
        "--no-agent-heap-freeze", dest="agent_heap_freeze", action="store_false",
        help="agent processes leave their heaps to the collector's own rules (see the module's docstring)",
    )
    parser.add_argument("--port", type=int)
    parser.add_argument("--ca-file")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    trio.run(run_server if args.role == "server" else run_agents, args)


if __name__ == "__main__":
    main()
