"""Everyday FUSE operations through the real daemon, checked on the host."""

from __future__ import annotations

import errno
import hashlib
import os
import struct

import pytest

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.testing.frontend import FuseClient
from tests.frontend.conftest import Daemon


def _name(s: str) -> bytes:
    return s.encode() + b"\0"


def test_create_write_read_roundtrip(daemon: Daemon, fuse: FuseClient) -> None:
    entry, fh = fuse.create(1, b"hello.txt")
    nodeid = entry[0]
    assert fuse.write(nodeid, fh, 0, b"hello world") == 11
    assert fuse.read(nodeid, fh, 6, 100) == b"world"
    fuse.release(nodeid, fh)
    assert (daemon.shared / "hello.txt").read_bytes() == b"hello world"


@pytest.mark.parametrize("split", [1, 7, 40, 41, 4096])
def test_request_split_across_descriptors(daemon: Daemon, fuse: FuseClient, split: int) -> None:
    entry, fh = fuse.create(1, f"split{split}".encode())
    data = bytes(range(150))  # with split=1 the chain has 230 descriptors
    assert fuse.write(entry[0], fh, 0, data, split=split) == len(data)
    assert (daemon.shared / f"split{split}").read_bytes() == data


def test_indirect_descriptors(daemon: Daemon, fuse: FuseClient) -> None:
    entry, fh = fuse.create(1, b"ind")
    assert fuse.write(entry[0], fh, 0, b"x" * 5000, split=1000, indirect=True) == 5000
    assert (daemon.shared / "ind").read_bytes() == b"x" * 5000


def test_large_write_and_read_1mib(daemon: Daemon, fuse: FuseClient) -> None:
    data = os.urandom(1 << 20)
    entry, fh = fuse.create(1, b"big")
    assert fuse.write(entry[0], fh, 0, data) == len(data)
    assert hashlib.sha256((daemon.shared / "big").read_bytes()).digest() == \
        hashlib.sha256(data).digest()
    assert fuse.read(entry[0], fh, 0, 1 << 20) == data


def test_lookup_getattr_matches_host(daemon: Daemon, fuse: FuseClient) -> None:
    (daemon.shared / "f").write_bytes(b"12345")
    os.chmod(daemon.shared / "f", 0o640)
    e = fuse.lookup(1, b"f")
    st = os.stat(daemon.shared / "f")
    attr = e[6:]
    assert attr[0] == st.st_ino and attr[1] == 5 and attr[9] == st.st_mode
    assert fuse.getattr(e[0])[3:][0] == st.st_ino
    r = fuse.call(Op.FUSE_LOOKUP, 1, _name("missing"))
    assert r.error == -errno.ENOENT


def test_mkdir_readdir_rename_unlink_rmdir(daemon: Daemon, fuse: FuseClient) -> None:
    d = fuse.mkdir(1, b"dir")[0]
    for i in range(50):
        e, fh = fuse.create(d, f"file{i:02}".encode())
        fuse.release(e[0], fh)
    fh = int(F.fuse_open_out.unpack(fuse.ok(Op.FUSE_OPENDIR, d,
                                            F.fuse_open_in.pack(os.O_RDONLY, 0)))[0])
    names: list[bytes] = []
    offset = 0
    while True:
        batch = fuse.readdir(d, fh, offset, size=512)
        if not batch:
            break
        names += [n for _, _, _, n in batch]
        offset = batch[-1][1]
    assert sorted(names) == sorted([b".", b".."] + [f"file{i:02}".encode() for i in range(50)])
    plus = fuse.readdir(d, fh, 0, size=4096, plus=True)
    assert {n for *_, n in plus} <= set(names)
    fuse.ok(Op.FUSE_RELEASEDIR, d, F.fuse_release_in.pack(fh, 0, 0, 0))
    fuse.ok(Op.FUSE_RENAME, d, F.fuse_rename_in.pack(1) + _name("file00") + _name("moved"))
    assert (daemon.shared / "moved").exists()
    fuse.unlink(1, b"moved")
    for i in range(1, 50):
        fuse.unlink(d, f"file{i:02}".encode())
    fuse.ok(Op.FUSE_RMDIR, 1, _name("dir"))
    assert sorted(os.listdir(daemon.shared)) == []


def test_symlink_readlink_link(daemon: Daemon, fuse: FuseClient) -> None:
    e = F.fuse_entry_out.unpack(fuse.ok(Op.FUSE_SYMLINK, 1, _name("ln") + _name("/etc/passwd")))
    assert fuse.ok(Op.FUSE_READLINK, e[0]) == b"/etc/passwd"
    assert os.readlink(daemon.shared / "ln") == "/etc/passwd"
    f, fh = fuse.create(1, b"target")
    fuse.release(f[0], fh)
    fuse.ok(Op.FUSE_LINK, 1, F.fuse_link_in.pack(f[0]) + _name("hard"))
    assert os.stat(daemon.shared / "hard").st_nlink == 2


def test_hostile_names_are_refused(daemon: Daemon, fuse: FuseClient) -> None:
    for bad in (b"../escape", b"/abs", b"..", b".", b"a/b"):
        r = fuse.call(Op.FUSE_MKDIR, 1, F.fuse_mkdir_in.pack(0o755, 0) + bad + b"\0")
        assert r.error < 0, bad
        r = fuse.call(Op.FUSE_SYMLINK, 1, bad + b"\0" + b"target\0")
        assert r.error < 0, bad
    assert os.listdir(daemon.shared) == []
    assert not os.path.exists(daemon.shared.parent / "escape")


def test_planted_symlink_is_not_followed(daemon: Daemon, fuse: FuseClient) -> None:
    os.symlink("/etc", daemon.shared / "etc")
    e = fuse.lookup(1, b"etc")
    r = fuse.call(Op.FUSE_LOOKUP, e[0], _name("passwd"))
    assert r.error < 0
    r = fuse.call(Op.FUSE_OPEN, e[0], F.fuse_open_in.pack(os.O_RDONLY, 0))
    assert r.error < 0


def test_forged_ids(daemon: Daemon, fuse: FuseClient) -> None:
    r = fuse.call(Op.FUSE_GETATTR, 987654321, F.fuse_getattr_in.pack(0, 0, 0))
    assert r.error == -errno.ENOENT
    r = fuse.call(Op.FUSE_READ, 1, F.fuse_read_in.pack(424242, 0, 10, 0, 0, 0, 0))
    assert r.error == -errno.EBADF


def test_statfs_fsync_fallocate_lseek(daemon: Daemon, fuse: FuseClient) -> None:
    blocks = struct.unpack_from("<Q", fuse.ok(Op.FUSE_STATFS, 1))[0]
    assert blocks == os.statvfs(daemon.shared).f_blocks
    e, fh = fuse.create(1, b"alloc")
    fuse.ok(Op.FUSE_FALLOCATE, e[0], F.fuse_fallocate_in.pack(fh, 0, 8192, 0, 0))
    assert os.stat(daemon.shared / "alloc").st_size == 8192
    fuse.ok(Op.FUSE_FSYNC, e[0], F.fuse_fsync_in.pack(fh, 0, 0))
    fuse.ok(Op.FUSE_FLUSH, e[0], F.fuse_flush_in.pack(fh, 0, 0, 0))
    pos = fuse.ok(Op.FUSE_LSEEK, e[0], F.fuse_lseek_in.pack(fh, 100, os.SEEK_SET, 0))
    assert F.fuse_lseek_out.unpack(pos)[0] == 100
    fuse.ok(Op.FUSE_SYNCFS, 1, F.fuse_syncfs_in.pack(0))


def test_fd_count_stable_after_churn(daemon: Daemon, fuse: FuseClient) -> None:
    worker = daemon.child("shardfs-w0")
    before = len(os.listdir(f"/proc/{worker}/fd"))
    for i in range(100):
        e, fh = fuse.create(1, f"c{i}".encode())
        fuse.release(e[0], fh)
        fuse.unlink(1, f"c{i}".encode())
        fuse.forget(e[0], 1)
        fuse.call(Op.FUSE_LOOKUP, 1, _name("nope"))
    # One round trip on hiprio has completed, so every FORGET was applied.
    assert fuse.getattr(1)
    assert len(os.listdir(f"/proc/{worker}/fd")) == before
