"""A long indirect table with scattered pages, walked into raw ``struct iovec``s.

A 1 MiB READ or WRITE from Linux is one INDIRECT descriptor whose table
lists about 260 buffers, one per page, in order.  When the pages come in
runs, :mod:`shardfs.virtq.pagewalk` makes a view per run.  When they do not
(memory a long-running guest has fragmented; the frontend bench's worst
case), that is a view per page: slicing and walking 260 views took 74 µs a
request here, more than the copy itself, and ``os.preadv`` then took a
buffer from each.  This walk takes 21 µs, and the kernel gets the array.

What the kernel needs is an array of ``struct iovec``, and a descriptor
has the same shape: a 64-bit address, then a length.  So the table is read
as one integer of 128-bit slots, the flags and ``next`` fields are masked
off, and the offset from guest-physical to this process's address is added
to every slot in one addition: the result's bytes are the iovec array, for
``preadv``/``pwritev`` through ctypes (``FileSystem.read_iov``).  The checks
are whole-table arithmetic too (pagewalk's shape checks, then: every
address inside the region, every length non-zero), on one private copy of
the table, so a guest rewriting it meanwhile changes nothing.

Only the long side's pages after its first entries become iovecs (the
:class:`IovecTail`): the entries a request's header, arguments and reply
header sit in stay views, so the dispatcher reads and answers them as
always.  For a READ the tail is the writable side after the reply header;
for a WRITE, the readable side after the header and the arguments.
Whoever needs the tail as views (the general path, the dirty log) calls
:meth:`shardfs.virtq.chain.DescriptorChain.materialize`.

Contract of :func:`walk_iovecs`: the same guest bytes, in the same order,
as the general walk gives, or None before anything is built, and the
general walk decides (tests/unit/virtq/test_iovec.py compares the two).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterable

from shardfs.virtq.pagewalk import DESC, linux_shape, per_length, table_masks

#: ``struct iovec`` on x86-64 and every other LP64 little-endian target:
#: ``void *iov_base; size_t iov_len``, the shape of a descriptor's first 12 bytes.
_IOVEC = struct.Struct("<QQ")
_ENTRY = struct.Struct("<QI")
_LITTLE_LP64 = sys.byteorder == "little" and struct.calcsize("P") == 8 == _IOVEC.size // 2
#: Guest addresses above this are left to the general walk, so that no
#: whole-table subtraction below can borrow from the next slot.
_MAX_GPA = 1 << 62
_PAGE = 4096


class IovecTail:
    """Entries of one side of a chain, past its first views, as ``struct iovec``s.

    ``iov`` holds ``count`` iovecs (``nbytes`` in all) that address this
    process's mapping of guest memory; they are valid as long as the
    region's ``view`` is, which the worker keeps for the whole request.
    """

    __slots__ = ("iov", "count", "nbytes", "writable", "view", "host", "join")

    def __init__(self, iov: bytes, count: int, nbytes: int, writable: bool, view: memoryview,
                 host: int, join: int = -1) -> None:
        self.iov = iov
        self.count = count
        self.nbytes = nbytes
        #: Which side of the chain this continues.
        self.writable = writable
        self.view = view
        self.host = host
        #: Where in ``view`` the side's last view before the tail starts, when
        #: the tail continues it (-1: it does not).
        self.join = join

    def views(self) -> list[memoryview]:
        """The same bytes as views of guest memory, adjacent entries merged.

        With ``join``, the first view starts there: it replaces the side's
        last view before the tail (see :meth:`DescriptorChain.materialize`).
        """
        host = self.host
        spans = ((base - host, length) for base, length in _IOVEC.iter_unpack(self.iov))
        end = _IOVEC.unpack_from(self.iov)[0] - host if self.join >= 0 else -1
        return _merged(self.view, spans, self.join, end)[0]


def _merged(view: memoryview, spans: Iterable[tuple[int, int]], start: int = -1,
            end: int = -1) -> tuple[list[memoryview], int, int]:
    """Views of ``spans`` (offset, length) in ``view``, adjacent ones merged, the
    first continuing ``[start, end)`` if that is given; and where the last
    view starts and ends."""
    out: list[memoryview] = []
    for lo, length in spans:
        if lo != end:
            if end >= 0:
                out.append(view[start:end])
            start = lo
        end = lo + length
    if end >= 0:
        out.append(view[start:end])
    return out, start, end


class _Masks:
    """Constants for ``num``-entry tables, one 128-bit slot per entry (cached per length)."""

    __slots__ = ("one", "addr", "keep", "top", "top2", "low32", "bit32", "page", "region")

    def __init__(self, num: int) -> None:
        def per_slot(value: int) -> int:  # ``value`` in each 128-bit slot
            return int.from_bytes(value.to_bytes(16, "little") * num, "little")

        self.one = per_slot(1)
        self.addr = per_slot((1 << 64) - 1)  # a descriptor's address
        self.keep = per_slot((1 << 96) - 1)  # its address and length: an iovec's fields
        self.top = per_slot(1 << 63)
        self.top2 = per_slot(3 << 62)
        self.low32 = per_slot((1 << 32) - 1)
        self.bit32 = per_slot(1 << 32)
        self.page = per_slot(_PAGE)
        #: The last region's constants: its (gpa, size, host), then gpa, size
        #: with the guards, and host - gpa, each in every slot.
        self.region: tuple[tuple[int, int, int], int, int, int] = ((-1, -1, -1), 0, 0, 0)

    def for_region(self, gpa: int, size: int, host: int) -> tuple[int, int, int]:
        key, low, high, delta = self.region
        if key != (gpa, size, host):
            one = self.one
            low, high, delta = gpa * one, size * one | self.top, (host - gpa) * one
            self.region = ((gpa, size, host), low, high, delta)
        return low, high, delta


_MASKS: dict[int, _Masks] = {}
#: Linux sends a few lengths; a guest cycling through all of them would make
#: this hold about 30 MB, so it is emptied when full.
_MAX_CACHED = 16


def _masks(num: int) -> _Masks:
    return per_length(_MASKS, num, _Masks, _MAX_CACHED)


def _views(raw: bytes, first: int, end: int, view: memoryview, gpa: int
           ) -> tuple[list[memoryview], int, int]:
    """:func:`_merged` of entries ``[first, end)`` of the checked table ``raw``."""
    entries = (_ENTRY.unpack_from(raw, i * DESC) for i in range(first, end))
    return _merged(view, ((addr - gpa, length) for addr, length in entries))


def walk_iovecs(view: memoryview, gpa: int, size: int, host: int, start: int, num: int
                ) -> tuple[list[memoryview], list[memoryview], int, int, IovecTail] | None:
    """``(readable, writable, readable_len, writable_len, tail)`` of a Linux-shaped table.

    The table is ``num`` (at least 3) descriptors at ``view[start:]``;
    ``view`` maps ``size`` bytes of guest memory from ``gpa``, at address
    ``host`` in this process.  The shape is :func:`~shardfs.virtq.pagewalk.walk_pages`'s
    (in order, readable first, a writable last entry), every entry non-empty
    and inside ``view``.  ``readable`` and ``writable`` are views of the
    entries before the tail; the lengths count the tail too.  The tail is
    the writable side after its first entry when that side is the longer,
    else the readable side after its first two; a table with no entry left
    for it, or of any other shape, gives None.  The caller checks the total
    against the u32 limit.
    """
    if not _LITTLE_LP64 or gpa >= _MAX_GPA or not host:
        return None
    raw = view[start:start + DESC * num].tobytes()  # the guest cannot change this copy
    r = linux_shape(raw, num, table_masks(num))
    if r is None or r == num:
        return None
    m = _masks(num)
    slots = int.from_bytes(raw, "little")  # entry i in bits 128i..128i+127
    addrs = slots & m.addr
    lens = slots >> 64 & m.low32
    if addrs & m.top2 or (lens + m.low32) & m.bit32 != m.bit32:
        return None  # an address past 2**62, or an empty entry
    # Per slot, with bit 63 as a guard that a borrow clears:
    # addr - gpa >= 0, then size - (addr - gpa + len) >= 0.
    low, high, delta = m.for_region(gpa, size, host)
    offsets = (addrs | m.top) - low
    if offsets & m.top != m.top:
        return None  # below the region
    if (high - ((offsets ^ m.top) + lens)) & m.top != m.top:
        return None  # past the region's end
    if num - r > r:  # a READ's shape: the writable side after the reply header
        first, count, writable = r + 1, num - r - 1, True
        if count < 1:
            return None
        readable = _views(raw, 0, r, view, gpa)[0]
        head, lo, hi = _views(raw, r, r + 1, view, gpa)
    else:  # a WRITE's: the readable side after the header and the arguments
        first, count, writable = 2, r - 2, False
        if count < 1:
            return None
        readable, lo, hi = _views(raw, 0, 2, view, gpa)
        head = _views(raw, r, num, view, gpa)[0]
    # The tail continues the view before it: materialize() merges the two,
    # as the general walk would.
    join = lo if _ENTRY.unpack_from(raw, first * DESC)[0] - gpa == hi else -1
    sizes = memoryview(raw).cast("I")[2::4]  # every entry's len
    t = _masks(count)
    if lens >> 128 * first & t.low32 == t.page:
        nbytes = _PAGE * count  # pages, as Linux's are: no sum to take
    else:
        nbytes = sum(sizes[first:first + count])
    if writable:  # entries [0, r) readable, r the reply header, then the tail
        rlen, wlen = sum(sizes[:r]), sizes[r] + nbytes
    else:  # entries 0 and 1, the tail up to r, then [r, num) writable
        rlen, wlen = sizes[0] + sizes[1] + nbytes, sum(sizes[r:])
    iov = ((slots & m.keep) + delta).to_bytes(DESC * num, "little")
    tail = IovecTail(iov[DESC * first:DESC * (first + count)], count, nbytes, writable, view,
                     host, join)
    return readable, head, rlen, wlen, tail
