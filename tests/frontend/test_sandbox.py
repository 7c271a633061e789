"""The real daemon's children are sandboxed (shardfs.sandbox), and still serve.

Seen from the host through /proc: each worker's and the coordinator's root,
capability sets, no_new_privs, seccomp mode and namespaces.  The supervisor
stays as it was started (it keeps the vhost-user socket and forks).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.sandbox import caps
from shardfs.testing.frontend import FuseClient
from tests.frontend.conftest import Daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")

KEEP = caps.mask(caps.PASSTHROUGH_CAPS)
#: INIT flags without FUSE_SETXATTR_EXT: SETXATTR then has the 8-byte header.
INIT_FLAGS = 0xFFFF_FFFF & ~F.FUSE_SETXATTR_EXT


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def same_inode(a: str | Path, b: str | Path) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def assert_confined_caps(pid: int, seccomp: str = "2") -> None:
    st = status(pid)
    for key in ("CapPrm", "CapEff", "CapBnd"):
        assert int(st[key], 16) == KEEP, (pid, key, st[key])
    assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == seccomp


@pytest.fixture
def dax_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon with a DAX window, so that the coordinator runs too."""
    d = Daemon(tmp_path, "--dax-window", str(2 << 20))
    yield d
    assert d.stop() == 0


def test_default_sandbox_confines_every_child(dax_daemon: Daemon) -> None:
    daemon = dax_daemon
    fe = daemon.frontend().start()
    FuseClient(fe).init()
    kids = daemon.named_children()
    assert {"shardfs-coord", "shardfs-w0"} <= set(kids), kids
    sup = daemon.proc.pid
    for name, pid in kids.items():
        root = f"/proc/{pid}/root"
        assert sorted(os.listdir(root)) == ["proc", "shared"], name
        assert same_inode(f"{root}/shared", daemon.shared), name
        assert not os.path.exists(f"{root}/etc"), name
        assert sorted(os.listdir(f"{root}/proc")) == ["self"]
        assert_confined_caps(pid)
        for kind in ("mnt", "net", "uts"):
            assert ns(pid, kind) != ns(sup, kind), (name, kind)
        # One private IPC namespace for the whole tree (posix_ipc queues meet).
        assert ns(pid, "ipc") == ns(sup, "ipc") != ns(os.getpid(), "ipc")
    assert ns(kids["shardfs-w0"], "mnt") != ns(kids["shardfs-coord"], "mnt")
    # The supervisor itself is untouched: the host's mounts and its capabilities.
    assert ns(sup, "mnt") == ns(os.getpid(), "mnt")
    assert status(sup)["Seccomp"] == "0"
    fe.close()


def test_sandboxed_worker_serves_data_and_xattrs(tmp_path: Path) -> None:
    """Every path the passthrough takes inside the sandbox: the /proc magic links
    (reopen, xattrs), creds switching, and open_by_handle_at on a second queue."""
    d = Daemon(tmp_path, queues=2)
    try:
        with d.frontend() as fe:
            fe.start()
            c = FuseClient(fe)
            c.init(flags=INIT_FLAGS)
            entry, fh = c.create(1, b"data.bin", mode=0o640)
            nodeid = entry[0]
            assert c.write(nodeid, fh, 0, b"through the sandbox") == 19
            c.ok(Op.FUSE_FSYNC, nodeid, F.fuse_fsync_in.pack(fh, 0, 0))
            name, value = b"user.sandbox", b"yes"
            c.ok(Op.FUSE_SETXATTR, nodeid,
                 F.fuse_getxattr_in.pack(len(value), 0) + name + b"\0" + value)
            got = c.ok(Op.FUSE_GETXATTR, nodeid, F.fuse_getxattr_in.pack(64, 0) + name + b"\0")
            assert got == value
            # Queue 2's worker never saw the node: it reopens it by file handle.
            other = FuseClient(fe, queue=2)
            fh2 = other.open(nodeid)
            assert other.read(nodeid, fh2, 0, 100) == b"through the sandbox"
            os.chmod(d.shared, 0o777)
            e2 = F.fuse_entry_out.unpack(c.ok(
                Op.FUSE_MKDIR, 1, F.fuse_mkdir_in.pack(0o755, 0) + b"owned\0",
                uid=1000, gid=1000))
            assert e2[0]
        kids = d.named_children()
        assert len([k for k in kids if k.startswith("shardfs-w")]) == 2
    finally:
        assert d.stop() == 0
    log = d.log_path.read_text()
    assert "Traceback" not in log and "died" not in log, log
    assert (d.shared / "data.bin").read_bytes() == b"through the sandbox"
    assert os.getxattr(d.shared / "data.bin", "user.sandbox") == b"yes"
    st = os.stat(d.shared / "owned")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert stat.S_IMODE(os.stat(d.shared / "data.bin").st_mode) == 0o640


def test_sandbox_none_leaves_children_as_they_were(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "--sandbox", "none", "--seccomp", "none")
    try:
        for name, pid in d.named_children().items():
            assert same_inode(f"/proc/{pid}/root", "/"), name
            assert ns(pid, "mnt") == ns(os.getpid(), "mnt")
            assert status(pid)["Seccomp"] == "0"
            assert status(pid)["CapEff"] == status(d.proc.pid)["CapEff"]
    finally:
        assert d.stop() == 0


def test_sandbox_chroot_roots_children_in_the_share(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "--sandbox", "chroot", "--xattr", "false", "--seccomp", "log")
    try:
        (d.shared / "visible").write_text("x")
        for name, pid in d.named_children().items():
            assert same_inode(f"/proc/{pid}/root", d.shared), name
            assert_confined_caps(pid)
            assert ns(pid, "mnt") == ns(os.getpid(), "mnt")
        with d.frontend() as fe:
            fe.start()
            c = FuseClient(fe)
            c.init()
            assert c.lookup(1, b"visible")[0]
    finally:
        assert d.stop() == 0


def test_chroot_serves_xattrs_through_the_held_proc_fd(tmp_path: Path) -> None:
    """Under a chroot ``/proc/self/fd/N`` would name a path in the share, which the
    guest can create: xattrs must reach the node itself (virtiofsd's fchdir route),
    and a planted ``proc/self/fd`` tree in the share must never be written."""
    d = Daemon(tmp_path, "--sandbox", "chroot", "--xattr", "--seccomp", "kill")
    planted = d.shared / "proc" / "self" / "fd"
    planted.mkdir(parents=True)
    for n in range(64):
        (planted / str(n)).write_text("decoy")
    (d.shared / "target").write_text("t")
    os.symlink("target", d.shared / "link")
    try:
        with d.frontend() as fe:
            fe.start()
            c = FuseClient(fe)
            c.init(flags=INIT_FLAGS)
            name = b"user.chroot"
            for fname, value in ((b"target", b"on the file"), (b"proc", b"on a dir")):
                nodeid = c.lookup(1, fname)[0]
                c.ok(Op.FUSE_SETXATTR, nodeid,
                     F.fuse_getxattr_in.pack(len(value), 0) + name + b"\0" + value)
                assert c.ok(Op.FUSE_GETXATTR, nodeid,
                            F.fuse_getxattr_in.pack(64, 0) + name + b"\0") == value
                assert name + b"\0" in c.ok(Op.FUSE_LISTXATTR, nodeid,
                                             F.fuse_getxattr_in.pack(4096, 0))
            link = c.lookup(1, b"link")[0]  # user.* xattrs on a symlink: EPERM, not the target's
            r = c.call(Op.FUSE_GETXATTR, link, F.fuse_getxattr_in.pack(64, 0) + name + b"\0")
            assert r.error in (-errno.ENODATA, -errno.EPERM)
            target = c.lookup(1, b"target")[0]
            c.ok(Op.FUSE_REMOVEXATTR, target, name + b"\0")
    finally:
        assert d.stop() == 0
    log = d.log_path.read_text()
    assert "Traceback" not in log and "died" not in log, log
    assert os.listxattr(d.shared / "target") == []
    assert os.getxattr(d.shared / "proc", "user.chroot") == b"on a dir"
    for n in range(64):
        assert os.listxattr(planted / str(n)) == [], n
