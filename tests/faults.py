"""Fault injection for UDP traffic: a lossy, duplicating, reordering, slow proxy.

:class:`FaultyProxy` sits between QUIC clients (agents) and a server. Clients
send to :attr:`FaultyProxy.address`; for every client address it sees, the
proxy opens its own upstream socket to the server, so the server sees one
distinct source per client, as behind a NAT. Datagrams in each direction go
through the faults configured for that direction (:attr:`FaultyProxy.up`,
client -> server; :attr:`FaultyProxy.down`, server -> client), which can be
changed at any time, and every decision is counted
(:attr:`FaultyProxy.stats`) so a test can assert the faults really happened.

Faults, applied in this order to each datagram as it arrives:

* ``blackhole`` -- drop everything, both ways (:meth:`~FaultyProxy.blackhole`
  / :meth:`~FaultyProxy.restore`); datagrams already delayed or held back
  are dropped too when their time comes;
* ``loss`` -- drop with this probability;
* ``duplicate`` -- send twice with this probability (each copy then goes
  through reordering and delay on its own);
* ``reorder`` -- with this probability, hold the datagram back and release it
  just after the next datagram of the same flow and direction, or after
  ``reorder_delay`` seconds if none comes first (one datagram at a time is
  held per flow and direction);
* ``delay`` -- a fixed extra delay, in seconds, before the datagram is sent.

:meth:`~FaultyProxy.rebind` moves one client's upstream traffic to a new
socket (a new source port), as a NAT that forgets a binding does; the client
is not told, and server traffic to the old port is dropped (counted as
``stale``).

Decisions come from one ``random.Random`` per direction, seeded from
``seed``, and every datagram draws the same amount of randomness whatever
the settings: the same sequence of datagrams (in arrival order, per
direction) meets the same faults. Delays use trio's clock (deadlines on
one long-lived task), no threads. :meth:`~FaultyProxy.run` serves until cancelled and closes every
socket on the way out.

Typical use::

    proxy = FaultyProxy(server_address, seed=1)
    proxy_address = await nursery.start(proxy.run)
    agent = Agent("a", proxy_address, ...)
    proxy.set_faults(loss=0.1, duplicate=0.05, reorder=0.1)
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import socket
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import trio

Address = tuple  # (host, port) as the socket module gives it

#: Asked for on every proxy socket: bursts of thousands of datagrams must not
#: overflow the kernel's small default (uncounted drops would blur the counters).
SOCKET_BUFFER_BYTES = 4 << 20

UP = "up"  # client -> server
DOWN = "down"  # server -> client
DIRECTIONS = (UP, DOWN)


@dataclass
class Faults:
    """What happens to datagrams going one way. Change the fields at any time."""

    #: Probability that a datagram is dropped.
    loss: float = 0.0
    #: Probability that a datagram is sent twice.
    duplicate: float = 0.0
    #: Probability that a datagram is held back behind the next one.
    reorder: float = 0.0
    #: Longest a held-back datagram waits for a successor, seconds.
    reorder_delay: float = 0.005
    #: Fixed extra delay for every datagram, seconds.
    delay: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability, got {value!r}")
        for name in ("reorder_delay", "delay"):
            value = getattr(self, name)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")


@dataclass
class Counters:
    """What happened to datagrams going one way."""

    #: Datagrams that arrived at the proxy.
    received: int = 0
    #: Datagrams sent on (duplicates included).
    forwarded: int = 0
    #: Dropped by ``loss``.
    dropped: int = 0
    #: Dropped because the proxy was blackholed (on arrival or when due).
    blackholed: int = 0
    #: Extra copies made by ``duplicate``.
    duplicated: int = 0
    #: Held back behind a later datagram by ``reorder``.
    reordered: int = 0
    #: Sent after the fixed ``delay``.
    delayed: int = 0
    #: Server datagrams that reached an upstream socket already replaced by
    #: :meth:`FaultyProxy.rebind` (the NAT binding is gone: dropped).
    stale: int = 0
    #: Sends the kernel refused (full buffer, unreachable): dropped.
    send_errors: int = 0

    @property
    def lost(self) -> int:
        """Every datagram that did not get through, whatever the reason."""
        return self.dropped + self.blackholed + self.stale + self.send_errors


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        except OSError:
            pass


def _udp_socket(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        _tune(sock)
        sock.bind((host, 0))
    except BaseException:
        sock.close()
        raise
    return sock


async def _receive_forever(sock: socket.socket, on_datagram: Callable[[bytes, Address], None]) -> None:
    """Call ``on_datagram`` for every datagram on ``sock`` until cancelled."""
    while True:
        await trio.lowlevel.wait_readable(sock)
        # Drain what is queued in one wake-up, a bounded batch at a time so the
        # other sockets get their turn.
        for _ in range(256):
            try:
                data, addr = sock.recvfrom(65536)
            except BlockingIOError:
                break
            except ConnectionRefusedError:
                continue  # an ICMP error from an earlier send
            except OSError:
                return  # closed: the proxy is stopping
            on_datagram(data, addr)
        await trio.lowlevel.checkpoint()


class _Flow:
    """One client: its address, its current upstream socket, datagrams held back."""

    def __init__(self, client: Address, upstream: socket.socket):
        self.client = client
        self.upstream = upstream
        #: Every upstream socket this client has had (closed when the proxy stops).
        self.sockets: list[socket.socket] = [upstream]
        #: Every upstream port this client has had, oldest first.
        self.upstream_ports: list[int] = [upstream.getsockname()[1]]
        #: direction -> (token, datagram) held back by ``reorder``.
        self.held: dict[str, tuple[int, bytes] | None] = {UP: None, DOWN: None}


class FaultyProxy:
    """A UDP proxy that injects faults between clients and ``upstream`` (a server).

    ``faults`` (keyword arguments of :class:`Faults`) apply to both directions
    at first; change them with :meth:`set_faults` or through :attr:`up` and
    :attr:`down`.
    """

    def __init__(
        self,
        upstream: Address,
        *,
        seed: int | str = 0,
        host: str = "127.0.0.1",
        **faults: Any,
    ):
        self.upstream = tuple(upstream)
        self.host = host
        self.up = Faults(**faults)
        self.down = Faults(**faults)
        self.stats: dict[str, Counters] = {UP: Counters(), DOWN: Counters()}
        self._random = {d: random.Random(f"{seed}/{d}") for d in DIRECTIONS}
        self._blackholed = False
        self._flows: dict[Address, _Flow] = {}
        self._downstream: socket.socket | None = None
        self._nursery: trio.Nursery | None = None
        # Datagrams due later: (when, sequence, action); one task sends them.
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = itertools.count()
        self._due_scope: trio.CancelScope | None = None
        self._address: Address | None = None

    # -- control ---------------------------------------------------------------

    @property
    def address(self) -> Address:
        """Where clients send to (bound by :meth:`run`)."""
        if self._address is None:
            raise RuntimeError("the proxy is not running")
        return self._address

    @property
    def clients(self) -> list[Address]:
        """Client addresses seen so far, oldest first."""
        return list(self._flows)

    def upstream_ports(self, client: Address | None = None) -> list[int]:
        """The source ports the server has seen for ``client``, oldest first
        (``client`` may be omitted if the proxy has exactly one)."""
        return list(self._flow_for(client).upstream_ports)

    def set_faults(self, direction: str = "both", **changes: Any) -> None:
        """Change fault settings for ``direction`` (``"up"``, ``"down"`` or ``"both"``)."""
        targets = DIRECTIONS if direction == "both" else (direction,)
        names = {f.name for f in fields(Faults)}
        for name in changes:
            if name not in names:
                raise TypeError(f"unknown fault {name!r}; one of {sorted(names)}")
        for target in targets:
            faults = self.up if target == UP else self.down
            updated = Faults(**{**asdict(faults), **changes})  # validates
            for name, value in asdict(updated).items():
                setattr(faults, name, value)

    def clear_faults(self) -> None:
        """No loss, duplication, reordering or delay any more (a blackhole stays)."""
        for faults in (self.up, self.down):
            for name, value in asdict(Faults()).items():
                setattr(faults, name, value)

    def blackhole(self) -> None:
        """Drop every datagram, both ways, until :meth:`restore`."""
        self._blackholed = True

    def restore(self) -> None:
        """End :meth:`blackhole`."""
        self._blackholed = False

    @property
    def blackholed(self) -> bool:
        return self._blackholed

    def rebind(self, client: Address | None = None) -> int:
        """Send ``client``'s traffic to the server from a new socket from now on.

        ``client`` is the client's address as the proxy sees it (see
        :attr:`clients`); if omitted, the proxy must have exactly one client.
        Whatever the server still sends to the old port is dropped (and
        counted as ``stale``), as when a NAT binding expires. Returns the new
        port.
        """
        flow = self._flow_for(client)
        if self._nursery is None:
            raise RuntimeError("the proxy is not running")
        # The old socket stays open (closed when the proxy stops) so that what
        # arrives on it is counted, and the server gets no ICMP errors.
        flow.upstream = _udp_socket(self.host)
        flow.sockets.append(flow.upstream)
        flow.upstream_ports.append(flow.upstream.getsockname()[1])
        self._nursery.start_soon(self._serve_upstream, flow, flow.upstream)
        return flow.upstream_ports[-1]

    def summary(self) -> dict[str, dict[str, int]]:
        """The counters as plain dicts (for messages and logs)."""
        return {d: asdict(c) for d, c in self.stats.items()}

    # -- running ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports the listening address through ``task_status``."""
        downstream = _udp_socket(self.host)
        self._downstream = downstream
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._address = downstream.getsockname()[:2]
                nursery.start_soon(self._send_when_due)
                nursery.start_soon(_receive_forever, downstream, self._from_client)
                task_status.started(self._address)
        finally:
            self._nursery = None
            self._due.clear()
            downstream.close()
            for flow in self._flows.values():
                for sock in flow.sockets:
                    sock.close()

    def _flow_for(self, client: Address | None) -> _Flow:
        if client is None:
            if len(self._flows) != 1:
                raise ValueError(f"name the client: the proxy has {len(self._flows)}")
            return next(iter(self._flows.values()))
        try:
            return self._flows[tuple(client)]
        except KeyError:
            raise ValueError(f"no client {client!r}; clients are {self.clients}") from None

    async def _serve_upstream(self, flow: _Flow, sock: socket.socket) -> None:
        await _receive_forever(sock, lambda data, addr: self._from_server(flow, sock, data, addr))

    def _from_client(self, data: bytes, addr: Address) -> None:
        flow = self._flows.get(addr)
        if flow is None:
            assert self._nursery is not None
            flow = self._flows[addr] = _Flow(addr, _udp_socket(self.host))
            self._nursery.start_soon(self._serve_upstream, flow, flow.upstream)
        self._arrived(flow, UP, data)

    def _from_server(self, flow: _Flow, sock: socket.socket, data: bytes, addr: Address) -> None:
        if tuple(addr[:2]) != self.upstream[:2]:
            return  # not from the server: a NAT would not let it in
        if sock is not flow.upstream:
            self.stats[DOWN].stale += 1
            return
        self._arrived(flow, DOWN, data)

    # -- the fault pipeline ------------------------------------------------------

    def _arrived(self, flow: _Flow, direction: str, data: bytes) -> None:
        stats = self.stats[direction]
        faults = self.up if direction == UP else self.down
        rng = self._random[direction]
        stats.received += 1
        if self._blackholed:
            stats.blackholed += 1
            return
        # Draw every number for every datagram, so that one fault's setting
        # does not shift the others' decisions.
        lose, duplicate, reorder, reorder_copy = (rng.random() for _ in range(4))
        if lose < faults.loss:
            stats.dropped += 1
            return
        copies = [reorder]
        if duplicate < faults.duplicate:
            stats.duplicated += 1
            copies.append(reorder_copy)
        for draw in copies:
            self._reorder_stage(flow, direction, data, hold=draw < faults.reorder)

    def _reorder_stage(self, flow: _Flow, direction: str, data: bytes, *, hold: bool) -> None:
        faults = self.up if direction == UP else self.down
        if hold and flow.held[direction] is None:
            token = next(self._sequence)
            flow.held[direction] = (token, data)
            self.stats[direction].reordered += 1
            self._schedule(
                trio.current_time() + faults.reorder_delay,
                lambda: self._release(flow, direction, token),
            )
            return
        self._delay_stage(flow, direction, data)
        self._release(flow, direction, None)

    def _release(self, flow: _Flow, direction: str, token: int | None) -> None:
        """Send the datagram held back in this flow (``token``: only if it is that one)."""
        held = flow.held[direction]
        if held is None or (token is not None and held[0] != token):
            return
        flow.held[direction] = None
        self._delay_stage(flow, direction, held[1])

    def _delay_stage(self, flow: _Flow, direction: str, data: bytes) -> None:
        faults = self.up if direction == UP else self.down
        if faults.delay > 0:
            self.stats[direction].delayed += 1
            self._schedule(
                trio.current_time() + faults.delay, lambda: self._send(flow, direction, data)
            )
        else:
            self._send(flow, direction, data)

    def _send(self, flow: _Flow, direction: str, data: bytes) -> None:
        stats = self.stats[direction]
        if self._blackholed:
            stats.blackholed += 1
            return
        if direction == UP:
            sock, target = flow.upstream, self.upstream
        else:
            sock, target = self._downstream, flow.client
        try:
            sock.sendto(data, target)
        except OSError:  # full buffer, unreachable
            stats.send_errors += 1
            return
        stats.forwarded += 1

    # -- datagrams due later -------------------------------------------------------

    def _schedule(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._due, (when, next(self._sequence), action))
        scope = self._due_scope
        if scope is not None and when < scope.deadline:
            scope.deadline = when

    async def _send_when_due(self) -> None:
        due = self._due
        while True:
            with trio.CancelScope(deadline=due[0][0] if due else math.inf) as scope:
                self._due_scope = scope
                await trio.sleep_forever()
            self._due_scope = None
            now = trio.current_time()
            while due and due[0][0] <= now:
                _, _, action = heapq.heappop(due)
                action()


def total(proxy: FaultyProxy, name: str) -> int:
    """A counter summed over both directions."""
    return sum(getattr(c, name) for c in proxy.stats.values())
