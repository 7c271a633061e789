"""The dirty log: exact pages, every range shape, and no bit lost to concurrency."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import random

import pytest

from shardfs.virtq import dirtylog
from shardfs.virtq.dirtylog import DirtyLog, DirtyLogError
from shardfs.virtq.memory import GuestMemory

PAGE = 0x1000


def make(size: int = 64, offset: int = 0) -> tuple[int, DirtyLog, mmap.mmap]:
    fd = os.memfd_create("log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size + offset)
    lg = DirtyLog(fd, size, offset)
    view = mmap.mmap(fd, size + offset)
    return fd, lg, view


def pages_of(data: bytes) -> set[int]:
    return {i * 8 + b for i, byte in enumerate(data) for b in range(8) if byte >> b & 1}


@pytest.mark.parametrize("atomic", [True, False])
def test_ranges_mark_exactly_their_pages(atomic: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not atomic:
        monkeypatch.setattr(dirtylog, "_fetch_or", None)
    rng = random.Random(3)
    fd, lg, view = make()
    for _ in range(300):
        view[:] = bytes(64)
        gpa = rng.randrange(0, 400 * PAGE)
        length = rng.choice([1, 2, PAGE - 1, PAGE, PAGE + 1, rng.randrange(1, 40 * PAGE)])
        lg.mark(gpa, length)
        want = set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))
        got = pages_of(view[:])
        if atomic:
            assert got == want, (gpa, length)
        else:  # whole bytes: a superset, at most 7 pages more on either side
            assert want <= got and len(got - want) <= 14
    lg.close()
    os.close(fd)


def test_offset_and_bounds() -> None:
    fd, lg, view = make(8, 4096)
    lg.mark(3 * PAGE, 1)
    assert view[4096] == 0b1000 and view[:4096] == bytes(4096)
    lg.mark(1 << 40, 10)  # beyond the log: logged as an error, nothing written
    assert pages_of(view[4096:]) == {3}
    lg.close()
    os.close(fd)
    with pytest.raises(DirtyLogError):
        DirtyLog(fd, 0, 0)


def test_views_map_through_regions() -> None:
    mem = GuestMemory()
    ram = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, 64 * PAGE)
    mem.add(0x100000, 32 * PAGE, 0x7F00_0000_0000, 0, ram)
    mem.add(0x400000, 32 * PAGE, 0x7F10_0000_0000, 32 * PAGE, ram)
    fd, lg, view = make(256)
    lg.set_regions(mem)
    lg.mark_views(mem.views(0x100000 + 5 * PAGE + 100, 3 * PAGE))
    lg.mark_views(mem.views(0x400000 + 7, 1))
    base1, base2 = 0x100000 // PAGE, 0x400000 // PAGE
    assert pages_of(view[:]) == {base1 + 5, base1 + 6, base1 + 7, base1 + 8, base2}
    lg.close()
    mem.clear()
    os.close(ram)
    os.close(fd)


def test_concurrent_writers_lose_no_bit_while_harvested() -> None:
    """Four processes each mark their pages once, interleaved in the same words,
    while this one harvests with an atomic exchange as QEMU's
    vhost_dev_sync_region does: every bit must reach the harvest (a plain
    read-modify-write would let one writer overwrite another's bit)."""
    lib = ctypes.CDLL(ctypes.util.find_library("atomic") or "libatomic.so.1")
    xchg = lib.__atomic_exchange_8
    xchg.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
    xchg.restype = ctypes.c_uint64
    words = 16
    fd, lg, view = make(words * 8)
    base = ctypes.addressof(ctypes.c_char.from_buffer(view))
    for _ in range(10):
        pids = []
        for w in range(4):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                try:
                    for page in range(w, words * 64, 4):
                        lg.mark(page * PAGE, 1)
                finally:
                    os._exit(0)
            pids.append(pid)
        seen = [0] * words
        while pids:
            for i in range(words):
                seen[i] |= xchg(base + 8 * i, 0, 5)
            for pid in list(pids):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    pids.remove(pid)
        for i in range(words):
            seen[i] |= xchg(base + 8 * i, 0, 5)
        assert seen == [(1 << 64) - 1] * words
    lg.close()
    os.close(fd)
