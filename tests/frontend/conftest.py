"""Fixtures: the real daemon as a subprocess, and frontends connected to it."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardfs.testing import process
from shardfs.testing.frontend import Frontend, FuseClient

REPO = Path(__file__).resolve().parents[2]


class Daemon:
    def __init__(self, tmp: Path, *extra: str, queues: int = 1,
                 tag: str | None = "shardfs") -> None:
        self.shared = tmp / "shared"
        self.shared.mkdir(exist_ok=True)
        self.socket = str(tmp / "vhost.sock")
        self.log_path = tmp / "daemon.log"
        self.queues = queues
        self.args = [sys.executable, "-m", "shardfs", "--socket-path", self.socket,
                     "--shared-dir", str(self.shared),
                     "--num-request-queues", str(queues), "--log-level", "debug",
                     # Most suites test xattrs; virtiofsd's default (off) is tested by
                     # name (test_virtiofsd_options), and extra flags come later and win.
                     "--xattr",
                     # Tests reconnect to one daemon; virtiofsd's default (exit when the
                     # frontend leaves) is tested in test_operations.
                     "--no-once", *extra]
        if tag is not None:
            self.args += ["--tag", tag]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=REPO)
        deadline = time.monotonic() + 30
        # The supervisor logs "serving" once every child has answered a ping.
        while "serving" not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start:\n{self.log_text()}")
            time.sleep(0.02)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def frontend(self, **kw: object) -> Frontend:
        kw.setdefault("num_queues", 1 + self.queues)
        return Frontend(self.socket, **kw)  # type: ignore[arg-type]

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                             text=True)
        return [int(p) for p in out.stdout.split()]

    def named_children(self) -> dict[str, int]:
        """comm -> pid of the live children (shardfs-w0, shardfs-coord, shardfs-locks...)."""
        out = {}
        for pid in self.children():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    out[f.read().strip()] = pid
            except FileNotFoundError:
                continue  # it exited since pgrep saw it
        return out

    def child(self, comm: str) -> int:
        """The pid of the child named ``comm``; KeyError if there is none."""
        return self.named_children()[comm]

    def stop(self) -> int | None:
        rc = process.stop(self.proc)
        self.log.close()
        return rc


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    yield d
    rc = d.stop()
    text = d.log_path.read_text()
    assert rc == 0, f"daemon exited with {rc}:\n{text}"
    assert "Traceback" not in text, text


_dirs = itertools.count(1)


@pytest.fixture
def here(daemon: Daemon, request: pytest.FixtureRequest) -> Path:
    """This test's own directory in the share (of the module's ``daemon``)."""
    p = daemon.shared / f"{request.node.originalname}_{next(_dirs)}"
    p.mkdir()
    return p


@pytest.fixture
def fuse(daemon: Daemon) -> Iterator[FuseClient]:
    fe = daemon.frontend().start()
    client = FuseClient(fe)
    client.init()
    yield client
    fe.close()
