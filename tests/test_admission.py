"""HandshakeAdmission: which new QUIC connections may start a handshake (sans-IO, synchronous)."""

from __future__ import annotations

import pytest

from trio_quiccmd.quic.admission import (
    HANDSHAKE_SLOT_SECONDS,
    RETRY_MEMORY_SECONDS,
    RETRY_MEMORY_SIZE,
    Admission,
    HandshakeAdmission,
)

START, RETRY, DROP = Admission.START, Admission.RETRY, Admission.DROP


def dial(admission: HandshakeAdmission, cid: bytes, proven: bool = False, now: float = 0.0) -> Admission:
    """An Initial arrives; a started handshake is keyed by its cid."""
    decision = admission.decide(cid, proven, now)
    if decision is START:
        admission.started(cid, proven, now)
    return decision


def test_unproven_clients_get_half_the_slots_then_a_retry():
    admission = HandshakeAdmission(4)
    assert [dial(admission, bytes([i])) for i in range(4)] == [START, START, RETRY, RETRY]
    assert admission.in_progress == 2 and admission.deferred == 2


def test_proven_clients_get_any_free_slot_then_wait():
    admission = HandshakeAdmission(4)
    dial(admission, b"u1"), dial(admission, b"u2")  # unproven: their half
    assert [dial(admission, bytes([i]), proven=True) for i in range(3)] == [START, START, DROP]
    # Unproven ones cannot take a slot a proven one freed beyond their half.
    admission.finished(bytes([0]))
    assert dial(admission, b"u3") is RETRY
    assert dial(admission, b"p", proven=True) is START


def test_a_copy_of_an_initial_answered_with_a_retry_never_starts_a_handshake():
    # Its client moved on to the Retry's connection id: a handshake started
    # for the old one would be work nobody can use.
    admission = HandshakeAdmission(2)
    assert dial(admission, b"a") is START
    assert dial(admission, b"late") is RETRY
    admission.finished(b"a")
    assert dial(admission, b"late") is RETRY  # a resend, or a copy still queued
    assert dial(admission, b"new") is START
    # Forgotten after a while (the client has long given that attempt up).
    admission.finished(b"new")
    assert dial(admission, b"late", now=RETRY_MEMORY_SECONDS) is START


def test_a_handshake_counts_until_it_completes_its_connection_ends_or_its_time_is_up():
    admission = HandshakeAdmission(2)
    dial(admission, b"a", proven=True)
    dial(admission, b"b", proven=True, now=1.0)
    assert dial(admission, b"c", proven=True, now=2.0) is DROP
    admission.finished(b"b")  # completed
    admission.finished(b"b")  # and its connection ended later: counted once
    assert dial(admission, b"c", proven=True, now=2.0) is START
    assert dial(admission, b"d", proven=True, now=2.0) is DROP
    # "a" started at 0: its slot is given up at HANDSHAKE_SLOT_SECONDS.
    assert dial(admission, b"d", proven=True, now=HANDSHAKE_SLOT_SECONDS - 0.01) is DROP
    assert dial(admission, b"d", proven=True, now=HANDSHAKE_SLOT_SECONDS) is START
    assert admission.in_progress == 2


def test_a_limit_of_one_gives_unproven_clients_nothing():
    # Else a forged Initial every few seconds would keep every agent out.
    admission = HandshakeAdmission(1)
    assert dial(admission, b"u") is RETRY
    assert dial(admission, b"p", proven=True) is START


def test_the_retry_memory_is_bounded():
    admission = HandshakeAdmission(1)
    for i in range(RETRY_MEMORY_SIZE + 10):
        dial(admission, i.to_bytes(4, "big"))
    assert len(admission._retried) == RETRY_MEMORY_SIZE


def test_a_limit_below_one_is_refused():
    with pytest.raises(ValueError):
        HandshakeAdmission(0)
