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
* the total length is capped so a length sum cannot overflow a u32 (checked
  once the walk ends: every length is a u32 and the walk is bounded).

Descriptors that continue the previous one on the same side (the next byte
of guest memory, in the same region) are merged into one view: one iovec
for ``preadv``/``pwritev`` and one view less to slice and walk.  Linux lays
a request's arguments and reply apart, but a guest's pages are often
contiguous (huge pages, a fresh buffer), and other drivers lay requests out
in one buffer cut in pieces.  Streams never depend on where views split.
"""

from __future__ import annotations

import struct
from typing import Any

from shardfs.abi.virtio import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    virtq_desc,
)
from shardfs.virtq.iovec import IovecTail, walk_iovecs
from shardfs.virtq.memory import GuestMemory, GuestMemoryError
from shardfs.virtq.pagewalk import walk_pages

#: Used-ring lengths are u32; a chain may not describe more than this.
MAX_CHAIN_BYTES = (1 << 32) - 1

#: Descriptors an indirect table walk may visit: every index a le16 ``next`` reaches.
MAX_INDIRECT_WALK = 1 << 16

_DESC_SIZE = virtq_desc.size
_unpack_desc = virtq_desc.unpack_from
_iter_desc = virtq_desc.iter_unpack

#: Indirect tables of this many entries are unpacked at once and walked by
#: _walk_unpacked (a 1 MiB request of 4 KiB pages needs 260); shorter ones cost
#: less entry by entry (measured), longer ones would cost memory.
MIN_UNPACKED_TABLE, MAX_UNPACKED_TABLE = 16, 1024


class ChainError(Exception):
    """The descriptor chain breaks a rule of the spec; the request is dropped."""


class DescriptorChain:
    """One popped chain: its head index and its two sides as views.

    With a ``tail`` (:mod:`shardfs.virtq.iovec`), one side's views are only
    its first ones and the tail continues that side; the lengths count it.
    Only READ's and WRITE's fast paths use a tail as it is: anything else
    calls :meth:`materialize` before it looks at the views.
    """

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len", "tail")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview],
                 readable_len: int, writable_len: int, tail: IovecTail | None = None) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len
        self.tail = tail

    def materialize(self) -> None:
        """Turn the tail, if any, into views at the end of its side: the views
        the general walk gives (a view the tail continues is merged with it)."""
        tail = self.tail
        if tail is not None:
            self.tail = None
            keep = -1 if tail.join >= 0 else None  # the view the first tail view covers
            if tail.writable:
                self.writable = self.writable[:keep] + tail.views()
            else:
                self.readable = self.readable[:keep] + tail.views()


def walk_chain(mem: GuestMemory, table: memoryview, num: int, head: int,
               indirect_ok: bool) -> DescriptorChain:
    """Resolve the chain that starts at ``head`` in the descriptor ``table``."""
    if head < num and indirect_ok:
        # Linux's shape first (see _walk_small and pagewalk); None: the walk
        # below decides.
        addr, length, flags, _ = _unpack_desc(table, head * _DESC_SIZE)
        if flags == VIRTQ_DESC_F_INDIRECT and 0 < length <= _PAGE_TABLE_BYTES \
                and not length % _DESC_SIZE:
            hit = mem._hit
            start = addr - hit.gpa
            if 0 <= start and start + length <= hit.size:
                if length < _SMALL_TABLE_BYTES:
                    chain = None
                    if length == _FOUR_BYTES:
                        chain = _walk_four(hit.view, hit.gpa, hit.size, start, head)
                    elif length == _FIVE_BYTES:
                        chain = _walk_five(hit.view, hit.gpa, hit.size, start, head)
                    if chain is None:
                        chain = _walk_small(hit.view, hit.gpa, hit.size, start,
                                            length // _DESC_SIZE, head)
                    if chain is not None:
                        return chain
                else:
                    sides = walk_pages(hit.view, hit.gpa, hit.size, start, length // _DESC_SIZE)
                    if sides is not None and sides[2] + sides[3] <= MAX_CHAIN_BYTES:
                        return DescriptorChain(head, *sides)
                    if sides is None:  # scattered pages: raw iovecs (see iovec)
                        tailed = walk_iovecs(hit.view, hit.gpa, hit.size, hit.host, start,
                                             length // _DESC_SIZE)
                        if tailed is not None and tailed[2] + tailed[3] <= MAX_CHAIN_BYTES:
                            return DescriptorChain(head, *tailed)
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    rlen = wlen = 0
    idx = head
    ttl = num
    in_indirect = False
    views = mem.views
    hit = mem._hit  # mem.last_region, without the property call
    hit_gpa, hit_size, hit_view = hit.gpa, hit.size, hit.view
    # The last readable and writable segments, [start, end) in hit_view, still
    # open to a descriptor that continues them (end -1: none).
    rstart = rend = wstart = wend = -1
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
            start = addr - hit_gpa
            if 0 <= start and start + length <= hit_size:
                table = hit_view[start:start + length]  # mem.view's fast path, inlined
            else:
                try:
                    table = mem.view(addr, length)
                except GuestMemoryError as e:
                    raise ChainError(str(e)) from e
                hit = mem._hit
                hit_gpa, hit_size, hit_view = hit.gpa, hit.size, hit.view
            num = length // _DESC_SIZE
            # Fix (unit tests): ``next`` is a le16, so only the first 65536
            # entries are reachable and a longer walk must be a loop.  A ttl of
            # the table's length let one 4 GiB table loop for 2**28 steps, each
            # allocating a view: memory exhaustion from a single chain.
            ttl = min(num, MAX_INDIRECT_WALK)
            in_indirect = True
            idx = 0
            if MIN_UNPACKED_TABLE <= num <= MAX_UNPACKED_TABLE:
                # Unpack the whole table in one C loop and walk it in a tight
                # one: a guest's 1 MiB request has a descriptor per page.
                if rend >= 0:
                    readable.append(hit_view[rstart:rend])
                if wend >= 0:
                    writable.append(hit_view[wstart:wend])
                rend = wend = -1
                rlen, wlen = _walk_unpacked(mem, list(_iter_desc(table)), readable, writable,
                                            rlen, wlen)
                break
            continue
        if length:
            start = addr - hit_gpa
            end = start + length
            if 0 <= start and end <= hit_size:
                # Inside the region the last translation hit (GuestMemory.views's
                # fast path, inlined: most chains never leave one region).  A
                # descriptor that continues the last one on its side extends it:
                # one view (one iovec) for adjacent buffers.
                if flags & VIRTQ_DESC_F_WRITE:
                    if start == wend:
                        wend = end
                    else:
                        if wend >= 0:
                            writable.append(hit_view[wstart:wend])
                        wstart, wend = start, end
                    wlen += length
                elif wlen:
                    raise ChainError("device-readable descriptor after a writable one")
                elif start == rend:
                    rend = end
                    rlen += length
                else:
                    if rend >= 0:
                        readable.append(hit_view[rstart:rend])
                    rstart, rend = start, end
                    rlen += length
            else:
                try:
                    parts = views(addr, length)
                except GuestMemoryError as e:
                    raise ChainError(str(e)) from e
                if rend >= 0:  # the open segments belong to the old region's view
                    readable.append(hit_view[rstart:rend])
                if wend >= 0:
                    writable.append(hit_view[wstart:wend])
                rend = wend = -1
                hit = mem._hit
                hit_gpa, hit_size, hit_view = hit.gpa, hit.size, hit.view
                if flags & VIRTQ_DESC_F_WRITE:
                    writable += parts
                    wlen += length
                elif wlen:
                    raise ChainError("device-readable descriptor after a writable one")
                else:
                    readable += parts
                    rlen += length
        if not flags & VIRTQ_DESC_F_NEXT:
            break
        idx = nxt
    if rend >= 0:
        readable.append(hit_view[rstart:rend])
    if wend >= 0:
        writable.append(hit_view[wstart:wend])
    # Each length is a u32 and the walk is bounded, so the sum is checked once.
    if rlen + wlen > MAX_CHAIN_BYTES:
        raise ChainError("chain length overflows u32")
    return DescriptorChain(head, readable, writable, rlen, wlen)


#: Indirect tables shorter than MIN_UNPACKED_TABLE entries: one Struct per
#: length, to unpack a whole table in one call.
_SMALL_TABLES = [struct.Struct("<" + "QIHH" * n) for n in range(MIN_UNPACKED_TABLE)]
_SMALL_TABLE_BYTES = _DESC_SIZE * MIN_UNPACKED_TABLE
#: Longer ones, up to MAX_UNPACKED_TABLE entries, try pagewalk.walk_pages.
_PAGE_TABLE_BYTES = _DESC_SIZE * MAX_UNPACKED_TABLE
_NEXT, _WRITE, _INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


def _walk_small(view: memoryview, gpa: int, size: int, start: int, num: int,
                head: int) -> DescriptorChain | None:
    """The chain of a short indirect table in the shape Linux writes, or None.

    Every request Linux's virtio-fs driver sends is one INDIRECT descriptor
    whose table lists the buffers in order (entry ``i`` continues at
    ``i + 1``), all in one region of guest memory: ``view``, ``size`` bytes
    from ``gpa``.  The table is unpacked in one call and walked with no
    bookkeeping for other shapes.  Anything else (an entry out of order,
    zero-length, outside the region, nested INDIRECT, readable after
    writable, a length sum past u32, NEXT on the last entry) returns None
    before anything is built, and :func:`walk_chain` walks the table again
    by every rule: so this gives exactly the chain walk_chain would, or
    nothing (tests/unit/virtq/test_chain_small.py compares the two).
    """
    it = iter(_SMALL_TABLES[num].unpack_from(view, start))
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    rlen = wlen = 0
    rstart = rend = wstart = wend = -1  # the open segments (see walk_chain)
    idx = 0
    for addr, length, flags, nxt in zip(it, it, it, it, strict=True):
        start = addr - gpa
        end = start + length
        if not length or flags & _INDIRECT or start < 0 or end > size:
            return None
        if flags & _WRITE:
            if start != wend:
                if wend >= 0:
                    writable.append(view[wstart:wend])
                wstart = start
            wend = end
            wlen += length
        elif wlen:
            return None
        else:
            if start != rend:
                if rend >= 0:
                    readable.append(view[rstart:rend])
                rstart = start
            rend = end
            rlen += length
        if not flags & _NEXT:
            break
        idx += 1
        if nxt != idx:
            return None
    else:
        return None  # NEXT on the last entry
    if rend >= 0:
        readable.append(view[rstart:rend])
    if wend >= 0:
        writable.append(view[wstart:wend])
    if rlen + wlen > MAX_CHAIN_BYTES:
        return None
    return DescriptorChain(head, readable, writable, rlen, wlen)


#: Four entries, two readable then two writable: GETATTR, LOOKUP, a page's
#: READ, most of what a guest sends (header and arguments, reply header and reply).
_FOUR = struct.Struct("<" + "QIHH" * 4)
_FOUR_BYTES = _FOUR.size
_READ_NEXT, _WRITE_NEXT = _NEXT, _NEXT | _WRITE


def _walk_four(view: memoryview, gpa: int, size: int, start: int,
               head: int) -> DescriptorChain | None:
    """:func:`_walk_small` for a four-entry table of two readable and two
    writable entries, with no loop: the same chain, or None for anything
    else (then _walk_small, and the general walk, decide)."""
    (a0, l0, f0, n0, a1, l1, f1, n1, a2, l2, f2, n2, a3, l3, f3,
     _) = _FOUR.unpack_from(view, start)
    if (f0 != _READ_NEXT or f1 != _READ_NEXT or f2 != _WRITE_NEXT or f3 != _WRITE
            or n0 != 1 or n1 != 2 or n2 != 3 or not (l0 and l1 and l2 and l3)):
        return None
    s0, s1, s2, s3 = a0 - gpa, a1 - gpa, a2 - gpa, a3 - gpa
    e0, e1, e2, e3 = s0 + l0, s1 + l1, s2 + l2, s3 + l3
    if (s0 < 0 or s1 < 0 or s2 < 0 or s3 < 0 or e0 > size or e1 > size or e2 > size
            or e3 > size):
        return None
    rlen, wlen = l0 + l1, l2 + l3
    if rlen + wlen > MAX_CHAIN_BYTES:
        return None
    return DescriptorChain(
        head, [view[s0:e1]] if e0 == s1 else [view[s0:e0], view[s1:e1]],
        [view[s2:e3]] if e2 == s3 else [view[s2:e2], view[s3:e3]], rlen, wlen)


#: Five entries, three readable then two writable: a WRITE (header, arguments,
#: data; reply header, reply).
_FIVE = struct.Struct("<" + "QIHH" * 5)
_FIVE_BYTES = _FIVE.size


def _walk_five(view: memoryview, gpa: int, size: int, start: int,
               head: int) -> DescriptorChain | None:
    """:func:`_walk_four` for a WRITE's five entries: three readable, two writable."""
    (a0, l0, f0, n0, a1, l1, f1, n1, a2, l2, f2, n2, a3, l3, f3, n3, a4, l4, f4,
     _) = _FIVE.unpack_from(view, start)
    if (f0 != _READ_NEXT or f1 != _READ_NEXT or f2 != _READ_NEXT or f3 != _WRITE_NEXT
            or f4 != _WRITE or n0 != 1 or n1 != 2 or n2 != 3 or n3 != 4
            or not (l0 and l1 and l2 and l3 and l4)):
        return None
    s0, s1, s2, s3, s4 = a0 - gpa, a1 - gpa, a2 - gpa, a3 - gpa, a4 - gpa
    e0, e1, e2, e3, e4 = s0 + l0, s1 + l1, s2 + l2, s3 + l3, s4 + l4
    if (s0 < 0 or s1 < 0 or s2 < 0 or s3 < 0 or s4 < 0 or e0 > size or e1 > size
            or e2 > size or e3 > size or e4 > size):
        return None
    rlen, wlen = l0 + l1 + l2, l3 + l4
    if rlen + wlen > MAX_CHAIN_BYTES:
        return None
    if e0 == s1:
        readable = [view[s0:e2]] if e1 == s2 else [view[s0:e1], view[s2:e2]]
    else:
        readable = [view[s0:e0], view[s1:e2]] if e1 == s2 else [view[s0:e0], view[s1:e1],
                                                                 view[s2:e2]]
    return DescriptorChain(head, readable,
                           [view[s3:e4]] if e3 == s4 else [view[s3:e3], view[s4:e4]],
                           rlen, wlen)


def _walk_unpacked(mem: GuestMemory, descs: list[tuple[int, int, int, int]],
                   readable: list[memoryview], writable: list[memoryview], rlen: int,
                   wlen: int) -> tuple[int, int]:
    """The walk of :func:`walk_chain` inside an indirect table already unpacked
    (at most MAX_UNPACKED_TABLE entries): the same rules, and the same merging
    of adjacent descriptors, in a tighter loop."""
    num = len(descs)
    hit = mem._hit
    hit_gpa, hit_size, hit_view = hit.gpa, hit.size, hit.view
    rstart = rend = wstart = wend = -1  # the open segments (see walk_chain)
    idx = 0
    for _ in range(num):  # the ttl: a longer walk is a loop
        if idx >= num:
            raise ChainError(f"descriptor index {idx} out of range {num}")
        addr, length, flags, nxt = descs[idx]
        if flags & VIRTQ_DESC_F_INDIRECT:
            raise ChainError("indirect table inside an indirect table")
        if length:
            start = addr - hit_gpa
            end = start + length
            if 0 <= start and end <= hit_size:
                if flags & VIRTQ_DESC_F_WRITE:
                    if start == wend:
                        wend = end
                    else:
                        if wend >= 0:
                            writable.append(hit_view[wstart:wend])
                        wstart, wend = start, end
                    wlen += length
                elif wlen:
                    raise ChainError("device-readable descriptor after a writable one")
                elif start == rend:
                    rend = end
                    rlen += length
                else:
                    if rend >= 0:
                        readable.append(hit_view[rstart:rend])
                    rstart, rend = start, end
                    rlen += length
            else:
                try:
                    parts = mem.views(addr, length)
                except GuestMemoryError as e:
                    raise ChainError(str(e)) from e
                if rend >= 0:
                    readable.append(hit_view[rstart:rend])
                if wend >= 0:
                    writable.append(hit_view[wstart:wend])
                rend = wend = -1
                hit = mem._hit
                hit_gpa, hit_size, hit_view = hit.gpa, hit.size, hit.view
                if flags & VIRTQ_DESC_F_WRITE:
                    writable += parts
                    wlen += length
                elif wlen:
                    raise ChainError("device-readable descriptor after a writable one")
                else:
                    readable += parts
                    rlen += length
        if not flags & VIRTQ_DESC_F_NEXT:
            if rend >= 0:
                readable.append(hit_view[rstart:rend])
            if wend >= 0:
                writable.append(hit_view[wstart:wend])
            return rlen, wlen
        idx = nxt
    raise ChainError("descriptor chain is longer than the table (a loop)")


class ShortRead(Exception):
    """The request ends before a field the opcode requires."""


class ChainReader:
    """A byte stream over the device-readable views of a chain."""

    __slots__ = ("_bufs", "_i", "_off", "remaining")

    def __init__(self, bufs: list[memoryview], length: int, index: int = 0,
                 offset: int = 0) -> None:
        """A stream of ``length`` bytes starting ``offset`` bytes into ``bufs[index]``.

        ``offset`` must lie inside that view (the caller consumed what is before).
        """
        self._bufs = bufs
        self._i = index
        self._off = offset
        self.remaining = length

    def read_struct(self, st: struct.Struct) -> tuple:
        """Unpack ``st`` at the cursor; copies only when it straddles views."""
        n = st.size
        if n > self.remaining:
            raise ShortRead(f"need {n} bytes, {self.remaining} left")
        buf = self._bufs[self._i]
        off = self._off
        end = off + n
        if end < len(buf):  # inside this view: no bookkeeping beyond the cursor
            self._off = end
            self.remaining -= n
            return st.unpack_from(buf, off)
        if end == len(buf):  # ends this view exactly: the next read starts the next one
            self._i += 1
            self._off = 0
            self.remaining -= n
            return st.unpack_from(buf, off)
        return st.unpack(self.read_bytes(n))

    def read_bytes(self, n: int) -> bytes:
        """Copy out ``n`` bytes (names and small payloads only)."""
        if n > self.remaining:
            raise ShortRead(f"need {n} bytes, {self.remaining} left")
        if n:
            buf = self._bufs[self._i]
            off = self._off
            end = off + n
            if end < len(buf):  # inside this view (names usually are)
                self._off = end
                self.remaining -= n
                return bytes(buf[off:end])
        return b"".join([bytes(v) for v in self.take(n)])

    def take(self, n: int) -> list[memoryview]:
        """Views of the next ``n`` bytes, without copying (WRITE payloads)."""
        if n > self.remaining:
            raise ShortRead(f"need {n} bytes, {self.remaining} left")
        self.remaining -= n
        out = []
        bufs, i, off = self._bufs, self._i, self._off
        while n:
            buf = bufs[i]
            k = len(buf) - off
            if k <= n:  # the rest of this view (the whole of it: no new view)
                out.append(buf[off:] if off else buf)
                n -= k
                i += 1
                off = 0
            else:
                out.append(buf[off:off + n])
                off += n
                n = 0
        self._i, self._off = i, off
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
        n = min(n, self.capacity - offset)
        bufs = self._bufs
        if bufs and offset == len(bufs[0]) and n == self.capacity - offset:
            return bufs[1:]  # all after the first view: a READ's data after its out header
        out = []
        for buf in bufs:
            if n <= 0:
                break
            blen = len(buf)
            if offset >= blen:
                offset -= blen
                continue
            if offset == 0 and n >= blen:  # the whole view: no new one
                out.append(buf)
                n -= blen
                continue
            k = min(n, blen - offset)
            out.append(buf[offset:offset + k])
            offset = 0
            n -= k
        return out

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into the writable side at ``offset``; it must fit."""
        end = offset + len(data)
        if end > self.capacity:
            raise ShortRead(f"reply of {end} bytes exceeds buffer {self.capacity}")
        bufs = self._bufs
        first = len(bufs[0]) if bufs else 0
        if first and end <= first:  # fast paths: within the first view, or within the second
            bufs[0][offset:end] = data
        elif len(bufs) > 1 and offset >= first and end - first <= len(bufs[1]):
            bufs[1][offset - first:end - first] = data
        else:
            pos = 0
            for v in self.views_at(offset, len(data)):
                v[:] = data[pos:pos + len(v)]
                pos += len(v)
        if end > self.written:
            self.written = end

    def span(self, offset: int, n: int) -> tuple[memoryview, int] | None:
        """``(view, position)`` where ``[offset, offset + n)`` lies in one view (the
        first or the second), for packing in place; None if it is split or does
        not fit.  A span handed out counts as written."""
        bufs = self._bufs
        end = offset + n
        if bufs:
            first = len(bufs[0])
            if end <= first:
                if end > self.written:
                    self.written = end
                return bufs[0], offset
            if len(bufs) > 1 and offset >= first and end - first <= len(bufs[1]):
                if end > self.written:
                    self.written = end
                return bufs[1], offset - first
        return None

    def pack_at(self, st: struct.Struct, offset: int, *values: Any) -> None:
        """``write_at(offset, st.pack(*values))``, packed in place when one view holds it."""
        end = offset + st.size
        bufs = self._bufs
        if bufs and end <= len(bufs[0]):
            st.pack_into(bufs[0], offset, *values)
        elif (len(bufs) > 1 and offset >= len(bufs[0])
              and end - len(bufs[0]) <= len(bufs[1])):
            st.pack_into(bufs[1], offset - len(bufs[0]), *values)
        else:
            self.write_at(offset, st.pack(*values))
            return
        if end > self.written:
            self.written = end
