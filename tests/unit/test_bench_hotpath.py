"""The hot-path work of the benchmark issue: every fast path keeps the rules.

* Large indirect tables are unpacked at once and walked by a loop of their
  own (``_walk_unpacked``); each rule of virtio 1.2 §2.7.5.3 must still hold
  there, and a chain that leaves the last-hit region must still resolve.
* ``ChainReader``/``ChainWriter`` fast paths give what the general ones give.
* Ring indices are stored with single 16-bit stores: never ``pack_into``,
  which zero-fills first (a polling peer once read ``avail.idx`` 0).
* ``SplitQueue.decide`` calls early only while more chains wait.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from shardfs.abi.virtio import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_IDX,
    virtq_desc,
)
from shardfs.virtq.chain import (
    MIN_UNPACKED_TABLE,
    ChainError,
    ChainReader,
    ChainWriter,
    walk_chain,
)
from shardfs.virtq.memory import GuestMemory
from shardfs.virtq.split import CALL, COVERED, OWED
from tests.unit.support import Rig

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
PAGE = 4096
BIG = MIN_UNPACKED_TABLE + 4  # a table long enough for the unpacked walk


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig(num=16) as r:
        yield r


def indirect(rig: Rig, descs: list[tuple[int, int, int, int]]) -> object:
    """Put ``descs`` in an indirect table behind descriptor 0 and walk it."""
    gpa = rig.ram.alloc(virtq_desc.size * len(descs), 16)
    for i, d in enumerate(descs):
        rig.ram.write(gpa + i * virtq_desc.size, virtq_desc.pack(*d))
    rig.drv.raw_desc(0, gpa, virtq_desc.size * len(descs), INDIRECT, 0)
    table = rig.mem.view(rig.drv.desc, virtq_desc.size * rig.num)
    chain = walk_chain(rig.mem, table, rig.num, 0, True)
    chain.materialize()  # scattered pages come with an iovec tail (virtq.iovec)
    return chain


def pages(rig: Rig, n: int) -> list[int]:
    base = rig.ram.alloc(n * PAGE, PAGE)
    for k in range(n):
        rig.ram.write(base + k * PAGE, bytes([k]) * PAGE)
    return [base + (n - 1 - k) * PAGE for k in range(n)]  # descending, as a guest's


def test_large_table_in_order_and_out_of_order(rig: Rig) -> None:
    gpas = pages(rig, BIG)
    half = BIG // 2
    descs = [(g, PAGE, (WRITE if k >= half else 0) | (NEXT if k + 1 < BIG else 0), k + 1)
             for k, g in enumerate(gpas)]
    chain = indirect(rig, descs)
    assert chain.readable_len == half * PAGE and chain.writable_len == (BIG - half) * PAGE
    assert [bytes(v[:1]) for v in chain.readable] == [bytes([BIG - 1 - k]) for k in range(half)]
    # The same chain threaded through the table backwards (a walk starts at entry 0).
    order = [0, *range(BIG - 1, 0, -1)]
    table: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)] * BIG
    for pos, slot in enumerate(order):
        nxt = order[pos + 1] if pos + 1 < BIG else 0
        table[slot] = (gpas[pos], PAGE, (WRITE if pos >= half else 0)
                       | (NEXT if pos + 1 < BIG else 0), nxt)
    again = indirect(rig, table)
    walked = [bytes(v) for v in again.readable + again.writable]
    assert walked == [bytes(v) for v in chain.readable + chain.writable]


@pytest.mark.parametrize("case, message", [
    ("loop", "loop"),
    ("range", "out of range"),
    ("nested", "inside an indirect"),
    ("order", "after a writable"),
])
def test_large_table_rules(rig: Rig, case: str, message: str) -> None:
    gpas = pages(rig, BIG)
    descs = [(g, PAGE, NEXT, k + 1) for k, g in enumerate(gpas)]
    descs[-1] = (gpas[-1], PAGE, 0, 0)
    if case == "loop":
        descs[-1] = (gpas[-1], PAGE, NEXT, 3)
    elif case == "range":
        descs[5] = (gpas[5], PAGE, NEXT, 60000)
    elif case == "nested":
        descs[5] = (gpas[5], virtq_desc.size, INDIRECT, 0)
    else:
        descs[2] = (gpas[2], PAGE, WRITE | NEXT, 3)
    with pytest.raises(ChainError, match=message):
        indirect(rig, descs)


def test_large_table_across_regions() -> None:
    """Pages in two regions: the walk leaves the region it hit and comes back."""
    mem = GuestMemory()
    fds = []
    for gpa in (0, 1 << 20):
        fd = os.memfd_create("r")
        os.ftruncate(fd, 1 << 20)
        mem.add(gpa, 1 << 20, gpa, 0, fd)
        fds.append(fd)
    try:
        table_gpa = 0
        descs = [((1 << 20) * (k % 2) + PAGE * (k + 1), PAGE, NEXT if k + 1 < BIG else 0, k + 1)
                 for k in range(BIG)]
        raw = b"".join(virtq_desc.pack(*d) for d in descs)
        mem.view(table_gpa, len(raw))[:] = raw
        head = mem.view(1 << 19, virtq_desc.size)
        head[:] = virtq_desc.pack(table_gpa, len(raw), INDIRECT, 0)
        chain = walk_chain(mem, head, 1, 0, True)
        assert chain.readable_len == BIG * PAGE and len(chain.readable) == BIG
    finally:
        mem.clear()
        for fd in fds:
            os.close(fd)


def test_reader_and_writer_fast_paths_agree_with_the_slow_ones() -> None:
    data = bytes(range(256)) * 4
    for cuts in ([len(data)], [40, 16, len(data) - 56], [7, 33, 100, len(data) - 140]):
        bufs, pos = [], 0
        for c in cuts:
            bufs.append(memoryview(bytearray(data[pos:pos + c])))
            pos += c
        r = ChainReader(bufs, len(data))
        assert r.read_struct(struct.Struct("<IIQQIIIHH")) == struct.unpack_from(
            "<IIQQIIIHH", data)
        assert r.read_bytes(16) == data[40:56]
        assert b"".join(bytes(v) for v in r.take(100)) == data[56:156]
        assert r.remaining == len(data) - 156
        out = [memoryview(bytearray(len(b))) for b in bufs]
        w = ChainWriter(out, len(data))
        w.write_at(0, data[:16])
        w.pack_at(struct.Struct("<QQ"), 16, 1, 2)
        spot = w.span(32, 8)
        if spot is not None:
            struct.pack_into("<Q", spot[0], spot[1], 3)
        else:
            w.write_at(32, struct.pack("<Q", 3))
        w.write_at(40, data[40:])
        expect = data[:16] + struct.pack("<QQQ", 1, 2, 3) + data[40:]
        assert b"".join(bytes(v) for v in out) == expect
        assert w.written == len(data)
        assert [bytes(v) for v in w.views_at(16, len(data))] and \
            b"".join(bytes(v) for v in w.views_at(16, len(data))) == expect[16:]


def test_push_stores_the_index_without_struct_pack_into(rig: Rig,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rig.publish(b"x", 8)
    chain = rig.queue.pop(rig.mem)
    assert chain is not None and not isinstance(chain, int)
    written = []
    real = struct.Struct.pack_into

    class Spy(struct.Struct):
        def pack_into(self, buf: object, offset: int, *v: object) -> None:  # type: ignore
            written.append(offset)
            real(self, buf, offset, *v)  # type: ignore[arg-type]

    import shardfs.virtq.split as split
    monkeypatch.setattr(split, "_pack_used", Spy("<II").pack_into)
    rig.queue.push(chain.head, 1)
    assert VIRTQ_USED_IDX not in written  # the element may be packed, the index not
    assert rig.drv.used_idx() == 1


def test_decide_calls_early_only_while_chains_wait() -> None:
    with Rig(num=8, event_idx=True) as rig:
        q = rig.queue
        for _ in range(3):
            rig.publish(b"x", 8)
        rig.drv.set_used_event(0)  # the driver waits for the first completion
        q.needs_notification()  # the first decision is made: from now on the rule holds
        chain = q.pop(rig.mem)
        assert chain is not None and not isinstance(chain, int)
        q.push(chain.head, 0)
        assert q.decide() == CALL  # two more wait: call now, the driver refills meanwhile
        assert q.decide() == OWED  # already signalled for that one
        chain = q.pop(rig.mem)
        assert chain is not None and not isinstance(chain, int)
        q.push(chain.head, 0)
        assert q.decide() == OWED  # the driver asked for no call for this one
        chain = q.pop(rig.mem)
        assert chain is not None and not isinstance(chain, int)
        rig.drv.set_used_event(q.used_idx)
        q.push(chain.head, 0)
        assert q.decide() == CALL  # nothing waits: decided at once, with the barrier
        assert q.decide() == COVERED  # and nothing is owed after it


def test_decide_without_event_idx_follows_no_interrupt() -> None:
    with Rig(num=8, event_idx=False) as rig:
        q = rig.queue
        for _ in range(2):
            rig.publish(b"x", 8)
        chain = q.pop(rig.mem)
        assert chain is not None and not isinstance(chain, int)
        q.push(chain.head, 0)
        assert q.decide() == OWED  # one more waits: the end of the batch decides
        chain = q.pop(rig.mem)
        assert chain is not None and not isinstance(chain, int)
        q.push(chain.head, 0)
        assert q.decide() == CALL  # the driver did not set VIRTQ_AVAIL_F_NO_INTERRUPT
