"""Guest memory: the frontend's memory regions, mapped and bounds-checked.

A region comes from SET_MEM_TABLE or ADD_MEM_REG as ``{gpa, size, user_addr,
mmap_offset}`` plus one fd.  As libvhost-user does, we map
``size + mmap_offset`` bytes from file offset 0 and index at ``mmap_offset``
(DESIGN §1: hugepage backings need the whole-page mapping).

Every translation checks that ``[addr, addr + length)`` lies inside one or
more regions; anything else raises :class:`GuestMemoryError`, which callers
treat as a malformed request from the guest, never as a crash.

Lifetime: views handed out keep their mapping alive (Python's buffer
protocol), so removing a region while a view is still referenced cannot turn
into a use-after-unmap; the mapping goes away with its last view.
"""

from __future__ import annotations

import ctypes
import mmap


class GuestMemoryError(Exception):
    """A guest or frontend address or length is outside mapped memory."""


#: The view of a region that maps nothing (immutable, so one serves all).
_EMPTY_VIEW = memoryview(b"")


def address_of(view: memoryview) -> int:
    """The address of a writable view's first byte in this process (the
    ctypes object that tells it, and with it its export of the buffer, is
    dropped at once)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class Region:
    __slots__ = ("gpa", "size", "user_addr", "mmap_offset", "mapping", "view", "host")

    gpa: int
    size: int
    user_addr: int
    mmap_offset: int
    mapping: mmap.mmap | None
    view: memoryview
    #: This process's address of ``view``'s first byte (0: nothing mapped), for
    #: the raw iovecs of :mod:`shardfs.virtq.iovec`.  Valid while ``view`` is.
    host: int

    def __init__(self, gpa: int, size: int, user_addr: int, mmap_offset: int,
                 mapping: mmap.mmap | None = None, view: memoryview = _EMPTY_VIEW) -> None:
        self.gpa = gpa
        self.size = size
        self.user_addr = user_addr
        self.mmap_offset = mmap_offset
        self.mapping = mapping
        self.view = view
        self.host = address_of(view) if len(view) else 0

    @property
    def gpa_end(self) -> int:
        return self.gpa + self.size

    @property
    def user_end(self) -> int:
        return self.user_addr + self.size


#: Regions larger than this are refused: x86-64 user space is 47 bits.
MAX_REGION_BYTES = 1 << 47

#: Stands in for "no region hit yet": nothing fits in it.
_NO_REGION = Region(0, 0, 0, 0)


class GuestMemory:
    """The set of mapped regions, looked up by guest-physical address."""

    def __init__(self) -> None:
        self.regions: list[Region] = []
        #: The region the last translation hit: chains sit in one region almost
        #: always, so :meth:`views` tries it before scanning (reset on any change).
        self._hit = _NO_REGION

    def add(self, gpa: int, size: int, user_addr: int, mmap_offset: int, fd: int) -> Region:
        """Map one region.  The caller keeps ownership of ``fd`` (mmap dups it)."""
        if size == 0 or size > MAX_REGION_BYTES or mmap_offset > MAX_REGION_BYTES:
            raise GuestMemoryError(f"region size {size:#x} offset {mmap_offset:#x} out of range")
        if gpa + size > 1 << 64 or user_addr + size > 1 << 64:
            raise GuestMemoryError("region wraps the address space")
        for r in self.regions:
            if gpa < r.gpa_end and r.gpa < gpa + size:
                raise GuestMemoryError(f"region at gpa {gpa:#x} overlaps {r.gpa:#x}")
        try:
            mapping = mmap.mmap(fd, size + mmap_offset, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            raise GuestMemoryError(f"cannot map region at gpa {gpa:#x}: {e}") from e
        view = memoryview(mapping)[mmap_offset:mmap_offset + size]
        region = Region(gpa, size, user_addr, mmap_offset, mapping, view)
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        self._hit = _NO_REGION
        return region

    def remove(self, gpa: int, size: int) -> bool:
        """Drop the region that starts at ``gpa`` with ``size``; False if none."""
        for i, r in enumerate(self.regions):
            if r.gpa == gpa and r.size == size:
                del self.regions[i]
                self._hit = _NO_REGION
                _release(r)
                return True
        return False

    def clear(self) -> None:
        self._hit = _NO_REGION
        for r in self.regions:
            _release(r)
        self.regions = []

    @property
    def last_region(self) -> Region:
        """The region the last translation hit (an empty one after any change)."""
        return self._hit

    def _find(self, gpa: int) -> Region:
        for r in self.regions:
            if r.gpa <= gpa < r.gpa_end:
                return r
        raise GuestMemoryError(f"gpa {gpa:#x} is not in guest memory")

    def view(self, gpa: int, length: int) -> memoryview:
        """A view of ``length`` bytes at ``gpa`` that must lie in one region."""
        if length < 0:
            raise GuestMemoryError("negative length")
        r = self._hit
        start = gpa - r.gpa
        if 0 <= start < r.size and start + length <= r.size:
            return r.view[start:start + length]
        r = self._hit = self._find(gpa)
        start = gpa - r.gpa
        if start + length > r.size:
            raise GuestMemoryError(f"{length:#x} bytes at gpa {gpa:#x} cross the region end")
        return r.view[start:start + length]

    def views(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering ``length`` bytes at ``gpa``, split where regions meet."""
        r = self._hit
        start = gpa - r.gpa
        if start >= 0 and length > 0 and start + length <= r.size:
            return [r.view[start:start + length]]
        out = []
        while length > 0:
            r = self._find(gpa)
            self._hit = r
            start = gpa - r.gpa
            n = min(length, r.size - start)
            out.append(r.view[start:start + n])
            gpa += n
            length -= n
        return out

    def user_to_gpa(self, user_addr: int, length: int) -> int:
        """Translate a frontend virtual address (SET_VRING_ADDR) to a gpa."""
        for r in self.regions:
            if r.user_addr <= user_addr and user_addr + length <= r.user_end:
                return r.gpa + (user_addr - r.user_addr)
        raise GuestMemoryError(f"user address {user_addr:#x} is not in guest memory")


def _release(r: Region) -> None:
    """Drop our references; live views elsewhere keep the mapping until they go."""
    r.view.release()
    r.host = 0
    if r.mapping is not None:
        try:
            r.mapping.close()
        except BufferError:
            pass  # exported views remain; the mapping dies with the last one
        r.mapping = None
