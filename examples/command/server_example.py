"""Embed the server in your own trio program and send commands from Python.

    python examples/command/server_example.py            # terminal 1
    python examples/command/client_example.py            # terminal 2, same directory

The server listens for agents on UDP 127.0.0.1:8474 with a development
certificate it creates in ``./.quiccmd`` (that is where the agent looks for
it). It queues a few commands for ``client-001`` -- they wait up to
``--wait-for-agent`` seconds for the agent to connect -- prints each result,
shows a timeout, a cancel and an unknown command type, lists the history,
then shuts down gracefully.

No HTTP here: this is the Python API (``CommandManager``) the HTTP API of
``python -m trio_quiccmd.server`` is built on.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import trio

from trio_quiccmd import Command, CommandManager, CommandServer
from trio_quiccmd.quic.tls import ensure_dev_certificate, fingerprint_of_pem_file
from trio_quiccmd.server.core import server_quic_configuration

logger = logging.getLogger("server_example")


def show(title: str, command: Command) -> None:
    took = (
        f"{command.completed_at - command.created_at:.3f}s"
        if command.completed_at is not None
        else "-"
    )
    print(f"\n== {title}")
    print(f"   command_id={command.command_id} type={command.command_type} "
          f"status={command.status.value} took={took}")
    if command.result is not None:
        print("   result=" + json.dumps(command.result, sort_keys=True))
    if command.error is not None:
        print(f"   error_code={command.error_code} error={command.error}")
    sys.stdout.flush()


async def demo(manager: CommandManager, client_id: str, wait_for_agent: float) -> None:
    # 1. Queued until the agent connects (connect_timeout), then run.
    first = await manager.send_command(
        client_id, "echo", {"hello": "world"}, connect_timeout=wait_for_agent
    )
    print(f"Queued {first.command_id} for {client_id}; waiting up to "
          f"{wait_for_agent:.0f}s for the agent to connect ...", flush=True)
    show("echo (waited for the agent)", await manager.wait(first.command_id))
    if not manager.clients():
        print("The agent never connected; start client_example.py next time.")
        return
    for info in manager.clients():
        print(f"   connected: {info.client_id} from {info.remote_address} labels={info.labels}")

    # 2. The example executor's own command types.
    show("restart", await manager.send_and_wait(
        client_id, "restart", {"service": "nginx", "delay_seconds": 1}, timeout=10))
    show("disk_usage", await manager.send_and_wait(client_id, "disk_usage", {"path": "/"}))
    show("file_checksum", await manager.send_and_wait(
        client_id, "file_checksum", {"path": str(Path(__file__).resolve())}))

    # 3. Several at once: each command has its own QUIC stream, so they overlap.
    async with trio.open_nursery() as nursery:
        for n in range(3):
            async def one(n: int = n) -> None:
                show(f"concurrent restart {n}", await manager.send_and_wait(
                    client_id, "restart", {"service": f"worker-{n}", "delay_seconds": 0.5}))
            nursery.start_soon(one)

    # 4. A command that outlives its timeout ends "timeout"; the agent is told to stop.
    show("sleep 10s with a 1s timeout", await manager.send_and_wait(
        client_id, "sleep", {"seconds": 10}, timeout=1))

    # 5. Cancel a running command.
    slow = await manager.send_command(client_id, "restart", {"service": "db", "delay_seconds": 30})
    await trio.sleep(0.5)
    await manager.cancel(slow.command_id, "changed my mind")
    show("restart, cancelled after 0.5s", await manager.get_command(slow.command_id))

    # 6. Failures come back with a machine-readable error_code.
    show("unknown command type", await manager.send_and_wait(client_id, "reboot_the_moon"))
    show("invalid payload", await manager.send_and_wait(client_id, "disk_usage", {"path": 42}))

    # 7. The history, newest first.
    page = await manager.list_commands(client_id=client_id)
    print(f"\n== history for {client_id}: {len(page.commands)} commands")
    for command in page.commands:
        print(f"   {command.command_id}  {command.command_type:<16} {command.status.value:<10}"
              f" {command.error_code or ''}")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir)
    cert, key, created = ensure_dev_certificate(data_dir)
    logger.info(
        "%s development certificate cert=%s fingerprint=%s",
        "Created" if created else "Using", cert, fingerprint_of_pem_file(cert),
    )
    manager = CommandManager()
    server = CommandServer(manager, server_quic_configuration(cert, key))
    host, _, port = args.quic.rpartition(":")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, host, int(port))
        print(f"QUIC endpoint listening on {address[0]}:{address[1]}", flush=True)
        print(f"Start the agent: python examples/command/client_example.py "
              f"--id {args.client_id} --server {address[0]}:{address[1]} "
              f"--data-dir {data_dir}", flush=True)
        try:
            await demo(manager, args.client_id, args.wait_for_agent)
        finally:
            with trio.CancelScope(shield=True):
                await server.shutdown(grace=5)
            nursery.cancel_scope.cancel()
    print("\nServer stopped.", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quic", default="127.0.0.1:8474",
                        help="UDP HOST:PORT to listen on (default 127.0.0.1:8474; port 0 = any)")
    parser.add_argument("--data-dir", default="./.quiccmd",
                        help="where the dev certificate lives (default ./.quiccmd)")
    parser.add_argument("--client-id", default="client-001",
                        help="the agent to send commands to (default client-001)")
    parser.add_argument("--wait-for-agent", type=float, default=60.0,
                        help="seconds to wait for the agent to connect (default 60)")
    args = parser.parse_args(argv)
    host, _, port = args.quic.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        parser.error(f"--quic must be HOST:PORT, got {args.quic!r}")
    return args


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logging.getLogger("quic").setLevel(logging.WARNING)
    try:
        trio.run(main, parse_args())
    except KeyboardInterrupt:
        print("\nInterrupted.")
