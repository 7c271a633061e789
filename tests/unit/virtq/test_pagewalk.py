"""The long-table walk (virtq/pagewalk.py) gives exactly what the general walk gives.

:func:`shardfs.virtq.chain.walk_chain` tries :func:`walk_pages` on an
INDIRECT head whose table has 16 to 1024 entries, and falls back to the
entry-by-entry walk when it returns None.  Here both run on the same
tables: the shape Linux sends for a large READ or WRITE (a descriptor per
page, pages adjacent in runs of random length), and the same with one thing
broken, so every refusal and every fallback is compared too.  Views are
compared by address and length.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from shardfs.abi.virtio import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    virtq_desc,
)
from shardfs.virtq import chain as chain_mod
from shardfs.virtq.chain import MAX_UNPACKED_TABLE, MIN_UNPACKED_TABLE
from shardfs.virtq.pagewalk import walk_pages
from tests.unit.support import RAM_BASE, Rig
from tests.unit.virtq import tables
from tests.unit.virtq.tables import Desc

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
NUM = 16
RAM = 8 << 20
PAGE = 4096
#: Where tables go; buffers are placed above it.
DATA = RAM_BASE + (64 << 10)



@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with Rig(num=NUM, size=RAM) as r:
        yield r


def outcome(rig: Rig, general: bool) -> tuple[object, ...]:
    """The walk of the chain at head 0; ``general``: without walk_pages."""
    return tables.outcome(rig, NUM, tables.LONG_WALKS if general else ())


def linux_table(rnd: random.Random, n: int | None = None) -> list[Desc]:
    """A request as Linux lays it out: small header and argument buffers,
    then pages; readable first.  Pages continue the one before in runs of
    random length, as a guest's memory does; the middle pair is adjacent
    (otherwise walk_pages leaves the table to the entry walk by design)."""
    n = n or rnd.randint(MIN_UNPACKED_TABLE, 300)
    readable = rnd.choice((rnd.randint(0, n), 2, n - 1, n))
    mid = n // 2
    descs: list[Desc] = []
    addr = DATA
    for i in range(n):
        length = PAGE if rnd.random() < 0.85 else rnd.choice((16, 40, 80, rnd.randint(1, 5000)))
        adjacent = i == mid or (descs and rnd.random() < 0.9)
        if not adjacent or addr + length > RAM_BASE + RAM:
            addr = DATA + rnd.randrange(0, RAM - (64 << 10) - 2 * PAGE - length)
        if i == mid - 1 and addr + length + 5000 > RAM_BASE + RAM:
            addr = DATA  # room for the middle entry right after this one
        flags = (WRITE if i >= readable else 0) | (NEXT if i < n - 1 else 0)
        descs.append((addr, length, flags, i + 1 if i < n - 1 else 0))
        addr += length
    return descs


def break_one(rnd: random.Random, descs: list[Desc]) -> list[Desc]:
    """The table with one rule (or Linux's shape) broken somewhere."""
    d = list(descs)
    n = len(d)
    i = rnd.randrange(n)
    addr, length, flags, nxt = d[i]
    kind = rnd.choice(("zero", "zero-run", "order", "last-next", "nested", "read-after-write",
                       "outside", "crossing", "stop-early", "loop", "huge", "high-flags",
                       "high-addr", "scattered", "wrap"))
    if kind == "zero":
        d[i] = (addr, 0, flags, nxt)
    elif kind == "zero-run":  # zero-length and away from its neighbours: a run of its own
        d[i] = (DATA + 3 * PAGE + 8, 0, flags, nxt)
    elif kind == "order":
        d[i] = (addr, length, flags | NEXT, rnd.randrange(n))
    elif kind == "last-next":
        d[-1] = (d[-1][0], d[-1][1], d[-1][2] | NEXT, rnd.choice((n, 0, n - 1)))
    elif kind == "nested":
        d[i] = (addr, 32, flags | INDIRECT, nxt)
    elif kind == "read-after-write":
        d[i] = (addr, length, flags & ~WRITE, nxt)
        if i:
            d[i - 1] = (d[i - 1][0], d[i - 1][1], d[i - 1][2] | WRITE, d[i - 1][3])
    elif kind == "outside":
        d[i] = (rnd.choice((0, RAM_BASE - PAGE, RAM_BASE + RAM, 1 << 60)), length, flags, nxt)
    elif kind == "crossing":
        d[i] = (RAM_BASE + RAM - 8, 64, flags, nxt)
    elif kind == "stop-early":
        d[i] = (addr, length, flags & ~NEXT, nxt)
    elif kind == "loop":
        d[i] = (addr, length, flags | NEXT, i)
    elif kind == "huge":
        d[i] = (addr, 0xFFFF_FFFF, flags, nxt)
    elif kind == "high-flags":
        d[i] = (addr, length, flags | rnd.choice((0x100, 0x8000, 0x8)), nxt)
    elif kind == "high-addr":  # past 2**63: addr + len could carry
        d[i] = ((1 << 64) - rnd.choice((PAGE, 1)), length, flags, nxt)
    elif kind == "scattered":  # the middle pair apart
        mid = n // 2
        a, ln, f, x = d[mid]
        d[mid] = (a + PAGE if a + PAGE + ln <= RAM_BASE + RAM else DATA, ln, f, x)
    elif kind == "wrap":  # ends exactly at 2**64, and the next starts at 0
        d[i] = ((1 << 64) - length, length, flags, nxt)
        if i + 1 < n:
            d[i + 1] = (0, d[i + 1][1], d[i + 1][2], d[i + 1][3])
    return d


def put(rig: Rig, descs: list[Desc], head_flags: int = INDIRECT,
        head_len: int | None = None) -> None:
    gpa = tables.put(rig, descs, head_flags, head_len)
    assert gpa + virtq_desc.size * len(descs) <= DATA  # below the buffers


def test_linux_shaped_tables_take_the_page_walk_and_agree(rig: Rig, monkeypatch) -> None:
    rnd = random.Random(21)
    taken = 0
    real = chain_mod.walk_pages

    def counting(*args: object) -> object:
        nonlocal taken
        got = real(*args)  # type: ignore[arg-type]
        taken += got is not None
        return got

    for _ in range(300):
        put(rig, linux_table(rnd))
        monkeypatch.setattr(chain_mod, "walk_pages", counting)
        fast = outcome(rig, general=False)
        monkeypatch.setattr(chain_mod, "walk_pages", real)
        assert fast == outcome(rig, general=True)
        assert fast[0] == "chain", fast
    assert taken == 300  # every one took the page walk


def test_runs_become_one_view_each(rig: Rig) -> None:
    """A 1 MiB WRITE in 3 runs of pages: header and arguments, 3 data views, the reply."""
    pages = 256
    descs: list[Desc] = [(DATA, 40, NEXT, 1), (DATA + 64, 40, NEXT, 2)]
    starts = [DATA + PAGE * k for k in (16, 120, 400)]
    for k in range(pages):
        run, pos = divmod(k, 100) if k < 200 else (2, k - 200)
        descs.append((starts[run] + pos * PAGE, PAGE, NEXT, len(descs) + 1))
    descs += [(DATA + 2 * PAGE, 16, WRITE | NEXT, len(descs) + 1), (DATA + 2 * PAGE + 16, 24,
                                                                   WRITE, 0)]
    put(rig, descs)
    kind, _, readable, writable, rlen, wlen = outcome(rig, general=False)
    assert kind == "chain"
    assert [n for _, n in readable] == [40, 40, 100 * PAGE, 100 * PAGE, 56 * PAGE]
    assert [n for _, n in writable] == [40]  # out header and out args are adjacent
    assert (rlen, wlen) == (80 + pages * PAGE, 40)
    assert outcome(rig, general=True) == (kind, 0, readable, writable, rlen, wlen)


def test_broken_tables_get_the_general_walks_verdict(rig: Rig) -> None:
    rnd = random.Random(22)
    verdicts = set()
    for _ in range(1200):
        descs = break_one(rnd, linux_table(rnd))
        put(rig, descs)
        fast = outcome(rig, general=False)
        assert fast == outcome(rig, general=True), descs
        verdicts.add(fast[0] if fast[0] == "chain" else fast[1].split(" ")[0])
    assert "chain" in verdicts and len(verdicts) >= 4


def test_the_u32_limit_is_the_callers_and_holds(rig: Rig, monkeypatch) -> None:
    """walk_chain refuses a chain past the limit whichever walk found it."""
    rnd = random.Random(23)
    descs = linux_table(rnd, 64)
    put(rig, descs)
    total = sum(length for _, length, _, _ in descs)
    monkeypatch.setattr(chain_mod, "MAX_CHAIN_BYTES", total - 1)
    assert outcome(rig, general=False) == outcome(rig, general=True) \
        == ("refused", "chain length overflows u32")


@pytest.mark.parametrize("head_flags,head_len", [
    (INDIRECT | WRITE, None),                   # the general walk
    (INDIRECT | NEXT, None),                    # refused
    (INDIRECT, 16 * MIN_UNPACKED_TABLE + 8),    # not a multiple of 16: refused
    (INDIRECT, 16 * (MAX_UNPACKED_TABLE + 1)),  # longer than the page walk takes
])
def test_other_heads_are_left_to_the_general_walk(rig: Rig, head_flags: int,
                                                  head_len: int | None) -> None:
    rnd = random.Random(24)
    descs = linux_table(rnd, MIN_UNPACKED_TABLE + 4)
    put(rig, descs + [(DATA, 8, WRITE, 0)] * (MAX_UNPACKED_TABLE + 1 - len(descs)),
        head_flags, head_len)
    assert outcome(rig, general=False) == outcome(rig, general=True)


def test_walk_pages_refuses_what_it_does_not_know() -> None:
    """Direct calls: a buffer outside the given view, or Linux's shape broken."""
    view = memoryview(bytearray(128 << 10))
    table = [(0x1000 + PAGE * i, PAGE, NEXT, i + 1) for i in range(MIN_UNPACKED_TABLE)]
    table[-1] = (table[-1][0], PAGE, 0, 0)
    raw = b"".join(virtq_desc.pack(*d) for d in table)
    view[:len(raw)] = raw
    got = walk_pages(view, 0, len(view), 0, len(table))
    assert got is not None
    readable, writable, rlen, wlen = got
    assert [len(v) for v in readable] == [PAGE * len(table)] and writable == []
    assert (rlen, wlen) == (PAGE * len(table), 0)
    assert walk_pages(view, 0, 0x1000 + PAGE * len(table) - 1, 0, len(table)) is None
    assert walk_pages(view, 0x2000, len(view), 0, len(table)) is None  # below the view


def test_masks_for_many_table_lengths_stay_bounded() -> None:
    """A guest cycling through every table length cannot grow the worker's
    cache of per-length constants past its bound."""
    from shardfs.virtq import pagewalk
    view = memoryview(bytearray(32 << 10))
    for num in range(MIN_UNPACKED_TABLE, MIN_UNPACKED_TABLE + 3 * pagewalk._MAX_CACHED):
        table = [(0x4000 + 16 * i, 16, NEXT, i + 1) for i in range(num)]
        table[-1] = (table[-1][0], 16, 0, 0)
        raw = b"".join(virtq_desc.pack(*d) for d in table)
        view[:len(raw)] = raw
        got = walk_pages(view, 0, len(view), 0, num)
        assert got is not None and got[2] == 16 * num
        assert len(pagewalk._MASKS) <= pagewalk._MAX_CACHED
