"""The HTTP stack's ceiling: a trivial Quart-Trio endpoint on hypercorn's trio worker.

POST /api/command parses the JSON body and answers a JSON result at once:
what `quiccmd_http.py` would cost with no command, no QUIC, no agent behind
it. Served with the same hypercorn setup as `python -m trio_quiccmd.server`
(trio worker, one process, access log off at WARNING).

By hand:
    python benchmarks/trivial_http.py controller --port 0 --requests 3000 --concurrency 16
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    emit,
    make_payload,
    make_result,
    measure_http_server,
)


def serve(port: int) -> None:
    import hypercorn.trio
    import trio
    from hypercorn.config import Config
    from quart import request
    from quart_trio import QuartTrio

    logging.basicConfig(level=logging.WARNING)
    app = QuartTrio("trivial")

    @app.post("/api/command")
    async def command():
        body = await request.get_json()
        return make_result(body["payload"]), 200

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    trio.run(hypercorn.trio.serve, app, config)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["controller"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--agents", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--cert-dir")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(port,), daemon=True)
    server.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("trivial server did not start")
                time.sleep(0.05)
        bodies = [{"client_id": "bench-0", "command_type": "echo", "payload": make_payload(i), "wait": True} for i in range(args.requests)]
        emit(measure_http_server("trivial_http", server.pid, port, bodies, args.concurrency))
    finally:
        server.terminate()
        server.join(10)


if __name__ == "__main__":
    main()
