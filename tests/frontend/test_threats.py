"""DESIGN §4, item by item: a hostile guest kernel against the real daemon.

Every request here is a raw FUSE request sent through the in-repo frontend
(memfd guest RAM, real rings, real eventfds) to the daemon process, as a
guest kernel that does not follow the rules would send it.  Each test shows
the refusal, that the host is unchanged where it must be, and that the
worker that served it is still the same process (it did not crash).

The daemon runs without the sandbox (``--sandbox none``): the passthrough's
own confinement is what is tested, not the second layer behind it.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.abi.virtio import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from shardfs.testing.frontend import Frontend, FuseClient
from tests.frontend.conftest import Daemon

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
OUT = F.fuse_out_header.size
HDR = F.fuse_in_header.size
FATTR_FH = F.FATTR_FH
#: makedev(1, 3) (/dev/null's numbers) as FUSE encodes a dev_t.
DEV_1_3 = 0x0103


# -- raw requests ------------------------------------------------------------------------


@dataclass
class Raw:
    """What came back for a hand-built chain."""

    used: int
    error: int | None
    data: bytes


def z(name: bytes) -> bytes:
    return name + b"\0"


def header(opcode: int, nodeid: int, args_len: int, *, unique: int = 2, uid: int = 0,
           gid: int = 0, length: int | None = None, extlen: int = 0) -> bytes:
    """A fuse_in_header whose fields may lie (``length``, ``extlen``)."""
    total = HDR + args_len if length is None else length
    return F.fuse_in_header.pack(total, opcode, unique, nodeid, uid, gid, 1, extlen, 0)


def send_raw(fe: Frontend, request: bytes, *, queue: int = 1, reply_size: int = 4096,
             writable: list[tuple[int, int]] | None = None) -> Raw:
    """Put ``request`` (header included) in one descriptor and wait for the chain."""
    mark = fe.ram.mark
    try:
        gpa = fe.ram.alloc(max(len(request), 1))
        fe.ram.write(gpa, request)
        out = 0
        if writable is None:
            writable = []
            if reply_size:
                out = fe.ram.alloc(reply_size)
                fe.ram.write(out, bytes(min(reply_size, 64)))
                writable = [(out, reply_size)]
        head = fe.queues[queue].add([(gpa, len(request))] if request else [], writable)
        fe.kick_queue(queue)
        ((h, used),) = fe.wait_used(queue)
        assert h == head
        if used < OUT or not out:
            return Raw(used, None, b"")
        total, error, _ = F.fuse_out_header.unpack(fe.ram.read(out, OUT))
        assert total == used
        return Raw(used, error, fe.ram.read(out + OUT, used - OUT))
    finally:
        fe.ram.reset_alloc(mark)


def call(c: FuseClient, opcode: int, nodeid: int, args: bytes = b"", *, uid: int = 0,
         gid: int = 0, reply_size: int = 4096, queue: int | None = None) -> Raw:
    """An honest header around hostile arguments."""
    return send_raw(c.fe, header(opcode, nodeid, len(args), uid=uid, gid=gid) + args,
                    queue=queue or c.queue, reply_size=reply_size)


def err(r: Raw) -> int:
    assert r.error is not None, f"no reply (used {r.used})"
    return -r.error


def entry(r: Raw) -> tuple:
    assert r.error == 0, os.strerror(-r.error) if r.error else r
    return F.fuse_entry_out.unpack_from(r.data)


def opendir(c: FuseClient, nodeid: int) -> int:
    return int(F.fuse_open_out.unpack(c.ok(Op.FUSE_OPENDIR, nodeid,
                                           F.fuse_open_in.pack(os.O_RDONLY, 0)))[0])


def snapshot(*roots: Path) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for name in [".", *dirnames, *filenames]:
                p = os.path.normpath(os.path.join(dirpath, name))
                st = os.lstat(p)
                out[p] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                          st.st_nlink, st.st_ino)
    return out


def worker_pid(d: Daemon) -> int:
    for pid in d.children():
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() == "shardfs-w0":
                return pid
    raise AssertionError("no worker")


def worker_fds(d: Daemon) -> int:
    return len(os.listdir(f"/proc/{worker_pid(d)}/fd"))


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("threats"), "--sandbox", "none")
    yield d
    assert d.stop() == 0
    text = d.log_path.read_text()
    assert "Traceback" not in text and "bug while serving" not in text, text


@pytest.fixture
def outside(daemon: Daemon) -> Path:
    """A directory beside the share that nothing may reach."""
    p = daemon.shared.parent / "outside"
    p.mkdir(exist_ok=True)
    (p / "secret").write_bytes(b"secret")
    return p


@pytest.fixture
def c(daemon: Daemon) -> Iterator[FuseClient]:
    """A fresh guest; afterwards the same worker must still be serving."""
    pid = worker_pid(daemon)
    with daemon.frontend() as fe:
        fe.start()
        client = FuseClient(fe)
        client.init()
        yield client
        assert client.getattr(1)
    assert worker_pid(daemon) == pid, "the worker died and was replaced"
    text = daemon.log_text()
    assert "Traceback" not in text and "bug while serving" not in text


def node(c: FuseClient, path: str) -> int:
    """LOOKUP a path one component at a time, from the root."""
    nid = 1
    for part in path.split("/"):
        nid = int(c.lookup(nid, part.encode())[0])
    return nid


# -- 1. names that try to leave their directory ------------------------------------------------


BAD_NAMES = [b"", b".", b"..", b"../escape", b"a/b", b"/abs", b"/", b"//", b"./x", b"x/",
             b"n" * 256]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=lambda b: repr(b)[:12])
def test_hostile_names_in_every_op(daemon: Daemon, c: FuseClient, here: Path, outside: Path,
                                   bad: bytes) -> None:
    (here / "f").write_bytes(b"f")
    (here / "d").mkdir()
    top = node(c, here.name)
    d = node(c, f"{here.name}/d")
    f = node(c, f"{here.name}/f")
    absolute = os.fsencode(outside / "made")
    before = snapshot(daemon.shared, outside)
    fds = worker_fds(daemon)
    create = F.fuse_create_in.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0)
    for parent in (top, d):
        cases = {
            "LOOKUP": (Op.FUSE_LOOKUP, parent, z(bad)),
            "MKNOD": (Op.FUSE_MKNOD, parent,
                      F.fuse_mknod_in.pack(stat.S_IFIFO | 0o644, 0, 0, 0) + z(bad)),
            "MKDIR": (Op.FUSE_MKDIR, parent, F.fuse_mkdir_in.pack(0o755, 0) + z(bad)),
            "SYMLINK": (Op.FUSE_SYMLINK, parent, z(bad) + z(b"target")),
            "UNLINK": (Op.FUSE_UNLINK, parent, z(bad)),
            "RMDIR": (Op.FUSE_RMDIR, parent, z(bad)),
            "RENAME old": (Op.FUSE_RENAME, parent, F.fuse_rename_in.pack(top) + z(bad) + z(b"g")),
            "RENAME new": (Op.FUSE_RENAME, top, F.fuse_rename_in.pack(parent) + z(b"f") + z(bad)),
            "RENAME2 old": (Op.FUSE_RENAME2, parent,
                            F.fuse_rename2_in.pack(top, 1, 0) + z(bad) + z(b"g")),
            "RENAME2 new": (Op.FUSE_RENAME2, top,
                            F.fuse_rename2_in.pack(parent, 2, 0) + z(b"f") + z(bad)),
            "LINK": (Op.FUSE_LINK, parent, F.fuse_link_in.pack(f) + z(bad)),
            "CREATE": (Op.FUSE_CREATE, parent, create + z(bad)),
        }
        for what, (op, nid, args) in cases.items():
            e = err(call(c, op, nid, args))
            assert e in (errno.EINVAL, errno.ENAMETOOLONG), (what, bad, os.strerror(e))
    # An absolute name would make symlinkat/mkdirat ignore the dirfd.
    for op, args in ((Op.FUSE_SYMLINK, z(absolute) + z(b"t")),
                     (Op.FUSE_MKDIR, F.fuse_mkdir_in.pack(0o755, 0) + z(absolute)),
                     (Op.FUSE_MKNOD, F.fuse_mknod_in.pack(stat.S_IFREG, 0, 0, 0) + z(absolute)),
                     (Op.FUSE_CREATE, create + z(absolute))):
        assert err(call(c, op, top, args)) == errno.EINVAL
    # TMPFILE's name is not used at all: nothing named appears anywhere.
    r = call(c, Op.FUSE_TMPFILE, top, create + z(bad))
    e = entry(r)
    fh = F.fuse_open_out.unpack_from(r.data, F.fuse_entry_out.size)[0]
    c.release(e[0], fh)
    c.forget(e[0], 1)
    assert snapshot(daemon.shared, outside) == before
    assert not os.path.lexists(daemon.shared.parent / "escape")
    assert worker_fds(daemon) == fds


def test_nul_in_names_and_xattr_names(daemon: Daemon, c: FuseClient, here: Path) -> None:
    (here / "a").write_bytes(b"a")
    top = node(c, here.name)
    # A NUL ends the name: "a\0../../x" is "a", never "../../x".
    assert entry(call(c, Op.FUSE_LOOKUP, top, b"a\0../../etc\0"))[0]
    assert err(call(c, Op.FUSE_MKDIR, top, F.fuse_mkdir_in.pack(0o755, 0) + b"../x\0b\0")) \
        == errno.EINVAL
    # A name with no NUL at all is malformed.
    assert err(call(c, Op.FUSE_LOOKUP, top, b"abc")) == errno.EINVAL
    assert err(call(c, Op.FUSE_SYMLINK, top, b"only-one\0")) == errno.EINVAL
    # xattr names are not paths: "/" is just a byte; the value may hold NULs.
    a = node(c, f"{here.name}/a")
    value = b"v\0a\0l\0"
    args = F.fuse_getxattr_in.pack(len(value), 0) + z(b"user.x/../y") + value
    assert err(call(c, Op.FUSE_SETXATTR, a, args)) == 0
    assert os.getxattr(here / "a", "user.x/../y") == value
    r = call(c, Op.FUSE_GETXATTR, a, F.fuse_getxattr_in.pack(100, 0) + b"user.x/../y\0junk\0")
    assert r.error == 0 and r.data == value
    # SETXATTR whose name has no NUL, or whose value is shorter than its size.
    assert err(call(c, Op.FUSE_SETXATTR, a, F.fuse_getxattr_in.pack(1, 0) + b"user.q")) \
        == errno.EINVAL
    assert err(call(c, Op.FUSE_SETXATTR, a, F.fuse_getxattr_in.pack(9, 0) + z(b"user.q")
                    + b"short")) == errno.EINVAL
    assert err(call(c, Op.FUSE_GETXATTR, a, F.fuse_getxattr_in.pack(0, 0) + b"\0")) \
        == errno.ERANGE
    assert sorted(os.listdir(here)) == ["a"]


# -- 2. symlinks planted on the host --------------------------------------------------------------


def _read_through(c: FuseClient, nid: int, size: int = 100) -> bytes:
    fh = c.open(nid)
    try:
        return c.read(nid, fh, 0, size)
    finally:
        c.release(nid, fh)


def test_planted_symlinks_on_and_inside_the_path(daemon: Daemon, c: FuseClient, here: Path,
                                                 outside: Path) -> None:
    os.symlink("/", here / "root")
    os.symlink("/etc/shadow", here / "shadow")
    (here / "sub").mkdir()
    os.symlink("../..", here / "sub" / "up")
    os.symlink(outside, here / "sub" / "out")
    shadow_before = os.stat("/etc/shadow")
    before = snapshot(outside)
    top = node(c, here.name)
    for name in ("root", "shadow"):
        e = c.lookup(top, name.encode())
        assert stat.S_ISLNK(e[6 + 9])
    root_link = node(c, f"{here.name}/root")
    shadow = node(c, f"{here.name}/shadow")
    up = node(c, f"{here.name}/sub/up")
    out = node(c, f"{here.name}/sub/out")
    for link in (root_link, up, out):
        for name in (b"etc", b"shadow", b"secret", b"passwd"):
            assert err(call(c, Op.FUSE_LOOKUP, link, z(name))) == errno.ENOTDIR
        assert err(call(c, Op.FUSE_OPENDIR, link, F.fuse_open_in.pack(os.O_RDONLY, 0))) \
            == errno.ENOTDIR
        assert err(call(c, Op.FUSE_MKDIR, link, F.fuse_mkdir_in.pack(0o755, 0) + z(b"x"))) \
            == errno.ENOTDIR
        assert err(call(c, Op.FUSE_CREATE, link, F.fuse_create_in.pack(
            os.O_RDWR, 0o644, 0, 0) + z(b"x"))) == errno.ENOTDIR
    # The file symlink is never opened, truncated, chmodded or written through.
    for flags in (os.O_RDONLY, os.O_RDWR | os.O_TRUNC, os.O_WRONLY):
        assert err(call(c, Op.FUSE_OPEN, shadow, F.fuse_open_in.pack(flags, 0))) == errno.ENXIO
    for flags in (os.O_RDONLY, os.O_RDWR | os.O_TRUNC):
        assert err(call(c, Op.FUSE_CREATE, top, F.fuse_create_in.pack(
            flags, 0o644, 0, 0) + z(b"shadow"))) == errno.ELOOP
    setattr_size = F.fuse_setattr_in.pack(F.FATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                          0, 0)
    assert err(call(c, Op.FUSE_SETATTR, shadow, setattr_size)) == errno.EINVAL
    setattr_mode = F.fuse_setattr_in.pack(F.FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0o777, 0,
                                          0, 0, 0)
    assert err(call(c, Op.FUSE_SETATTR, shadow, setattr_mode)) == errno.EOPNOTSUPP
    assert c.ok(Op.FUSE_READLINK, shadow) == b"/etc/shadow"
    # xattrs and links act on the link itself.
    assert err(call(c, Op.FUSE_GETXATTR, shadow, F.fuse_getxattr_in.pack(0, 0)
                    + z(b"security.selinux"))) in (errno.ENODATA, errno.EOPNOTSUPP)
    entry(call(c, Op.FUSE_LINK, top, F.fuse_link_in.pack(shadow) + z(b"alias")))
    assert os.readlink(here / "alias") == "/etc/shadow"
    after = os.stat("/etc/shadow")
    assert (after.st_mode, after.st_size, after.st_mtime_ns, after.st_ino) == (
        shadow_before.st_mode, shadow_before.st_size, shadow_before.st_mtime_ns,
        shadow_before.st_ino)
    assert snapshot(outside) == before


def test_symlink_swapped_in_after_lookup(daemon: Daemon, c: FuseClient, here: Path,
                                         outside: Path) -> None:
    (here / "f").write_bytes(b"original")
    (here / "d").mkdir()
    (here / "d" / "inner").write_bytes(b"inner")
    (here / "a").mkdir()
    (here / "a" / "b").mkdir()
    f = node(c, f"{here.name}/f")
    d = node(c, f"{here.name}/d")
    b = node(c, f"{here.name}/a/b")
    # The host swaps symlinks in, on the path and at its end.
    os.rename(here / "f", here / "f.orig")
    os.symlink("/etc/shadow", here / "f")
    os.rename(here / "d", here / "d.orig")
    os.symlink(outside, here / "d")
    os.rename(here / "a", here / "a.orig")
    os.symlink("/", here / "a")
    # Held nodes keep naming the inodes the guest looked up.
    assert _read_through(c, f) == b"original"
    assert err(call(c, Op.FUSE_LOOKUP, d, z(b"secret"))) == errno.ENOENT
    assert _read_through(c, node_in(c, d, b"inner")) == b"inner"
    entry(call(c, Op.FUSE_MKDIR, d, F.fuse_mkdir_in.pack(0o755, 0) + z(b"made")))
    assert (here / "d.orig" / "made").is_dir() and not (outside / "made").exists()
    entry(call(c, Op.FUSE_MKDIR, b, F.fuse_mkdir_in.pack(0o755, 0) + z(b"deep")))
    assert (here / "a.orig" / "b" / "deep").is_dir()
    # Looked up afresh, the names are symlinks: nothing is followed.
    top = node(c, here.name)
    new_f = node_in(c, top, b"f")
    assert err(call(c, Op.FUSE_OPEN, new_f, F.fuse_open_in.pack(os.O_RDONLY, 0))) == errno.ENXIO
    for name in (b"d", b"a"):
        assert err(call(c, Op.FUSE_LOOKUP, node_in(c, top, name), z(b"secret"))) \
            == errno.ENOTDIR
    assert sorted(os.listdir(outside)) == ["secret"]


def node_in(c: FuseClient, parent: int, name: bytes) -> int:
    return int(c.lookup(parent, name)[0])


# -- 3. forged and stale ids ------------------------------------------------------------------


def test_forged_and_stale_nodeids(daemon: Daemon, c: FuseClient, here: Path) -> None:
    (here / "f").write_bytes(b"x")
    f = node(c, f"{here.name}/f")
    c.forget(f, 1)
    stale = f
    live = node(c, f"{here.name}/f")
    assert live != stale  # a fresh generation, never the old id again
    forged = [0, 2, 7, U32, U64, (1 << 32) | 1, stale, live + (1 << 32), live ^ 0xFFFF_0000,
              0xDEAD_BEEF_0000_0001]
    setattr_mode = F.fuse_setattr_in.pack(F.FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0o600,
                                          0, 0, 0, 0)
    for nid in forged:
        for op, args in ((Op.FUSE_GETATTR, F.fuse_getattr_in.pack(0, 0, 0)),
                         (Op.FUSE_SETATTR, setattr_mode),
                         (Op.FUSE_LOOKUP, z(b"f")),
                         (Op.FUSE_OPEN, F.fuse_open_in.pack(os.O_RDONLY, 0)),
                         (Op.FUSE_OPENDIR, F.fuse_open_in.pack(os.O_RDONLY, 0)),
                         (Op.FUSE_READLINK, b""),
                         (Op.FUSE_MKDIR, F.fuse_mkdir_in.pack(0o755, 0) + z(b"m")),
                         (Op.FUSE_UNLINK, z(b"f")),
                         (Op.FUSE_GETXATTR, F.fuse_getxattr_in.pack(0, 0) + z(b"user.a")),
                         (Op.FUSE_LISTXATTR, F.fuse_getxattr_in.pack(0, 0)),
                         (Op.FUSE_STATFS, b""),
                         (Op.FUSE_ACCESS, F.fuse_access_in.pack(0, 0)),
                         (Op.FUSE_LINK, F.fuse_link_in.pack(live) + z(b"l")),
                         (Op.FUSE_TMPFILE, F.fuse_create_in.pack(os.O_RDWR, 0o600, 0, 0)
                          + z(b"/"))):
            assert err(call(c, op, nid, args)) in (errno.ENOENT, errno.EBADF), (op, hex(nid))
        # As the target of a two-node op.
        assert err(call(c, Op.FUSE_LINK, 1, F.fuse_link_in.pack(nid) + z(b"l"))) \
            in (errno.ENOENT, errno.EBADF)
        assert err(call(c, Op.FUSE_RENAME, node(c, here.name),
                        F.fuse_rename_in.pack(nid) + z(b"f") + z(b"g"))) \
            in (errno.ENOENT, errno.EBADF)
    assert sorted(os.listdir(here)) == ["f"]
    assert c.getattr(live)


def test_forged_stale_and_mismatched_fhs(daemon: Daemon, c: FuseClient, here: Path) -> None:
    for name in ("a", "b"):
        (here / name).write_bytes(name.encode() * 10)
    (here / "d").mkdir()
    a, b, d = (node(c, f"{here.name}/{n}") for n in ("a", "b", "d"))
    fh_a = c.open(a, os.O_RDWR)
    fh_b = c.open(b, os.O_RDWR)
    dfh = opendir(c, d)
    released = c.open(a)
    c.release(a, released)
    read = F.fuse_read_in.pack
    cases: list[tuple[int, int]] = [(a, 0), (a, 424242), (a, U64), (a, U32), (a, released),
                                    (a, dfh), (a, fh_b), (b, fh_a), (d, fh_a)]
    for nid, fh in cases:
        for op, args, size in (
                (Op.FUSE_READ, read(fh, 0, 10, 0, 0, 0, 0), 4096),
                (Op.FUSE_WRITE, F.fuse_write_in.pack(fh, 0, 1, 0, 0, 0, 0) + b"X", 4096),
                (Op.FUSE_FLUSH, F.fuse_flush_in.pack(fh, 0, 0, 0), 4096),
                (Op.FUSE_FSYNC, F.fuse_fsync_in.pack(fh, 0, 0), 4096),
                (Op.FUSE_LSEEK, F.fuse_lseek_in.pack(fh, 0, os.SEEK_END, 0), 4096),
                (Op.FUSE_FALLOCATE, F.fuse_fallocate_in.pack(fh, 0, 10, 0, 0), 4096),
                (Op.FUSE_COPY_FILE_RANGE, F.fuse_copy_file_range_in.pack(
                    fh, 0, a, fh_a, 0, 5, 0), 4096),
                (Op.FUSE_SETATTR, F.fuse_setattr_in.pack(
                    FATTR_FH | F.FATTR_SIZE, 0, fh, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                 4096),
                (Op.FUSE_RELEASE, F.fuse_release_in.pack(fh, 0, 0, 0), 4096)):
            assert err(call(c, op, nid, args, reply_size=size)) == errno.EBADF, (op, nid, fh)
    for nid, fh in ((d, fh_a), (d, 0), (d, U64), (a, dfh)):
        for op, args in ((Op.FUSE_READDIR, read(fh, 0, 4096, 0, 0, 0, 0)),
                         (Op.FUSE_READDIRPLUS, read(fh, 0, 4096, 0, 0, 0, 0)),
                         (Op.FUSE_FSYNCDIR, F.fuse_fsync_in.pack(fh, 0, 0)),
                         (Op.FUSE_RELEASEDIR, F.fuse_release_in.pack(fh, 0, 0, 0))):
            assert err(call(c, op, nid, args)) == errno.EBADF, (op, nid, fh)
    # Nothing changed, and the real handles still work.
    assert (here / "a").read_bytes() == b"a" * 10 and (here / "b").read_bytes() == b"b" * 10
    assert c.read(a, fh_a, 0, 3) == b"aaa" and c.read(b, fh_b, 0, 3) == b"bbb"
    assert c.readdir(d, dfh)


# -- 4. FORGET with huge, overflowing and lying counts ------------------------------------------


def _batch_forget(c: FuseClient, count: int, items: list[tuple[int, int]]) -> int:
    args = F.fuse_batch_forget_in.pack(count, 0) + b"".join(
        F.fuse_forget_one.pack(n, k) for n, k in items)
    return send_raw(c.fe, header(Op.FUSE_BATCH_FORGET, 0, len(args)) + args, queue=0,
                    reply_size=0).used


def _alive(c: FuseClient, nid: int) -> bool:
    r = call(c, Op.FUSE_GETATTR, nid, F.fuse_getattr_in.pack(0, 0, 0))
    return r.error == 0


def test_forget_counts(daemon: Daemon, c: FuseClient, here: Path) -> None:
    for name in ("a", "b", "c"):
        (here / name).write_bytes(b"")
    top = node(c, here.name)
    fds = worker_fds(daemon)
    a = [node_in(c, top, b"a") for _ in range(3)][0]
    b = node_in(c, top, b"b")
    assert worker_fds(daemon) == fds + 2
    # Counts that lie about their payload are dropped whole: nothing is forgotten.
    assert _batch_forget(c, 2, [(a, 3)]) == 0
    assert _batch_forget(c, U32, [(a, 3), (b, 1)]) == 0
    assert _batch_forget(c, 1 << 20, []) == 0
    assert _alive(c, a) and _alive(c, b)
    # Exact arithmetic: 3 lookups, forgotten one by one.
    assert _batch_forget(c, 2, [(a, 1), (a, 1)]) == 0
    assert _alive(c, a)
    c.forget(a, 1)
    assert not _alive(c, a)
    # u64-max counts clamp at zero; forged ids and the root are ignored.
    c.forget(b, U64)
    assert not _alive(c, b)
    c.forget(1, U64)
    assert _batch_forget(c, 4, [(1, U64), (U64, U64), (0, 1), (a, U64)]) == 0
    assert _alive(c, 1)
    c.forget(0xDEAD_0000_0001, U64)
    assert worker_fds(daemon) == fds
    # The ids stay dead: a new lookup gets a new id.
    assert node_in(c, top, b"a") not in (a, b)
    # A FORGET too short for its count, and one with no payload at all.
    assert send_raw(c.fe, header(Op.FUSE_FORGET, a, 0), queue=0, reply_size=0).used == 0
    assert send_raw(c.fe, header(Op.FUSE_BATCH_FORGET, 0, 4) + b"\xff" * 4, queue=0,
                    reply_size=0).used == 0


# -- 5. FIFOs, devices and sockets are never opened ---------------------------------------------


def test_special_files_are_never_opened(daemon: Daemon, c: FuseClient, here: Path) -> None:
    os.mkfifo(here / "fifo")
    os.mknod(here / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(here / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fspath(here / "sock"))
    top = node(c, here.name)
    # The guest's root may make device nodes: it is root over the share.
    entry(call(c, Op.FUSE_MKNOD, top, F.fuse_mknod_in.pack(
        stat.S_IFCHR | 0o666, DEV_1_3, 0, 0) + z(b"gnull")))
    assert os.major(os.lstat(here / "gnull").st_rdev) == 1
    for name in (b"fifo", b"null", b"blk", b"sock", b"gnull"):
        nid = node_in(c, top, name)
        for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_TRUNC,
                      os.O_RDONLY | os.O_NONBLOCK):
            assert err(call(c, Op.FUSE_OPEN, nid, F.fuse_open_in.pack(flags, 0))) \
                == errno.ENXIO, name
        for flags in (os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
            assert err(call(c, Op.FUSE_CREATE, top, F.fuse_create_in.pack(
                flags, 0o644, 0, 0) + z(name))) == errno.ENXIO
        assert err(call(c, Op.FUSE_OPENDIR, nid, F.fuse_open_in.pack(0, 0))) == errno.ENOTDIR
        assert err(call(c, Op.FUSE_SETATTR, nid, F.fuse_setattr_in.pack(
            F.FATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))) == errno.EINVAL
        # Metadata works without opening anything (an opened FIFO would block).
        assert c.getattr(nid)
        assert err(call(c, Op.FUSE_GETXATTR, nid, F.fuse_getxattr_in.pack(0, 0)
                        + z(b"user.none"))) in (errno.ENODATA, errno.EPERM)
        c.ok(Op.FUSE_SYNCFS, nid, F.fuse_syncfs_in.pack(0))
    # No fd of the worker is a real open of any of them (O_PATH node fds only).
    pid = worker_pid(daemon)
    specials = {os.fspath(here / n) for n in ("fifo", "null", "blk", "sock", "gnull")}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags = int(info.read().split("flags:")[1].split()[0], 8)
        except OSError:
            continue
        if target in specials:
            assert flags & os.O_PATH, (target, oct(flags))


# -- 6. setuid and setgid escalation -------------------------------------------------------------


def _setattr(valid: int, *, mode: int = 0, uid: int = 0, gid: int = 0, size: int = 0) -> bytes:
    return F.fuse_setattr_in.pack(valid, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, mode, 0, uid, gid, 0)


def mode_of(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_setuid_setgid_through_chmod_and_chown(daemon: Daemon, c: FuseClient,
                                               here: Path) -> None:
    p = here / "f"
    p.write_bytes(b"#!/bin/sh\n")
    os.chown(p, 1000, 0)
    os.chmod(p, 0o755)
    f = node(c, f"{here.name}/f")
    # chmod g+s by the owner, who is not in the file's group: dropped.
    assert err(call(c, Op.FUSE_SETATTR, f, _setattr(F.FATTR_MODE, mode=0o2755),
                    uid=1000, gid=1000)) == 0
    assert mode_of(p) == 0o755
    # chmod by someone else: EPERM, for u+s as for anything.
    assert err(call(c, Op.FUSE_SETATTR, f, _setattr(F.FATTR_MODE, mode=0o4755),
                    uid=2000, gid=0)) == errno.EPERM
    assert mode_of(p) == 0o755
    # chown by a non-root caller, to root or to anyone: EPERM... from the guest
    # kernel; the host applies the kernel's own clearing on any chown.
    os.chmod(p, 0o6755)
    assert err(call(c, Op.FUSE_SETATTR, f, _setattr(F.FATTR_UID | F.FATTR_GID, uid=0,
                                                    gid=0))) == 0
    assert mode_of(p) == 0o755 and os.lstat(p).st_uid == 0
    # Mode bits beyond the permission bits never reach the host.
    assert err(call(c, Op.FUSE_SETATTR, f, _setattr(F.FATTR_MODE, mode=stat.S_IFCHR | 0o4777))) \
        == 0
    assert stat.S_ISREG(os.lstat(p).st_mode) and mode_of(p) == 0o4777


def test_setuid_cleared_by_writes_truncates_and_opens(daemon: Daemon, c: FuseClient,
                                                      here: Path) -> None:
    p = here / "f"
    p.write_bytes(b"data")
    os.chown(p, 1000, 1000)
    os.chmod(p, 0o6775)
    f = node(c, f"{here.name}/f")
    fh = c.open(f, os.O_RDWR)
    c.write(f, fh, 0, b"D")
    assert mode_of(p) == 0o6775  # root writing, no kill flag: kept, as on the host
    args = F.fuse_write_in.pack(fh, 1, 1, F.FUSE_WRITE_KILL_SUIDGID, 0, 0, 0) + b"A"
    assert err(call(c, Op.FUSE_WRITE, f, args)) == 0
    assert mode_of(p) == 0o775 and p.read_bytes() == b"DAta"
    os.chmod(p, 0o6775)
    # A non-root caller's truncate: the host kernel clears them itself.
    assert err(call(c, Op.FUSE_SETATTR, f, _setattr(F.FATTR_SIZE, size=2),
                    uid=1000, gid=1000)) == 0
    assert mode_of(p) == 0o775 and p.read_bytes() == b"DA"
    os.chmod(p, 0o6775)
    assert err(call(c, Op.FUSE_SETATTR, f, _setattr(F.FATTR_SIZE | F.FATTR_KILL_SUIDGID,
                                                    size=1))) == 0
    assert mode_of(p) == 0o775
    os.chmod(p, 0o6775)
    r = call(c, Op.FUSE_OPEN, f, F.fuse_open_in.pack(os.O_WRONLY | os.O_TRUNC,
                                                     F.FUSE_OPEN_KILL_SUIDGID))
    assert r.error == 0 and mode_of(p) == 0o775 and p.read_bytes() == b""


def test_setgid_directory_and_non_root_creators(daemon: Daemon, c: FuseClient,
                                                here: Path) -> None:
    sg = here / "sg"
    sg.mkdir()
    os.chown(sg, 0, 4321)
    os.chmod(sg, 0o2777)
    d = node(c, f"{here.name}/sg")
    r = call(c, Op.FUSE_CREATE, d, F.fuse_create_in.pack(os.O_WRONLY, 0o2755, 0, 0) + z(b"f"),
             uid=1000, gid=1000)
    assert r.error == 0
    entry(call(c, Op.FUSE_MKDIR, d, F.fuse_mkdir_in.pack(0o755, 0) + z(b"d"),
               uid=1000, gid=1000))
    st_f, st_d = os.lstat(sg / "f"), os.lstat(sg / "d")
    # Group from the setgid parent; S_ISGID dropped from a non-member's
    # group-executable file; a new directory inherits S_ISGID.
    assert (st_f.st_uid, st_f.st_gid, stat.S_IMODE(st_f.st_mode)) == (1000, 4321, 0o755)
    assert (st_d.st_uid, st_d.st_gid) == (1000, 4321) and st_d.st_mode & stat.S_ISGID
    # A non-root caller cannot make device nodes (no CAP_MKNOD under its fsuid).
    assert err(call(c, Op.FUSE_MKNOD, d, F.fuse_mknod_in.pack(
        stat.S_IFCHR | 0o666, DEV_1_3, 0, 0) + z(b"dev"), uid=1000, gid=1000)) == errno.EPERM
    assert not os.path.lexists(sg / "dev")


def test_caller_ids_that_are_not_ids(daemon: Daemon, c: FuseClient, here: Path) -> None:
    """(uid_t)-1 means "unchanged" to the kernel, never a caller: refused."""
    os.chmod(here, 0o777)
    top = node(c, here.name)
    for uid, gid in ((U32, 0), (0, U32), (U32, U32), (1000, U32)):
        assert err(call(c, Op.FUSE_MKDIR, top, F.fuse_mkdir_in.pack(0o755, 0) + z(b"d"),
                        uid=uid, gid=gid)) == errno.EINVAL
        assert err(call(c, Op.FUSE_CREATE, top, F.fuse_create_in.pack(
            os.O_RDWR, 0o644, 0, 0) + z(b"f"), uid=uid, gid=gid)) == errno.EINVAL
    assert os.listdir(here) == []


# -- 7. the fd budget ---------------------------------------------------------------------------


def test_fd_budget_is_enforced_and_the_host_keeps_working(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "--sandbox", "none", "--max-nodes", "16", "--max-handles", "16")
    try:
        for i in range(64):
            (d.shared / f"f{i}").write_bytes(b"x")
        with d.frontend() as fe:
            fe.start()
            c = FuseClient(fe)
            c.init()
            fds = worker_fds(d)
            got, errs = [], []
            for i in range(64):
                r = call(c, Op.FUSE_LOOKUP, 1, z(f"f{i}".encode()))
                (got if r.error == 0 else errs).append(r.error)
            assert len(got) == 15 and set(errs) == {-errno.ENFILE}  # the root is one
            held = [node_in(c, 1, f"f{i}".encode()) for i in range(3)]
            handles, herrs = [], []
            for _ in range(40):
                r = call(c, Op.FUSE_OPEN, held[0], F.fuse_open_in.pack(os.O_RDONLY, 0))
                if r.error == 0:
                    handles.append(F.fuse_open_out.unpack(r.data)[0])
                else:
                    herrs.append(-r.error)
            assert len(handles) == 16 and set(herrs) == {errno.ENFILE}
            assert err(call(c, Op.FUSE_OPENDIR, 1, F.fuse_open_in.pack(0, 0))) == errno.ENFILE
            assert err(call(c, Op.FUSE_CREATE, 1, F.fuse_create_in.pack(
                os.O_RDWR, 0o644, 0, 0) + z(b"new"))) == errno.ENFILE
            assert err(call(c, Op.FUSE_MKDIR, 1, F.fuse_mkdir_in.pack(0o755, 0) + z(b"nd"))) \
                == errno.ENFILE
            assert not (d.shared / "new").exists() and not (d.shared / "nd").exists()
            assert worker_fds(d) <= fds + 15 + 16
            # Everything already held still works, and released fds come back.
            assert c.read(held[0], handles[0], 0, 1) == b"x"
            for fh in handles:
                c.release(held[0], fh)
            c.forget(held[1], U64)
            assert call(c, Op.FUSE_OPENDIR, 1, F.fuse_open_in.pack(0, 0)).error == 0
            assert node_in(c, 1, b"f40")
            assert worker_fds(d) <= fds + 15 + 1
    finally:
        assert d.stop() == 0
    assert "Traceback" not in d.log_path.read_text()


# -- 8. oversized lengths and counts in every op --------------------------------------------------


def test_oversized_lengths_and_counts(daemon: Daemon, c: FuseClient, here: Path) -> None:
    (here / "f").write_bytes(b"0123456789")
    os.setxattr(here / "f", "user.v", b"value")
    f = node(c, f"{here.name}/f")
    top = node(c, here.name)
    fh = c.open(f, os.O_RDWR)
    dfh = opendir(c, top)
    read = F.fuse_read_in.pack
    # READ beyond the largest we serve; a huge size into a small buffer is clipped.
    assert err(call(c, Op.FUSE_READ, f, read(fh, 0, (1 << 20) + 1, 0, 0, 0, 0))) == errno.EINVAL
    assert err(call(c, Op.FUSE_READ, f, read(fh, 0, U32, 0, 0, 0, 0))) == errno.EINVAL
    r = call(c, Op.FUSE_READ, f, read(fh, 0, 1 << 20, 0, 0, 0, 0), reply_size=OUT + 4)
    assert r.error == 0 and r.data == b"0123"
    assert err(call(c, Op.FUSE_READ, f, read(fh, U64, 10, 0, 0, 0, 0))) == errno.EINVAL
    # WRITE whose size is beyond its payload, or beyond the maximum.
    for size in (11, U32, (1 << 20) + 1):
        args = F.fuse_write_in.pack(fh, 0, size, 0, 0, 0, 0) + b"0123456789"
        assert err(call(c, Op.FUSE_WRITE, f, args)) == errno.EINVAL
    assert err(call(c, Op.FUSE_WRITE, f, F.fuse_write_in.pack(fh, U64 - 1, 1, 0, 0, 0, 0)
                    + b"x")) == errno.EINVAL
    assert (here / "f").read_bytes() == b"0123456789"
    # SETXATTR: size beyond the payload, beyond XATTR_SIZE_MAX.
    assert err(call(c, Op.FUSE_SETXATTR, f, F.fuse_getxattr_in.pack(1000, 0) + z(b"user.a")
                    + b"tiny")) == errno.EINVAL
    assert err(call(c, Op.FUSE_SETXATTR, f, F.fuse_getxattr_in.pack(U32, 0) + z(b"user.a")
                    + b"x")) == errno.E2BIG
    # GETXATTR/LISTXATTR with absurd sizes: answered within the buffer.
    r = call(c, Op.FUSE_GETXATTR, f, F.fuse_getxattr_in.pack(U32, 0) + z(b"user.v"))
    assert r.error == 0 and r.data == b"value"
    r = call(c, Op.FUSE_LISTXATTR, f, F.fuse_getxattr_in.pack(U32, 0))
    assert r.error == 0 and b"user.v\0" in r.data
    # READDIR(PLUS) sizes are clipped to the buffer the guest gave.
    for op in (Op.FUSE_READDIR, Op.FUSE_READDIRPLUS):
        r = call(c, op, top, read(dfh, 0, U32, 0, 0, 0, 0), reply_size=OUT + 200)
        assert r.error == 0 and 0 < len(r.data) <= 200
    # COPY_FILE_RANGE and FALLOCATE with lengths near u64: clamped or refused by the host.
    fh2 = c.open(f, os.O_RDWR)
    r = call(c, Op.FUSE_COPY_FILE_RANGE, f,
             F.fuse_copy_file_range_in.pack(fh, 0, f, fh2, 100, U64 >> 1, 0))
    assert r.error in (0, -errno.EINVAL, -errno.EFBIG)
    assert err(call(c, Op.FUSE_COPY_FILE_RANGE, f,
                    F.fuse_copy_file_range_in.pack(fh, 0, f, fh2, 0, U64, 0))) == errno.EINVAL
    assert err(call(c, Op.FUSE_FALLOCATE, f, F.fuse_fallocate_in.pack(fh, 0, U64, 0, 0))) \
        == errno.EINVAL
    assert err(call(c, Op.FUSE_FALLOCATE, f, F.fuse_fallocate_in.pack(
        fh, 1 << 62, 1 << 62, 0, 0))) in (errno.EFBIG, errno.ENOSPC, errno.EINVAL)
    # Names and targets beyond PATH_MAX.
    assert err(call(c, Op.FUSE_SYMLINK, top, z(b"l") + z(b"t" * 5000))) in (
        errno.EINVAL, errno.ENAMETOOLONG)
    assert err(call(c, Op.FUSE_RENAME, top, F.fuse_rename_in.pack(top) + z(b"f" * 5000)
                    + z(b"g"))) in (errno.EINVAL, errno.ENAMETOOLONG)
    # IOCTL with huge sizes is refused cleanly.
    assert err(call(c, Op.FUSE_IOCTL, f, F.fuse_ioctl_in.pack(fh, 0, 0x5401, 0, U32, U32))) \
        == errno.ENOTTY
    # BATCH_FORGET with a count far beyond the payload: dropped.
    assert _batch_forget(c, U32, [(f, 1)]) == 0
    assert _alive(c, f)
    assert (here / "f").read_bytes()[:10] == b"0123456789"


def test_every_op_with_short_and_garbage_arguments(daemon: Daemon, c: FuseClient,
                                                   here: Path) -> None:
    """Every opcode the daemon serves, with arguments cut short and with 0xff bytes
    (sizes, counts and ids at their maximum, names without their NUL): each gets
    an answer, the worker survives, and nothing outside this test's file changes."""
    from shardfs.dispatch import Dispatcher

    (here / "victim").write_bytes(b"v")
    victim = node(c, f"{here.name}/victim")
    before = snapshot(daemon.shared.parent / "outside") if (
        daemon.shared.parent / "outside").exists() else {}
    others = {k: v for k, v in snapshot(daemon.shared).items() if here.name not in k}
    skip = {Op.FUSE_INIT, Op.FUSE_DESTROY}  # they end the session, tested elsewhere
    for op in sorted(set(Dispatcher.TABLE) - skip):
        for args in (b"", b"\xff" * 7, b"\xff" * 64, b"\xff" * 8192, bytes(64)):
            r = call(c, op, victim, args)
            assert r.error is not None and r.error <= 0, (op, len(args))
    assert c.getattr(victim)
    assert {k: v for k, v in snapshot(daemon.shared).items() if here.name not in k} == others
    if before:
        assert snapshot(daemon.shared.parent / "outside") == before


def test_headers_that_lie(daemon: Daemon, c: FuseClient, here: Path) -> None:
    fe = c.fe
    lookup = z(b"x")
    # len longer than the chain, shorter than the header, zero.
    for length in (HDR + len(lookup) + 1, HDR + 1000, U32, HDR - 1, 0):
        r = send_raw(fe, header(Op.FUSE_LOOKUP, 1, 0, length=length) + lookup)
        assert r.error == -errno.EINVAL, length
    # len too short for the op's struct or name.
    r = send_raw(fe, header(Op.FUSE_READ, 1, 0, length=HDR + 8) + bytes(40))
    assert r.error == -errno.EINVAL
    r = send_raw(fe, header(Op.FUSE_LOOKUP, 1, 0, length=HDR + 1) + lookup)
    assert r.error == -errno.EINVAL
    # total_extlen beyond the request, and the largest value.
    for extlen in (1, 0xFFFF):
        r = send_raw(fe, header(Op.FUSE_LOOKUP, 1, len(lookup), extlen=extlen) + lookup)
        assert r.error == -errno.EINVAL
    # No room for a reply at all: the chain comes back empty, nothing is done.
    r = send_raw(fe, header(Op.FUSE_MKDIR, 1, 10) + F.fuse_mkdir_in.pack(0o755, 0) + z(b"m"),
                 reply_size=OUT - 1)
    assert r.used == 0
    r = send_raw(fe, header(Op.FUSE_MKDIR, 1, 10) + F.fuse_mkdir_in.pack(0o755, 0) + z(b"m"),
                 reply_size=OUT + 8)
    assert r.error == -errno.EINVAL  # an entry cannot fit: refused before acting
    assert not (daemon.shared / "m").exists()
    # Unknown opcodes and opcodes from newer protocols.
    for op in (0, 53, 999, U32):  # 52 is FUSE_STATX (7.39)
        assert send_raw(fe, header(op, 1, 0)).error == -errno.ENOSYS


# -- 9. READ and WRITE past guest memory --------------------------------------------------------


def test_buffers_outside_guest_memory(daemon: Daemon, c: FuseClient, here: Path) -> None:
    (here / "f").write_bytes(b"0123456789" * 100)
    f = node(c, f"{here.name}/f")
    fh = c.open(f, os.O_RDWR)
    fe = c.fe
    q = fe.queues[1]
    end = fe.ram.base + fe.ram.size
    read = header(Op.FUSE_READ, f, F.fuse_read_in.size) + F.fuse_read_in.pack(
        fh, 0, 1000, 0, 0, 0, 0)
    write = header(Op.FUSE_WRITE, f, F.fuse_write_in.size + 1000) + F.fuse_write_in.pack(
        fh, 0, 1000, 0, 0, 0, 0)
    before = (here / "f").read_bytes()
    mark = fe.ram.mark
    req = fe.ram.alloc(len(read))
    fe.ram.write(req, read)
    wreq = fe.ram.alloc(len(write))
    fe.ram.write(wreq, write)
    out = fe.ram.alloc(64)
    chains = [
        # READ whose reply buffer lies past the end of RAM, or straddles it.
        [(req, len(read), 0), (end + 4096, 2000, VIRTQ_DESC_F_WRITE)],
        [(req, len(read), 0), (end - 100, 2000, VIRTQ_DESC_F_WRITE)],
        [(req, len(read), 0), (out, 64, VIRTQ_DESC_F_WRITE), (1 << 62, 4096,
                                                              VIRTQ_DESC_F_WRITE)],
        # WRITE whose payload lies outside RAM; the request header itself outside.
        [(wreq, len(write), 0), (U64 - 500, 1000, 0), (out, 64, VIRTQ_DESC_F_WRITE)],
        [(end, len(read), 0), (out, 64, VIRTQ_DESC_F_WRITE)],
        # A length that wraps the address space.
        [(req, len(read), 0), (out, U32, VIRTQ_DESC_F_WRITE)],
    ]
    heads = []
    for chain in chains:
        ids = [q.free.pop(0) for _ in chain]
        for k, (addr, length, flags) in enumerate(chain):
            more = VIRTQ_DESC_F_NEXT if k + 1 < len(chain) else 0
            q.raw_desc(ids[k], addr, length, flags | more, ids[k + 1] if more else 0)
        q.publish(ids[0])
        heads.append(ids[0])
    # An indirect table outside RAM.
    head = q.free.pop(0)
    q.raw_desc(head, end + 8192, 64, VIRTQ_DESC_F_INDIRECT, 0)
    q.publish(head)
    heads.append(head)
    fe.kick_queue(1)
    used = fe.wait_used(1, len(heads))
    fe.ram.reset_alloc(mark)
    assert sorted(used) == sorted((h, 0) for h in heads)
    assert (here / "f").read_bytes() == before
    # The queue and the worker go on serving.
    assert c.read(f, fh, 0, 10) == b"0123456789"
    assert daemon.log_text().count("malformed descriptor chain") >= len(heads)


def test_reply_split_at_the_edge_of_memory(daemon: Daemon, c: FuseClient, here: Path) -> None:
    """A READ whose reply descriptors are valid but scattered: data lands only there."""
    (here / "f").write_bytes(bytes(range(256)) * 16)
    f = node(c, f"{here.name}/f")
    fh = c.open(f)
    fe = c.fe
    q = fe.queues[1]
    mark = fe.ram.mark
    req = header(Op.FUSE_READ, f, F.fuse_read_in.size) + F.fuse_read_in.pack(
        fh, 0, 4096, 0, 0, 0, 0)
    rg = fe.ram.alloc(len(req))
    fe.ram.write(rg, req)
    # The reply ends exactly at the last byte of RAM, in pieces of 1, 15 and 4096.
    last = fe.ram.base + fe.ram.size
    pieces = [(last - 4096 - 16, 1), (last - 4096 - 15, 15), (last - 4096, 4096)]
    guard = fe.ram.read(last - 4096 - 17, 1)
    head = q.add([(rg, len(req))], pieces)
    fe.kick_queue(1)
    assert fe.wait_used(1) == [(head, OUT + 4096)]
    assert fe.ram.read(last - 4096, 4096) == bytes(range(256)) * 16
    assert fe.ram.read(last - 4096 - 17, 1) == guard
    fe.ram.reset_alloc(mark)
