"""Prometheus metrics, fed by the command manager's lifecycle events.

Each :class:`Metrics` owns its own ``CollectorRegistry``: two servers in one
process (as in the tests) never share or double-register a metric.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ..model import Command, CommandStatus

#: Command durations span milliseconds (echo) to hours (long jobs).
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0, float("inf"),
)


class Metrics:
    """Command counters, a duration histogram and live gauges.

    Register it with ``manager.add_observer(metrics)``. The gauges read their
    value when scraped, from the callables given here, so they are never stale.

    Counters carry no labels on purpose: ``command_type`` and ``client_id``
    come from operators and agents, and an unbounded label set would let any
    caller blow up the scrape. The histogram is labelled by final status only
    (four values).
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        *,
        connected_agents: Callable[[], int] | None = None,
        unfinished_commands: Callable[[], int] | None = None,
        store_unwritten: Callable[[], int] | None = None,
        initials_deferred: Callable[[], int] | None = None,
        registry: CollectorRegistry | None = None,
    ):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sent = Counter("command_sent", "Commands delivered to an agent.", registry=r)
        self.completed = Counter("command_completed", "Commands that completed.", registry=r)
        self.failed = Counter(
            "command_failed",
            "Commands that failed (executor error, agent offline, server shutdown, ...).",
            registry=r,
        )
        self.timed_out = Counter(
            "command_timeout", "Commands that timed out (delivery or execution).", registry=r
        )
        self.cancelled = Counter("command_cancelled", "Commands that were cancelled.", registry=r)
        self.duration = Histogram(
            "command_duration_seconds",
            "Seconds from creation to the final state, for commands delivered to an agent.",
            ["status"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.connected_agents = Gauge(
            "connected_agents", "Agents connected now (said HELLO).", registry=r
        )
        self.unfinished_commands = Gauge(
            "commands_unfinished", "Commands pending or executing now.", registry=r
        )
        self.store_unwritten = Gauge(
            "command_store_unwritten",
            "Command changes saved but not yet committed to the store (rising: it cannot write).",
            registry=r,
        )
        if store_unwritten is not None:
            self.store_unwritten.set_function(store_unwritten)
        if initials_deferred is not None:
            r.register(_CounterReading(
                "quic_initials_deferred",
                "Initial packets of new QUIC connections not started at once, too many "
                "handshakes being in progress (each answered with a Retry, or dropped).",
                initials_deferred,
            ))
        if connected_agents is not None:
            self.connected_agents.set_function(connected_agents)
        if unfinished_commands is not None:
            self.unfinished_commands.set_function(unfinished_commands)
        self._by_status = {
            CommandStatus.COMPLETED: self.completed,
            CommandStatus.FAILED: self.failed,
            CommandStatus.TIMEOUT: self.timed_out,
            CommandStatus.CANCELLED: self.cancelled,
        }

    # -- CommandObserver -------------------------------------------------------

    def command_sent(self, command: Command) -> None:
        self.sent.inc()

    def command_finished(self, command: Command) -> None:
        counter = self._by_status.get(command.status)
        if counter is not None:
            counter.inc()
        # A command that never reached an agent (offline, timed out in the
        # queue) has no execution to time; counting its zero or its queueing
        # time would skew the histogram an operator reads as "how long commands take".
        if command.sent_at is not None and command.completed_at is not None:
            self.duration.labels(status=command.status.value).observe(
                max(0.0, command.completed_at - command.created_at)
            )

    # -- exposition --------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition format, for ``GET /metrics``."""
        return generate_latest(self.registry)


class _CounterReading:
    """A counter kept elsewhere (a plain int the QUIC endpoint increments on
    its hot path), read when scraped."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]):
        self._name = name
        self._documentation = documentation
        self._read = read

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self._name, self._documentation)]

    def collect(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self._name, self._documentation, value=self._read())]
