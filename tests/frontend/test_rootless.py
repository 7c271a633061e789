"""A non-root user runs the real daemon with its defaults (shardfs.sandbox.userns).

The test (root in CI) makes a system user, ``shardfs-rootless``, with a
subordinate id range in /etc/subuid and /etc/subgid, and starts
``python -m shardfs`` as that user with ``setpriv`` (no supplementary
groups, a clean environment), then drives it through the in-repo frontend
as root.  What is checked is what the host sees: owners of the files the
guest's root made, the daemon's namespaces and maps in /proc, and the one
line a refused configuration prints.

The daemon runs from a copy of the package and its dependencies in a
world-readable directory under /tmp, with an interpreter that user can run:
the checkout, its venv or its Python may sit under /root (mode 0700).
``tests/e2e/test_rootless.py`` uses the same helpers.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.sandbox import caps
from shardfs.testing import process
from shardfs.testing.frontend import Frontend, FuseClient

REPO = Path(__file__).resolve().parents[2]
USER = "shardfs-rootless"
#: The subordinate range given to USER when it has none (subuid(5)): high, so it
#: meets no real user's ids.
SUBID_START, SUBID_COUNT = 524288, 65536
#: What ``python -m shardfs`` imports besides the standard library.
DEPENDENCIES = ("multiprocess", "_multiprocess", "dill", "msgpack", "posix_ipc")
START_TIMEOUT_S = 60.0
KEEP = caps.mask(caps.PASSTHROUGH_CAPS)
#: INIT flags without FUSE_SETXATTR_EXT: SETXATTR then has the 8-byte header.
INIT_FLAGS = 0xFFFF_FFFF & ~F.FUSE_SETXATTR_EXT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="makes a user and switches to it")


@dataclass(frozen=True)
class Account:
    """The non-root user and its subordinate ranges (start of each; SUBID_COUNT long)."""

    name: str
    uid: int
    gid: int
    subuid: int
    subgid: int


def _subid_start(path: str, name: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                fields = line.strip().split(":")
                if len(fields) == 3 and fields[0] == name and int(fields[2]) >= SUBID_COUNT:
                    return int(fields[1])
    except FileNotFoundError:
        pass
    return None


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{argv}: {done.stderr}"


@functools.cache
def rootless_account() -> Account:
    """USER, made (useradd, usermod --add-subuids) if this machine lacks it."""
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        _run("useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", USER)
        pw = pwd.getpwnam(USER)
    end = SUBID_START + SUBID_COUNT - 1
    for path in ("/etc/subuid", "/etc/subgid"):  # usermod refuses to create them
        if not os.path.exists(path):
            with open(path, "a"):
                os.chmod(path, 0o644)
    if _subid_start("/etc/subuid", USER) is None:
        _run("usermod", "--add-subuids", f"{SUBID_START}-{end}", USER)
    if _subid_start("/etc/subgid", USER) is None:
        _run("usermod", "--add-subgids", f"{SUBID_START}-{end}", USER)
    subuid = _subid_start("/etc/subuid", USER)
    subgid = _subid_start("/etc/subgid", USER)
    assert subuid is not None and subgid is not None
    return Account(USER, pw.pw_uid, pw.pw_gid, subuid, subgid)


def as_user(account: Account) -> list[str]:
    """The argv prefix that runs a command as ``account``, with no groups and a clean env."""
    return ["setpriv", f"--reuid={account.uid}", f"--regid={account.gid}", "--clear-groups",
            "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/nonexistent",
            "PYTHONUNBUFFERED=1", f"PYTHONPATH={runtime()}"]


@functools.cache
def runtime() -> Path:
    """A world-readable copy of shardfs and its dependencies."""
    root = Path(tempfile.mkdtemp(prefix="shardfs-rootless-runtime-"))
    atexit.register(shutil.rmtree, root, True)
    root.chmod(0o755)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "shardfs", root / "shardfs", ignore=skip)
    for name in DEPENDENCIES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, f"{name} is not installed"
        origin = Path(spec.origin)
        if spec.submodule_search_locations:
            shutil.copytree(origin.parent, root / origin.parent.name, ignore=skip)
        else:
            shutil.copy2(origin, root / origin.name)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    return root


@functools.cache
def user_python(account: Account) -> str:
    """An interpreter ``account`` can run, of this one's version (the copied
    extension modules are built for it)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, os.path.realpath(sys.executable), f"/usr/bin/python{version}"]
    probe = f"import sys; assert sys.version_info[:2] == {sys.version_info[:2]!r}"
    for python in candidates:
        done = subprocess.run([*as_user(account), python, "-c", probe], capture_output=True,
                              check=False, cwd="/")
        if done.returncode == 0:
            return python
    raise AssertionError(f"no Python {version} that {account.name} can run among {candidates}")


class RootlessDaemon:
    """``python -m shardfs`` run by ``account`` in a fresh directory of its own under /tmp.

    ``wait`` waits for "serving"; otherwise call :meth:`wait_exit`.
    """

    def __init__(self, account: Account, *extra: str, wait: bool = True,
                 log_level: str = "debug") -> None:
        self.account = account
        self.dir = Path(tempfile.mkdtemp(prefix="shardfs-rootless-"))
        self.shared = self.dir / "shared"
        self.shared.mkdir()
        for p in (self.dir, self.shared):
            os.chown(p, account.uid, account.gid)
        self.socket = str(self.dir / "vhost.sock")
        self.log_path = self.dir / "daemon.log"
        self.args = [*as_user(account), user_python(account), "-m", "shardfs",
                     "--socket-path", self.socket, "--shared-dir", str(self.shared),
                     "--log-level", log_level, *extra]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.dir)
        if wait:
            deadline = time.monotonic() + START_TIMEOUT_S
            while "serving" not in self.log_path.read_text():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = self.log_text()
                    self.remove()
                    raise RuntimeError(f"daemon did not start:\n{log}")
                time.sleep(0.05)

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def frontend(self) -> Frontend:
        return Frontend(self.socket, num_queues=2)

    def children(self) -> dict[str, int]:
        """comm -> pid of the supervisor's children (shardfs-w0, ...)."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True,
                             check=False)
        kids = {}
        for pid in out.stdout.split():
            try:
                kids[Path(f"/proc/{pid}/comm").read_text().strip()] = int(pid)
            except FileNotFoundError:
                continue
        return kids

    def wait_exit(self) -> tuple[int, str]:
        """For a daemon that must refuse to start: (exit status, log)."""
        try:
            rc = self.proc.wait(START_TIMEOUT_S)
        finally:
            self.stop()
        return rc, self.log_text()

    def stop(self) -> int | None:
        """SIGTERM (then SIGKILL); idempotent."""
        rc = process.stop(self.proc)
        if not self.log.closed:
            self.log.close()
        return rc

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def z(name: bytes) -> bytes:
    return name + b"\0"


def errno_of(c: FuseClient, opcode: int, nodeid: int, args: bytes, **kw: int) -> int:
    return -c.call(opcode, nodeid, args, **kw).error  # type: ignore[arg-type]


def setattr_owner(uid: int, gid: int) -> bytes:
    return F.fuse_setattr_in.pack(F.FATTR_UID | F.FATTR_GID, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                  0, 0, 0, uid, gid, 0)


def refused_line(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line]


@pytest.fixture(scope="module")
def account() -> Account:
    return rootless_account()


def test_guest_root_is_the_invoking_user(account: Account) -> None:
    d = RootlessDaemon(account, "--xattr")
    try:
        # Seen from the host: the daemon's tree lives in a user namespace of its own,
        # where the user is root, and the workers are confined inside it as root's are.
        sup = d.proc.pid
        assert os.readlink(f"/proc/{sup}/ns/user") != os.readlink("/proc/self/ns/user")
        assert Path(f"/proc/{sup}/uid_map").read_text().split() == ["0", str(account.uid), "1"]
        assert Path(f"/proc/{sup}/gid_map").read_text().split() == ["0", str(account.gid), "1"]
        assert Path(f"/proc/{sup}/setgroups").read_text().strip() == "deny"
        kids = d.children()
        assert set(kids) == {"shardfs-w0"}, kids  # rootless: no DAX, so no coordinator
        for name, pid in kids.items():
            st = status(pid)
            assert st["Uid"].split()[0] == str(account.uid), name
            for key in ("CapPrm", "CapEff", "CapBnd"):
                assert int(st[key], 16) == KEEP, (name, key, st[key])
            assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", name
            assert sorted(os.listdir(f"/proc/{pid}/root")) == ["proc", "shared"], name
            assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink(f"/proc/{sup}/ns/mnt")
        # Host files the user cannot touch: guest root gets no more than the user.
        secret = d.shared / "secret"
        secret.write_text("root's\n")
        secret.chmod(0o600)
        public = d.shared / "public"
        public.write_text("readable\n")
        public.chmod(0o644)
        with d.frontend() as fe:
            fe.start()
            c = FuseClient(fe)
            c.init(flags=INIT_FLAGS)
            entry, fh = c.create(1, b"made_by_root", mode=0o640)
            assert c.write(entry[0], fh, 0, b"from the guest's root") == 21
            c.release(entry[0], fh)
            # xattrs go through the /proc/self/fd bind inside the sandbox.
            c.ok(Op.FUSE_SETXATTR, entry[0], F.fuse_getxattr_in.pack(3, 0) + z(b"user.rl") + b"yes")
            assert c.ok(Op.FUSE_GETXATTR, entry[0],
                        F.fuse_getxattr_in.pack(64, 0) + z(b"user.rl")) == b"yes"
            c.mkdir(1, b"dir_by_root")
            c.ok(Op.FUSE_SYMLINK, 1, z(b"link_by_root") + z(b"made_by_root"))
            # Ids the namespace does not map: EINVAL, never a file of the wrong owner.
            assert errno_of(c, Op.FUSE_MKDIR, 1, F.fuse_mkdir_in.pack(0o755, 0)
                            + z(b"by_1000"), uid=1000, gid=1000) == 22
            assert errno_of(c, Op.FUSE_SETATTR, entry[0], setattr_owner(1000, 1000)) == 22
            assert errno_of(c, Op.FUSE_SETATTR, entry[0], setattr_owner(0, 0)) == 0
            secret_id = c.lookup(1, b"secret")[0]
            assert errno_of(c, Op.FUSE_OPEN, secret_id, F.fuse_open_in.pack(os.O_RDONLY, 0)) == 13
            public_id = c.lookup(1, b"public")[0]
            assert errno_of(c, Op.FUSE_OPEN, public_id, F.fuse_open_in.pack(os.O_WRONLY, 0)) == 13
            pfh = c.open(public_id)
            assert c.read(public_id, pfh, 0, 100) == b"readable\n"
    finally:
        rc = d.stop()
    try:
        log = d.log_text()
        assert rc == 0, log
        assert "Traceback" not in log and "died" not in log, log
        for name in ("made_by_root", "dir_by_root", "link_by_root"):
            st = os.lstat(d.shared / name)
            assert (st.st_uid, st.st_gid) == (account.uid, account.gid), name
        assert (d.shared / "made_by_root").read_bytes() == b"from the guest's root"
        assert os.getxattr(d.shared / "made_by_root", "user.rl") == b"yes"
        assert not (d.shared / "by_1000").exists()
        assert (d.shared / "secret").stat().st_uid == 0
    finally:
        d.remove()


def test_uid_and_gid_maps_go_through_newuidmap(account: Account) -> None:
    """libvirt session mode's maps: 0 is the user, 1.. its subordinate range."""
    sub_u, sub_g, n = account.subuid, account.subgid, SUBID_COUNT
    d = RootlessDaemon(account, f"--uid-map=:0:{account.uid}:1:", f"--uid-map=:1:{sub_u}:{n}:",
                       f"--gid-map=:0:{account.gid}:1:", f"--gid-map=:1:{sub_g}:{n}:")
    try:
        sup = d.proc.pid
        assert Path(f"/proc/{sup}/uid_map").read_text().split() == [
            "0", str(account.uid), "1", "1", str(sub_u), str(n)]
        assert Path(f"/proc/{sup}/gid_map").read_text().split() == [
            "0", str(account.gid), "1", "1", str(sub_g), str(n)]
        with d.frontend() as fe:
            fe.start()
            c = FuseClient(fe)
            c.init()
            c.mkdir(1, b"by_root")
            d.shared.chmod(0o777)
            c.ok(Op.FUSE_MKDIR, 1, F.fuse_mkdir_in.pack(0o755, 0) + z(b"by_1000"), uid=1000,
                 gid=1000)
            entry, fh = c.create(1, b"given_away")
            c.release(entry[0], fh)
            c.ok(Op.FUSE_SETATTR, entry[0], setattr_owner(2000, 3000))
            # Beyond the maps: still EINVAL.
            far = n + 10
            assert errno_of(c, Op.FUSE_MKDIR, 1, F.fuse_mkdir_in.pack(0o755, 0)
                            + z(b"by_far"), uid=far, gid=far) == 22
    finally:
        rc = d.stop()
    try:
        log = d.log_text()
        assert rc == 0 and "Traceback" not in log, log
        owners = {name: (os.lstat(d.shared / name).st_uid, os.lstat(d.shared / name).st_gid)
                  for name in ("by_root", "by_1000", "given_away")}
        assert owners == {"by_root": (account.uid, account.gid),
                          "by_1000": (sub_u + 999, sub_g + 999),
                          "given_away": (sub_u + 1999, sub_g + 2999)}, owners
    finally:
        d.remove()


def test_sandbox_none_as_non_root(account: Account) -> None:
    """No namespace: the guest's root is the user, and may not give files away (EPERM)."""
    d = RootlessDaemon(account, "--sandbox", "none")
    try:
        with d.frontend() as fe:
            fe.start()
            c = FuseClient(fe)
            c.init()
            entry, fh = c.create(1, b"made_by_root")
            c.release(entry[0], fh)
            assert errno_of(c, Op.FUSE_SETATTR, entry[0], setattr_owner(1000, 1000)) == 1
            d.shared.chmod(0o777)
            assert errno_of(c, Op.FUSE_MKDIR, 1, F.fuse_mkdir_in.pack(0o755, 0)
                            + z(b"by_1000"), uid=1000, gid=1000) == 1
    finally:
        rc = d.stop()
    try:
        log = d.log_text()
        assert rc == 0 and "Traceback" not in log, log
        st = os.stat(d.shared / "made_by_root")
        assert (st.st_uid, st.st_gid) == (account.uid, account.gid)
    finally:
        d.remove()


@pytest.mark.parametrize("case", ["chroot", "queues", "bad_map", "map_without_namespace"])
def test_refused_at_start_with_one_line(account: Account, case: str) -> None:
    far = account.subuid + 4 * SUBID_COUNT  # not in /etc/subuid
    extra, field = {
        "chroot": (["--sandbox", "chroot"], "sandbox: chroot needs root"),
        "queues": (["--num-request-queues", "2"], "num_request_queues: 2"),
        "bad_map": ([f"--uid-map=:0:{account.uid}:1:", f"--uid-map=:1:{far}:{SUBID_COUNT}:"],
                    "uid_map: newuidmap refused"),
        "map_without_namespace": (["--sandbox", "none", f"--gid-map=:0:{account.gid}:1:"],
                                  "gid_map: only for a non-root user with sandbox = namespace"),
    }[case]
    d = RootlessDaemon(account, *extra, wait=False)
    try:
        rc, log = d.wait_exit()
        assert rc != 0, log
        assert "Traceback" not in log, log
        errors = refused_line(log)
        assert len(errors) == 1 and field in errors[0], log
    finally:
        d.remove()
