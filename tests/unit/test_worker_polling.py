"""The polling window's rule (shardfs.proc.worker.next_poll_window): pure
arithmetic on given durations, so nothing here depends on timing."""

from __future__ import annotations

from shardfs.proc.worker import next_poll_window

MAX = 50_000  # ns: poll_us = 50


def test_a_kick_within_the_maximum_opens_the_window() -> None:
    assert next_poll_window(0, 20_000, MAX) == MAX // 8  # from closed: the floor
    assert next_poll_window(MAX // 8, 20_000, MAX) == MAX // 4  # then doubling
    assert next_poll_window(MAX // 2, 1, MAX) == MAX  # capped
    assert next_poll_window(MAX, MAX, MAX) == MAX  # the boundary still counts


def test_a_late_kick_closes_the_window_in_a_few_sleeps() -> None:
    w = MAX
    seen = []
    for _ in range(5):
        w = next_poll_window(w, 1_000_000, MAX)  # a TCG guest: a request a millisecond
        seen.append(w)
    assert seen == [MAX // 2, MAX // 4, MAX // 8, 0, 0]


def test_the_window_never_leaves_its_range() -> None:
    import random
    rng = random.Random(3)
    w = MAX
    for _ in range(10_000):
        w = next_poll_window(w, rng.choice([0, 10_000, MAX, MAX + 1, 10**7]), MAX)
        assert w == 0 or MAX // 8 <= w <= MAX


def test_polling_off_stays_off() -> None:
    assert next_poll_window(0, 0, 0) == 0
    assert next_poll_window(0, 10**6, 0) == 0
