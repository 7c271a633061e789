"""The guest side of split virtqueues, in plain memory (a test double).

:class:`GuestRam` is a memfd, as QEMU's ``memory-backend-memfd,share=on``,
with a bump allocator.  :class:`DriverQueue` lays out a descriptor table and
the two rings in it and plays the driver's part of virtio 1.2 §2.7.13:
write descriptors, publish the head in the avail ring, bump ``avail.idx``,
then collect used elements.  It can split buffers at any byte, chain through
indirect tables, and build deliberately broken chains for tests.
"""

from __future__ import annotations

import mmap
import os
import struct

from shardfs.abi.virtio import (
    VIRTQ_AVAIL_IDX,
    VIRTQ_AVAIL_RING,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_IDX,
    VIRTQ_USED_RING,
    avail_ring_size,
    used_ring_size,
    virtq_desc,
    virtq_used_elem,
)

_u16 = struct.Struct("<H")


class GuestRam:
    """A memfd of ``size`` bytes at guest-physical ``base``; owns the fd."""

    def __init__(self, size: int, base: int = 0) -> None:
        self.size = size
        self.base = base
        self.fd = os.memfd_create("shardfs-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        self.view = memoryview(self.map)
        self._next = 0

    def alloc(self, n: int, align: int = 16) -> int:
        """Reserve ``n`` bytes; return their gpa."""
        start = (self._next + align - 1) & ~(align - 1)
        if start + n > self.size:
            raise MemoryError("guest RAM exhausted")
        self._next = start + n
        return self.base + start

    def reset_alloc(self, mark: int) -> None:
        self._next = mark

    @property
    def mark(self) -> int:
        return self._next

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - self.base
        self.view[off:off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        off = gpa - self.base
        return bytes(self.view[off:off + n])

    def close(self) -> None:
        self.view.release()
        self.map.close()
        os.close(self.fd)


class DriverQueue:
    """A split ring laid out in :class:`GuestRam`."""

    def __init__(self, ram: GuestRam, num: int) -> None:
        self.ram = ram
        self.num = num
        self.desc = ram.alloc(virtq_desc.size * num, 16)
        self.avail = ram.alloc(avail_ring_size(num), 2)
        self.used = ram.alloc(used_ring_size(num), 4)
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(num))

    def _desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.ram.write(self.desc + i * virtq_desc.size, virtq_desc.pack(addr, length, flags, nxt))

    def add(self, readable: list[tuple[int, int]], writable: list[tuple[int, int]],
            indirect: bool = False) -> int:
        """Publish a chain of (gpa, len) buffers; return its head index."""
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE)
                                                   for a, n in writable]
        if indirect:
            table = self.ram.alloc(virtq_desc.size * len(bufs), 16)
            for i, (a, n, f) in enumerate(bufs):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
                self.ram.write(table + i * virtq_desc.size,
                               virtq_desc.pack(a, n, f | more, i + 1))
            head = self.free.pop(0)
            self._desc(head, table, virtq_desc.size * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
        else:
            if len(bufs) > len(self.free):
                raise RuntimeError("ring full")
            ids = [self.free.pop(0) for _ in bufs]
            for k, (a, n, f) in enumerate(bufs):
                more = VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0
                self._desc(ids[k], a, n, f | more, ids[k + 1] if more else 0)
            head = ids[0]
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        """Put ``head`` in the avail ring and advance avail.idx.

        Like Linux's driver, it also sets ``used_event`` to the next used
        index it has not seen, asking for a call when anything completes.
        """
        self.set_used_event(self.last_used)
        slot = self.avail + VIRTQ_AVAIL_RING + 2 * (self.avail_idx % self.num)
        self.ram.write(slot, _u16.pack(head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write(self.avail + VIRTQ_AVAIL_IDX, _u16.pack(self.avail_idx))

    def raw_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        """Write any descriptor, valid or not (for hostile-driver tests)."""
        self._desc(i, addr, length, flags, nxt)

    def used_idx(self) -> int:
        return _u16.unpack(self.ram.read(self.used + VIRTQ_USED_IDX, 2))[0]

    def pop_used(self) -> list[tuple[int, int]]:
        """Collect (head, len) used elements and return their descriptors to the free list."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.used + VIRTQ_USED_RING + virtq_used_elem.size * (self.last_used % self.num)
            head, length = virtq_used_elem.unpack(self.ram.read(slot, virtq_used_elem.size))
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
            self._free_chain(head)
        return out

    def pop_used_raw(self) -> list[tuple[int, int]]:
        """Like :meth:`pop_used`, but the descriptors stay allocated (pre-built chains)."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.used + VIRTQ_USED_RING + virtq_used_elem.size * (self.last_used % self.num)
            out.append(virtq_used_elem.unpack(self.ram.read(slot, virtq_used_elem.size)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def _free_chain(self, head: int) -> None:
        i = head
        for _ in range(self.num):
            if i >= self.num:
                return
            a, n, f, nxt = virtq_desc.unpack(self.ram.read(self.desc + i * virtq_desc.size,
                                                           virtq_desc.size))
            if i not in self.free:
                self.free.append(i)
            if not f & VIRTQ_DESC_F_NEXT:
                return
            i = nxt

    def set_used_event(self, value: int) -> None:
        self.ram.write(self.avail + VIRTQ_AVAIL_RING + 2 * self.num, _u16.pack(value))

    def avail_event(self) -> int:
        off = self.used + VIRTQ_USED_RING + virtq_used_elem.size * self.num
        return _u16.unpack(self.ram.read(off, 2))[0]
