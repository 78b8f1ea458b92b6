"""The whole server in one nursery: QUIC endpoint + manager, and the HTTP API.

:func:`serve` wires the pieces from :class:`~trio_quiccmd.config.ServerSettings`
and runs them until a shutdown event, then shuts down in order:

1. the manager refuses new commands (HTTP answers 503, ``/healthz`` too);
2. in-flight commands get ``shutdown_grace`` seconds to finish; the rest end
   ``failed``/``server_shutdown`` (which also releases every long-poll);
3. agent connections are closed with an application close;
4. hypercorn stops through its ``shutdown_trigger`` (finishing the requests
   it has, closing idle keep-alive connections);
5. the QUIC endpoint and the manager's tasks are cancelled, and ``serve`` returns.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import urlsplit

import attrs
import hypercorn.trio
import trio
from aioquic.quic.configuration import QuicConfiguration
from hypercorn.config import Config as HypercornConfig

from ..config import ServerSettings, format_host_port
from ..quic.tls import ensure_dev_certificate, fingerprint_of_pem_file
from ..tokens import TokenFileError
from ..wire import DEFAULT_MAX_FRAME_SIZE
from .audit import AUDIT_FILE, AuditLog
from .auth import AgentAuthenticator, ApiAuthenticator, check_http_exposure, is_loopback
from .collector import HeapFreezer
from .core import CommandServer, server_quic_configuration
from .http_api import ApiLimits, create_app
from .manager import CommandManager, ManagerSettings
from .metrics import Metrics
from .store import MemoryStore, Store, StoreError
from .store.sqlite import open_sqlite_store

logger = logging.getLogger("trio_quiccmd.server")

#: Seconds hypercorn gives requests still open once it is told to stop. By
#: then the drain has settled every command, so any long-poll has returned.
HTTP_GRACEFUL_TIMEOUT = 3.0
#: Seconds an HTTP connection may sit between requests, or take to send a
#: request's headers, before hypercorn closes it (hypercorn's own default).
HTTP_KEEP_ALIVE_TIMEOUT = 5.0


class StartupError(Exception):
    """The server could not start (unusable certificate, address in use, ...). One line."""


@attrs.frozen
class ServerAddresses:
    """Where a started server listens (the real ports when 0 was asked)."""

    http: tuple[str, int]
    quic: tuple[str, int]

    @property
    def http_url(self) -> str:
        return f"http://{format_host_port(*self.http)}"


def manager_settings(settings: ServerSettings) -> ManagerSettings:
    return ManagerSettings(
        max_in_flight_per_agent=settings.max_in_flight_per_agent,
        max_timeout=settings.max_timeout,
        history_retention=settings.history_retention,
        max_history=settings.max_history,
        max_queued_per_agent=settings.max_queued_per_agent,
        max_unfinished_commands=settings.max_unfinished_commands,
        max_agents=settings.max_agents,
        max_hello_rate=settings.max_hello_rate,
    )


def api_limits(settings: ServerSettings) -> ApiLimits:
    return ApiLimits(
        max_payload_bytes=settings.max_payload_bytes,
        default_timeout=settings.default_timeout,
    )


async def _certificate(settings: ServerSettings) -> tuple[Path, Path]:
    """The certificate and key to serve QUIC with; a dev one is made if none is given."""
    created = False
    if settings.cert_file is not None and settings.key_file is not None:
        cert_file, key_file = settings.cert_file, settings.key_file
    else:
        try:
            # Key generation and file writes: off the event loop.
            cert_file, key_file, created = await trio.to_thread.run_sync(
                ensure_dev_certificate, settings.data_dir
            )
        except OSError as exc:
            raise StartupError(
                f"cannot create the development certificate in {settings.data_dir}: {exc}"
            ) from None
    try:
        fingerprint = await trio.to_thread.run_sync(fingerprint_of_pem_file, cert_file)
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot read the TLS certificate {cert_file}: {exc}") from None
    # Agents elsewhere pin this (--server-fingerprint); agents started in the
    # same directory load the certificate file itself.
    logger.info(
        "%s TLS certificate path=%s fingerprint=%s",
        "Created development" if created else ("Using development" if settings.cert_file is None else "Using"),
        cert_file, fingerprint,
    )
    return cert_file, key_file


@asynccontextmanager
async def open_store(settings: ServerSettings) -> AsyncIterator[Store]:
    """The store ``settings`` ask for, open for the duration of the block.

    Raises :class:`~trio_quiccmd.server.store.StoreError` if it cannot be
    opened (corrupt, locked, in use by another server, newer schema).
    """
    path = settings.store_path
    if path is None:
        logger.info("Command store kind=memory durable=false")
        yield MemoryStore()
        return
    if settings.store != "sqlite" and not path.parent.is_dir():
        # A path given by hand: a typo in its directory would start an empty
        # history somewhere new. (The data dir's own store makes the data dir.)
        raise StoreError(
            f"the directory of the command store {path} does not exist: create it, or check "
            "the --store path"
        )
    async with open_sqlite_store(path, synchronous=settings.store_sync) as store:  # type: ignore[arg-type]
        # Absolute, because sqlite:///x.db is relative (the SQLAlchemy spelling;
        # sqlite:////x.db is absolute) and the difference is easy to miss.
        logger.info("Command store kind=sqlite path=%s sync=%s", path.resolve(), settings.store_sync)
        yield store


def _security(settings: ServerSettings) -> tuple[AgentAuthenticator, ApiAuthenticator, AuditLog]:
    """The authenticators and the audit log, from the data dir (blocking file I/O).

    Raises StartupError for an unreadable token file, or when the HTTP API
    would be open to the network with no token to require.
    """
    try:
        api = ApiAuthenticator.from_data_dir(
            settings.data_dir,
            required=settings.require_api_token
            or (not is_loopback(settings.http_host) and not settings.allow_unauthenticated_http),
            # allow_unauthenticated_http opens a public bind only while there
            # is no token to require: once one exists, it is required.
            required_once_tokens_exist=not is_loopback(settings.http_host),
        )
    except (TokenFileError, OSError) as exc:
        raise StartupError(f"cannot load credentials from {settings.data_dir}: {exc}") from None
    refusal = check_http_exposure(
        settings.http_host, api, allow_unauthenticated=settings.allow_unauthenticated_http
    )
    if refusal is not None:
        raise StartupError(refusal)
    try:
        agents = AgentAuthenticator.from_data_dir(settings.data_dir)
        audit = AuditLog(settings.data_dir / AUDIT_FILE)
    except (TokenFileError, OSError) as exc:
        raise StartupError(f"cannot load credentials from {settings.data_dir}: {exc}") from None
    if not api.required and not is_loopback(settings.http_host):
        # allow_unauthenticated_http: anyone on the network may do everything.
        logger.warning(
            "HTTP API does not require a token host=%s (allow_unauthenticated_http: anyone who "
            "reaches it may send commands, until the first API token is created)",
            settings.http_host,
        )
    elif not api.required and api.tokens.tokens:
        # Tokens were issued, yet a request without one may still do
        # everything from loopback: say so once, loudly.
        logger.warning(
            "HTTP API does not require a token host=%s api_tokens=%d (a request without one "
            "acts as anonymous with role operate; behind a reverse proxy or tunnel on this host "
            "that is everyone it lets in: set require_api_token = true)",
            settings.http_host, len(api.tokens.tokens),
        )
    return agents, api, audit


def _first_leaf(group: BaseExceptionGroup, kind: type[BaseException]) -> BaseException | None:
    matched, _ = group.split(kind)
    while isinstance(matched, BaseExceptionGroup):
        matched = matched.exceptions[0]
    return matched


def _parse_bind(bind: str) -> tuple[str, int]:
    """hypercorn reports ``http://127.0.0.1:8080`` / ``http://[::1]:8080``."""
    parts = urlsplit(bind)
    assert parts.hostname is not None and parts.port is not None, bind
    return parts.hostname, parts.port


def _hypercorn_config(settings: ServerSettings) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [settings.http_address]
    config.graceful_timeout = HTTP_GRACEFUL_TIMEOUT
    # How long a client may hold a connection (docs/API.md, "Connections"):
    # between requests and while sending headers, keep_alive_timeout; while
    # sending a body a route reads, the app's BODY_TIMEOUT (then 408); an
    # answer that leaves the body unread closes the connection
    # (http_api.end_connections_left_unread). read_timeout stays None on
    # purpose: the trio worker applies it to every wait for the client's
    # next bytes (trio/tcp_server.py, _read_data), also while the app is
    # still computing the answer and the client rightly sends nothing, so it
    # would cut long-polls, which may last up to max_timeout (a day).
    config.keep_alive_timeout = HTTP_KEEP_ALIVE_TIMEOUT
    # Through logging, so the operator's handlers and format apply.
    config.errorlog = logging.getLogger("hypercorn.error")
    access_logger = logging.getLogger("trio_quiccmd.http.access")
    # hypercorn formats every access line before the logger decides whether to
    # drop it (~8% of a request's CPU): give it no logger when INFO is off.
    config.accesslog = access_logger if access_logger.isEnabledFor(logging.INFO) else None
    config.access_log_format = (
        'HTTP request remote=%(h)s method=%(m)s path=%(U)s query="%(q)s" '
        "status=%(s)s bytes=%(b)s duration_us=%(D)s"
    )
    return config


async def serve(
    settings: ServerSettings,
    *,
    task_status: trio.TaskStatus[ServerAddresses] = trio.TASK_STATUS_IGNORED,
    shutdown_event: trio.Event | None = None,
    store: Store | None = None,
) -> None:
    """Run the server until ``shutdown_event`` is set, then shut down gracefully.

    ``store`` keeps the commands (default: the one ``settings.store`` names,
    opened here and closed on return; a store passed in is left open for its
    owner). With a durable store, commands still unfinished at shutdown are
    left as they are, and taken up again at the next start.

    Agents are authenticated from the data dir's token files (with the
    development credential written there), operators by API tokens, and
    sends and cancels are audited to ``audit.jsonl`` (docs/security.md).

    Reports :class:`ServerAddresses` (the bound ports, also when port 0 was
    asked) through ``task_status.started`` once both listeners are up. Raises
    :class:`StartupError` if the store, the certificate or a token file is
    unusable, if the HTTP API would be open off loopback without a token, or
    if an address cannot be bound. Returns when everything it started has
    stopped.

    If cancelled instead, everything stops at once: no drain, agent
    connections are dropped without a close, open HTTP requests are cut. Set
    ``shutdown_event`` for a polite stop.
    """
    shutdown_event = shutdown_event if shutdown_event is not None else trio.Event()
    # Credentials first: a refusal to start writes no certificate, and the
    # development credential exists by the time the certificate does (what
    # scripts that wait for server-cert.pem then start an agent rely on).
    security = await trio.to_thread.run_sync(_security, settings)
    cert_file, key_file = await _certificate(settings)
    try:
        quic_configuration = server_quic_configuration(
            cert_file, key_file, idle_timeout=settings.idle_timeout
        )
    except Exception as exc:  # OSError, ssl/cryptography ValueError: all mean "bad files"
        raise StartupError(f"cannot load the TLS certificate {cert_file} / key {key_file}: {exc}") from None

    async with AsyncExitStack() as stack:
        if store is None:
            try:
                store = await stack.enter_async_context(open_store(settings))
            except StoreError as exc:
                raise StartupError(str(exc)) from None
        await _serve_with(settings, store, security, quic_configuration, shutdown_event, task_status)
    logger.info("Server stopped")


async def _serve_with(
    settings: ServerSettings,
    store: Store,
    security: tuple[AgentAuthenticator, ApiAuthenticator, AuditLog],
    quic_configuration: QuicConfiguration,
    shutdown_event: trio.Event,
    task_status: trio.TaskStatus[ServerAddresses],
) -> None:
    agent_auth, api_auth, audit = security
    manager = CommandManager(
        store,
        manager_settings(settings),
        authenticator=agent_auth,
        policy=None if settings.policy.is_empty else settings.policy,
        audit=audit,
    )
    # The agents' frame limit bounds COMMAND frames (the API refuses bigger
    # payloads); the server reads RESULT frames up to the same size.
    command_server = CommandServer(
        manager, quic_configuration, max_frame_size=DEFAULT_MAX_FRAME_SIZE,
        max_handshakes=settings.max_handshakes,
    )
    metrics = Metrics(
        connected_agents=lambda: len(manager.registry.links()),
        unfinished_commands=lambda: manager.unfinished_count,
        store_unwritten=lambda: store.unwritten,
        initials_deferred=lambda: command_server.endpoint.admission.deferred,
    )
    manager.add_observer(metrics)
    # Recovered once the metrics observe: commands whose deadline passed
    # while the server was down end there, and are counted.
    try:
        await manager.recover()
    except StoreError as exc:  # damaged pages where the unfinished commands are
        raise StartupError(str(exc)) from None
    app = create_app(
        manager, limits=api_limits(settings), metrics=metrics, auth=api_auth, audit=audit,
        bind_host=settings.http_host,
    )

    http_stop = trio.Event()
    http_stopped = trio.Event()

    async def run_http(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await hypercorn.trio.serve(
                app,
                _hypercorn_config(settings),
                shutdown_trigger=http_stop.wait,
                task_status=task_status,
            )
        finally:
            http_stopped.set()

    started = False
    listening_on = f"QUIC (UDP) {settings.quic_address}"
    try:
        async with trio.open_nursery() as nursery:
            quic_address = await nursery.start(
                command_server.serve, settings.quic_host, settings.quic_port
            )
            # Stopped when the shutdown starts: the drain ends every session,
            # which must not cost a full collection.
            freezer_scope = trio.CancelScope()
            if settings.gc_freeze_agents:
                freezer = HeapFreezer(manager.registry.links, min_agents=settings.gc_freeze_agents)

                async def run_freezer(*, task_status: trio.TaskStatus[None]) -> None:
                    with freezer_scope:
                        await freezer.run(task_status=task_status)

                await nursery.start(run_freezer)
            listening_on = f"HTTP (TCP) {settings.http_address}"
            binds = await nursery.start(run_http)
            addresses = ServerAddresses(
                http=_parse_bind(binds[0]), quic=(quic_address[0], quic_address[1])
            )
            logger.info("HTTP API listening url=%s", addresses.http_url)
            started = True
            task_status.started(addresses)

            # hypercorn may stop on its own (e.g. lifespan failure): shut down then too.
            async with trio.open_nursery() as waiters:

                async def wait_then_stop_waiting(event: trio.Event) -> None:
                    await event.wait()
                    waiters.cancel_scope.cancel()

                waiters.start_soon(wait_then_stop_waiting, shutdown_event)
                waiters.start_soon(wait_then_stop_waiting, http_stopped)

            logger.info(
                "Shutting down grace=%s unfinished=%d", settings.shutdown_grace, manager.unfinished_count
            )
            freezer_scope.cancel()
            # Drains commands (HTTP keeps answering: 503 for new ones, reads and
            # long-polls for the rest), then closes agent connections politely.
            await command_server.shutdown(settings.shutdown_grace)
            http_stop.set()
            with trio.move_on_after(HTTP_GRACEFUL_TIMEOUT + 2):
                await http_stopped.wait()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A bind failure arrives wrapped in the nurseries of hypercorn and the
        # endpoint; before we are started it is a startup error, said in one line.
        error = _first_leaf(group, OSError)
        if started or error is None:
            raise
        raise StartupError(f"cannot listen on {listening_on}: {error}") from group


