"""Byte-range lock arithmetic: FUSE ranges checked, and a mirror of what an owner holds.

Pure logic, no system calls: the lock process (:mod:`shardfs.proc.locks`)
takes real host locks (open file description locks, ``F_OFD_*``) and keeps
this mirror beside them for two things the host kernel does not tell it:

* **who** holds a conflicting range inside this guest, so that GETLK can
  report the guest pid that took it (the host reports ``-1`` for any OFD
  lock; a host pid is never passed on);
* **whether** an owner still holds anything, so that its host file
  description can be closed once it holds nothing (fds are a budget).

Ranges follow ``fuse.h``: ``fuse_file_lock.start`` and ``.end`` are
inclusive byte offsets, and ``end == OFFSET_MAX`` means "to the end of the
file, however it grows" (the kernel's ``l_len == 0``).  Both must be at
most ``OFFSET_MAX`` (2**63 - 1) and ``end >= start``: anything else is
EINVAL, as the kernel's own ``flock_to_posix_lock`` answers.

The mirror merges and splits exactly as POSIX (and the host kernel) does
for one owner: a new lock replaces whatever the owner held in its range,
whatever the type (an upgrade or downgrade is atomic), and adjacent or
overlapping ranges of the same type coalesce.
"""

from __future__ import annotations

import errno
import fcntl
from typing import NamedTuple

from shardfs.fs.api import FsError

#: The largest offset a lock may cover (``loff_t``); ``end`` of this means to EOF.
OFFSET_MAX = (1 << 63) - 1
LOCK_TYPES = (fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK)


def check_range(start: int, end: int, typ: int) -> None:
    """EINVAL unless ``start..end`` is a range fuse.h allows and ``typ`` a lock type."""
    if typ not in LOCK_TYPES:
        raise FsError(errno.EINVAL, f"lock type {typ}")
    if not 0 <= start <= OFFSET_MAX or not 0 <= end <= OFFSET_MAX or end < start:
        raise FsError(errno.EINVAL, f"lock range {start}..{end}")


def to_flock_len(start: int, end: int) -> int:
    """``struct flock.l_len`` for the inclusive FUSE range (0: to the end of file)."""
    return 0 if end == OFFSET_MAX else end - start + 1


def from_flock(start: int, length: int) -> tuple[int, int]:
    """The inclusive FUSE range of a ``struct flock`` that F_OFD_GETLK returned.

    The kernel always returns ``l_start >= 0`` and ``l_len >= 0`` there (0
    meaning to EOF); anything out of range is clamped, never wrapped.
    """
    start = min(max(start, 0), OFFSET_MAX)
    if length <= 0 or start + length - 1 > OFFSET_MAX:
        return start, OFFSET_MAX
    return start, start + length - 1


class Held(NamedTuple):
    """One range an owner holds: inclusive ``start..end``, F_RDLCK or F_WRLCK, guest pid."""

    start: int
    end: int
    typ: int
    pid: int


def overlaps(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    return a_start <= b_end and b_start <= a_end


def conflicts(held_typ: int, want_typ: int) -> bool:
    """Two locks of different owners on overlapping bytes conflict unless both read."""
    return held_typ == fcntl.F_WRLCK or want_typ == fcntl.F_WRLCK


class OwnerRanges:
    """The ranges one owner holds on one file, sorted, disjoint, coalesced."""

    __slots__ = ("ranges",)

    def __init__(self) -> None:
        self.ranges: list[Held] = []

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def set(self, start: int, end: int, typ: int, pid: int) -> None:
        """Apply a lock (F_RDLCK, F_WRLCK) or an unlock (F_UNLCK) of ``start..end``.

        Whatever the owner held inside the range is replaced; the parts of
        a range sticking out on either side are kept (a split); a new range
        of the same type touching or overlapping a neighbour is merged.
        """
        kept: list[Held] = []
        for h in self.ranges:
            if not overlaps(h.start, h.end, start, end):
                kept.append(h)
                continue
            if h.start < start:
                kept.append(Held(h.start, start - 1, h.typ, h.pid))
            if h.end > end:
                kept.append(Held(end + 1, h.end, h.typ, h.pid))
        if typ != fcntl.F_UNLCK:
            new = Held(start, end, typ, pid)
            merged: list[Held] = []
            for h in kept:
                touching = h.end + 1 >= new.start and new.end + 1 >= h.start
                if h.typ == typ and touching:
                    new = Held(min(h.start, new.start), max(h.end, new.end), typ, new.pid)
                else:
                    merged.append(h)
            kept = merged + [new]
        kept.sort(key=lambda h: h.start)
        self.ranges = kept

    def conflict(self, start: int, end: int, typ: int) -> Held | None:
        """The first range held here that a lock ``typ`` of another owner would meet."""
        for h in self.ranges:
            if overlaps(h.start, h.end, start, end) and conflicts(h.typ, typ):
                return h
        return None


class Pending(Exception):
    """Raised by a lock service for a SETLKW that must wait: the reply comes later.

    The dispatcher answers nothing and tells its caller (a worker) to park
    the chain; the worker completes it out of order when the lock process
    says (:mod:`shardfs.proc.lockclient`).
    """
