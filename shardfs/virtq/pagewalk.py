"""The walk of a long indirect table in the shape Linux writes, in whole-table steps.

A 1 MiB FUSE READ or WRITE from Linux's virtio-fs driver is one INDIRECT
descriptor whose table has a descriptor per 4 KiB page: about 260 entries,
listed in order (entry ``i`` continues at ``i + 1``), readable ones first.
Walking such a table descriptor by descriptor in Python costs about 0.3 µs
an entry, some 80 µs a request, a large share of what the request costs
beyond the copy itself.  But a guest's pages are mostly adjacent (in a TCG
guest running fio, a table's 260 entries made 6 to 18 runs), and what the
device needs is one view per run, not per entry.

So this walk reads the table's addresses as one integer and its lengths as
another, 64 bits per entry, and finds where runs break with whole-integer
arithmetic: ``(addr + len) XOR next addr`` is zero, entry by entry, exactly
where the next entry continues this one.  The Python work is then one step
per run, not per entry.  The shape checks (flags in order, ``next`` in
order, NEXT on every entry but the last) are comparisons of byte strings.

The contract is :func:`walk_pages`'s: the chain
:func:`shardfs.virtq.chain.walk_chain` would give, or None for anything
else, before anything is built, and the general walk decides then (by every
rule of the spec).  ``tests/unit/virtq/test_pagewalk.py`` runs both on
seeded tables, well formed and broken, and compares them.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from itertools import compress
from typing import TypeVar

from shardfs.abi.virtio import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, virtq_desc

#: Bytes of one descriptor (struct virtq_desc: le64 addr, le32 len, le16 flags, le16 next).
DESC = virtq_desc.size
_NEXT = VIRTQ_DESC_F_NEXT
#: The low flags byte of a readable entry but the last, of a writable one, of a writable last.
_READ_NEXT, _WRITE_NEXT, _WRITE_LAST = (bytes([_NEXT]), bytes([_NEXT | VIRTQ_DESC_F_WRITE]),
                                        bytes([VIRTQ_DESC_F_WRITE]))
#: The table is read through a native "Q" view; virtio's fields are little-endian.
_NATIVE_LE = sys.byteorder == "little"
#: Two adjacent entries' addr and len, then the second's addr.
_MIDDLE_PAIR = struct.Struct("<QI4xQ")


class TableMasks:
    """Constants for tables of ``num`` entries (built once per length, then cached)."""

    __slots__ = ("top", "low32", "low16", "low8", "next_lo", "next_hi", "width", "entries")

    def __init__(self, num: int) -> None:
        def per_slot(value: int) -> int:  # ``value`` in each 64-bit slot
            return int.from_bytes(value.to_bytes(8, "little") * num, "little")

        self.width = 8 * num
        self.top = per_slot(1 << 63)
        self.low32 = per_slot((1 << 32) - 1)
        self.low16 = per_slot((1 << 16) - 1)
        self.low8 = per_slot(0xFF)
        self.next_lo = bytes(i & 0xFF for i in range(1, num))
        self.next_hi = bytes(i >> 8 for i in range(1, num))
        self.entries = range(num)


M = TypeVar("M")

#: Masks by table length.  Linux sends a few lengths; a guest cycling through
#: all 1,009 would make this hold about 16 MB, so it is emptied when full.
_MASKS: dict[int, TableMasks] = {}
_MAX_CACHED = 16


def per_length(cache: dict[int, M], num: int, make: Callable[[int], M],
               limit: int = _MAX_CACHED) -> M:
    """``cache[num]``, made by ``make(num)`` if missing; the cache is emptied
    when it holds ``limit`` lengths, so a guest cannot make it grow."""
    m = cache.get(num)
    if m is None:
        if len(cache) >= limit:
            cache.clear()
        m = cache[num] = make(num)
    return m


def table_masks(num: int) -> TableMasks:
    """The constants for ``num``-entry tables (from a cache of bounded size)."""
    return per_length(_MASKS, num, TableMasks)


def linux_shape(raw: bytes, num: int, m: TableMasks) -> int | None:
    """How many of the ``num`` entries in ``raw`` are readable, if the table has
    Linux's shape (see :func:`walk_pages`) as far as flags and ``next`` go; else None.

    A table whose every entry is readable passes too: the caller decides.
    """
    flags = raw[12::DESC]
    r = flags.count(_NEXT)  # the readable entries with NEXT
    if flags[-1] == 0:  # a readable end: every entry is readable
        if r != num - 1:
            return None
        r = num
    elif flags != _READ_NEXT * r + _WRITE_NEXT * (num - 1 - r) + _WRITE_LAST:
        return None
    if (raw[13::DESC].count(0) != num or raw[14:-DESC:DESC] != m.next_lo
            or raw[15:-DESC:DESC] != m.next_hi):
        return None
    return r


def walk_pages(view: memoryview, gpa: int, size: int, start: int,
               num: int) -> tuple[list[memoryview], list[memoryview], int, int] | None:
    """``(readable, writable, readable_len, writable_len)`` of a Linux-shaped table, or None.

    The table is ``num`` (at least 3) descriptors at ``view[start:]``; every
    buffer must lie in ``view``, which maps ``size`` bytes of guest memory
    from ``gpa``.  Linux's shape: entry ``i``'s ``next`` is ``i + 1`` and
    every entry but the last has NEXT and no other flag beside WRITE; the
    readable entries come first; no run of adjacent buffers is empty (a
    zero-length entry inside a run changes nothing, as in the general walk).
    Anything else, or a buffer outside ``view``, gives None.  So does a table
    whose pages look scattered (the two entries at its middle are not
    adjacent): then there is a run per entry, and the entry-by-entry walk
    costs less.  The caller checks the total against the u32 limit.
    """
    # The entry before the middle one: its address and length, then the middle's address.
    addr, length, following = _MIDDLE_PAIR.unpack_from(view, start + DESC * (num // 2 - 1))
    if addr + length != following or not _NATIVE_LE:
        return None
    table = view[start:start + DESC * num]
    q = table.cast("Q")  # entry i: q[2i] is its address, q[2i + 1] its len | flags | next
    m = table_masks(num)
    r = linux_shape(table.tobytes(), num, m)
    if r is None:
        return None
    addrs = int.from_bytes(q[0::2].tobytes(), "little")  # 64 bits an entry
    if addrs & m.top:
        return None  # addr + len could pass 2**64 and carry into the next entry
    lens = int.from_bytes(q[1::2].tobytes(), "little") & m.low32
    # Per entry: where it ends, XOR where the next one starts.  Zero where
    # the next continues it; the last entry's slot is past the table's end.
    z = (addrs + lens) ^ (addrs >> 64)
    z = (z | z >> 32) & m.low32
    z = (z | z >> 16) & m.low16
    z = (z | z >> 8) & m.low8
    ends = bytearray(z.to_bytes(m.width, "little")[::8])
    if 0 < r < num:
        ends[r - 1] = 1  # the readable side ends here, adjacent or not
    ends[-1] = 1
    readable: list[memoryview] = []
    writable: list[memoryview] = []
    rlen = wlen = 0
    first = 0
    for last in compress(m.entries, ends):
        lo = q[2 * first] - gpa
        hi = q[2 * last] - gpa + (q[2 * last + 1] & 0xFFFFFFFF)
        if lo < 0 or hi > size or lo == hi:
            return None  # outside this region, or an empty run (Linux sends none)
        if first < r:
            readable.append(view[lo:hi])
            rlen += hi - lo
        else:
            writable.append(view[lo:hi])
            wlen += hi - lo
        first = last + 1
    return readable, writable, rlen, wlen
