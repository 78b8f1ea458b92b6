"""What every benchmark controller shares: the workload, the measurements, the report.

Each system under test is a script with two roles, run as separate OS processes:

    python <script> agent --port PORT [--host 127.0.0.1] [--id N]
    python <script> controller --port PORT --requests R --concurrency C [--agents 1]

The agent answers requests; the controller (in a server role or not, as the
system dictates) sends R requests with C in flight, waits for every reply, and
prints ONE line of JSON made by :func:`report` on stdout, last. A system whose
required server/binary is missing prints ``{"skipped": "<why>"}`` and exits 0.
`benchmarks/run.py` starts the processes and collects the lines.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

#: The command the controller sends (about 110 bytes of JSON on the wire).
COMMAND_TYPE = "echo"


def make_payload(i: int) -> dict:
    """The request body: with the command envelope, ~110 bytes of JSON."""
    return {"host": "web-01.example.internal", "action": "status", "seq": i}


def make_result(payload: dict) -> dict:
    """The reply body: ~60 bytes of JSON."""
    return {"ok": True, "seq": payload["seq"], "state": "running", "uptime": 86400}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


class Recorder:
    """Collects per-request latencies and the controller's CPU over the timed window."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self._start = self._cpu_start = 0.0
        self._elapsed = self._cpu = 0.0

    def start(self) -> None:
        self._cpu_start = cpu_seconds()
        self._start = time.perf_counter()

    def stop(self) -> None:
        self._elapsed = time.perf_counter() - self._start
        self._cpu = cpu_seconds() - self._cpu_start

    def report(self, **extra) -> dict:
        lat = sorted(self.latencies)
        completed = len(lat)
        return {
            "completed": completed,
            "errors": self.errors,
            "seconds": self._elapsed,
            "throughput": completed / self._elapsed if self._elapsed else 0.0,
            "p50_ms": percentile(lat, 0.50) * 1000,
            "p99_ms": percentile(lat, 0.99) * 1000,
            "cpu_us_per_command": self._cpu / completed * 1e6 if completed else float("nan"),
            "peak_rss_mib": peak_rss_kib() / 1024,
            **extra,
        }


def emit(result: dict) -> None:
    """Print the controller's one JSON line (last line of stdout)."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def skip(reason: str) -> None:
    emit({"skipped": reason})
    raise SystemExit(0)


def port_from_env(default: int) -> int:
    return int(os.environ.get("BENCH_PORT", default))


# -- HTTP load (for the HTTP systems) -------------------------------------------

def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of another process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def process_peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def http_load(
    host: str, port: int, path: str, bodies, concurrency: int, recorder: Recorder
) -> None:
    """POST each of ``bodies`` over ``concurrency`` keep-alive connections.

    A deliberately thin asyncio HTTP/1.1 client (fixed headers, Content-Length
    bodies only) so the load generator costs far less than the server it
    measures. A non-2xx answer counts as an error.
    """
    import asyncio

    queue = list(enumerate(bodies))
    queue.reverse()

    async def connection() -> None:
        reader = writer = None
        try:
            while queue:
                _, body = queue.pop()  # before any await: other connections share the queue
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                data = json.dumps(body).encode()
                writer.write(
                    b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s"
                    % (path.encode(), host.encode(), len(data), data)
                )
                start = time.perf_counter()
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                close = False
                for line in head.split(b"\r\n"):
                    name = line[:15].lower()
                    if name == b"content-length:":
                        length = int(line[15:])
                    elif line.lower() == b"connection: close":
                        close = True
                await reader.readexactly(length)
                if 200 <= status < 300:
                    recorder.latencies.append(time.perf_counter() - start)
                else:
                    recorder.errors += 1
                if close:
                    # e.g. hypercorn's keep_alive_max_requests (1,000): open a new one.
                    writer.close()
                    reader = writer = None
        finally:
            if writer is not None:
                writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))


# -- the peers' command line and process life (asyncio peers) -------------------------

def check_loopback(system: str, host: str) -> str:
    """Benchmarks send traffic to this machine only."""
    import ipaddress

    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"{system}: refusing non-loopback address {host!r}")
    return host


def contract_parser(description: str, default_port: int):
    """The shared ``agent`` / ``controller`` command line; returns (parser, agent, controller)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    roles = parser.add_subparsers(dest="role", required=True)
    agent = roles.add_parser("agent")
    agent.add_argument("--port", type=int, default=port_from_env(default_port))
    agent.add_argument("--host", default="127.0.0.1")
    agent.add_argument("--id", type=int, default=0)
    controller = roles.add_parser("controller")
    controller.add_argument("--port", type=int, default=port_from_env(default_port))
    controller.add_argument("--host", default="127.0.0.1")
    controller.add_argument("--requests", type=int, required=True)
    controller.add_argument("--concurrency", type=int, required=True)
    controller.add_argument("--agents", type=int, default=1)
    return parser, agent, controller


def run_asyncio_role(args, agent_main, controller_main) -> int:
    """Run the role's coroutine; SIGTERM/SIGINT end it and the process exits 0."""
    import asyncio
    import signal

    async def with_signals() -> int:
        task = asyncio.ensure_future(agent_main(args) if args.role == "agent" else controller_main(args))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            return 0

    return asyncio.run(with_signals())


def measure_http_server(system: str, pid: int, port: int, bodies: list, concurrency: int) -> dict:
    """Warm up, then POST ``bodies`` to /api/command of the server process
    ``pid``; the report's CPU and peak RSS are that server's."""
    import asyncio

    asyncio.run(http_load("127.0.0.1", port, "/api/command", bodies[:200], concurrency, Recorder()))
    recorder = Recorder()
    cpu_before = process_cpu_seconds(pid)
    recorder.start()
    asyncio.run(http_load("127.0.0.1", port, "/api/command", bodies, concurrency, recorder))
    recorder.stop()
    cpu = process_cpu_seconds(pid) - cpu_before
    result = recorder.report(system=system)
    result["cpu_us_per_command"] = cpu / max(1, result["completed"]) * 1e6
    result["peak_rss_mib"] = process_peak_rss_mib(pid)
    return result
