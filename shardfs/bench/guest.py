"""``scripts/bench --guest``: fio and a metadata loop in a real Linux guest, per backend.

The guest is the e2e tests' (``tests/e2e/guest.py``: QEMU 10, Linux 6.12,
the host's root over 9p), so fio and python3 are the host's own binaries.
One boot per backend runs these phases on the virtio-fs mount:

* ``write1m``/``read1m``: fio, 1 MiB sequential O_DIRECT writes / reads;
* ``randread4k_qd1``: fio, 4 KiB random O_DIRECT reads, one in flight;
* ``randread4k_qd16``: the same with libaio and 16 in flight;
* ``meta``: python3 creating and unlinking files (open(O_CREAT), close, unlink).

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
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from shardfs.bench.common import REPO, cpu_seconds, find_virtiofsd, version_of

#: Seconds each fio phase runs.
FIO_SECONDS = 5
META_FILES = 1000

FIO = ("fio --name={name} --filename=/mnt/fio.dat --size=128M --bs={bs} --rw={rw} "
       "--direct=1 --ioengine={engine} --iodepth={depth} --runtime={secs} --time_based "
       "--output-format=json --output=$CTL/fio-{name}.json")

META = r"""
import os, sys, time
d = "/mnt/meta"
os.makedirs(d, exist_ok=True)
n = int(sys.argv[1])
t = time.monotonic()
for i in range(n):
    p = f"{d}/f{i}"
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    os.unlink(p)
print(n / (time.monotonic() - t))
"""

PHASES = [
    ("write1m", FIO.format(name="write1m", bs="1M", rw="write", engine="psync", depth=1,
                           secs=FIO_SECONDS)),
    ("read1m", FIO.format(name="read1m", bs="1M", rw="read", engine="psync", depth=1,
                          secs=FIO_SECONDS)),
    ("randread4k_qd1", FIO.format(name="randread4k_qd1", bs="4k", rw="randread",
                                  engine="psync", depth=1, secs=FIO_SECONDS)),
    ("randread4k_qd16", FIO.format(name="randread4k_qd16", bs="4k", rw="randread",
                                   engine="libaio", depth=16, secs=FIO_SECONDS)),
    ("meta", f"python3 $CTL/meta.py {META_FILES} > $CTL/meta.out"),
]


def guest_script(phases: list[str]) -> str:
    lines = ["set -e", "mount -t virtiofs shardfs /mnt",
             # fio lays its file out first; do it outside the measured phases
             "fio --name=prep --filename=/mnt/fio.dat --size=128M --bs=1M --rw=write "
             "--ioengine=psync --output=/dev/null"]
    for k, (name, cmd) in enumerate(PHASES):
        if name in phases:
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
        if name == "meta":
            text = (ctl / "meta.out").read_text().strip() if (ctl / "meta.out").exists() else ""
            ops = META_FILES
            row.update(rate=float(text) if text else None, unit="pairs/s")
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


def main(args: argparse.Namespace, rest: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench --guest")
    p.add_argument("--guest-queues", default="1", help="shardfs request queue counts")
    p.add_argument("--guest-vcpus", type=int, default=0, help="default: the queue count")
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
    runs: list[tuple[str, int]] = [("shardfs", int(q)) for q in opts.guest_queues.split(",")]
    if peer:
        runs.append(("virtiofsd", 1))
    results = []
    with tempfile.TemporaryDirectory(prefix="shardfs-guest-bench-", dir=args.dir) as tmp_s:
        tmp = Path(tmp_s)
        for backend, queues in runs:
            work = tmp / f"{backend}-{queues}q"
            shared = work / "shared"
            shared.mkdir(parents=True)
            sock = work / "vfs.sock"
            print(f"guest: {backend} {queues}q", file=sys.stderr, flush=True)
            if backend == "shardfs":
                extra = [] if args.hardened else ["--sandbox", "none", "--seccomp", "none"]
                daemon = G.ShardfsDaemon(socket_path=sock, shared_dir=shared,
                                         log_path=work / "daemon.log", tag="shardfs",
                                         num_request_queues=queues, log_level="warning",
                                         extra_args=[*extra, "--poll-us", str(args.poll_us)])
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
                                  image=image, num_request_queues=queues,
                                  vcpus=opts.guest_vcpus or queues, mem="1G", timeout_s=600)
            finally:
                sampler.done.set()
                sampler.join()
                stop()
            if res.exit_code != 0:
                print(res.describe(), file=sys.stderr)
                return 1
            for row in phase_figures(ctl, sampler.marks, phases):
                row.update(backend=backend, queues=queues)
                results.append(row)
    print(f"\n{'phase':<16} {'backend':<13} {'rate':>10} {'unit':<8} {'backend cpu us/op':>17}")
    for r in results:
        rate = f"{r['rate']:,.0f}" if r.get("rate") is not None else "-"
        cpu = f"{r['cpu_us_per_op']:.1f}" if "cpu_us_per_op" in r else "-"
        print(f"{r['phase']:<16} {r['backend'] + ' ' + str(r['queues']) + 'q':<13} {rate:>10} "
              f"{r['unit']:<8} {cpu:>17}")
    print(f"guest: Linux under QEMU ({os.environ.get('SHARDFS_GUEST_ACCEL', 'tcg')}); the guest,"
          " not the backend, sets the pace under TCG")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-guest.json").write_text(json.dumps(
        {"virtiofsd": version_of(peer) if peer else None, "results": results}, indent=1))
    print(f"wrote {out / 'bench-guest.json'}")
    return 0
