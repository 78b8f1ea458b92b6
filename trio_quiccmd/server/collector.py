"""Keep connected agents' state out of the garbage collector's full collections.

Each connected agent holds some 400 objects the cyclic garbage collector
tracks (aioquic's per-connection tables, streams, crypto state, our tasks and
cancel scopes). CPython's full collection walks every tracked object and
holds the event loop meanwhile: measured 0.5-1.1 s at 3,000 agents, ~1.5 s
at 10,000 (see docs/benchmarks.md), long enough for keepalives and loss
timers to fire late and for a fan-out's replies to pile up.

:class:`HeapFreezer` moves what is alive into the collector's permanent
generation (``gc.freeze()``) once enough agents are connected, and again as
their number grows; collections then walk only newer objects. The price:
an agent's session holds reference cycles, so the state of a session that
ended after a freeze is only reclaimed when the heap is unfrozen and
collected in full. That happens, once each time, when the sessions ended
since the last full collection reach a fraction of those frozen, or when the
freeze is an hour old.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Callable, Protocol

import trio

logger = logging.getLogger("trio_quiccmd.server")

#: Seconds between looks at the number of agents.
CHECK_INTERVAL = 5.0
#: Freeze again once this many times the agents frozen last time are connected.
GROWTH = 1.25
#: Collect in full once sessions ended since the last full collection reach
#: this fraction of the agents frozen (each holds ~80 KiB until then).
REFRESH_FRACTION = 0.05
#: ... or once the heap has been frozen this long, seconds.
MAX_FROZEN_SECONDS = 3600.0


class Collector(Protocol):
    """The parts of the :mod:`gc` module used (a stand-in in tests)."""

    def collect(self) -> int: ...

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...

    def get_freeze_count(self) -> int: ...


class HeapFreezer:
    """Freezes the heap once ``connected()`` reaches ``min_agents``.

    ``connected`` counts the agents connected now; ``ended`` the sessions
    ended since the server started (it only grows).
    """

    def __init__(
        self,
        connected: Callable[[], int],
        ended: Callable[[], int],
        *,
        min_agents: int,
        collector: Collector = gc,
    ):
        if min_agents < 1:
            raise ValueError("min_agents must be 1 or more")
        self._connected = connected
        self._ended = ended
        self._min_agents = min_agents
        self._gc = collector
        # Agents connected at the last freeze; None while nothing is frozen.
        self._frozen_for: int | None = None
        self._frozen_since = 0.0
        self._ended_at_full_collection = 0

    @property
    def frozen(self) -> bool:
        return self._frozen_for is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Look every CHECK_INTERVAL seconds until cancelled.

        If cancelled, the heap stays as it is (frozen or not): the process is
        going away, or the next run takes it up.
        """
        task_status.started()
        while True:
            await trio.sleep(CHECK_INTERVAL)
            self.check()

    def check(self) -> None:
        """Unfreeze and collect in full if due, then freeze if due."""
        connected, ended = self._connected(), self._ended()
        now = trio.current_time()
        collected_in_full = False
        if self._frozen_for is not None and (
            ended - self._ended_at_full_collection >= max(1.0, self._frozen_for * REFRESH_FRACTION)
            or now - self._frozen_since >= MAX_FROZEN_SECONDS
        ):
            frozen = self._gc.get_freeze_count()
            self._gc.unfreeze()
            self._frozen_for = None
            self._collect_in_full(ended, f"Heap unfrozen frozen_objects={frozen} agents={connected}")
            collected_in_full = True
        if connected < self._min_agents or (
            self._frozen_for is not None and connected < self._frozen_for * GROWTH
        ):
            return
        if self._frozen_for is not None:
            # Only what is not frozen is walked: a short collection, so that
            # no garbage made since the last freeze is frozen with the rest.
            self._gc.collect()
        elif not collected_in_full:
            self._collect_in_full(ended, "Heap collected before freezing")
        if self._frozen_for is None:
            self._frozen_since = now
        self._gc.freeze()
        self._frozen_for = connected
        logger.info("Heap frozen agents=%d frozen_objects=%d", connected, self._gc.get_freeze_count())

    def _collect_in_full(self, ended: int, message: str) -> None:
        started = time.perf_counter()
        found = self._gc.collect()
        self._ended_at_full_collection = ended
        logger.info(
            "%s unreachable=%d seconds=%.3f", message, found, time.perf_counter() - started
        )
