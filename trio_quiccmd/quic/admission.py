"""Which new QUIC connections may start a handshake now (sans-IO).

When thousands of agents dial at once (a server restart), every handshake
the server starts costs it a signature and its share of the CPU: started all
together they each took longer than their clients' probe timeout, every
client repeated its flights, and the work multiplied (3,000 agents, 256
dialling at a time: 22 datagrams received and 15 sent per connection
instead of 5 and 3). So at most ``max_handshakes`` are in progress at once,
and at most half of them for clients whose source address is unproven:

* an unproven client beyond that gets a Retry (RFC 9000, 8.1.2): a few
  bytes and no handshake work, carrying a token it must bring back from its
  address. Forged source addresses never come back, so they can hold only
  that half and real agents (which answer a Retry without being told) keep
  the rest;
* a client with a valid token is started if any slot is free; if none is,
  its Initial is dropped and it sends it again after its probe timeout
  (0.2 s, then 0.4, 0.8, 1.6, 3.2 s with aioquic's defaults);
* a copy of an Initial that was answered with a Retry (a resend, or one
  still queued) gets a Retry again, never a handshake: its client has moved
  on to the Retry's connection ID and could not use one;
* a handshake counts from when it starts until it completes, its connection
  ends, or ``HANDSHAKE_SLOT_SECONDS`` pass (its client gave up, or never
  existed); the connection itself goes on until its idle timeout.

The decision is the endpoint's to carry out; every call here is O(1)
amortised, so a flood of Initials costs little more than reading them.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from typing import Hashable

#: Handshakes in progress at once, by default.
DEFAULT_MAX_HANDSHAKES = 64
#: A handshake stops counting against the limit this long (seconds) after
#: it started, finished or not.
HANDSHAKE_SLOT_SECONDS = 5.0
#: Initials answered with a Retry are remembered this long (seconds), and at
#: most this many of them (the oldest are forgotten first), so that their
#: copies get a Retry too.
RETRY_MEMORY_SECONDS = 10.0
RETRY_MEMORY_SIZE = 65536


class Admission(enum.Enum):
    #: Start the handshake.
    START = "start"
    #: Answer with a Retry (the client's address is unproven).
    RETRY = "retry"
    #: Drop the Initial unanswered (its client resends it after its probe timeout).
    DROP = "drop"


class HandshakeAdmission:
    """Counts handshakes in progress and decides for each new connection's Initial."""

    def __init__(self, max_handshakes: int = DEFAULT_MAX_HANDSHAKES):
        if max_handshakes < 1:
            raise ValueError("max_handshakes must be at least 1")
        self.max_handshakes = max_handshakes
        self.unproven_budget = max_handshakes // 2
        #: Initials of new connections not started (each answered with a Retry, or dropped).
        self.deferred = 0
        # Handshakes in progress, in the order they started: when, and whether proven.
        self._in_progress: OrderedDict[Hashable, tuple[float, bool]] = OrderedDict()
        self._unproven = 0
        # Original destination connection IDs answered with a Retry, oldest first.
        self._retried: OrderedDict[bytes, float] = OrderedDict()

    @property
    def in_progress(self) -> int:
        return len(self._in_progress)

    def decide(self, destination_cid: bytes, proven: bool, now: float) -> Admission:
        """What to do with a new connection's Initial (``proven``: it carries a
        valid Retry token). A START must be followed by :meth:`started`."""
        self._expire(now)
        if not proven and destination_cid in self._retried:
            decision = Admission.RETRY
        elif len(self._in_progress) < self.max_handshakes and (
            proven or self._unproven < self.unproven_budget
        ):
            return Admission.START
        else:
            decision = Admission.DROP if proven else Admission.RETRY
        self.deferred += 1
        if decision is Admission.RETRY:
            self._retried[destination_cid] = now
            self._retried.move_to_end(destination_cid)
            if len(self._retried) > RETRY_MEMORY_SIZE:
                self._retried.popitem(last=False)
        return decision

    def started(self, key: Hashable, proven: bool, now: float) -> None:
        self.finished(key)  # (a key started twice counts once, at its newer start)
        self._in_progress[key] = (now, proven)
        self._unproven += not proven

    def finished(self, key: Hashable) -> None:
        """The handshake completed, or its connection ended (either may come twice)."""
        entry = self._in_progress.pop(key, None)
        if entry is not None:
            self._unproven -= not entry[1]

    def _expire(self, now: float) -> None:
        in_progress = self._in_progress
        while in_progress:
            key, (began, _proven) = next(iter(in_progress.items()))
            if now - began < HANDSHAKE_SLOT_SECONDS:
                break
            self.finished(key)
        retried = self._retried
        while retried:
            cid, at = next(iter(retried.items()))
            if now - at < RETRY_MEMORY_SECONDS:
                break
            del retried[cid]
