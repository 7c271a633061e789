"""Lock arithmetic (shardfs.fs.locks) and the lock owner's table (shardfs.proc.locks).

The owner is driven directly, with real host files and real OFD locks: two
owners of one node must conflict on the host exactly as two processes would.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from shardfs.fs.api import FsError
from shardfs.fs.locks import OFFSET_MAX, OwnerRanges, check_range, from_flock, to_flock_len
from shardfs.proc.lockclient import in_flight_heads
from shardfs.proc.locks import LockOwner

RD, WR, UN = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK


@pytest.mark.parametrize(("start", "end", "typ"), [
    (1, 0, WR), (-1, 5, WR), (0, OFFSET_MAX + 1, RD), (OFFSET_MAX + 1, OFFSET_MAX + 1, WR),
    (0, 1, 3), (0, 1, -1),
])
def test_bad_ranges_are_einval(start: int, end: int, typ: int) -> None:
    with pytest.raises(FsError) as e:
        check_range(start, end, typ)
    assert e.value.errno == errno.EINVAL


def test_range_conversions() -> None:
    check_range(0, OFFSET_MAX, WR)
    assert to_flock_len(10, OFFSET_MAX) == 0 and to_flock_len(10, 19) == 10
    assert from_flock(10, 0) == (10, OFFSET_MAX) and from_flock(10, 10) == (10, 19)
    assert from_flock(OFFSET_MAX, 5) == (OFFSET_MAX, OFFSET_MAX)  # clamped, never wrapped


def spans(r: OwnerRanges) -> list[tuple[int, int, int]]:
    return [(h.start, h.end, h.typ) for h in r.ranges]


def test_merge_split_and_upgrade() -> None:
    r = OwnerRanges()
    r.set(0, 9, RD, 1)
    r.set(10, 19, RD, 1)  # adjacent, same type: merged
    assert spans(r) == [(0, 19, RD)]
    r.set(5, 14, WR, 1)  # an upgrade in the middle splits
    assert spans(r) == [(0, 4, RD), (5, 14, WR), (15, 19, RD)]
    r.set(0, 19, WR, 1)  # everything upgraded and merged
    assert spans(r) == [(0, 19, WR)]
    r.set(8, 11, UN, 1)
    assert spans(r) == [(0, 7, WR), (12, 19, WR)]
    assert r.conflict(7, 7, RD) is not None and r.conflict(8, 11, WR) is None
    r.set(0, OFFSET_MAX, UN, 1)
    assert not r


@pytest.fixture
def owner() -> LockOwner:
    return LockOwner(max_waits=2, max_files=8)


def fd_of(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def test_two_owners_conflict_on_the_host(owner: LockOwner, tmp_path: Path) -> None:
    f = tmp_path / "f"
    assert owner.setlk(0, 7, 1, False, 0, 9, WR, 100, 0, None) == "need_fd"
    assert owner.setlk(0, 7, 1, False, 0, 9, WR, 100, 0, fd_of(f)) == 0
    assert owner.setlk(0, 7, 2, False, 5, 5, RD, 200, 0, fd_of(f)) == errno.EAGAIN
    assert owner.getlk(7, 2, 5, 5, RD, fd_of(f)) == (WR, 0, 9, 100)
    assert owner.setlk(0, 7, 2, False, 10, 19, WR, 200, 0, fd_of(f)) == 0
    host = os.open(f, os.O_RDWR)
    with pytest.raises(OSError):
        fcntl.lockf(host, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 15)
    owner.flush(7, 2)
    fcntl.lockf(host, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 15)
    os.close(host)
    assert set(owner.holders) == {(7, 1, False)}  # owner 2 holds nothing: its fd is closed


def test_waits_retry_budget_interrupt_and_orphans(owner: LockOwner, tmp_path: Path) -> None:
    f = tmp_path / "w"
    assert owner.setlk(0, 7, 1, False, 0, 0, WR, 1, 0, fd_of(f)) == 0
    assert owner.setlk(0, 7, 2, False, 0, 0, WR, 2, 11, fd_of(f)) == "pending"
    assert owner.setlk(1, 7, 3, False, 0, 0, WR, 3, 13, fd_of(f)) == "pending"
    assert owner.setlk(0, 7, 4, False, 0, 0, WR, 4, 15, fd_of(f)) == errno.ENOLCK  # budget
    assert owner.retry(0.0) == []  # still held
    owner.setlk(0, 7, 1, False, 0, 0, UN, 1, 0, None)
    granted = owner.retry(0.0)  # a local release: retried at once
    assert [(w.unique, e) for w, e in granted] == [(11, 0)]
    owner.handle(1, ["tag", 13, 1, 42], [])
    owner.worker_gone(1)  # worker 1 died with wait 13 parked at head 42 of ring 1
    assert 13 not in owner.waits and owner.orphans(1) == [42] and owner.orphans(1) == []
    # An INTERRUPT that overtakes its SETLKW is remembered.
    assert owner.handle(0, ["interrupt", 17], []) is None
    assert owner.setlk(0, 7, 5, False, 0, 0, WR, 5, 17, fd_of(f)) == errno.EINTR
    waits = owner.destroy()
    assert not owner.holders and not owner.waits and waits == []


def test_flock_holders_and_release(owner: LockOwner, tmp_path: Path) -> None:
    f = tmp_path / "fl"
    assert owner.setlk(0, 9, 1, True, 0, OFFSET_MAX, WR, 0, 0, fd_of(f)) == 0
    assert owner.setlk(0, 9, 2, True, 0, OFFSET_MAX, RD, 0, 0, fd_of(f)) == errno.EAGAIN
    host = os.open(f, os.O_RDONLY)
    with pytest.raises(BlockingIOError):
        fcntl.flock(host, fcntl.LOCK_SH | fcntl.LOCK_NB)
    owner.release(9, 1, flock_unlock=True)
    fcntl.flock(host, fcntl.LOCK_SH | fcntl.LOCK_NB)
    os.close(host)
    assert (9, 1, True) not in owner.holders  # released and closed
    assert (9, 2, True) in owner.holders  # kept open until its owner's close


def test_malformed_link_messages_never_raise(owner: LockOwner) -> None:
    assert owner.handle(0, ["setlk", 1], []) == ["err", errno.EINVAL]
    assert owner.handle(0, ["getlk", 1, 1, 5, 2, WR], []) == ["err", errno.EINVAL]
    assert owner.handle(0, ["nonsense"], []) == ["err", errno.EINVAL]
    assert owner.handle(0, ["tag", 1], []) is None


class _Q:
    """Just what in_flight_heads reads of a SplitQueue."""

    num = 8

    def __init__(self, last_avail: int, used: int) -> None:
        self.last_avail_idx, self.used_idx = last_avail, used

    def head_at(self, pos: int) -> int:
        return 100 + pos


def test_in_flight_heads_with_parked_chains() -> None:
    assert in_flight_heads(_Q(5, 3), []) == [103, 104]  # type: ignore[arg-type]
    assert in_flight_heads(_Q(5, 4), [7]) == [7]  # type: ignore[arg-type]
    assert in_flight_heads(_Q(5, 3), [7]) == [7, 104]  # type: ignore[arg-type]
    assert in_flight_heads(_Q(5, 1), [7]) is None  # type: ignore[arg-type]
