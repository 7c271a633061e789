"""``scripts/bench --guest``: fio and a metadata loop in a real Linux guest, per backend.

The guest is the e2e tests' (``tests/e2e/guest.py``: QEMU 10, Linux 6.12,
the host's root over 9p), so fio and python3 are the host's own binaries.
One boot per backend runs these phases on the virtio-fs mount:

* ``write1m``/``read1m``: fio, 1 MiB sequential O_DIRECT writes / reads;
* ``randread4k_qd1``: fio, 4 KiB random O_DIRECT reads, one in flight;
* ``randread4k_qd16``: the same with libaio and 16 in flight;
* ``create``, ``stat``, ``readdir``, ``unlink``: python3 on a directory of
  :data:`META_FILES` files: open(O_CREAT) + close each; stat each (after
  dropping the guest's dentry and inode caches, so each is a LOOKUP);
  list the directory :data:`READDIR_PASSES` times; unlink each.

Every backend is booted ``--guest-runs`` times (3 by default), alternating
(the order turns round on odd runs), with 2 vCPUs; each figure is the
median of the runs with its min and max.  Guest figures under TCG vary up to
2x from run to run, hence the runs.  The ratios to virtiofsd are taken of
the medians; the 2-queue figures are compared with the 1-queue ones.

Before and after each phase the guest drops a marker file into the ctl
share; the host notices it within milliseconds and samples the backend's
CPU time (all threads, all processes) then, so each phase gets the
backend's CPU per operation beside its throughput.  Under TCG the guest
itself is the bottleneck, so the throughput compares little; CPU per
operation is the figure that says how much work each backend does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shardfs.bench.common import REPO, cpu_seconds, find_virtiofsd, version_of

#: Seconds each fio phase runs.
FIO_SECONDS = 5
META_FILES = 1000
#: Listings of the META_FILES directory in the readdir phase.
READDIR_PASSES = 20
#: The issue's targets: every phase at least this much of virtiofsd's rate with
#: 1 queue, and 2 queues never below 1.
TARGET_VS_VIRTIOFSD = 0.9

FIO = ("fio --name={name} --filename=/mnt/fio.dat --size=128M --bs={bs} --rw={rw} "
       "--direct=1 --ioengine={engine} --iodepth={depth} --runtime={secs} --time_based "
       "--output-format=json --output=$CTL/fio-{name}.json")

META = r"""
import os, sys, time
what, n, ctl = sys.argv[1], int(sys.argv[2]), sys.argv[3]
d = "/mnt/meta"
os.makedirs(d, exist_ok=True)
names = [f"{d}/f{i}" for i in range(n)]
if what == "stat":  # every stat a LOOKUP: nothing cached in the guest
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
open(f"{ctl}/mark-{sys.argv[4]}-{what}-start", "w").close()
t = time.monotonic()
if what == "create":
    for p in names:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
elif what == "stat":
    for p in names:
        os.stat(p)
elif what == "readdir":
    for _ in range(n):
        os.listdir(d)
elif what == "unlink":
    for p in names:
        os.unlink(p)
rate = n / (time.monotonic() - t)
open(f"{ctl}/mark-{sys.argv[5]}-{what}-end", "w").close()
print(rate)
"""

#: Phases whose guest command drops its own markers (python3 $CTL/meta.py).
META_PHASES = {"create": META_FILES, "stat": META_FILES, "readdir": READDIR_PASSES,
               "unlink": META_FILES}

PHASES = [
    ("write1m", FIO.format(name="write1m", bs="1M", rw="write", engine="psync", depth=1,
                           secs=FIO_SECONDS)),
    ("read1m", FIO.format(name="read1m", bs="1M", rw="read", engine="psync", depth=1,
                          secs=FIO_SECONDS)),
    ("randread4k_qd1", FIO.format(name="randread4k_qd1", bs="4k", rw="randread",
                                  engine="psync", depth=1, secs=FIO_SECONDS)),
    ("randread4k_qd16", FIO.format(name="randread4k_qd16", bs="4k", rw="randread",
                                   engine="libaio", depth=16, secs=FIO_SECONDS)),
    *[(name, f"python3 $CTL/meta.py {name} {n} $CTL {{start}} {{end}} > $CTL/{name}.out")
      for name, n in META_PHASES.items()],
]
#: Units of each phase's rate.
UNITS = {"write1m": "MB/s", "read1m": "MB/s", "randread4k_qd1": "IOPS",
         "randread4k_qd16": "IOPS", "create": "files/s", "stat": "files/s",
         "readdir": "lists/s", "unlink": "files/s"}


def guest_script(phases: list[str]) -> str:
    lines = ["set -e", "mount -t virtiofs shardfs /mnt",
             # fio lays its file out first; do it outside the measured phases
             "fio --name=prep --filename=/mnt/fio.dat --size=128M --bs=1M --rw=write "
             "--ioengine=psync --output=/dev/null"]
    for k, (name, cmd) in enumerate(PHASES):
        if name in phases:
            if name in META_PHASES:  # the script marks its own timed part
                lines.append(cmd.format(start=f"{2 * k:02d}", end=f"{2 * k + 1:02d}"))
            else:
                lines += [f": > $CTL/mark-{2 * k:02d}-{name}-start", cmd,
                          f": > $CTL/mark-{2 * k + 1:02d}-{name}-end"]
    lines += ["rm -f /mnt/fio.dat", "umount /mnt"]
    return "\n".join(lines) + "\n"


class Sampler(threading.Thread):
    """Samples the backend's CPU time when the guest drops a marker in ``ctl``."""

    def __init__(self, ctl: Path, pid: int) -> None:
        super().__init__(daemon=True)
        self.ctl, self.pid = ctl, pid
        self.marks: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                names = [n for n in os.listdir(self.ctl) if n.startswith("mark-")]
            except FileNotFoundError:
                names = []
            for n in names:
                if n not in self.marks:
                    self.marks[n] = cpu_seconds(self.pid)
            time.sleep(0.005)


def phase_figures(ctl: Path, marks: dict[str, float],
                  phases: list[str]) -> list[dict[str, Any]]:
    out = []
    for k, (name, _) in enumerate(PHASES):
        if name not in phases:
            continue
        start = marks.get(f"mark-{2 * k:02d}-{name}-start")
        end = marks.get(f"mark-{2 * k + 1:02d}-{name}-end")
        row: dict[str, Any] = {"phase": name}
        if name in META_PHASES:
            out_file = ctl / f"{name}.out"
            text = out_file.read_text().strip() if out_file.exists() else ""
            ops = META_PHASES[name]  # files, or listings for readdir
            row.update(rate=float(text) if text else None, unit=UNITS[name])
        else:
            data = json.loads((ctl / f"fio-{name}.json").read_text())
            job = data["jobs"][0]
            side = job["read"] if job["read"]["total_ios"] else job["write"]
            ops = side["total_ios"]
            row.update(rate=side["bw_bytes"] / 1e6 if "1m" in name else side["iops"],
                       unit="MB/s" if "1m" in name else "IOPS")
        if start is not None and end is not None and ops:
            row["cpu_us_per_op"] = (end - start) / ops * 1e6
            row["ops"] = ops
        out.append(row)
    return out


def shardfs_extra_args(args: argparse.Namespace) -> list[str]:
    """What the guest bench adds to the test harness's shardfs command line.

    The harness turns xattrs on (its workloads need them), but virtiofsd runs
    here with its defaults, xattrs off, so shardfs must too: with them on,
    the guest asks GETXATTR security.capability before every WRITE, one round
    trip more per write, while the first ENOSYS stops that for good.  Later
    arguments win, so ``--no-xattr`` after the harness's ``--xattr`` holds.
    """
    extra = [] if args.hardened else ["--sandbox", "none", "--seccomp", "none"]
    return [*extra, "--no-xattr", "--poll-us", str(args.poll_us)]


def boot_once(G: Any, image: Any, args: argparse.Namespace, peer: str | None, backend: str,
              queues: int, vcpus: int, phases: list[str], work: Path) -> list[dict[str, Any]]:
    """One boot of the guest on one backend: the phase rows (RuntimeError if it failed)."""
    shared = work / "shared"
    shared.mkdir(parents=True)
    sock = work / "vfs.sock"
    stop: Callable[[], Any]
    if backend == "shardfs":
        daemon = G.ShardfsDaemon(socket_path=sock, shared_dir=shared,
                                 log_path=work / "daemon.log", tag="shardfs",
                                 num_request_queues=queues, log_level="warning",
                                 extra_args=shardfs_extra_args(args))
        daemon.start()
        pid = daemon.proc.pid
        stop = daemon.stop
    else:
        assert peer is not None
        cmd = [peer, "--socket-path", str(sock), "--shared-dir", str(shared),
               "--log-level", "warn"]
        if not args.hardened:
            cmd += ["--sandbox", "none", "--seccomp", "none"]
        log = open(work / "daemon.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"virtiofsd did not start: {cmd}")
            time.sleep(0.01)
        pid = proc.pid

        def stop(proc: subprocess.Popen[bytes] = proc, log: Any = log) -> None:
            proc.terminate()
            proc.wait(30)
            log.close()
    ctl = work / "guest" / "ctl"
    ctl.mkdir(parents=True)
    (ctl / "meta.py").write_text(META)
    sampler = Sampler(ctl, pid)
    sampler.start()
    try:
        res = G.run_guest(guest_script(phases), work_dir=work / "guest", socket_path=sock,
                          image=image, num_request_queues=queues, vcpus=vcpus, mem="1G",
                          timeout_s=900)
    finally:
        sampler.done.set()
        sampler.join()
        stop()
    if res.exit_code != 0:
        raise RuntimeError(res.describe())
    return phase_figures(ctl, sampler.marks, phases)


def summarize(results: list[dict[str, Any]], phases: list[str]) -> list[dict[str, Any]]:
    """Per phase and backend: the median rate with min and max, the median CPU per op,
    and the ratios the targets speak of (of the medians)."""
    out = []
    configs = sorted({(r["backend"], r["queues"]) for r in results},
                     key=lambda c: (c[0] != "shardfs", c[1]))
    for phase in [name for name, _ in PHASES if name in phases]:
        row: dict[str, Any] = {"phase": phase, "unit": UNITS[phase], "backends": {}}
        for backend, queues in configs:
            rows = [r for r in results if r["phase"] == phase and r["backend"] == backend
                    and r["queues"] == queues and r.get("rate") is not None]
            if not rows:
                continue
            rates = [r["rate"] for r in rows]
            cpus = [r["cpu_us_per_op"] for r in rows if "cpu_us_per_op" in r]
            row["backends"][f"{backend} {queues}q"] = {
                "median": statistics.median(rates), "min": min(rates), "max": max(rates),
                "runs": len(rates), "cpu_us_per_op": statistics.median(cpus) if cpus else None}
        b = row["backends"]
        peer = b.get("virtiofsd 1q")
        one = b.get("shardfs 1q")
        two = b.get("shardfs 2q")
        if peer and one:
            row["x_1q"] = one["median"] / peer["median"]
            row["met_1q"] = row["x_1q"] >= TARGET_VS_VIRTIOFSD
        if one and two:
            row["x_2q_over_1q"] = two["median"] / one["median"]
            row["met_2q"] = two["median"] >= one["median"]
        if peer and two:
            row["x_2q"] = two["median"] / peer["median"]
        out.append(row)
    return out


def print_summary(summary: list[dict[str, Any]]) -> None:
    names = sorted({k for r in summary for k in r["backends"]},
                   key=lambda k: (not k.startswith("shardfs"), k))
    head = "".join(f" {n + ' median (min-max)':>34} {'cpu us/op':>9}" for n in names)
    print(f"\n{'phase':<16} {'unit':<8}{head}  {'1q/vfsd':>8} {'2q/1q':>6}")
    for r in summary:
        cells = ""
        for n in names:
            b = r["backends"].get(n)
            if b is None:
                cells += f" {'-':>34} {'-':>9}"
                continue
            fig = f"{b['median']:,.0f} ({b['min']:,.0f}-{b['max']:,.0f})"
            cpu = f"{b['cpu_us_per_op']:.0f}" if b["cpu_us_per_op"] is not None else "-"
            cells += f" {fig:>34} {cpu:>9}"
        x1 = f"{r['x_1q']:.2f}" + ("" if r.get("met_1q") else "!") if "x_1q" in r else "-"
        x2 = (f"{r['x_2q_over_1q']:.2f}" + ("" if r.get("met_2q") else "!")
              if "x_2q_over_1q" in r else "-")
        print(f"{r['phase']:<16} {r['unit']:<8}{cells}  {x1:>8} {x2:>6}")
    print(f"targets: 1 queue >= {TARGET_VS_VIRTIOFSD}x virtiofsd in every phase, 2 queues >= 1 "
          "queue ('!' marks a miss); ratios of the medians")


def main(args: argparse.Namespace, rest: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench --guest")
    p.add_argument("--guest-queues", default="1,2", help="shardfs request queue counts")
    p.add_argument("--guest-vcpus", type=int, default=2, help="guest vCPUs (every backend)")
    p.add_argument("--guest-runs", type=int, default=3,
                   help="boots per backend, alternating (medians with their ranges)")
    p.add_argument("--guest-phases", default=",".join(name for name, _ in PHASES),
                   help="comma-separated phases to run")
    opts = p.parse_args(rest)
    phases = opts.guest_phases.split(",")
    unknown = set(phases) - {name for name, _ in PHASES}
    if unknown:
        p.error(f"unknown phases: {', '.join(sorted(unknown))}")
    sys.path.insert(0, str(REPO / "tests" / "e2e"))
    import guest as G  # tests/e2e/guest.py

    reason = G.missing_prerequisites()
    if reason:
        print(f"cannot boot a guest: {reason}", file=sys.stderr)
        return 1
    if subprocess.run(["sh", "-c", "command -v fio"], capture_output=True).returncode:
        print("fio is missing: apt-get install fio (scripts/install-test-deps)", file=sys.stderr)
        return 1
    image = G.build_guest()
    peer = None if args.no_virtiofsd else find_virtiofsd(args.virtiofsd)
    if peer is None and not args.no_virtiofsd:
        print("*** virtiofsd not found: run scripts/get-virtiofsd as root; measuring shardfs "
              "ALONE", file=sys.stderr)
    configs: list[tuple[str, int]] = [("shardfs", int(q)) for q in opts.guest_queues.split(",")]
    if peer:
        configs.append(("virtiofsd", 1))
    results = []
    with tempfile.TemporaryDirectory(prefix="shardfs-guest-bench-", dir=args.dir) as tmp_s:
        tmp = Path(tmp_s)
        for run in range(opts.guest_runs):
            for backend, queues in (configs if run % 2 == 0 else configs[::-1]):
                print(f"guest run {run + 1}/{opts.guest_runs}: {backend} {queues}q",
                      file=sys.stderr, flush=True)
                try:
                    rows = boot_once(G, image, args, peer, backend, queues, opts.guest_vcpus,
                                     phases, tmp / f"{backend}-{queues}q-run{run}")
                except RuntimeError as e:
                    print(f"{backend} {queues}q: {e}", file=sys.stderr)
                    return 1
                for row in rows:
                    row.update(backend=backend, queues=queues, run=run)
                    results.append(row)
    summary = summarize(results, phases)
    print_summary(summary)
    print(f"guest: Linux under QEMU ({os.environ.get('SHARDFS_GUEST_ACCEL', 'tcg')}), "
          f"{opts.guest_vcpus} vCPUs, {opts.guest_runs} boots per backend, alternating")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-guest.json").write_text(json.dumps(
        {"virtiofsd": version_of(peer) if peer else None, "vcpus": opts.guest_vcpus,
         "runs": opts.guest_runs, "summary": summary, "results": results}, indent=1))
    print(f"wrote {out / 'bench-guest.json'}")
    return 0
