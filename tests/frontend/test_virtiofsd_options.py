"""virtiofsd's options change what the real daemon does, as they do in virtiofsd.

Each test starts the daemon with a virtiofsd flag and checks the effect a
guest would meet: the INIT flags, ``fuse_attr.flags`` of entries, the host
open flags of a handle (``/proc/PID/fdinfo`` of the worker), timeouts,
capabilities, and refusals at start.  virtiofsd 1.13's behaviour is the
reference (src/passthrough/mod.rs ``init``, ``do_lookup``, ``do_open``;
src/main.rs ``drop_capabilities``).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from shardfs.abi import fuse as F
from shardfs.abi.capability import CAP_MKNOD, CAP_SYS_ADMIN
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.dispatch import encode_dev
from shardfs.testing import process
from shardfs.testing.frontend import Frontend, FuseClient
from tests.frontend.conftest import REPO, Daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and capabilities need root")

#: fuse_entry_out: nodeid, generation, entry_valid, attr_valid, their nsecs, then fuse_attr
#: whose last field is flags.
ENTRY_VALID, ATTR_VALID, ENTRY_VALID_NS, ATTR_VALID_NS, ATTR_FLAGS = 2, 3, 4, 5, 21
READDIRPLUS_FLAGS = F.FUSE_DO_READDIRPLUS | F.FUSE_READDIRPLUS_AUTO
#: The guest offers every flag of both words (7.41).
ALL_FLAGS2 = 0xFFFF_FFFF
#: A char device anyone may make with CAP_MKNOD (/dev/null's numbers).
NULL_RDEV = os.makedev(1, 3)


@contextmanager
def serving(tmp: Path, *flags: str) -> Iterator[tuple[Daemon, FuseClient]]:
    """A daemon started with ``flags`` and one connected, un-INITed client."""
    tmp.mkdir(parents=True, exist_ok=True)
    d = Daemon(tmp, *flags)
    try:
        with d.frontend() as fe:
            fe.start()
            yield d, FuseClient(fe)
    finally:
        rc = d.stop()
    log = d.log_path.read_text()
    assert rc == 0 and "Traceback" not in log, log


@pytest.fixture
def mount() -> Iterator[Callable[..., None]]:
    """``mount(*args)`` runs mount(8); everything mounted is detached afterwards."""
    points: list[str] = []

    def do(*args: str) -> None:
        subprocess.run(["mount", *args], check=True)
        points.append(args[-1])

    yield do
    for p in reversed(points):
        subprocess.run(["umount", "-l", p], check=False)


def init_flags(c: FuseClient, flags: int = 0xFFFF_FFFF) -> int:
    out = c.init(flags=flags, flags2=ALL_FLAGS2)
    return int(out[3] | out[10] << 32)


def attr_flags(c: FuseClient, parent: int, name: bytes) -> int:
    return int(c.lookup(parent, name)[ATTR_FLAGS])


def readdirplus_flags(c: FuseClient, nodeid: int) -> dict[bytes, int]:
    """name -> fuse_attr.flags of each READDIRPLUS entry (a lookup each, owed back)."""
    fh = int(F.fuse_open_out.unpack(c.ok(Op.FUSE_OPENDIR, nodeid,
                                         F.fuse_open_in.pack(os.O_RDONLY, 0)))[0])
    size = 4096
    data = c.ok(Op.FUSE_READDIRPLUS, nodeid, F.fuse_read_in.pack(fh, 0, size, 0, 0, 0, 0),
                reply_size=F.fuse_out_header.size + size)
    out, pos = {}, 0
    while pos < len(data):
        entry = F.fuse_entry_out.unpack_from(data, pos)
        namelen = F.fuse_dirent.unpack_from(data, pos + F.fuse_entry_out.size)[2]
        start = pos + F.FUSE_NAME_OFFSET_DIRENTPLUS
        out[data[start:start + namelen]] = entry[ATTR_FLAGS]
        pos += F.fuse_rec_align(F.FUSE_NAME_OFFSET_DIRENTPLUS + namelen)
    c.ok(Op.FUSE_RELEASEDIR, nodeid, F.fuse_release_in.pack(fh, 0, 0, 0))
    return out


def worker_pid(d: Daemon) -> int:
    for pid in d.children():
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() == "shardfs-w0":
                return pid
    raise AssertionError("no worker 0")


def host_open_flags(pid: int, path: Path) -> list[int]:
    """The open flags of every non-O_PATH fd process ``pid`` holds on ``path``'s inode."""
    want = os.stat(path)
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        flags = int(info["flags"].strip(), 8)
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino) and not flags & os.O_PATH:
            out.append(flags)
    return out


def mknod_chr(c: FuseClient, name: bytes) -> int:
    """MKNOD of a char device by the guest's root; 0 or the errno."""
    r = c.call(Op.FUSE_MKNOD, 1, F.fuse_mknod_in.pack(stat.S_IFCHR | 0o600,
                                                      encode_dev(NULL_RDEV), 0, 0)
               + name + b"\0")
    return -r.error


# -- defaults of a launcher's command line -------------------------------------------------


def test_no_xattr_flag_means_no_xattrs(tmp_path: Path) -> None:
    """A launcher that passes no ``--xattr`` (libvirt's ``xattr='off'``) gets a share
    without xattrs: every xattr op answers ENOSYS, as virtiofsd's, and the guest
    kernel stops asking.  (The conftest Daemon passes --xattr, so this starts its own.)"""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "f").write_text("x")
    sock = str(tmp_path / "vhost.sock")
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "shardfs", "--socket-path", sock,
                                 "--shared-dir", str(shared)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while "serving" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        with Frontend(sock, num_queues=2) as fe:
            fe.start()
            c = FuseClient(fe)
            init_flags(c)
            nodeid = c.lookup(1, b"f")[0]
            name = b"user.x\0"
            # SETXATTR without FUSE_SETXATTR_EXT has the 8-byte header (size, flags).
            for op, args in ((Op.FUSE_SETXATTR, F.fuse_getxattr_in.pack(1, 0) + name + b"v"),
                             (Op.FUSE_GETXATTR, F.fuse_getxattr_in.pack(64, 0) + name),
                             (Op.FUSE_LISTXATTR, F.fuse_getxattr_in.pack(64, 0)),
                             (Op.FUSE_REMOVEXATTR, name)):
                assert -c.call(op, nodeid, args).error == errno.ENOSYS, op
    finally:
        assert process.stop(proc) == 0, log_path.read_text()
    assert not os.listxattr(shared / "f")


# -- announce_submounts -------------------------------------------------------------


def test_announce_submounts_marks_exactly_the_mount_points(tmp_path: Path,
                                                           mount: Callable[..., None]) -> None:
    """On by default, as virtiofsd: a tmpfs (another st_dev) and a bind mount of
    the share's own filesystem (same st_dev, another mount) carry
    FUSE_ATTR_SUBMOUNT in LOOKUP and READDIRPLUS; plain directories, files and
    directories inside the submount do not; without FUSE_SUBMOUNTS from the
    guest nothing is marked."""
    shared = tmp_path / "shared"
    for name in ("tmpfs", "bind", "plain", "origin"):
        (shared / name).mkdir(parents=True)
    (shared / "file").write_text("x")
    mount("-t", "tmpfs", "tmpfs", str(shared / "tmpfs"))
    (shared / "tmpfs" / "inner").mkdir()
    mount("--bind", str(shared / "origin"), str(shared / "bind"))
    with serving(tmp_path) as (_d, c):
        flags = init_flags(c)
        assert flags & F.FUSE_SUBMOUNTS
        marked = {n: attr_flags(c, 1, n) for n in (b"tmpfs", b"bind", b"plain", b"file")}
        assert marked == {b"tmpfs": F.FUSE_ATTR_SUBMOUNT, b"bind": F.FUSE_ATTR_SUBMOUNT,
                          b"plain": 0, b"file": 0}
        tmpfs_node = c.lookup(1, b"tmpfs")[0]
        assert attr_flags(c, tmpfs_node, b"inner") == 0
        listed = readdirplus_flags(c, 1)
        assert listed[b"tmpfs"] == listed[b"bind"] == F.FUSE_ATTR_SUBMOUNT
        assert listed[b"plain"] == listed[b"file"] == 0
        # A guest that does not offer FUSE_SUBMOUNTS (re-INIT) is told of none.
        assert not init_flags(c, 0xFFFF_FFFF & ~F.FUSE_SUBMOUNTS) & F.FUSE_SUBMOUNTS
        assert attr_flags(c, 1, b"tmpfs") == 0


def test_no_announce_submounts_and_no_readdirplus(tmp_path: Path,
                                                  mount: Callable[..., None]) -> None:
    """``--no-announce-submounts`` leaves mount points unmarked and FUSE_SUBMOUNTS
    out of INIT; ``--no-readdirplus`` leaves DO_READDIRPLUS and READDIRPLUS_AUTO
    out, and a READDIRPLUS sent anyway is still answered, as virtiofsd does."""
    shared = tmp_path / "shared"
    (shared / "tmpfs").mkdir(parents=True)
    mount("-t", "tmpfs", "tmpfs", str(shared / "tmpfs"))
    with serving(tmp_path, "--no-announce-submounts", "--no-readdirplus") as (_d, c):
        flags = init_flags(c)
        assert not flags & (F.FUSE_SUBMOUNTS | READDIRPLUS_FLAGS)
        assert attr_flags(c, 1, b"tmpfs") == 0
        assert readdirplus_flags(c, 1)[b"tmpfs"] == 0


def test_readdirplus_is_on_and_allow_mmap_off_by_default(tmp_path: Path) -> None:
    with serving(tmp_path) as (_d, c):
        flags = init_flags(c)
        assert flags & READDIRPLUS_FLAGS == READDIRPLUS_FLAGS
        assert not flags & F.FUSE_DIRECT_IO_ALLOW_MMAP


# -- allow_mmap, preserve_noatime, timeouts ----------------------------------------------


def test_allow_mmap_offers_direct_io_allow_mmap(tmp_path: Path) -> None:
    """FUSE_DIRECT_IO_ALLOW_MMAP is a flags2 bit: only with FUSE_INIT_EXT, only if offered."""
    with serving(tmp_path, "--allow-mmap", "--cache", "never") as (_d, c):
        assert init_flags(c) & F.FUSE_DIRECT_IO_ALLOW_MMAP
        out = c.init(flags=0xFFFF_FFFF, flags2=ALL_FLAGS2 & ~(F.FUSE_DIRECT_IO_ALLOW_MMAP >> 32))
        assert not (out[10] << 32) & F.FUSE_DIRECT_IO_ALLOW_MMAP


@pytest.mark.parametrize("preserve", [False, True])
def test_o_noatime_reaches_the_host_only_with_preserve_noatime(tmp_path: Path,
                                                               preserve: bool) -> None:
    flags = ("--preserve-noatime",) if preserve else ()
    (tmp_path / "shared").mkdir()
    target = tmp_path / "shared" / "f"
    target.write_text("data")
    with serving(tmp_path, *flags) as (d, c):
        init_flags(c)
        nodeid = c.lookup(1, b"f")[0]
        fh = c.open(nodeid, os.O_RDONLY | os.O_NOATIME)
        held = host_open_flags(worker_pid(d), target)
        assert len(held) == 1, held
        assert bool(held[0] & os.O_NOATIME) == preserve
        assert c.read(nodeid, fh, 0, 10) == b"data"
        c.release(nodeid, fh)


@pytest.mark.parametrize("flag", [("--cache-timeout-s", "2.5"), ("-o", "timeout=2.5")])
def test_cache_timeout_replaces_the_policy_timeouts(tmp_path: Path,
                                                    flag: tuple[str, str]) -> None:
    """shardfs's ``cache_timeout_s`` and the C virtiofsd's ``-o timeout=``: entry
    and attr timeouts of LOOKUP and GETATTR, whatever the cache policy (auto: 1 s)."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "f").write_text("x")
    with serving(tmp_path, *flag) as (_d, c):
        init_flags(c)
        e = c.lookup(1, b"f")
        assert (e[ENTRY_VALID], e[ENTRY_VALID_NS]) == (2, 500_000_000)
        assert (e[ATTR_VALID], e[ATTR_VALID_NS]) == (2, 500_000_000)
        a = c.getattr(e[0])
        assert (a[0], a[1]) == (2, 500_000_000)
    with serving(tmp_path) as (_d, c):
        init_flags(c)
        e = c.lookup(1, b"f")
        assert (e[ENTRY_VALID], e[ATTR_VALID]) == (1, 1)


# -- inode_file_handles ---------------------------------------------------------------


def test_inode_file_handles_mandatory_refuses_a_share_without_handles(
        tmp_path: Path, mount: Callable[..., None]) -> None:
    """ramfs makes no file handles: mandatory refuses it at start with one line."""
    share = tmp_path / "ramfs"
    share.mkdir()
    mount("-t", "ramfs", "ramfs", str(share))
    r = subprocess.run([sys.executable, "-m", "shardfs", "--socket-path",
                        str(tmp_path / "s.sock"), "--shared-dir", str(share),
                        "--inode-file-handles=mandatory"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "inode_file_handles" in ln]
    assert len(lines) == 1 and "makes no file handles" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("mode", ["never", "prefer", "mandatory"])
def test_inode_file_handles_mandatory_refuses_nodes_without_handles(
        tmp_path: Path, mount: Callable[..., None], mode: str) -> None:
    """A ramfs submount: mandatory answers its LOOKUP EOPNOTSUPP (virtiofsd's
    errno); never and prefer serve it from the worker's O_PATH fd."""
    shared = tmp_path / "shared"
    (shared / "ram").mkdir(parents=True)
    (shared / "disk").write_text("ok")
    mount("-t", "ramfs", "ramfs", str(shared / "ram"))
    with serving(tmp_path, f"--inode-file-handles={mode}") as (_d, c):
        init_flags(c)
        assert c.lookup(1, b"disk")[0]
        r = c.call(Op.FUSE_LOOKUP, 1, b"ram\0")
        if mode == "mandatory":
            assert -r.error == errno.EOPNOTSUPP
        else:
            assert r.error == 0


# -- modcaps ----------------------------------------------------------------------------


def cap_sets(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v, 16) for k, _, v in (ln.partition(":") for ln in f)
                if k.startswith("Cap")}


@pytest.mark.parametrize("sandbox", ["namespace", "none"])
def test_modcaps_minus_mknod_refuses_device_nodes(tmp_path: Path, sandbox: str) -> None:
    """``--modcaps=-mknod:+sys_admin``: the guest's root gets EPERM for a char
    device it makes without the option; the worker holds CAP_SYS_ADMIN and not
    CAP_MKNOD.  As virtiofsd (as root, in every sandbox mode)."""
    base = ("--sandbox", sandbox)
    with serving(tmp_path / "plain", *base) as (_d, c):
        init_flags(c)
        assert mknod_chr(c, b"null") == 0
    assert stat.S_ISCHR(os.lstat(tmp_path / "plain" / "shared" / "null").st_mode)
    with serving(tmp_path / "modcaps", *base, "--modcaps=-mknod:+sys_admin") as (d, c):
        init_flags(c)
        assert mknod_chr(c, b"null") == errno.EPERM
        held = cap_sets(worker_pid(d))
        for key in ("CapPrm", "CapEff"):
            assert held[key] >> CAP_SYS_ADMIN & 1 and not held[key] >> CAP_MKNOD & 1, held
    assert not (tmp_path / "modcaps" / "shared" / "null").exists()


def test_modcaps_unknown_name_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "shardfs", "--socket-path",
                        str(tmp_path / "s.sock"), "--shared-dir", str(tmp_path),
                        "--modcaps=+sys_admin:-nosuchcap"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == ("shardfs: config: modcaps: '-nosuchcap': no capability "
                                "named 'nosuchcap'"), r.stderr
