"""Fixtures that run a real server and real agents over loopback QUIC."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator, Callable

import pytest
import trio

from trio_quiccmd import Agent, CommandManager, CommandServer, ManagerSettings
from trio_quiccmd.quic.tls import ensure_dev_certificate
from trio_quiccmd.server.core import server_quic_configuration


@pytest.fixture
def dev_cert(tmp_path: Path) -> tuple[Path, Path]:
    cert, key, _ = ensure_dev_certificate(tmp_path / "data")
    return cert, key


class Cluster:
    """A real server on 127.0.0.1:<random port> and a way to start agents against it."""

    def __init__(self, nursery: trio.Nursery, server: CommandServer, address: tuple, cert: Path):
        self.nursery = nursery
        self.server = server
        self.manager = server.manager
        self.address = ("127.0.0.1", address[1])
        self.cert = cert

    def agent(self, client_id: str, **options) -> Agent:
        options.setdefault("ca_file", self.cert)
        options.setdefault("reconnect_initial_delay", 0.05)
        options.setdefault("reconnect_max_delay", 0.5)
        return Agent(client_id, self.address, **options)

    async def start_agent(self, client_id: str, **options) -> tuple[Agent, trio.CancelScope]:
        """Start an agent; returns once the server has it registered."""
        agent = self.agent(client_id, **options)
        scope = trio.CancelScope()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await agent.run(task_status=task_status)

        await self.nursery.start(run)
        await wait_until(lambda: self.manager.registry.get(client_id) is not None)
        return agent, scope


async def wait_until(predicate: Callable[[], bool], interval: float = 0.005) -> None:
    """Poll ``predicate`` (for state only observable by looking); callers bound it with fail_after."""
    while not predicate():
        await trio.sleep(interval)


@pytest.fixture
def manager_settings() -> ManagerSettings:
    return ManagerSettings()


@pytest.fixture
async def cluster(dev_cert, manager_settings) -> AsyncIterator[Cluster]:
    cert, key = dev_cert
    server = CommandServer(
        CommandManager(settings=manager_settings),
        server_quic_configuration(cert, key, idle_timeout=10.0),
    )
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve, "127.0.0.1", 0)
        yield Cluster(nursery, server, address, cert)
        with trio.fail_after(10):
            await server.shutdown(grace=1.0)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def manager(autojump_clock):
    """A running CommandManager on a virtual clock, with a small window (4)."""
    manager = CommandManager(
        settings=ManagerSettings(
            max_in_flight_per_agent=4, history_retention=100.0, max_history=50, cleanup_interval=10.0
        )
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        yield manager
        nursery.cancel_scope.cancel()
