"""Descriptor chains: bounded walking (virtio 1.2 §2.7.5.3) and byte streams over them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.abi.virtio import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    virtq_desc,
)
from shardfs.virtq.chain import (
    MAX_CHAIN_BYTES,
    ChainError,
    ChainReader,
    ChainWriter,
    DescriptorChain,
    ShortRead,
    walk_chain,
)
from shardfs.virtq.memory import GuestMemory
from tests.unit.support import RAM_BASE, Rig, fuse_request

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
NUM = 128


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig(num=NUM) as r:
        yield r


def walk(rig: Rig, head: int = 0, indirect_ok: bool = True) -> DescriptorChain:
    table = rig.mem.view(rig.drv.desc, virtq_desc.size * rig.num)
    return walk_chain(rig.mem, table, rig.num, head, indirect_ok)


def table_at(rig: Rig, descs: list[tuple[int, int, int, int]]) -> int:
    """Write an indirect table into guest RAM; return its gpa."""
    gpa = rig.ram.alloc(virtq_desc.size * max(len(descs), 1), 16)
    for i, d in enumerate(descs):
        rig.ram.write(gpa + i * virtq_desc.size, virtq_desc.pack(*d))
    return gpa


def parse_write(chain: DescriptorChain) -> tuple[tuple, tuple, bytes]:
    """Read a FUSE WRITE back out of a chain the way dispatch does."""
    r = ChainReader(chain.readable, chain.readable_len)
    hdr = r.read_struct(F.fuse_in_header)
    arg = r.read_struct(F.fuse_write_in)
    data = b"".join(bytes(v) for v in r.take(arg[2]))
    assert r.remaining == 0
    return hdr, arg, data


WRITE_REQ = fuse_request(Op.FUSE_WRITE, F.fuse_write_in.pack(9, 4096, 23, 0, 0, 0, 0)
                         + b"payload split anywhere!", nodeid=5, unique=0x1234)


# -- splitting ---------------------------------------------------------------------


def test_request_split_at_every_byte_parses_identically(rig: Rig) -> None:
    whole, _ = rig.chain(WRITE_REQ, 16)
    expected = parse_write(whole)
    rig.complete(whole.head, 0)
    assert expected[2] == b"payload split anywhere!"
    for cut in range(1, len(WRITE_REQ)):
        for indirect in (False, True):
            chain, _ = rig.chain(WRITE_REQ, 16, rsplits=[cut], indirect=indirect)
            assert len(chain.readable) == 2
            assert parse_write(chain) == expected, (cut, indirect)
            rig.complete(chain.head, 0)


def test_request_in_one_byte_descriptors(rig: Rig) -> None:
    expected_chain, _ = rig.chain(WRITE_REQ, 16)
    expected = parse_write(expected_chain)
    rig.complete(expected_chain.head, 0)
    every = list(range(1, len(WRITE_REQ)))
    for indirect in (False, True):
        chain, _ = rig.chain(WRITE_REQ, 1, rsplits=every, indirect=indirect)
        chain.materialize()  # a long indirect table comes with an iovec tail
        assert len(chain.readable) == len(WRITE_REQ)
        assert chain.readable_len == len(WRITE_REQ) and chain.writable_len == 1
        assert parse_write(chain) == expected
        rig.complete(chain.head, 0)


def test_reply_split_at_every_byte(rig: Rig) -> None:
    reply = bytes(range(40))
    for cut in range(1, len(reply)):
        chain, wbufs = rig.chain(b"req", len(reply), wsplits=[cut, cut + 3])
        w = ChainWriter(chain.writable, chain.writable_len)
        w.write_at(0, reply[:10])
        w.write_at(10, reply[10:])
        assert w.written == len(reply)
        assert rig.reply(wbufs, len(reply)) == reply, cut
        rig.complete(chain.head, len(reply))


def test_zero_length_descriptors_are_skipped(rig: Rig) -> None:
    a, b = rig.buffer(b"abc"), rig.buffer(b"def")
    rig.drv.raw_desc(0, a, 3, NEXT, 1)
    rig.drv.raw_desc(1, 0xDEAD_0000_0000, 0, NEXT, 2)  # no bytes: address never used
    rig.drv.raw_desc(2, b, 3, 0, 0)
    chain = walk(rig)
    assert chain.readable_len == 6 and len(chain.readable) == 2
    assert ChainReader(chain.readable, 6).read_bytes(6) == b"abcdef"


def test_a_chain_may_use_the_whole_table(rig: Rig) -> None:
    buf = rig.buffer(NUM)
    for i in range(NUM):
        rig.drv.raw_desc(i, buf + i, 1, NEXT if i + 1 < NUM else 0, i + 1)
    assert walk(rig).readable_len == NUM


def test_direct_descriptors_may_precede_an_indirect_one(rig: Rig) -> None:
    a, b = rig.buffer(b"head"), rig.buffer(b"tail")
    t = table_at(rig, [(b, 4, 0, 0)])
    rig.drv.raw_desc(0, a, 4, NEXT, 1)
    rig.drv.raw_desc(1, t, 16, INDIRECT, 0)
    chain = walk(rig)
    assert ChainReader(chain.readable, chain.readable_len).read_bytes(8) == b"headtail"


# -- refusals ----------------------------------------------------------------------


def test_loop_ends_with_chain_error(rig: Rig) -> None:
    buf = rig.buffer(8)
    rig.drv.raw_desc(0, buf, 8, NEXT, 1)
    rig.drv.raw_desc(1, buf, 8, NEXT, 0)
    with pytest.raises(ChainError, match="loop"):
        walk(rig)


def test_self_loop_ends_with_chain_error(rig: Rig) -> None:
    rig.drv.raw_desc(3, rig.buffer(8), 8, NEXT, 3)
    with pytest.raises(ChainError):
        walk(rig, head=3)


def test_loop_inside_an_indirect_table(rig: Rig) -> None:
    buf = rig.buffer(8)
    t = table_at(rig, [(buf, 8, NEXT, 1), (buf, 8, NEXT, 0)])
    rig.drv.raw_desc(0, t, 32, INDIRECT, 0)
    with pytest.raises(ChainError, match="loop"):
        walk(rig)


def test_nested_indirect_is_refused(rig: Rig) -> None:
    buf = rig.buffer(8)
    inner = table_at(rig, [(buf, 8, 0, 0)])
    outer = table_at(rig, [(buf, 8, NEXT, 1), (inner, 16, INDIRECT, 0)])
    rig.drv.raw_desc(0, outer, 32, INDIRECT, 0)
    with pytest.raises(ChainError, match="inside an indirect"):
        walk(rig)


def test_indirect_with_next_is_refused(rig: Rig) -> None:
    buf = rig.buffer(8)
    t = table_at(rig, [(buf, 8, 0, 0)])
    rig.drv.raw_desc(0, t, 16, INDIRECT | NEXT, 1)
    rig.drv.raw_desc(1, buf, 8, 0, 0)
    with pytest.raises(ChainError, match="INDIRECT and NEXT"):
        walk(rig)


def test_indirect_without_the_feature_is_refused(rig: Rig) -> None:
    t = table_at(rig, [(rig.buffer(8), 8, 0, 0)])
    rig.drv.raw_desc(0, t, 16, INDIRECT, 0)
    with pytest.raises(ChainError, match="not negotiated"):
        walk(rig, indirect_ok=False)
    assert walk(rig).readable_len == 8


@pytest.mark.parametrize("length", [0, 1, 8, 15, 17, 24, 40])
def test_indirect_length_must_be_a_nonzero_multiple_of_16(rig: Rig, length: int) -> None:
    t = table_at(rig, [(rig.buffer(8), 8, 0, 0)] * 3)
    rig.drv.raw_desc(0, t, length, INDIRECT, 0)
    with pytest.raises(ChainError):
        walk(rig)


def test_indirect_table_outside_memory(rig: Rig) -> None:
    rig.drv.raw_desc(0, RAM_BASE + rig.ram.size - 16, 32, INDIRECT, 0)
    with pytest.raises(ChainError):
        walk(rig)
    rig.drv.raw_desc(0, 0, 16, INDIRECT, 0)
    with pytest.raises(ChainError):
        walk(rig)


def test_indirect_next_beyond_the_table(rig: Rig) -> None:
    buf = rig.buffer(8)
    t = table_at(rig, [(buf, 8, NEXT, 2), (buf, 8, 0, 0)])
    rig.drv.raw_desc(0, t, 32, INDIRECT, 0)
    with pytest.raises(ChainError, match="out of range"):
        walk(rig)


def test_next_beyond_the_ring(rig: Rig) -> None:
    rig.drv.raw_desc(0, rig.buffer(8), 8, NEXT, NUM)
    with pytest.raises(ChainError, match="out of range"):
        walk(rig)
    with pytest.raises(ChainError, match="out of range"):
        walk(rig, head=NUM)


def test_readable_after_writable_is_refused(rig: Rig) -> None:
    buf = rig.buffer(8)
    rig.drv.raw_desc(0, buf, 8, NEXT, 1)
    rig.drv.raw_desc(1, buf, 8, WRITE | NEXT, 2)
    rig.drv.raw_desc(2, buf, 8, 0, 0)
    with pytest.raises(ChainError, match="after a writable"):
        walk(rig)


def test_readable_after_writable_in_an_indirect_table(rig: Rig) -> None:
    buf = rig.buffer(8)
    t = table_at(rig, [(buf, 8, WRITE | NEXT, 1), (buf, 8, 0, 0)])
    rig.drv.raw_desc(0, t, 32, INDIRECT, 0)
    with pytest.raises(ChainError, match="after a writable"):
        walk(rig)


@pytest.mark.parametrize(("where", "length"), [
    ("below", 1),                  # one byte below guest RAM
    ("end", 1),                    # just past the end
    ("end", 0xFFFF_FFFF),          # huge length from the end
    ("start", 0xFFFF_FFFF),        # huge length from the start
    ("top", 16),                   # at the top of the 64-bit space: addr + len wraps
])
def test_buffers_outside_memory_are_refused(rig: Rig, where: str, length: int) -> None:
    addr = {"below": RAM_BASE - 1, "end": RAM_BASE + rig.ram.size, "start": RAM_BASE,
            "top": (1 << 64) - 8}[where]
    for flags in (0, WRITE):
        rig.drv.raw_desc(0, addr, length, flags, 0)
        with pytest.raises(ChainError):
            walk(rig)


def test_buffer_crossing_the_end_of_memory_is_refused(rig: Rig) -> None:
    end = RAM_BASE + rig.ram.size
    rig.drv.raw_desc(0, end - 8, 9, 0, 0)
    with pytest.raises(ChainError):
        walk(rig)
    rig.drv.raw_desc(0, end - 8, 8, 0, 0)
    assert walk(rig).readable_len == 8


@pytest.fixture(scope="module")
def big_mem() -> Iterator[GuestMemory]:
    """4 GiB of sparse guest RAM: enough for one descriptor of u32-max bytes."""
    fd = os.memfd_create("shardfs-big", os.MFD_CLOEXEC)
    os.ftruncate(fd, 1 << 32)
    mem = GuestMemory()
    mem.add(0, 1 << 32, 0, 0, fd)
    os.close(fd)
    yield mem
    mem.clear()


def raw_table(descs: list[tuple[int, int, int, int]]) -> memoryview:
    return memoryview(b"".join(virtq_desc.pack(*d) for d in descs))


def test_huge_length_sums_are_capped(big_mem: GuestMemory) -> None:
    # Every descriptor is in bounds, but together they describe more than u32.
    ok = raw_table([(0, MAX_CHAIN_BYTES, 0, 0)])
    assert walk_chain(big_mem, ok, 1, 0, True).readable_len == MAX_CHAIN_BYTES
    for descs in (
        [(0, MAX_CHAIN_BYTES, NEXT, 1), (0, 1, 0, 0)],
        [(0, 1 << 31, NEXT, 1), (0, 1 << 31, WRITE, 0)],
        [(0, 1 << 31, WRITE | NEXT, 1), (0, 1 << 31, WRITE | NEXT, 2), (0, 1, WRITE, 0)],
    ):
        with pytest.raises(ChainError, match="overflows"):
            walk_chain(big_mem, raw_table(descs), len(descs), 0, True)


# -- streams -----------------------------------------------------------------------


def streams(parts: list[bytes]) -> ChainReader:
    bufs = [memoryview(bytearray(p)) for p in parts]
    return ChainReader(bufs, sum(len(p) for p in parts))


def test_reader_short_reads() -> None:
    r = streams([b"abc", b"de"])
    with pytest.raises(ShortRead):
        r.read_bytes(6)
    with pytest.raises(ShortRead):
        r.take(6)
    with pytest.raises(ShortRead):
        r.read_struct(F.fuse_forget_in)  # 8 bytes from 5
    assert r.remaining == 5  # failed reads consume nothing
    assert r.read_bytes(5) == b"abcde"
    assert r.remaining == 0
    with pytest.raises(ShortRead):
        r.read_bytes(1)
    assert r.read_bytes(0) == b"" and r.take(0) == []


def test_reader_limit_below_the_buffers() -> None:
    """Dispatch narrows ``remaining`` to the header's length; bytes past it are unread."""
    r = streams([b"abcd", b"efgh"])
    r.remaining = 5
    assert r.read_bytes(5) == b"abcde"
    with pytest.raises(ShortRead):
        r.read_bytes(1)


def test_reader_struct_straddles_and_aligns() -> None:
    data = F.fuse_forget_one.pack(0x1122334455667788, 42) * 2
    for cut in range(1, len(data)):
        r = streams([data[:cut], data[cut:]])
        assert r.read_struct(F.fuse_forget_one) == (0x1122334455667788, 42)
        assert r.read_struct(F.fuse_forget_one) == (0x1122334455667788, 42)
        assert r.remaining == 0


def test_take_is_zero_copy(rig: Rig) -> None:
    gpa = rig.buffer(b"0123456789")
    rig.drv.add([(gpa, 4), (gpa + 4, 6)], [])
    chain = rig.queue.pop(rig.mem)
    assert isinstance(chain, DescriptorChain)
    r = ChainReader(chain.readable, chain.readable_len)
    r.skip(2)
    views = r.take(6)
    assert [bytes(v) for v in views] == [b"234567"]  # the two adjacent descriptors: one view
    rig.ram.write(gpa, b"xxxxxxxxxx")  # the guest rewrites the buffer...
    assert [bytes(v) for v in views] == [b"xxxxxx"]  # ...and the views see it
    assert r.remaining == 2


def test_writer_clips_and_refuses_overflow() -> None:
    bufs = [memoryview(bytearray(3)), memoryview(bytearray(5))]
    w = ChainWriter(bufs, 8)
    assert [len(v) for v in w.views_at(2, 100)] == [1, 5]
    assert w.views_at(8, 4) == []
    with pytest.raises(ShortRead):
        w.write_at(4, b"12345")
    assert w.written == 0
    w.write_at(1, b"ABCD")
    assert bytes(bufs[0]) + bytes(bufs[1]) == b"\0ABCD\0\0\0"
    assert w.written == 5
    w.write_at(0, b"z")
    assert w.written == 5  # the high-water mark, not the last write


class CountingMemory(GuestMemory):
    """Counts buffer translations: one per descriptor the walk visits."""

    def __init__(self) -> None:
        super().__init__()
        self.translations = 0

    def views(self, gpa: int, length: int) -> list[memoryview]:
        self.translations += 1
        return super().views(gpa, length)


@pytest.fixture
def counting() -> Iterator[tuple[CountingMemory, int]]:
    """32 MiB of guest RAM at gpa 0 behind a counting GuestMemory."""
    size = 32 << 20
    fd = os.memfd_create("shardfs-count", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    mem = CountingMemory()
    mem.add(0, size, 0, 0, fd)
    yield mem, fd
    mem.clear()
    os.close(fd)


def test_loop_in_a_huge_indirect_table_is_bounded(counting: tuple[CountingMemory, int]) -> None:
    """``next`` is a le16, so a walk past 65536 descriptors of one table is a loop.

    Bounding only by the table's length let a 16 MiB table hold a two-entry
    loop for a million steps, each allocating a view (a guest with a few GiB
    could exhaust the worker's memory with one chain).
    """
    mem, fd = counting
    entries = 1 << 20  # a 16 MiB table
    table_gpa = 1 << 24
    os.pwrite(fd, virtq_desc.pack(0, 1, NEXT, 1) + virtq_desc.pack(0, 1, NEXT, 0), table_gpa)
    head = raw_table([(table_gpa, entries * virtq_desc.size, INDIRECT, 0)])
    with pytest.raises(ChainError, match="loop"):
        walk_chain(mem, head, 1, 0, True)
    assert mem.translations <= 1 << 16


def test_longest_chain_in_an_indirect_table(counting: tuple[CountingMemory, int]) -> None:
    """Every index a le16 ``next`` can reach may be used: 65536 descriptors."""
    mem, fd = counting
    n = 1 << 16
    table_gpa = 1 << 24
    os.pwrite(fd, b"".join(virtq_desc.pack(i, 1, NEXT if i + 1 < n else 0, (i + 1) & 0xFFFF)
                           for i in range(n)), table_gpa)
    head = raw_table([(table_gpa, (n + 8) * virtq_desc.size, INDIRECT, 0)])
    assert walk_chain(mem, head, 1, 0, True).readable_len == n


# -- merging adjacent descriptors ----------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("pieces", [3, 20])  # 20: an indirect table walked unpacked
def test_adjacent_descriptors_merge_into_one_view(rig: Rig, indirect: bool,
                                                  pieces: int) -> None:
    if 2 * pieces + 1 > NUM and not indirect:
        pytest.skip("more descriptors than the ring has")
    data = bytes(range(pieces * 3))
    gpa = rig.buffer(data)
    wgpa = rig.buffer(pieces * 2)
    far = rig.buffer(b"far")
    rbufs = [(gpa + 3 * k, 3) for k in range(pieces)] + [(far, 3)]
    wbufs = [(wgpa + 2 * k, 2) for k in range(pieces)]
    rig.drv.add(rbufs, wbufs, indirect=indirect)
    chain = rig.queue.pop(rig.mem)
    assert isinstance(chain, DescriptorChain)
    chain.materialize()  # a long indirect table comes with an iovec tail
    assert [bytes(v) for v in chain.readable] == [data, b"far"]
    assert [len(v) for v in chain.writable] == [pieces * 2]
    assert chain.readable_len == len(data) + 3 and chain.writable_len == pieces * 2


def test_reply_after_request_in_the_next_bytes_is_not_merged(rig: Rig) -> None:
    """Adjacent in memory but on the other side: two views, and a readable after a
    writable is still refused."""
    gpa = rig.buffer(16)
    rig.drv.add([(gpa, 8)], [(gpa + 8, 8)])
    chain = walk(rig)
    assert [len(v) for v in chain.readable] == [8] and [len(v) for v in chain.writable] == [8]
    rig.complete(chain.head, 0)
    rig.drv.raw_desc(0, gpa + 8, 8, NEXT | WRITE, 1)
    rig.drv.raw_desc(1, gpa, 8, 0, 0)
    with pytest.raises(ChainError, match="after a writable"):
        walk(rig)
