"""The two daemons the benchmarks drive, each with a frontend and a FUSE session.

Shared by the frontend bench (:mod:`shardfs.bench.run`) and the idle-memory
measurement (:mod:`shardfs.bench.memory`), which is why it is a module of its
own: each of those used to reach into the other.  shardfs is started as
``scripts/shardfs`` starts it (``-OO``), so what is measured is what users run.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from shardfs.bench.common import cpu_seconds
from shardfs.testing import process
from shardfs.testing.frontend import Frontend, FuseClient

QUEUE_SIZE = 1024
MEM_BYTES = 1 << 30


# -- the two daemons ------------------------------------------------------------------

class Daemon:
    """A backend process with a connected frontend and a FUSE session."""

    name = "?"

    def __init__(self, tmp: Path, label: str, queues: int, cmd: list[str]) -> None:
        self.label = label
        self.queues = queues
        self.shared = tmp / f"{label}-shared"
        self.shared.mkdir(exist_ok=True)
        self.socket = str(tmp / f"{label}.sock")
        self.cmd = [c.format(socket=self.socket, shared=self.shared) for c in cmd]
        self.log_path = tmp / f"{label}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{label} did not start: {shlex.join(self.cmd)}\n"
                                   + self.log_path.read_text()[-2000:])
            time.sleep(0.01)
        time.sleep(0.05)  # the socket exists a moment before it listens
        self.fe = Frontend(self.socket, num_queues=1 + queues, queue_size=QUEUE_SIZE,
                           mem_size=MEM_BYTES).start()
        self.client = FuseClient(self.fe)
        self.client.init()

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if getattr(self, "fe", None) is not None:
            self.fe.close()
            self.fe = None  # type: ignore[assignment]
        process.stop(self.proc)
        self.log.close()


def shardfs_cmd(queues: int, poll_us: int, hardened: bool, extra: str) -> list[str]:
    # -OO as scripts/shardfs runs the daemon (no docstrings in memory).
    cmd = [sys.executable, "-OO", "-m", "shardfs", "--socket-path", "{socket}", "--shared-dir",
           "{shared}", "--num-request-queues", str(queues), "--poll-us", str(poll_us),
           "--log-level", "warning", "--once"]
    if not hardened:
        cmd += ["--sandbox", "none", "--seccomp", "none"]
    return cmd + shlex.split(extra)


def virtiofsd_cmd(binary: str, hardened: bool, extra: str) -> list[str]:
    cmd = [binary, "--socket-path", "{socket}", "--shared-dir", "{shared}", "--log-level",
           "warn"]
    if not hardened:
        cmd += ["--sandbox", "none", "--seccomp", "none"]
    return cmd + shlex.split(extra)


class ShardfsDaemon(Daemon):
    name = "shardfs"


class VirtiofsdDaemon(Daemon):
    name = "virtiofsd"
