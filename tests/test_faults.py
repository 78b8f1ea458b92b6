"""Delivery guarantees under network faults (issue 5), through :mod:`tests.faults`.

A real server and real agents talk QUIC (TLS verified) through a
:class:`~tests.faults.FaultyProxy` on loopback: the agents dial the proxy, the
proxy forwards to the server from one socket per agent (as a NAT does) and
loses, duplicates, reorders, delays or blackholes datagrams on the way.

Every executor here counts its executions per payload id, so "ran exactly
once" is asserted, not assumed; and the proxy's counters are asserted too, so
a test cannot pass because the faults never happened.

Idle timeouts are short (1-5 s) to keep the file fast. The only sleeps are
where elapsed time is itself the fault (a blackhole's length); everything
else waits for the state it needs, under ``trio.fail_after``.
"""

from __future__ import annotations

import socket
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, AsyncIterator

import pytest
import trio

from trio_quiccmd import CommandManager, CommandServer, CommandStatus, ManagerSettings
from trio_quiccmd.server.core import server_quic_configuration

from .conftest import Cluster, wait_until
from .faults import DOWN, UP, FaultyProxy, total



class CountingExecutor:
    """Counts executions per payload id; ``gated`` commands wait for :attr:`gate`.

    ``execute("count" | "gated", {"id": n})`` returns ``{"id": n, "square": n*n}``.
    """

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.finished: dict[int, int] = {}
        self.gate = trio.Event()

    async def execute(self, command_type: str, payload: Any) -> Any:
        ident = payload["id"]
        self.counts[ident] = self.counts.get(ident, 0) + 1
        if command_type == "gated":
            await self.gate.wait()
        elif command_type != "count":
            raise ValueError(f"unexpected command type {command_type!r}")
        self.finished[ident] = self.finished.get(ident, 0) + 1
        return {"id": ident, "square": ident * ident}


def expected(ident: int) -> dict[str, int]:
    return {"id": ident, "square": ident * ident}


@asynccontextmanager
async def proxied_cluster(
    dev_cert, *, idle_timeout: float, seed: int = 0, settings: ManagerSettings | None = None
) -> AsyncIterator[tuple[Cluster, FaultyProxy]]:
    """A real server behind a :class:`FaultyProxy`; ``cluster.start_agent`` dials the proxy.

    The server certificate names 127.0.0.1, which is also the proxy's address,
    so agents verify it as usual.
    """
    cert, key = dev_cert
    server = CommandServer(
        CommandManager(settings=settings or ManagerSettings()),
        server_quic_configuration(cert, key, idle_timeout=idle_timeout),
    )
    async with trio.open_nursery() as nursery:
        server_address = await nursery.start(server.serve, "127.0.0.1", 0)
        proxy = FaultyProxy(("127.0.0.1", server_address[1]), seed=seed)
        proxy_address = await nursery.start(proxy.run)
        try:
            yield Cluster(nursery, server, proxy_address, cert), proxy
        finally:
            # A clean line for the goodbyes, whatever the test left behind.
            proxy.restore()
            proxy.clear_faults()
            with trio.fail_after(10):
                await server.shutdown(grace=1.0)
            nursery.cancel_scope.cancel()


def agent_options(idle_timeout: float, **more: Any) -> dict[str, Any]:
    return {
        "idle_timeout": idle_timeout,
        "keepalive_interval": idle_timeout / 3,
        "handshake_timeout": 3.0,
        **more,
    }


# -- the proxy itself, with plain UDP sockets ------------------------------------------


@asynccontextmanager
async def echo_through_proxy(**proxy_options: Any) -> AsyncIterator[tuple[FaultyProxy, "Peer", "Peer"]]:
    """A proxy between two plain UDP sockets: ``client`` -> proxy -> ``server``."""
    server = Peer()
    client = Peer()
    async with trio.open_nursery() as nursery:
        proxy = FaultyProxy(server.address, **proxy_options)
        client.target = await nursery.start(proxy.run)
        try:
            yield proxy, client, server
        finally:
            nursery.cancel_scope.cancel()
            server.sock.close()
            client.sock.close()


class Peer:
    def __init__(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.address = self.sock.getsockname()
        self.target: tuple | None = None

    async def send(self, data: bytes, to: tuple | None = None) -> None:
        await self.sock.sendto(data, to or self.target)

    async def receive(self, count: int) -> list[tuple[bytes, tuple]]:
        return [await self.sock.recvfrom(65536) for _ in range(count)]

    async def nothing_more(self, within: float = 0.05) -> bool:
        with trio.move_on_after(within):
            await self.sock.recvfrom(65536)
            return False
        return True


async def test_proxy_forwards_both_ways_from_one_upstream_port_per_client():
    with trio.fail_after(5):
        async with echo_through_proxy() as (proxy, client, server):
            await client.send(b"ping")
            [(data, seen_from)] = await server.receive(1)
            assert data == b"ping" and seen_from[1] != client.address[1]
            assert proxy.clients == [client.address]
            assert proxy.upstream_ports(client.address) == [seen_from[1]]
            await server.send(b"pong", seen_from)
            [(data, back_from)] = await client.receive(1)
            assert data == b"pong" and back_from == proxy.address
    assert proxy.stats[UP].forwarded == proxy.stats[DOWN].forwarded == 1


async def test_proxy_loss_duplication_reordering_and_delay_are_counted():
    with trio.fail_after(5):
        async with echo_through_proxy(seed=3) as (proxy, client, server):
            proxy.set_faults(UP, loss=1.0)
            await client.send(b"lost")
            await wait_until(lambda: proxy.stats[UP].dropped == 1)
            assert await server.nothing_more()
            proxy.set_faults(UP, loss=0.0, duplicate=1.0)
            await client.send(b"twice")
            assert [d for d, _ in await server.receive(2)] == [b"twice", b"twice"]
            proxy.set_faults(UP, duplicate=0.0, reorder=1.0, reorder_delay=10.0)
            await client.send(b"first")
            await wait_until(lambda: proxy.stats[UP].reordered == 1)
            assert await server.nothing_more()  # held back for the next one
            await client.send(b"second")
            assert [d for d, _ in await server.receive(2)] == [b"second", b"first"]
            proxy.set_faults(UP, reorder=0.0, delay=0.2)
            sent_at = trio.current_time()
            await client.send(b"late")
            await server.receive(1)
            assert trio.current_time() - sent_at >= 0.2
    up = proxy.stats[UP]
    assert (up.received, up.dropped, up.duplicated, up.reordered, up.delayed) == (5, 1, 1, 1, 1)
    assert up.forwarded == 5


async def test_proxy_releases_a_held_datagram_after_reorder_delay():
    with trio.fail_after(5):
        async with echo_through_proxy(reorder=1.0, reorder_delay=0.05) as (proxy, client, server):
            await client.send(b"alone")
            [(data, _)] = await server.receive(1)
    assert data == b"alone" and proxy.stats[UP].reordered == 1


async def test_proxy_blackhole_and_rebind():
    with trio.fail_after(5):
        async with echo_through_proxy() as (proxy, client, server):
            await client.send(b"one")
            [(_, first_port)] = await server.receive(1)
            proxy.blackhole()
            await client.send(b"void")
            await server.send(b"void", first_port)
            await wait_until(lambda: total(proxy, "blackholed") == 2)
            assert await server.nothing_more() and await client.nothing_more()
            proxy.restore()
            new_port = proxy.rebind(client.address)
            await client.send(b"two")
            [(data, second_port)] = await server.receive(1)
            assert data == b"two" and second_port[1] == new_port != first_port[1]
            await server.send(b"to the old binding", first_port)
            await server.send(b"to the new one", second_port)
            [(data, _)] = await client.receive(1)
            assert data == b"to the new one"
            await wait_until(lambda: proxy.stats[DOWN].stale == 1)
    assert proxy.stats[UP].blackholed == proxy.stats[DOWN].blackholed == 1


async def test_proxy_decisions_are_deterministic_for_a_seed():
    async def run(seed: int) -> list[bytes]:
        got = []
        async with echo_through_proxy(seed=seed, loss=0.3, duplicate=0.2) as (proxy, client, server):
            for i in range(50):
                await client.send(b"%d" % i)
            await wait_until(lambda: proxy.stats[UP].received == 50)
            proxy.clear_faults()
            await client.send(b"end")  # marks the end: no faults for it
            while not got or got[-1] != b"end":
                got.append((await server.receive(1))[0][0])
        return got

    with trio.fail_after(5):
        first = await run(11)
        again = await run(11)
        other = await run(12)
    assert first == again != other
    assert len(first) != 51  # the faults did something


async def test_proxy_stops_cleanly_when_cancelled():
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    with trio.fail_after(5), upstream:
        proxy = FaultyProxy(upstream.getsockname(), delay=10.0)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                address = await nursery.start(proxy.run)
                client = Peer()
                client.target = address
                await client.send(b"delayed for ever")
                await wait_until(lambda: proxy.stats[UP].delayed == 1)
                proxy.rebind()
                scope.cancel()
        client.sock.close()
        # Every socket was closed: the listening port and both upstream ports are free.
        ports = [address[1], *proxy.upstream_ports()]
        assert len(ports) == 3
        for port in ports:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
                again.bind(("127.0.0.1", port))


# -- the product through the proxy ----------------------------------------------------


@pytest.mark.parametrize(
    "concurrency",
    [
        # All at once: the server keeps 256 in flight and queues the rest, and
        # QUIC packs many frames into each datagram.
        pytest.param(1000, id="burst"),
        # A few at a time: many small datagrams, so many more of them meet a fault.
        pytest.param(1, id="one-by-one"),
    ],
)
async def test_thousand_commands_through_loss_reordering_and_duplication_run_exactly_once(
    dev_cert, concurrency
):
    executor = CountingExecutor()
    commands: dict[int, Any] = {}
    with trio.fail_after(40):
        async with proxied_cluster(dev_cert, idle_timeout=5.0, seed=5) as (cluster, proxy):
            manager = cluster.manager
            agent, _ = await cluster.start_agent("lossy", executor=executor, **agent_options(5.0))
            link = manager.registry.get("lossy")
            proxy.set_faults(loss=0.10, duplicate=0.05, reorder=0.10)
            started = trio.current_time()
            limit = trio.Semaphore(concurrency)

            async def one(ident: int) -> None:
                async with limit:
                    commands[ident] = await manager.send_and_wait(
                        "lossy", "count", {"id": ident}, timeout=30.0
                    )

            async with trio.open_nursery() as nursery:
                for ident in range(1000):
                    nursery.start_soon(one, ident)
            elapsed = trio.current_time() - started
            proxy.clear_faults()
            same_session = manager.registry.get("lossy") is link and agent.sessions_established == 1
    print(
        f"\n1000 commands, {concurrency} at a time, under faults in {elapsed:.2f} s, "
        f"same session: {same_session}, proxy: {proxy.summary()}"
    )
    failed = {i: (c.status, c.error_code) for i, c in commands.items() if c.status is not CommandStatus.COMPLETED}
    assert not failed, failed
    assert {i: c.result for i, c in commands.items()} == {i: expected(i) for i in range(1000)}
    assert executor.counts == {i: 1 for i in range(1000)}
    for direction in (UP, DOWN):
        stats = proxy.stats[direction]
        assert stats.dropped > 0 and stats.duplicated > 0 and stats.reordered > 0, (direction, stats)


async def test_nat_rebinding_keeps_the_session_and_its_in_flight_commands(dev_cert):
    executor = CountingExecutor()
    with trio.fail_after(20):
        async with proxied_cluster(dev_cert, idle_timeout=5.0) as (cluster, proxy):
            manager = cluster.manager
            agent, _ = await cluster.start_agent("roaming", executor=executor, **agent_options(5.0))
            link = manager.registry.get("roaming")
            before = link.remote_address
            [client] = proxy.clients
            assert before == f"127.0.0.1:{proxy.upstream_ports(client)[0]}"
            first = await manager.send_and_wait("roaming", "count", {"id": 0})
            assert first.result == expected(0)

            # Commands executing on the agent while its address changes.
            in_flight = [
                (await manager.send_command("roaming", "gated", {"id": i}, timeout=15.0)).command_id
                for i in range(1, 11)
            ]
            await wait_until(lambda: len(executor.counts) == 11)

            new_port = proxy.rebind(client)
            rebound_at = trio.current_time()

            # New commands complete over the new path ...
            after = []
            async with trio.open_nursery() as nursery:
                async def one(ident: int) -> None:
                    after.append(await manager.send_and_wait("roaming", "count", {"id": ident}))

                for ident in range(11, 61):
                    nursery.start_soon(one, ident)
            took = trio.current_time() - rebound_at
            # ... and so do the ones that were in flight.
            executor.gate.set()
            finished = [await manager.wait(command_id) for command_id in in_flight]

            assert manager.registry.get("roaming") is link  # never a new HELLO
            assert agent.sessions_established == 1
            assert link.remote_address == f"127.0.0.1:{new_port}" != before
    assert all(c.status is CommandStatus.COMPLETED for c in after + finished)
    assert sorted(c.result["id"] for c in after + finished) == list(range(1, 61))
    assert executor.counts == {i: 1 for i in range(61)}
    # The server did send to the forgotten binding before it learnt the new one.
    assert proxy.stats[DOWN].stale > 0
    print(
        f"\nrebinding {before} -> 127.0.0.1:{new_port}: 50 commands in {took:.2f} s, "
        f"proxy: {proxy.summary()}"
    )


async def test_repeated_rebinding_under_loss_keeps_the_session(dev_cert):
    # Ten NAT rebindings in a row while 10% of datagrams are lost, duplicated
    # or reordered: every one is followed by commands that complete on the
    # same session, and the server follows the agent to each new port.
    executor = CountingExecutor()
    seen: list[str] = []
    with trio.fail_after(30):
        async with proxied_cluster(dev_cert, idle_timeout=5.0, seed=2) as (cluster, proxy):
            manager = cluster.manager
            agent, _ = await cluster.start_agent("nomad", executor=executor, **agent_options(5.0))
            link = manager.registry.get("nomad")
            proxy.set_faults(loss=0.10, duplicate=0.05, reorder=0.10)
            done = []
            for round_ in range(10):
                port = proxy.rebind()
                async with trio.open_nursery() as nursery:
                    async def one(ident: int) -> None:
                        done.append(await manager.send_and_wait("nomad", "count", {"id": ident}))

                    for ident in range(round_ * 20, round_ * 20 + 20):
                        nursery.start_soon(one, ident)
                await wait_until(lambda: link.remote_address == f"127.0.0.1:{port}")
                seen.append(link.remote_address)
            proxy.clear_faults()
            assert manager.registry.get("nomad") is link
            assert agent.sessions_established == 1
    assert len(set(seen)) == 10
    assert all(c.status is CommandStatus.COMPLETED for c in done)
    assert executor.counts == {i: 1 for i in range(200)}
    assert proxy.stats[DOWN].stale > 0 and total(proxy, "dropped") > 0
    print(f"\n10 rebinds under loss, proxy: {proxy.summary()}")


async def test_agents_connect_through_a_lossy_duplicating_network(dev_cert):
    # Faults from the first datagram on: lost, duplicated and reordered
    # Initial and Handshake packets; each agent still ends up with one
    # session, and its commands run once each.
    executors = {f"edge-{n}": CountingExecutor() for n in range(5)}
    with trio.fail_after(30):
        async with proxied_cluster(dev_cert, idle_timeout=5.0, seed=4) as (cluster, proxy):
            proxy.set_faults(loss=0.10, duplicate=0.30, reorder=0.20)
            manager = cluster.manager
            async with trio.open_nursery() as nursery:
                for name, executor in executors.items():
                    nursery.start_soon(
                        partial(cluster.start_agent, name, executor=executor, **agent_options(5.0))
                    )
            results = []
            async with trio.open_nursery() as nursery:
                async def one(name: str, ident: int) -> None:
                    results.append(await manager.send_and_wait(name, "count", {"id": ident}))

                for name in executors:
                    for ident in range(40):
                        nursery.start_soon(one, name, ident)
            assert len(manager.registry) == 5
            # No stray connections were left behind by duplicated Initials.
            await wait_until(lambda: len(cluster.server.endpoint.sessions) == 5)
    assert all(c.status is CommandStatus.COMPLETED for c in results)
    for executor in executors.values():
        assert executor.counts == {i: 1 for i in range(40)}
    assert all(proxy.stats[d].duplicated > 0 and proxy.stats[d].dropped > 0 for d in (UP, DOWN))
    print(f"\n5 agents through faults from the start, proxy: {proxy.summary()}")


async def test_blackhole_shorter_than_idle_timeout_keeps_the_session(dev_cert):
    executor = CountingExecutor()
    with trio.fail_after(20):
        async with proxied_cluster(dev_cert, idle_timeout=5.0) as (cluster, proxy):
            manager = cluster.manager
            agent, _ = await cluster.start_agent("patient", executor=executor, **agent_options(5.0))
            link = manager.registry.get("patient")

            proxy.blackhole()
            command = await manager.send_command("patient", "count", {"id": 1}, timeout=15.0)
            assert command.status is CommandStatus.EXECUTING
            await trio.sleep(1.0)  # the outage itself: 1 s, the idle timeout is 5 s
            assert executor.counts == {}  # nothing got through
            proxy.restore()
            restored_at = trio.current_time()

            done = await manager.wait(command.command_id)
            recovery = trio.current_time() - restored_at
            assert manager.registry.get("patient") is link
            assert agent.sessions_established == 1
    assert done.status is CommandStatus.COMPLETED and done.result == expected(1), done
    assert executor.counts == {1: 1}
    assert proxy.stats[DOWN].blackholed > 0  # the COMMAND's retransmissions
    print(f"\nblackhole 1 s: result {recovery:.2f} s after restore, proxy: {proxy.summary()}")


async def _lose_the_connection(cluster: Cluster, proxy: FaultyProxy, agent, client_id: str) -> None:
    """Blackhole until both ends have given the connection up (idle timeout)."""
    proxy.blackhole()
    await wait_until(
        lambda: not agent.connected and cluster.manager.registry.get(client_id) is None
    )


async def test_result_finished_while_disconnected_arrives_after_reconnect(dev_cert):
    # Issue 5: "kill the agent's connection mid-command (drop all packets for
    # longer than the idle timeout, then restore): the result still arrives,
    # the command ran once."
    executor = CountingExecutor()
    with trio.fail_after(30):
        async with proxied_cluster(dev_cert, idle_timeout=1.0) as (cluster, proxy):
            manager = cluster.manager
            agent, _ = await cluster.start_agent("cut", executor=executor, **agent_options(1.0))
            command = await manager.send_command("cut", "gated", {"id": 7}, timeout=8.0)
            await wait_until(lambda: executor.counts.get(7) == 1)

            began = trio.current_time()
            await _lose_the_connection(cluster, proxy, agent, "cut")
            lost = trio.current_time() - began
            executor.gate.set()  # the work finishes while there is no connection
            await wait_until(lambda: executor.finished.get(7) == 1)
            proxy.restore()
            await wait_until(lambda: agent.sessions_established >= 2)  # a new session
            reconnected = trio.current_time() - began

            done = await manager.wait(command.command_id)
    print(f"\nlost after {lost:.2f} s, reconnected after {reconnected:.2f} s: {done.status} {done.error_code}")
    assert total(proxy, "blackholed") > 0
    assert done.status is CommandStatus.COMPLETED and done.result == expected(7), done
    assert executor.counts == {7: 1}


async def test_command_lost_with_the_connection_is_resent_after_reconnect(dev_cert):
    # Issue 5: "Commands the server sent that the agent never received are
    # re-sent on reconnect." The COMMAND goes out into a blackhole that
    # outlasts the idle timeout; the agent reconnects and must still run it once.
    executor = CountingExecutor()
    with trio.fail_after(30):
        async with proxied_cluster(dev_cert, idle_timeout=1.0) as (cluster, proxy):
            manager = cluster.manager
            agent, _ = await cluster.start_agent("resend", executor=executor, **agent_options(1.0))
            began = trio.current_time()
            proxy.blackhole()
            command = await manager.send_command("resend", "count", {"id": 9}, timeout=8.0)
            assert command.status is CommandStatus.EXECUTING
            await _lose_the_connection(cluster, proxy, agent, "resend")
            lost = trio.current_time() - began
            assert executor.counts == {}
            proxy.restore()
            await wait_until(lambda: agent.sessions_established >= 2)  # a new session
            reconnected = trio.current_time() - began

            done = await manager.wait(command.command_id)
    print(f"\nlost after {lost:.2f} s, reconnected after {reconnected:.2f} s: {done.status} {done.error_code}")
    assert done.status is CommandStatus.COMPLETED and done.result == expected(9), done
    assert executor.counts == {9: 1}
