"""The benchmark machinery: CPU accounting, the load generator, workloads, report, chart.

Nothing here measures speed or depends on timing: the load generator is
run against the real daemon for a handful of operations and checked for
correctness only (every request answered, no error, nothing left behind).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shardfs.abi import fuse as F
from shardfs.bench import common, daemons
from shardfs.bench import run as bench
from shardfs.bench.loadgen import IN_ARGS_OFFSET, IN_NODEID_OFFSET, LAYOUTS, OUT_HDR, Chain
from shardfs.bench.workloads import (
    READ_IN_OFFSET,
    WORKLOADS,
    create_advance,
    readdirplus_advance,
)
from shardfs.testing.frontend import FuseClient

# -- CPU accounting ---------------------------------------------------------------


def test_cpu_seconds_counts_every_thread() -> None:
    spent = []
    go_on = threading.Event()

    def burn() -> None:
        x = 0
        for i in range(300_000):
            x += i * i
        spent.append(time.thread_time())
        go_on.wait()  # stay alive: a live thread's time must be counted

    t = threading.Thread(target=burn)
    t.start()
    try:
        while not spent:
            time.sleep(0.001)
        assert common.cpu_seconds(os.getpid()) >= spent[0] + time.thread_time() * 0.99
    finally:
        go_on.set()
        t.join()


def test_process_tree_finds_grandchildren() -> None:
    child = subprocess.Popen([sys.executable, "-c",
                              "import subprocess, sys; p = subprocess.Popen(['sleep', '60']);"
                              " print(p.pid, flush=True); sys.stdin.read(); p.kill()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        tree = common.process_tree(os.getpid())
        assert child.pid in tree and grandchild in tree
        assert common.cpu_seconds(child.pid) >= 0
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()


def test_cpu_seconds_of_a_dead_process_is_zero() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    assert common.cpu_seconds(p.pid) == 0.0


# -- request patching -------------------------------------------------------------

def test_create_advance_copies_nodeid_and_fh() -> None:
    mem = memoryview(bytearray(4096))
    create, release, forget, unlink = (Chain(0, 0, 1024), Chain(1, 256, -1),
                                       Chain(2, 512, -1), Chain(3, 768, -1))
    steps = [[create], [release, forget, unlink]]
    struct.pack_into("<Q", mem, 1024 + OUT_HDR, 77)  # entry.nodeid
    struct.pack_into("<Q", mem, 1024 + OUT_HDR + F.fuse_entry_out.size, 5)  # open_out.fh
    assert create_advance(mem, steps, 0, 0, 160) == (1, False)
    assert struct.unpack_from("<Q", mem, 256 + IN_NODEID_OFFSET)[0] == 77
    assert struct.unpack_from("<Q", mem, 256 + IN_ARGS_OFFSET)[0] == 5
    assert struct.unpack_from("<Q", mem, 512 + IN_NODEID_OFFSET)[0] == 77
    assert create_advance(mem, steps, 0, 1, 16) == (0, True)


def test_readdirplus_advance_resumes_at_the_last_cookie() -> None:
    mem = memoryview(bytearray(8192))
    c = Chain(0, 0, 1024)
    reply = bytearray()
    for cookie, name in ((11, b"a"), (22, b"bbbbbbbbbb"), (33, b"c")):
        rec = bytes(F.fuse_entry_out.size) + F.fuse_dirent.pack(1, cookie, len(name), 8) + name
        reply += rec + bytes(F.fuse_rec_align(len(rec)) - len(rec))
    mem[1024 + OUT_HDR:1024 + OUT_HDR + len(reply)] = reply
    assert readdirplus_advance(mem, [[c]], 0, 0, OUT_HDR + len(reply)) == (0, False)
    assert struct.unpack_from("<Q", mem, READ_IN_OFFSET)[0] == 33
    # The end of the directory: one listing done, the next starts at 0.
    assert readdirplus_advance(mem, [[c]], 0, 0, OUT_HDR) == (0, True)
    assert struct.unpack_from("<Q", mem, READ_IN_OFFSET)[0] == 0


# -- the load generator against the real daemon --------------------------------------

def _every_workload_runs_clean(d: daemons.Daemon, layout: str) -> None:
    """Run each workload briefly on ``d``; raise on any failed request."""
    try:
        for w in WORKLOADS.values():
            if layout != "compact" and w.name in ("readdirplus", "read4k_qd1"):
                continue  # nothing a layout changes that the others do not cover
            p = bench.Prepared(d, w, 4, 4096, layout, dir_entries=300)
            try:
                s = p.run(1 if w.name == "readdirplus" else 8)  # raises on any error
            finally:
                p.release()
            assert s.rate > 0 and s.cpu_us >= 0
        # CREATE pairs leave nothing behind: every file unlinked, every handle released.
        assert not [f for f in os.listdir(d.shared) if f.startswith("create-")]
        # The frontend's rings are still in step with the daemon's.
        assert FuseClient(d.fe, d.queues).getattr(1)[0] >= 0
    finally:
        d.stop()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_workload_runs_clean_on_two_queues(tmp_path: Path, layout: str) -> None:
    d = daemons.ShardfsDaemon(tmp_path, "shardfs", 2, daemons.shardfs_cmd(2, 50, False, ""))
    _every_workload_runs_clean(d, layout)
    assert "Traceback" not in d.log_path.read_text()


def test_every_workload_runs_clean_against_virtiofsd(tmp_path: Path) -> None:
    """The same pre-built requests, served by the real peer: the comparison
    is only fair if virtiofsd answers every one of them without an error."""
    peer = common.find_virtiofsd(None)
    if peer is None:
        if os.environ.get("SHARDFS_REQUIRE_PEER") == "1":
            pytest.fail("virtiofsd is missing: run scripts/get-virtiofsd")
        pytest.skip("virtiofsd is missing (scripts/get-virtiofsd fetches it)")
    _every_workload_runs_clean(daemons.Daemon(tmp_path, "virtiofsd", 1,
                                              daemons.virtiofsd_cmd(peer, False, "")),
                               "compact")


# -- report and chart ----------------------------------------------------------------

def _series() -> tuple[list[bench.Series], dict[tuple[str, int], list[float]]]:
    out = []
    for backend, q, rate in (("shardfs", 1, 50.0), ("virtiofsd", 1, 100.0),
                             ("shardfs", 2, 120.0), ("virtiofsd", 1, 80.0)):
        s = bench.Series("getattr", "ops/s", backend, q)
        s.samples = [bench.Sample(rate, 2.0, 0.5, 1.0), bench.Sample(rate * 1.1, 2.0, 0.95, 1.0)]
        out.append(s)
    return out, {("getattr", 1): [0.5, 0.5], ("getattr", 2): [1.5, 1.5]}


def test_report_pairs_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    series, ratios = _series()
    meta = {"cpus": 2, "cpu_model": "x", "load_before": "0", "shardfs_rev": "r",
            "virtiofsd": "virtiofsd 1.13.2", "poll_us": 50, "depth": 32}
    report = bench.build_report(series, ratios, meta, ["getattr"])
    rows = report["rows"]
    assert [(r["backend"], r["queues"]) for r in rows] == [("virtiofsd", 1), ("shardfs", 1),
                                                          ("shardfs", 2)]
    assert len(rows[0]["runs"]) == 4  # virtiofsd's runs from both configurations
    assert {(r["queues"], r["median"]) for r in report["ratios"]} == {(1, 0.5), (2, 1.5)}
    bench.print_table(report)
    out = capsys.readouterr().out
    assert "virtiofsd 1q" in out and "1.50 (1.50-1.50)" in out


def test_chart_renders_headless(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib (the bench extra)")
    from shardfs.bench.chart import render

    series, ratios = _series()
    meta = {"cpus": 2, "cpu_model": "x", "load_before": "0", "shardfs_rev": "r",
            "virtiofsd": None, "poll_us": 50, "depth": 32}
    for r in (ratios, {}):  # with and without the peer
        report = bench.build_report([s for s in series if r or s.backend == "shardfs"], r,
                                    meta, ["getattr"])
        render(report, tmp_path / "chart.png")
        assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_peer_is_none() -> None:
    assert common.find_virtiofsd(str(Path("/nonexistent/virtiofsd"))) is None


def test_hotpath_harness_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from shardfs.bench import hotpath as bench_hotpath

    for layout in LAYOUTS:
        assert bench_hotpath.main(["--requests", "64", "--runs", "1", "--batch", "4",
                                   "--layout", layout]) == 0
    out = capsys.readouterr().out
    assert out.count("us/request") == 2 * 6


# -- targets, memory, Amdahl, guest summary ----------------------------------------------

def test_targets_are_printed_with_their_verdicts(capsys: pytest.CaptureFixture[str]) -> None:
    series, ratios = _series()
    meta = {"cpus": 2, "cpu_model": "x", "load_before": "0"}
    report = bench.build_report(series, ratios, meta, ["getattr"],
                                {("getattr", 1): [2.0, 4.0, 5.0], ("getattr", 2): [9.0]})
    bench.print_targets(report)
    out = capsys.readouterr().out
    assert "getattr     backend CPU per unit  4.00x (2.00-5.00)  target <= 3.00x: MISSED" in out
    assert report["targets"] == [{"workload": "getattr", "kind": "cpu", "target": 3.0,
                                  "median": 4.0, "min": 2.0, "max": 5.0, "met": False}]


def test_pss_of_this_process_tree() -> None:
    from shardfs.bench import memory
    me = memory.process_memory(os.getpid())
    assert me is not None and me.pss_bytes > 0 and me.rss_bytes >= me.private_bytes
    assert memory.process_memory(2**22 + 12345) is None  # no such pid
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pids = {m.pid for m in memory.tree_memory(os.getpid())}
        assert {os.getpid(), child.pid} <= pids
    finally:
        child.kill()
        child.wait()


def test_memory_summary_and_its_targets(capsys: pytest.CaptureFixture[str]) -> None:
    from shardfs.bench import memory
    mb = 1_000_000
    one = [memory.ProcessMemory(1, "shardfs", 8 * mb, 3 * mb, 9 * mb),
           memory.ProcessMemory(2, "shardfs-w0", 8 * mb, 3 * mb, 9 * mb)]
    four = one + [memory.ProcessMemory(3 + k, f"shardfs-w{k + 1}", 2 * mb, 2 * mb, 9 * mb)
                  for k in range(3)]
    summary = memory.summarize({1: one, 4: four})
    assert summary["pss_total_bytes"] == {"1": 16 * mb, "4": 22 * mb}
    assert summary["pss_per_further_queue_bytes"] == 2 * mb
    memory.print_memory(summary)
    out = capsys.readouterr().out
    assert "1 queue(s):  16.0 MB PSS" in out and "target <= 18 MB: met" in out
    assert "each further queue: 2.0 MB PSS  target <= 3 MB: met" in out


def test_amdahl_bound_and_a_small_measurement(capsys: pytest.CaptureFixture[str]) -> None:
    from shardfs.bench import amdahl
    assert amdahl.bound(0.0, 8) == 8.0 and amdahl.bound(1.0, 8) == 1.0
    assert abs(amdahl.bound(0.1, 2) - 1 / 0.55) < 1e-9
    rep = amdahl.report(amdahl.measure(requests=64))
    assert [r["workload"] for r in rep["rows"]] == ["getattr", "lookup", "read4k", "write4k",
                                                    "create"]
    for r in rep["rows"]:
        assert 0.0 <= r["serial"] <= 1.0
        assert all(1.0 <= r["bound"][str(n)] <= n for n in amdahl.QUEUES)
    amdahl.print_report(rep)
    assert "N=16" in capsys.readouterr().out
    # The probe is gone afterwards: the classes are as they were.
    from shardfs.fs.passthrough import shared
    from shardfs.fs.passthrough.fhandle import RobustMutex
    assert RobustMutex.__enter__.__qualname__ == "RobustMutex.__enter__"
    assert shared.replay_log.__qualname__ == "replay_log"


def test_guest_summary_medians_ratios_and_targets(capsys: pytest.CaptureFixture[str]) -> None:
    from shardfs.bench import guest
    rows = []
    for run, (a, b, c) in enumerate([(90, 100, 95), (80, 120, 85), (100, 110, 70)]):
        rows += [{"phase": "stat", "rate": a, "cpu_us_per_op": 10.0, "backend": "shardfs",
                  "queues": 1, "run": run},
                 {"phase": "stat", "rate": c, "cpu_us_per_op": 12.0, "backend": "shardfs",
                  "queues": 2, "run": run},
                 {"phase": "stat", "rate": b, "cpu_us_per_op": 5.0, "backend": "virtiofsd",
                  "queues": 1, "run": run}]
    (s,) = guest.summarize(rows, ["stat"])
    assert s["backends"]["shardfs 1q"] == {"median": 90, "min": 80, "max": 100, "runs": 3,
                                           "cpu_us_per_op": 10.0}
    assert s["x_1q"] == 90 / 110 and not s["met_1q"]
    assert s["x_2q_over_1q"] == 85 / 90 and not s["met_2q"]
    guest.print_summary([s])
    assert "0.82!" in capsys.readouterr().out
    script = guest.guest_script(["create", "stat"])
    assert "meta.py create 1000 $CTL" in script and "meta.py stat 1000 $CTL" in script


def test_guest_bench_runs_shardfs_with_virtiofsds_xattr_default(tmp_path: Path) -> None:
    """The e2e harness turns xattrs on for its tests; the guest bench compares
    against virtiofsd's defaults (xattrs off), so its command line must end
    with them off, parsed by shardfs's own parser."""
    import argparse

    from shardfs.bench.guest import shardfs_extra_args
    from shardfs.compat.parse import parse_command_line
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
    try:
        import guest as G  # tests/e2e/guest.py: the harness boot_once uses
    finally:
        sys.path.pop(0)
    for hardened in (False, True):
        args = argparse.Namespace(hardened=hardened, poll_us=50)
        daemon = G.ShardfsDaemon(socket_path=tmp_path / "s", shared_dir=tmp_path / "d",
                                 log_path=tmp_path / "log", extra_args=shardfs_extra_args(args))
        assert "--xattr" in daemon.command  # the harness's own default...
        cmd = daemon.command[daemon.command.index("shardfs") + 1:]
        assert parse_command_line(cmd).overrides["xattr"] is False  # ...overridden
