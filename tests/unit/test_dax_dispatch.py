"""The dispatcher's DAX ops and hooks, with a recording DaxMapper (no processes)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.dispatch import Dispatcher
from shardfs.fs.api import Context, FileSystem, FsError
from tests.unit.support import Rig, fuse_request

OUT = F.fuse_out_header.size
PAGE = 4096


class Fs(FileSystem):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def init(self, capable: int) -> int:
        return 0

    def destroy(self) -> None:
        self.calls.append(("destroy",))

    def forget(self, nodeid: int, nlookup: int) -> None:
        self.calls.append(("forget", nodeid, nlookup))

    def release(self, ctx: Context, nodeid: int, fh: int) -> None:
        if fh == 666:
            raise FsError(errno.EBADF)
        self.calls.append(("release", nodeid, fh))


class Dax:
    """Records what the dispatcher asks of the window."""

    map_alignment_log2 = 12

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.refuse: int = 0

    def setup(self, nodeid: int, fh: int, foffset: int, length: int, flags: int,
              moffset: int) -> None:
        self.calls.append(("setup", nodeid, fh, foffset, length, flags, moffset))
        if self.refuse:
            raise FsError(self.refuse)

    def remove(self, ranges: list[tuple[int, int]]) -> None:
        self.calls.append(("remove", [tuple(r) for r in ranges]))

    def released(self, nodeid: int, fh: int) -> None:
        self.calls.append(("released", nodeid, fh))

    def forgotten(self, nodeids: list[int]) -> None:
        self.calls.append(("forgotten", list(nodeids)))

    def destroy(self) -> None:
        self.calls.append(("destroy",))


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig(num=256, size=4 << 20) as r:
        yield r


def call(rig: Rig, disp: Dispatcher, opcode: int, body: bytes = b"", nodeid: int = 1,
         wlen: int = 4096) -> tuple[int, bytes]:
    """(error, reply body) of one request; error 0 = success."""
    chain, wbufs = rig.chain(fuse_request(opcode, body, nodeid=nodeid), wlen)
    used = disp.handle(chain)
    reply = rig.reply(wbufs, max(used, wlen))
    rig.complete(chain.head, used)
    if not used:
        return 0, b""
    _len, error, _unique = F.fuse_out_header.unpack_from(reply)
    return error, reply[OUT:used]


def init(rig: Rig, disp: Dispatcher, flags: int = 0xFFFF_FFFF) -> tuple[int, ...]:
    err, body = call(rig, disp, Op.FUSE_INIT, F.fuse_init_in.pack(7, 41, 0x20000, flags, 0))
    assert err == 0
    return tuple(F.fuse_init_out.unpack(body.ljust(F.fuse_init_out.size, b"\0")))


def test_without_dax_the_ops_are_enosys_and_init_says_nothing(rig: Rig) -> None:
    disp = Dispatcher(Fs())
    out = init(rig, disp)
    assert not out[3] & F.FUSE_MAP_ALIGNMENT and out[9] == 0
    body = F.fuse_setupmapping_in.pack(F.FUSE_SETUPMAPPING_NO_FH, 0, PAGE, 2, 0)
    assert call(rig, disp, Op.FUSE_SETUPMAPPING, body, 5)[0] == -errno.ENOSYS
    body = F.fuse_removemapping_in.pack(1) + F.fuse_removemapping_one.pack(0, PAGE)
    assert call(rig, disp, Op.FUSE_REMOVEMAPPING, body)[0] == -errno.ENOSYS


def test_init_announces_map_alignment_only_when_offered(rig: Rig) -> None:
    disp = Dispatcher(Fs(), Dax())
    out = init(rig, disp)
    assert out[3] & F.FUSE_MAP_ALIGNMENT and out[9] == 12
    out = init(rig, disp, flags=0xFFFF_FFFF & ~F.FUSE_MAP_ALIGNMENT)
    assert not out[3] & F.FUSE_MAP_ALIGNMENT and out[9] == 0


def test_setupmapping_passes_every_field_and_errno_back(rig: Rig) -> None:
    dax = Dax()
    disp = Dispatcher(Fs(), dax)
    body = F.fuse_setupmapping_in.pack(7, 2 * PAGE, 3 * PAGE, 3, 4 * PAGE)
    assert call(rig, disp, Op.FUSE_SETUPMAPPING, body, 5) == (0, b"")
    assert dax.calls == [("setup", 5, 7, 2 * PAGE, 3 * PAGE, 3, 4 * PAGE)]
    dax.refuse = errno.EACCES
    assert call(rig, disp, Op.FUSE_SETUPMAPPING, body, 5)[0] == -errno.EACCES
    assert call(rig, disp, Op.FUSE_SETUPMAPPING, body[:-1], 5)[0] == -errno.EINVAL
    assert disp.stats.malformed == 1


@pytest.mark.parametrize("count,entries,ok", [
    (1, 1, True),
    (256, 256, True),                                     # what a 4 KiB-page kernel sends
    (F.FUSE_REMOVEMAPPING_MAX_ENTRIES, F.FUSE_REMOVEMAPPING_MAX_ENTRIES, True),
    (0, 0, False),                                        # nothing to remove
    (2, 1, False),                                        # more than the request holds
    (F.FUSE_REMOVEMAPPING_MAX_ENTRIES + 1, F.FUSE_REMOVEMAPPING_MAX_ENTRIES + 1, False),
    ((1 << 32) - 1, 4, False),                            # absurd
])
def test_removemapping_count_is_bounded(rig: Rig, count: int, entries: int, ok: bool) -> None:
    dax = Dax()
    disp = Dispatcher(Fs(), dax)
    body = F.fuse_removemapping_in.pack(count) + b"".join(
        F.fuse_removemapping_one.pack(i * PAGE, PAGE) for i in range(entries))
    err, _ = call(rig, disp, Op.FUSE_REMOVEMAPPING, body)
    if ok:
        assert err == 0 and dax.calls == [("remove", [(i * PAGE, PAGE) for i in range(count)])]
    else:
        assert err == -errno.EINVAL and dax.calls == [] and disp.stats.malformed == 1


def test_release_forget_destroy_reach_the_window(rig: Rig) -> None:
    fs, dax = Fs(), Dax()
    disp = Dispatcher(fs, dax)
    init(rig, disp)
    call(rig, disp, Op.FUSE_RELEASE, F.fuse_release_in.pack(9, 0, 0, 0), 5)
    call(rig, disp, Op.FUSE_RELEASE, F.fuse_release_in.pack(666, 0, 0, 0), 5)  # EBADF
    call(rig, disp, Op.FUSE_FORGET, F.fuse_forget_in.pack(1), 6)
    call(rig, disp, Op.FUSE_BATCH_FORGET, F.fuse_batch_forget_in.pack(2, 0)
         + F.fuse_forget_one.pack(7, 1) + F.fuse_forget_one.pack(8, 2))
    call(rig, disp, Op.FUSE_DESTROY)
    init(rig, disp)
    init(rig, disp)  # a reboot: INIT without DESTROY drops the window too
    assert dax.calls == [("released", 5, 9), ("forgotten", [6]), ("forgotten", [7, 8]),
                         ("destroy",), ("destroy",)]
    # The filesystem acted first each time (the window follows its state).
    assert fs.calls.index(("release", 5, 9)) == 0
