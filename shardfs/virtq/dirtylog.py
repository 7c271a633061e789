"""The dirty-page log a migrating frontend reads (vhost-user spec, "Migration").

While QEMU migrates a guest, every byte the device writes into guest memory
must mark its page in a bitmap QEMU shares through SET_LOG_BASE (a memfd,
with LOG_SHMFD): ``page = gpa / VHOST_LOG_PAGE; log[page / 8] |= 1 << page % 8``.
A page written but not marked is not re-sent: the destination runs with a
stale copy, silent corruption.  So:

* **What is marked.** Everything a worker writes: the writable side of each
  chain it returns (reply headers and payloads, the data ``preadv`` lands in
  guest buffers, READDIR(PLUS) buffers; the whole writable side, not only the
  used length, so no path that writes and then fails is missed: marking a
  page too many only re-sends it), and the used ring (elements, ``used.idx``,
  ``used.flags`` and ``avail_event``) at the ring's ``log_guest_addr`` when
  SET_VRING_ADDR set VHOST_VRING_F_LOG.  The used ring is marked whole at the
  end of every batch and again when the ring stops (GET_VRING_BASE, before
  QEMU's last harvest), so a notification-flag write made after a batch is
  never left out.
* **After the write.** A mark made before the write could be harvested
  before the write lands; marking after it can only make QEMU send a page
  one round more.
* **Concurrency.** Every worker maps the same log and sets bits while QEMU
  harvests each 64-bit word with an atomic exchange (``vhost_dev_sync_region``).
  A plain read-modify-write would lose a bit another writer set between the
  read and the write.  Bytes the range covers whole are stored as 0xFF (a
  plain store of all ones cannot clear anyone's bit); the partial bytes at
  either end are or-ed with libatomic's ``__atomic_fetch_or_1`` (a ``lock
  or``).  Without libatomic those bytes are stored whole too: up to seven
  neighbouring pages more are marked, never one fewer.
* **Cost when off.** The worker holds ``None`` instead of a log and tests
  that one local per request; nothing here runs.

The log is mapped with libc's mmap through ctypes, not Python's ``mmap``:
a raw address lets the atomics reach it, and no buffer export pins the
mapping when QEMU replaces the log (a new SET_LOG_BASE at runtime, also
before a memory-table change).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from collections.abc import Iterable

from shardfs.abi.vhost_user import VHOST_LOG_PAGE
from shardfs.abi.virtio import used_ring_size
from shardfs.virtq.memory import GuestMemory, address_of

log = logging.getLogger("shardfs.dirtylog")

_PAGE_SHIFT = VHOST_LOG_PAGE.bit_length() - 1
_BITS = 8
_ALL_ONES = 0xFF
#: The largest log we map: one bit per 4 KiB page of a 64 TiB guest.
MAX_LOG_BYTES = 1 << 31

_libc = ctypes.CDLL(None, use_errno=True)
#: mmap(2) and munmap(2) through libc, for a mapping whose *address* we need
#: (the atomic OR takes a pointer; Python's mmap hides it).  The DAX test
#: double (shardfs.testing.dax) maps its window with the same bindings.
libc_mmap = _libc.mmap
libc_mmap.restype = ctypes.c_void_p
libc_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc_munmap = _libc.munmap
libc_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value


def _load_fetch_or() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    # By soname: ctypes.util.find_library would run ldconfig in a subprocess
    # and import tempfile, random and more into every daemon (memory, DESIGN §5).
    try:
        lib = ctypes.CDLL("libatomic.so.1")
    except OSError:
        return None
    fn = lib.__atomic_fetch_or_1
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int]
    fn.restype = ctypes.c_uint8
    return fn


#: libatomic's __atomic_fetch_or_1(ptr, value, memorder), or None.
_fetch_or = _load_fetch_or()
#: __ATOMIC_SEQ_CST
_SEQ_CST = 5


class DirtyLogError(ValueError):
    """The log cannot be mapped (bad size, offset or fd)."""


class DirtyLog:
    """One mapped log; the caller keeps its fd (mapping takes its own reference)."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        if not 0 < size <= MAX_LOG_BYTES or not 0 <= offset <= MAX_LOG_BYTES:
            raise DirtyLogError(f"log size {size} offset {offset} out of range")
        length = size + offset
        addr = libc_mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == MAP_FAILED:
            e = ctypes.get_errno()
            raise DirtyLogError(f"cannot map the log ({size} bytes): {os.strerror(e)}")
        self._map_addr, self._map_len = addr, length
        self.base = addr + offset
        self.size = size
        self.pages = size * _BITS
        #: (host start, host end, gpa) per guest-memory region (set_regions).
        self._regions: list[tuple[int, int, int]] = []
        #: queue index -> (log gpa, bytes) of used rings logged (VHOST_VRING_F_LOG).
        self.used: dict[int, tuple[int, int]] = {}
        self._warned = False

    def close(self) -> None:
        if self._map_addr:
            libc_munmap(self._map_addr, self._map_len)
            self._map_addr = 0
            self.base = 0
            self.size = self.pages = 0

    # -- marking ------------------------------------------------------------------

    def mark(self, gpa: int, length: int) -> None:
        """Mark every page that ``[gpa, gpa + length)`` touches."""
        if length <= 0:
            return
        first = gpa >> _PAGE_SHIFT
        last = (gpa + length - 1) >> _PAGE_SHIFT
        if last >= self.pages:
            if not self._warned:
                self._warned = True
                log.error("a guest write at gpa %#x lies beyond the dirty log (%d pages)",
                          gpa, self.pages)
            if first >= self.pages:
                return
            last = self.pages - 1
        b0, b1 = first >> 3, last >> 3
        base = self.base
        if b0 == b1:
            self._or(base + b0, ((1 << (last - first + 1)) - 1) << (first & 7))
            return
        lo = first & 7
        if lo:
            self._or(base + b0, (_ALL_ONES << lo) & _ALL_ONES)
            b0 += 1
        hi = last & 7
        if hi != 7:
            self._or(base + b1, (1 << (hi + 1)) - 1)
            b1 -= 1
        if b1 >= b0:
            ctypes.memset(base + b0, _ALL_ONES, b1 - b0 + 1)

    @staticmethod
    def _or(addr: int, bits: int) -> None:
        if _fetch_or is not None:
            _fetch_or(addr, bits, _SEQ_CST)
        else:
            ctypes.memset(addr, _ALL_ONES, 1)

    def set_regions(self, mem: GuestMemory) -> None:
        """Learn where guest memory sits in this process (after any memory change)."""
        out = []
        for r in mem.regions:
            if r.size:
                out.append((r.host, r.host + r.size, r.gpa))
        self._regions = out

    def mark_views(self, views: Iterable[memoryview]) -> None:
        """Mark the pages under views of guest memory (a chain's writable side)."""
        regions = self._regions
        for v in views:
            n = len(v)
            if not n:
                continue
            addr = address_of(v)
            for start, end, gpa in regions:
                if start <= addr < end:
                    self.mark(gpa + (addr - start), n)
                    break
            else:
                log.error("a written buffer is outside guest memory; not logged")

    def set_used(self, index: int, log_gpa: int | None, num: int) -> None:
        """Log queue ``index``'s used ring at ``log_gpa`` (None: do not log it)."""
        if log_gpa is None:
            self.used.pop(index, None)
        else:
            self.used[index] = (log_gpa, used_ring_size(num))

    def mark_used(self, index: int) -> None:
        entry = self.used.get(index)
        if entry is not None:
            self.mark(*entry)

    def read(self) -> bytes:
        """A copy of the bitmap (tests and diagnostics)."""
        return ctypes.string_at(self.base, self.size)


class LogState:
    """A worker's logging settings: the mapped log, LOG_ALL, and each ring's
    VHOST_VRING_F_LOG address.  :meth:`active` is the log to mark, or None.

    Settings arrive in any order (QEMU may ack LOG_ALL before SET_LOG_BASE,
    and set a ring's flag before or after); the log is live only when it is
    mapped and LOG_ALL is on.
    """

    def __init__(self) -> None:
        self.log: DirtyLog | None = None
        self.enabled = False
        #: queue index -> (log gpa, ring size) for rings with VHOST_VRING_F_LOG.
        self.rings: dict[int, tuple[int, int]] = {}

    def configure(self, size: int, offset: int, enabled: bool, fd: int | None,
                  mem: GuestMemory) -> DirtyLog | None:
        """New settings; ``fd`` (kept by the caller) replaces the mapped log."""
        if fd is not None:
            new = DirtyLog(fd, size, offset)
            if self.log is not None:
                self.log.close()
            self.log = new
        self.enabled = enabled
        return self.active(mem)

    def ring(self, index: int, log_gpa: int | None, num: int,
             mem: GuestMemory) -> DirtyLog | None:
        if log_gpa is None:
            self.rings.pop(index, None)
        else:
            self.rings[index] = (log_gpa, num)
        return self.active(mem)

    def active(self, mem: GuestMemory) -> DirtyLog | None:
        if self.log is None or not self.enabled:
            return None
        self.log.used = {i: (gpa, used_ring_size(num)) for i, (gpa, num) in self.rings.items()}
        self.log.set_regions(mem)
        return self.log

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        self.log = None
        self.enabled = False
        self.rings.clear()
