"""Stress in a real guest, with verification: nothing lost, nothing corrupted.

One boot, 2 vCPUs and 2 request queues (so two workers and the shared node
table are under load), runs:

* **fsx** (``fsx.py``): two seeded random-I/O sequences (writes, appends,
  truncates up and down, hole punches, zero ranges, fsync, reopen, caches
  dropped) on two files at once, one pinned to each CPU, every read checked
  against an in-memory model in the guest; afterwards the host recomputes
  the model and compares the files byte for byte.
* **dbench** (Debian's ``dbench``, the NetBench load file): two clients of
  metadata churn (create, rename, unlink, find, small reads and writes,
  locks) for a fixed time; no operation may fail, and the tree it leaves
  (``--skip-cleanup``) must read the same on the host as in the guest.
* **stress-ng** stressors that ``test_guest.py`` does not already run, each
  bounded by an op count and run with ``--verify``.
"""

from __future__ import annotations

import hashlib
import textwrap
from dataclasses import dataclass
from pathlib import Path

import fsx
import pytest
from guest import (
    GUEST_CTL,
    GuestImage,
    GuestResult,
    ShardfsDaemon,
    make_guest_runner,
    short_socket_dir,
)

pytestmark = [pytest.mark.guest, pytest.mark.timeout(600)]

TAG = "shardfs"
QUEUES = 2
#: (seed, ops) per fsx run; one run per vCPU.
FSX_RUNS = ((1001, 800), (2002, 800))
#: Drop the guest's caches every this many ops, so reads come from shardfs.
FSX_DROP_EVERY = 200
DBENCH_SECONDS = 5
#: stress-ng stressors test_guest.py does not run: (name, arguments).
STRESSORS: tuple[tuple[str, str], ...] = (
    ("fcntl", "--fcntl 1 --fcntl-ops 100"),
    ("lockofd", "--lockofd 1 --lockofd-ops 100"),
    ("locka", "--locka 1 --locka-ops 100"),
    ("mknod", "--mknod 1 --mknod-ops 20"),
    ("chdir", "--chdir 1 --chdir-ops 20 --chdir-dirs 64"),
    ("access", "--access 1 --access-ops 50"),
    ("fstat", "--fstat 1 --fstat-ops 20 --fstat-dir /mnt/stress"),
    ("sendfile", "--sendfile 1 --sendfile-ops 20 --sendfile-size 64K"),
    ("open", "--open 1 --open-ops 100"),
)


def guest_script() -> str:
    src = Path(fsx.__file__).read_text()
    assert "SHARDFS_FSX_EOF" not in src
    fsx_runs = "\n".join(
        f"    taskset -c {cpu} /usr/bin/python3 -I -S /tmp/fsx.py /mnt/fsx{cpu}.bin {seed} "
        f"{ops} --drop-caches {FSX_DROP_EVERY} >\"$CTL/fsx{cpu}.out\" 2>&1 & pids=\"$pids $!\""
        for cpu, (seed, ops) in enumerate(FSX_RUNS))
    stress = "\n".join(
        f"step stress_{name} stress-ng --temp-path /mnt/stress {args} --verify "
        f"--metrics-brief" for name, args in STRESSORS)
    return textwrap.dedent(f"""\
        CTL={GUEST_CTL}
        step() {{
            _name=$1; shift
            echo "=== step $_name (uptime $(cut -d' ' -f1 /proc/uptime)s)"
            {{ ( set -eu; "$@" ); echo $? >"$CTL/$_name.rc"; }} >"$CTL/$_name.log" 2>&1
            echo "=== step $_name: exit $(cat "$CTL/$_name.rc")"
        }}
        mount -t virtiofs {TAG} /mnt || {{ echo "mount failed"; exit 1; }}
        cat >/tmp/fsx.py <<'SHARDFS_FSX_EOF'
        """) + src + textwrap.dedent("""\
        SHARDFS_FSX_EOF
        fsx_both() {
            pids=""
        """) + fsx_runs + textwrap.dedent(f"""
            for p in $pids; do wait "$p"; done
        }}
        step fsx fsx_both
        dbench_run() {{
            mkdir /mnt/dbench
            dbench -D /mnt/dbench -c /usr/share/dbench/client.txt -t {DBENCH_SECONDS} \\
                --skip-cleanup 2
            sync
            echo 3 >/proc/sys/vm/drop_caches
            cd /mnt/dbench && find . -type f | LC_ALL=C sort | xargs -r sha256sum \\
                >"$CTL/dbench.sha256"
        }}
        step dbench dbench_run
        mkdir -p /mnt/stress
        """) + stress + textwrap.dedent("""
        sync
        umount /mnt && echo 0 >"$CTL/umount.rc"
        """)


@dataclass
class Stress:
    result: GuestResult
    shared: Path
    daemon: ShardfsDaemon

    def rc(self, step: str) -> str:
        return self.result.ctl(f"{step}.rc").strip()

    def assert_step(self, step: str) -> None:
        assert self.rc(step) == "0", (f"step {step} exited {self.rc(step) or 'never'}\n"
                                      f"{self.result.ctl(f'{step}.log')[-3000:]}\n"
                                      + self.result.describe(lines=30))


@pytest.fixture(scope="module")
def stress(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Stress:
    base = tmp_path_factory.mktemp("stress2")
    shared = base / "shared"
    shared.mkdir()
    sock_dir, _ = short_socket_dir(base / "sock")
    daemon = ShardfsDaemon(socket_path=sock_dir / "vhost-user-fs.sock", shared_dir=shared,
                           log_path=base / "daemon.log", tag=TAG,
                           num_request_queues=QUEUES).start()
    try:
        result = make_guest_runner(guest_image, base, None)(
            guest_script(), socket_path=daemon.socket_path, tag=TAG,
            num_request_queues=QUEUES, vcpus=QUEUES, timeout_s=400)
    finally:
        daemon.stop_and_check()
    return Stress(result, shared, daemon)


def test_fsx_in_the_guest_matched_its_model(stress: Stress) -> None:
    stress.assert_step("fsx")
    for cpu, (seed, ops) in enumerate(FSX_RUNS):
        out = stress.result.ctl(f"fsx{cpu}.out")
        assert f"seed {seed}: {ops} ops ok" in out, out


@pytest.mark.parametrize("run", range(len(FSX_RUNS)))
def test_fsx_files_on_the_host_equal_the_model(stress: Stress, run: int) -> None:
    seed, ops = FSX_RUNS[run]
    expected = fsx.model(seed, ops)
    got = (stress.shared / f"fsx{run}.bin").read_bytes()
    assert len(got) == len(expected)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert f"sha256 {hashlib.sha256(expected).hexdigest()}" in stress.result.ctl(f"fsx{run}.out")


def test_dbench_ran_without_errors(stress: Stress) -> None:
    stress.assert_step("dbench")
    log = stress.result.ctl("dbench.log")
    assert "Throughput" in log, log[-2000:]
    # dbench falls back to pipes when the guest has no SysV semaphores for its
    # start barrier; that line is about the guest, not the filesystem.
    log = log.replace("failed to create barrier semaphore", "")
    for bad in ("ERROR", "failed"):
        assert bad not in log, log[-2000:]


def test_dbench_tree_reads_the_same_on_the_host(stress: Stress) -> None:
    lines = stress.result.ctl("dbench.sha256").splitlines()
    assert len(lines) > 50, lines
    root = stress.shared / "dbench"
    for line in lines:
        digest, name = line.split(maxsplit=1)
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("name", [n for n, _ in STRESSORS])
def test_stress_ng(stress: Stress, name: str) -> None:
    stress.assert_step(f"stress_{name}")


def test_daemon_clean_and_no_worker_died(stress: Stress) -> None:
    assert stress.rc("umount") == "0", stress.result.describe()
    log = stress.daemon.log
    assert "died" not in log and "Traceback" not in log, log[-3000:]
