"""Differential POSIX conformance: the same probes on the host and in a guest on shardfs.

``posix_checks.sh`` probes ownership, modes (umask, setgid directories,
setuid/setgid killing), timestamps (utimensat UTIME_NOW/UTIME_OMIT,
``touch -d``/``-m``/``-a``/``-h``), hard and symbolic links, rename (plain,
``mv -T``, renameat2 NOREPLACE/EXCHANGE), truncate and fallocate
(``-p``/``-z``/``-n``), xattrs (``setfattr``/``getfattr``), ACLs
(``setfacl``/``getfacl``), FIFOs, device nodes and sockets, and the errno of
every classic failure, printing one deterministic line per probe.

It runs once directly on the host, in a directory on the same filesystem as
the share (so the filesystem's own semantics cancel out), and once as root
in the guest on the shardfs mount, served by the daemon with its defaults
(sandbox included).  The outputs are compared line by line: a difference is
a failure unless :data:`EXCEPTIONS` documents it, and each documented
exception must still differ (so the README's list stays true).  The reasons
are in README.md, "Sandbox", "Differences from a local filesystem".
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from guest import GUEST_CTL, GuestImage, ShardfsDaemon, make_guest_runner, short_socket_dir

from shardfs.config import FIELDS

pytestmark = [pytest.mark.guest, pytest.mark.timeout(600)]

CHECKS = Path(__file__).with_name("posix_checks.sh")
TAG = "shardfs"
#: The guest's PATH (scripts/build-guest's init), used on the host too.
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Whether this daemon can enforce POSIX ACLs (``posix_acl``, FUSE_POSIX_ACL).
HAS_POSIX_ACL = "posix_acl" in FIELDS


@dataclass(frozen=True)
class Difference:
    """A documented difference: lines whose label starts with ``prefix`` may differ."""

    prefix: str
    reason: str
    #: Pending: expected to go away (the probe may then match, and that is fine).
    pending: bool = False


#: Differences that are not bugs, each with its reason (mirrored in README.md).
EXCEPTIONS: tuple[Difference, ...] = (
    Difference("[xattr] trusted.* as root",
               "trusted.* xattrs need CAP_SYS_ADMIN on the host, which the sandbox drops "
               "(as virtiofsd does); the guest's root gets EPERM"),
) + (() if HAS_POSIX_ACL else (
    Difference("[acl]",
               "POSIX ACLs need the posix_acl option (FUSE_POSIX_ACL), not in this daemon "
               "yet: the guest stores ACLs as plain xattrs but checks permissions, masks "
               "and default-ACL inheritance on mode bits alone", pending=True),
))


def label(line: str) -> str:
    """'[sec] check: result' -> '[sec] check'."""
    return line.split(": ", 1)[0]


def exception_for(line: str) -> Difference | None:
    return next((e for e in EXCEPTIONS if label(line).startswith(e.prefix)), None)


@dataclass
class Runs:
    host: list[str]
    guest: list[str]
    guest_err: str
    guest_rc: str
    daemon: ShardfsDaemon


def guest_script() -> str:
    checks = CHECKS.read_text()
    assert "SHARDFS_POSIX_EOF" not in checks
    return textwrap.dedent(f"""\
        CTL={GUEST_CTL}
        mount -t virtiofs {TAG} /mnt || {{ echo mount failed >"$CTL/posix.err"; exit 1; }}
        cat >/tmp/posix_checks.sh <<'SHARDFS_POSIX_EOF'
        """) + checks + textwrap.dedent("""\
        SHARDFS_POSIX_EOF
        mkdir /mnt/posix
        sh /tmp/posix_checks.sh /mnt/posix >"$CTL/posix.out" 2>"$CTL/posix.err"
        echo $? >"$CTL/posix.rc"
        sync
        umount /mnt
        """)


@pytest.fixture(scope="module")
def runs(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    base = tmp_path_factory.mktemp("posix")
    host_dir = base / "host" / "posix"
    host_dir.mkdir(parents=True)
    shared = base / "shared"
    shared.mkdir()
    env = {"PATH": GUEST_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/tmp"}
    host = subprocess.run(["sh", str(CHECKS), str(host_dir)], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert host.returncode == 0 and not host.stderr, host.stderr
    sock_dir, _ = short_socket_dir(base / "sock")
    extra = ["--posix-acl", "true"] if HAS_POSIX_ACL else []
    daemon = ShardfsDaemon(socket_path=sock_dir / "vhost-user-fs.sock", shared_dir=shared,
                           log_path=base / "daemon.log", tag=TAG, extra_args=extra).start()
    try:
        result = make_guest_runner(guest_image, base, None)(
            guest_script(), socket_path=daemon.socket_path, tag=TAG, timeout_s=300)
    finally:
        daemon.stop_and_check()
    assert result.ctl("posix.rc").strip() == "0", result.describe()
    return Runs(host.stdout.splitlines(), result.ctl("posix.out").splitlines(),
                result.ctl("posix.err"), result.ctl("posix.rc").strip(), daemon)


def test_checks_ran_to_the_end_in_both_places(runs: Runs) -> None:
    assert runs.host[-1] == runs.guest[-1] == "[end] done", runs.guest[-5:]
    assert runs.guest_err == "", runs.guest_err
    assert len(runs.host) > 150


def test_guest_on_shardfs_behaves_like_the_host(runs: Runs) -> None:
    host_labels = [label(x) for x in runs.host]
    guest_labels = [label(x) for x in runs.guest]
    assert host_labels == guest_labels, "the probes ran differently:\n" + "\n".join(
        f"  host:  {h}\n  guest: {g}" for h, g in zip(runs.host, runs.guest, strict=False)
        if label(h) != label(g))
    unexplained = []
    explained = []
    for h, g in zip(runs.host, runs.guest, strict=True):
        if h == g:
            continue
        exc = exception_for(h)
        (explained if exc else unexplained).append(f"  host:  {h}\n  guest: {g}")
    print(f"{len(runs.host)} probes, {len(explained)} documented differences:")
    print("\n".join(explained))
    assert not unexplained, "undocumented differences from the host:\n" + "\n".join(unexplained)


@pytest.mark.parametrize("exc", [e for e in EXCEPTIONS if not e.pending],
                         ids=lambda e: e.prefix)
def test_each_documented_exception_still_differs(runs: Runs, exc: Difference) -> None:
    """An exception that no longer shows must leave EXCEPTIONS and the README."""
    lines = [(h, g) for h, g in zip(runs.host, runs.guest, strict=True)
             if label(h).startswith(exc.prefix)]
    assert lines, f"no probe is labelled {exc.prefix!r}"
    assert any(h != g for h, g in lines), f"{exc.prefix!r} now matches the host: {exc.reason}"


def test_every_exception_is_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for exc in EXCEPTIONS:
        assert f"`{exc.prefix}`" in readme, f"README.md does not document {exc.prefix!r}"


def test_host_run_is_deterministic(tmp_path: Path) -> None:
    """The probes print nothing that differs between two runs on the same filesystem."""
    outs = []
    for name in ("one", "two"):
        d = tmp_path / name
        d.mkdir()
        env = {"PATH": GUEST_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/tmp"}
        outs.append(subprocess.run(["sh", str(CHECKS), str(d)], capture_output=True,
                                   text=True, env=env, timeout=120, check=True).stdout)
    assert outs[0] == outs[1]
    assert os.geteuid() == 0, "the probes chown and mknod: run as root"
