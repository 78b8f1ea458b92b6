"""A command's lifecycle: which status changes are allowed, what they record,
and that a finished command can never be changed again."""

from __future__ import annotations

import re
import types

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_quiccmd import model
from trio_quiccmd.model import (
    TERMINAL_STATUSES,
    TRANSITIONS,
    Command,
    CommandStatus,
    InvalidTransition,
    new_command_id,
    transition,
)

S = CommandStatus
TERMINAL = [S.COMPLETED, S.FAILED, S.TIMEOUT, S.CANCELLED]

# Written out by hand (not derived from TRANSITIONS) so a change to the table
# has to be made on purpose, in both places.
ALLOWED = {
    (S.PENDING, S.EXECUTING),
    (S.PENDING, S.FAILED),  # e.g. agent offline
    (S.PENDING, S.TIMEOUT),  # never delivered
    (S.PENDING, S.CANCELLED),
    (S.EXECUTING, S.COMPLETED),
    (S.EXECUTING, S.FAILED),
    (S.EXECUTING, S.TIMEOUT),
    (S.EXECUTING, S.CANCELLED),
}
REFUSED = sorted(
    {(a, b) for a in S for b in S} - ALLOWED, key=lambda p: (p[0].value, p[1].value)
)

CREATED = 1_700_000_000.0
SENT = CREATED + 1.5
DONE = CREATED + 4.25


def make(status: CommandStatus = S.PENDING, **kw) -> Command:
    cmd = Command(
        command_id="cmd-1",
        client_id="agent-1",
        command_type="ping",
        payload={"n": 1},
        created_at=CREATED,
        **kw,
    )
    if status is S.PENDING:
        return cmd
    cmd = transition(cmd, S.EXECUTING, at=SENT)
    if status is S.EXECUTING:
        return cmd
    return transition(cmd, status, at=DONE - 1, result="first", error="e", error_code="x")


def test_table_is_the_documented_lifecycle():
    assert set(TRANSITIONS) == set(S)
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == ALLOWED
    assert set(TERMINAL_STATUSES) == set(TERMINAL)
    for status in S:
        assert status.is_terminal == (status in TERMINAL)
        assert make(status).is_terminal == (status in TERMINAL)
        assert make(status).status is status


def test_new_command_starts_pending_with_no_timestamps():
    cmd = make()
    assert cmd.status is S.PENDING
    assert cmd.created_at == CREATED
    assert cmd.sent_at is None and cmd.completed_at is None
    assert cmd.result is None and cmd.error is None and cmd.error_code is None


def test_pending_to_executing_records_sent_at_only():
    before = make()
    after = transition(before, S.EXECUTING, at=SENT)
    assert after.status is S.EXECUTING
    assert after.sent_at == SENT
    assert after.completed_at is None
    assert after.created_at == CREATED
    assert (after.command_id, after.client_id, after.payload) == (
        "cmd-1",
        "agent-1",
        {"n": 1},
    )
    assert before.status is S.PENDING and before.sent_at is None  # not mutated


@pytest.mark.parametrize("target", TERMINAL, ids=lambda s: s.value)
def test_executing_to_terminal_records_completion(target):
    before = make(S.EXECUTING)
    after = transition(
        before, target, at=DONE, result={"ok": 1}, error="why", error_code="code"
    )
    assert after.status is target
    assert after.completed_at == DONE
    assert after.sent_at == SENT  # kept from the executing step
    assert after.created_at == CREATED
    assert (after.result, after.error, after.error_code) == ({"ok": 1}, "why", "code")
    assert before.status is S.EXECUTING and before.completed_at is None


@pytest.mark.parametrize(
    "target", [S.FAILED, S.TIMEOUT, S.CANCELLED], ids=lambda s: s.value
)
def test_pending_to_terminal_records_completion_but_was_never_sent(target):
    after = transition(make(), target, at=DONE, error="agent offline", error_code="agent_offline")
    assert after.status is target
    assert after.completed_at == DONE
    assert after.sent_at is None
    assert after.error == "agent offline"
    assert after.error_code == "agent_offline"


def test_every_allowed_transition_works():
    for current, target in ALLOWED:
        after = transition(make(current), target, at=DONE)
        assert after.status is target
        if target is S.EXECUTING:
            assert after.sent_at == DONE and after.completed_at is None
        else:
            assert after.completed_at == DONE


@pytest.mark.parametrize(
    "current,target", REFUSED, ids=[f"{a.value}->{b.value}" for a, b in REFUSED]
)
def test_every_other_transition_is_refused(current, target):
    cmd = make(current)
    with pytest.raises(InvalidTransition) as info:
        transition(cmd, target, at=DONE, result="late")
    assert info.value.command_id == "cmd-1"
    assert info.value.current is current
    assert info.value.wanted is target
    assert current.value in str(info.value) and target.value in str(info.value)
    assert "cmd-1" in str(info.value)


@pytest.mark.parametrize("current", TERMINAL, ids=lambda s: s.value)
def test_nothing_leaves_a_terminal_state(current):
    cmd = make(current)
    for target in S:
        with pytest.raises(InvalidTransition):
            transition(cmd, target, at=DONE + 100, result="late result")
    # The refused attempts left the snapshot untouched.
    assert cmd.status is current
    assert cmd.result == "first"
    assert cmd.completed_at == DONE - 1


def test_pending_cannot_complete_without_executing():
    with pytest.raises(InvalidTransition):
        transition(make(), S.COMPLETED, at=DONE, result="too soon")


def test_command_is_immutable():
    cmd = make()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cmd.status = S.COMPLETED  # type: ignore[misc]


# --------------------------------------------------------------------------
# random sequences of attempts

OPS = {
    "executing": S.EXECUTING,
    "result": S.COMPLETED,
    "fail": S.FAILED,
    "timeout": S.TIMEOUT,
    "cancel": S.CANCELLED,
}


def expected_allowed(state: CommandStatus, op: str) -> bool:
    """The lifecycle in words, independent of the TRANSITIONS table."""
    if state in TERMINAL:
        return False  # finished is final
    if op == "executing":
        return state is S.PENDING  # dispatched once
    if op == "result":
        return state is S.EXECUTING  # only a dispatched command has a result
    return True  # fail / timeout / cancel from pending or executing


@settings(max_examples=300)
@given(st.lists(st.sampled_from(sorted(OPS)), max_size=12))
def test_random_attempts_never_change_a_finished_command(ops):
    cmd = make()
    first_terminal = None
    for step, op in enumerate(ops):
        at = CREATED + step + 1
        before = cmd
        try:
            cmd = transition(cmd, OPS[op], at=at, result=f"r{step}", error=f"e{step}")
        except InvalidTransition:
            assert not expected_allowed(before.status, op), (before.status, op)
            assert cmd is before
            continue
        assert expected_allowed(before.status, op), (before.status, op)
        assert cmd.status is OPS[op]
        if cmd.is_terminal:
            assert first_terminal is None
            first_terminal = cmd
            assert cmd.completed_at == at
            assert cmd.result == f"r{step}"
        else:
            assert cmd.sent_at == at
        if first_terminal is not None:
            # Once terminal, nothing about the outcome ever changes.
            assert cmd == first_terminal
    if first_terminal is not None:
        assert cmd == first_terminal


# --------------------------------------------------------------------------
# command ids

ID_RE = re.compile(r"^[0-9a-f]{12}-[0-9a-f]{8}-[0-9a-f]{8}$")


def test_ids_are_unique_and_sort_in_creation_order():
    ids = [new_command_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(ID_RE.match(i) for i in ids)


def _fake_clock(monkeypatch, times):
    it = iter(times)
    monkeypatch.setattr(model, "time", types.SimpleNamespace(time=lambda: next(it)))
    # Forget what the real clock said, and restore it afterwards, so fake
    # times neither depend on nor leak into the ids other tests make.
    monkeypatch.setattr(model, "_last_millis", 0, raising=False)


def test_ids_sort_when_many_share_a_millisecond(monkeypatch):
    _fake_clock(monkeypatch, [1_700_000_000.123] * 1000)
    ids = [new_command_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and ids == sorted(ids)


def test_ids_sort_across_hex_digit_boundaries(monkeypatch):
    # Fixed-width fields: 0xfff ms must not sort after 0x1000 ms.
    _fake_clock(monkeypatch, [0xFFF / 1000, 0x1000 / 1000, 0xFFFF / 1000, 0x10000 / 1000])
    ids = [new_command_id() for _ in range(4)]
    assert ids == sorted(ids)
    assert all(ID_RE.match(i) for i in ids)


def test_ids_keep_order_when_the_wall_clock_steps_back(monkeypatch):
    # NTP corrections and VM resumes move the wall clock backwards; a newer
    # command must still list as newer.
    now = 1_700_000_000.0
    _fake_clock(monkeypatch, [now, now - 5.0, now - 4.0, now + 1.0])
    ids = [new_command_id() for _ in range(4)]
    assert len(set(ids)) == 4 and ids == sorted(ids)


def test_transition_keeps_every_field_it_does_not_change():
    command = Command(
        command_id="id-1", client_id="c", command_type="t", payload={"p": 1},
        priority=7, timeout=12.5, connect_timeout=3.0, created_at=100.0,
    )
    executing = transition(command, CommandStatus.EXECUTING, at=101.0)
    done = transition(executing, CommandStatus.FAILED, at=102.0, result=[1], error="e", error_code="x")
    changed = {"status", "sent_at", "completed_at", "result", "error", "error_code"}
    for field in attrs.fields(Command):
        if field.name not in changed:
            assert getattr(done, field.name) == getattr(command, field.name), field.name
    assert (executing.sent_at, done.sent_at, done.completed_at) == (101.0, 101.0, 102.0)
    assert (done.result, done.error, done.error_code) == ([1], "e", "x")


def test_every_error_the_api_raises_is_importable_from_the_package():
    # The docs promise the QuicCmdErrors are importable from trio_quiccmd;
    # PayloadTooLarge, which send_command raises, was not.
    import inspect

    import trio_quiccmd
    from trio_quiccmd import errors

    raised = {
        name for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, errors.QuicCmdError)
    }
    assert raised <= set(trio_quiccmd.__all__)
    assert all(getattr(trio_quiccmd, name) is getattr(errors, name) for name in raised)
