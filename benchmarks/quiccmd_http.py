"""trio_quiccmd through its HTTP API: POST /api/command with "wait": true.

The controller role starts the real server (`python -m trio_quiccmd.server`,
log level WARNING) as a subprocess, waits for the agent (started by the runner
with `quiccmd_api.py agent`, the same agent as the Python-API system), then
drives it from a thin keep-alive HTTP client with C connections. CPU and peak
RSS are the *server* process's. Compare with `trivial_http.py`: the same
hypercorn + Quart-Trio stack answering at once, without any command behind it.

By hand:
    python benchmarks/quiccmd_http.py controller --port 9556 --requests 3000 --concurrency 16 --cert-dir /tmp/qh &
    python benchmarks/quiccmd_api.py agent --port 9556 --ca-file /tmp/qh/server-cert.pem
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    COMMAND_TYPE,
    emit,
    make_payload,
    measure_http_server,
)


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, ready, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if ready(json.loads(response.read())):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {url}")


def command_body(i: int) -> dict:
    return {"client_id": "bench-0", "command_type": COMMAND_TYPE, "payload": make_payload(i), "wait": True}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["controller"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--agents", type=int, default=1)
    parser.add_argument("--cert-dir", required=True)
    args = parser.parse_args()

    http_port = free_tcp_port()
    server = subprocess.Popen(
        [
            sys.executable, "-m", "trio_quiccmd.server",
            "--http", f"127.0.0.1:{http_port}",
            "--quic", f"{args.host}:{args.port}",
            "--data-dir", args.cert_dir,
            "--log-level", "WARNING",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{http_port}"
        wait_http(base + "/healthz", lambda body: True)
        wait_http(base + "/api/clients", lambda body: len(body.get("clients", [])) >= args.agents, 60)
        bodies = [command_body(i) for i in range(args.requests)]
        emit(measure_http_server("quiccmd_http", server.pid, http_port, bodies, args.concurrency))
    finally:
        server.terminate()
        server.wait(15)


if __name__ == "__main__":
    main()
