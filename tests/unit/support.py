"""Shared test doubles for the unit suite: a guest ring wired to the device side.

:class:`Rig` puts the guest's half (:class:`~shardfs.testing.driver.GuestRam`
and :class:`~shardfs.testing.driver.DriverQueue`) and the device's half
(:class:`~shardfs.virtq.memory.GuestMemory` mapping the same memfd, and a
:class:`~shardfs.virtq.split.SplitQueue`) side by side, so a test can publish a
chain as a driver would and pop it as a worker does.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence

from shardfs.abi import fuse as F
from shardfs.testing.driver import DriverQueue, GuestRam
from shardfs.virtq.chain import DescriptorChain
from shardfs.virtq.memory import GuestMemory
from shardfs.virtq.split import SplitQueue

#: Where the frontend "maps" guest RAM in its own address space (SET_VRING_ADDR space).
USER_BASE = 0x7F00_0000_0000
#: Guest-physical base of the test RAM: non-zero so gpa and offset never coincide.
RAM_BASE = 0x10_0000


def pieces(gpa: int, length: int, splits: Sequence[int]) -> list[tuple[int, int]]:
    """Cut ``[gpa, gpa + length)`` into (gpa, len) buffers at the offsets in ``splits``."""
    cuts = [0, *sorted(s for s in splits if 0 < s < length), length]
    return [(gpa + a, b - a) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


class Rig:
    """Guest RAM, a driver ring in it, and the device's view of both."""

    def __init__(self, num: int = 16, size: int = 1 << 20, *, event_idx: bool = False,
                 indirect: bool = True, base_idx: int = 0) -> None:
        self.ram = GuestRam(size, RAM_BASE)
        self.mem = GuestMemory()
        self.mem.add(RAM_BASE, size, USER_BASE, 0, self.ram.fd)
        self.drv = DriverQueue(self.ram, num)
        self.queue = SplitQueue(0)
        self.num = num
        self.event_idx = event_idx
        self.indirect = indirect
        self.queue.configure(num, self.drv.desc, self.drv.avail, self.drv.used, base_idx,
                             event_idx, indirect, self.mem)
        #: Buffers are allocated above this mark and released by :meth:`complete`.
        self.data_mark = self.ram.mark

    def close(self) -> None:
        self.mem.clear()
        self.ram.close()

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- buffers ----------------------------------------------------------------

    def buffer(self, data: bytes | int) -> int:
        """Allocate guest memory filled with ``data`` (or ``data`` zero bytes)."""
        payload = bytes(data) if isinstance(data, int) else data
        gpa = self.ram.alloc(max(len(payload), 1), 8)
        self.ram.write(gpa, payload)
        return gpa

    def publish(self, readable: bytes, writable_len: int, *, rsplits: Sequence[int] = (),
                wsplits: Sequence[int] = (), indirect: bool = False,
                ) -> tuple[int, list[tuple[int, int]]]:
        """Publish one chain; return its head and the writable (gpa, len) buffers.

        Each piece of a split is a buffer of its own with a gap before the
        next, so the device cannot merge them (virtq.chain merges adjacent
        descriptors) and every split is a split between views.
        """
        rbufs = self._apart(readable, rsplits) if readable else []
        wbufs = self._apart(bytes(writable_len), wsplits) if writable_len else []
        head = self.drv.add(rbufs, wbufs, indirect=indirect)
        return head, wbufs

    def _apart(self, data: bytes, splits: Sequence[int]) -> list[tuple[int, int]]:
        """``data`` cut at ``splits``, each piece in its own buffer, none adjacent."""
        out = []
        for off, n in pieces(0, len(data), splits):
            gpa = self.buffer(data[off:off + n])
            self.ram.alloc(8, 8)  # a gap: the next piece does not continue this one
            out.append((gpa, n))
        return out

    def chain(self, readable: bytes, writable_len: int = 0, **kw: object,
              ) -> tuple[DescriptorChain, list[tuple[int, int]]]:
        """Publish one chain and pop it on the device side."""
        _, wbufs = self.publish(readable, writable_len, **kw)  # type: ignore[arg-type]
        popped = self.queue.pop(self.mem)
        assert isinstance(popped, DescriptorChain), popped
        return popped, wbufs

    def reply(self, wbufs: list[tuple[int, int]], n: int) -> bytes:
        """The first ``n`` bytes the device wrote into the writable buffers."""
        out = b"".join(self.ram.read(gpa, length) for gpa, length in wbufs)
        return out[:n]

    def complete(self, head: int, length: int) -> list[tuple[int, int]]:
        """Device pushes ``head``; driver collects it; buffers are freed."""
        self.queue.push(head, length)
        used = self.drv.pop_used()
        self.ram.reset_alloc(self.data_mark)
        return used


def fuse_request(opcode: int, body: bytes = b"", *, nodeid: int = 1, unique: int = 7,
                 uid: int = 1000, gid: int = 1000, pid: int = 42, length: int | None = None,
                 extlen: int = 0) -> bytes:
    """A ``fuse_in_header`` (with ``len`` computed unless given) and its body."""
    if length is None:
        length = F.fuse_in_header.size + len(body)
    return F.fuse_in_header.pack(length, opcode, unique, nodeid, uid, gid, pid, extlen,
                                 0) + body


def open_fd_count() -> int:
    """How many fds this process holds (for leak checks).

    Garbage from earlier tests is collected first: an mmap or file an
    earlier test dropped in a cycle otherwise closed its fd in the middle of
    a later test's count, and that test failed by one, in some orders only.
    """
    gc.collect()
    return len(os.listdir("/proc/self/fd"))
