"""CommandServer: the command manager plus the QUIC endpoint agents dial."""

from __future__ import annotations

import logging
from pathlib import Path

import trio
from aioquic.quic.configuration import QuicConfiguration
from cryptography.hazmat.primitives import serialization

from ..quic.admission import DEFAULT_MAX_HANDSHAKES
from ..quic.endpoint import QuicEndpoint
from ..wire import ALPN, DEFAULT_MAX_FRAME_SIZE, ProtocolErrorCode
from .manager import CommandManager

logger = logging.getLogger("trio_quiccmd.server")


def server_quic_configuration(
    cert_file: str | Path, key_file: str | Path, *, idle_timeout: float = 30.0
) -> QuicConfiguration:
    configuration = QuicConfiguration(
        is_client=False, alpn_protocols=[ALPN], idle_timeout=idle_timeout
    )
    configuration.load_cert_chain(str(cert_file), str(key_file))
    # aioquic takes any key with any certificate; the mismatch would show only
    # as every agent's handshake failing, with nothing in the server's log.
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert configuration.certificate is not None and configuration.private_key is not None
    if configuration.certificate.public_key().public_bytes(*spki) != \
            configuration.private_key.public_key().public_bytes(*spki):
        raise ValueError("the private key does not belong to the certificate")
    return configuration


class CommandServer:
    """Accepts agents over QUIC and serves them commands from ``manager``.

    At most ``max_handshakes`` QUIC handshakes are in progress at once (see
    :mod:`trio_quiccmd.quic.admission`).
    """

    def __init__(
        self,
        manager: CommandManager,
        quic_configuration: QuicConfiguration,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        credential_check_interval: float = 1.0,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
    ):
        self.manager = manager
        #: How often the agent token file is checked for changes (revocations
        #: close connected agents within this).
        self.credential_check_interval = credential_check_interval
        self.endpoint = QuicEndpoint(
            quic_configuration, manager.registry.new_link,
            max_frame_size=max_frame_size, max_handshakes=max_handshakes,
        )

    async def serve(
        self, host: str = "0.0.0.0", port: int = 8474, *, task_status: trio.TaskStatus[tuple] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the manager and the QUIC endpoint until cancelled.

        Reports the bound UDP address through ``task_status.started``. Cancelling
        drops connections without a goodbye; call :meth:`shutdown` first.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(self.manager.run)
            if self.manager.registry.authenticator is not None:
                nursery.start_soon(self.manager.registry.watch_credentials, self.credential_check_interval)
            address = await nursery.start(self.endpoint.serve, host, port)
            logger.info("QUIC endpoint listening address=%s:%s", address[0], address[1])
            task_status.started(address)

    async def shutdown(self, grace: float = 10.0) -> None:
        """Refuse new commands, let unfinished ones finish within ``grace``
        seconds, then close every agent connection politely.

        If cancelled, the connections are still closed (shielded, briefly).
        """
        self.manager.begin_shutdown()
        self.endpoint.stop_accepting()
        try:
            left = await self.manager.drain(grace)
            if left:
                logger.warning("Shutdown grace period over unfinished=%d", left)
        finally:
            await self.endpoint.close_all(ProtocolErrorCode.SHUTTING_DOWN, "server shutting down")
