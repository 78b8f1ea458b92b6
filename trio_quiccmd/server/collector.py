"""Keep connected agents' state out of the garbage collector's full collections.

Each connected agent holds some 400 objects the cyclic garbage collector
tracks (aioquic's per-connection tables, streams, crypto state, our tasks and
cancel scopes). CPython's full collection walks every tracked object and
holds the event loop meanwhile: measured 0.5-1.1 s at 3,000 agents (see
docs/benchmarks.md), long enough for keepalives and loss timers to fire late
and for a fan-out's replies to pile up.

:class:`HeapFreezer` moves what is alive into the collector's permanent
generation (``gc.freeze()``) once enough agents are connected, again as
their number grows by a quarter, and once more when the fleet has settled
with some of it not yet frozen (a fleet that reconnected after a restart
would otherwise leave up to a fifth of it out, walked by every full
collection until the hourly renewal below); collections then walk only
newer objects.
The price: an agent's session holds reference cycles, so the state of a
frozen agent whose session ended stays in memory (~80 KiB) until the heap is
unfrozen and collected in full. That happens, once each time, when a
quarter of the frozen agents have left (CPython's own rule starts a full
collection when survivors reach a quarter of the old objects), or when the
freeze is an hour old; never twice within a minute.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Callable, Collection, Hashable, Protocol

import trio

logger = logging.getLogger("trio_quiccmd.server")

#: Seconds between looks at the connected agents.
CHECK_INTERVAL = 5.0
#: Freeze again once this many times the agents frozen last time are connected ...
GROWTH = 1.25
#: ... or once the fleet has settled (at most this fraction of it came or
#: went since the last look) ...
SETTLED_CHANGE_FRACTION = 0.01
#: ... with at least this fraction of it not frozen yet.
SETTLED_UNFROZEN_FRACTION = 0.05
#: Collect in full once this fraction of the frozen agents have left ...
REFRESH_FRACTION = 0.25
#: ... or once the heap has been frozen this long, seconds ...
MAX_FROZEN_SECONDS = 3600.0
#: ... but never again within this many seconds of the last full collection.
MIN_SECONDS_BETWEEN_FULL_COLLECTIONS = 60.0


class Collector(Protocol):
    """The parts of the :mod:`gc` module used (a stand-in in tests)."""

    def collect(self) -> int: ...

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...

    def isenabled(self) -> bool: ...


class HeapFreezer:
    """Freezes the heap once ``connected()`` holds ``min_agents`` agents.

    ``connected`` returns the agents connected now, each an object that
    stays the same for as long as its session lasts (the registry's links).
    """

    def __init__(
        self,
        connected: Callable[[], Collection[Hashable]],
        *,
        min_agents: int,
        collector: Collector = gc,
    ):
        if min_agents < 1:
            raise ValueError("min_agents must be 1 or more")
        self._connected = connected
        self._min_agents = min_agents
        self._gc = collector
        # The agents connected at the freezes since the last full collection;
        # empty while nothing is frozen.
        self._frozen: set[Hashable] = set()
        self._frozen_count = 0  # agents connected at the latest freeze
        self._last_look: frozenset[Hashable] = frozenset()  # the agents connected at the last check
        self._frozen_since = 0.0
        self._last_full_collection = -MIN_SECONDS_BETWEEN_FULL_COLLECTIONS

    @property
    def frozen(self) -> bool:
        return bool(self._frozen)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Look every CHECK_INTERVAL seconds until cancelled.

        When cancelled, the heap is unfrozen (a constant-time move): what was
        frozen is left to the collector's own rules again.
        """
        task_status.started()
        try:
            while True:
                await trio.sleep(CHECK_INTERVAL)
                self.check()
        finally:
            if self._frozen:
                self._gc.unfreeze()
                self._frozen.clear()

    def check(self) -> None:
        """Unfreeze and collect in full if due, then freeze if due."""
        if not self._gc.isenabled():
            self._last_look = frozenset()
            return  # the application manages collections itself
        connected = self._connected()
        look = frozenset(connected)
        changed = len(look.symmetric_difference(self._last_look))
        # Replaced before anything is collected: the last look may hold the
        # links of sessions that ended since, which must not outlive them.
        self._last_look = look
        now = trio.current_time()
        collected_in_full = False
        if self._frozen and now - self._last_full_collection >= MIN_SECONDS_BETWEEN_FULL_COLLECTIONS:
            left = len(self._frozen.difference(connected))
            if left >= len(self._frozen) * REFRESH_FRACTION or now - self._frozen_since >= MAX_FROZEN_SECONDS:
                self._gc.unfreeze()
                self._frozen.clear()
                self._collect_in_full(now, f"Heap unfrozen agents_left={left}")
                collected_in_full = True
        if len(connected) < self._min_agents:
            return
        if self._frozen and len(connected) < self._frozen_count * GROWTH:
            if changed > len(look) * SETTLED_CHANGE_FRACTION:
                return  # still changing: wait until it has grown, or settled
            unfrozen = len(look.difference(self._frozen))
            if unfrozen < len(connected) * SETTLED_UNFROZEN_FRACTION:
                return
        if self._frozen:
            # Only what is not frozen is walked, so that no garbage made since
            # the last freeze is frozen with the rest.
            started = time.perf_counter()
            found = self._gc.collect()
            logger.info("Heap collected unreachable=%d seconds=%.3f", found, time.perf_counter() - started)
        else:
            self._frozen_since = now
            if not collected_in_full:
                self._collect_in_full(now, "Heap collected before freezing")
        self._gc.freeze()
        self._frozen.update(connected)
        self._frozen_count = len(connected)
        logger.info("Heap frozen agents=%d", len(connected))

    def _collect_in_full(self, now: float, message: str) -> None:
        started = time.perf_counter()
        found = self._gc.collect()
        self._last_full_collection = now
        logger.info("%s unreachable=%d seconds=%.3f", message, found, time.perf_counter() - started)
