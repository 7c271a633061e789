"""The sandbox, applied for real in forked children (shardfs.sandbox).

Every test forks: a sandbox is irreversible, so the child enters it, probes
what it can and cannot reach, reports through a pipe as JSON and exits; the
parent asserts.  The probes play a passthrough with a bug: absolute paths,
``..`` chains, planted symlinks, /proc tricks.  They need root (the
namespace mode mounts, every mode drops capabilities).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shardfs import config
from shardfs.abi.capability import CAP_SYS_ADMIN
from shardfs.fs.passthrough import fhandle
from shardfs.sandbox import (
    SANDBOX_MODES,
    SECCOMP_MODES,
    SandboxError,
    SandboxPolicy,
    caps,
    confine,
    linux,
)
from shardfs.sandbox.namespace import PROC_FD_MOUNT, SHARED_MOUNT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root to build")

KEEP = caps.mask(caps.PASSTHROUGH_CAPS)
NAMESPACE = SandboxPolicy("namespace", "none")
CHROOT = SandboxPolicy("chroot", "none")


def in_child(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn`` in a forked child; return (wait status, its JSON-able result).

    An exception in the child comes back as ``{"raised": "Type: message"}``;
    a child killed before reporting gives None.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            out: Any = fn()
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            out = {"raised": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    return status, json.loads(data) if data else None


def errno_of(fn: Callable[[], object]) -> str:
    """The errno name ``fn`` fails with, or "ok"."""
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


PR_GET_SECCOMP = 21
PR_CAP_AMBIENT_IS_SET = 1
#: Read before any sandbox: /proc/sys is not there inside.
CAP_LAST = caps.last_cap()


def cap_state() -> dict[str, int]:
    """This process's capability sets and seccomp mode, from syscalls (inside the
    sandbox there is no /proc/self/status)."""
    eff, prm, inh = linux.capget()
    bnd = sum(1 << c for c in range(CAP_LAST + 1) if linux.prctl(linux.PR_CAPBSET_READ, c))
    amb = sum(1 << c for c in range(CAP_LAST + 1)
              if linux.prctl(linux.PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, c))
    return {"CapEff": eff, "CapPrm": prm, "CapInh": inh, "CapBnd": bnd, "CapAmb": amb,
            "Seccomp": linux.prctl(PR_GET_SECCOMP)}


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "marker").write_text("inside the share\n")
    (tmp_path / "outside").write_text("next to the share\n")
    return d


# -- namespace ------------------------------------------------------------------


def test_namespace_root_is_a_tmpfs_with_only_the_share_and_our_fds(share: Path) -> None:
    def probe() -> dict[str, Any]:
        path = confine(NAMESPACE, str(share), lambda p: p)
        fd = os.open(f"{path}/marker", os.O_PATH)
        rw = os.open(f"{PROC_FD_MOUNT}/{fd}", os.O_RDWR)  # the reopen magic link
        os.write(rw, b"I")
        os.close(rw)
        os.setxattr(f"{PROC_FD_MOUNT}/{fd}", "user.probe", b"1")  # the xattr path form
        return {
            "path": path,
            "root": sorted(os.listdir("/")),
            "share": sorted(os.listdir(path)),
            "share_parent": sorted(os.listdir(f"{path}/..")),
            "proc_parent": sorted(os.listdir(f"{PROC_FD_MOUNT}/..")),
            "proc_self_fd_has_fd": str(fd) in os.listdir(PROC_FD_MOUNT),
            "mkdir_root": errno_of(lambda: os.mkdir("/x")),
            "interfaces": [name for _, name in socket.if_nameindex()],
        }

    status, out = in_child(probe)
    assert os.WIFEXITED(status) and "raised" not in out, out
    assert out["path"] == SHARED_MOUNT
    assert out["root"] == ["proc", "shared"]
    assert out["share"] == ["marker"]
    assert out["share_parent"] == ["proc", "shared"]  # ".." of the share: the tmpfs, no more
    assert out["proc_parent"] == ["fd"]  # no /proc/1, /proc/sys...: only our own fd dir
    assert out["proc_self_fd_has_fd"]
    assert out["mkdir_root"] == "EROFS"
    assert out["interfaces"] == ["lo"]  # a network namespace of its own
    # What the child did through the magic links landed in the share on the host.
    assert (share / "marker").read_text() == "Inside the share\n"
    assert os.getxattr(share / "marker", "user.probe") == b"1"


def test_namespace_hostile_paths_stay_inside(share: Path) -> None:
    """A passthrough bug that walks absolute paths, '..' or planted links finds nothing."""
    os.symlink("/etc/passwd", share / "planted_abs")
    os.symlink("../../../../../../etc/passwd", share / "planted_rel")
    os.symlink("/proc/1/root/etc/passwd", share / "planted_proc")

    def probe() -> dict[str, str]:
        path = confine(NAMESPACE, str(share), lambda p: p)
        root = os.open(path, os.O_PATH | os.O_DIRECTORY)
        attempts = {
            "abs": lambda: open("/etc/passwd"),
            "dotdot": lambda: os.open("../../../../etc/passwd", os.O_RDONLY, dir_fd=root),
            "planted_abs": lambda: open(f"{path}/planted_abs"),
            "planted_rel": lambda: open(f"{path}/planted_rel"),
            "planted_proc": lambda: open(f"{path}/planted_proc"),
            "proc_pid1": lambda: os.stat("/proc/1/root"),
            "proc_up": lambda: os.stat(f"{PROC_FD_MOUNT}/../../1/root"),
            "outside_file": lambda: open(f"{path}/../outside"),
            "dev": lambda: open("/dev/mem"),
        }
        return {name: errno_of(fn) for name, fn in attempts.items()}

    status, out = in_child(probe)
    assert os.WIFEXITED(status) and "raised" not in out, out
    assert out == dict.fromkeys(out, "ENOENT"), out
    assert len(out) == 9


def test_namespace_keeps_only_passthrough_capabilities(share: Path) -> None:
    def probe() -> dict[str, Any]:
        confine(NAMESPACE, str(share), lambda p: p)
        masks = cap_state()
        return {
            **{k: masks[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
            "no_new_privs": linux.prctl(linux.PR_GET_NO_NEW_PRIVS),
            "mount": errno_of(lambda: linux.mount("tmpfs", "/shared", "tmpfs", 0)),
            "umount": errno_of(lambda: linux.umount2("/shared", linux.MNT_DETACH)),
            "unshare": errno_of(lambda: linux.unshare(linux.CLONE_NEWNS)),
            "chroot": errno_of(lambda: os.chroot("/shared")),
            "regain": errno_of(lambda: linux.capset(KEEP | 1 << CAP_SYS_ADMIN,
                                                    KEEP | 1 << CAP_SYS_ADMIN, 0)),
        }

    status, out = in_child(probe)
    assert os.WIFEXITED(status) and "raised" not in out, out
    assert (out["CapPrm"], out["CapEff"], out["CapBnd"]) == (KEEP, KEEP, KEEP)
    assert (out["CapInh"], out["CapAmb"]) == (0, 0)
    assert out["no_new_privs"] == 1
    assert {k: out[k] for k in ("mount", "umount", "unshare", "chroot", "regain")} == {
        "mount": "EPERM", "umount": "EPERM", "unshare": "EPERM", "chroot": "EPERM",
        "regain": "EPERM"}


def test_namespace_still_serves_as_passthrough_needs(share: Path) -> None:
    """File handles (other workers' nodes), caller fsuid and chown, after the drop."""
    os.chmod(share, 0o777)

    def probe() -> dict[str, Any]:
        from shardfs.fs.passthrough import sys as lsys

        path = confine(NAMESPACE, str(share), lambda p: p)
        caps.drop_capabilities()  # idempotent: already dropped by confine
        fd = os.open(f"{path}/marker", os.O_PATH)
        htype, handle, _ = fhandle.name_to_handle(fd)
        mount_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        again = fhandle.open_by_handle(mount_fd, htype, handle, os.O_PATH)
        same = os.stat(again).st_ino == os.stat(fd).st_ino
        lsys.setfsgid(1000)
        lsys.setfsuid(1000)
        eff_as_1000 = cap_state()["CapEff"]
        os.close(os.open(f"{path}/made_by_1000", os.O_CREAT | os.O_WRONLY, 0o644))
        lsys.setfsuid(0)
        lsys.setfsgid(0)
        eff_back = cap_state()["CapEff"]
        os.chown(f"{path}/marker", 1234, 4321)
        os.mknod(f"{path}/null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        return {"same": same, "eff_as_1000": eff_as_1000, "eff_back": eff_back}

    status, out = in_child(probe)
    assert os.WIFEXITED(status) and "raised" not in out, out
    assert out["same"]
    # The kernel lowers the filesystem capabilities under a non-root fsuid and
    # raises them again from the permitted set (capabilities(7)).
    assert out["eff_as_1000"] & 1 << caps.CAP_DAC_OVERRIDE == 0
    assert out["eff_back"] == KEEP
    st = os.stat(share / "made_by_1000")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert (os.stat(share / "marker").st_uid, os.stat(share / "marker").st_gid) == (1234, 4321)
    assert stat.S_ISCHR(os.stat(share / "null").st_mode)


def test_namespace_leaves_the_host_mounts_alone(share: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        before = f.read()
    status, out = in_child(lambda: confine(NAMESPACE, str(share), lambda p: p))
    assert os.WIFEXITED(status) and out == SHARED_MOUNT, out
    with open("/proc/self/mountinfo") as f:
        assert f.read() == before
    assert sorted(os.listdir(share)) == ["marker"]


def test_namespace_without_cap_sys_admin_names_the_step(share: Path) -> None:
    def probe() -> str:
        caps.drop_capabilities()
        try:
            confine(NAMESPACE, str(share), lambda p: p)
        except SandboxError as e:
            return str(e.strerror)
        return "entered"

    status, out = in_child(probe)
    assert os.WIFEXITED(status)
    assert out.startswith("sandbox namespace: mount namespace: ") and "needs root" in out, out


def test_open_fs_runs_inside_and_its_value_comes_back(share: Path) -> None:
    def probe() -> list[Any]:
        seen = confine(NAMESPACE, str(share), lambda p: [p, sorted(os.listdir(p)),
                                                         cap_state()["CapEff"]])
        return [seen, cap_state()["CapEff"]]

    status, out = in_child(probe)
    assert os.WIFEXITED(status), out
    (path, listing, eff_during), eff_after = out
    assert (path, listing) == (SHARED_MOUNT, ["marker"])
    assert eff_during == eff_after == KEEP  # set-up sees the capabilities serving has


# -- chroot and none ------------------------------------------------------------


def test_chroot_root_is_the_share(share: Path) -> None:
    def probe() -> dict[str, Any]:
        root_fd = confine(CHROOT, str(share),
                          lambda p: os.open(p, os.O_PATH | os.O_DIRECTORY))
        return {
            "root": sorted(os.listdir("/")),
            "dotdot": sorted(os.listdir("/..")),
            "dotdot_from_fd": errno_of(lambda: os.open("../outside", os.O_RDONLY,
                                                       dir_fd=root_fd)),
            "passwd": errno_of(lambda: open("/etc/passwd")),
            "chroot_again": errno_of(lambda: os.chroot("/")),
            "eff": cap_state()["CapEff"],
            "bnd": cap_state()["CapBnd"],
        }

    status, out = in_child(probe)
    assert os.WIFEXITED(status) and "raised" not in out, out
    assert out["root"] == out["dotdot"] == ["marker"]
    assert out["dotdot_from_fd"] == "ENOENT"  # the fd opened before is the new root
    assert out["passwd"] == "ENOENT"
    assert out["chroot_again"] == "EPERM"
    assert out["eff"] == out["bnd"] == KEEP


def test_none_changes_nothing(share: Path) -> None:
    before = cap_state()

    def probe() -> dict[str, Any]:
        path = confine(SandboxPolicy("none", "none"), str(share), lambda p: p)
        return {"path": path, "masks": cap_state(),
                "passwd": errno_of(lambda: open("/etc/passwd").close())}

    status, out = in_child(probe)
    assert os.WIFEXITED(status) and "raised" not in out, out
    assert out == {"path": str(share), "masks": before, "passwd": "ok"}


# -- seccomp -----------------------------------------------------------------------


def test_seccomp_kill_allows_serving_and_kills_a_fork(share: Path) -> None:
    r, w = os.pipe()

    def probe() -> None:
        path = confine(SandboxPolicy("namespace", "kill"), str(share), lambda p: p)
        fd = os.open(f"{path}/marker", os.O_RDONLY)
        data = os.pread(fd, 6, 0)
        os.write(w, data + f" {cap_state()['Seccomp']}".encode())
        os.fork()  # clone: not on the list
        os.write(w, b" survived")

    status, out = in_child(probe)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read()
    assert said == b"inside 2", said  # served, filter mode 2, and never survived the fork
    assert out is None
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


@pytest.mark.parametrize("call, allowed", [
    ("unix_socket", True), ("inet_socket", False), ("kill_self", True), ("kill_other", False),
    ("execve", False), ("ptrace", False)])
def test_seccomp_argument_rules(share: Path, call: str, allowed: bool) -> None:
    calls: dict[str, Callable[[], object]] = {
        "unix_socket": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close(),
        "inet_socket": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM),
        "kill_self": lambda: os.kill(os.getpid(), 0),
        "kill_other": lambda: os.kill(os.getppid(), 0),
        "execve": lambda: os.execv("/bin/true", ["true"]),
        "ptrace": lambda: linux._libc.syscall(101, 0, 0, 0, 0),  # PTRACE_TRACEME
    }

    def probe() -> str:
        confine(SandboxPolicy("none", "kill"), str(share), lambda p: p)
        calls[call]()
        return "alive"

    status, out = in_child(probe)
    if allowed:
        assert os.WIFEXITED(status) and out == "alive", out
    else:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS, (status, out)


def test_seccomp_log_allows_and_only_logs(share: Path) -> None:
    def probe() -> str:
        confine(SandboxPolicy("none", "log"), str(share), lambda p: p)
        pid = os.fork()  # logged by the kernel, not refused
        if pid == 0:
            os._exit(7)
        return f"{os.waitpid(pid, 0)[1] >> 8} {cap_state()['Seccomp']}"

    status, out = in_child(probe)
    assert os.WIFEXITED(status) and out == "7 2", out


def test_seccomp_filter_skips_names_it_does_not_know() -> None:
    from shardfs.sandbox.seccomp import SeccompFilter

    flt = SeccompFilter("kill", allowed=("read", "no_such_syscall", "write"))
    try:
        assert flt.unknown == ["no_such_syscall"]
    finally:
        flt.release()


# -- policy and config ----------------------------------------------------------------


def test_policy_refuses_unknown_modes() -> None:
    with pytest.raises(ValueError, match="sandbox mode"):
        SandboxPolicy("jail")
    with pytest.raises(ValueError, match="seccomp mode"):
        SandboxPolicy("none", "trap")


def test_config_and_sandbox_agree_on_the_modes() -> None:
    assert config.SANDBOX_MODES == SANDBOX_MODES
    assert config.SECCOMP_MODES == SECCOMP_MODES
    assert (config.Config.sandbox, config.Config.seccomp) == ("namespace", "kill")
