"""End to end, rootless: a non-root user starts shardfs with its defaults and a
real guest runs the usual workload (issue 10, "Rootless without libvirt").

The daemon runs as ``shardfs-rootless`` (made by ``tests/frontend/test_rootless.py``'s
helpers, with ``setpriv``) with only ``--socket-path``, ``--shared-dir`` and
``--tag``: its default ``sandbox = namespace`` puts it in a user namespace where
that user is root.  QEMU runs as root and connects to its socket.  One boot
runs every step (cp -a, tar, git, sqlite3, a guest-written file); the host
then checks, after the guest powered off and the daemon stopped, that every
file in the share belongs to that user and that contents match byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from guest import GuestImage, GuestResult, attach_artifact, make_guest_runner
from test_guest import MOUNT_STEP, PRELUDE, UMOUNT_STEP

from tests.frontend.test_rootless import Account, RootlessDaemon, rootless_account

pytestmark = [pytest.mark.guest, pytest.mark.timeout(900),
              pytest.mark.skipif(os.geteuid() != 0, reason="makes a user and switches to it")]

TAG = "shardfs"
GUEST_FILE_SIZE = 1_234_567

SCRIPT = PRELUDE + MOUNT_STEP + textwrap.dedent(
    """\
    ids() {
        test "$(id -u)" = 0
        stat -c '%u:%g' /mnt/src /mnt/src/file_4097.bin >"$CTL/guest_owners.txt"
    }
    step ids ids

    cp_a() {
        cp -a /mnt/src /mnt/copy
        drop_caches
        diff -r --no-dereference /mnt/src /mnt/copy
    }
    step cp_a cp_a

    tar_round_trip() {
        tar -C /mnt/src -cf /mnt/tree.tar .
        mkdir /mnt/untar
        tar -C /mnt/untar -xpf /mnt/tree.tar
        drop_caches
        diff -r --no-dereference /mnt/src /mnt/untar
    }
    step tar tar_round_trip

    git_work() {
        git init -q -b main /mnt/repo
        cd /mnt/repo
        git config user.name "Guest User"
        git config user.email guest@example.invalid
        seq 1 3000 >numbers.txt
        cp /mnt/src/file_65537.bin blob.bin
        git add -A
        git commit -q -m "first commit from the guest"
        git mv numbers.txt renamed.txt
        git commit -q -a -m "second commit from the guest"
        git gc -q
        git fsck --strict
        git rev-parse HEAD >"$CTL/git_head.txt"
    }
    step git git_work

    sqlite_work() {
        sqlite3 /mnt/db.sqlite "
            CREATE TABLE t(id INTEGER PRIMARY KEY, data BLOB);
            WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000)
                INSERT INTO t SELECT x, randomblob(100) FROM c;
            DELETE FROM t WHERE id % 7 = 0;"
        drop_caches
        sqlite3 /mnt/db.sqlite "SELECT count(*) FROM t; PRAGMA integrity_check;" \
            >"$CTL/sqlite_guest.txt"
    }
    step sqlite sqlite_work

    guest_file() {
        head -c GUEST_FILE_SIZE /dev/urandom >/mnt/guest.bin
        sha256sum /mnt/guest.bin | cut -d' ' -f1 >"$CTL/guest.sha256"
    }
    step guest_file guest_file
    """.replace("GUEST_FILE_SIZE", str(GUEST_FILE_SIZE))
) + UMOUNT_STEP

STEPS = ("mount", "ids", "cp_a", "tar", "git", "sqlite", "guest_file", "umount")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_tree(root: Path, owner: Account) -> None:
    """Files of several sizes, nested dirs, modes, a symlink and a hard link,
    fixed mtimes; all owned by ``owner`` (the guest's root)."""
    rng = random.Random(10)
    (root / "a" / "b").mkdir(parents=True)
    for size in (0, 1, 4095, 4097, 65537, (1 << 20) + 13):
        (root / f"file_{size}.bin").write_bytes(rng.randbytes(size))
    (root / "a" / "b" / "deep.txt").write_text("deep\n" * 100)
    (root / "private").write_text("private\n")
    (root / "private").chmod(0o600)
    (root / "script.sh").write_text("#!/bin/sh\n")
    (root / "script.sh").chmod(0o755)
    os.symlink("file_4097.bin", root / "link")
    os.link(root / "file_65537.bin", root / "hardlink.bin")
    for i, p in enumerate(sorted(root.rglob("*"), reverse=True)):
        os.utime(p, (1_500_000_000 + i, 1_500_000_000 + i), follow_symlinks=False)
    for p in [root, *root.rglob("*")]:
        os.lchown(p, owner.uid, owner.gid)


def tree(root: Path) -> dict[str, tuple[str, int, str, int]]:
    """rel path -> (kind, mode, sha256 or link target, mtime)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        rel = str(p.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", 0, os.readlink(p), 0)
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode), "", 0)
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), sha256(p), int(st.st_mtime))
    return out


@dataclass
class Boot:
    result: GuestResult
    daemon: RootlessDaemon
    returncode: int | None
    account: Account

    def assert_step(self, name: str) -> None:
        rc = self.result.ctl(f"{name}.rc").strip()
        assert rc == "0", (f"guest step {name!r} exited {rc or 'never'}\n"
                           f"{self.result.ctl(f'{name}.log')}\n{self.result.describe(lines=40)}")


@pytest.fixture(scope="module")
def rootless_boot(guest_image: GuestImage,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boot]:
    account = rootless_account()
    base = tmp_path_factory.mktemp("rootless")
    daemon = RootlessDaemon(account, "--tag", TAG, log_level="info")
    try:
        make_tree(daemon.shared / "src", account)
        runner = make_guest_runner(guest_image, base, None)
        try:
            result = runner(SCRIPT, socket_path=Path(daemon.socket), tag=TAG, timeout_s=600)
        finally:
            rc = daemon.stop()
        yield Boot(result, daemon, rc, account)
    finally:
        daemon.remove()


def test_rootless_guest_workload(rootless_boot: Boot, request: pytest.FixtureRequest) -> None:
    boot = rootless_boot
    attach_artifact(request.node, "shardfs daemon log", boot.daemon.log_path)
    attach_artifact(request.node, "guest console", boot.result.work_dir / "console.log")
    log = boot.daemon.log_text()
    assert boot.returncode == 0 and "Traceback" not in log, log
    boot.result.assert_ok()
    for name in STEPS:
        boot.assert_step(name)
    assert boot.result.ctl("guest_owners.txt").split() == ["0:0", "0:0"]
    shared = boot.daemon.shared
    # Every file in the share, the guest's and the host's, belongs to the user.
    strangers = [str(p) for p in [shared, *shared.rglob("*")]
                 if (os.lstat(p).st_uid, os.lstat(p).st_gid)
                 != (boot.account.uid, boot.account.gid)]
    assert not strangers, strangers
    src = tree(shared / "src")
    assert tree(shared / "copy") == src
    untar = tree(shared / "untar")
    assert {k: v[:3] for k, v in untar.items()} == {k: v[:3] for k, v in src.items()}
    assert sha256(shared / "guest.bin") == boot.result.ctl("guest.sha256").strip()
    assert (shared / "guest.bin").stat().st_size == GUEST_FILE_SIZE
    assert boot.result.ctl("sqlite_guest.txt").split() == ["1715", "ok"]
    host = subprocess.run(["sqlite3", str(shared / "db.sqlite"),
                           "SELECT count(*) FROM t; PRAGMA integrity_check;"],
                          capture_output=True, text=True, check=True)
    assert host.stdout.split() == ["1715", "ok"]
    git = ["git", "-c", "safe.directory=*", "-C", str(shared / "repo")]
    subprocess.run([*git, "fsck", "--strict"], capture_output=True, check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True)
    assert head.stdout.strip() == boot.result.ctl("git_head.txt").strip()
