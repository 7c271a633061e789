"""Per-queue counters through `shardfs stats`, while the daemon runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from shardfs.testing.frontend import FuseClient
from tests.frontend.conftest import REPO, Daemon


def _stats(d: Daemon, fmt: str = "json") -> str:
    out = subprocess.run([sys.executable, "-m", "shardfs", "stats", "--socket-path", d.socket,
                          "--format", fmt], capture_output=True, text=True, cwd=REPO,
                         check=True)
    return out.stdout


def test_stats_show_every_queue_carrying_load(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "--poll-us", "200", queues=2)
    try:
        fe = d.frontend().start()
        q1, q2 = FuseClient(fe, queue=1), FuseClient(fe, queue=2)
        q1.init()
        for _ in range(3):
            q1.getattr(1)
        e, fh = q2.create(1, b"f")
        q2.write(e[0], fh, 0, b"x" * 1000)
        assert q2.read(e[0], fh, 0, 1000) == b"x" * 1000
        q2.call(6, 1, b"../bad\0target\0")  # SYMLINK with a hostile name: an error
        snap = json.loads(_stats(d))
        queues = {q["queue"]: q for q in snap["queues"]}
        assert queues[1]["requests"] == 4  # INIT + 3 GETATTR
        assert queues[2]["requests"] == 4
        assert queues[2]["errors"] == 1
        assert queues[2]["bytes_written"] == 1000 and queues[2]["bytes_read"] == 1000
        assert sum(queues[2]["latency_hist_us"]) == 4
        assert queues[1]["kicks"] >= 1 and queues[1]["notifications"] >= 1
        names = sorted(p["name"] for p in snap["processes"])
        assert names == ["supervisor", "worker-0", "worker-1"]  # no DAX window: no coordinator
        assert all(p["open_fds"] > 0 and p["rss_bytes"] > 0 for p in snap["processes"])

        prom = _stats(d, "prometheus")
        assert 'shardfs_queue_requests_total{queue="2",kind="request"} 4' in prom
        assert "shardfs_worker_restarts_total 0" in prom
        text = _stats(d, "text")
        assert "worker restarts: 0" in text
        assert [line.split()[1] for line in text.splitlines()[2:5]] == [
            "hiprio", "request", "request"]

        # Counters live in shared memory: they outlive a worker.
        pid = next(p["pid"] for p in snap["processes"] if p["name"] == "worker-1")
        os.kill(pid, signal.SIGKILL)
        assert q2.getattr(1)
        after = json.loads(_stats(d))
        assert after["worker_restarts"] == 1
        assert {q["queue"]: q for q in after["queues"]}[2]["requests"] == 5
        fe.close()
    finally:
        assert d.stop() == 0
    assert not os.path.exists(d.socket + ".stats")


def test_stats_without_a_daemon_is_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "shardfs", "stats", "--stats-socket",
                          str(tmp_path / "none")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "none" in out.stderr


def test_a_daemon_given_only_an_fd_still_has_a_stats_socket(tmp_path: Path) -> None:
    """libvirt and Kata hand shardfs a listening fd and no path: the status socket is
    then at the documented per-pid path, and ``shardfs stats --pid`` finds it."""
    import socket
    import time

    from shardfs.config import default_stats_socket
    from shardfs.testing.frontend import Frontend

    path = str(tmp_path / "launcher.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    shared = tmp_path / "shared"
    shared.mkdir()
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "shardfs", f"--fd={fd}", "--shared-dir",
                             str(shared), "--sandbox", "none"], pass_fds=[fd], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    listener.close()
    stats_path = default_stats_socket(proc.pid)
    try:
        deadline = time.monotonic() + 60
        while "serving" not in (tmp_path / "daemon.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "daemon.log").read_text()
            time.sleep(0.02)
        assert os.path.exists(stats_path)
        assert os.stat(os.path.dirname(stats_path)).st_mode & 0o077 == 0
        with Frontend(path) as fe:
            fe.start()
            FuseClient(fe).init()
            out = subprocess.run([sys.executable, "-m", "shardfs", "stats", "--pid",
                                  str(proc.pid), "--format", "json"], capture_output=True,
                                 text=True, cwd=REPO, check=True)
            snap = json.loads(out.stdout)
            assert {q["queue"]: q for q in snap["queues"]}[1]["requests"] == 1  # INIT
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
        log.close()
    assert not os.path.exists(stats_path)
