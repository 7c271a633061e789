"""Contract tests for PassthroughFs against real host files.

Every result is checked against what the host kernel says about the same
files (``os.lstat`` and friends).  The guest is assumed hostile: forged ids,
names that try to leave the shared directory, symlinks planted on the host,
special files, and budget exhaustion are all exercised, and fd counts are
checked around failing operations.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import stat
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from shardfs.abi.fuse import (
    FATTR_ATIME,
    FATTR_ATIME_NOW,
    FATTR_FH,
    FATTR_GID,
    FATTR_KILL_SUIDGID,
    FATTR_MODE,
    FATTR_MTIME,
    FATTR_SIZE,
    FATTR_UID,
    FOPEN_CACHE_DIR,
    FOPEN_DIRECT_IO,
    FOPEN_KEEP_CACHE,
    FUSE_ROOT_ID,
    FUSE_WRITE_KILL_SUIDGID,
    FUSE_WRITEBACK_CACHE,
)
from shardfs.fs.api import Context, DirEntry, Entry, FsError, SetattrIn
from shardfs.fs.passthrough import PassthroughFs
from shardfs.fs.passthrough import sys as lsys
from shardfs.fs.passthrough.fs import FD_RESERVE
from shardfs.fs.passthrough.policy import AUTO_TIMEOUT_S

ROOT = Context(uid=0, gid=0, pid=1)
USER = Context(uid=1000, gid=1000, pid=2)
OTHER_GID = 4321
UMASK = 0o022
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLOCK = 4096
NSEC = 1_000_000_000
FORGED = 999_999
U64_MAX = (1 << 64) - 1
# d_type values from <dirent.h>.
DT_FIFO, DT_DIR, DT_REG, DT_LNK = 1, 4, 8, 10
DT_OF = {stat.S_IFIFO: DT_FIFO, stat.S_IFDIR: DT_DIR, stat.S_IFREG: DT_REG,
         stat.S_IFLNK: DT_LNK}

MakeFs = Callable[..., PassthroughFs]


# -- helpers -------------------------------------------------------------------


def errno_of(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """The errno ``fn`` fails with (FsError or OSError); fail if it succeeds."""
    try:
        fn(*args, **kwargs)
    except FsError as e:
        return e.errno
    except OSError as e:
        assert e.errno is not None
        return e.errno
    raise AssertionError(f"{getattr(fn, '__name__', fn)} did not fail")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def snapshot(root: Path) -> dict[str, tuple[int, ...]]:
    """Every path under ``root`` with its lstat essentials (dir mtimes included)."""
    out: dict[str, tuple[int, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [".", *dirnames, *filenames]:
            p = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                      st.st_nlink, st.st_ino)
    return out


STAT_FIELDS = ("st_ino", "st_dev", "st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
               "st_mtime_ns", "st_ctime_ns", "st_rdev", "st_blocks")


def assert_same_stat(got: os.stat_result, path: Path) -> None:
    want = os.lstat(path)
    for f in STAT_FIELDS:
        assert getattr(got, f) == getattr(want, f), f


def setattr_in(valid: int, **kw: int) -> SetattrIn:
    fields = dict(fh=0, size=0, atime_ns=0, mtime_ns=0, mode=0, uid=0, gid=0)
    fields.update(kw)
    return SetattrIn(valid=valid, **fields)


def lookup(fs: PassthroughFs, path: str, parent: int = FUSE_ROOT_ID) -> Entry:
    """Walk ``a/b/c`` one component at a time, as the guest would."""
    e: Entry | None = None
    for name in path.split("/"):
        e = fs.lookup(ROOT, parent, name.encode())
        parent = e.nodeid
    assert e is not None
    return e


def read_all(fs: PassthroughFs, nodeid: int, fh: int, size: int, offset: int = 0) -> bytes:
    buf = bytearray(size)
    n = fs.read(ROOT, nodeid, fh, offset, [memoryview(buf)])
    return bytes(buf[:n])


def list_dir(fs: PassthroughFs, nodeid: int, offset: int = 0) -> list[DirEntry]:
    o = fs.opendir(ROOT, nodeid, os.O_RDONLY)
    try:
        return list(fs.readdir(ROOT, nodeid, o.fh, offset))
    finally:
        fs.releasedir(ROOT, nodeid, o.fh)


# -- lookup and lookup counts -----------------------------------------------------


def test_lookup_matches_host_stat(fs: PassthroughFs, shared: Path) -> None:
    (shared / "f").write_bytes(b"abc")
    (shared / "d").mkdir()
    (shared / "d" / "g").write_bytes(b"x" * 10)
    e = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    assert e.nodeid != FUSE_ROOT_ID and e.generation == 0
    assert_same_stat(e.attr, shared / "f")
    g = lookup(fs, "d/g")
    assert_same_stat(g.attr, shared / "d" / "g")
    assert_same_stat(fs.getattr(ROOT, FUSE_ROOT_ID, None)[0], shared)


def test_same_inode_same_nodeid(fs: PassthroughFs, shared: Path) -> None:
    (shared / "f").write_bytes(b"abc")
    os.link(shared / "f", shared / "hard")
    a = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    fds = open_fds()
    b = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    c = fs.lookup(ROOT, FUSE_ROOT_ID, b"hard")
    assert a.nodeid == b.nodeid == c.nodeid
    assert fs.lookup_count(a.nodeid) == 3
    assert open_fds() == fds  # the duplicate O_PATH fds were closed
    assert fs.node_count() == 2


def test_lookup_again_follows_the_host(fs: PassthroughFs, shared: Path) -> None:
    """A known name is stat'ed first (no fd when the node is held): a name the host
    replaced meanwhile gets the new inode's node, and a symlink is never followed."""
    (shared / "f").write_bytes(b"old")
    (shared / "g").write_bytes(b"new content")
    os.symlink("g", shared / "ln")
    a = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    ln = fs.lookup(ROOT, FUSE_ROOT_ID, b"ln")
    assert stat.S_ISLNK(ln.attr.st_mode)
    assert stat.S_ISLNK(fs.lookup(ROOT, FUSE_ROOT_ID, b"ln").attr.st_mode)
    assert fs.lookup_count(ln.nodeid) == 2
    os.rename(shared / "g", shared / "f")
    b = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    assert b.nodeid != a.nodeid and b.attr.st_size == len(b"new content")
    assert_same_stat(b.attr, shared / "f")
    assert fs.lookup_count(a.nodeid) == 1 and fs.lookup_count(b.nodeid) == 1
    os.unlink(shared / "f")
    assert errno_of(fs.lookup, ROOT, FUSE_ROOT_ID, b"f") == errno.ENOENT


def test_forget_to_zero_frees_the_fd(fs: PassthroughFs, shared: Path) -> None:
    (shared / "f").write_bytes(b"abc")
    fds = open_fds()
    e = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    assert open_fds() == fds + 1
    fs.forget(e.nodeid, 1)
    assert fs.lookup_count(e.nodeid) == 1
    fs.forget(e.nodeid, 1)
    assert open_fds() == fds
    assert errno_of(fs.getattr, ROOT, e.nodeid, None) == errno.ENOENT
    again = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    assert again.nodeid > e.nodeid  # nodeids are never reused


@pytest.mark.parametrize("count", [3, 4, 1 << 32, U64_MAX, 1 << 80])
def test_forget_huge_counts_clamp(fs: PassthroughFs, shared: Path, count: int) -> None:
    (shared / "f").write_bytes(b"")
    fds = open_fds()
    e = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    for _ in range(2):
        fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    fs.forget(e.nodeid, count)
    assert errno_of(fs.lookup_count, e.nodeid) == errno.ENOENT
    assert open_fds() == fds
    fs.forget(e.nodeid, count)  # already gone: ignored
    fs.forget(e.nodeid, 1)


def test_forget_ignores_forged_zero_and_root(fs: PassthroughFs, shared: Path) -> None:
    (shared / "f").write_bytes(b"")
    e = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    for nodeid in (0, FORGED, -1, U64_MAX, 1 << 70):
        fs.forget(nodeid, 1)
    fs.forget(e.nodeid, 0)
    assert fs.lookup_count(e.nodeid) == 1
    fs.forget(FUSE_ROOT_ID, U64_MAX)
    fs.batch_forget([(FUSE_ROOT_ID, 1), (FORGED, U64_MAX), (e.nodeid, 1)])
    assert fs.node_count() == 1
    assert fs.lookup(ROOT, FUSE_ROOT_ID, b"f").nodeid > e.nodeid
    assert_same_stat(fs.getattr(ROOT, FUSE_ROOT_ID, None)[0], shared)


def test_lookup_errors(fs: PassthroughFs, shared: Path) -> None:
    (shared / "f").write_bytes(b"")
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    assert errno_of(fs.lookup, ROOT, FUSE_ROOT_ID, b"missing") == errno.ENOENT
    assert errno_of(fs.lookup, ROOT, f.nodeid, b"x") == errno.ENOTDIR
    assert errno_of(fs.lookup, ROOT, FORGED, b"f") == errno.ENOENT
    assert errno_of(fs.lookup, ROOT, 0, b"f") == errno.ENOENT


def test_forged_ids_everywhere(fs: PassthroughFs, shared: Path) -> None:
    (shared / "f").write_bytes(b"abc")
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    o = fs.open(ROOT, f.nodeid, os.O_RDWR)
    d = fs.opendir(ROOT, FUSE_ROOT_ID, os.O_RDONLY)
    buf = [memoryview(bytearray(4))]
    n = FORGED
    for call in (
        lambda: fs.getattr(ROOT, n, None),
        lambda: fs.setattr(ROOT, n, setattr_in(FATTR_MODE, mode=0o600)),
        lambda: fs.readlink(ROOT, n),
        lambda: fs.symlink(ROOT, n, b"s", b"t"),
        lambda: fs.mknod(ROOT, n, b"s", stat.S_IFIFO | 0o600, 0, 0),
        lambda: fs.mkdir(ROOT, n, b"s", 0o700, 0),
        lambda: fs.unlink(ROOT, n, b"f"),
        lambda: fs.rmdir(ROOT, n, b"f"),
        lambda: fs.rename(ROOT, n, b"f", FUSE_ROOT_ID, b"g", 0),
        lambda: fs.rename(ROOT, FUSE_ROOT_ID, b"f", n, b"g", 0),
        lambda: fs.link(ROOT, n, FUSE_ROOT_ID, b"g"),
        lambda: fs.link(ROOT, f.nodeid, n, b"g"),
        lambda: fs.open(ROOT, n, os.O_RDONLY),
        lambda: fs.create(ROOT, n, b"g", os.O_RDWR, 0o600, 0),
        lambda: fs.statfs(ROOT, n),
        lambda: fs.opendir(ROOT, n, 0),
        lambda: fs.access(ROOT, n, os.R_OK),
        lambda: fs.syncfs(ROOT, n),
        lambda: fs.getxattr(ROOT, n, b"user.a", 0),
        lambda: fs.listxattr(ROOT, n, 0),
        lambda: fs.setxattr(ROOT, n, b"user.a", b"", 0),
        lambda: fs.removexattr(ROOT, n, b"user.a"),
    ):
        assert errno_of(call) == errno.ENOENT
    for fh in (FORGED, 0, -1, U64_MAX):
        fh_call: Callable[[], object]
        for fh_call in (
            partial(fs.read, ROOT, f.nodeid, fh, 0, buf),
            partial(fs.write, ROOT, f.nodeid, fh, 0, buf, 0),
            partial(fs.release, ROOT, f.nodeid, fh),
            partial(fs.flush, ROOT, f.nodeid, fh),
            partial(fs.fsync, ROOT, f.nodeid, fh, False),
            partial(fs.fallocate, ROOT, f.nodeid, fh, 0, 1, 0),
            partial(fs.lseek, ROOT, f.nodeid, fh, 0, os.SEEK_SET),
            partial(fs.copy_file_range, ROOT, f.nodeid, fh, 0, f.nodeid, o.fh, 0, 1, 0),
            partial(fs.copy_file_range, ROOT, f.nodeid, o.fh, 0, f.nodeid, fh, 0, 1, 0),
            partial(fs.readdir, ROOT, FUSE_ROOT_ID, fh, 0),
            partial(fs.releasedir, ROOT, FUSE_ROOT_ID, fh),
            partial(fs.fsyncdir, ROOT, FUSE_ROOT_ID, fh, False),
            partial(fs.setattr, ROOT, f.nodeid, setattr_in(FATTR_FH | FATTR_SIZE, fh=fh)),
        ):
            assert errno_of(fh_call) == errno.EBADF
    # A file handle is not a directory handle, nor the other way round.
    assert errno_of(fs.readdir, ROOT, f.nodeid, o.fh, 0) == errno.EBADF
    assert errno_of(fs.releasedir, ROOT, f.nodeid, o.fh) == errno.EBADF
    assert errno_of(fs.read, ROOT, FUSE_ROOT_ID, d.fh, 0, buf) == errno.EBADF
    assert errno_of(fs.release, ROOT, FUSE_ROOT_ID, d.fh) == errno.EBADF
    # A released handle is gone for good.
    fs.release(ROOT, f.nodeid, o.fh)
    assert errno_of(fs.read, ROOT, f.nodeid, o.fh, 0, buf) == errno.EBADF
    assert errno_of(fs.release, ROOT, f.nodeid, o.fh) == errno.EBADF


# -- getattr / setattr ------------------------------------------------------------


def test_setattr_mode_owner_size(fs: PassthroughFs, shared: Path) -> None:
    p = shared / "f"
    p.write_bytes(b"0123456789")
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    st, timeout = fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_MODE, mode=0o4750))
    assert stat.S_IMODE(os.lstat(p).st_mode) == 0o4750
    assert_same_stat(st, p)
    assert timeout == AUTO_TIMEOUT_S
    st, _ = fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_UID, uid=1234))
    assert (os.lstat(p).st_uid, os.lstat(p).st_gid) == (1234, 0)
    st, _ = fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_UID | FATTR_GID, uid=0, gid=5678))
    assert (os.lstat(p).st_uid, os.lstat(p).st_gid) == (0, 5678)
    assert_same_stat(st, p)
    st, _ = fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_SIZE, size=3))
    assert p.read_bytes() == b"012"
    o = fs.open(ROOT, f.nodeid, os.O_RDWR)
    st, _ = fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_SIZE | FATTR_FH, size=BLOCK, fh=o.fh))
    assert os.lstat(p).st_size == BLOCK
    fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_MODE | FATTR_FH, mode=0o640, fh=o.fh))
    assert stat.S_IMODE(os.lstat(p).st_mode) == 0o640
    assert_same_stat(fs.getattr(ROOT, f.nodeid, o.fh)[0], p)
    assert errno_of(fs.setattr, ROOT, f.nodeid,
                    setattr_in(FATTR_SIZE, size=U64_MAX)) == errno.EINVAL


def test_setattr_size_of_non_regular(fs: PassthroughFs, shared: Path) -> None:
    (shared / "d").mkdir()
    os.mkfifo(shared / "p")
    d = fs.lookup(ROOT, FUSE_ROOT_ID, b"d")
    p = fs.lookup(ROOT, FUSE_ROOT_ID, b"p")
    assert errno_of(fs.setattr, ROOT, d.nodeid, setattr_in(FATTR_SIZE)) == errno.EISDIR
    assert errno_of(fs.setattr, ROOT, p.nodeid, setattr_in(FATTR_SIZE)) == errno.EINVAL
    # chmod of a FIFO changes it without opening it (an open would block here).
    fs.setattr(ROOT, p.nodeid, setattr_in(FATTR_MODE, mode=0o600))
    assert stat.S_IMODE(os.lstat(shared / "p").st_mode) == 0o600


def test_setattr_times(fs: PassthroughFs, shared: Path) -> None:
    p = shared / "f"
    p.write_bytes(b"")
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    atime, mtime = 1_000_000_000 * NSEC + 123, 2_000_000_000 * NSEC + 456
    st, _ = fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_ATIME | FATTR_MTIME, atime_ns=atime,
                                                  mtime_ns=mtime))
    host = os.lstat(p)
    assert (host.st_atime_ns, host.st_mtime_ns) == (atime, mtime)
    assert_same_stat(st, p)
    before = time.time_ns()
    fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_ATIME | FATTR_ATIME_NOW))
    host = os.lstat(p)
    assert host.st_atime_ns >= before - NSEC and host.st_mtime_ns == mtime
    # Times before 1970 are negative.
    fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_MTIME, mtime_ns=-5 * NSEC))
    assert os.lstat(p).st_mtime_ns == -5 * NSEC
    assert errno_of(fs.setattr, ROOT, f.nodeid,
                    setattr_in(FATTR_MTIME, mtime_ns=(1 << 64) * NSEC)) == errno.EINVAL


def test_setattr_kill_suidgid(fs: PassthroughFs, shared: Path) -> None:
    for name, mode, want in ((b"a", 0o6755, 0o755), (b"b", 0o2644, 0o2644),
                             (b"c", 0o4644, 0o644)):
        p = shared / name.decode()
        p.write_bytes(b"")
        os.chmod(p, mode)
        e = fs.lookup(ROOT, FUSE_ROOT_ID, name)
        fs.setattr(ROOT, e.nodeid, setattr_in(FATTR_KILL_SUIDGID | FATTR_SIZE, size=1))
        assert stat.S_IMODE(os.lstat(p).st_mode) == want
        assert os.lstat(p).st_size == 1


# -- symlink / readlink ---------------------------------------------------------------


@pytest.mark.parametrize("target", [b"f", b"/etc/passwd", b"../../../../etc", b"a/../../b",
                                    b"\xff\xfe odd bytes", b"x" * 4000])
def test_symlink_target_is_stored_not_resolved(fs: PassthroughFs, shared: Path,
                                                tmp_path: Path, target: bytes) -> None:
    before = snapshot(tmp_path)
    e = fs.symlink(ROOT, FUSE_ROOT_ID, b"s", target)
    assert stat.S_ISLNK(e.attr.st_mode)
    assert_same_stat(e.attr, shared / "s")
    assert os.readlink(os.fsencode(shared / "s")) == target
    assert fs.readlink(ROOT, e.nodeid) == target
    after = snapshot(tmp_path)
    new = set(after) - set(before)
    assert new == {str(shared / "s")}


def test_symlink_and_readlink_errors(fs: PassthroughFs, shared: Path) -> None:
    (shared / "f").write_bytes(b"")
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    assert errno_of(fs.readlink, ROOT, f.nodeid) == errno.EINVAL
    assert errno_of(fs.symlink, ROOT, FUSE_ROOT_ID, b"s", b"a\0b") == errno.EINVAL
    assert errno_of(fs.symlink, ROOT, FUSE_ROOT_ID, b"s", b"") == errno.ENOENT
    assert errno_of(fs.symlink, ROOT, FUSE_ROOT_ID, b"s", b"x" * 4096) == errno.ENAMETOOLONG
    assert errno_of(fs.symlink, ROOT, FUSE_ROOT_ID, b"f", b"t") == errno.EEXIST
    assert errno_of(fs.symlink, ROOT, f.nodeid, b"s", b"t") == errno.ENOTDIR
    assert sorted(os.listdir(shared)) == ["f"]


# -- mknod / mkdir / unlink / rmdir ------------------------------------------------


def test_mknod_kinds(fs: PassthroughFs, shared: Path) -> None:
    dev = os.makedev(1, 3)
    cases = ((b"fifo", stat.S_IFIFO | 0o666, 0), (b"sock", stat.S_IFSOCK | 0o777, 0),
             (b"chr", stat.S_IFCHR | 0o666, dev), (b"reg", stat.S_IFREG | 0o666, 0),
             (b"plain", 0o666, 0))
    for name, mode, rdev in cases:
        e = fs.mknod(ROOT, FUSE_ROOT_ID, name, mode, rdev, UMASK)
        p = shared / name.decode()
        host = os.lstat(p)
        assert_same_stat(e.attr, p)
        assert stat.S_IMODE(host.st_mode) == stat.S_IMODE(mode) & ~UMASK
        assert stat.S_IFMT(host.st_mode) == (stat.S_IFMT(mode) or stat.S_IFREG)
        assert host.st_rdev == rdev
    assert errno_of(fs.mknod, ROOT, FUSE_ROOT_ID, b"bad", stat.S_IFIFO, -1, 0) == errno.EINVAL
    assert errno_of(fs.mknod, ROOT, FUSE_ROOT_ID, b"fifo", stat.S_IFIFO, 0, 0) == errno.EEXIST


def test_mkdir_unlink_rmdir(fs: PassthroughFs, shared: Path) -> None:
    e = fs.mkdir(ROOT, FUSE_ROOT_ID, b"d", 0o1777, UMASK)
    assert_same_stat(e.attr, shared / "d")
    assert stat.S_IMODE(os.lstat(shared / "d").st_mode) == 0o1755
    f, _ = fs.create(ROOT, e.nodeid, b"f", os.O_WRONLY, 0o666, UMASK)
    assert errno_of(fs.rmdir, ROOT, FUSE_ROOT_ID, b"d") == errno.ENOTEMPTY
    assert errno_of(fs.unlink, ROOT, FUSE_ROOT_ID, b"d") == errno.EISDIR
    assert errno_of(fs.rmdir, ROOT, e.nodeid, b"f") == errno.ENOTDIR
    fs.unlink(ROOT, e.nodeid, b"f")
    assert not (shared / "d" / "f").exists()
    # The guest still holds the node: it lives on, unlinked.
    assert fs.getattr(ROOT, f.nodeid, None)[0].st_nlink == 0
    fs.rmdir(ROOT, FUSE_ROOT_ID, b"d")
    assert not (shared / "d").exists()
    assert errno_of(fs.unlink, ROOT, FUSE_ROOT_ID, b"d") == errno.ENOENT


# -- rename / link ---------------------------------------------------------------


def test_rename_flags(fs: PassthroughFs, shared: Path) -> None:
    (shared / "a").write_bytes(b"A")
    (shared / "b").write_bytes(b"B")
    (shared / "d").mkdir()
    d = fs.lookup(ROOT, FUSE_ROOT_ID, b"d")
    fs.rename(ROOT, FUSE_ROOT_ID, b"a", d.nodeid, b"a2", 0)
    assert (shared / "d" / "a2").read_bytes() == b"A" and not (shared / "a").exists()
    fs.rename(ROOT, d.nodeid, b"a2", FUSE_ROOT_ID, b"a", 0)
    assert errno_of(fs.rename, ROOT, FUSE_ROOT_ID, b"a", FUSE_ROOT_ID, b"b",
                    lsys.RENAME_NOREPLACE) == errno.EEXIST
    fs.rename(ROOT, FUSE_ROOT_ID, b"a", FUSE_ROOT_ID, b"c", lsys.RENAME_NOREPLACE)
    fs.rename(ROOT, FUSE_ROOT_ID, b"c", FUSE_ROOT_ID, b"b", lsys.RENAME_EXCHANGE)
    assert (shared / "b").read_bytes() == b"A" and (shared / "c").read_bytes() == b"B"
    fs.rename(ROOT, FUSE_ROOT_ID, b"c", FUSE_ROOT_ID, b"w", lsys.RENAME_WHITEOUT)
    white = os.lstat(shared / "c")
    assert stat.S_ISCHR(white.st_mode) and white.st_rdev == os.makedev(0, 0)
    assert errno_of(fs.rename, ROOT, FUSE_ROOT_ID, b"b", FUSE_ROOT_ID, b"x",
                    1 << 3) == errno.EINVAL
    assert errno_of(fs.rename, ROOT, FUSE_ROOT_ID, b"b", FUSE_ROOT_ID, b"x",
                    lsys.RENAME_NOREPLACE | lsys.RENAME_EXCHANGE) == errno.EINVAL
    assert (shared / "b").exists()


def test_link(fs: PassthroughFs, shared: Path) -> None:
    (shared / "f").write_bytes(b"abc")
    (shared / "d").mkdir()
    os.symlink("f", shared / "s")
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    d = fs.lookup(ROOT, FUSE_ROOT_ID, b"d")
    e = fs.link(ROOT, f.nodeid, d.nodeid, b"hard")
    assert e.nodeid == f.nodeid and fs.lookup_count(f.nodeid) == 2
    assert os.lstat(shared / "d" / "hard").st_ino == os.lstat(shared / "f").st_ino
    assert e.attr.st_nlink == 2
    assert_same_stat(e.attr, shared / "f")
    s = fs.lookup(ROOT, FUSE_ROOT_ID, b"s")
    fs.link(ROOT, s.nodeid, FUSE_ROOT_ID, b"s2")  # links the symlink, not its target
    assert os.lstat(shared / "s2").st_ino == os.lstat(shared / "s").st_ino
    assert os.lstat(shared / "f").st_nlink == 2
    assert errno_of(fs.link, ROOT, d.nodeid, FUSE_ROOT_ID, b"d2") == errno.EPERM
    assert errno_of(fs.link, ROOT, f.nodeid, FUSE_ROOT_ID, b"d") == errno.EEXIST
    assert errno_of(fs.link, ROOT, f.nodeid, f.nodeid, b"x") == errno.ENOTDIR


# -- open / create / read / write ------------------------------------------------------


def test_open_read_write(fs: PassthroughFs, shared: Path) -> None:
    p = shared / "f"
    p.write_bytes(b"hello world")
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    o = fs.open(ROOT, f.nodeid, os.O_RDWR)
    assert read_all(fs, f.nodeid, o.fh, 100) == b"hello world"
    bufs = [bytearray(3), bytearray(2), bytearray(10)]
    n = fs.read(ROOT, f.nodeid, o.fh, 2, [memoryview(b) for b in bufs])
    assert n == 9 and bytes(bufs[0] + bufs[1] + bufs[2][:4]) == b"llo world"[:9]
    assert fs.read(ROOT, f.nodeid, o.fh, 1000, [memoryview(bytearray(4))]) == 0
    data = [memoryview(b"AB"), memoryview(bytearray(b"CDE")), memoryview(b"F")]
    assert fs.write(ROOT, f.nodeid, o.fh, 6, data, 0) == 6
    assert p.read_bytes() == b"hello ABCDEF"
    fs.flush(ROOT, f.nodeid, o.fh)
    fs.fsync(ROOT, f.nodeid, o.fh, True)
    fs.fsync(ROOT, f.nodeid, o.fh, False)
    fs.release(ROOT, f.nodeid, o.fh)
    assert fs.handle_count() == 0
    assert errno_of(fs.read, ROOT, f.nodeid, o.fh, 0, [memoryview(bytearray(1))]) == errno.EBADF
    ro = fs.open(ROOT, f.nodeid, os.O_RDONLY)
    assert errno_of(fs.write, ROOT, f.nodeid, ro.fh, 0, [memoryview(b"x")], 0) == errno.EBADF
    assert errno_of(fs.read, ROOT, f.nodeid, ro.fh, 1 << 63, [memoryview(bytearray(1))]) \
        == errno.EINVAL
    assert errno_of(fs.open, ROOT, f.nodeid, os.O_ACCMODE) == errno.EINVAL


def test_many_buffers_beyond_iov_max(fs: PassthroughFs, shared: Path) -> None:
    p = shared / "f"
    payload = bytes(range(256)) * 8
    p.write_bytes(payload)
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    o = fs.open(ROOT, f.nodeid, os.O_RDWR)
    bufs = [bytearray(1) for _ in range(len(payload) + 10)]
    assert fs.read(ROOT, f.nodeid, o.fh, 0, [memoryview(b) for b in bufs]) == len(payload)
    assert b"".join(bufs)[:len(payload)] == payload
    src = [memoryview(bytes([i % 7])) for i in range(len(payload))]
    assert fs.write(ROOT, f.nodeid, o.fh, 0, src, 0) == len(payload)
    assert p.read_bytes() == bytes(i % 7 for i in range(len(payload)))
    assert fs.read(ROOT, f.nodeid, o.fh, 0, []) == 0


def test_open_flags_trunc_append(fs: PassthroughFs, shared: Path) -> None:
    p = shared / "f"
    p.write_bytes(b"0123456789")
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    o = fs.open(ROOT, f.nodeid, os.O_WRONLY | os.O_APPEND)
    fs.write(ROOT, f.nodeid, o.fh, 0, [memoryview(b"AB")], 0)
    assert p.read_bytes() == b"0123456789AB"
    # Flags that make no sense on a resolved node are dropped, O_TRUNC is kept.
    fs.open(ROOT, f.nodeid, os.O_WRONLY | os.O_TRUNC | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)
    assert p.read_bytes() == b""


def test_open_refuses_special_files(fs: PassthroughFs, shared: Path) -> None:
    os.mkfifo(shared / "fifo")
    os.mknod(shared / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with socket.socket(socket.AF_UNIX) as sk:
        sk.bind(str(shared / "sock"))
        os.symlink("fifo", shared / "link")
        fds = open_fds()
        for name in (b"fifo", b"null", b"sock", b"link"):
            e = fs.lookup(ROOT, FUSE_ROOT_ID, name)
            for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK, os.O_RDWR):
                assert errno_of(fs.open, ROOT, e.nodeid, flags) == errno.ENXIO
            fs.forget(e.nodeid, 1)
        assert open_fds() == fds and fs.handle_count() == 0


def test_create(fs: PassthroughFs, shared: Path) -> None:
    e, o = fs.create(ROOT, FUSE_ROOT_ID, b"new", os.O_RDWR, stat.S_IFREG | 0o666, UMASK)
    p = shared / "new"
    assert_same_stat(e.attr, p)
    assert stat.S_IMODE(os.lstat(p).st_mode) == 0o644
    assert fs.lookup_count(e.nodeid) == 1
    fs.write(ROOT, e.nodeid, o.fh, 0, [memoryview(b"data")], 0)
    assert p.read_bytes() == b"data"
    assert errno_of(fs.create, ROOT, FUSE_ROOT_ID, b"new", os.O_RDWR | os.O_EXCL, 0o600,
                    0) == errno.EEXIST
    # Without O_EXCL an existing regular file is opened (and O_TRUNC honoured).
    e2, o2 = fs.create(ROOT, FUSE_ROOT_ID, b"new", os.O_RDWR | os.O_TRUNC, 0o600, 0)
    assert e2.nodeid == e.nodeid and fs.lookup_count(e.nodeid) == 2
    assert o2.fh != o.fh and p.read_bytes() == b""
    assert stat.S_IMODE(os.lstat(p).st_mode) == 0o644
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"new")
    assert f.nodeid == e.nodeid


def test_create_over_special_names(fs: PassthroughFs, shared: Path, outside: Path) -> None:
    os.mkfifo(shared / "fifo")
    os.mknod(shared / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (shared / "d").mkdir()
    os.symlink(outside / "secret", shared / "link")
    before = snapshot(shared.parent)
    fds = open_fds()
    for name, err in ((b"fifo", errno.ENXIO), (b"null", errno.ENXIO), (b"d", errno.EISDIR),
                      (b"link", errno.ELOOP)):
        for flags in (os.O_RDONLY, os.O_WRONLY | os.O_TRUNC, os.O_RDWR):
            assert errno_of(fs.create, ROOT, FUSE_ROOT_ID, name, flags, 0o666, 0) == err
    assert open_fds() == fds and fs.node_count() == 1 and fs.handle_count() == 0
    assert snapshot(shared.parent) == before
    assert (outside / "secret").read_bytes() == b"secret"


def test_writes_kill_suidgid_on_request(fs: PassthroughFs, shared: Path) -> None:
    p = shared / "f"
    p.write_bytes(b"")
    os.chmod(p, 0o6755)
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    o = fs.open(ROOT, f.nodeid, os.O_WRONLY)
    fs.write(ROOT, f.nodeid, o.fh, 0, [memoryview(b"x")], 0)
    assert stat.S_IMODE(os.lstat(p).st_mode) == 0o6755  # root's write keeps them
    fs.write(ROOT, f.nodeid, o.fh, 0, [memoryview(b"y")], FUSE_WRITE_KILL_SUIDGID)
    assert stat.S_IMODE(os.lstat(p).st_mode) == 0o755
    assert p.read_bytes() == b"y"


def test_fallocate_lseek_copy(fs: PassthroughFs, shared: Path) -> None:
    p = shared / "f"
    with open(p, "wb") as w:
        w.write(b"D" * BLOCK)
        w.seek(256 * BLOCK)
        w.write(b"E" * BLOCK)
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    o = fs.open(ROOT, f.nodeid, os.O_RDWR)
    assert fs.lseek(ROOT, f.nodeid, o.fh, 0, os.SEEK_HOLE) == BLOCK
    assert fs.lseek(ROOT, f.nodeid, o.fh, BLOCK, os.SEEK_DATA) == 256 * BLOCK
    assert fs.lseek(ROOT, f.nodeid, o.fh, 5, os.SEEK_SET) == 5
    assert errno_of(fs.lseek, ROOT, f.nodeid, o.fh, 0, 42) == errno.EINVAL
    size = os.lstat(p).st_size
    fs.fallocate(ROOT, f.nodeid, o.fh, size, BLOCK, FALLOC_FL_KEEP_SIZE)
    assert os.lstat(p).st_size == size
    fs.fallocate(ROOT, f.nodeid, o.fh, size, BLOCK, 0)
    assert os.lstat(p).st_size == size + BLOCK
    fs.fallocate(ROOT, f.nodeid, o.fh, 0, BLOCK, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
    assert p.read_bytes()[:BLOCK] == bytes(BLOCK)
    assert errno_of(fs.fallocate, ROOT, f.nodeid, o.fh, 0, BLOCK,
                    FALLOC_FL_PUNCH_HOLE) == errno.EOPNOTSUPP
    assert errno_of(fs.fallocate, ROOT, f.nodeid, o.fh, 1 << 63, 1, 0) == errno.EINVAL
    e, out = fs.create(ROOT, FUSE_ROOT_ID, b"g", os.O_RDWR, 0o644, 0)
    n = fs.copy_file_range(ROOT, f.nodeid, o.fh, 256 * BLOCK, e.nodeid, out.fh, 10, 100, 0)
    assert n == 100 and (shared / "g").read_bytes() == bytes(10) + b"E" * 100
    assert errno_of(fs.copy_file_range, ROOT, f.nodeid, o.fh, 0, e.nodeid, out.fh, 0, 1,
                    1) == errno.EINVAL
    assert fs.copy_file_range(ROOT, f.nodeid, o.fh, 0, e.nodeid, out.fh, 0, U64_MAX, 0) > 0


# -- statfs / access / syncfs -------------------------------------------------------


def test_statfs_access_syncfs(fs: PassthroughFs, shared: Path) -> None:
    p = shared / "f"
    p.write_bytes(b"")
    os.chmod(p, 0o640)
    os.mkfifo(shared / "fifo")
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    fifo = fs.lookup(ROOT, FUSE_ROOT_ID, b"fifo")
    s, host = fs.statfs(ROOT, f.nodeid), os.statvfs(shared)
    for field in ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_namemax", "f_fsid"):
        assert getattr(s, field) == getattr(host, field)
    fs.access(ROOT, f.nodeid, os.R_OK | os.W_OK)
    assert errno_of(fs.access, ROOT, f.nodeid, os.X_OK) == errno.EACCES
    assert errno_of(fs.access, USER, f.nodeid, os.R_OK) == errno.EACCES
    fs.access(USER, FUSE_ROOT_ID, os.R_OK | os.X_OK)
    os.chown(p, USER.uid, USER.gid)
    fs.access(USER, f.nodeid, os.R_OK | os.W_OK)
    assert errno_of(fs.access, ROOT, f.nodeid, 1 << 5) == errno.EINVAL
    for node in (FUSE_ROOT_ID, f.nodeid, fifo.nodeid):
        fs.syncfs(ROOT, node)
    assert lsys.setfsuid(lsys.ID_UNCHANGED) == 0 and lsys.setfsgid(lsys.ID_UNCHANGED) == 0


# -- xattrs -----------------------------------------------------------------------


def test_xattrs(fs: PassthroughFs, shared: Path) -> None:
    p = shared / "f"
    p.write_bytes(b"")
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    assert fs.listxattr(ROOT, f.nodeid, 0) == 0
    fs.setxattr(ROOT, f.nodeid, b"user.one", b"value", 0)
    fs.setxattr(ROOT, f.nodeid, b"user.two", b"", os.XATTR_CREATE)
    assert os.getxattr(p, "user.one") == b"value"
    assert fs.getxattr(ROOT, f.nodeid, b"user.one", 0) == 5
    assert fs.getxattr(ROOT, f.nodeid, b"user.one", 5) == b"value"
    assert fs.getxattr(ROOT, f.nodeid, b"user.one", 1 << 20) == b"value"
    assert errno_of(fs.getxattr, ROOT, f.nodeid, b"user.one", 4) == errno.ERANGE
    names = b"".join(os.fsencode(n) + b"\0" for n in os.listxattr(p))
    assert fs.listxattr(ROOT, f.nodeid, 0) == len(names)
    assert fs.listxattr(ROOT, f.nodeid, len(names)) == names
    assert errno_of(fs.listxattr, ROOT, f.nodeid, len(names) - 1) == errno.ERANGE
    assert errno_of(fs.setxattr, ROOT, f.nodeid, b"user.one", b"", os.XATTR_CREATE) \
        == errno.EEXIST
    assert errno_of(fs.setxattr, ROOT, f.nodeid, b"user.new", b"", os.XATTR_REPLACE) \
        == errno.ENODATA
    assert errno_of(fs.setxattr, ROOT, f.nodeid, b"user.x", b"", 1 << 4) == errno.EINVAL
    assert errno_of(fs.setxattr, ROOT, f.nodeid, b"user.big", b"v" * 65537, 0) == errno.E2BIG
    assert errno_of(fs.getxattr, ROOT, f.nodeid, b"user." + b"n" * 300, 0) == errno.ERANGE
    assert errno_of(fs.getxattr, ROOT, f.nodeid, b"", 0) == errno.ERANGE
    assert errno_of(fs.getxattr, ROOT, f.nodeid, b"user.a\0b", 0) == errno.EINVAL
    assert errno_of(fs.getxattr, ROOT, f.nodeid, b"user.none", 0) == errno.ENODATA
    fs.removexattr(ROOT, f.nodeid, b"user.one")
    assert "user.one" not in os.listxattr(p)
    assert errno_of(fs.removexattr, ROOT, f.nodeid, b"user.one") == errno.ENODATA
    # A FIFO is reached through its magic link without being opened.
    os.mkfifo(shared / "fifo")
    fifo = fs.lookup(ROOT, FUSE_ROOT_ID, b"fifo")
    fs.setxattr(ROOT, fifo.nodeid, b"trusted.t", b"1", 0)
    assert fs.getxattr(ROOT, fifo.nodeid, b"trusted.t", 10) == b"1"
    assert os.getxattr(shared / "fifo", "trusted.t", follow_symlinks=False) == b"1"


def test_xattr_disabled(make_fs: MakeFs, shared: Path) -> None:
    fs = make_fs(xattr=False)
    for call in (lambda: fs.getxattr(ROOT, FUSE_ROOT_ID, b"user.a", 0),
                 lambda: fs.listxattr(ROOT, FUSE_ROOT_ID, 0),
                 lambda: fs.setxattr(ROOT, FUSE_ROOT_ID, b"user.a", b"", 0),
                 lambda: fs.removexattr(ROOT, FUSE_ROOT_ID, b"user.a")):
        assert errno_of(call) == errno.ENOSYS
    assert os.listxattr(shared) == []


# -- readdir ----------------------------------------------------------------------------


def test_readdir_resumes_from_every_offset(fs: PassthroughFs, shared: Path) -> None:
    (shared / "big").mkdir()
    for i in range(300):
        (shared / "big" / f"entry-{i:03d}-{'x' * (i % 40)}").write_bytes(b"")
    os.mkfifo(shared / "big" / "fifo")
    (shared / "big" / "sub").mkdir()
    os.symlink("nowhere", shared / "big" / "link")
    d = fs.lookup(ROOT, FUSE_ROOT_ID, b"big")
    full = list_dir(fs, d.nodeid)
    names = [e.name for e in full]
    assert sorted(names) == sorted([b".", b".."] + [os.fsencode(n) for n in
                                                     os.listdir(shared / "big")])
    assert len(set(e.offset for e in full)) == len(full)
    for e in full:
        host = os.lstat(shared / "big" / os.fsdecode(e.name))
        assert e.ino == host.st_ino
        assert e.type == DT_OF[stat.S_IFMT(host.st_mode)]
    for i, e in enumerate(full):
        assert [r.name for r in list_dir(fs, d.nodeid, e.offset)] == names[i + 1:]


def test_readdir_early_stop_and_rewind(fs: PassthroughFs, shared: Path) -> None:
    for i in range(300):  # more than one getdents64 buffer
        (shared / f"f{i}-{'y' * 40}").write_bytes(b"")
    o = fs.opendir(ROOT, FUSE_ROOT_ID, os.O_RDONLY)
    full = list(fs.readdir(ROOT, FUSE_ROOT_ID, o.fh, 0))
    it = fs.readdir(ROOT, FUSE_ROOT_ID, o.fh, 0)
    first = [next(it) for _ in range(5)]
    del it
    # The same handle resumes at the guest's cookie, whatever the fd position.
    rest = list(fs.readdir(ROOT, FUSE_ROOT_ID, o.fh, first[-1].offset))
    assert [e.name for e in first + rest] == [e.name for e in full]
    assert [e.name for e in fs.readdir(ROOT, FUSE_ROOT_ID, o.fh, 0)] == [e.name for e in full]
    suspended = fs.readdir(ROOT, FUSE_ROOT_ID, o.fh, 0)
    next(suspended)
    fs.releasedir(ROOT, FUSE_ROOT_ID, o.fh)
    # A new handle likely reuses the fd number; the old iterator must not read it.
    o2 = fs.opendir(ROOT, FUSE_ROOT_ID, os.O_RDONLY)
    assert len(list(suspended)) < len(full) - 1
    assert errno_of(fs.readdir, ROOT, FUSE_ROOT_ID, o2.fh, 1 << 63) == errno.EINVAL
    fs.fsyncdir(ROOT, FUSE_ROOT_ID, o2.fh, True)
    fs.fsyncdir(ROOT, FUSE_ROOT_ID, o2.fh, False)
    f = fs.lookup(ROOT, FUSE_ROOT_ID, full[-1].name)
    assert errno_of(fs.opendir, ROOT, f.nodeid, os.O_RDONLY) == errno.ENOTDIR


# -- confinement ----------------------------------------------------------------------

BAD_NAMES = [b"", b".", b"..", b"a/b", b"/abs", b"../escape", b"..\0", b"x\0y", b"a" * 256,
             b"/", b"./x", b"//"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_everywhere(fs: PassthroughFs, shared: Path, tmp_path: Path,
                                          outside: Path, name: bytes) -> None:
    (shared / "f").write_bytes(b"")
    (shared / "d").mkdir()
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    d = fs.lookup(ROOT, FUSE_ROOT_ID, b"d")
    abs_target = os.fsencode(outside / "made")
    before = snapshot(tmp_path)
    fds = open_fds()
    for parent in (FUSE_ROOT_ID, d.nodeid):
        for call in (
            partial(fs.lookup, ROOT, parent, name),
            partial(fs.mkdir, ROOT, parent, name, 0o777, 0),
            partial(fs.mknod, ROOT, parent, name, stat.S_IFREG | 0o666, 0, 0),
            partial(fs.mknod, ROOT, parent, name, stat.S_IFIFO | 0o666, 0, 0),
            partial(fs.symlink, ROOT, parent, name, b"target"),
            partial(fs.create, ROOT, parent, name, os.O_RDWR, 0o666, 0),
            partial(fs.link, ROOT, f.nodeid, parent, name),
            partial(fs.rename, ROOT, FUSE_ROOT_ID, b"f", parent, name, 0),
            partial(fs.rename, ROOT, parent, name, FUSE_ROOT_ID, b"g", 0),
            partial(fs.rename, ROOT, FUSE_ROOT_ID, b"f", parent, name, lsys.RENAME_EXCHANGE),
            partial(fs.unlink, ROOT, parent, name),
            partial(fs.rmdir, ROOT, parent, name),
        ):
            assert errno_of(call) in (errno.EINVAL, errno.ENAMETOOLONG)
    # An absolute *name* never reaches symlinkat/mkdirat, which would ignore the dirfd.
    assert errno_of(fs.symlink, ROOT, FUSE_ROOT_ID, abs_target, b"t") == errno.EINVAL
    assert errno_of(fs.mkdir, ROOT, FUSE_ROOT_ID, abs_target, 0o777, 0) == errno.EINVAL
    assert snapshot(tmp_path) == before
    assert open_fds() == fds and fs.node_count() == 3


def test_planted_symlinks_are_never_followed(fs: PassthroughFs, shared: Path,
                                             outside: Path) -> None:
    secret = outside / "secret"
    os.symlink(secret, shared / "to_file")
    os.symlink(outside, shared / "to_dir")
    os.symlink("/etc", shared / "to_etc")
    before = snapshot(outside)
    etc_before = os.stat("/etc/passwd")
    lf = fs.lookup(ROOT, FUSE_ROOT_ID, b"to_file")
    ld = fs.lookup(ROOT, FUSE_ROOT_ID, b"to_dir")
    le = fs.lookup(ROOT, FUSE_ROOT_ID, b"to_etc")
    for e, name in ((lf, "to_file"), (ld, "to_dir"), (le, "to_etc")):
        assert stat.S_ISLNK(e.attr.st_mode)
        assert_same_stat(e.attr, shared / name)
    # No traversal through a symlink node.
    for e in (ld, le):
        assert errno_of(fs.lookup, ROOT, e.nodeid, b"passwd") == errno.ENOTDIR
        assert errno_of(fs.lookup, ROOT, e.nodeid, b"secret") == errno.ENOTDIR
        assert errno_of(fs.mkdir, ROOT, e.nodeid, b"x", 0o777, 0) == errno.ENOTDIR
        assert errno_of(fs.create, ROOT, e.nodeid, b"x", os.O_RDWR, 0o666, 0) == errno.ENOTDIR
        assert errno_of(fs.opendir, ROOT, e.nodeid, os.O_RDONLY) == errno.ENOTDIR
    # No open, truncate or chmod of the target.
    for e in (lf, le):
        for flags in (os.O_RDONLY, os.O_RDWR | os.O_TRUNC):
            assert errno_of(fs.open, ROOT, e.nodeid, flags) == errno.ENXIO
        assert errno_of(fs.setattr, ROOT, e.nodeid, setattr_in(FATTR_SIZE)) == errno.EINVAL
        assert errno_of(fs.setattr, ROOT, e.nodeid,
                        setattr_in(FATTR_MODE, mode=0o777)) == errno.EOPNOTSUPP
        assert errno_of(fs.readdir, ROOT, e.nodeid, FORGED, 0) == errno.EBADF
    # Owner and times change the link itself.
    fs.setattr(ROOT, lf.nodeid, setattr_in(FATTR_UID | FATTR_GID, uid=1234, gid=1234))
    fs.setattr(ROOT, lf.nodeid, setattr_in(FATTR_MTIME, mtime_ns=7 * NSEC))
    link = os.lstat(shared / "to_file")
    assert (link.st_uid, link.st_gid, link.st_mtime_ns) == (1234, 1234, 7 * NSEC)
    # xattrs act on the link: the target's are invisible and untouched.
    assert errno_of(fs.getxattr, ROOT, lf.nodeid, b"user.secret", 0) == errno.ENODATA
    names = fs.listxattr(ROOT, lf.nodeid, 1000)
    assert isinstance(names, bytes) and b"user.secret" not in names
    assert errno_of(fs.setxattr, ROOT, lf.nodeid, b"user.evil", b"1", 0) == errno.EPERM
    assert errno_of(fs.removexattr, ROOT, lf.nodeid, b"user.secret") in (errno.ENODATA,
                                                                          errno.EPERM)
    fs.setxattr(ROOT, lf.nodeid, b"trusted.mark", b"1", 0)
    assert os.getxattr(shared / "to_file", "trusted.mark", follow_symlinks=False) == b"1"
    assert fs.readlink(ROOT, lf.nodeid) == os.fsencode(secret)
    # A hard link of the symlink is another symlink, not a link to the target.
    fs.link(ROOT, lf.nodeid, FUSE_ROOT_ID, b"alias")
    assert stat.S_ISLNK(os.lstat(shared / "alias").st_mode)
    assert snapshot(outside) == before
    assert os.listxattr(secret) == ["user.secret"]
    after = os.stat("/etc/passwd")
    assert (after.st_mode, after.st_uid, after.st_size, after.st_mtime_ns) == (
        etc_before.st_mode, etc_before.st_uid, etc_before.st_size, etc_before.st_mtime_ns)


def test_symlinked_shared_subdir_swapped_on_host(fs: PassthroughFs, shared: Path,
                                                  outside: Path) -> None:
    """A directory the guest holds, replaced by a symlink on the host, confines."""
    (shared / "d").mkdir()
    d = fs.lookup(ROOT, FUSE_ROOT_ID, b"d")
    os.rename(shared / "d", shared / "d.old")
    os.symlink(outside, shared / "d")
    e = fs.lookup(ROOT, FUSE_ROOT_ID, b"d")
    assert stat.S_ISLNK(e.attr.st_mode) and e.nodeid != d.nodeid
    assert errno_of(fs.lookup, ROOT, e.nodeid, b"secret") == errno.ENOTDIR
    fs.mkdir(ROOT, d.nodeid, b"inside", 0o755, 0)  # the held fd still names d.old
    assert (shared / "d.old" / "inside").is_dir()
    assert sorted(os.listdir(outside)) == ["secret"]


# -- credentials and setgid --------------------------------------------------------------


def test_creating_ops_use_the_callers_ids(fs: PassthroughFs, shared: Path) -> None:
    os.chmod(shared, 0o777)
    e, _ = fs.create(USER, FUSE_ROOT_ID, b"file", os.O_RDWR, 0o644, 0)
    d = fs.mkdir(USER, FUSE_ROOT_ID, b"dir", 0o755, 0)
    s = fs.symlink(USER, FUSE_ROOT_ID, b"link", b"file")
    n = fs.mknod(USER, FUSE_ROOT_ID, b"fifo", stat.S_IFIFO | 0o644, 0, 0)
    for ent, name in ((e, "file"), (d, "dir"), (s, "link"), (n, "fifo")):
        host = os.lstat(shared / name)
        assert (host.st_uid, host.st_gid) == (USER.uid, USER.gid)
        assert_same_stat(ent.attr, shared / name)
    # Without CAP_MKNOD under the caller's fsuid, no device nodes.
    assert errno_of(fs.mknod, USER, FUSE_ROOT_ID, b"null", stat.S_IFCHR | 0o666,
                    os.makedev(1, 3), 0) == errno.EPERM
    # DAC checks are the guest kernel's (it knows the caller's groups; see
    # creds): the host does not refuse a write the guest allowed, but the new
    # inodes are still the caller's.
    os.chmod(shared, 0o755)
    fs.mkdir(USER, FUSE_ROOT_ID, b"d2", 0o755, 0)
    fs.mknod(USER, FUSE_ROOT_ID, b"f2", stat.S_IFREG | 0o644, 0, 0)
    for name in ("d2", "f2"):
        assert os.lstat(shared / name).st_uid == USER.uid
    # The daemon's own ids come back every time, success or failure.
    assert lsys.setfsuid(lsys.ID_UNCHANGED) == 0 and lsys.setfsgid(lsys.ID_UNCHANGED) == 0
    r, _ = fs.create(ROOT, FUSE_ROOT_ID, b"rootfile", os.O_RDWR, 0o644, 0)
    assert (r.attr.st_uid, r.attr.st_gid) == (0, 0)


def _reference_create(parent: Path, ctx: Context, kind: str, name: str, mode: int) -> None:
    """Make ``name`` the way the host kernel does it for ``ctx``, without PassthroughFs."""
    dirfd = os.open(parent, os.O_PATH | os.O_DIRECTORY)
    old_gid = lsys.setfsgid(ctx.gid)
    old_uid = lsys.setfsuid(ctx.uid)
    old_umask = os.umask(0)
    try:
        if kind == "dir":
            os.mkdir(name, mode, dir_fd=dirfd)
        else:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode, dir_fd=dirfd))
    finally:
        os.umask(old_umask)
        lsys.setfsuid(old_uid)
        lsys.setfsgid(old_gid)
        os.close(dirfd)


@pytest.mark.parametrize("ctx", [ROOT, USER], ids=["root", "user"])
def test_setgid_directory_inheritance(fs: PassthroughFs, shared: Path, tmp_path: Path,
                                      ctx: Context) -> None:
    ref_dir = tmp_path / "reference"
    for d in (shared / "sg", ref_dir):
        d.mkdir()
        os.chown(d, 0, OTHER_GID)
        os.chmod(d, 0o2777)
    sg = fs.lookup(ROOT, FUSE_ROOT_ID, b"sg")
    fs.create(ctx, sg.nodeid, b"f", os.O_WRONLY, 0o2755, 0)
    fs.mkdir(ctx, sg.nodeid, b"d", 0o755, 0)
    _reference_create(ref_dir, ctx, "file", "f", 0o2755)
    _reference_create(ref_dir, ctx, "dir", "d", 0o755)
    for name in ("f", "d"):
        got, want = os.lstat(shared / "sg" / name), os.lstat(ref_dir / name)
        assert (got.st_mode, got.st_uid, got.st_gid) == (want.st_mode, want.st_uid,
                                                         want.st_gid)
        assert got.st_gid == OTHER_GID
    assert os.lstat(shared / "sg" / "d").st_mode & stat.S_ISGID
    # A non-member creating a group-executable setgid file loses S_ISGID.
    expect_sgid = ctx.uid == 0
    assert bool(os.lstat(shared / "sg" / "f").st_mode & stat.S_ISGID) == expect_sgid


# -- budgets and fd hygiene ---------------------------------------------------------


def test_node_budget(make_fs: MakeFs, shared: Path) -> None:
    fs = make_fs(max_nodes=4)
    for i in range(6):
        (shared / f"f{i}").write_bytes(b"")
    fds = open_fds()
    held = [fs.lookup(ROOT, FUSE_ROOT_ID, f"f{i}".encode()) for i in range(3)]
    assert open_fds() == fds + 3
    before = snapshot(shared)
    assert errno_of(fs.lookup, ROOT, FUSE_ROOT_ID, b"f3") == errno.ENFILE
    for call in (lambda: fs.create(ROOT, FUSE_ROOT_ID, b"new", os.O_RDWR, 0o644, 0),
                 lambda: fs.mkdir(ROOT, FUSE_ROOT_ID, b"new", 0o755, 0),
                 lambda: fs.mknod(ROOT, FUSE_ROOT_ID, b"new", stat.S_IFIFO | 0o644, 0, 0),
                 lambda: fs.symlink(ROOT, FUSE_ROOT_ID, b"new", b"t")):
        assert errno_of(call) == errno.ENFILE
    assert snapshot(shared) == before and open_fds() == fds + 3
    # Known nodes still resolve, and the host keeps working.
    assert fs.lookup(ROOT, FUSE_ROOT_ID, b"f0").nodeid == held[0].nodeid
    o = fs.open(ROOT, held[1].nodeid, os.O_RDWR)
    fs.write(ROOT, held[1].nodeid, o.fh, 0, [memoryview(b"ok")], 0)
    assert (shared / "f1").read_bytes() == b"ok"
    fs.forget(held[2].nodeid, 1)
    assert fs.lookup(ROOT, FUSE_ROOT_ID, b"f3").nodeid > held[2].nodeid


def test_budgets_fit_below_the_fd_limit(make_fs: MakeFs, caplog: pytest.LogCaptureFixture
                                        ) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    fs = make_fs(max_nodes=1 << 40, max_handles=1 << 40)
    assert "exceed RLIMIT_NOFILE" in caplog.text
    limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert limit >= soft
    nodes, handles = fs.budgets()
    assert nodes >= 1 and handles >= 0 and nodes + handles + FD_RESERVE <= limit
    nodes, handles = make_fs().budgets()
    assert nodes >= 1 and handles >= 0 and nodes + handles + FD_RESERVE <= limit
    assert make_fs(max_nodes=16, max_handles=8).budgets() == (16, 8)
    for bad in ({"max_nodes": 0}, {"max_handles": -1}):
        with pytest.raises(ValueError):
            make_fs(**bad)


def test_handle_budget(make_fs: MakeFs, shared: Path) -> None:
    fs = make_fs(max_handles=2)
    (shared / "f").write_bytes(b"")
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    fds = open_fds()
    a = fs.open(ROOT, f.nodeid, os.O_RDONLY)
    fs.opendir(ROOT, FUSE_ROOT_ID, os.O_RDONLY)
    assert errno_of(fs.open, ROOT, f.nodeid, os.O_RDONLY) == errno.ENFILE
    assert errno_of(fs.opendir, ROOT, FUSE_ROOT_ID, os.O_RDONLY) == errno.ENFILE
    assert errno_of(fs.create, ROOT, FUSE_ROOT_ID, b"g", os.O_RDWR, 0o644, 0) == errno.ENFILE
    assert not (shared / "g").exists()
    assert open_fds() == fds + 2
    fs.release(ROOT, f.nodeid, a.fh)
    fs.open(ROOT, f.nodeid, os.O_RDONLY)


def test_no_fd_leaks_on_error_paths(make_fs: MakeFs, shared: Path, outside: Path) -> None:
    fs = make_fs(max_nodes=8, max_handles=4)
    (shared / "f").write_bytes(b"abc")
    os.chmod(shared / "f", 0o644)
    (shared / "d").mkdir()
    (shared / "d" / "x").write_bytes(b"")
    os.mkfifo(shared / "fifo")
    os.symlink(outside / "secret", shared / "link")
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    d = fs.lookup(ROOT, FUSE_ROOT_ID, b"d")
    fifo = fs.lookup(ROOT, FUSE_ROOT_ID, b"fifo")
    link = fs.lookup(ROOT, FUSE_ROOT_ID, b"link")
    ro = fs.open(ROOT, f.nodeid, os.O_RDONLY)
    fds, nodes, handles = open_fds(), fs.node_count(), fs.handle_count()
    failing: list[Callable[[], object]] = [
        lambda: fs.lookup(ROOT, FUSE_ROOT_ID, b"missing"),
        lambda: fs.open(ROOT, fifo.nodeid, os.O_RDONLY | os.O_NONBLOCK),
        lambda: fs.open(ROOT, link.nodeid, os.O_RDONLY),
        lambda: fs.open(ROOT, d.nodeid, os.O_WRONLY),
        lambda: fs.create(ROOT, FUSE_ROOT_ID, b"f", os.O_RDWR | os.O_EXCL, 0o644, 0),
        lambda: fs.create(ROOT, FUSE_ROOT_ID, b"link", os.O_RDWR, 0o644, 0),
        lambda: fs.create(ROOT, FUSE_ROOT_ID, b"fifo", os.O_RDWR, 0o644, 0),
        lambda: fs.create(ROOT, FUSE_ROOT_ID, b"d", os.O_RDONLY, 0o644, 0),
        lambda: fs.mknod(USER, FUSE_ROOT_ID, b"denied", stat.S_IFCHR, os.makedev(1, 3), 0),
        lambda: fs.mkdir(ROOT, FUSE_ROOT_ID, b"d", 0o755, 0),
        lambda: fs.symlink(ROOT, FUSE_ROOT_ID, b"f", b"t"),
        lambda: fs.mknod(ROOT, FUSE_ROOT_ID, b"f", stat.S_IFIFO, 0, 0),
        lambda: fs.link(ROOT, d.nodeid, FUSE_ROOT_ID, b"d2"),
        lambda: fs.link(ROOT, f.nodeid, FUSE_ROOT_ID, b"d"),
        lambda: fs.rename(ROOT, FUSE_ROOT_ID, b"f", FUSE_ROOT_ID, b"d",
                          lsys.RENAME_NOREPLACE),
        lambda: fs.rmdir(ROOT, FUSE_ROOT_ID, b"d"),
        lambda: fs.setattr(ROOT, d.nodeid, setattr_in(FATTR_SIZE)),
        lambda: fs.setattr(ROOT, link.nodeid, setattr_in(FATTR_MODE, mode=0o600)),
        lambda: fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_SIZE | FATTR_FH, fh=ro.fh)),
        lambda: fs.write(ROOT, f.nodeid, ro.fh, 0, [memoryview(b"x")], 0),
        lambda: fs.getxattr(ROOT, f.nodeid, b"user.none", 0),
        lambda: fs.access(USER, f.nodeid, os.W_OK),
        lambda: fs.readlink(ROOT, f.nodeid),
        lambda: fs.opendir(ROOT, f.nodeid, os.O_RDONLY),
        lambda: fs.readdir(ROOT, d.nodeid, ro.fh, 0),
        lambda: fs.lseek(ROOT, f.nodeid, ro.fh, 0, 99),
        lambda: fs.fallocate(ROOT, f.nodeid, ro.fh, 0, 1, 0),
    ]
    for _ in range(3):
        for i, call in enumerate(failing):
            with pytest.raises((FsError, OSError)):
                call()
                pytest.fail(f"failing[{i}] succeeded")
    assert (open_fds(), fs.node_count(), fs.handle_count()) == (fds, nodes, handles)
    assert lsys.setfsuid(lsys.ID_UNCHANGED) == 0
    # Fill the budgets, then fail on them: still nothing leaks.
    extra = [fs.lookup(ROOT, d.nodeid, b"x")]
    for i in range(8 - fs.node_count()):
        extra.append(fs.mkdir(ROOT, FUSE_ROOT_ID, f"n{i}".encode(), 0o755, 0))
    while fs.handle_count() < 4:
        fs.open(ROOT, f.nodeid, os.O_RDONLY)
    (shared / "fresh").write_bytes(b"")
    fds = open_fds()
    for call in (partial(fs.lookup, ROOT, FUSE_ROOT_ID, b"fresh"),
                 partial(fs.open, ROOT, f.nodeid, os.O_RDONLY),
                 partial(fs.opendir, ROOT, FUSE_ROOT_ID, os.O_RDONLY),
                 partial(fs.create, ROOT, FUSE_ROOT_ID, b"new", os.O_RDWR, 0o644, 0)):
        assert errno_of(call) == errno.ENFILE
    assert open_fds() == fds and not (shared / "new").exists()


def test_destroy_and_close_release_everything(make_fs: MakeFs, shared: Path) -> None:
    fds = open_fds()
    fs = make_fs()
    (shared / "f").write_bytes(b"")
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    fs.open(ROOT, f.nodeid, os.O_RDONLY)
    fs.opendir(ROOT, FUSE_ROOT_ID, os.O_RDONLY)
    fs.destroy()
    assert fs.node_count() == 1 and fs.handle_count() == 0
    assert errno_of(fs.getattr, ROOT, f.nodeid, None) == errno.ENOENT
    assert fs.lookup(ROOT, FUSE_ROOT_ID, b"f").nodeid > f.nodeid
    fs.close()
    fs.close()
    assert open_fds() == fds


# -- session: INIT, cache policy --------------------------------------------------------


@pytest.mark.parametrize("cache,timeout,open_flags,opendir_flags", [
    ("never", 0.0, FOPEN_DIRECT_IO, 0),
    ("metadata", 86400.0, FOPEN_DIRECT_IO, FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE),
    ("auto", 1.0, 0, 0),
    ("always", 86400.0, FOPEN_KEEP_CACHE, FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE),
])
def test_cache_policy(make_fs: MakeFs, shared: Path, cache: str, timeout: float,
                      open_flags: int, opendir_flags: int) -> None:
    fs = make_fs(cache=cache)
    e, o = fs.create(ROOT, FUSE_ROOT_ID, b"f", os.O_RDWR, 0o644, 0)
    assert (e.entry_timeout_s, e.attr_timeout_s, o.open_flags) == (timeout, timeout,
                                                                   open_flags)
    assert fs.lookup(ROOT, FUSE_ROOT_ID, b"f").entry_timeout_s == timeout
    assert fs.getattr(ROOT, e.nodeid, None)[1] == timeout
    assert fs.open(ROOT, e.nodeid, os.O_RDONLY).open_flags == open_flags
    assert fs.opendir(ROOT, FUSE_ROOT_ID, 0).open_flags == opendir_flags


def test_bad_cache_policy(shared: Path) -> None:
    with pytest.raises(ValueError):
        PassthroughFs(str(shared), cache="sometimes")


def test_writeback_init(make_fs: MakeFs, shared: Path) -> None:
    (shared / "f").write_bytes(b"0123")
    plain = make_fs()
    assert not plain.init(FUSE_WRITEBACK_CACHE) & FUSE_WRITEBACK_CACHE
    wb = make_fs(writeback=True)
    assert wb.init(0) & FUSE_WRITEBACK_CACHE  # asked for; the dispatcher intersects
    for fs in (plain, wb):  # not negotiated: the guest's access mode stands
        f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
        o = fs.open(ROOT, f.nodeid, os.O_WRONLY | os.O_APPEND)
        assert errno_of(fs.read, ROOT, f.nodeid, o.fh, 0,
                        [memoryview(bytearray(4))]) == errno.EBADF
    assert wb.init(FUSE_WRITEBACK_CACHE) & FUSE_WRITEBACK_CACHE
    f = wb.lookup(ROOT, FUSE_ROOT_ID, b"f")
    o = wb.open(ROOT, f.nodeid, os.O_WRONLY | os.O_APPEND)
    assert read_all(wb, f.nodeid, o.fh, 4) == b"0123"  # O_WRONLY became O_RDWR
    wb.write(ROOT, f.nodeid, o.fh, 0, [memoryview(b"AB")], 0)  # O_APPEND dropped
    assert (shared / "f").read_bytes() == b"AB23"
