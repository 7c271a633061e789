"""Indirect tables for the walk-equivalence tests (test_chain_small, test_pagewalk).

Each test writes a table into a :class:`~tests.unit.support.Rig`'s guest RAM
behind an INDIRECT head at index 0, then walks it twice: as walk_chain does,
and with one of its shape-specific walks switched off, so that only the
general walk decides.  :func:`outcome` gives either walk's result as
comparable values: the views by guest address and length, or the refusal.
"""

from __future__ import annotations

import ctypes

from shardfs.abi.virtio import VIRTQ_DESC_F_INDIRECT, virtq_desc
from shardfs.virtq import chain as chain_mod
from shardfs.virtq.chain import ChainError, walk_chain
from tests.unit.support import Rig

Desc = tuple[int, int, int, int]


def address(v: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(v))


def outcome(rig: Rig, num: int, switch_off: str | tuple[str, ...] = ()) -> tuple[object, ...]:
    """The walk of the chain at head 0 of a ``num``-entry ring; ``switch_off``
    names walks in :mod:`shardfs.virtq.chain` that are made to decline.  An
    iovec tail (virtq.iovec) is materialized: its views are compared."""
    table = rig.mem.view(rig.drv.desc, virtq_desc.size * num)
    names = (switch_off,) if isinstance(switch_off, str) else switch_off
    saved = {name: getattr(chain_mod, name) for name in names}
    for name in names:
        setattr(chain_mod, name, lambda *a: None)
    try:
        c = walk_chain(rig.mem, table, num, 0, True)
    except ChainError as e:
        return ("refused", str(e))
    finally:
        for name, fn in saved.items():
            setattr(chain_mod, name, fn)
    c.materialize()
    return ("chain", c.head, [(address(v), len(v)) for v in c.readable],
            [(address(v), len(v)) for v in c.writable], c.readable_len, c.writable_len)


#: Every shape-specific walk of long tables: off, only the general walk decides.
LONG_WALKS = ("walk_pages", "walk_iovecs")


def put(rig: Rig, descs: list[Desc], head_flags: int = VIRTQ_DESC_F_INDIRECT,
        head_len: int | None = None) -> int:
    """Write ``descs`` as a table in fresh guest RAM, and head 0 pointing at
    it; return the table's guest address."""
    rig.ram.reset_alloc(rig.data_mark)
    gpa = rig.ram.alloc(virtq_desc.size * len(descs), 16)
    rig.ram.write(gpa, b"".join(virtq_desc.pack(*d) for d in descs))
    length = virtq_desc.size * len(descs) if head_len is None else head_len
    rig.drv.raw_desc(0, gpa, length, head_flags, 1)
    return gpa
