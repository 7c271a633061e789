"""shardfs side by side with virtiofsd, through the in-repo frontend: ``scripts/bench``.

Both backends are driven the same way: the in-repo vhost-user frontend shares
memfd RAM with the daemon, pre-builds every request once
(:mod:`shardfs.bench.loadgen`, :mod:`shardfs.bench.workloads`) and
then only republishes heads, so what is measured is the backend's work.
virtiofsd serves its one request queue; shardfs is measured with each count
of ``--queues``, one driver process per queue.

For every workload and configuration the runs alternate between the two
daemons (shardfs first on even runs, virtiofsd first on odd ones), and each
shardfs run is divided by the virtiofsd run next to it: the ratio is the
median of those pairs, with their min and max.  Each rate is reported as the
median, min and max of the runs, beside the backend's CPU per unit (all
threads of all its processes, from /proc) and how busy the frontend's
drivers were (near 100% means the frontend, not the backend, set the pace).

    scripts/get-virtiofsd                 # once, as root: fetch the peer
    scripts/bench                         # every workload, shardfs 1, 2 and 4 queues
    scripts/bench --queues 1 --workloads getattr,read4k --runs 3
    scripts/bench --guest                 # fio and a metadata loop in a QEMU guest
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shardfs.bench import amdahl, memory
from shardfs.bench.common import PEER, REPO, find_virtiofsd, version_of
from shardfs.bench.daemons import (
    Daemon,
    ShardfsDaemon,
    VirtiofsdDaemon,
    shardfs_cmd,
    virtiofsd_cmd,
)
from shardfs.bench.loadgen import LAYOUTS, Plan, prebuild, run_parallel
from shardfs.bench.workloads import DIR_ENTRIES, WORKLOADS, Target, Workload

#: A driver process busier than this is taken to be the bottleneck.
FRONTEND_BOUND = 0.9


# -- measuring ------------------------------------------------------------------------

@dataclass
class Sample:
    rate: float  # units per second
    cpu_us: float  # backend CPU microseconds per unit
    frontend_busy: float  # the busiest driver's CPU / wall time
    seconds: float


@dataclass
class Series:
    workload: str
    unit: str
    backend: str
    queues: int
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        rates = [s.rate for s in self.samples]
        return {"workload": self.workload, "unit": self.unit, "backend": self.backend,
                "queues": self.queues, "median": statistics.median(rates), "min": min(rates),
                "max": max(rates),
                "cpu_us_per_unit": statistics.median(s.cpu_us for s in self.samples),
                "frontend_busy": statistics.median(s.frontend_busy for s in self.samples),
                "runs": [asdict(s) for s in self.samples]}


class Prepared:
    """A workload laid out on one daemon's queues; :meth:`release` frees the RAM."""

    def __init__(self, d: Daemon, w: Workload, depth: int, readdir_bytes: int,
                 layout: str = "compact", dir_entries: int = DIR_ENTRIES) -> None:
        self.d, self.w = d, w
        self.mark = d.fe.ram.mark
        self.free = {i: list(q.free) for i, q in d.fe.queues.items()}
        target = Target(d.label, d.shared, d.client, readdir_bytes, dir_entries)
        self.plans: list[Plan] = []
        for queue in range(1, 1 + d.queues):
            slots, advance = w.build(target, queue, w.depth or depth)
            self.plans.append(prebuild(d.fe, queue, slots, advance, layout))

    def run(self, ops: int) -> Sample:
        c0 = self.d.cpu()
        res = run_parallel(self.d.fe, self.plans, ops)
        c1 = self.d.cpu()
        errors = sum(r.errors for r in res)
        if errors:
            raise RuntimeError(f"{self.d.label} {self.w.name}: {errors} requests failed "
                               f"(log: {self.d.log_path})")
        wall = max(r.seconds for r in res)
        units = ops * len(self.plans) * self.w.per_op
        return Sample(units / wall, (c1 - c0) / units * 1e6,
                      max(r.cpu_s / r.seconds for r in res), wall)

    def release(self) -> None:
        self.d.fe.ram.reset_alloc(self.mark)
        for i, free in self.free.items():
            self.d.fe.queues[i].free = free


def compare(shardfs: Daemon, peer: Daemon | None, w: Workload, args: argparse.Namespace,
            ) -> tuple[Series, Series | None, list[float], list[float]]:
    """Alternate runs of ``w`` on both daemons; the shardfs/peer ratios pair by pair:
    of the rates, and of the backend CPU per unit."""
    ops = args.ops or w.ops
    if w.depth is None and w.unit == "ops/s" and ops < args.depth:
        ops = args.depth
    mine = Series(w.name, w.unit, "shardfs", shardfs.queues)
    theirs = Series(w.name, w.unit, "virtiofsd", 1) if peer else None
    prepared = [Prepared(shardfs, w, args.depth, args.readdir_bytes, args.layout)]
    if peer is not None:
        prepared.append(Prepared(peer, w, args.depth, args.readdir_bytes, args.layout))
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    try:
        for p in prepared:  # warm up: page cache, node tables, code paths
            p.run(max(1, ops // 10))
        for i in range(args.runs):
            order = prepared if i % 2 == 0 else prepared[::-1]
            got = {p.d.name: p.run(ops) for p in order}
            mine.samples.append(got["shardfs"])
            if theirs is not None:
                theirs.samples.append(got["virtiofsd"])
                ratios.append(got["shardfs"].rate / got["virtiofsd"].rate)
                if got["virtiofsd"].cpu_us > 0:
                    cpu_ratios.append(got["shardfs"].cpu_us / got["virtiofsd"].cpu_us)
    finally:
        for p in prepared:
            p.release()
    return mine, theirs, ratios, cpu_ratios


# -- reporting ------------------------------------------------------------------------

def fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def print_table(report: dict[str, Any]) -> None:
    rows = report["rows"]
    ratios = {(r["workload"], r["queues"]): r for r in report["ratios"]}
    print(f"\n{'workload':<12} {'unit':<9} {'backend':<13} {'median':>10} {'min':>10} "
          f"{'max':>10} {'cpu us/unit':>11} {'fe busy':>7}  {'x virtiofsd (min-max)':<22}")
    for w in report["workloads"]:
        for r in [x for x in rows if x["workload"] == w]:
            label = (f"shardfs {r['queues']}q" if r["backend"] == "shardfs"
                     else "virtiofsd 1q")
            ratio = ""
            rr = ratios.get((w, r["queues"])) if r["backend"] == "shardfs" else None
            if rr:
                ratio = f"{rr['median']:.2f} ({rr['min']:.2f}-{rr['max']:.2f})"
            busy = f"{r['frontend_busy'] * 100:.0f}%"
            if r["frontend_busy"] >= FRONTEND_BOUND:
                busy += "*"
            print(f"{w:<12} {r['unit']:<9} {label:<13} {fmt(r['median']):>10} "
                  f"{fmt(r['min']):>10} {fmt(r['max']):>10} {r['cpu_us_per_unit']:>11.2f} "
                  f"{busy:>7}  {ratio:<22}")
    print("\ncpu us/unit: backend CPU (all threads, all processes) per op, per MB or per "
          "directory entry.\nfe busy: the busiest frontend driver's CPU share; * = the "
          "frontend, not the backend, set the pace.")
    m = report["meta"]
    print(f"machine: {m['cpus']} CPUs ({m['cpu_model']}), load before {m['load_before']}; "
          f"the frontend's drivers share the CPUs with the daemons")


#: The issue's targets, 1 queue against virtiofsd: (workload, measure, bound, kind).
#: ``cpu``: backend CPU per unit, shardfs / virtiofsd, at most ``bound``;
#: ``rate``: throughput, shardfs / virtiofsd, at least ``bound``.
TARGETS = [
    ("getattr", "cpu", 3.0), ("lookup", "cpu", 3.0), ("read4k", "cpu", 3.0),
    ("write4k", "cpu", 3.0), ("read1m", "cpu", 1.25), ("write1m", "cpu", 1.25),
    ("read4k_qd1", "rate", 1.0),
]


def target_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured ratio (median of the pairs, min, max) and verdict."""
    rows = []
    tables = {"cpu": {(r["workload"], r["queues"]): r for r in report.get("cpu_ratios", [])},
              "rate": {(r["workload"], r["queues"]): r for r in report["ratios"]}}
    for w, kind, limit in TARGETS:
        got = tables[kind].get((w, 1))
        if got is None:
            continue
        met = got["median"] <= limit if kind == "cpu" else got["median"] >= limit
        rows.append({"workload": w, "kind": kind, "target": limit, "median": got["median"],
                     "min": got["min"], "max": got["max"], "met": met})
    return rows


def print_targets(report: dict[str, Any]) -> None:
    rows = target_rows(report)
    report["targets"] = rows
    if not rows:
        return
    print("\ntargets (1 queue, shardfs / virtiofsd, median of the pairs (min-max)):")
    for r in rows:
        what = ("backend CPU per unit" if r["kind"] == "cpu" else "rate")
        op = "<=" if r["kind"] == "cpu" else ">="
        print(f"  {r['workload']:<11} {what:<20} {r['median']:5.2f}x "
              f"({r['min']:.2f}-{r['max']:.2f})  target {op} {r['target']:.2f}x: "
              f"{'met' if r['met'] else 'MISSED'}")


def build_report(series: list[Series], ratios: dict[tuple[str, int], list[float]],
                 meta: dict[str, Any], workloads: list[str],
                 cpu_ratios: dict[tuple[str, int], list[float]] | None = None,
                 ) -> dict[str, Any]:
    rows = []
    peer: dict[str, Series] = {}
    for s in series:
        if s.backend == "virtiofsd":  # one row per workload, from every paired run
            peer.setdefault(s.workload, Series(s.workload, s.unit, s.backend, 1)).samples += \
                s.samples
        else:
            rows.append(s.summary())
    rows = [p.summary() for p in peer.values()] + rows
    rows.sort(key=lambda r: (workloads.index(r["workload"]), r["backend"] == "shardfs",
                             r["queues"]))
    return {"meta": meta, "workloads": workloads, "rows": rows,
            "ratios": [{"workload": w, "queues": q, "median": statistics.median(v),
                        "min": min(v), "max": max(v), "pairs": v}
                       for (w, q), v in ratios.items() if v],
            "cpu_ratios": [{"workload": w, "queues": q, "median": statistics.median(v),
                            "min": min(v), "max": max(v), "pairs": v}
                           for (w, q), v in (cpu_ratios or {}).items() if v]}


def meta_info(args: argparse.Namespace, peer: str | None) -> dict[str, Any]:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        rev = "?"
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "shardfs_rev": rev,
            "virtiofsd": version_of(peer) if peer else None,
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "poll_us": args.poll_us, "depth": args.depth, "runs": args.runs,
            "hardened": args.hardened, "readdir_bytes": args.readdir_bytes,
            "layout": args.layout, "dir": args.dir or tempfile.gettempdir(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queues", default="1,2,4", help="shardfs request queue counts")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, from: {', '.join(WORKLOADS)}")
    p.add_argument("--runs", type=int, default=5, help="measured runs per workload")
    p.add_argument("--ops", type=int, default=0,
                   help="operations per queue per run (default: per workload)")
    p.add_argument("--depth", type=int, default=32, help="requests in flight per queue")
    p.add_argument("--poll-us", type=int, default=50, help="shardfs adaptive polling")
    p.add_argument("--layout", choices=LAYOUTS, default="compact",
                   help="descriptor layout: compact, or linux (as the guest driver: "
                   "headers, arguments and each 4 KiB page apart, in indirect tables)")
    p.add_argument("--readdir-bytes", type=int, default=4096,
                   help="READDIRPLUS buffer (a 6.12 guest asks for one page)")
    p.add_argument("--virtiofsd", metavar="PATH", help="the peer binary (default: .peer/)")
    p.add_argument("--no-virtiofsd", action="store_true", help="measure shardfs alone")
    p.add_argument("--virtiofsd-args", default="", help="extra virtiofsd arguments")
    p.add_argument("--shardfs-args", default="", help="extra shardfs arguments")
    p.add_argument("--hardened", action="store_true",
                   help="both daemons with their default sandbox and seccomp (default: none)")
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where the shared directories go (default: /dev/shm, a tmpfs, so "
                   "that other disk traffic does not disturb the figures)")
    p.add_argument("--out", default=str(REPO / "bench-out"),
                   help="directory for bench.json and bench.png")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the idle daemons' PSS (shardfs.bench.memory)")
    p.add_argument("--no-amdahl", action="store_true",
                   help="skip the shared-table lock and log replay shares (shardfs.bench.amdahl)")
    p.add_argument("--guest", action="store_true",
                   help="run fio and a metadata loop in a QEMU guest instead")
    args, rest = p.parse_known_args(argv)
    if args.guest:
        from shardfs.bench.guest import main as guest_main
        return guest_main(args, rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    workloads = args.workloads.split(",")
    for w in workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}")
    peer = None if args.no_virtiofsd else find_virtiofsd(args.virtiofsd)
    if peer is None and not args.no_virtiofsd:
        print(f"*** virtiofsd not found (looked for {args.virtiofsd or PEER}): run "
              "scripts/get-virtiofsd as root to fetch it.\n*** Measuring shardfs ALONE: "
              "no comparison, no ratios.", file=sys.stderr)
    elif peer:
        print(f"peer: {peer} ({version_of(peer)})", file=sys.stderr)
    meta = meta_info(args, peer)
    series: list[Series] = []
    ratios: dict[tuple[str, int], list[float]] = {}
    cpu_ratios: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="shardfs-bench-", dir=args.dir) as tmp_s:
        tmp = Path(tmp_s)
        vd = None
        try:
            if peer:
                vd = VirtiofsdDaemon(tmp, "virtiofsd", 1,
                                     virtiofsd_cmd(peer, args.hardened, args.virtiofsd_args))
            for queues in [int(x) for x in args.queues.split(",")]:
                sd = ShardfsDaemon(tmp, f"shardfs-{queues}q", queues,
                                   shardfs_cmd(queues, args.poll_us, args.hardened,
                                               args.shardfs_args))
                try:
                    for name in workloads:
                        print(f"{name}: shardfs {queues}q" + (" vs virtiofsd" if vd else ""),
                              file=sys.stderr, flush=True)
                        mine, theirs, r, c = compare(sd, vd, WORKLOADS[name], args)
                        series.append(mine)
                        if theirs is not None:
                            series.append(theirs)
                            ratios[(name, queues)] = r
                            cpu_ratios[(name, queues)] = c
                finally:
                    sd.stop()
        finally:
            if vd is not None:
                vd.stop()
    report = build_report(series, ratios, meta, workloads, cpu_ratios)
    print_table(report)
    print_targets(report)
    if not args.no_memory:
        with tempfile.TemporaryDirectory(prefix="shardfs-bench-mem-", dir=args.dir) as tmp_s:
            qs = sorted({1, *[int(x) for x in args.queues.split(",")]})
            report["memory"] = memory.summarize(memory.measure_idle(qs, Path(tmp_s)))
            if peer:
                report["memory"]["virtiofsd_pss_bytes"] = memory.measure_peer_idle(
                    Path(tmp_s), virtiofsd_cmd(peer, args.hardened, args.virtiofsd_args))
        memory.print_memory(report["memory"])
    if not args.no_amdahl:
        report["amdahl"] = amdahl.report(amdahl.measure())
        amdahl.print_report(report["amdahl"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'bench.json'}")
    try:
        from shardfs.bench.chart import render
    except ImportError as e:  # matplotlib missing
        print(f"no chart ({e}): pip install -e '.[bench]'", file=sys.stderr)
    else:
        render(report, out / "bench.png")
        print(f"wrote {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
