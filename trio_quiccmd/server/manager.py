"""CommandManager: the lifecycle, the promise table, the queues and deadlines.

Everything here runs on the server's trio thread. State changes happen in
synchronous code (a RESULT frame arriving, a deadline passing, a cancel), so
no two of them interleave: a command reaches exactly one terminal state.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import time
from typing import Any, Callable, Protocol

import attrs
import trio

from ..errors import (
    CommandAlreadyFinished,
    CommandNotFound,
    CommandRefused,
    InvalidCommand,
    PayloadTooLarge,
    QueueFull,
    QuicCmdError,
    ShuttingDown,
    StoreUnavailable,
    TooManyCommands,
)
from ..model import (
    PRIORITY_RANGE,
    Command,
    CommandStatus,
    ErrorCode,
    new_command_id,
    transition,
)
from ..wire import (
    COMMAND_FRAME_OVERHEAD,
    DEFAULT_MAX_FRAME_SIZE,
    ProgressFrame,
    ResultFrame,
    check_unicode,
    json_dumps,
)
from .auth import AgentAuthenticator
from .audit import AuditLog
from .policy import CommandPolicy
from .registry import AgentLink, AgentRegistry, ClientInfo
from .store import CommandPage, CommandQuery, MemoryStore, Store, StoreError

logger = logging.getLogger("trio_quiccmd.command")

#: Who sends and cancels made through the Python API are audited as.
PYTHON_API_ACTOR = "python-api"

_RESULT_STATUS = {
    "completed": CommandStatus.COMPLETED,
    "failed": CommandStatus.FAILED,
    "cancelled": CommandStatus.CANCELLED,
}

#: Stored as ``sent_to`` of an executing command that no agent process has
#: received, so that after a restart it still goes to whichever process of
#: its agent connects next. An agent announcing it as its own instance id is
#: taken to have none (see _instance_of): the store must never read it as that.
NEVER_SENT = "(never sent)"

#: Seconds from start to the first history trim (then every
#: ``cleanup_interval``): soon, so that a server restarted more often than
#: that interval still trims, but after the rush of agents reconnecting.
FIRST_TRIM_DELAY = 5.0


@attrs.frozen(kw_only=True)
class ManagerSettings:
    #: Commands open at once on one agent connection; the rest wait in its queue.
    max_in_flight_per_agent: int = 256
    #: Largest ``timeout`` / ``connect_timeout`` a command may ask for, seconds.
    max_timeout: float = 24 * 3600.0
    #: Finished commands are kept this long (seconds) ...
    history_retention: float = 24 * 3600.0
    #: ... and at most this many of them.
    max_history: int = 100_000
    #: How often the history is trimmed, seconds.
    cleanup_interval: float = 60.0
    #: Seconds a new connection has to send HELLO.
    hello_timeout: float = 10.0
    #: Largest frame the agents accept; a command that would not fit is refused.
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    #: Pending commands one client_id may have queued; more raise :class:`QueueFull`.
    max_queued_per_agent: int = 10_000
    #: Unfinished (pending + executing) commands on the server; more raise
    #: :class:`TooManyCommands`.
    max_unfinished_commands: int = 1_000_000
    #: Connected agents; a HELLO from one more client_id is closed with TOO_MANY_AGENTS.
    max_agents: int = 100_000
    #: HELLOs accepted per second (token bucket, bursts up to one second's
    #: worth); more are closed with RATE_LIMITED.
    max_hello_rate: float = 200.0
    #: Longest a send (or a cancel, or a shutdown) waits for the store to
    #: commit, seconds; a send not stored by then fails ``store_unavailable``.
    store_timeout: float = 10.0


class _Promise:
    """The promise of one unfinished command: its waiters park on ``settled``."""

    __slots__ = ("settled", "command", "waiters")

    def __init__(self) -> None:
        self.settled = trio.Event()
        self.command: Command | None = None
        self.waiters = 0


class _StagingRound:
    """Accepted commands stored together (durable store): set once they are
    stored and queued, with each one's state right after it was queued or sent."""

    __slots__ = ("done", "states")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.states: dict[str, Command] = {}


def _discard(sets: dict[str, set[str]], key: str, item: str) -> None:
    """Remove ``item`` from ``sets[key]``, and the key once its set is empty."""
    members = sets.get(key)
    if members is not None:
        members.discard(item)
        if not members:
            del sets[key]


def _instance_of(link: AgentLink) -> str:
    """The agent process ``link`` reaches, as the store records it ("" if
    it names none, or names itself NEVER_SENT)."""
    assert link.hello is not None
    instance = link.hello.instance_id
    return "" if instance == NEVER_SENT else instance


class CommandObserver(Protocol):
    """Told of lifecycle events (metrics hang off this)."""

    def command_sent(self, command: Command) -> None: ...

    def command_finished(self, command: Command) -> None: ...


class CommandManager:
    """Sends commands to agents and keeps a promise for each until it finishes.

    Timeouts belong to the command: a command that waits for delivery longer
    than its ``timeout`` (or, for an offline agent, its ``connect_timeout``)
    ends ``timeout`` with ``delivery_timeout``; one delivered but unanswered
    ``timeout`` seconds after it was sent ends ``timeout`` with
    ``execution_timeout``, and the agent is told to cancel it. Whether anyone
    waits for the command makes no difference.
    """

    def __init__(
        self,
        store: Store | None = None,
        settings: ManagerSettings | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
        authenticator: AgentAuthenticator | None = None,
        policy: CommandPolicy | None = None,
        audit: AuditLog | None = None,
    ):
        self.settings = settings or ManagerSettings()
        self.store: Store = store if store is not None else MemoryStore()
        self.registry = AgentRegistry(
            self,
            max_in_flight_per_agent=self.settings.max_in_flight_per_agent,
            hello_timeout=self.settings.hello_timeout,
            max_agents=self.settings.max_agents,
            max_hello_rate=self.settings.max_hello_rate,
            authenticator=authenticator,
        )
        #: Which command types each agent may get, and payload schemas (None: all).
        self.policy = policy
        #: Every send and cancel is recorded here, whoever makes it.
        self.audit = audit
        self._wall = wall_clock
        self._observers: list[CommandObserver] = []
        # Unfinished commands: the manager is their authority.
        self._live: dict[str, Command] = {}
        # Pending commands per client: heap of (-priority, sequence, command_id).
        self._queues: dict[str, list[tuple[int, int, str]]] = {}
        self._queue_sequence = 0
        # Pending (queued, not yet sent) commands per client: the queue limit.
        self._pending: dict[str, int] = {}
        # Executing commands per client: command_id -> the agent instance
        # (hello.instance_id) it was sent to, in sending order.
        self._executing: dict[str, dict[str, str]] = {}
        # Executing commands to send again on the client's current connection
        # (it reconnected; see agent_connected), in sending order.
        self._resend: dict[str, dict[str, None]] = {}
        # Promise table: command_id -> promise, while anyone waits for it.
        self._waiters: dict[str, _Promise] = {}
        # Deadlines: heap of (trio time, command_id); the current one per command
        # in _deadline_of (older heap entries are skipped when they surface).
        self._deadlines: list[tuple[float, str]] = []
        self._deadline_of: dict[str, float] = {}
        self._deadline_scope: trio.CancelScope | None = None
        # Durable store: accepted commands waiting to be stored before they
        # join their agents' queues (see _queue_stored_commands), and the
        # round they are gathered in.
        self._staged: list[tuple[str, tuple[int, int, str]]] = []
        # Durable store: accepted commands already executing (their agent had
        # room), to send once stored; and per agent, which wait so.
        self._staged_sends: list[tuple[str, str]] = []
        self._unsent: dict[str, set[str]] = {}
        # Executing commands never sent yet: their agent left (or its stream
        # limit was reached) before they were stored. They go to whichever
        # process of that agent connects next: none has seen them. Stored
        # as sent to NEVER_SENT, so that a restart knows it too.
        self._never_sent: dict[str, set[str]] = {}
        # Recovered pending commands to judge by the policy before sending.
        self._policy_recheck: set[str] = set()
        self._staging_wake = trio.Event()
        self._staged_round = _StagingRound()
        # While a drain waits: the agents some of whose commands can still
        # finish (see _can_finish_now), and set once there are none.
        self._draining: set[str] | None = None
        self._drained = trio.Event()
        # After a durable drain: waits return the command as it is at once.
        self._waits_released = False
        self._shutting_down = False
        self._dispatch_stopped = False

    def add_observer(self, observer: CommandObserver) -> None:
        self._observers.append(observer)

    # -- running ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Enforce deadlines, HELLO timeouts and history retention, and run the
        store's writer, until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.store.run)
            if self.store.durable:
                nursery.start_soon(self._queue_stored_commands)
            nursery.start_soon(self._enforce_deadlines)
            nursery.start_soon(self._trim_history)
            nursery.start_soon(self.registry.enforce_hello_timeout)
            task_status.started()

    def begin_shutdown(self) -> None:
        """Refuse new commands from now on; unfinished ones carry on."""
        self._shutting_down = True

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` seconds for unfinished commands to finish,
        as long as some can (their agent is connected); returns how many are
        left unfinished.

        With a durable store, queued commands are not sent any more and stay
        pending; executing ones get ``grace`` to finish, and those that do not
        stay executing (their agents keep their results for the next start).
        Everyone waiting for a command is then answered with its current
        state, and every later wait at once. With a store that is not
        durable, unfinished commands (queued ones are still sent) get
        ``grace``, then end ``failed`` with ``server_shutdown``. Commands of
        agents not connected are not waited for: an agent that connects
        meanwhile is, but a server shutting down takes no new connections.
        If cancelled, nothing is failed.
        """
        self.begin_shutdown()
        if self.store.durable:
            return await self._drain_durable(grace)
        await self._wait_while_commands_can_finish(grace)
        # Nothing more goes out: failing an executing command must not hand its
        # window slot to a queued one only to fail that too.
        self._dispatch_stopped = True
        left = list(self._live.values())
        for command in left:
            self._finish(
                command,
                CommandStatus.FAILED,
                error="the server shut down before the command finished",
                error_code=ErrorCode.SERVER_SHUTDOWN,
            )
        await self._flush_for_shutdown()
        return len(left)

    async def _drain_durable(self, grace: float) -> int:
        self._dispatch_stopped = True
        await self._wait_while_commands_can_finish(grace)
        # Long-polls end now with "still unfinished" instead of at their bound,
        # and those that come later at once.
        self._waits_released = True
        for promise in self._waiters.values():
            promise.settled.set()
        await self._flush_for_shutdown()
        return len(self._live)

    async def _wait_while_commands_can_finish(self, grace: float) -> None:
        """Wait, at most ``grace`` seconds, while a command can still finish
        with the agents connected now. One whose agent is gone cannot (a
        server shutting down takes no new connections): waiting for it would
        only make every restart take the whole grace period."""
        clients = set(self._executing) | set(self._queues)
        self._draining = {client_id for client_id in clients if self._can_finish_now(client_id)}
        try:
            with trio.move_on_after(grace):
                # (Emptied for a moment, it may fill again: an agent's process
                # replaced by another one leaves before the new one is there.)
                while self._draining:
                    self._drained = trio.Event()
                    await self._drained.wait()
        finally:
            self._draining = None

    def _can_finish_now(self, client_id: str) -> bool:
        """Whether some command of ``client_id`` can still finish: executing
        on the agent process connected now (its result can come, on its
        stream or held), or queued for a connected agent while the queues
        are still sent."""
        link = self.registry.get(client_id)
        if link is None or link.hello is None:
            return False
        executing = self._executing.get(client_id)
        if executing and _instance_of(link) in executing.values():
            return True
        return not self._dispatch_stopped and bool(self._queues.get(client_id))

    def _drain_recheck(self, client_id: str) -> None:
        """A command of ``client_id`` finished, or its agent came or went:
        while draining, see whether it still has a command that can finish."""
        draining = self._draining
        if draining is None:
            return
        if self._can_finish_now(client_id):
            draining.add(client_id)
        else:
            draining.discard(client_id)
            if not draining:
                self._drained.set()

    async def _flush_bounded(self) -> bool:
        """Wait for the store to commit what was saved, at most ``store_timeout``;
        False if it did not."""
        with trio.move_on_after(self.settings.store_timeout) as waited:
            await self.store.flush()
        return not waited.cancelled_caught

    async def _flush_for_shutdown(self) -> None:
        if not await self._flush_bounded():
            # A failing store must not hold the shutdown forever; its close
            # makes a last attempt and says what it could not write.
            logger.error(
                "Command store did not commit before shutdown timeout=%s", self.settings.store_timeout
            )

    async def recover(self) -> int:
        """Take up the unfinished commands a durable store kept from an earlier run.

        Call before agents connect. Pending commands are queued again, in
        their old order, and sent when their agent connects; executing ones
        keep their deadline, accept the result their agent delivers, and are
        sent again to the agent instance they went to if it reconnects without
        their result (it remembers the command, so it never runs it twice);
        those no agent process received go to whichever connects next.
        Those whose deadline passed while the server was down end ``timeout``
        now. Returns how many were taken up. If cancelled, nothing is taken up.
        """
        stored = await self.store.unfinished()
        now, wall_now = trio.current_time(), self._wall()
        expired: list[Command] = []
        counts = {CommandStatus.PENDING: 0, CommandStatus.EXECUTING: 0}
        for record in stored:
            command = record.command
            command_id, client_id = command.command_id, command.client_id
            if command_id in self._live:
                continue
            self._live[command_id] = command
            self._set_deadline(command_id, now + (record.deadline_at - wall_now))
            counts[command.status] += 1
            never_sent = command.status is CommandStatus.EXECUTING and record.sent_to == NEVER_SENT
            if command.status is CommandStatus.PENDING:
                heapq.heappush(self._queues.setdefault(client_id, []), self._queue_entry(command))
            else:
                self._executing.setdefault(client_id, {})[command_id] = record.sent_to
                if never_sent:
                    self._never_sent.setdefault(client_id, set()).add(command_id)
            if self.policy is not None and (command.status is CommandStatus.PENDING or never_sent):
                # Not yet with any agent, and the policy may have changed
                # with the restart: judged again when it is about to go out
                # (the agent's labels are known then).
                self._policy_recheck.add(command_id)
            if record.deadline_at <= wall_now:
                expired.append(command)
        for command in expired:
            self._expire(command)
        if stored:
            logger.info(
                "Recovered unfinished commands pending=%d executing=%d expired=%d",
                counts[CommandStatus.PENDING], counts[CommandStatus.EXECUTING], len(expired),
            )
        return len(stored)

    # -- the operator's API ----------------------------------------------------

    async def send_command(
        self,
        client_id: str,
        command_type: str,
        payload: Any = None,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 0.0,
        priority: int = 0,
        actor: str = PYTHON_API_ACTOR,
        remote: str = "",
    ) -> Command:
        """Create a command for ``client_id`` and dispatch it; return it at once.

        The returned command is ``executing`` if it went straight to the agent,
        ``pending`` if it is queued, or ``failed`` with ``agent_offline`` if the
        agent is not connected and ``connect_timeout`` is 0. Use :meth:`wait`
        for the outcome. Raises :class:`InvalidCommand` for bad arguments,
        :class:`ShuttingDown` while the server drains, :class:`QueueFull` if
        the agent already has ``max_queued_per_agent`` commands queued and
        :class:`TooManyCommands` if the server already has
        ``max_unfinished_commands`` unfinished, and :class:`PolicyDenied` /
        :class:`InvalidPayload` if the policy refuses it; then nothing is created.

        It returns once the command is stored (:meth:`Store.flush`); with a
        durable store the command is sent to its agent only then, so a command
        never runs unless the history has it. It is always a checkpoint, so a
        loop sending to many agents lets the first commands go out (and
        their results come in) while it makes the rest. If cancelled after
        the command was accepted, the command still runs; only the wait for
        its storage is abandoned.

        The send is recorded in the audit log (if the manager has one) as made
        by ``actor`` from ``remote``: the HTTP API passes the token's name.
        """
        command = self._accept(
            client_id, command_type, payload, timeout, connect_timeout, priority, actor, remote
        )
        return await self._stored_audited(command, actor, remote)

    def _accept(
        self,
        client_id: str,
        command_type: str,
        payload: Any,
        timeout: float,
        connect_timeout: float,
        priority: int,
        actor: str = PYTHON_API_ACTOR,
        remote: str = "",
    ) -> Command:
        """Create, record and dispatch a command (the synchronous part of
        sending), and audit the send: accepted, or refused and why."""
        try:
            command = self._create(client_id, command_type, payload, timeout, connect_timeout, priority)
        except QuicCmdError as exc:
            self._audit("send", client_id, command_type, None, actor, remote, exc.code)
            raise
        offline = command.is_terminal  # failed at once: agent_offline
        self._audit(
            "send", client_id, command_type, command.command_id, actor, remote,
            command.error_code if offline else None,
        )
        return command

    async def _stored_audited(self, command: Command, actor: str, remote: str) -> Command:
        try:
            return await self._stored(command)
        except StoreUnavailable as exc:
            self._audit(
                "send", command.client_id, command.command_type, command.command_id, actor, remote,
                exc.code,
            )
            raise

    def _audit(
        self,
        action: str,
        client_id: str | None,
        command_type: str | None,
        command_id: str | None,
        actor: str,
        remote: str,
        error_code: str | None = None,
    ) -> None:
        if self.audit is not None:
            self.audit.record(
                actor=actor, action=action, client_id=client_id, command_type=command_type,
                command_id=command_id, outcome="refused" if error_code else "accepted",
                error_code=error_code, remote=remote,
            )

    def _create(
        self,
        client_id: str,
        command_type: str,
        payload: Any,
        timeout: float,
        connect_timeout: float,
        priority: int,
    ) -> Command:
        self._validate(client_id, command_type, timeout, connect_timeout, priority)
        payload = self._own_payload(command_type, {} if payload is None else payload)
        if self.policy is not None:
            try:
                self.policy.check(client_id, command_type, payload, self.registry.labels_of(client_id))
            except CommandRefused as exc:
                logger.warning(
                    "Command refused client_id=%s command_type=%s error_code=%s",
                    client_id, command_type, exc.code,
                )
                raise
        if self._shutting_down:
            raise ShuttingDown()
        link = self.registry.get(client_id)
        if link is not None or connect_timeout > 0:
            # The command would stay unfinished (and may wait in the queue).
            if len(self._live) >= self.settings.max_unfinished_commands:
                logger.warning(
                    "Command refused client_id=%s error_code=too_many_commands limit=%d",
                    client_id, self.settings.max_unfinished_commands,
                )
                raise TooManyCommands(self.settings.max_unfinished_commands)
            if self._pending.get(client_id, 0) >= self.settings.max_queued_per_agent:
                logger.warning(
                    "Command refused client_id=%s error_code=queue_full limit=%d",
                    client_id, self.settings.max_queued_per_agent,
                )
                raise QueueFull(client_id, self.settings.max_queued_per_agent)
        created_at = self._wall()
        command = Command(
            command_id=new_command_id(created_at),
            client_id=client_id,
            command_type=command_type,
            payload=payload,
            priority=priority,
            timeout=float(timeout),
            connect_timeout=float(connect_timeout),
            created_at=created_at,
        )
        if link is None and connect_timeout <= 0:
            command = transition(
                command,
                CommandStatus.FAILED,
                at=command.created_at,
                error=f"agent {client_id} is not connected",
                error_code=ErrorCode.AGENT_OFFLINE,
            )
            self.store.save(command)
            logger.warning(
                "Command failed command_id=%s client_id=%s error_code=agent_offline",
                command.command_id, client_id,
            )
            self._notify_finished(command)
        else:
            self._set_deadline(
                command.command_id,
                trio.current_time() + (timeout if link is not None else connect_timeout),
            )
            self._update(command)
            if link is None:
                logger.info(
                    "Command queued for offline agent command_id=%s client_id=%s connect_timeout=%s",
                    command.command_id, client_id, connect_timeout,
                )
            if not self.store.durable:
                heapq.heappush(self._queues.setdefault(client_id, []), self._queue_entry(command))
                self._dispatch(client_id)
                command = self._live.get(command.command_id, command)
            elif link is not None and self._sendable_at_once(client_id, link):
                # Stored as executing, with the agent instance it goes to, in
                # the same row write as its acceptance; sent once stored.
                command = self._start(command, link, trio.current_time())
                self._staged_sends.append((client_id, command.command_id))
                self._unsent.setdefault(client_id, set()).add(command.command_id)
                self._staging_wake.set()
            else:
                # Queued (and so sent) only once stored: nothing runs on an
                # agent that a crash could leave out of the history.
                self._staged.append((client_id, self._queue_entry(command)))
                self._staging_wake.set()
        return command

    def _sendable_at_once(self, client_id: str, link: AgentLink) -> bool:
        """Whether a new command for ``client_id`` would go out at once: no
        queue ahead of it, and room in the agent's window."""
        return (
            not self._dispatch_stopped
            and not self._pending.get(client_id)  # queued, or being stored to be
            and not self._resend.get(client_id)
            and not self._never_sent.get(client_id)
            and link.in_flight + len(self._unsent.get(client_id, ())) < self.settings.max_in_flight_per_agent
            and link.can_send
        )

    async def _stored(self, command: Command) -> Command:
        """Wait until ``command`` (just accepted) is stored, and, with a durable
        store, queued or sent; its state then."""
        if command.is_terminal or not self.store.durable:
            # Always a checkpoint, as the durable path's wait is: a loop of
            # sends (one command to every agent) must let each connection
            # transmit, and the results come in, as it goes. Without one it
            # held the event loop until every command was made, then sent
            # them in one burst: 3,000 agents answered in 5.3-5.8 s instead
            # of 4.4-4.8 s, with the late ones retransmitted.
            await trio.lowlevel.checkpoint()
            if not await self._flush_bounded():
                raise StoreUnavailable(
                    f"the command store did not store the command within {self.settings.store_timeout:g} s"
                )
            return command
        staging = self._staged_round
        with trio.move_on_after(self.settings.store_timeout):
            await staging.done.wait()
        if staging.done.is_set():
            # As it was when sent (or queued), as without a durable store; a
            # command ended while being stored (cancelled) is looked up.
            return staging.states.get(command.command_id) or await self.get_command(command.command_id)
        # Not stored, so not sent: end it here, so that it never runs unseen
        # should the store recover later.
        current = self._live.get(command.command_id)
        if current is not None and (
            current.status is CommandStatus.PENDING
            or command.command_id in self._unsent.get(command.client_id, ())
        ):
            self._finish(
                current,
                CommandStatus.FAILED,
                error="the command store did not take the command in time",
                error_code=StoreUnavailable.code,
            )
        logger.error(
            "Command store unavailable command_id=%s timeout=%s",
            command.command_id, self.settings.store_timeout,
        )
        raise StoreUnavailable(
            f"the command store did not store the command within {self.settings.store_timeout:g} s; "
            "it has not been sent"
        )

    async def _queue_stored_commands(self) -> None:
        """Durable store: move accepted commands into their agents' queues, and
        dispatch them, once the store has them, batch after batch."""
        while True:
            await self._staging_wake.wait()
            self._staging_wake = trio.Event()
            staged, self._staged = self._staged, []
            sends, self._staged_sends = self._staged_sends, []
            staging, self._staged_round = self._staged_round, _StagingRound()
            await self.store.flush()
            self._send_stored(sends, staging)
            clients: dict[str, None] = {}
            for client_id, entry in staged:
                command = self._live.get(entry[2])
                if command is not None and command.status is CommandStatus.PENDING:
                    heapq.heappush(self._queues.setdefault(client_id, []), entry)
                    clients[client_id] = None
            for client_id in clients:
                self._dispatch(client_id)
            live = self._live
            for _client_id, (_priority, _sequence, command_id) in staged:
                command = live.get(command_id)
                if command is not None:
                    staging.states[command_id] = command
            staging.done.set()

    def _send_stored(self, sends: list[tuple[str, str]], staging: _StagingRound) -> None:
        """Send the commands stored as executing to go out (see _create and _dispatch)."""
        live, now = self._live, trio.current_time()
        # Agents one of whose staged commands ended before it could go out:
        # its place in the window was held until now, so the queue behind it
        # moves now (nothing else would move it until the next result).
        freed: dict[str, None] = {}
        for client_id, command_id in sends:
            _discard(self._unsent, client_id, command_id)
            command = live.get(command_id)
            if command is None:
                freed[client_id] = None
                continue  # finished while being stored
            staging.states[command_id] = command
            if command.status is not CommandStatus.EXECUTING:
                freed[client_id] = None
                continue  # cancelled or timed out while being stored
            link = self.registry.get(client_id)
            if link is None or link.hello is None:
                # Gone while being stored: the agent's next process gets it.
                self._sent_to_none(command)
            elif link.has_command(command_id):
                continue  # already sent
            elif _instance_of(link) != self._executing[client_id][command_id]:
                # Another process of the agent connected meanwhile. None has
                # seen the command: it goes to this one, once that is stored.
                self._restage(command, link)
            elif not link.can_send:
                # The agent's stream limit: sent as soon as it rises.
                self._sent_to_none(command)
                self._resend.setdefault(client_id, {})[command_id] = None
            else:
                link.send_command(command, max(self._deadline_of[command_id] - now, 0.001))
                self._announce_sent(command)
        for client_id in freed:
            self._dispatch(client_id)

    def _sent_to_none(self, command: Command) -> None:
        """Record that no agent process has ``command`` (stored as executing),
        in the store too: whichever process of its agent connects next gets
        it, after a restart as well."""
        client_id, command_id = command.client_id, command.command_id
        self._never_sent.setdefault(client_id, set()).add(command_id)
        self._executing[client_id][command_id] = NEVER_SENT
        self._update(command)
        self._drain_recheck(client_id)

    def _restage(self, command: Command, link: AgentLink) -> None:
        """Send ``command``, which no agent process has seen, to ``link``'s
        process, once the store says it went there (if today's policy, for a
        recovered one, still lets it)."""
        client_id, command_id = command.client_id, command.command_id
        if command_id in self._policy_recheck and not self._allowed_now(command, link):
            return
        self._forget_never_sent(client_id, command_id)
        self._executing[client_id][command_id] = _instance_of(link)
        self._update(command)
        self._staged_sends.append((client_id, command_id))
        self._unsent.setdefault(client_id, set()).add(command_id)
        self._staging_wake.set()

    async def get_command(self, command_id: str) -> Command:
        """The command's current state. Raises :class:`CommandNotFound`."""
        command = self._live.get(command_id)
        if command is None:
            try:
                command = await self.store.get(command_id)
            except StoreError as exc:
                raise StoreUnavailable(str(exc)) from None
        if command is None:
            raise CommandNotFound(command_id)
        return command

    async def list_commands(
        self,
        *,
        client_id: str | None = None,
        status: CommandStatus | str | None = None,
        command_type: str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> CommandPage:
        """Commands, newest first, filtered; pass ``next_cursor`` for the next page.

        ``created_after`` (inclusive) and ``created_before`` (exclusive) are
        wall-clock times in seconds since the epoch, to the millisecond.
        """
        if not 1 <= limit <= 1000:
            raise InvalidCommand("limit must be between 1 and 1000")
        if isinstance(status, str):
            try:
                status = CommandStatus(status)
            except ValueError:
                raise InvalidCommand(
                    f"unknown status {status!r}; one of "
                    + ", ".join(s.value for s in CommandStatus)
                ) from None
        query = CommandQuery(
            client_id=client_id,
            status=status,
            command_type=command_type,
            created_after=created_after,
            created_before=created_before,
            limit=limit,
            cursor=cursor,
        )
        try:
            return await self.store.list(query)
        except StoreError as exc:
            raise StoreUnavailable(str(exc)) from None

    async def wait(self, command_id: str, timeout: float | None = None) -> Command:
        """Wait until the command finishes or ``timeout`` seconds pass.

        Returns the command's state at that moment (terminal unless the wait
        ran out). Any number of callers may wait for one command. Raises
        :class:`CommandNotFound`. If cancelled, only this wait ends; the
        command is unaffected.
        """
        if command_id not in self._live:
            return await self.get_command(command_id)
        promise = self._hold_promise(command_id)
        try:
            return await self._settled(command_id, promise, timeout)
        finally:
            self._release_promise(command_id, promise)

    async def send_and_wait(
        self,
        client_id: str,
        command_type: str,
        payload: Any = None,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 0.0,
        priority: int = 0,
        wait_timeout: float | None = None,
        actor: str = PYTHON_API_ACTOR,
        remote: str = "",
    ) -> Command:
        """:meth:`send_command`, then :meth:`wait` up to ``wait_timeout``
        seconds (default: until it finishes) for its final state.

        Raises what :meth:`send_command` raises. If cancelled after the
        command was accepted, the command still runs; only the wait ends.
        """
        command = self._accept(
            client_id, command_type, payload, timeout, connect_timeout, priority, actor, remote
        )
        if command.is_terminal:
            return await self._stored_audited(command, actor, remote)
        # Waiting from the start means the finished command is handed over
        # even if it finishes while being stored: no lookup in the store.
        promise = self._hold_promise(command.command_id)
        try:
            await self._stored_audited(command, actor, remote)
            return await self._settled(command.command_id, promise, wait_timeout)
        finally:
            self._release_promise(command.command_id, promise)

    def _hold_promise(self, command_id: str) -> _Promise:
        promise = self._waiters.get(command_id)
        if promise is None:
            promise = self._waiters[command_id] = _Promise()
        promise.waiters += 1
        return promise

    def _release_promise(self, command_id: str, promise: _Promise) -> None:
        promise.waiters -= 1
        if promise.waiters == 0 and self._waiters.get(command_id) is promise:
            del self._waiters[command_id]

    async def _settled(self, command_id: str, promise: _Promise, timeout: float | None) -> Command:
        """The command once ``promise`` settles or ``timeout`` passes."""
        if self._waits_released:
            await trio.lowlevel.checkpoint()  # a caller's loop of waits must not hold the event loop
        else:
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await promise.settled.wait()
        if promise.command is not None:
            return promise.command
        # Still unfinished (the wait ran out, or a durable drain released it).
        return await self.get_command(command_id)

    async def cancel(
        self,
        command_id: str,
        reason: str = "cancelled by operator",
        *,
        actor: str = PYTHON_API_ACTOR,
        remote: str = "",
    ) -> Command:
        """Cancel a pending or executing command; returns it, ``cancelled``.

        An executing command's agent is sent CANCEL. Raises
        :class:`CommandNotFound`, or :class:`CommandAlreadyFinished` if it had
        already finished. Audited like :meth:`send_command`.
        """
        command = self._live.get(command_id)
        try:
            if command is None:
                command = await self.get_command(command_id)
                raise CommandAlreadyFinished(command)
            command = self._finish(
                command, CommandStatus.CANCELLED, error=reason, error_code=ErrorCode.CANCELLED
            )
            # Acknowledged once stored, like a send: a restart must not revive it.
            if not await self._flush_bounded():
                raise StoreUnavailable(
                    f"the cancel took effect, but the command store did not store it within "
                    f"{self.settings.store_timeout:g} s"
                )
        except QuicCmdError as exc:
            self._audit(
                "cancel", command and command.client_id, command and command.command_type,
                command_id, actor, remote, exc.code,
            )
            raise
        self._audit("cancel", command.client_id, command.command_type, command_id, actor, remote)
        return command

    def clients(self) -> list[ClientInfo]:
        """The connected agents."""
        return [
            ClientInfo(
                client_id=link.client_id or "",
                labels=dict(link.hello.labels) if link.hello else {},
                remote_address=link.remote_address,
                connected_at=link.connected_at or 0.0,
                in_flight=link.in_flight,
                queued=self.queued_count(link.client_id or ""),
            )
            for link in self.registry.links()
        ]

    def queued_count(self, client_id: str) -> int:
        """Pending commands of ``client_id`` (queued, not yet sent)."""
        return self._pending.get(client_id, 0)

    def waiter_count(self, command_id: str) -> int:
        """How many callers are in :meth:`wait` for this command now."""
        promise = self._waiters.get(command_id)
        return promise.waiters if promise is not None else 0

    @property
    def unfinished_count(self) -> int:
        return len(self._live)

    # -- what the agent links tell us ------------------------------------------

    def agent_connected(self, link: AgentLink) -> None:
        """A connection said HELLO: re-send what the agent may not have, dispatch the queue.

        Executing commands sent to this same agent instance on an earlier
        connection are sent again, with the time left until their deadline,
        unless the agent says it holds their results (it delivers those
        itself). The COMMAND may never have arrived, or its RESULT may have
        been lost with the connection; the agent remembers the ids it ran or
        is running, so a re-sent command is answered or attached to, never
        run twice. Commands sent to another instance (the agent restarted,
        forgetting what it ran) are not re-sent: they keep their deadline.
        """
        client_id = link.client_id
        assert client_id is not None and link.hello is not None
        self._resend.pop(client_id, None)
        queue = self._queues.get(client_id)
        if self.policy is not None and queue:
            # Judged when accepted by the labels the agent had then (its
            # bound ones, or its last HELLO's): a new process, or a replaced
            # token, may carry others.
            self._policy_recheck.update(command_id for *_, command_id in queue)
        executing = self._executing.get(client_id)
        instance = _instance_of(link)
        for command_id in list(self._never_sent.get(client_id, ())):
            # Never sent to any process: this one gets them, once stored.
            command = self._live.get(command_id)
            if command is not None and executing and command_id in executing:
                self._restage(command, link)
            else:
                self._forget_never_sent(client_id, command_id)
        if executing:
            held = set(link.hello.held_results)
            unsent = self._unsent.get(client_id, ())  # sent once stored
            resend = {
                command_id: None
                for command_id, sent_to in executing.items()
                if instance and sent_to == instance and command_id not in held
                and not link.has_command(command_id) and command_id not in unsent
            }
            elsewhere = sum(
                1 for command_id, sent_to in executing.items()
                if (not instance or sent_to != instance) and command_id not in unsent
            )
            if resend:
                self._resend[client_id] = resend
                logger.info(
                    "Re-sending executing commands after reconnect client_id=%s count=%d",
                    client_id, len(resend),
                )
            if elsewhere:
                logger.warning(
                    "Executing commands were sent to an earlier agent instance and are "
                    "not re-sent client_id=%s count=%d",
                    client_id, elsewhere,
                )
        self._dispatch(client_id)
        self._drain_recheck(client_id)

    def agent_disconnected(self, link: AgentLink) -> None:
        # Executing commands keep their deadlines: the agent may reconnect and
        # deliver. Pending ones stay queued for the next connection.
        client_id = link.client_id
        if client_id is not None and self.registry.get(client_id) is None:
            self._resend.pop(client_id, None)
            self._drain_recheck(client_id)

    def result_received(self, link: AgentLink, frame: ResultFrame) -> None:
        command = self._live.get(frame.command_id)
        if (
            command is None
            or command.status is not CommandStatus.EXECUTING
            or command.client_id != link.client_id
        ):
            logger.debug("Late or unknown result ignored command_id=%s", frame.command_id)
        else:
            status = _RESULT_STATUS[frame.status]
            error_code = frame.error_code
            if status is CommandStatus.CANCELLED and error_code == ErrorCode.EXECUTION_TIMEOUT.value:
                # The agent stopped it at the command's deadline, a moment
                # before ours fired here: the same timeout, not a cancel.
                status = CommandStatus.TIMEOUT
            if status is CommandStatus.FAILED and error_code is None:
                error_code = ErrorCode.EXECUTOR_ERROR
            elif status is CommandStatus.CANCELLED and error_code is None:
                error_code = ErrorCode.CANCELLED
            self._finish(
                command,
                status,
                result=frame.result,
                error=frame.error if status is not CommandStatus.COMPLETED else None,
                error_code=error_code if status is not CommandStatus.COMPLETED else None,
                from_agent=True,
            )
        assert link.client_id is not None
        self._dispatch(link.client_id)

    def slot_freed(self, link: AgentLink) -> None:
        if link.client_id is not None:
            self._dispatch(link.client_id)

    def progress_received(self, link: AgentLink, frame: ProgressFrame) -> None:
        logger.info(
            "Command progress command_id=%s client_id=%s progress=%s",
            frame.command_id, link.client_id, frame.progress,
        )

    # -- internals ---------------------------------------------------------------

    def _validate(
        self,
        client_id: Any,
        command_type: Any,
        timeout: Any,
        connect_timeout: Any,
        priority: Any,
    ) -> None:
        if not isinstance(client_id, str) or not client_id:
            raise InvalidCommand("client_id must be a non-empty string")
        if not isinstance(command_type, str) or not command_type:
            raise InvalidCommand("command_type must be a non-empty string")
        # Printable: no line breaks for the logs, no lone surrogates (which
        # JSON can carry) for the store, which keeps text as UTF-8.
        if not client_id.isprintable():
            raise InvalidCommand("client_id must be printable text")
        if not command_type.isprintable():
            raise InvalidCommand("command_type must be printable text")
        limit = self.settings.max_timeout
        for name, value, low_ok in (("timeout", timeout, False), ("connect_timeout", connect_timeout, True)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidCommand(f"{name} must be a number of seconds")
            if value < 0 or (value == 0 and not low_ok) or value > limit:
                raise InvalidCommand(
                    f"{name} must be {'between 0' if low_ok else 'greater than 0'} "
                    f"and at most {limit:g} seconds"
                )
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidCommand("priority must be an integer")
        low, high = PRIORITY_RANGE
        if not low <= priority <= high:
            raise InvalidCommand(f"priority must be between {low} and {high}")

    def _own_payload(self, command_type: str, payload: Any) -> Any:
        """A private copy of ``payload`` (the caller may change theirs later),
        checked to be JSON that fits in one COMMAND frame."""
        try:
            encoded = json_dumps(payload)
        except ValueError as exc:
            raise InvalidCommand(f"payload is {exc}") from None
        try:
            check_unicode(encoded, payload)
        except ValueError as exc:
            raise InvalidCommand(f"payload is not valid: {exc}") from None
        # Both as the wire writes them: a non-ASCII character is a 6-byte
        # \uXXXX escape there.
        size = len(encoded) + len(json_dumps(command_type)) + COMMAND_FRAME_OVERHEAD
        if size > self.settings.max_frame_size:
            raise PayloadTooLarge(
                f"the command would be a {size}-byte frame; agents accept at most "
                f"{self.settings.max_frame_size} bytes"
            )
        return json.loads(encoded)

    def _queue_entry(self, command: Command) -> tuple[int, int, str]:
        """A pending command's place in its agent's queue (priority, then age),
        counted against the agent's queue limit from now on."""
        self._queue_sequence += 1
        client_id = command.client_id
        self._pending[client_id] = self._pending.get(client_id, 0) + 1
        return (-command.priority, self._queue_sequence, command.command_id)

    def _prune_queue(self, client_id: str) -> None:
        """Drop a client's queue entries for commands no longer pending (lazily,
        when they are most of it), so a client that never connects holds nothing."""
        queue = self._queues.get(client_id)
        if queue is None:
            return
        # _pending is the count of live entries: no need to walk the queue
        # (which, on every finish, made a mass expiry quadratic).
        pending = self._pending.get(client_id, 0)
        if pending == 0:
            del self._queues[client_id]
        elif len(queue) > 2 * pending + 64:
            live = self._live
            queue[:] = [entry for entry in queue if entry[2] in live]
            heapq.heapify(queue)

    def _update(self, command: Command) -> None:
        """Record a change of an unfinished command (its deadline armed)."""
        command_id = command.command_id
        self._live[command_id] = command
        executing = self._executing.get(command.client_id)
        self.store.save(
            command,
            # Wall clock, so that a restarted server (another trio clock) can
            # take the command up with the time it has left.
            deadline_at=self._wall() + self._deadline_of[command_id] - trio.current_time(),
            sent_to=executing.get(command_id, "") if executing else "",
        )

    def _dispatch(self, client_id: str) -> None:
        """Send commands to the agent while its window has room: first those
        to re-send after a reconnect, then the queue."""
        if self._dispatch_stopped:
            return
        resend = self._resend.get(client_id)
        queue = self._queues.get(client_id)
        if not queue and not resend:
            return
        link = self.registry.get(client_id)
        if link is None:
            return
        # Commands stored as executing but not sent yet hold their places.
        window = self.settings.max_in_flight_per_agent - len(self._unsent.get(client_id, ()))
        now = trio.current_time()
        durable = self.store.durable
        if resend:
            while resend and link.in_flight < window and link.can_send:
                command_id = next(iter(resend))
                del resend[command_id]
                command = self._live.get(command_id)
                if (
                    command is None
                    or command.status is not CommandStatus.EXECUTING
                    or link.has_command(command_id)
                ):
                    continue
                never_sent = self._never_sent.get(client_id)
                if never_sent is not None and command_id in never_sent:
                    # Stored as sent to no process: sent once stored as sent
                    # to this one, or a crash could let another run it too.
                    self._restage(command, link)
                    window -= 1
                    continue
                remaining = self._deadline_of[command_id] - now
                # The command keeps its deadline: the agent gets the time left.
                link.send_command(command, max(remaining, 0.001))
                logger.info(
                    "Command re-sent command_id=%s client_id=%s remaining=%.3f",
                    command_id, client_id, remaining,
                )
            if not resend:
                del self._resend[client_id]
        if not queue:
            return
        while queue and link.in_flight < window and link.can_send:
            _, _, command_id = heapq.heappop(queue)
            command = self._live.get(command_id)
            if command is None or command.status is not CommandStatus.PENDING:
                continue  # cancelled or timed out while queued
            if self._policy_recheck and command_id in self._policy_recheck:
                if not self._allowed_now(command, link):
                    continue
            self._unqueued(client_id)
            command = self._start(command, link, now)
            if durable:
                # Sent once stored as executing on this agent process, as a
                # command sent at once is: a crash right after it went out
                # must not find it pending, which would send it again (to
                # another process of the agent, too).
                self._staged_sends.append((client_id, command_id))
                self._unsent.setdefault(client_id, set()).add(command_id)
                self._staging_wake.set()
                window -= 1
            else:
                link.send_command(command, command.timeout)
                self._announce_sent(command)
        if not queue:
            # (A refused recovered command may have pruned it already.)
            self._queues.pop(client_id, None)

    def _start(self, command: Command, link: AgentLink, now: float) -> Command:
        """Record ``command`` as executing on ``link``'s agent instance, with
        the deadline for its execution."""
        command_id, client_id = command.command_id, command.client_id
        command = transition(command, CommandStatus.EXECUTING, at=self._wall())
        self._executing.setdefault(client_id, {})[command_id] = _instance_of(link)
        self._set_deadline(command_id, now + command.timeout)
        self._update(command)
        return command

    def _announce_sent(self, command: Command) -> None:
        logger.info(
            "Command sent command_id=%s client_id=%s command_type=%s",
            command.command_id, command.client_id, command.command_type,
        )
        for observer in self._observers:
            observer.command_sent(command)

    def _forget_never_sent(self, client_id: str, command_id: str) -> None:
        _discard(self._never_sent, client_id, command_id)

    def _allowed_now(self, command: Command, link: AgentLink) -> bool:
        """A recovered command, or one queued before its agent connected,
        judged by today's policy and the agent's labels now, before it is
        sent; one refused now ends ``failed`` with the policy's code."""
        self._policy_recheck.discard(command.command_id)
        assert self.policy is not None and link.hello is not None
        try:
            self.policy.check(command.client_id, command.command_type, command.payload, link.hello.labels)
        except CommandRefused as exc:
            logger.warning(
                "Queued command refused by the policy command_id=%s client_id=%s error_code=%s",
                command.command_id, command.client_id, exc.code,
            )
            self._finish(command, CommandStatus.FAILED, error=str(exc), error_code=exc.code)
            return False
        return True

    def _finish(
        self,
        command: Command,
        status: CommandStatus,
        *,
        result: Any = None,
        error: str | None = None,
        error_code: str | None = None,
        from_agent: bool = False,
    ) -> Command:
        was_executing = command.status is CommandStatus.EXECUTING
        # Ended here, stored as executing but never sent: no agent has work to
        # stop, and its sent_at (set when it was staged) would say it went out.
        unsent = was_executing and not from_agent and self._reached_no_agent(command)
        command = transition(
            command, status, at=self._wall(), result=result, error=error, error_code=error_code
        )
        if unsent:
            command = attrs.evolve(command, sent_at=None)
        del self._live[command.command_id]
        del self._deadline_of[command.command_id]
        if self._policy_recheck:
            self._policy_recheck.discard(command.command_id)
        self._compact_deadlines()
        if was_executing:
            self._forget_executing(command)
        self.store.save(command)
        if not was_executing:
            self._unqueued(command.client_id)
            self._prune_queue(command.client_id)
        elif not from_agent and not unsent:
            # Ended here (timeout, cancel, shutdown): stop the work on the
            # agent too, and give its window slot to the next queued command.
            link = self.registry.get(command.client_id)
            if link is not None:
                link.cancel_command(command.command_id, error or status.value)
                self._dispatch(command.client_id)
        promise = self._waiters.pop(command.command_id, None)
        if promise is not None:
            promise.command = command
            promise.settled.set()
        self._log_finished(command)
        self._notify_finished(command)
        self._drain_recheck(command.client_id)
        return command

    def _reached_no_agent(self, command: Command) -> bool:
        """Whether no agent process has received ``command``, executing: it
        waits to be stored before it goes out, or is known to have gone nowhere."""
        client_id, command_id = command.client_id, command.command_id
        return command_id in self._unsent.get(client_id, ()) or command_id in self._never_sent.get(
            client_id, ()
        )

    def _unqueued(self, client_id: str) -> None:
        """One of ``client_id``'s pending commands left the queue (sent or finished)."""
        left = self._pending[client_id] - 1
        if left:
            self._pending[client_id] = left
        else:
            del self._pending[client_id]

    def _forget_executing(self, command: Command) -> None:
        client_id, command_id = command.client_id, command.command_id
        executing = self._executing.get(client_id)
        if executing is not None and executing.pop(command_id, None) is not None:
            if not executing:
                del self._executing[client_id]
        resend = self._resend.get(client_id)
        if resend is not None:
            resend.pop(command_id, None)
            if not resend:
                del self._resend[client_id]
        self._forget_never_sent(client_id, command_id)

    def _log_finished(self, command: Command) -> None:
        status = command.status
        if status is CommandStatus.COMPLETED:
            logger.info(
                "Command execution completed command_id=%s client_id=%s status=completed",
                command.command_id, command.client_id,
            )
        elif status is CommandStatus.TIMEOUT:
            logger.warning(
                "Command timeout command_id=%s client_id=%s error_code=%s",
                command.command_id, command.client_id, command.error_code,
            )
        elif status is CommandStatus.CANCELLED:
            logger.info(
                "Command cancelled command_id=%s client_id=%s error_code=%s",
                command.command_id, command.client_id, command.error_code,
            )
        elif status is CommandStatus.FAILED:
            logger.error(
                "Command execution failed command_id=%s client_id=%s error_code=%s error=%r",
                command.command_id, command.client_id, command.error_code, command.error,
            )

    def _notify_finished(self, command: Command) -> None:
        for observer in self._observers:
            observer.command_finished(command)

    def _set_deadline(self, command_id: str, at: float) -> None:
        self._deadline_of[command_id] = at
        heapq.heappush(self._deadlines, (at, command_id))
        self._compact_deadlines()
        scope = self._deadline_scope
        if scope is not None and at < scope.deadline:
            scope.deadline = at

    def _compact_deadlines(self) -> None:
        # Entries of finished or re-armed commands wait in the heap until their
        # time; rebuild it before they outnumber the live ones.
        deadlines = self._deadlines
        if len(deadlines) > 2 * len(self._deadline_of) + 64:
            deadlines[:] = [(when, cid) for cid, when in self._deadline_of.items()]
            heapq.heapify(deadlines)

    async def _enforce_deadlines(self) -> None:
        deadlines = self._deadlines
        while True:
            with trio.CancelScope(deadline=deadlines[0][0] if deadlines else math.inf) as scope:
                self._deadline_scope = scope
                await trio.sleep_forever()
            self._deadline_scope = None
            now = trio.current_time()
            while deadlines and deadlines[0][0] <= now:
                at, command_id = heapq.heappop(deadlines)
                if self._deadline_of.get(command_id) != at:
                    continue  # superseded or finished
                try:
                    self._expire(self._live[command_id])
                except Exception:
                    # One command's bad luck must not stop every other deadline.
                    logger.exception("Failed to expire command command_id=%s", command_id)

    def _expire(self, command: Command) -> None:
        # A command whose move to executing is still being stored was not
        # sent either: not delivered in time. (Its deadline may simply be
        # shorter than a commit; a store that is really stuck is reported to
        # the sender, see _stored.)
        if command.status is CommandStatus.PENDING or self._reached_no_agent(command):
            self._finish(
                command,
                CommandStatus.TIMEOUT,
                error="the command was not delivered to the agent in time",
                error_code=ErrorCode.DELIVERY_TIMEOUT,
            )
        else:
            self._finish(
                command,
                CommandStatus.TIMEOUT,
                error=f"no result within {command.timeout:g} s",
                error_code=ErrorCode.EXECUTION_TIMEOUT,
            )

    async def _trim_history(self) -> None:
        await trio.sleep(min(FIRST_TRIM_DELAY, self.settings.cleanup_interval))
        while True:
            try:
                deleted = await self.store.purge(
                    finished_before=self._wall() - self.settings.history_retention,
                    keep_at_most=self.settings.max_history,
                )
            except Exception as exc:
                # A lock held elsewhere, an I/O error: try again next time
                # rather than take the server down over housekeeping.
                logger.error("Command history trim failed error=%r", str(exc))
            else:
                if deleted:
                    logger.info("Command history trimmed deleted=%d", deleted)
            await trio.sleep(self.settings.cleanup_interval)
