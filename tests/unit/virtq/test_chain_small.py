"""The short-indirect-table walks give exactly what the general walk gives.

:func:`shardfs.virtq.chain.walk_chain` first tries ``_walk_small``, a walk
of the one shape Linux sends (an INDIRECT head whose short table lists the
buffers in order), and before it, for four and five entries, ``_walk_four``
and ``_walk_five`` (two readable and two writable, three and two: the same
walk unrolled); it falls back to the general walk for anything else.
Here both are run on the same tables: Linux-shaped ones, and the same with
one thing broken, so every refusal and every fallback is compared too.  The
views are compared by address and length, not content.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from shardfs.abi.virtio import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from shardfs.virtq import chain as chain_mod
from shardfs.virtq.chain import MIN_UNPACKED_TABLE, DescriptorChain
from tests.unit.support import RAM_BASE, Rig
from tests.unit.virtq import tables
from tests.unit.virtq.tables import Desc, put

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
NUM = 16
RAM = 1 << 20


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig(num=NUM, size=RAM) as r:
        yield r


#: The short-table walks; all off, only the general walk decides.
SHORT_WALKS = ("_walk_small", "_walk_four", "_walk_five")


def outcome(rig: Rig, general: bool) -> tuple[object, ...]:
    """The walk of the chain at head 0; ``general``: without the short walks."""
    return tables.outcome(rig, NUM, SHORT_WALKS if general else ())


def linux_table(rnd: random.Random, rig: Rig) -> list[Desc]:
    """Readable then writable buffers, in order, each at a random place or
    right after the one before (so that merging is exercised)."""
    n = rnd.randint(1, MIN_UNPACKED_TABLE - 1)
    readable = rnd.randint(0, n)
    descs: list[Desc] = []
    addr = RAM_BASE + 64 * 1024
    for i in range(n):
        length = rnd.choice((1, 16, 40, 104, 4096, rnd.randint(1, 5000)))
        if not (descs and rnd.random() < 0.3) or addr + length > RAM_BASE + RAM:
            addr = RAM_BASE + 64 * 1024 + rnd.randrange(0, RAM - 64 * 1024 - length)
        flags = (WRITE if i >= readable else 0) | (NEXT if i < n - 1 else 0)
        descs.append((addr, length, flags, i + 1 if i < n - 1 else 0))
        addr += length
    return descs


def break_one(rnd: random.Random, descs: list[Desc]) -> list[Desc]:
    """The table with one rule (or the in-order shape) broken somewhere."""
    d = list(descs)
    i = rnd.randrange(len(d))
    addr, length, flags, nxt = d[i]
    kind = rnd.choice(("zero", "order", "last-next", "nested", "read-after-write",
                       "outside", "crossing", "stop-early", "loop", "huge"))
    if kind == "zero":
        d[i] = (addr, 0, flags, nxt)
    elif kind == "order" and len(d) > 2:
        d[i] = (addr, length, flags | NEXT, rnd.randrange(len(d)))
    elif kind == "last-next":
        d[-1] = (d[-1][0], d[-1][1], d[-1][2] | NEXT, rnd.choice((len(d), 0, len(d) - 1)))
    elif kind == "nested":
        d[i] = (addr, 32, flags | INDIRECT, nxt)
    elif kind == "read-after-write":
        d[i] = (addr, length, flags & ~WRITE, nxt)
        if i:
            d[i - 1] = (d[i - 1][0], d[i - 1][1], d[i - 1][2] | WRITE, d[i - 1][3])
    elif kind == "outside":
        d[i] = (rnd.choice((0, RAM_BASE - 4096, RAM_BASE + RAM, 1 << 60)), length, flags, nxt)
    elif kind == "crossing":
        d[i] = (RAM_BASE + RAM - 8, 64, flags, nxt)
    elif kind == "stop-early":
        d[i] = (addr, length, flags & ~NEXT, nxt)
    elif kind == "loop":
        d[i] = (addr, length, flags | NEXT, i)
    elif kind == "huge":
        d[i] = (addr, 0xFFFF_FFFF, flags, nxt)
    return d


def test_linux_shaped_tables_take_the_short_walk_and_agree(rig: Rig, monkeypatch) -> None:
    rnd = random.Random(11)
    taken = 0
    real = {name: getattr(chain_mod, name) for name in SHORT_WALKS}

    def counting(name: str) -> object:
        def walk(*args: object) -> DescriptorChain | None:
            nonlocal taken
            got = real[name](*args)
            taken += got is not None
            return got
        return walk

    for _ in range(400):
        put(rig, linux_table(rnd, rig))
        with monkeypatch.context() as m:
            for name in SHORT_WALKS:
                m.setattr(chain_mod, name, counting(name))
            fast = outcome(rig, general=False)
        assert fast == outcome(rig, general=True)
        assert fast[0] == "chain", fast
    assert taken == 400  # every one of them took a short walk


@pytest.mark.parametrize("readable", [2, 3])
def test_unrolled_walks_take_their_shapes_and_agree(rig: Rig, readable: int,
                                                    monkeypatch) -> None:
    """Every pattern of adjacent neighbours, for _walk_four (2 + 2 entries)
    and _walk_five (3 + 2)."""
    name = "_walk_four" if readable == 2 else "_walk_five"
    real = getattr(chain_mod, name)
    taken: list[object] = []

    def counting(*args: object) -> object:
        taken.append(real(*args))
        return taken[-1]

    monkeypatch.setattr(chain_mod, name, counting)
    n = readable + 2
    for pattern in range(1 << (n - 1)):
        addr, descs = RAM_BASE + 64 * 1024, []
        for i in range(n):
            if i and not pattern >> (i - 1) & 1:
                addr += 4096  # not adjacent to the entry before
            length = (40, 16, 300, 16, 104)[i]
            flags = (WRITE if i >= readable else 0) | (NEXT if i < n - 1 else 0)
            descs.append((addr, length, flags, i + 1))  # Linux's last next: i + 1
            addr += length
        put(rig, descs)
        assert outcome(rig, general=False) == outcome(rig, general=True), descs
    assert len(taken) == 1 << (n - 1) and all(c is not None for c in taken)


def test_broken_tables_get_the_general_walks_verdict(rig: Rig) -> None:
    rnd = random.Random(12)
    verdicts = set()
    for _ in range(1500):
        descs = break_one(rnd, linux_table(rnd, rig))
        put(rig, descs)
        fast = outcome(rig, general=False)
        assert fast == outcome(rig, general=True), descs
        verdicts.add(fast[0] if fast[0] == "chain" else fast[1].split(" ")[0])
    # Both kinds of outcome were met, and refusals of several kinds.
    assert "chain" in verdicts and len(verdicts) >= 4


@pytest.mark.parametrize("head_flags,head_len", [
    (INDIRECT | WRITE, None),       # the device ignores WRITE here: the general walk
    (INDIRECT | NEXT, None),        # refused
    (INDIRECT, 24),                 # not a multiple of 16: refused
    (INDIRECT, 0),                  # empty: refused
    (INDIRECT, 16 * MIN_UNPACKED_TABLE),  # long: the unpacked walk
])
def test_other_heads_are_left_to_the_general_walk(rig: Rig, head_flags: int,
                                                  head_len: int | None) -> None:
    rnd = random.Random(13)
    descs = linux_table(rnd, rig)
    descs += [(RAM_BASE + 8192, 8, WRITE, 0)] * (MIN_UNPACKED_TABLE - len(descs))
    put(rig, descs, head_flags, head_len)
    assert outcome(rig, general=False) == outcome(rig, general=True)


def test_broken_unrolled_shapes_get_the_general_walks_verdict(rig: Rig) -> None:
    """The 2 + 2 and 3 + 2 shapes with one thing broken: _walk_four and
    _walk_five decline or agree, as the general walk decides."""
    rnd = random.Random(14)
    for _ in range(800):
        readable = rnd.choice((2, 3))
        n = readable + 2
        descs: list[Desc] = []
        for i in range(n):
            addr = RAM_BASE + 64 * 1024 + rnd.randrange(0, RAM // 2)
            if descs and rnd.random() < 0.4:
                addr = descs[-1][0] + descs[-1][1]
            flags = (WRITE if i >= readable else 0) | (NEXT if i < n - 1 else 0)
            descs.append((addr, rnd.choice((16, 40, 104, 4096)), flags, i + 1))
        descs = break_one(rnd, descs)
        put(rig, descs)
        assert outcome(rig, general=False) == outcome(rig, general=True), descs
