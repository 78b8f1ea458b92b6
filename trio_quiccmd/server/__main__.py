"""``python -m trio_quiccmd.server``: run the server until SIGINT/SIGTERM.

``python -m trio_quiccmd.server token ...`` / ``api-token ...`` manage
credentials instead (see :mod:`.tokens_cli`).

Exit status: 0 after a graceful shutdown, 1 if it could not start or a second
signal forced it to stop without finishing the drain, 2 for a bad setting.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Sequence

import trio

from ..config import ConfigError, ServerSettings, format_host_port, load_settings
from ..logs import configure_logging
from . import tokens_cli
from .service import ServerAddresses, StartupError, serve

PROG = "python -m trio_quiccmd.server"

logger = logging.getLogger("trio_quiccmd.server")


async def run(settings: ServerSettings) -> int:
    """Serve until the first SIGINT/SIGTERM, then drain and return 0.

    A second signal during the drain stops at once and returns 1. Raises
    :class:`StartupError` if the server cannot start. If cancelled, the
    server stops at once without a drain (as for a second signal).
    """
    shutdown = trio.Event()
    forced = False
    # Opened before the server starts, and held until every task has ended: a
    # signal at any moment means "stop politely", never a KeyboardInterrupt.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                nonlocal forced
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not shutdown.is_set():
                        logger.info("Signal received signal=%s action=graceful_shutdown", name)
                        shutdown.set()
                    else:
                        logger.warning("Signal received signal=%s action=stop_now", name)
                        forced = True
                        nursery.cancel_scope.cancel()

            async def run_server(*, task_status: trio.TaskStatus[ServerAddresses]) -> None:
                await serve(settings, shutdown_event=shutdown, task_status=task_status)
                nursery.cancel_scope.cancel()  # done: stop watching for signals

            nursery.start_soon(watch_signals)
            addresses: ServerAddresses = await nursery.start(run_server)
            # On stdout, for people and for scripts that start us on port 0.
            print(
                f"quiccmd server listening http={addresses.http_url} "
                f"quic={format_host_port(*addresses.quic)}",
                flush=True,
            )
    return 1 if forced else 0


def _startup_error(group: BaseExceptionGroup) -> StartupError | None:
    matched, _ = group.split(StartupError)
    while isinstance(matched, BaseExceptionGroup):
        matched = matched.exceptions[0]
    return matched  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in tokens_cli.COMMANDS:
        # `token ...` / `api-token ...`: manage credentials, do not serve.
        return tokens_cli.main(arguments)
    try:
        settings = load_settings(arguments)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.log_level != "DEBUG":
        # hypercorn's "Running on ... (CTRL + C to quit)" repeats our startup
        # lines, and aioquic logs three lines per connection that our own
        # "Agent connected/disconnected" lines already say, in key=value form.
        for noisy in ("hypercorn.error", "quic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return trio.run(run, settings)
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        error = _startup_error(group)
        if error is None:
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
