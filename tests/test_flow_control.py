"""FrameCredit, the per-stream credit by frames (sans-IO: no QUIC here)."""

from __future__ import annotations

from trio_quiccmd.quic.flow_control import STREAM_WINDOW, FrameCredit

BIG = 5 * STREAM_WINDOW  # a frame larger than a stream's own window


def test_small_frames_need_no_reservation_and_the_window_moves_by_halves():
    credit = FrameCredit(budget=2 * BIG)
    assert credit.update(0, consumed=100, pending=None) == []  # less than half used
    assert credit.update(0, consumed=STREAM_WINDOW // 2, pending=50) == [(0, STREAM_WINDOW // 2 + STREAM_WINDOW)]


def test_a_large_frame_gets_its_whole_size_once_reserved():
    credit = FrameCredit(budget=2 * BIG)
    assert credit.update(0, consumed=10, pending=BIG) == [(0, 10 + BIG)]
    assert credit.update(0, consumed=10, pending=BIG) == []  # more of it arrives: nothing new
    # Complete: its reservation is released, and the stream's window moves on.
    assert credit.update(0, consumed=10 + BIG, pending=None) == [(0, 10 + BIG + STREAM_WINDOW)]


def test_large_frames_beyond_the_budget_wait_in_order_and_get_room_as_others_complete():
    credit = FrameCredit(budget=2 * BIG)
    assert credit.update(0, 0, BIG) == [(0, BIG)]
    assert credit.update(4, 0, BIG) == [(4, BIG)]
    assert credit.update(8, 0, BIG) == []  # the budget is taken: it waits at its window
    assert credit.update(12, 0, STREAM_WINDOW) == []  # a frame its window holds: no wait
    assert credit.update(16, 0, BIG) == []
    # Stream 0's frame completes: the first waiting (8) gets its room, not 16.
    grants = credit.update(0, BIG, None)
    assert (8, BIG) in grants and all(stream != 16 for stream, _ in grants)
    # A stream that ends (or is reset) gives its room back too.
    assert credit.forget(4) == [(16, BIG)]


def test_a_waiting_stream_that_ends_leaves_the_queue():
    credit = FrameCredit(budget=BIG)
    credit.update(0, 0, BIG)
    credit.update(4, 0, BIG)
    assert credit.forget(4) == []
    assert credit.update(0, BIG, None) == [(0, BIG + STREAM_WINDOW)]  # nobody else to serve


def test_a_frame_that_does_not_fit_what_is_left_of_the_window_renews_it():
    """After frames that used less than half the window, the next one may
    be larger than what is left, yet no larger than a window (a progress
    frame, then a 64 kB result): its stream waited for ever at its window."""
    credit = FrameCredit(budget=2 * BIG)
    assert credit.update(0, consumed=53, pending=None) == []  # a small first frame
    assert credit.update(0, consumed=53, pending=STREAM_WINDOW) == [(0, 53 + STREAM_WINDOW)]


def test_many_small_frames_then_one_just_under_the_window_gets_room():
    credit = FrameCredit(budget=2 * BIG)
    granted = STREAM_WINDOW
    consumed = 0
    for _ in range(500):
        consumed += 100
        for _stream, offset in credit.update(0, consumed, None):
            granted = offset
    for _stream, offset in credit.update(0, consumed, STREAM_WINDOW - 10):
        granted = offset
    assert granted >= consumed + STREAM_WINDOW - 10
