"""Descriptor chains, read and written as byte streams.

A driver may split a FUSE request across descriptors at any byte, so the
request is never read in a fixed descriptor layout (alioth's weak spot):
:class:`ChainReader` and :class:`ChainWriter` present the device-readable and
device-writable parts as two streams.

Walking is bounded as the spec requires (virtio 1.2 §2.7.5.3):

* a chain visits at most ``queue size`` direct descriptors, and an indirect
  table at most its own length and never more than the 65536 entries a le16
  ``next`` can reach, so loops end quickly;
* an indirect table inside an indirect table is refused (§2.7.5.3.1: "The
  driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag within an indirect
  descriptor");
* INDIRECT together with NEXT is refused (same section);
* an indirect table's length must be a non-zero multiple of 16;
* a device-readable descriptor after a device-writable one is refused
  (§2.7.4.2: "The driver MUST place any device-writable descriptor elements
  after any device-readable descriptor elements");
* the total length is capped so a length sum cannot overflow a u32.
"""

from __future__ import annotations

import struct

from shardfs.abi.virtio import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    virtq_desc,
)
from shardfs.virtq.memory import GuestMemory, GuestMemoryError

#: Used-ring lengths are u32; a chain may not describe more than this.
MAX_CHAIN_BYTES = (1 << 32) - 1

#: Descriptors an indirect table walk may visit: every index a le16 ``next`` reaches.
MAX_INDIRECT_WALK = 1 << 16

_DESC_SIZE = virtq_desc.size
_unpack_desc = virtq_desc.unpack_from


class ChainError(Exception):
    """The descriptor chain breaks a rule of the spec; the request is dropped."""


class DescriptorChain:
    """One popped chain: its head index and its two sides as views."""

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview],
                 readable_len: int, writable_len: int) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len


def walk_chain(mem: GuestMemory, table: memoryview, num: int, head: int,
               indirect_ok: bool) -> DescriptorChain:
    """Resolve the chain that starts at ``head`` in the descriptor ``table``."""
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    rlen = wlen = 0
    idx = head
    ttl = num
    in_indirect = False
    while True:
        if ttl == 0:
            raise ChainError("descriptor chain is longer than the table (a loop)")
        ttl -= 1
        if idx >= num:
            raise ChainError(f"descriptor index {idx} out of range {num}")
        addr, length, flags, nxt = _unpack_desc(table, idx * _DESC_SIZE)
        if flags & VIRTQ_DESC_F_INDIRECT:
            if in_indirect:
                raise ChainError("indirect table inside an indirect table")
            if not indirect_ok:
                raise ChainError("INDIRECT descriptor but RING_INDIRECT_DESC not negotiated")
            if flags & VIRTQ_DESC_F_NEXT:
                raise ChainError("descriptor has both INDIRECT and NEXT")
            if length == 0 or length % _DESC_SIZE:
                raise ChainError(f"indirect table length {length} is not a multiple of 16")
            try:
                table = mem.view(addr, length)
            except GuestMemoryError as e:
                raise ChainError(str(e)) from e
            num = length // _DESC_SIZE
            # Fix (unit tests): ``next`` is a le16, so only the first 65536
            # entries are reachable and a longer walk must be a loop.  A ttl of
            # the table's length let one 4 GiB table loop for 2**28 steps, each
            # allocating a view: memory exhaustion from a single chain.
            ttl = min(num, MAX_INDIRECT_WALK)
            in_indirect = True
            idx = 0
            continue
        if length:
            try:
                parts = mem.views(addr, length)
            except GuestMemoryError as e:
                raise ChainError(str(e)) from e
            if flags & VIRTQ_DESC_F_WRITE:
                writable.extend(parts)
                wlen += length
            else:
                if writable:
                    raise ChainError("device-readable descriptor after a writable one")
                readable.extend(parts)
                rlen += length
            if rlen + wlen > MAX_CHAIN_BYTES:
                raise ChainError("chain length overflows u32")
        elif flags & VIRTQ_DESC_F_WRITE:
            pass
        if not flags & VIRTQ_DESC_F_NEXT:
            break
        idx = nxt
    return DescriptorChain(head, readable, writable, rlen, wlen)


class ShortRead(Exception):
    """The request ends before a field the opcode requires."""


class ChainReader:
    """A byte stream over the device-readable views of a chain."""

    __slots__ = ("_bufs", "_i", "_off", "remaining")

    def __init__(self, bufs: list[memoryview], length: int) -> None:
        self._bufs = bufs
        self._i = 0
        self._off = 0
        self.remaining = length

    def read_struct(self, st: struct.Struct) -> tuple:
        """Unpack ``st`` at the cursor; copies only when it straddles views."""
        n = st.size
        if n > self.remaining:
            raise ShortRead(f"need {n} bytes, {self.remaining} left")
        buf = self._bufs[self._i]
        if self._off + n <= len(buf):
            val = st.unpack_from(buf, self._off)
            self._advance(n)
            return val
        return st.unpack(self.read_bytes(n))

    def read_bytes(self, n: int) -> bytes:
        """Copy out ``n`` bytes (names and small payloads only)."""
        if n > self.remaining:
            raise ShortRead(f"need {n} bytes, {self.remaining} left")
        return b"".join(bytes(v) for v in self.take(n))

    def take(self, n: int) -> list[memoryview]:
        """Views of the next ``n`` bytes, without copying (WRITE payloads)."""
        if n > self.remaining:
            raise ShortRead(f"need {n} bytes, {self.remaining} left")
        out = []
        while n:
            buf = self._bufs[self._i]
            k = min(n, len(buf) - self._off)
            if k:
                out.append(buf[self._off:self._off + k])
            self._advance(k)
            n -= k
        return out

    def skip(self, n: int) -> None:
        self.take(n)

    def _advance(self, n: int) -> None:
        self._off += n
        self.remaining -= n
        while self._i < len(self._bufs) and self._off >= len(self._bufs[self._i]):
            self._off -= len(self._bufs[self._i])
            self._i += 1
            if self.remaining == 0:
                break


class ChainWriter:
    """A byte stream over the device-writable views of a chain."""

    __slots__ = ("_bufs", "capacity", "written")

    def __init__(self, bufs: list[memoryview], capacity: int) -> None:
        self._bufs = bufs
        self.capacity = capacity
        self.written = 0

    def views_at(self, offset: int, n: int) -> list[memoryview]:
        """Views of ``[offset, offset + n)`` of the writable side, clipped to capacity."""
        out = []
        n = min(n, self.capacity - offset)
        for buf in self._bufs:
            if n <= 0:
                break
            blen = len(buf)
            if offset >= blen:
                offset -= blen
                continue
            k = min(n, blen - offset)
            out.append(buf[offset:offset + k])
            offset = 0
            n -= k
        return out

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into the writable side at ``offset``; it must fit."""
        if offset + len(data) > self.capacity:
            raise ShortRead(f"reply of {offset + len(data)} bytes exceeds buffer {self.capacity}")
        pos = 0
        for v in self.views_at(offset, len(data)):
            v[:] = data[pos:pos + len(v)]
            pos += len(v)
        self.written = max(self.written, offset + len(data))
