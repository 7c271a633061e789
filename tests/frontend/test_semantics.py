"""POSIX semantics through the real daemon: every answer checked against the host.

Raw FUSE requests go through the in-repo frontend to the daemon process;
the host files are then compared with what the guest was told.  The README
section "Semantics" states the decisions these tests hold the daemon to
(locks refused as virtiofsd refuses them, O_DIRECT, the cache policies...).
"""

from __future__ import annotations

import errno
import os
import random
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.testing.frontend import FuseClient
from tests.frontend.conftest import REPO, Daemon
from tests.frontend.test_threats import (
    U64,
    Raw,
    call,
    entry,
    err,
    header,
    mode_of,
    node,
    node_in,
    opendir,
    send_raw,
    worker_pid,
    z,
)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
BLOCK = 4096
NSEC = 1_000_000_000
#: What a 6.12 guest offers at INIT (flags2 carries bits 32..63).
ALL_FLAGS2 = (F.FUSE_SECURITY_CTX | F.FUSE_HAS_INODE_DAX | F.FUSE_CREATE_SUPP_GROUP) >> 32
ENTRY_COUNT = 100_000


def _setattr(valid: int, *, mode: int = 0, size: int = 0, atime: int = 0, mtime: int = 0,
             uid: int = 0, gid: int = 0, fh: int = 0) -> bytes:
    a_s, a_ns = divmod(atime, NSEC)
    m_s, m_ns = divmod(mtime, NSEC)  # seconds are u64 on the wire, signed in meaning
    return F.fuse_setattr_in.pack(valid, 0, fh, size, 0, a_s & U64, m_s & U64, 0, a_ns, m_ns,
                                  0, mode, 0, uid, gid, 0)


def create(c: FuseClient, parent: int, name: bytes, flags: int, mode: int = 0o644,
           umask: int = 0, open_flags: int = 0, uid: int = 0, gid: int = 0) -> Raw:
    return call(c, Op.FUSE_CREATE, parent,
                F.fuse_create_in.pack(flags, mode, umask, open_flags) + z(name), uid=uid,
                gid=gid)


def opened(r: Raw) -> tuple[int, int, int]:
    """(nodeid, fh, open_flags) of a CREATE or TMPFILE reply."""
    e = entry(r)
    fh, open_flags, _ = F.fuse_open_out.unpack_from(r.data, F.fuse_entry_out.size)
    return int(e[0]), int(fh), int(open_flags)


def attr(c: FuseClient, nid: int) -> tuple:
    """fuse_attr fields of a GETATTR (ino, size, blocks, atime, mtime, ctime, ...)."""
    return c.getattr(nid)[3:]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("semantics"), "--sandbox", "none")
    yield d
    assert d.stop() == 0
    assert "Traceback" not in d.log_path.read_text()


@pytest.fixture
def c(daemon: Daemon) -> Iterator[FuseClient]:
    pid = worker_pid(daemon)
    with daemon.frontend() as fe:
        fe.start()
        client = FuseClient(fe)
        client.init(flags2=ALL_FLAGS2)
        yield client
    assert worker_pid(daemon) == pid


def started(d: Daemon, flags: int = 0xFFFF_FFFF, flags2: int = ALL_FLAGS2) -> Iterator[
        tuple[FuseClient, tuple]]:
    with d.frontend() as fe:
        fe.start()
        client = FuseClient(fe)
        yield client, client.init(flags=flags, flags2=flags2)


@pytest.fixture
def option_daemon(tmp_path: Path) -> Iterator[list[Daemon]]:
    """Daemons a test starts with its own options; stopped cleanly afterwards."""
    made: list[Daemon] = []
    yield made
    for d in made:
        assert d.stop() == 0
        assert "Traceback" not in d.log_path.read_text()


def start(made: list[Daemon], tmp: Path, *args: str) -> Daemon:
    tmp.mkdir(exist_ok=True)
    d = Daemon(tmp, "--sandbox", "none", *args)
    made.append(d)
    return d


# -- INIT; what is refused and why ------------------------------------------------------------


def test_init_never_offers_locks_and_lock_ops_are_enosys(c: FuseClient, here: Path) -> None:
    out = c.init(flags=0xFFFF_FFFF, flags2=ALL_FLAGS2)
    flags = out[3] | out[10] << 32
    # Locks stay in the guest kernel, as with virtiofsd's default.
    assert not flags & (F.FUSE_POSIX_LOCKS | F.FUSE_FLOCK_LOCKS)
    # Off unless configured: writeback, ACLs, killpriv_v2, security labels.
    assert not flags & (F.FUSE_WRITEBACK_CACHE | F.FUSE_POSIX_ACL | F.FUSE_HANDLE_KILLPRIV_V2
                        | F.FUSE_SECURITY_CTX | F.FUSE_SETXATTR_EXT | F.FUSE_DONT_MASK)
    assert flags & F.FUSE_CREATE_SUPP_GROUP and flags & F.FUSE_DO_READDIRPLUS
    assert out[1] == 41  # we speak 7.41, Linux 6.12's (FUSE_STATX is 7.39)
    (here / "f").write_bytes(b"x")
    f = node(c, f"{here.name}/f")
    fh = c.open(f)
    lk = F.fuse_lk_in.pack(fh, 1, 0, 100, 1, 1234, 0, 0)
    for op in (Op.FUSE_GETLK, Op.FUSE_SETLK, Op.FUSE_SETLKW):
        assert err(call(c, op, f, lk)) == errno.ENOSYS
    for op, args in ((Op.FUSE_BMAP, F.fuse_bmap_in.pack(0, 4096, 0)),
                     (Op.FUSE_POLL, F.fuse_poll_in.pack(fh, 0, 0, 0))):
        assert err(call(c, op, f, args)) == errno.ENOSYS
    assert err(call(c, Op.FUSE_IOCTL, f, F.fuse_ioctl_in.pack(fh, 0, 0x5401, 0, 0, 0))) \
        == errno.ENOTTY


# -- STATX ---------------------------------------------------------------------------------------

STATX_BASIC_STATS, STATX_BTIME = 0x7FF, 0x800


def _statx(c: FuseClient, nodeid: int, mask: int = STATX_BASIC_STATS | STATX_BTIME,
           getattr_flags: int = 0, fh: int = 0) -> tuple:
    r = call(c, Op.FUSE_STATX, nodeid, F.fuse_statx_in.pack(getattr_flags, 0, fh, 0, mask))
    assert r.error == 0, r.error
    return F.fuse_statx_out.unpack(r.data)


def test_statx_is_the_hosts_with_the_birth_time(c: FuseClient, here: Path) -> None:
    """Linux 6.12 sends FUSE_STATX whenever a caller asks for more than the basic
    fields (coreutils' stat asks for the birth time); virtiofsd answers ENOSYS
    and the guest shows no birth time.  We answer with the host's statx."""
    p = here / "f"
    p.write_bytes(b"hello")
    os.utime(p, ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
    host = subprocess.run(["stat", "-c", "%W", str(p)], capture_output=True, text=True,
                          check=True).stdout.strip()
    st = os.lstat(p)
    (_av, _ans, flags, mask, blksize, _attrs, nlink, uid, gid, mode, _sp, ino, size, blocks,
     _amask, a_s, a_ns, _r1, b_s, b_ns, _r2, c_s, c_ns, _r3, m_s, m_ns, _r4, rdev_maj,
     rdev_min, dev_maj, dev_min) = _statx(c, node(c, f"{here.name}/f"))
    assert mask & STATX_BASIC_STATS == STATX_BASIC_STATS and flags == 0
    assert (mode, ino, nlink, uid, gid, size, blocks, blksize) == (
        st.st_mode, st.st_ino, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_blocks,
        st.st_blksize)
    assert (a_s, a_ns, m_s, m_ns) == (1_500_000_000, 123_456_789, 1_600_000_000, 987_654_321)
    assert c_s * NSEC + c_ns == st.st_ctime_ns
    if host not in ("0", "-", "?"):  # the host filesystem records birth times
        assert mask & STATX_BTIME and str(b_s) == host
    assert (rdev_maj, rdev_min, dev_maj, dev_min) == (0, 0, 0, 0)  # no host device numbers


def test_statx_of_a_symlink_and_a_device_is_the_node_itself(c: FuseClient, here: Path) -> None:
    os.symlink("/etc/passwd", here / "ln")  # a host symlink pointing outside: never followed
    ln = _statx(c, node(c, f"{here.name}/ln"))
    assert stat.S_ISLNK(ln[9]) and ln[11] == os.lstat(here / "ln").st_ino  # mode, ino
    os.mknod(here / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    dev = _statx(c, node(c, f"{here.name}/null"))
    assert stat.S_ISCHR(dev[9]) and (dev[27], dev[28]) == (1, 3)


def test_statx_refuses_what_getattr_refuses(c: FuseClient, here: Path) -> None:
    args = F.fuse_statx_in.pack(0, 0, 0, 0, STATX_BASIC_STATS)
    assert err(call(c, Op.FUSE_STATX, 0xDEAD_0000_0007, args)) == errno.ENOENT  # forged
    assert err(call(c, Op.FUSE_STATX, 1, args[:10])) == errno.EINVAL  # truncated
    r = call(c, Op.FUSE_STATX, 1, args, reply_size=F.fuse_out_header.size + 100)
    assert r.error == -errno.EINVAL  # no room for fuse_statx_out: refused before acting
    # Only fuse_statx's fields are asked for, whatever the guest's mask says.
    assert _statx(c, 1, mask=0xFFFF_FFFF)[3] & ~(STATX_BASIC_STATS | STATX_BTIME) == 0


# -- TMPFILE, LSEEK, FALLOCATE, COPY_FILE_RANGE ------------------------------------------------


def test_tmpfile(c: FuseClient, here: Path) -> None:
    os.chmod(here, 0o777)
    top = node(c, here.name)
    r = call(c, Op.FUSE_TMPFILE, top, F.fuse_create_in.pack(
        os.O_RDWR | os.O_TMPFILE, 0o640, 0o022, 0) + z(b"/"), uid=1000, gid=1000)
    nid, fh, _ = opened(r)
    a = F.fuse_entry_out.unpack_from(r.data)[6:]
    assert a[10] == 0 and stat.S_ISREG(a[9]) and stat.S_IMODE(a[9]) == 0o640  # nlink 0
    assert os.listdir(here) == []
    assert c.write(nid, fh, 0, b"temporary") == 9
    entry(call(c, Op.FUSE_LINK, top, F.fuse_link_in.pack(nid) + z(b"kept")))
    st = os.lstat(here / "kept")
    assert (here / "kept").read_bytes() == b"temporary"
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o640)
    c.release(nid, fh)
    # O_TMPFILE with O_EXCL can never get a name.
    nid, fh, _ = opened(call(c, Op.FUSE_TMPFILE, top, F.fuse_create_in.pack(
        os.O_RDWR | os.O_EXCL, 0o600, 0, 0) + z(b"/")))
    assert err(call(c, Op.FUSE_LINK, top, F.fuse_link_in.pack(nid) + z(b"no"))) == errno.ENOENT
    assert sorted(os.listdir(here)) == ["kept"]


def test_seek_data_hole_and_fallocate_modes(c: FuseClient, here: Path) -> None:
    p = here / "sparse"
    with open(p, "wb") as w:
        w.write(b"D" * BLOCK)
        w.seek(64 * BLOCK)
        w.write(b"E" * BLOCK)
    f = node(c, f"{here.name}/sparse")
    fh = c.open(f, os.O_RDWR)

    def lseek(offset: int, whence: int) -> int:
        r = call(c, Op.FUSE_LSEEK, f, F.fuse_lseek_in.pack(fh, offset, whence, 0))
        if r.error:
            return r.error
        return int(F.fuse_lseek_out.unpack(r.data)[0])

    def fallocate(offset: int, length: int, mode: int) -> int:
        return err(call(c, Op.FUSE_FALLOCATE, f,
                        F.fuse_fallocate_in.pack(fh, offset, length, mode, 0)))

    fd = os.open(p, os.O_RDONLY)
    try:
        for offset, whence in ((0, os.SEEK_HOLE), (BLOCK, os.SEEK_DATA), (0, os.SEEK_DATA),
                               (65 * BLOCK - 1, os.SEEK_HOLE), (7, os.SEEK_SET),
                               (0, os.SEEK_END)):
            assert lseek(offset, whence) == os.lseek(fd, offset, whence), (offset, whence)
        assert lseek(66 * BLOCK, os.SEEK_DATA) == -errno.ENXIO  # past the end: as lseek(2)
        size = os.fstat(fd).st_size
        assert fallocate(size, 4 * BLOCK, FALLOC_FL_KEEP_SIZE) == 0
        assert os.fstat(fd).st_size == size and os.fstat(fd).st_blocks > 16
        assert fallocate(0, BLOCK, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0 and os.pread(fd, 4, 0) == bytes(4)
        assert fallocate(64 * BLOCK, 100, FALLOC_FL_ZERO_RANGE) == 0
        assert os.pread(fd, 101, 64 * BLOCK) == bytes(100) + b"E"
        assert fallocate(0, 1, FALLOC_FL_PUNCH_HOLE) == errno.EOPNOTSUPP  # needs KEEP_SIZE
        assert fallocate(size, BLOCK, 0) == 0 and os.fstat(fd).st_size == size + BLOCK
    finally:
        os.close(fd)
    r = create(c, node(c, here.name), b"copy", os.O_RDWR)
    dst, dfh, _ = opened(r)
    r = call(c, Op.FUSE_COPY_FILE_RANGE, f, F.fuse_copy_file_range_in.pack(
        fh, 64 * BLOCK + 100, dst, dfh, 5, 50, 0))
    assert r.error == 0 and F.fuse_write_out.unpack(r.data)[0] == 50
    assert (here / "copy").read_bytes() == bytes(5) + b"E" * 50


# -- timestamps and open flags -----------------------------------------------------------------


def test_timestamps_now_omit_and_nanoseconds(c: FuseClient, here: Path) -> None:
    p = here / "f"
    p.write_bytes(b"")
    f = node(c, f"{here.name}/f")
    t = 1_234_567_890 * NSEC + 123_456_789
    assert call(c, Op.FUSE_SETATTR, f, _setattr(F.FATTR_ATIME | F.FATTR_MTIME, atime=t,
                                                mtime=t + 1)).error == 0
    st = os.lstat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (t, t + 1)
    # Only atime "now": mtime untouched (UTIME_OMIT), and the reply is the host's.
    r = call(c, Op.FUSE_SETATTR, f, _setattr(F.FATTR_ATIME | F.FATTR_ATIME_NOW))
    a = F.fuse_attr_out.unpack(r.data)[3:]
    st = os.lstat(p)
    assert st.st_mtime_ns == t + 1 and st.st_atime_ns > t + NSEC
    assert a[3] * NSEC + a[6] == st.st_atime_ns and a[4] * NSEC + a[7] == st.st_mtime_ns
    # A time before 1970 and one far in the future survive the round trip.
    for when in (-5 * NSEC + 7, (1 << 33) * NSEC):
        assert call(c, Op.FUSE_SETATTR, f, _setattr(F.FATTR_MTIME, mtime=when)).error == 0
        assert os.lstat(p).st_mtime_ns == when
    # The ctime is the host's own: a chmod moves it.
    before = os.lstat(p).st_ctime_ns
    call(c, Op.FUSE_SETATTR, f, _setattr(F.FATTR_MODE, mode=0o600))
    assert os.lstat(p).st_ctime_ns >= before and mode_of(p) == 0o600


def test_o_append_o_trunc_o_excl(c: FuseClient, here: Path) -> None:
    top = node(c, here.name)
    p = here / "f"
    p.write_bytes(b"0123")
    f = node_in(c, top, b"f")
    fh = c.open(f, os.O_WRONLY | os.O_APPEND)
    c.write(f, fh, 0, b"AB")  # the offset is ignored under O_APPEND, as on the host
    os.truncate(p, 6)  # another writer on the host moves the end
    with open(p, "ab") as w:
        w.write(b"h")
    c.write(f, fh, 0, b"CD")
    assert p.read_bytes() == b"0123ABhCD"
    fh2 = c.open(f, os.O_WRONLY | os.O_TRUNC)
    assert p.read_bytes() == b"" and fh2
    assert err(create(c, top, b"f", os.O_RDWR | os.O_CREAT | os.O_EXCL)) == errno.EEXIST
    nid, _, _ = opened(create(c, top, b"f", os.O_RDWR | os.O_CREAT))
    assert nid == f
    nid, _, _ = opened(create(c, top, b"g", os.O_RDWR | os.O_CREAT | os.O_EXCL, mode=0o600,
                              umask=0o077))
    assert mode_of(here / "g") == 0o600


def test_o_direct_is_served_at_any_alignment(c: FuseClient, here: Path, daemon: Daemon) -> None:
    (here / "f").write_bytes(bytes(3 * BLOCK))
    f = node(c, f"{here.name}/f")
    fh = c.open(f, os.O_RDWR | os.O_DIRECT)
    assert c.write(f, fh, 3, b"unaligned") == 9
    assert c.read(f, fh, 1, 12) == b"\0\0unaligned\0"[:12]
    # The host fd is not O_DIRECT (as virtiofsd without --allow-direct-io).
    pid = worker_pid(daemon)
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == os.fspath(here / "f"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = int(info.read().split("flags:")[1].split()[0], 8)
                assert not flags & os.O_DIRECT
        except FileNotFoundError:
            pass


# -- rename flags, links, special nodes --------------------------------------------------------


def test_rename_flags(c: FuseClient, here: Path) -> None:
    for name in ("a", "b"):
        (here / name).write_bytes(name.encode())
    top = node(c, here.name)

    def rename2(old: bytes, new: bytes, flags: int) -> int:
        return err(call(c, Op.FUSE_RENAME2, top, F.fuse_rename2_in.pack(top, flags, 0)
                        + z(old) + z(new)))

    assert rename2(b"a", b"b", RENAME_NOREPLACE) == errno.EEXIST
    assert rename2(b"a", b"b", RENAME_EXCHANGE) == 0
    assert (here / "a").read_bytes() == b"b" and (here / "b").read_bytes() == b"a"
    assert rename2(b"a", b"c", RENAME_EXCHANGE) == errno.ENOENT
    assert rename2(b"a", b"c", RENAME_NOREPLACE | RENAME_EXCHANGE) == errno.EINVAL
    assert rename2(b"a", b"c", 8) == errno.EINVAL
    assert rename2(b"a", b"c", RENAME_WHITEOUT) == 0
    w = os.lstat(here / "a")
    assert stat.S_ISCHR(w.st_mode) and w.st_rdev == 0  # the whiteout overlayfs reads
    assert (here / "c").read_bytes() == b"b"
    assert err(call(c, Op.FUSE_RENAME, top, F.fuse_rename_in.pack(top) + z(b"c") + z(b"b"))) \
        == 0
    assert sorted(os.listdir(here)) == ["a", "b"]


def test_links_symlinks_and_device_nodes(c: FuseClient, here: Path) -> None:
    top = node(c, here.name)
    (here / "f").write_bytes(b"f")
    f = node_in(c, top, b"f")
    e = entry(call(c, Op.FUSE_LINK, top, F.fuse_link_in.pack(f) + z(b"hard")))
    assert e[0] == f and e[6 + 10] == 2 == os.lstat(here / "f").st_nlink
    e = entry(call(c, Op.FUSE_SYMLINK, top, z(b"ln") + z(b"../f/../missing")))
    assert c.ok(Op.FUSE_READLINK, e[0]) == b"../f/../missing"
    assert os.readlink(here / "ln") == "../f/../missing"
    kinds = {b"fifo": (stat.S_IFIFO, 0), b"sock": (stat.S_IFSOCK, 0),
             b"chr": (stat.S_IFCHR, os.makedev(1, 7)), b"blk": (stat.S_IFBLK, os.makedev(7, 9))}
    for name, (kind, rdev) in kinds.items():
        major, minor = os.major(rdev), os.minor(rdev)
        encoded = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
        e = entry(call(c, Op.FUSE_MKNOD, top, F.fuse_mknod_in.pack(
            kind | 0o640, encoded, 0o022, 0) + z(name)))
        st = os.lstat(here / name.decode())
        assert stat.S_IFMT(st.st_mode) == kind and st.st_rdev == rdev
        assert stat.S_IMODE(st.st_mode) == 0o640 and e[6 + 9] == st.st_mode
    assert err(call(c, Op.FUSE_MKNOD, top, F.fuse_mknod_in.pack(stat.S_IFDIR | 0o755, 0, 0, 0)
                    + z(b"dir"))) in (errno.EPERM, errno.EINVAL)
    assert err(call(c, Op.FUSE_LINK, top, F.fuse_link_in.pack(top) + z(b"dirlink"))) \
        == errno.EPERM


def test_xattr_namespaces(c: FuseClient, here: Path) -> None:
    (here / "f").write_bytes(b"")
    f = node(c, f"{here.name}/f")
    for name, value in ((b"user.u", b"1"), (b"trusted.t", b"2"), (b"security.s", b"3")):
        args = F.fuse_getxattr_in.pack(len(value), 0) + z(name) + value
        assert err(call(c, Op.FUSE_SETXATTR, f, args)) == 0
        assert os.getxattr(here / "f", name.decode()) == value
        r = call(c, Op.FUSE_GETXATTR, f, F.fuse_getxattr_in.pack(0, 0) + z(name))
        assert r.error == 0 and F.fuse_getxattr_out.unpack(r.data)[0] == len(value)
    r = call(c, Op.FUSE_LISTXATTR, f, F.fuse_getxattr_in.pack(4096, 0))
    assert sorted(r.data.split(b"\0")[:-1]) == sorted(
        os.fsencode(n) for n in os.listxattr(here / "f"))
    # ACLs are off unless posix_acl is on: the guest would not enforce them.
    assert err(call(c, Op.FUSE_GETXATTR, f, F.fuse_getxattr_in.pack(100, 0)
                    + z(b"system.posix_acl_access"))) == errno.ENODATA
    assert err(call(c, Op.FUSE_REMOVEXATTR, f, z(b"trusted.t"))) == 0
    assert "trusted.t" not in os.listxattr(here / "f")


# -- the options: posix_acl, security labels, supplementary groups, killpriv -------------------


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_posix_acl(option_daemon: list[Daemon], tmp_path: Path) -> None:
    d = start(option_daemon, tmp_path / "acl", "--posix-acl", "true")
    for c, out in started(d):
        flags = out[3]
        acl_flags = F.FUSE_POSIX_ACL | F.FUSE_DONT_MASK | F.FUSE_SETXATTR_EXT
        assert flags & acl_flags == acl_flags
        p = d.shared / "f"
        p.write_bytes(b"")
        os.chmod(p, 0o2770)
        f = node_in(c, 1, b"f")
        value = _acl((1, 7, 0xFFFFFFFF), (2, 6, 1234), (4, 7, 0xFFFFFFFF), (0x10, 7, 0xFFFFFFFF),
                     (0x20, 0, 0xFFFFFFFF))
        # With SETXATTR_EXT the request carries setxattr_flags: ACL_KILL_SGID.
        args = F.fuse_setxattr_in.pack(len(value), 0, F.FUSE_SETXATTR_ACL_KILL_SGID, 0) + z(
            b"system.posix_acl_access") + value
        assert err(call(c, Op.FUSE_SETXATTR, f, args)) == 0
        assert mode_of(p) == 0o770
        raw = os.getxattr(p, "system.posix_acl_access")
        assert struct.pack("<HHI", 2, 6, 1234) in raw
        # DONT_MASK: the umask is applied by the host kernel unless a default ACL rules.
        os.setxattr(d.shared, "system.posix_acl_default",
                    _acl((1, 7, 0xFFFFFFFF), (4, 5, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)))
        opened(create(c, 1, b"g", os.O_RDWR, mode=0o777, umask=0o022))
        assert mode_of(d.shared / "g") == 0o750
        os.removexattr(d.shared, "system.posix_acl_default")
        opened(create(c, 1, b"h", os.O_RDWR, mode=0o777, umask=0o027))
        assert mode_of(d.shared / "h") == 0o750


def _ext(typ: int, body: bytes) -> bytes:
    pad = (-len(body)) % 8
    return F.fuse_ext_header.pack(8 + len(body) + pad, typ) + body + bytes(pad)


def _groups(*gids: int) -> bytes:
    return _ext(F.FUSE_EXT_GROUPS, struct.pack(f"<I{len(gids)}I", len(gids), *gids))


def _secctx(name: bytes, value: bytes) -> bytes:
    return _ext(1, F.fuse_secctx.pack(len(value), 0) + z(name) + value)


def _with_ext(c: FuseClient, op: int, nid: int, args: bytes, ext: bytes, **kw: int) -> Raw:
    assert len(ext) % 8 == 0
    return send_raw(c.fe, header(op, nid, len(args) + len(ext), extlen=len(ext) // 8, **kw)
                    + args + ext)


def test_request_extensions(option_daemon: list[Daemon], tmp_path: Path) -> None:
    d = start(option_daemon, tmp_path / "ext", "--security-label", "true")
    sg = d.shared / "sg"
    sg.mkdir()
    os.chown(sg, 0, 4321)
    os.chmod(sg, 0o2777)
    for c, out in started(d):
        assert (out[3] | out[10] << 32) & (F.FUSE_SECURITY_CTX | F.FUSE_CREATE_SUPP_GROUP) \
            == F.FUSE_SECURITY_CTX | F.FUSE_CREATE_SUPP_GROUP
        dir_ = node_in(c, 1, b"sg")
        label = _secctx(b"security.shardfs", b"guest_t\0")
        mkfile = F.fuse_create_in.pack(os.O_RDWR, 0o2775, 0, 0)
        # The secctx comes first, then the groups, as Linux lays them out.
        r = _with_ext(c, Op.FUSE_CREATE, dir_, mkfile + z(b"member"), label + _groups(4321),
                      uid=1000, gid=1000)
        opened(r)
        r = _with_ext(c, Op.FUSE_CREATE, dir_, mkfile + z(b"outsider"), _secctx(
            b"security.shardfs", b""), uid=1000, gid=1000)
        opened(r)
        assert mode_of(sg / "member") == 0o2775  # in the group by its supplementary group
        assert mode_of(sg / "outsider") == 0o775
        assert os.getxattr(sg / "member", "security.shardfs") == b"guest_t\0"
        entry(_with_ext(c, Op.FUSE_MKDIR, dir_, F.fuse_mkdir_in.pack(0o755, 0) + z(b"d"),
                        label))
        entry(_with_ext(c, Op.FUSE_SYMLINK, dir_, z(b"ln") + z(b"t"), label))
        entry(_with_ext(c, Op.FUSE_MKNOD, dir_, F.fuse_mknod_in.pack(
            stat.S_IFIFO | 0o600, 0, 0, 0) + z(b"p"), label))
        for name in ("d", "ln", "p"):
            assert os.getxattr(sg / name, "security.shardfs", follow_symlinks=False) \
                == b"guest_t\0"
        # Extensions that lie: refused whole, nothing created.
        before = sorted(os.listdir(sg))
        bad = [F.fuse_ext_header.pack(0, 32),  # size 0
               F.fuse_ext_header.pack(12, 32) + bytes(4),  # not 8-aligned
               F.fuse_ext_header.pack(64, 32),  # beyond the area
               _ext(F.FUSE_EXT_GROUPS, struct.pack("<I", 1000)),  # 1000 groups in 4 bytes
               _ext(1, F.fuse_secctx.pack(100, 0) + b"security.x"),  # no NUL, short value
               _ext(2, F.fuse_secctx.pack(1, 0) + z(b"security.x") + b"v")]  # 2 claimed, 1
        for ext in bad:
            ext += bytes((-len(ext)) % 8)
            assert err(_with_ext(c, Op.FUSE_MKDIR, dir_, F.fuse_mkdir_in.pack(0o755, 0)
                                 + z(b"bad"), ext)) == errno.EINVAL
        # A label that is not a security xattr is refused by the filesystem.
        assert err(_with_ext(c, Op.FUSE_MKDIR, dir_, F.fuse_mkdir_in.pack(0o755, 0)
                             + z(b"bad"), _secctx(b"user.x", b"1"))) == errno.EINVAL
        # Unknown extension types from newer kernels are skipped.
        entry(_with_ext(c, Op.FUSE_MKDIR, dir_, F.fuse_mkdir_in.pack(0o755, 0) + z(b"new"),
                        _ext(99, b"future")))
        assert sorted(os.listdir(sg)) == sorted([*before, "new"])


def test_killpriv_v2_option(option_daemon: list[Daemon], tmp_path: Path) -> None:
    d = start(option_daemon, tmp_path / "kp", "--killpriv-v2", "true")
    for _, out in started(d):
        assert out[3] & F.FUSE_HANDLE_KILLPRIV_V2


# -- READDIR over 100,000 entries, resumed across separate opens -------------------------------


@pytest.fixture
def big(here: Path) -> Iterator[Path]:
    """A tmpfs in the share, so 100,000 names take a second to make, not ten
    (ext4's hash cookies are covered by the contract suite)."""
    p = here / "big"
    p.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", os.fspath(p)],
                   check=True)
    try:
        yield p
    finally:
        subprocess.run(["umount", "-l", os.fspath(p)], check=False)


def test_readdir_resumes_across_opens_over_100k_entries(c: FuseClient, here: Path,
                                                        big: Path) -> None:
    seeds = [big / "seed0", big / "seed1"]
    for seed in seeds:
        seed.write_bytes(b"")
    fd = os.open(big, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(ENTRY_COUNT):
            os.link(b"seed%d" % (i % 2), b"e%06d" % i, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)
    d = node(c, f"{here.name}/big")
    listing: list[tuple[int, int, int, bytes]] = []
    offset = 0
    while True:  # every chunk through its own OPENDIR, as after a guest's seekdir
        fh = opendir(c, d)
        batch = c.readdir(d, fh, offset, size=1 << 16)
        c.ok(Op.FUSE_RELEASEDIR, d, F.fuse_release_in.pack(fh, 0, 0, 0))
        if not batch:
            break
        listing += batch
        offset = batch[-1][1]
    names = [n for *_, n in listing]
    assert len(names) == len(set(names)) == ENTRY_COUNT + 4
    assert set(names) == {b".", b"..", *(os.fsencode(n) for n in os.listdir(big))}
    inos = {os.lstat(p).st_ino: p.name.encode() for p in seeds}
    assert all(ino in inos for ino, _, _, n in listing if n.startswith(b"e"))
    # Resume at any cookie, through a handle that never saw it.
    rng = random.Random(7)
    for k in [0, 1, len(listing) - 2, *rng.sample(range(len(listing)), 20)]:
        fh = opendir(c, d)
        got = c.readdir(d, fh, listing[k][1], size=1024)
        c.ok(Op.FUSE_RELEASEDIR, d, F.fuse_release_in.pack(fh, 0, 0, 0))
        assert [n for *_, n in got] == names[k + 1:k + 1 + len(got)]
    # READDIRPLUS from the middle: each entry comes with its node, counted
    # once per record (the e* names are two inodes: two nodes).
    fh = opendir(c, d)
    plus = c.readdir(d, fh, listing[50_000][1], size=4096, plus=True)
    assert [n for *_, n in plus] == names[50_001:50_001 + len(plus)]
    for ino, name in inos.items():
        seed = node_in(c, d, name)
        c.forget(seed, 1 + sum(1 for i, *_ in plus if i == ino))
        assert err(call(c, Op.FUSE_GETATTR, seed, F.fuse_getattr_in.pack(0, 0, 0))) \
            == errno.ENOENT


# -- cache policies and writeback --------------------------------------------------------------


@pytest.mark.parametrize("policy,timeout,open_flags,dir_flags", [
    ("never", 0, F.FOPEN_DIRECT_IO, 0),
    ("metadata", 86400, F.FOPEN_DIRECT_IO, F.FOPEN_CACHE_DIR | F.FOPEN_KEEP_CACHE),
    ("auto", 1, 0, 0),
    ("always", 86400, F.FOPEN_KEEP_CACHE, F.FOPEN_CACHE_DIR | F.FOPEN_KEEP_CACHE),
])
def test_cache_policy_as_virtiofsd(option_daemon: list[Daemon], tmp_path: Path, policy: str,
                                   timeout: int, open_flags: int, dir_flags: int) -> None:
    d = start(option_daemon, tmp_path / policy, "--cache", policy)
    (d.shared / "f").write_bytes(b"")
    for c, _ in started(d):
        e = c.lookup(1, b"f")
        assert (e[2], e[3], e[4], e[5]) == (timeout, timeout, 0, 0)
        assert F.fuse_attr_out.unpack(c.ok(Op.FUSE_GETATTR, e[0], F.fuse_getattr_in.pack(
            0, 0, 0)))[0] == timeout
        r = call(c, Op.FUSE_OPEN, e[0], F.fuse_open_in.pack(os.O_RDONLY, 0))
        assert F.fuse_open_out.unpack(r.data)[1] == open_flags
        r = call(c, Op.FUSE_OPENDIR, 1, F.fuse_open_in.pack(os.O_RDONLY, 0))
        assert F.fuse_open_out.unpack(r.data)[1] == dir_flags
        assert opened(create(c, 1, b"g", os.O_RDWR))[2] == open_flags


def test_writeback(option_daemon: list[Daemon], tmp_path: Path) -> None:
    d = start(option_daemon, tmp_path / "wb", "--writeback", "true")
    (d.shared / "f").write_bytes(b"0123")
    for c, out in started(d):
        assert out[3] & F.FUSE_WRITEBACK_CACHE
        f = c.lookup(1, b"f")[0]
        fh = c.open(f, os.O_WRONLY | os.O_APPEND)
        # The guest reads through a write-only handle to fill pages, and keeps
        # the append position itself: O_RDWR, no O_APPEND on the host.
        assert c.read(f, fh, 0, 4) == b"0123"
        c.write(f, fh, 1, b"X")
        assert (d.shared / "f").read_bytes() == b"0X23"
    for _c, out in started(d, flags=0xFFFF_FFFF & ~F.FUSE_WRITEBACK_CACHE):
        assert not out[3] & F.FUSE_WRITEBACK_CACHE


# -- uid/gid translation and read-only, end to end ---------------------------------------------


def test_translate_uid_gid(option_daemon: list[Daemon], tmp_path: Path) -> None:
    d = start(option_daemon, tmp_path / "ids", "--translate-uid", "map:1000:5000:10",
              "--translate-gid", "map:1000:5000:10,forbid-guest:666:1")
    os.chmod(d.shared, 0o777)
    for c, _ in started(d):
        nid, _, _ = opened(create(c, 1, b"f", os.O_RDWR, uid=1001, gid=1002))
        st = os.lstat(d.shared / "f")
        assert (st.st_uid, st.st_gid) == (5001, 5002)
        a = attr(c, nid)
        assert (a[11], a[12]) == (1001, 1002)
        r = call(c, Op.FUSE_SETATTR, nid, _setattr(F.FATTR_UID | F.FATTR_GID, uid=1009,
                                                   gid=1000))
        assert F.fuse_attr_out.unpack(r.data)[3:][11:13] == (1009, 1000)
        assert (os.lstat(d.shared / "f").st_uid, os.lstat(d.shared / "f").st_gid) == (5009,
                                                                                    5000)
        assert err(call(c, Op.FUSE_MKDIR, 1, F.fuse_mkdir_in.pack(0o755, 0) + z(b"no"),
                        gid=666)) == errno.EPERM
        os.chown(d.shared / "f", 5005, 7)
        e = c.lookup(1, b"f")
        assert (e[6 + 11], e[6 + 12]) == (1005, 7)


def test_readonly(option_daemon: list[Daemon], tmp_path: Path) -> None:
    d = start(option_daemon, tmp_path / "ro", "--readonly")
    (d.shared / "f").write_bytes(b"data")
    for c, out in started(d):
        assert not out[3] & F.FUSE_WRITEBACK_CACHE
        f = c.lookup(1, b"f")[0]
        fh = c.open(f)
        assert c.read(f, fh, 0, 10) == b"data"
        for op, nid, args in (
                (Op.FUSE_OPEN, f, F.fuse_open_in.pack(os.O_RDWR, 0)),
                (Op.FUSE_MKDIR, 1, F.fuse_mkdir_in.pack(0o755, 0) + z(b"d")),
                (Op.FUSE_CREATE, 1, F.fuse_create_in.pack(os.O_RDWR, 0o644, 0, 0) + z(b"n")),
                (Op.FUSE_UNLINK, 1, z(b"f")),
                (Op.FUSE_SETATTR, f, _setattr(F.FATTR_SIZE)),
                (Op.FUSE_WRITE, f, F.fuse_write_in.pack(fh, 0, 1, 0, 0, 0, 0) + b"x"),
                (Op.FUSE_SETXATTR, f, F.fuse_getxattr_in.pack(1, 0) + z(b"user.a") + b"1"),
                (Op.FUSE_TMPFILE, 1, F.fuse_create_in.pack(os.O_RDWR, 0o644, 0, 0) + z(b"/"))):
            assert err(call(c, op, nid, args)) == errno.EROFS, op
        assert sorted(os.listdir(d.shared)) == ["f"]
        assert (d.shared / "f").read_bytes() == b"data"


@pytest.mark.parametrize("flag,value", [
    ("--translate-uid", "map:1000:5000"), ("--translate-gid", "squash-host:1"),
    ("--xattrmap", ":prefix:all:a:b:"), ("--posix-acl", "maybe")])
def test_bad_option_stops_start_naming_the_field(tmp_path: Path, flag: str, value: str) -> None:
    args = [sys.executable, "-m", "shardfs", "--socket-path", os.fspath(tmp_path / "s"),
            "--shared-dir", os.fspath(tmp_path / "share"), flag, value]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2
    line, = r.stderr.splitlines()
    assert line.startswith("shardfs: ") and f" {flag[2:].replace('-', '_')}: " in line, line
