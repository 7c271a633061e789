"""End-to-end: a real Linux guest (QEMU, TCG) mounts shardfs over virtio-fs.

Each boot costs seconds under TCG, so one boot runs several workloads as
*steps*: each step runs in its own ``set -e`` subshell and records its exit
status in ``$CTL/<step>.rc`` and its output in ``$CTL/<step>.log``.  The
individual tests then check one step each, and verify the results on the HOST,
byte for byte, after the guest has powered off and the daemon has stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from guest import (
    GUEST_CTL,
    DaemonPool,
    GuestImage,
    GuestResult,
    RunGuest,
    ShardfsDaemon,
    StartDaemon,
    attach_artifact,
    daemon_python,
    make_guest_runner,
)

pytestmark = [pytest.mark.guest, pytest.mark.timeout(900)]

TAG = "shardfs"

#: Shell prelude for guest scripts: ``step NAME CMD...`` runs CMD in a ``set -e``
#: subshell (so a failing step does not stop the others), tees its output to
#: $CTL/NAME.log and the console and writes its exit status to $CTL/NAME.rc.
PRELUDE = textwrap.dedent(
    f"""\
    CTL={GUEST_CTL}
    step() {{
        _name=$1; shift
        echo "=== step $_name: start"
        {{ ( set -eux; "$@" ); echo $? >"$CTL/$_name.rc"; }} 2>&1 | tee "$CTL/$_name.log"
        echo "=== step $_name: exit $(cat "$CTL/$_name.rc")"
    }}
    drop_caches() {{ sync; echo 3 >/proc/sys/vm/drop_caches; }}
    """
)

MOUNT_STEP = textwrap.dedent(
    f"""\
    do_mount() {{
        grep -qw virtiofs /proc/filesystems
        mount -t virtiofs {TAG} /mnt
        grep ' /mnt virtiofs ' /proc/mounts
    }}
    step mount do_mount
    if [ "$(cat "$CTL/mount.rc")" != 0 ]; then
        echo "virtiofs mount failed; skipping the other steps"
        exit 1
    fi
    """
)

#: Before a test that pins work to every vCPU: check each one runs a task.
#: Under TCG on a busy 2-core host a vCPU has been seen dead from boot (RCU
#: stalls, its timer softirq never run); a writer pinned to it never starts
#: and the test would hang until its timeout.  The guest writes the vCPUs that
#: ran nothing in 20 s to $CTL/stalled_vcpus and stops; the test boots again.
VCPUS_RUN_STEP = textwrap.dedent(
    """\
    for cpu in $(seq 0 $(($(nproc --all) - 1))); do
        taskset -c $cpu sh -c ": >/tmp/vcpu-ran-$cpu" &
    done
    i=0
    while [ $i -lt 40 ] && [ $(ls /tmp/vcpu-ran-* 2>/dev/null | wc -l) -lt $(nproc --all) ]; do
        sleep 0.5; i=$((i + 1))
    done
    stalled=""
    for cpu in $(seq 0 $(($(nproc --all) - 1))); do
        [ -e /tmp/vcpu-ran-$cpu ] || stalled="$stalled $cpu"
    done
    if [ -n "$stalled" ]; then
        echo "vCPUs that ran nothing:$stalled"
        echo $stalled >"$CTL/stalled_vcpus"
        exit 0
    fi
    """
)

UMOUNT_STEP = textwrap.dedent(
    """\
    do_umount() { sync; umount /mnt; ! grep ' /mnt virtiofs ' /proc/mounts; }
    step umount do_umount
    """
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# ----------------------------------------------------------------- step results


@dataclass
class Boot:
    """One guest boot against one daemon, with its per-step results."""

    result: GuestResult
    daemon: ShardfsDaemon
    daemon_problems: list[str]
    shared: Path

    def step_rc(self, name: str) -> int | None:
        text = self.result.ctl(f"{name}.rc").strip()
        return int(text) if text.lstrip("-").isdigit() else None

    def assert_step(self, name: str) -> None:
        """Fail (with the step's log and the console tail) unless step *name* exited 0."""
        if self.step_rc("mount") != 0 and name != "mount":
            raise AssertionError(
                "virtiofs mount failed in the guest, so step "
                f"{name!r} did not run\n--- mount step log ---\n{self.result.ctl('mount.log')}\n"
                + self.result.describe()
            )
        rc = self.step_rc(name)
        if rc != 0:
            raise AssertionError(
                f"guest step {name!r} "
                + ("did not run" if rc is None else f"exited {rc}")
                + f"\n--- step log ---\n{self.result.ctl(f'{name}.log')}\n"
                + self.result.describe(lines=40)
            )


def boot_with_daemon(
    *,
    image: GuestImage,
    base: Path,
    node: pytest.Item | None,
    shared: Path,
    script: str,
    num_request_queues: int = 1,
    vcpus: int = 1,
    timeout_s: float = 300,
) -> Boot:
    """Start a daemon, boot the guest against it, then stop the daemon (SIGTERM)."""
    pool = DaemonPool(base, node)
    try:
        daemon = pool(shared_dir=shared, tag=TAG, num_request_queues=num_request_queues)
        runner = make_guest_runner(image, base, node)
        result = runner(
            script,
            socket_path=daemon.socket_path,
            tag=TAG,
            num_request_queues=num_request_queues,
            vcpus=vcpus,
            timeout_s=timeout_s,
        )
    finally:
        problems = pool.close()
    return Boot(result=result, daemon=daemon, daemon_problems=problems, shared=shared)


def attach_boot_logs(node: pytest.Item, boot: Boot) -> None:
    attach_artifact(node, "shardfs daemon log", boot.daemon.log_path)
    attach_artifact(node, "guest console", boot.result.work_dir / "console.log")
    attach_artifact(node, "qemu output", boot.result.work_dir / "qemu.log")


# ----------------------------------------------------------------- host trees


def make_tree(root: Path) -> None:
    """A source tree with varied sizes (incl. > 1 MiB), symlinks, hard links,
    nested and empty dirs, a sparse file, a FIFO, odd names, modes and owners."""
    root.mkdir(parents=True)
    sizes = [0, 1, 100, 4095, 4096, 4097, 65537, 131073, (1 << 20) + 13, 3 * (1 << 20) + 7]
    for i, size in enumerate(sizes):
        (root / f"file_{size}.bin").write_bytes(random_bytes(1000 + i, size))
    deep = root / "a" / "b" / "c" / "d" / "e" / "f"
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_text("deep file\n" * 100)
    (root / "a" / "b" / "mid.txt").write_text("middle\n")
    many = root / "many"
    many.mkdir()
    for i in range(150):
        (many / f"small-{i:03d}.txt").write_bytes(random_bytes(5000 + i, i * 37))
    (root / "empty_dir").mkdir()
    (root / "name with spaces.txt").write_text("spaces\n")
    (root / "ünïcødé-ファイル.txt").write_text("unicode\n")
    (root / ("L" * 250 + ".txt")).write_text("long name\n")
    # modes
    modes = [("mode_600", 0o600), ("mode_755", 0o755), ("mode_400", 0o400),
             ("mode_4755", 0o4755), ("mode_1777_dir", 0o1777)]
    for i, (name, mode) in enumerate(modes):
        p = root / name
        if name.endswith("_dir"):
            p.mkdir()
        else:
            p.write_bytes(random_bytes(300 + i, 777))
        os.chmod(p, mode)
    private = root / "private_dir"
    private.mkdir()
    (private / "inner.txt").write_text("inner\n")
    os.chmod(private, 0o700)
    # owners (guest root's cp -a / tar -x must preserve them)
    owned = root / "owned_by_1000"
    owned.write_text("owned\n")
    owned_dir = root / "dir_owned_by_1234"
    owned_dir.mkdir()
    if os.geteuid() == 0:
        os.chown(owned, 1000, 1000)
        os.chown(owned_dir, 1234, 4321)
    # symlinks: relative, absolute (dangling in the guest and on the host), to a dir, chains
    os.symlink("file_4096.bin", root / "link_rel")
    os.symlink("a/b/c", root / "link_dir")
    os.symlink("/nonexistent/target/path", root / "link_dangling_abs")
    os.symlink("link_rel", root / "link_chain")
    os.symlink("../../mid.txt", root / "a" / "b" / "c" / "link_up")
    # hard links
    os.link(root / "file_65537.bin", root / "hardlink_65537.bin")
    os.link(root / "a" / "b" / "mid.txt", root / "many" / "hardlink_mid.txt")
    # sparse file: data at the start, 5 MiB hole, data at the end
    with open(root / "sparse.bin", "wb") as f:
        f.write(random_bytes(7, 10000))
        f.seek(5 << 20)
        f.write(random_bytes(8, 10000))
    os.mkfifo(root / "fifo")
    # fixed, distinct mtimes (seconds) so that preservation is checkable
    for i, (dirpath, dirnames, filenames) in enumerate(os.walk(root, topdown=False)):
        for j, name in enumerate(sorted(filenames + dirnames)):
            p = Path(dirpath) / name
            t = 1_500_000_000 + i * 1000 + j
            os.utime(p, (t, t), follow_symlinks=False)
    os.utime(root, (1_600_000_000, 1_600_000_000))


@dataclass(frozen=True)
class Entry:
    kind: str
    mode: int
    uid: int
    gid: int
    content: str  # sha256 for files, target for symlinks, "" otherwise
    size: int
    mtime: int | None


def snapshot(root: Path, *, mtimes: bool) -> tuple[dict[str, Entry], set[frozenset[str]]]:
    """Path -> Entry for everything under *root*, plus the groups of hard-linked files."""
    entries: dict[str, Entry] = {}
    inodes: dict[int, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            mode = stat.S_IMODE(st.st_mode)
            mtime = int(st.st_mtime) if mtimes else None
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = Entry("symlink", 0, st.st_uid, st.st_gid, os.readlink(p), 0, None)
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = Entry("dir", mode, st.st_uid, st.st_gid, "", 0, mtime)
            elif stat.S_ISREG(st.st_mode):
                entries[rel] = Entry(
                    "file", mode, st.st_uid, st.st_gid, sha256_file(p), st.st_size, mtime
                )
                if st.st_nlink > 1:
                    inodes.setdefault(st.st_ino, set()).add(rel)
            elif stat.S_ISFIFO(st.st_mode):
                entries[rel] = Entry("fifo", mode, st.st_uid, st.st_gid, "", 0, mtime)
            else:
                entries[rel] = Entry(f"other:{st.st_mode:o}", mode, st.st_uid, st.st_gid, "", 0,
                                     None)
    links = {frozenset(group) for group in inodes.values() if len(group) > 1}
    return entries, links


def assert_same_tree(expected_root: Path, actual_root: Path, *, mtimes: bool = True) -> None:
    expected, expected_links = snapshot(expected_root, mtimes=mtimes)
    actual, actual_links = snapshot(actual_root, mtimes=mtimes)
    problems = []
    for rel in sorted(expected.keys() - actual.keys()):
        problems.append(f"missing: {rel}")
    for rel in sorted(actual.keys() - expected.keys()):
        problems.append(f"unexpected: {rel}")
    for rel in sorted(expected.keys() & actual.keys()):
        if expected[rel] != actual[rel]:
            problems.append(f"differs: {rel}\n    expected {expected[rel]}\n    actual   "
                            f"{actual[rel]}")
    if expected_links != actual_links:
        problems.append(f"hard link groups differ: expected {sorted(map(sorted, expected_links))}"
                        f", actual {sorted(map(sorted, actual_links))}")
    assert not problems, (
        f"{actual_root} differs from {expected_root}:\n" + "\n".join(problems[:50])
    )


def host_run(*args: str, cwd: Path | None = None) -> str:
    res = subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, check=False)
    assert res.returncode == 0, f"{args} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


# ----------------------------------------------------------------- smoke boot


def test_boot_without_virtiofs(run_guest: RunGuest) -> None:
    """The harness itself: boot, run a script from the host root, write to $CTL."""
    result = run_guest(
        PRELUDE
        + textwrap.dedent(
            """\
            echo "hello from the guest"
            uname -r >"$CTL/uname"
            grep -w virtiofs /proc/filesystems
            sha256sum /etc/os-release | cut -d' ' -f1 >"$CTL/os-release.sha256"
            step ok true
            step failing false
            """
        ),
        socket_path=None,
        timeout_s=120,
    )
    result.assert_ok()
    assert "hello from the guest" in result.console_log
    kernel = Path(result.command[result.command.index("-kernel") + 1]).resolve()
    assert result.ctl("uname").strip() == kernel.name.removeprefix("vmlinuz-")
    assert result.ctl("os-release.sha256").strip() == sha256_file(Path("/etc/os-release"))
    assert result.ctl("ok.rc").strip() == "0"
    assert result.ctl("failing.rc").strip() == "1"


# ----------------------------------------------------------------- main workloads

HOST_FILE_SIZE = 2 * (1 << 20) + 12345

WORKLOADS_SCRIPT = (
    PRELUDE
    + MOUNT_STEP
    + textwrap.dedent(
        """\
        statfs() {
            stat -f /mnt
            df -k /mnt | tail -n 1 >"$CTL/df.txt"
            ls -la /mnt
        }
        step statfs statfs

        # announce_submounts (on by default, as virtiofsd): a tmpfs under the
        # share is a mount of its own in the guest.  Reading into it mounts it.
        submount() {
            cat /mnt/submount/marker >"$CTL/submount_marker.txt"
            stat -c %d /mnt/. /mnt/submount/. >"$CTL/submount_devs.txt"
            grep ' /mnt/submount virtiofs ' /proc/mounts >"$CTL/submount_mounts.txt"
        }
        step submount submount
        umount /mnt/submount || true  # before the umount step's umount /mnt

        host_to_guest() {
            sha256sum /mnt/host_file.bin | cut -d' ' -f1 >"$CTL/host_file.cached.sha256"
            drop_caches
            sha256sum /mnt/host_file.bin | cut -d' ' -f1 >"$CTL/host_file.sha256"
            stat -c '%s' /mnt/host_file.bin >"$CTL/host_file.size"
            cat /mnt/host_note.txt >"$CTL/host_note.txt"
            drop_caches
            stat -c '%W' /mnt/host_note.txt >"$CTL/host_note.btime"  # asks for STATX_BTIME
        }
        step host_to_guest host_to_guest

        guest_to_host() {
            head -c 2500000 /dev/urandom >/mnt/guest_file.bin
            printf 'PATCHED-IN-THE-MIDDLE' | dd of=/mnt/guest_file.bin bs=1 seek=1000000 \
                conv=notrunc status=none
            head -c 777 /dev/urandom >>/mnt/guest_file.bin
            sha256sum /mnt/guest_file.bin | cut -d' ' -f1 >"$CTL/guest_file.sha256"
            head -c 3000000 /dev/urandom >/mnt/truncated.bin
            truncate -s 1234567 /mnt/truncated.bin
            sha256sum /mnt/truncated.bin | cut -d' ' -f1 >"$CTL/truncated.sha256"
            echo "hello from the guest" >/mnt/hello.txt
            echo old >/mnt/replaced.txt
            echo new >/mnt/replaced.txt.tmp
            mv /mnt/replaced.txt.tmp /mnt/replaced.txt
            echo gone >/mnt/deleted.txt
            rm /mnt/deleted.txt
            mkdir -p /mnt/made/by/guest
            chmod 0750 /mnt/made/by/guest
            rmdir /mnt/made/by/guest
            drop_caches
            sha256sum /mnt/guest_file.bin | cut -d' ' -f1 >"$CTL/guest_file.reread.sha256"
        }
        step guest_to_host guest_to_host

        links() {
            mkdir /mnt/links
            cd /mnt/links
            echo "link target" >target
            i=0
            while [ $i -lt 100 ]; do
                ln target "hard$i"
                ln -s target "sym$i"
                i=$((i + 1))
            done
            test "$(stat -c %h target)" = 101
            test "$(readlink sym99)" = target
            test "$(cat sym42)" = "link target"
            i=0
            while [ $i -lt 100 ]; do
                [ $((i % 2)) = 0 ] && rm "hard$i" "sym$i"
                i=$((i + 1))
            done
            ln -s /absolute/dangling dangling
            mv hard1 renamed_hard1
            drop_caches
            test "$(stat -c %h target)" = 51
            ls -la | wc -l
        }
        step links links

        cp_a() {
            cp -a /mnt/src /mnt/copy
            drop_caches
            diff -r --no-dereference -x fifo /mnt/src /mnt/copy
        }
        step cp_a cp_a

        tar_round_trip() {
            tar -C /mnt/src -cf /mnt/tree.tar .
            tar -tvf /mnt/tree.tar >/dev/null
            mkdir /mnt/untar
            tar -C /mnt/untar -xpf /mnt/tree.tar
            tar -C /mnt/src -czf /mnt/tree.tar.gz .
            drop_caches
            diff -r --no-dereference -x fifo /mnt/src /mnt/untar
        }
        step tar tar_round_trip

        git_work() {
            git init -q -b main /mnt/repo
            cd /mnt/repo
            git config user.name "Guest User"
            git config user.email guest@example.invalid
            mkdir -p src docs
            seq 1 5000 >src/numbers.txt
            echo "# shardfs e2e" >README.md
            cp /mnt/host_file.bin docs/blob.bin
            git add -A
            git commit -q -m "first commit from the guest"
            echo "more" >>README.md
            git mv src/numbers.txt src/renamed.txt
            git rm -q docs/blob.bin
            git commit -q -a -m "second commit from the guest"
            git gc -q
            git fsck --strict
            test -z "$(git status --porcelain)"
            git log --format=%s >"$CTL/git_log.txt"
            git rev-parse HEAD >"$CTL/git_head.txt"
        }
        step git git_work

        sqlite_work() {
            sqlite3 /mnt/db.sqlite "
                CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT NOT NULL, data BLOB);
                WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000)
                    INSERT INTO t SELECT x, 'row-' || x, randomblob(200) FROM c;
                CREATE INDEX t_name ON t(name);
                BEGIN;
                DELETE FROM t WHERE id % 7 = 0;
                UPDATE t SET name = name || '-u' WHERE id % 5 = 0;
                COMMIT;"
            drop_caches
            sqlite3 /mnt/db.sqlite \
                "SELECT count(*), sum(id) FROM t; SELECT name FROM t WHERE id = 10;
                 PRAGMA integrity_check;" >"$CTL/sqlite_guest.txt"
            cat "$CTL/sqlite_guest.txt"
        }
        step sqlite sqlite_work

        sqlite_wal() {
            sqlite3 /mnt/wal.sqlite "PRAGMA journal_mode=WAL;
                CREATE TABLE kv(k TEXT PRIMARY KEY, v INTEGER);
                WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 500)
                    INSERT INTO kv SELECT 'key-' || x, x * x FROM c;
                PRAGMA wal_checkpoint(TRUNCATE);" >/dev/null
            sqlite3 /mnt/wal.sqlite "SELECT count(*), sum(v) FROM kv; PRAGMA integrity_check;" \
                >"$CTL/sqlite_wal_guest.txt"
            cat "$CTL/sqlite_wal_guest.txt"
        }
        step sqlite_wal sqlite_wal
        """
    )
    + UMOUNT_STEP
)


@pytest.fixture(scope="module")
def workloads_boot(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Boot:
    base = tmp_path_factory.mktemp("workloads")
    shared = base / "shared"
    shared.mkdir()
    (shared / "host_file.bin").write_bytes(random_bytes(42, HOST_FILE_SIZE))
    (shared / "host_note.txt").write_text("written on the host\n")
    make_tree(shared / "src")
    # a pristine copy outside the share to compare against afterwards
    subprocess.run(["cp", "-a", str(shared / "src"), str(base / "expected")], check=True)
    submount = shared / "submount"
    submount.mkdir()
    if os.geteuid() == 0:  # test_submount_is_its_own_mount_in_the_guest
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(submount)], check=True)
        (submount / "marker").write_text("on a tmpfs under the share\n")
    try:
        return boot_with_daemon(image=guest_image, base=base, node=None, shared=shared,
                                script=WORKLOADS_SCRIPT)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(submount)], check=False)


@pytest.fixture
def boot(workloads_boot: Boot, request: pytest.FixtureRequest) -> Boot:
    attach_boot_logs(request.node, workloads_boot)
    return workloads_boot


def test_workloads_guest_finished(boot: Boot) -> None:
    boot.result.assert_ok()
    assert "=== step umount: exit 0" in boot.result.console_log, boot.result.describe()


def test_daemon_exited_cleanly(boot: Boot) -> None:
    assert not boot.daemon_problems, "\n\n".join(boot.daemon_problems)


def test_mount(boot: Boot) -> None:
    boot.assert_step("mount")
    assert " /mnt virtiofs " in boot.result.ctl("mount.log")


def test_statfs(boot: Boot) -> None:
    boot.assert_step("statfs")
    fields = boot.result.ctl("df.txt").split()
    assert fields[0] == TAG
    host = os.statvfs(boot.shared)
    assert int(fields[1]) == host.f_blocks * host.f_frsize // 1024


def test_umount(boot: Boot) -> None:
    boot.assert_step("umount")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting the tmpfs under the share needs root")
def test_submount_is_its_own_mount_in_the_guest(boot: Boot) -> None:
    """FUSE_SUBMOUNTS with FUSE_ATTR_SUBMOUNT on the mount point: the guest
    kernel mounts it apart, with its own st_dev, as with virtiofsd."""
    boot.assert_step("submount")
    assert boot.result.ctl("submount_marker.txt") == "on a tmpfs under the share\n"
    root_dev, sub_dev = boot.result.ctl("submount_devs.txt").split()
    assert root_dev != sub_dev
    assert " /mnt/submount virtiofs " in boot.result.ctl("submount_mounts.txt")


def test_host_file_read_in_guest(boot: Boot) -> None:
    boot.assert_step("host_to_guest")
    expected = sha256_file(boot.shared / "host_file.bin")
    assert boot.result.ctl("host_file.cached.sha256").strip() == expected
    assert boot.result.ctl("host_file.sha256").strip() == expected
    assert boot.result.ctl("host_file.size").strip() == str(HOST_FILE_SIZE)
    assert boot.result.ctl("host_note.txt") == "written on the host\n"


def test_birth_time_reaches_the_guest(boot: Boot) -> None:
    """FUSE_STATX: the guest's stat shows the host file's birth time (with
    virtiofsd, which answers STATX with ENOSYS, it shows none)."""
    boot.assert_step("host_to_guest")
    host = subprocess.run(["stat", "-c", "%W", str(boot.shared / "host_note.txt")],
                          capture_output=True, text=True, check=True).stdout.strip()
    if host in ("0", "-", "?"):
        pytest.skip("the host filesystem does not record birth times")
    assert boot.result.ctl("host_note.btime").strip() == host


def test_guest_file_read_on_host(boot: Boot) -> None:
    boot.assert_step("guest_to_host")
    shared = boot.shared
    guest_sha = boot.result.ctl("guest_file.sha256").strip()
    assert (shared / "guest_file.bin").stat().st_size == 2500000 + 777
    assert sha256_file(shared / "guest_file.bin") == guest_sha
    assert boot.result.ctl("guest_file.reread.sha256").strip() == guest_sha
    data = (shared / "guest_file.bin").read_bytes()
    assert data[1000000:1000000 + 21] == b"PATCHED-IN-THE-MIDDLE"
    assert (shared / "truncated.bin").stat().st_size == 1234567
    assert sha256_file(shared / "truncated.bin") == boot.result.ctl("truncated.sha256").strip()
    assert (shared / "hello.txt").read_text() == "hello from the guest\n"
    assert (shared / "replaced.txt").read_text() == "new\n"
    assert not (shared / "replaced.txt.tmp").exists()
    assert not (shared / "deleted.txt").exists()
    assert (shared / "made" / "by").is_dir()
    assert not (shared / "made" / "by" / "guest").exists()


def test_links(boot: Boot) -> None:
    boot.assert_step("links")
    d = boot.shared / "links"
    target = d / "target"
    assert target.read_text() == "link target\n"
    assert target.stat().st_nlink == 51
    names = set(os.listdir(d))
    expected = {"target", "dangling", "renamed_hard1"}
    expected |= {f"hard{i}" for i in range(3, 100, 2)} | {f"sym{i}" for i in range(1, 100, 2)}
    assert names == expected
    for i in range(1, 100, 2):
        assert os.readlink(d / f"sym{i}") == "target"
    assert os.readlink(d / "dangling") == "/absolute/dangling"
    assert (d / "renamed_hard1").stat().st_ino == target.stat().st_ino


def test_source_tree_untouched(boot: Boot) -> None:
    assert_same_tree(boot.shared.parent / "expected", boot.shared / "src")


def test_cp_a_tree(boot: Boot) -> None:
    boot.assert_step("cp_a")
    assert_same_tree(boot.shared.parent / "expected", boot.shared / "copy")


def test_tar_round_trip(boot: Boot) -> None:
    boot.assert_step("tar")
    assert_same_tree(boot.shared.parent / "expected", boot.shared / "untar")
    # the archives the guest wrote are valid and complete on the host
    listing = host_run("tar", "-tf", str(boot.shared / "tree.tar")).split()
    assert "./a/b/c/d/e/f/deep.txt" in listing
    gz_listing = host_run("tar", "-tzf", str(boot.shared / "tree.tar.gz")).split()
    assert sorted(gz_listing) == sorted(listing)


def test_git(boot: Boot) -> None:
    boot.assert_step("git")
    repo = str(boot.shared / "repo")
    git = ["git", "-c", "safe.directory=*", "-C", repo]
    host_run(*git, "fsck", "--strict", "--full")
    log = host_run(*git, "log", "--format=%s").splitlines()
    assert log == ["second commit from the guest", "first commit from the guest"]
    assert host_run(*git, "rev-parse", "HEAD").strip() == boot.result.ctl("git_head.txt").strip()
    assert host_run(*git, "status", "--porcelain") == ""
    numbers = host_run(*git, "show", "HEAD:src/renamed.txt")
    assert numbers == "".join(f"{i}\n" for i in range(1, 5001))
    blob = subprocess.run([*git, "show", "HEAD~1:docs/blob.bin"], capture_output=True,
                          check=True).stdout
    assert hashlib.sha256(blob).hexdigest() == sha256_file(boot.shared / "host_file.bin")


def test_sqlite(boot: Boot) -> None:
    boot.assert_step("sqlite")
    db = str(boot.shared / "db.sqlite")
    ids = [i for i in range(1, 3001) if i % 7 != 0]
    expected = f"{len(ids)}|{sum(ids)}\nrow-10-u\nok\n"
    assert boot.result.ctl("sqlite_guest.txt") == expected
    out = host_run("sqlite3", db, "SELECT count(*), sum(id) FROM t; "
                   "SELECT name FROM t WHERE id = 10; PRAGMA integrity_check;")
    assert out == expected
    assert host_run("sqlite3", db, "SELECT count(*) FROM t WHERE length(data) = 200;").strip() \
        == str(len(ids))
    assert not (boot.shared / "db.sqlite-journal").exists()


def test_sqlite_wal(boot: Boot) -> None:
    boot.assert_step("sqlite_wal")
    expected = f"500|{sum(x * x for x in range(1, 501))}\nok\n"
    assert boot.result.ctl("sqlite_wal_guest.txt") == expected
    db = str(boot.shared / "wal.sqlite")
    assert host_run("sqlite3", db, "SELECT count(*), sum(v) FROM kv; PRAGMA integrity_check;") \
        == expected


# ----------------------------------------------------------------- stress-ng

#: (name, stress-ng arguments): bounded by op counts, not time; each run with --verify.
#: Left out: link/symlink (one bogo op is 8192 links: minutes under TCG; the
#: "links" workload step covers them), copy-file (needs >= 128 MB files).
STRESSORS: list[tuple[str, str]] = [
    ("hdd", "--hdd 1 --hdd-ops 2000 --hdd-bytes 8M --hdd-write-size 64K"),
    ("hdd_rnd_fsync", "--hdd 1 --hdd-ops 500 --hdd-bytes 4M --hdd-opts wr-rnd,rd-rnd,fsync"),
    ("seek", "--seek 1 --seek-ops 500 --seek-size 4M"),
    ("readahead", "--readahead 1 --readahead-ops 100 --readahead-bytes 4M"),
    ("iomix", "--iomix 1 --iomix-ops 200 --iomix-bytes 4M"),
    ("fallocate", "--fallocate 1 --fallocate-ops 10 --fallocate-bytes 4M"),
    ("sync_file", "--sync-file 1 --sync-file-ops 20 --sync-file-bytes 4M"),
    ("mmap_file", "--mmap 1 --mmap-ops 3 --mmap-file --mmap-bytes 1M"),
    ("fsize", "--fsize 1 --fsize-ops 20"),
    ("dir", "--dir 1 --dir-ops 200 --dir-dirs 64"),
    ("dirdeep", "--dirdeep 1 --dirdeep-ops 50"),
    ("dirmany", "--dirmany 1 --dirmany-ops 200"),
    ("dentry", "--dentry 1 --dentry-ops 4 --dentries 256"),
    ("getdent", "--getdent 1 --getdent-ops 100"),
    ("rename", "--rename 1 --rename-ops 500"),
    ("filename", "--filename 1 --filename-ops 100"),
    ("chmod", "--chmod 1 --chmod-ops 20"),
    ("chown", "--chown 1 --chown-ops 50"),
    ("utime", "--utime 1 --utime-ops 200"),
    ("xattr", "--xattr 1 --xattr-ops 20"),
    ("flock", "--flock 1 --flock-ops 200"),
    ("lockf", "--lockf 1 --lockf-ops 200"),
]


def stress_script() -> str:
    lines = [PRELUDE, MOUNT_STEP, "mkdir -p /mnt/stress\n"]
    for name, args in STRESSORS:
        lines.append(
            f"step stress_{name} stress-ng --temp-path /mnt/stress {args} "
            "--verify --metrics-brief\n"
        )
    lines.append(UMOUNT_STEP)
    return "".join(lines)


@pytest.fixture(scope="module")
def stress_boot(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Boot:
    base = tmp_path_factory.mktemp("stress")
    shared = base / "shared"
    shared.mkdir()
    return boot_with_daemon(image=guest_image, base=base, node=None, shared=shared,
                            script=stress_script())


@pytest.mark.parametrize("name", [name for name, _ in STRESSORS])
def test_stress_ng(stress_boot: Boot, name: str, request: pytest.FixtureRequest) -> None:
    attach_boot_logs(request.node, stress_boot)
    stress_boot.assert_step(f"stress_{name}")


def test_stress_daemon_exited_cleanly(stress_boot: Boot, request: pytest.FixtureRequest) -> None:
    attach_boot_logs(request.node, stress_boot)
    stress_boot.result.assert_ok()
    stress_boot.assert_step("umount")
    assert not stress_boot.daemon_problems, "\n\n".join(stress_boot.daemon_problems)


# ----------------------------------------------------------------- multiqueue


@pytest.mark.parametrize("queues", [2, 4])
def test_multiple_request_queues_all_carry_load(
    run_guest: RunGuest, shardfs_daemon: StartDaemon, tmp_path: Path, queues: int
) -> None:
    """N vCPUs, N request queues: a writer pinned to each CPU, checked on the host.

    Linux 6.12 maps each CPU to a request queue, so pinned writers load every
    queue; the guest's per-queue interrupt counts and shardfs's per-queue
    counters must both show it.
    """
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "from_host.bin").write_bytes(random_bytes(99, 1 << 20))
    daemon = shardfs_daemon(shared_dir=shared, tag=TAG, num_request_queues=queues)
    script = PRELUDE + VCPUS_RUN_STEP + MOUNT_STEP + textwrap.dedent(
        f"""\
        cat >/tmp/writer.sh <<'EOF'
        cpu=$1
        mkdir -p /mnt/cpu$cpu
        i=0
        while [ $i -lt 20 ]; do
            head -c $((i * 9973 + cpu * 101)) /dev/urandom >/mnt/cpu$cpu/f$i
            i=$((i + 1))
        done
        (cd /mnt/cpu$cpu && sha256sum f*) >"$CTL/cpu$cpu.sha256"
        EOF
        parallel_write() {{
            pids=""
            for cpu in $(seq 0 {queues - 1}); do
                taskset -c $cpu sh /tmp/writer.sh $cpu &
                pids="$pids $!"
            done
            for p in $pids; do wait $p; done
            drop_caches
            for cpu in $(seq 0 {queues - 1}); do
                (cd /mnt/cpu$cpu && taskset -c $cpu sha256sum -c --quiet "$CTL/cpu$cpu.sha256")
            done
            taskset -c 1 sha256sum /mnt/from_host.bin | cut -d' ' -f1 >"$CTL/from_host.sha256"
            nproc >"$CTL/nproc"
            cat /proc/interrupts >"$CTL/interrupts"
        }}
        step parallel parallel_write
        """
    ) + UMOUNT_STEP
    for _ in range(2):
        result = run_guest(script, socket_path=daemon.socket_path, tag=TAG,
                           num_request_queues=queues, vcpus=queues, timeout_s=300)
        stalled = result.ctl("stalled_vcpus").split()
        if not stalled:
            break
    else:
        pytest.fail(f"guest vCPUs {stalled} ran nothing in two boots (a TCG host too busy?); "
                    "the filesystem was not reached")
    boot = Boot(result=result, daemon=daemon, daemon_problems=[], shared=shared)
    boot.assert_step("parallel")
    boot.assert_step("umount")
    result.assert_ok()
    assert result.ctl("nproc").strip() == str(queues)
    assert result.ctl("from_host.sha256").strip() == sha256_file(shared / "from_host.bin")
    for cpu in range(queues):
        lines = result.ctl(f"cpu{cpu}.sha256").splitlines()
        assert len(lines) == 20
        for line in lines:
            digest, name = line.split()
            path = shared / f"cpu{cpu}" / name
            assert sha256_file(path) == digest, f"{path} differs from what the guest wrote"
    # The guest's view: every request queue raised interrupts.
    per_queue = {}
    for line in result.ctl("interrupts").splitlines():
        fields = line.split()
        if fields and "-requests." in fields[-1]:
            counts = [int(f) for f in fields[1:1 + queues] if f.isdigit()]
            per_queue[fields[-1].rsplit(".", 1)[1]] = sum(counts)
    assert sorted(per_queue) == [str(i) for i in range(queues)], result.ctl("interrupts")
    assert all(n > 0 for n in per_queue.values()), per_queue
    # shardfs's view: every request queue served requests (counters survive the guest).
    stats = subprocess.run(
        [daemon_python(), "-m", "shardfs", "stats", "--socket-path", str(daemon.socket_path),
         "--format", "json"], capture_output=True, text=True, check=True)
    served = {q["queue"]: q["requests"] for q in json.loads(stats.stdout)["queues"]}
    print(f"guest interrupts per request queue: {per_queue}; shardfs requests: {served}")
    assert all(served[q] > 0 for q in range(1, queues + 1)), served


def test_worker_killed_during_guest_io(
    run_guest: RunGuest, shardfs_daemon: StartDaemon, tmp_path: Path
) -> None:
    """kill -9 the worker while the guest writes: the guest neither hangs nor loses data.

    At most the one request the worker had in flight fails (EIO); everything
    the guest saw succeed is on the host.
    """
    import signal
    import threading
    import time

    shared = tmp_path / "shared"
    shared.mkdir()
    daemon = shardfs_daemon(shared_dir=shared, tag=TAG, num_request_queues=1)
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 240
        while not (shared / "kill-now").exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        stats = subprocess.run(
            [daemon_python(), "-m", "shardfs", "stats", "--socket-path",
             str(daemon.socket_path), "--format", "json"], capture_output=True, text=True)
        pid = next(p["pid"] for p in json.loads(stats.stdout)["processes"]
                   if p["name"] == "worker-0")
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    script = PRELUDE + MOUNT_STEP + textwrap.dedent(
        """\
        write_through_kill() {
            i=0; fails=0
            while [ $i -lt 300 ]; do
                [ $i = 20 ] && touch /mnt/kill-now
                if echo "data $i" >/mnt/f$i; then echo $i >>"$CTL/ok"; else fails=$((fails + 1)); fi
                i=$((i + 1))
            done
            echo $fails >"$CTL/fails"
            sync
        }
        step kill write_through_kill
        """
    ) + UMOUNT_STEP
    result = run_guest(script, socket_path=daemon.socket_path, tag=TAG, timeout_s=300)
    thread.join(5)
    boot = Boot(result=result, daemon=daemon, daemon_problems=[], shared=shared)
    boot.assert_step("kill")
    boot.assert_step("umount")
    assert killed, "the worker was never killed"
    assert int(result.ctl("fails")) <= 1
    ok = [int(x) for x in result.ctl("ok").split()]
    assert len(ok) >= 299
    for i in ok:
        assert (shared / f"f{i}").read_text() == f"data {i}\n"
    assert "restarting it" in daemon.log
