"""Scattered long tables as raw iovecs (virtq/iovec.py) give what the general walk gives.

:func:`shardfs.virtq.chain.walk_chain` tries :func:`walk_iovecs` on a 16-
to 1024-entry indirect table that :func:`walk_pages` declines.  Here:

* the walk itself: Linux-shaped tables with pages in random order, a READ's
  shape and a WRITE's, materialized, equal the general walk's views by
  address and length, and each iovec addresses its page in this process;
  the same tables broken in every way test_pagewalk knows, and pushed out
  of the region or past 2**62, get the general walk's verdict;
* requests end to end, through a real worker, dispatcher and passthrough
  on real files: 1 MiB READs and WRITEs answer byte for byte as they do
  with the iovec walk switched off (replies, guest pages, file contents),
  short reads, errors, read-only and id-mapped filesystems included, and
  the pages read are in the dirty log during migration.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.abi.virtio import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from shardfs.bench.hotpath import Harness
from shardfs.dispatch import Dispatcher
from shardfs.fs.forward import ForwardingFs
from shardfs.fs.idmap import IdMappedFs
from shardfs.fs.passthrough.fs import PassthroughFs
from shardfs.fs.readonly import ReadOnlyFs
from shardfs.virtq import chain as chain_mod
from shardfs.virtq import iovec
from shardfs.virtq.chain import MAX_UNPACKED_TABLE, MIN_UNPACKED_TABLE, walk_chain
from shardfs.virtq.dirtylog import DirtyLog
from tests.unit.support import RAM_BASE, Rig
from tests.unit.virtq import tables
from tests.unit.virtq.tables import Desc, address
from tests.unit.virtq.test_pagewalk import break_one

NEXT, WRITE = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
NUM = 16
RAM = 8 << 20
PAGE = 4096
#: Where tables go; buffers are placed above it.
DATA = RAM_BASE + (64 << 10)
SLOTS = (RAM - (128 << 10)) // PAGE


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with Rig(num=NUM, size=RAM) as r:
        yield r


def scattered(rnd: random.Random, n: int | None = None, read: bool | None = None) -> list[Desc]:
    """A READ's or a WRITE's table as Linux lays it out, pages in random order:
    header and arguments, then the pages of a READ after its reply header,
    or of a WRITE before it."""
    n = n or rnd.randint(MIN_UNPACKED_TABLE, 300)
    read = rnd.random() < 0.5 if read is None else read
    slots = rnd.sample(range(SLOTS), n)
    gpas = [DATA + s * PAGE for s in slots]
    small = [(gpas[0], 40), (gpas[1] + rnd.choice((0, 100)), 40), (gpas[2], 16)]
    pages = [(g, rnd.choice((PAGE, PAGE, PAGE, rnd.randint(1, PAGE)))) for g in gpas[3:]]
    if rnd.random() < 0.3 and len(pages) > 4:  # one run of adjacent pages somewhere
        k = rnd.randrange(len(pages) - 3)
        pages[k + 1:k + 3] = [(pages[k][0] + pages[k][1], PAGE), (pages[k][0] + pages[k][1]
                                                                 + PAGE, PAGE)]
    if read:
        entries = [(*small[0], 0), (*small[1], 0), (*small[2], WRITE)] + [
            (g, ln, WRITE) for g, ln in pages]
    else:
        entries = [(*small[0], 0), (*small[1], 0)] + [(g, ln, 0) for g, ln in pages] + [
            (small[2][0], 16, WRITE), (small[2][0] + 16, 8, WRITE)]
    return [(a, ln, f | (NEXT if i + 1 < len(entries) else 0), i + 1)
            for i, (a, ln, f) in enumerate(entries)]


def put(rig: Rig, descs: list[Desc]) -> int:
    """Write the table behind head 0; its guest address."""
    return tables.put(rig, descs)


def test_scattered_tables_become_iovecs_and_agree(rig: Rig, monkeypatch) -> None:
    rnd = random.Random(7)
    taken = declined = 0
    real = chain_mod.walk_iovecs

    def counting(*args: object) -> object:
        nonlocal taken, declined
        got = real(*args)  # type: ignore[arg-type]
        taken += got is not None
        declined += got is None
        return got

    for i in range(300):
        descs = scattered(rnd, read=bool(i % 2))
        put(rig, descs)
        monkeypatch.setattr(chain_mod, "walk_iovecs", counting)
        fast = tables.outcome(rig, NUM)
        monkeypatch.setattr(chain_mod, "walk_iovecs", real)
        assert fast == tables.outcome(rig, NUM, tables.LONG_WALKS), descs
        assert fast[0] == "chain"
    # None was left to the general walk; a few had their middle pages
    # adjacent by chance, and the page walk took them.
    assert declined == 0 and taken >= 290


def test_each_iovec_addresses_its_page(rig: Rig) -> None:
    rnd = random.Random(8)
    for read in (True, False):
        descs = scattered(rnd, 200, read)
        put(rig, descs)
        table = rig.mem.view(rig.drv.desc, 16 * NUM)
        c = walk_chain(rig.mem, table, NUM, 0, True)
        assert c.tail is not None and c.tail.writable is read
        first = 3 if read else 2
        tail = descs[first:first + c.tail.count]
        assert c.tail.count == (len(descs) - 3 if read else len(descs) - 4)
        got = list(struct.iter_unpack("<QQ", c.tail.iov))
        assert got == [(address(rig.mem.view(a, ln)), ln) for a, ln, _, _ in tail]
        assert c.tail.nbytes == sum(ln for _, ln, _, _ in tail)
        assert (c.readable_len, c.writable_len) == (
            sum(ln for _, ln, f, _ in descs if not f & WRITE),
            sum(ln for _, ln, f, _ in descs if f & WRITE))


def test_a_tail_that_continues_its_head_is_merged_with_it(rig: Rig) -> None:
    descs = scattered(random.Random(9), 40, read=True)
    out = descs[2][0]
    descs[3] = (out + 16, descs[3][1], descs[3][2], descs[3][3])  # the first page follows
    put(rig, descs)
    fast = tables.outcome(rig, NUM)
    assert fast == tables.outcome(rig, NUM, tables.LONG_WALKS)
    assert fast[3][0] == (address(rig.mem.view(out, 1)), 16 + descs[3][1])


def test_broken_scattered_tables_get_the_general_walks_verdict(rig: Rig) -> None:
    rnd = random.Random(10)
    for _ in range(600):
        descs = break_one(rnd, scattered(rnd))
        put(rig, descs)
        assert tables.outcome(rig, NUM) == tables.outcome(rig, NUM, tables.LONG_WALKS), descs


@pytest.mark.parametrize("where", ["below", "past the end", "across the end", "2**62",
                                   "2**63", "empty"])
def test_entries_outside_the_region_are_left_to_the_general_walk(rig: Rig, where: str,
                                                                 monkeypatch) -> None:
    rnd = random.Random(11)
    real = chain_mod.walk_iovecs
    results: list[object] = []
    monkeypatch.setattr(chain_mod, "walk_iovecs", lambda *a: results.append(real(*a)))
    for k in (0, 5, -1):
        descs = scattered(rnd, 60, read=True)
        a, ln, f, nxt = descs[k]
        a, ln = {"below": (RAM_BASE - PAGE, ln), "past the end": (RAM_BASE + RAM, ln),
                 "across the end": (RAM_BASE + RAM - 8, 16), "2**62": ((1 << 62) + a, ln),
                 "2**63": ((1 << 63) + a, ln), "empty": (a, 0)}[where]
        descs[k] = (a, ln, f, nxt)
        put(rig, descs)
        with monkeypatch.context() as m:
            m.setattr(chain_mod, "walk_iovecs", real)
            expected = tables.outcome(rig, NUM, tables.LONG_WALKS)
        assert tables.outcome(rig, NUM) == expected
    assert results == [None, None, None]


def test_the_u32_limit_holds(rig: Rig, monkeypatch) -> None:
    monkeypatch.setattr(chain_mod, "MAX_CHAIN_BYTES", 100 * PAGE)
    descs = scattered(random.Random(12), 200, read=True)
    put(rig, descs)
    assert tables.outcome(rig, NUM) == tables.outcome(rig, NUM, tables.LONG_WALKS) \
        == ("refused", tables.outcome(rig, NUM, tables.LONG_WALKS)[1])


def test_walk_iovecs_refuses_what_it_does_not_know(rig: Rig) -> None:
    descs = scattered(random.Random(13), 50, read=True)
    gpa = put(rig, descs)
    hit = rig.mem.regions[0]
    start = gpa - hit.gpa
    assert iovec.walk_iovecs(hit.view, hit.gpa, hit.size, hit.host, start, len(descs))
    # Every entry readable: no side to take a tail from.
    rdescs = [(a, ln, f & ~WRITE, n) for a, ln, f, n in descs]
    put(rig, rdescs)
    assert iovec.walk_iovecs(hit.view, hit.gpa, hit.size, hit.host, start,
                             len(rdescs)) is None
    # A region this process does not map (host 0), and one above 2**62.
    put(rig, descs)
    assert iovec.walk_iovecs(hit.view, hit.gpa, hit.size, 0, start, len(descs)) is None
    assert iovec.walk_iovecs(hit.view, 1 << 62, hit.size, hit.host, start, len(descs)) is None


def test_masks_for_many_table_lengths_stay_bounded() -> None:
    for n in range(MIN_UNPACKED_TABLE, MAX_UNPACKED_TABLE + 1, 7):
        iovec._masks(n)
        assert len(iovec._MASKS) <= iovec._MAX_CACHED


# -- requests end to end --------------------------------------------------------

FILE = 1 << 20


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[tuple[Harness, Path]]:
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(os.urandom(FILE))
    h = Harness(share)
    yield h, share / "f"
    h.close()


def open_file(h: Harness, flags: int = os.O_RDWR) -> tuple[int, int]:
    nodeid = F.fuse_entry_out.unpack(h.call(Op.FUSE_LOOKUP, 1, b"f\0"))[0]
    fh = F.fuse_open_out.unpack(h.call(Op.FUSE_OPEN, nodeid, F.fuse_open_in.pack(flags, 0)))[0]
    return nodeid, fh


def request(h: Harness, rnd: random.Random, opcode: int, nodeid: int, args: bytes,
            npages: int, payload: bytes = b"", joined: bool = False) -> tuple[int, bytes, bytes]:
    """One READ (``payload`` empty: ``npages`` pages to fill) or WRITE, laid out as
    Linux lays it, pages scattered; (used length, reply, bytes of the pages).

    ``joined``: the first page follows the view before it in memory (a READ's
    reply header, a WRITE's arguments), so the general walk merges the two."""
    mark = h.ram.mark
    base = h.ram.alloc((2 * npages + 6) * PAGE, PAGE)
    slots = rnd.sample(range(2 * npages + 4), npages + 3)
    gpas = [base + s * PAGE for s in slots]
    hdr = F.fuse_in_header.pack(F.fuse_in_header.size + len(args) + len(payload), opcode, 7,
                                nodeid, 0, 0, 1, 0, 0)
    pages = [(g, PAGE) for g in gpas[3:]]
    if joined:  # two pages of their own, past the sampled ones
        block = base + (2 * npages + 4) * PAGE
        pages[0] = (block + PAGE, PAGE)
        if payload:
            gpas[1] = block + PAGE - len(args)
        else:
            gpas[2] = block + PAGE - 16
    h.ram.write(gpas[0], hdr)
    h.ram.write(gpas[1], args)
    for g, _ in pages:
        h.ram.write(g, b"\xee" * PAGE)
    if payload:
        for k, (g, _) in enumerate(pages):
            h.ram.write(g, payload[k * PAGE:(k + 1) * PAGE])
        readable = [(gpas[0], len(hdr)), (gpas[1], len(args)), *pages]
        writable = [(gpas[2], 16), (gpas[2] + 64, F.fuse_write_out.size)]
        h.ram.write(gpas[2], b"\xee" * 128)
    else:
        readable = [(gpas[0], len(hdr)), (gpas[1], len(args))]
        writable = [(gpas[2], 16), *pages]
        h.ram.write(gpas[2], b"\xee" * 16)
    h.q.add(readable, writable, indirect=True)
    h.worker.serve(h.ring)
    ((_head, used),) = h.q.pop_used()
    reply = h.ram.read(gpas[2], 16) + (h.ram.read(gpas[2] + 64, 8) if payload else b"")
    data = b"".join(h.ram.read(g, PAGE) for g, _ in pages)
    h.ram.reset_alloc(mark)
    return used, reply, data


def both(h: Harness, seed: int, opcode: int, nodeid: int, args: bytes, npages: int,
         monkeypatch: pytest.MonkeyPatch, payload: bytes = b"",
         reset: Path | None = None, joined: bool = False) -> tuple[int, bytes, bytes]:
    """The request with raw iovecs, after checking it against the general walk's
    answer (``reset``: the file's contents are put back in between)."""
    before = reset.read_bytes() if reset else b""
    calls: list[int] = []
    got = request(h, random.Random(seed), opcode, nodeid, args, npages, payload, joined)
    after = reset.read_bytes() if reset else b""
    if reset:
        reset.write_bytes(before)
    with monkeypatch.context() as m:
        m.setattr(chain_mod, "walk_iovecs", lambda *a: calls.append(1))
        reference = request(h, random.Random(seed), opcode, nodeid, args, npages, payload,
                            joined)
    assert calls  # the general walk answered the reference
    assert got == reference
    if reset:
        assert reset.read_bytes() == after
    return got


def read_in(fh: int, offset: int, size: int) -> bytes:
    return F.fuse_read_in.pack(fh, offset, size, 0, 0, 0, 0)


def write_in(fh: int, offset: int, size: int, flags: int = 0) -> bytes:
    return F.fuse_write_in.pack(fh, offset, size, flags, 0, 0, 0)


def test_reads_through_iovecs_answer_as_the_general_path(harness, monkeypatch) -> None:
    h, path = harness
    nodeid, fh = open_file(h)
    content = path.read_bytes()
    taken = []
    real = PassthroughFs.read_iov
    monkeypatch.setattr(PassthroughFs, "read_iov",
                        lambda *a: taken.append(1) or real(*a))  # type: ignore[misc]
    # The whole file; from near its end (short); past its end (nothing).
    for seed, offset in ((1, 0), (2, FILE - 5000), (3, FILE + 10)):
        used, reply, data = both(h, seed, Op.FUSE_READ, nodeid, read_in(fh, offset, FILE), 256,
                                 monkeypatch)
        n = max(0, min(FILE, FILE - offset))
        assert used == 16 + n and F.fuse_out_header.unpack(reply[:16])[:2] == (16 + n, 0)
        assert data[:n] == content[offset:offset + n]
    assert len(taken) == 3
    # Fewer bytes asked than the pages hold: views, the same answer.
    used, _, data = both(h, 4, Op.FUSE_READ, nodeid, read_in(fh, 100, 50_000), 256,
                         monkeypatch)
    assert used == 16 + 50_000 and data[:50_000] == content[100:50_100]
    assert len(taken) == 3


def test_read_errors_answer_as_the_general_path(harness, monkeypatch) -> None:
    h, _ = harness
    nodeid, fh = open_file(h)
    for seed, args in ((5, read_in(fh + 99, 0, FILE)), (6, read_in(fh, -5 & (2**64 - 1), FILE))):
        used, reply, _ = both(h, seed, Op.FUSE_READ, nodeid, args, 256, monkeypatch)
        assert used == 16 and F.fuse_out_header.unpack(reply[:16])[1] < 0


def test_writes_through_iovecs_answer_as_the_general_path(harness, monkeypatch) -> None:
    h, path = harness
    nodeid, fh = open_file(h)
    taken = []
    real = PassthroughFs.write_iov
    monkeypatch.setattr(PassthroughFs, "write_iov",
                        lambda *a: taken.append(1) or real(*a))  # type: ignore[misc]
    payload = os.urandom(FILE)
    for seed, offset in ((7, 0), (8, 12345), (9, 3 * FILE)):
        used, reply, _ = both(h, seed, Op.FUSE_WRITE, nodeid, write_in(fh, offset, FILE), 256,
                              monkeypatch, payload, reset=path)
        assert used == 24 and F.fuse_write_out.unpack(reply[16:24])[0] == FILE
    assert len(taken) == 3
    request(h, random.Random(10), Op.FUSE_WRITE, nodeid, write_in(fh, 4096, FILE), 256, payload)
    assert path.read_bytes()[4096:4096 + FILE] == payload


def test_write_kill_suidgid_and_errors_answer_as_the_general_path(harness, monkeypatch) -> None:
    h, path = harness
    nodeid, fh = open_file(h)
    payload = os.urandom(64 * PAGE)
    path.chmod(0o6755)
    both(h, 11, Op.FUSE_WRITE, nodeid,
         write_in(fh, 0, len(payload), F.FUSE_WRITE_KILL_SUIDGID), 64, monkeypatch, payload,
         reset=path)
    assert path.stat().st_mode & 0o7777 == 0o755
    used, reply, _ = both(h, 12, Op.FUSE_WRITE, nodeid, write_in(fh + 99, 0, len(payload)), 64,
                          monkeypatch, payload, reset=path)
    assert used == 16 and F.fuse_out_header.unpack(reply[:16])[1] < 0


def test_read_only_and_id_mapped_filesystems(harness, monkeypatch) -> None:
    h, path = harness
    nodeid, fh = open_file(h)
    content = path.read_bytes()
    h.worker.dispatcher = Dispatcher(ReadOnlyFs(h.fs))
    h.worker.dispatcher.initialized = True
    payload = os.urandom(64 * PAGE)
    used, reply, _ = both(h, 13, Op.FUSE_WRITE, nodeid, write_in(fh, 0, len(payload)), 64,
                          monkeypatch, payload, reset=path)
    assert F.fuse_out_header.unpack(reply[:16])[1] == -30  # EROFS
    assert path.read_bytes() == content
    _, _, data = both(h, 14, Op.FUSE_READ, nodeid, read_in(fh, 0, 64 * PAGE), 64, monkeypatch)
    assert data == content[:64 * PAGE]
    h.worker.dispatcher = Dispatcher(IdMappedFs(h.fs, "map:0:0:65536", None))
    h.worker.dispatcher.initialized = True
    _, _, data = both(h, 15, Op.FUSE_READ, nodeid, read_in(fh, 0, 64 * PAGE), 64, monkeypatch)
    assert data == content[:64 * PAGE]


class PlainReadWrite(ForwardingFs):
    """Changes read() and write() (so read_iov and write_iov are not forwarded),
    and only counts the calls."""

    calls = 0

    def read(self, *a):  # type: ignore[no-untyped-def]
        PlainReadWrite.calls += 1
        return self.inner.read(*a)

    def write(self, *a):  # type: ignore[no-untyped-def]
        PlainReadWrite.calls += 1
        return self.inner.write(*a)


@pytest.mark.parametrize("joined", [False, True])
def test_a_filesystem_without_iovecs_gets_views(harness, monkeypatch, joined: bool) -> None:
    """READ and WRITE on a filesystem that declines the iovecs answer as the
    general path does, also when the first page continues the view before
    it (the views are then not the ones the fast path saw)."""
    h, path = harness
    nodeid, fh = open_file(h)
    content = path.read_bytes()
    h.worker.dispatcher = Dispatcher(PlainReadWrite(h.fs))
    h.worker.dispatcher.initialized = True
    PlainReadWrite.calls = 0
    used, _, data = both(h, 17, Op.FUSE_READ, nodeid, read_in(fh, 0, 64 * PAGE), 64,
                         monkeypatch, joined=joined)
    assert used == 16 + 64 * PAGE and data == content[:64 * PAGE]
    payload = os.urandom(64 * PAGE)
    used, reply, _ = both(h, 18, Op.FUSE_WRITE, nodeid, write_in(fh, 0, len(payload)), 64,
                          monkeypatch, payload, reset=path, joined=joined)
    assert F.fuse_write_out.unpack(reply[16:24])[0] == len(payload)
    request(h, random.Random(18), Op.FUSE_WRITE, nodeid, write_in(fh, 0, len(payload)), 64,
            payload, joined)
    assert path.read_bytes()[:len(payload)] == payload
    assert PlainReadWrite.calls == 5


def test_a_forwarding_fs_that_changes_read_or_write_sees_every_call(tmp_path: Path) -> None:
    class Counting(ForwardingFs):
        def read(self, *a):  # type: ignore[no-untyped-def]
            raise AssertionError("not reached")

        def write(self, *a):  # type: ignore[no-untyped-def]
            raise AssertionError("not reached")

    fs = PassthroughFs(str(tmp_path))
    try:
        wrapped = Counting(fs)
        assert wrapped.read_iov(None, 1, 0, 0, b"", 0) is None  # type: ignore[arg-type]
        assert wrapped.write_iov(None, 1, 0, 0, b"", 0, 0) is None  # type: ignore[arg-type]
    finally:
        fs.destroy()


def test_pages_read_through_iovecs_are_in_the_dirty_log(harness) -> None:
    h, _ = harness
    nodeid, fh = open_file(h)
    size = h.ram.size // PAGE // 8 + 1
    fd = os.memfd_create("log")
    os.ftruncate(fd, size)
    log = DirtyLog(fd, size, 0)
    try:
        log.set_regions(h.worker.mem)
        h.worker.dirty = log
        mark = h.ram.mark
        rnd = random.Random(16)
        gpas: list[int] = []
        real_add = h.q.add

        def add(readable, writable, indirect=False):  # type: ignore[no-untyped-def]
            gpas.extend(a for a, _ in writable)
            return real_add(readable, writable, indirect)

        h.q.add = add  # type: ignore[method-assign]
        request(h, rnd, Op.FUSE_READ, nodeid, read_in(fh, 0, 256 * PAGE), 256)
        h.q.add = real_add  # type: ignore[method-assign]
        h.ram.reset_alloc(mark)
        bits = os.pread(fd, size, 0)
        for gpa in gpas:
            page = (gpa - 0) >> 12
            assert bits[page >> 3] >> (page & 7) & 1, hex(gpa)
    finally:
        h.worker.dirty = None
        log.close()
        os.close(fd)
