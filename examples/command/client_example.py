"""Embed the agent in your own trio program, with your own command types.

Run a server first (``python -m trio_quiccmd.server``, or ``server_example.py``
next to this file), then, from the same directory::

    python examples/command/client_example.py --id client-001

Started from the server's directory, the agent finds the server's development
certificate in ``./.quiccmd/server-cert.pem`` and trusts exactly that, and
sends the development credential in ``./.quiccmd/agent-dev-token``; from
elsewhere pass ``--ca-file`` or ``--server-fingerprint``, and ``--token-file``
with a token from ``python -m trio_quiccmd.server token create``. Ctrl+C (or SIGTERM)
closes the connection politely and exits.

The agent is just one task in your nursery: here a second task reports its
connection state, standing in for whatever else your program does.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from trio_quiccmd import Agent
from trio_quiccmd.quic.tls import DEV_CERT_NAME
from trio_quiccmd.tokens import DEV_AGENT_TOKEN_FILE, read_token_file

# executor.py sits next to this file (the script's directory is on sys.path).
from executor import build_registry

logger = logging.getLogger("client_example")


async def report_status(agent: Agent, every: float) -> None:
    """Something else the program does: log the agent's state now and then."""
    while True:
        await agent.wait_connected()
        logger.info(
            "Agent status client_id=%s connected=%s running_commands=%d sessions=%d",
            agent.client_id, agent.connected, agent.handler.running, agent.sessions_established,
        )
        await trio.sleep(every)


async def main(args: argparse.Namespace) -> None:
    registry = build_registry()
    ca_file = args.ca_file
    if ca_file is None and args.server_fingerprint is None:
        candidate = Path(args.data_dir) / DEV_CERT_NAME
        if candidate.is_file():
            ca_file = candidate
            logger.info("Trusting the server's dev certificate ca_file=%s", candidate)
    token_file = args.token_file or Path(args.data_dir) / DEV_AGENT_TOKEN_FILE
    token = read_token_file(token_file) if Path(token_file).is_file() else None
    agent = Agent(
        args.id,
        args.server,
        executor=registry,
        labels=args.labels,
        ca_file=ca_file,
        server_fingerprint=args.server_fingerprint,
        token=token,
    )
    logger.info("Serving command types=%s", ",".join(registry.command_types))

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    logger.info("Stopping")
                    agent.stop()  # polite close; agent.run() then returns
                    return

            nursery.start_soon(stop_on_signal)
            nursery.start_soon(report_status, agent, args.status_every)
            await agent.run()  # returns after agent.stop()
            nursery.cancel_scope.cancel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--id", default="client-001", help="client id (default client-001)")
    parser.add_argument("--server", default="127.0.0.1:8474", help="HOST:PORT of the server")
    parser.add_argument("--label", action="append", default=["example=client_example"],
                        help="KEY=VALUE label; repeatable")
    parser.add_argument("--data-dir", default="./.quiccmd",
                        help="where the server keeps server-cert.pem (default ./.quiccmd)")
    parser.add_argument("--ca-file", help="CA certificate(s) to verify the server against")
    parser.add_argument("--server-fingerprint", help="sha256:... of the server's certificate")
    parser.add_argument("--token-file", help="this agent's token (default: the data dir's agent-dev-token)")
    parser.add_argument("--status-every", type=float, default=30.0,
                        help="seconds between status lines (default 30)")
    args = parser.parse_args(argv)
    host, _, port = args.server.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        parser.error(f"--server must be HOST:PORT, got {args.server!r}")
    args.server = (host.strip("[]"), int(port))
    args.labels = {}
    for label in args.label:
        key, sep, value = label.partition("=")
        if not sep or not key:
            parser.error(f"--label must be KEY=VALUE, got {label!r}")
        args.labels[key] = value
    return args


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logging.getLogger("quic").setLevel(logging.WARNING)
    trio.run(main, parse_args())
    sys.exit(0)
