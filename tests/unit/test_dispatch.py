"""Dispatcher: FUSE requests from real descriptor chains into a fake FileSystem.

Requests are laid out by the guest-side driver and popped from a SplitQueue,
so the dispatcher reads them exactly as a worker would, views into guest
memory included.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

import pytest

from shardfs import dispatch as D
from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.dispatch import Dispatcher
from shardfs.fs.api import Context, DirEntry, Entry, FileSystem, FsError, Opened, check_name
from tests.unit.support import Rig, fuse_request

ROOT = F.FUSE_ROOT_ID
OUT = F.fuse_out_header.size


def mkstat(ino: int, mode: int = stat.S_IFREG | 0o644, size: int = 0) -> os.stat_result:
    return os.stat_result((mode, ino, 0, 1, 1000, 1000, size, 1, 2, 3),
                          {"st_atime_ns": 1_000_000_001, "st_mtime_ns": 2_000_000_002,
                           "st_ctime_ns": 3_000_000_003, "st_blocks": (size + 511) // 512,
                           "st_blksize": 4096, "st_rdev": 0})


class FakeFs(FileSystem):
    """A root directory with a few files, recording what the dispatcher asks."""

    DATA = bytes(range(256)) * 40  # 10 KiB, recognisable at every offset

    def __init__(self) -> None:
        self.children = {b"a": 2, b"b": 3, b"c": 4, b"d": 5, b"e": 6}
        self.listing = [b".", b"..", *self.children, b"gone"]  # "gone" vanished since readdir
        self.lookups: list[bytes] = []
        self.forgets: list[tuple[int, int]] = []
        self.init_capable: list[int] = []
        self.init_wants = F.FUSE_POSIX_ACL | F.FUSE_FLOCK_LOCKS | F.FUSE_HAS_INODE_DAX
        self.destroyed = 0
        self.pulled = 0
        self.read_buffers: list[memoryview] = []
        self.written: bytes | None = None
        self.read_overrun = 0

    def init(self, capable: int) -> int:
        self.init_capable.append(capable)
        return self.init_wants

    def destroy(self) -> None:
        self.destroyed += 1

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        self.lookups.append(name)
        check_name(name)
        if parent != ROOT or name not in self.children:
            raise FsError(errno.ENOENT)
        nid = self.children[name]
        return Entry(nid, 7, mkstat(nid), 1.5, 2.25)

    def forget(self, nodeid: int, nlookup: int) -> None:
        self.forgets.append((nodeid, nlookup))

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[os.stat_result, float]:
        if nodeid == ROOT:
            return mkstat(ROOT, stat.S_IFDIR | 0o755), 1.0
        if nodeid in self.children.values():
            return mkstat(nodeid, size=len(self.DATA)), 1.0
        raise FsError(errno.ENOENT)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        raise FsError(errno.EEXIST)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        raise PermissionError(errno.EACCES, "denied")

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        raise RuntimeError("a bug in the filesystem")

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        self.lookups.append(name + b"->" + target)
        return Entry(9, 0, mkstat(9, stat.S_IFLNK | 0o777), 1.0, 1.0)

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        return Opened(11, 0)

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int) -> Iterator[DirEntry]:
        for i, name in enumerate(self.listing[offset:], start=offset):
            self.pulled += 1
            yield DirEntry(100 + i, i + 1, 4 if name in (b".", b"..") else 8, name)

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int,
             buffers: list[memoryview]) -> int:
        self.read_buffers = buffers
        pos = offset
        for b in buffers:
            chunk = self.DATA[pos:pos + len(b)]
            b[:len(chunk)] = chunk
            pos += len(chunk)
        return pos - offset + self.read_overrun

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int,
              buffers: list[memoryview], write_flags: int) -> int:
        self.written = b"".join(bytes(b) for b in buffers)
        return len(self.written)

    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        return os.statvfs_result((4096, 4096, 1000, 500, 400, 100, 90, 90, 0, 255))


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig(num=256) as r:
        yield r


@pytest.fixture
def fs() -> FakeFs:
    return FakeFs()


@pytest.fixture
def disp(fs: FakeFs) -> Dispatcher:
    return Dispatcher(fs)


class Served:
    def __init__(self, used: int, reply: bytes) -> None:
        self.used = used
        self.reply = reply
        if used >= OUT:
            self.len, self.error, self.unique = F.fuse_out_header.unpack_from(reply)
            assert self.len == used
        self.body = reply[OUT:]


def serve(rig: Rig, disp: Dispatcher, request: bytes, wlen: int = 8192, **kw: object) -> Served:
    chain, wbufs = rig.chain(request, wlen, **kw)  # type: ignore[arg-type]
    used = disp.handle(chain)
    reply = rig.reply(wbufs, max(used, wlen))
    assert rig.complete(chain.head, used)[0][1] == used
    return Served(used, reply[:used] if used else reply)


def call(rig: Rig, disp: Dispatcher, opcode: int, body: bytes = b"", nodeid: int = ROOT,
         wlen: int = 8192, **kw: object) -> Served:
    return serve(rig, disp, fuse_request(opcode, body, nodeid=nodeid), wlen, **kw)


def init_body(major: int = 7, minor: int = 41, flags: int = 0, flags2: int = 0,
              readahead: int = 0x20000) -> bytes:
    raw = F.fuse_init_in.pack(major, minor, readahead, flags, flags2)
    return raw if minor >= 36 else raw[:F.FUSE_COMPAT_INIT_IN_SIZE]


# -- framing and error contract ---------------------------------------------------------


@pytest.mark.parametrize("n", [1, 24, 39])
def test_truncated_in_header_is_dropped(rig: Rig, disp: Dispatcher, n: int) -> None:
    s = serve(rig, disp, fuse_request(Op.FUSE_GETATTR, bytes(16))[:n], 64)
    assert s.used == 0
    assert s.reply == bytes(64)  # nothing written
    assert disp.stats.malformed == 1 and disp.stats.dropped == 1


def test_chain_with_no_readable_part_is_dropped(rig: Rig, disp: Dispatcher) -> None:
    chain, _ = rig.chain(b"", 64)
    assert chain.readable_len == 0
    assert disp.handle(chain) == 0
    assert disp.stats.malformed == 1 and disp.stats.dropped == 1


@pytest.mark.parametrize("delta", [1, 100, 1 << 20])
def test_header_len_larger_than_the_chain_is_einval(rig: Rig, disp: Dispatcher,
                                                     delta: int) -> None:
    body = F.fuse_getattr_in.pack(0, 0, 0)
    s = serve(rig, disp, fuse_request(Op.FUSE_GETATTR, body, length=40 + len(body) + delta,
                                      unique=99))
    assert (s.used, s.error, s.unique) == (OUT, -errno.EINVAL, 99)
    assert disp.stats.malformed == 1


@pytest.mark.parametrize("length", [0, 39])
def test_header_len_shorter_than_the_header_is_einval(rig: Rig, disp: Dispatcher,
                                                       length: int) -> None:
    s = serve(rig, disp, fuse_request(Op.FUSE_GETATTR, bytes(16), length=length))
    assert s.error == -errno.EINVAL


def test_header_len_counts_extensions(rig: Rig, disp: Dispatcher, fs: FakeFs) -> None:
    """total_extlen 8-byte units after the arguments are not part of the name."""
    body = b"a\0" + bytes(6) + b"EXTENSN!"
    s = serve(rig, disp, fuse_request(Op.FUSE_LOOKUP, body, extlen=1))
    assert s.error == 0 and fs.lookups == [b"a"]
    s = serve(rig, disp, fuse_request(Op.FUSE_LOOKUP, b"a\0", extlen=1))  # ext longer than len
    assert s.error == -errno.EINVAL


@pytest.mark.parametrize("opcode", [999, 0, Op.FUSE_BMAP, Op.FUSE_SETUPMAPPING,
                                    Op.FUSE_REMOVEMAPPING, Op.FUSE_POLL, Op.FUSE_GETLK,
                                    Op.FUSE_TMPFILE])
def test_unknown_opcode_is_enosys(rig: Rig, disp: Dispatcher, opcode: int) -> None:
    s = serve(rig, disp, fuse_request(opcode, bytes(64), unique=5))
    assert (s.error, s.unique, s.used) == (-errno.ENOSYS, 5, OUT)


def test_fs_error_becomes_minus_errno(rig: Rig, disp: Dispatcher) -> None:
    s = call(rig, disp, Op.FUSE_MKDIR, F.fuse_mkdir_in.pack(0o755, 0o022) + b"x\0")
    assert s.error == -errno.EEXIST
    s = call(rig, disp, Op.FUSE_UNLINK, b"x\0")  # an OSError from the fs
    assert s.error == -errno.EACCES
    s = call(rig, disp, Op.FUSE_READLINK, nodeid=2)  # not overridden: the ENOSYS default
    assert s.error == -errno.ENOSYS
    assert disp.stats.bugs == 0 and disp.stats.errors == 3


def test_unexpected_exception_is_eio_and_counted(rig: Rig, disp: Dispatcher,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    s = call(rig, disp, Op.FUSE_RMDIR, b"x\0")
    assert s.error == -errno.EIO
    assert disp.stats.bugs == 1
    assert "a bug in the filesystem" in caplog.text  # logged with its traceback
    # The dispatcher is still fine afterwards.
    assert call(rig, disp, Op.FUSE_GETATTR, F.fuse_getattr_in.pack(0, 0, 0)).error == 0


@pytest.mark.parametrize("opcode,body", [
    (Op.FUSE_LOOKUP, b"abc"),
    (Op.FUSE_LOOKUP, b""),
    (Op.FUSE_UNLINK, b"x" * 5000),
    (Op.FUSE_MKDIR, F.fuse_mkdir_in.pack(0o755, 0) + b"dir"),
    (Op.FUSE_SYMLINK, b"name\0target"),
    (Op.FUSE_RENAME, F.fuse_rename_in.pack(1) + b"old\0new"),
])
def test_unterminated_names_are_einval(rig: Rig, disp: Dispatcher, fs: FakeFs, opcode: int,
                                       body: bytes) -> None:
    s = call(rig, disp, opcode, body)
    assert s.error == -errno.EINVAL
    assert disp.stats.malformed == 1
    assert fs.lookups == []


def test_short_op_struct_is_einval(rig: Rig, disp: Dispatcher) -> None:
    s = call(rig, disp, Op.FUSE_GETATTR, bytes(F.fuse_getattr_in.size - 1))
    assert s.error == -errno.EINVAL and disp.stats.malformed == 1


def test_names_with_nul_and_slash_reach_the_fs_check(rig: Rig, disp: Dispatcher) -> None:
    assert call(rig, disp, Op.FUSE_LOOKUP, b"../etc\0").error == -errno.EINVAL
    assert call(rig, disp, Op.FUSE_LOOKUP, b"..\0").error == -errno.EINVAL
    assert call(rig, disp, Op.FUSE_LOOKUP, b"a\0trailing").error == 0  # name ends at the NUL


# -- replies ------------------------------------------------------------------------------


def test_lookup_reply(rig: Rig, disp: Dispatcher) -> None:
    s = call(rig, disp, Op.FUSE_LOOKUP, b"c\0")
    assert s.error == 0 and s.used == OUT + F.fuse_entry_out.size
    e = F.fuse_entry_out.unpack(s.body)
    assert e[:6] == (4, 7, 1, 2, 500_000_000, 250_000_000)
    assert e[6] == 4  # attr.ino
    assert e[6 + 6:6 + 9] == (1, 2, 3)  # atime/mtime/ctime nsec


def test_request_split_anywhere_gives_the_same_reply(rig: Rig, disp: Dispatcher) -> None:
    request = fuse_request(Op.FUSE_LOOKUP, b"d\0", unique=77)
    expected = serve(rig, disp, request).reply
    for cut in range(1, len(request)):
        for wcut in (1, 15, 16, 17, 100):
            s = serve(rig, disp, request, 200, rsplits=[cut], wsplits=[wcut])
            assert s.reply == expected, (cut, wcut)


def test_statfs_reply(rig: Rig, disp: Dispatcher) -> None:
    s = call(rig, disp, Op.FUSE_STATFS)
    assert disp.stats.bugs == 0, "STATFS raised inside the dispatcher"
    assert s.error == 0
    blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, _ = F.fuse_kstatfs.unpack(
        s.body)
    assert (blocks, bfree, bavail, files, ffree, bsize, namelen, frsize) == (
        1000, 500, 400, 100, 90, 4096, 255, 4096)


def test_no_room_for_a_reply_header_is_dropped(rig: Rig, disp: Dispatcher) -> None:
    s = serve(rig, disp, fuse_request(Op.FUSE_GETATTR, F.fuse_getattr_in.pack(0, 0, 0)), 15)
    assert s.used == 0 and s.reply == bytes(15)
    assert disp.stats.dropped == 1
    s = serve(rig, disp, fuse_request(Op.FUSE_MKDIR, F.fuse_mkdir_in.pack(0, 0) + b"x\0"), 8)
    assert s.used == 0 and disp.stats.dropped == 2  # even an error reply needs a header


def test_no_writable_part_at_all(rig: Rig, disp: Dispatcher) -> None:
    chain, _ = rig.chain(fuse_request(Op.FUSE_GETATTR, F.fuse_getattr_in.pack(0, 0, 0)), 0)
    assert disp.handle(chain) == 0
    assert disp.stats.dropped == 1


def test_reply_larger_than_the_writable_buffer_is_not_written(rig: Rig, disp: Dispatcher) -> None:
    """An attr reply does not fit in 16+50 bytes: nothing past the buffer, only an error."""
    wlen = OUT + 50
    chain, wbufs = rig.chain(fuse_request(Op.FUSE_GETATTR, F.fuse_getattr_in.pack(0, 0, 0)),
                             wlen)
    guard = rig.buffer(b"\xAA" * 64)  # the next bytes in guest RAM
    used = disp.handle(chain)
    assert used in (0, OUT)  # dropped, or an error header only
    if used:
        assert F.fuse_out_header.unpack(rig.reply(wbufs, OUT))[1] < 0
    assert rig.ram.read(guard, 64) == b"\xAA" * 64
    rig.complete(chain.head, used)


def test_lookup_that_cannot_be_replied_leaves_no_lookup_count(rig: Rig, disp: Dispatcher,
                                                               fs: FakeFs) -> None:
    s = call(rig, disp, Op.FUSE_LOOKUP, b"a\0", wlen=OUT + 10)
    assert s.used in (0, OUT)
    counted = fs.lookups.count(b"a") - sum(n for nid, n in fs.forgets if nid == 2)
    assert counted == 0


# -- INIT ---------------------------------------------------------------------------------


def init_out(s: Served) -> tuple:
    return F.fuse_init_out.unpack(s.body)


@pytest.mark.parametrize("minor", list(range(31, 42)))
def test_init_accepts_minor_31_to_41(rig: Rig, disp: Dispatcher, minor: int) -> None:
    s = call(rig, disp, Op.FUSE_INIT, init_body(minor=minor))
    assert s.error == 0
    out = init_out(s)
    assert out[:3] == (7, min(minor, F.FUSE_KERNEL_MINOR_VERSION), 0x20000)
    assert out[6] == D.MAX_WRITE and out[8] == D.MAX_PAGES
    assert disp.initialized and disp.minor == min(minor, F.FUSE_KERNEL_MINOR_VERSION)


@pytest.mark.parametrize(("major", "minor"), [(7, 30), (7, 0), (6, 99), (0, 0)])
def test_init_refuses_old_protocols(rig: Rig, disp: Dispatcher, major: int, minor: int) -> None:
    s = call(rig, disp, Op.FUSE_INIT, init_body(major=major, minor=minor))
    assert s.error == -errno.EPROTO
    assert not disp.initialized


def test_init_newer_major_asks_for_a_retry(rig: Rig, disp: Dispatcher, fs: FakeFs) -> None:
    s = call(rig, disp, Op.FUSE_INIT, init_body(major=8, minor=0))
    assert s.error == 0
    assert len(s.body) == 8  # just major and minor: the kernel re-sends INIT with 7.x
    assert s.body[:4] == (7).to_bytes(4, "little")
    assert not disp.initialized and fs.init_capable == []


def test_init_too_short_is_einval(rig: Rig, disp: Dispatcher) -> None:
    s = call(rig, disp, Op.FUSE_INIT, init_body(minor=31)[:12])
    assert s.error == -errno.EINVAL


def test_init_flags_are_the_intersection(rig: Rig, disp: Dispatcher, fs: FakeFs) -> None:
    offered = (F.FUSE_ASYNC_READ | F.FUSE_POSIX_ACL | F.FUSE_WRITEBACK_CACHE
               | F.FUSE_DO_READDIRPLUS | F.FUSE_EXPORT_SUPPORT | F.FUSE_INIT_EXT)
    offered2 = (F.FUSE_HAS_INODE_DAX | F.FUSE_SECURITY_CTX) >> 32
    s = call(rig, disp, Op.FUSE_INIT, init_body(flags=offered, flags2=offered2))
    capable = offered | offered2 << 32
    assert fs.init_capable == [capable]
    wanted = Dispatcher.WANTED_INIT_FLAGS | fs.init_wants
    enabled = capable & wanted
    out = init_out(s)
    assert out[3] == enabled & 0xFFFFFFFF
    assert out[10] == enabled >> 32 == F.FUSE_HAS_INODE_DAX >> 32
    assert not out[3] & F.FUSE_WRITEBACK_CACHE  # offered, but not asked for
    assert not out[3] & F.FUSE_FLOCK_LOCKS  # asked for by the fs, but not offered
    assert not out[3] & F.FUSE_EXPORT_SUPPORT  # offered, wanted by nobody


def test_init_flags2_needs_init_ext(rig: Rig, disp: Dispatcher, fs: FakeFs) -> None:
    s = call(rig, disp, Op.FUSE_INIT, init_body(flags=F.FUSE_ASYNC_READ,
                                                flags2=F.FUSE_HAS_INODE_DAX >> 32))
    assert fs.init_capable == [F.FUSE_ASYNC_READ]
    assert init_out(s)[10] == 0


def test_init_writeback_only_when_the_fs_asks(rig: Rig, disp: Dispatcher, fs: FakeFs) -> None:
    offered = F.FUSE_WRITEBACK_CACHE | F.FUSE_ASYNC_READ
    assert not init_out(call(rig, disp, Op.FUSE_INIT, init_body(flags=offered)))[3] \
        & F.FUSE_WRITEBACK_CACHE
    fs.init_wants = F.FUSE_WRITEBACK_CACHE
    out = init_out(call(rig, disp, Op.FUSE_INIT, init_body(flags=offered)))
    assert out[3] == offered


def test_init_offering_nothing_enables_nothing(rig: Rig, disp: Dispatcher) -> None:
    assert init_out(call(rig, disp, Op.FUSE_INIT, init_body()))[3] == 0


def test_reinit_without_destroy_destroys_first(rig: Rig, disp: Dispatcher, fs: FakeFs) -> None:
    call(rig, disp, Op.FUSE_INIT, init_body())
    assert fs.destroyed == 0
    assert call(rig, disp, Op.FUSE_INIT, init_body()).error == 0  # guest rebooted
    assert fs.destroyed == 1
    assert call(rig, disp, Op.FUSE_DESTROY).error == 0
    assert fs.destroyed == 2 and not disp.initialized
    call(rig, disp, Op.FUSE_INIT, init_body())
    assert fs.destroyed == 2  # a clean INIT after DESTROY destroys nothing more


# -- FORGET -------------------------------------------------------------------------------


def test_forget_has_no_reply(rig: Rig, disp: Dispatcher, fs: FakeFs) -> None:
    s = call(rig, disp, Op.FUSE_FORGET, F.fuse_forget_in.pack(3), nodeid=4, wlen=0)
    assert s.used == 0
    assert fs.forgets == [(4, 3)]
    assert disp.stats.malformed == 0


def test_truncated_forget_is_malformed(rig: Rig, disp: Dispatcher, fs: FakeFs) -> None:
    s = call(rig, disp, Op.FUSE_FORGET, bytes(4), nodeid=4, wlen=0)
    assert s.used == 0 and fs.forgets == [] and disp.stats.malformed == 1


def test_batch_forget(rig: Rig, disp: Dispatcher, fs: FakeFs) -> None:
    body = F.fuse_batch_forget_in.pack(3, 0) + b"".join(
        F.fuse_forget_one.pack(n, n * 10) for n in (2, 3, 4))
    s = call(rig, disp, Op.FUSE_BATCH_FORGET, body, wlen=0, rsplits=[45, 61])
    assert s.used == 0
    assert fs.forgets == [(2, 20), (3, 30), (4, 40)]


@pytest.mark.parametrize("count", [3, 1000, D.MAX_BATCH_FORGET + 1, 0xFFFFFFFF])
def test_batch_forget_count_beyond_the_payload(rig: Rig, disp: Dispatcher, fs: FakeFs,
                                               count: int) -> None:
    body = F.fuse_batch_forget_in.pack(count, 0) + F.fuse_forget_one.pack(2, 1) * 2
    s = call(rig, disp, Op.FUSE_BATCH_FORGET, body, wlen=0)
    assert s.used == 0
    assert disp.stats.malformed == 1
    assert fs.forgets == []  # nothing applied from a request that lies about its size


def test_interrupt_has_no_reply(rig: Rig, disp: Dispatcher) -> None:
    s = call(rig, disp, Op.FUSE_INTERRUPT, F.fuse_interrupt_in.pack(5), wlen=64)
    assert s.used == 0


# -- READ and WRITE -----------------------------------------------------------------------


def test_read_fills_the_writable_side_in_place(rig: Rig, disp: Dispatcher, fs: FakeFs) -> None:
    size = 3000
    body = F.fuse_read_in.pack(11, 100, size, 0, 0, 0, 0)
    s = call(rig, disp, Op.FUSE_READ, body, nodeid=2, wlen=OUT + size, wsplits=[7, 16, 1000])
    assert s.error == 0 and s.used == OUT + size
    assert s.body == FakeFs.DATA[100:100 + size]
    # Zero-copy: the fs got views of guest memory itself, starting after the header.
    mapping = rig.mem.regions[0].mapping
    assert fs.read_buffers and all(b.obj is mapping for b in fs.read_buffers)
    assert [len(b) for b in fs.read_buffers] == [984, size - 984]
    assert disp.stats.bytes_read == size


def test_short_read(rig: Rig, disp: Dispatcher) -> None:
    body = F.fuse_read_in.pack(11, len(FakeFs.DATA) - 10, 4096, 0, 0, 0, 0)
    s = call(rig, disp, Op.FUSE_READ, body, nodeid=2, wlen=OUT + 4096)
    assert s.used == OUT + 10 and s.body == FakeFs.DATA[-10:]


def test_read_is_clipped_to_the_buffer(rig: Rig, disp: Dispatcher, fs: FakeFs) -> None:
    body = F.fuse_read_in.pack(11, 0, 4096, 0, 0, 0, 0)
    s = call(rig, disp, Op.FUSE_READ, body, nodeid=2, wlen=OUT + 100)
    assert s.used == OUT + 100
    assert sum(len(b) for b in fs.read_buffers) == 100


def test_read_reply_larger_than_the_buffer_is_dropped(rig: Rig, disp: Dispatcher,
                                                      fs: FakeFs) -> None:
    fs.read_overrun = 1  # a filesystem that claims one byte more than it was given
    body = F.fuse_read_in.pack(11, 0, 100, 0, 0, 0, 0)
    s = call(rig, disp, Op.FUSE_READ, body, nodeid=2, wlen=OUT + 100)
    assert s.used == 0
    assert disp.stats.dropped == 1


def test_read_larger_than_max_is_einval(rig: Rig, disp: Dispatcher) -> None:
    body = F.fuse_read_in.pack(11, 0, D.MAX_READ + 1, 0, 0, 0, 0)
    assert call(rig, disp, Op.FUSE_READ, body, nodeid=2).error == -errno.EINVAL


def test_write_hands_over_guest_memory(rig: Rig, disp: Dispatcher, fs: FakeFs) -> None:
    payload = b"0123456789" * 50
    body = F.fuse_write_in.pack(11, 0, len(payload), 0, 0, 0, 0) + payload
    s = call(rig, disp, Op.FUSE_WRITE, body, nodeid=2, rsplits=[50, 81, 300])
    assert s.error == 0
    assert F.fuse_write_out.unpack(s.body) == (len(payload), 0)
    assert fs.written == payload


def test_write_size_beyond_the_request_is_einval(rig: Rig, disp: Dispatcher,
                                                 fs: FakeFs) -> None:
    body = F.fuse_write_in.pack(11, 0, 1000, 0, 0, 0, 0) + b"short"
    assert call(rig, disp, Op.FUSE_WRITE, body, nodeid=2).error == -errno.EINVAL
    assert fs.written is None


# -- READDIR(PLUS) ------------------------------------------------------------------------


def parse_dirents(body: bytes, plus: bool) -> list[tuple[int, bytes]]:
    """(entry nodeid or 0, name) per record."""
    out = []
    pos = 0
    while pos < len(body):
        nodeid = 0
        if plus:
            nodeid = F.fuse_entry_out.unpack_from(body, pos)[0]
            pos += F.fuse_entry_out.size
        _ino, _off, namelen, _type = F.fuse_dirent.unpack_from(body, pos)
        name = body[pos + F.fuse_dirent.size:pos + F.fuse_dirent.size + namelen]
        rec = F.fuse_rec_align(F.fuse_dirent.size + namelen)
        pos += rec
        out.append((nodeid, name))
    assert pos == len(body)
    return out


def readdir(rig: Rig, disp: Dispatcher, size: int, plus: bool, offset: int = 0,
            wlen: int = 8192) -> Served:
    op = Op.FUSE_READDIRPLUS if plus else Op.FUSE_READDIR
    return call(rig, disp, op, F.fuse_read_in.pack(11, offset, size, 0, 0, 0, 0), wlen=wlen)


def test_readdirplus_looks_up_only_what_fits(rig: Rig, disp: Dispatcher, fs: FakeFs) -> None:
    rec = F.fuse_rec_align(F.FUSE_NAME_OFFSET_DIRENTPLUS + 1)  # one-letter names
    s = readdir(rig, disp, 3 * rec + rec - 1, plus=True)  # room for ".", ".." and "a"
    assert parse_dirents(s.body, plus=True) == [(0, b"."), (0, b".."), (2, b"a")]
    assert fs.lookups == [b"a"]  # "." and ".." are not looked up, "b" did not fit


def test_readdirplus_bounded_by_the_writable_buffer(rig: Rig, disp: Dispatcher,
                                                    fs: FakeFs) -> None:
    rec = F.fuse_rec_align(F.FUSE_NAME_OFFSET_DIRENTPLUS + 2)
    s = readdir(rig, disp, 4096, plus=True, wlen=OUT + 2 * rec)
    assert [n for _, n in parse_dirents(s.body, plus=True)] == [b".", b".."]
    assert fs.lookups == []


def test_readdirplus_whole_directory(rig: Rig, disp: Dispatcher, fs: FakeFs) -> None:
    s = readdir(rig, disp, 4096, plus=True)
    got = parse_dirents(s.body, plus=True)
    assert got == [(0, b"."), (0, b".."), (2, b"a"), (3, b"b"), (4, b"c"), (5, b"d"),
                   (6, b"e"), (0, b"gone")]  # a name that no longer resolves: nodeid 0
    assert fs.lookups == [b"a", b"b", b"c", b"d", b"e", b"gone"]


def test_readdirplus_resumes_at_offset(rig: Rig, disp: Dispatcher, fs: FakeFs) -> None:
    s = readdir(rig, disp, 4096, plus=True, offset=4)
    assert [n for _, n in parse_dirents(s.body, plus=True)] == [b"c", b"d", b"e", b"gone"]


def test_readdir_plain(rig: Rig, disp: Dispatcher, fs: FakeFs) -> None:
    rec = F.fuse_rec_align(F.FUSE_NAME_OFFSET + 1)
    s = readdir(rig, disp, 3 * rec, plus=False)
    assert [n for _, n in parse_dirents(s.body, plus=False)] == [b".", b"..", b"a"]
    assert fs.lookups == []
    assert fs.pulled <= 4  # stops pulling once the buffer is full


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("size", [4096, 1000, 333])
def test_readdir_records_byte_for_byte(rig: Rig, disp: Dispatcher, fs: FakeFs, plus: bool,
                                       size: int) -> None:
    """Records packed in place equal the header-by-header packing they replaced:
    entries, dirents, names of every alignment, zero padding, zero entries for
    ".", ".." and names gone since the listing."""
    names = [b"x" * n for n in (1, 2, 7, 8, 9, 15, 16, 17, 100, 255)]
    fs.children = {n: 10 + i for i, n in enumerate(names)}
    fs.listing = [b".", b"..", *names[:5], b"gone", *names[5:]]
    want = bytearray()
    hdr = F.FUSE_NAME_OFFSET_DIRENTPLUS if plus else F.FUSE_NAME_OFFSET
    for i, name in enumerate(fs.listing):
        rec = F.fuse_rec_align(hdr + len(name))
        if len(want) + rec > size:
            break
        if plus:
            nid = fs.children.get(name)
            want += (D.pack_entry(Entry(nid, 7, mkstat(nid), 1.5, 2.25)) if nid
                     else bytes(F.fuse_entry_out.size))
        want += F.fuse_dirent.pack(100 + i, i + 1, len(name), 4 if name in (b".", b"..") else 8)
        want += name + bytes(rec - hdr - len(name))
    s = readdir(rig, disp, size, plus=plus)
    assert s.error == 0 and s.body == bytes(want)


def test_readdir_empty_buffer_gives_an_empty_reply(rig: Rig, disp: Dispatcher) -> None:
    s = readdir(rig, disp, 10, plus=False)
    assert s.error == 0 and s.used == OUT
