"""Faults: host errors, the share changing underneath, signals and frontend death.

Each test shows the outcome, that the daemon stays healthy, and that data
acknowledged to the guest after FSYNC is on the host.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.testing.frontend import FuseClient
from tests.frontend.conftest import Daemon

DEADLINE_S = 30.0


def _settle(d: Daemon) -> None:
    """Two status round trips: the supervisor has handled every earlier disconnect."""
    for _ in range(2):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(d.socket + ".stats")
            s.sendall(b"json\n")
            while s.recv(65536):
                pass


def _fds(d: Daemon) -> dict[int, int]:
    pids = [d.proc.pid] + d.children()
    return {p: len(os.listdir(f"/proc/{p}/fd")) for p in pids}


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)


def _umount(path: Path, lazy: bool = False) -> None:
    subprocess.run(["umount"] + (["-l"] if lazy else []) + [str(path)], check=False)


def test_enospc_reaches_the_guest_and_the_daemon_recovers(tmp_path: Path) -> None:
    _mount_tmpfs(tmp_path / "shared", "1m")
    d = Daemon(tmp_path)
    try:
        with d.frontend() as fe:
            fe.start()
            c = FuseClient(fe)
            c.init()
            e, fh = c.create(1, b"fill")
            chunk = b"z" * (128 << 10)
            results = []
            for i in range(16):
                r = c.call(Op.FUSE_WRITE, e[0], F.fuse_write_in.pack(fh, i * len(chunk),
                                                                      len(chunk), 0, 0, 0, 0)
                           + chunk)
                results.append(r.error)
                if r.error:
                    break
            assert results[-1] == -errno.ENOSPC
            c.release(e[0], fh)
            c.unlink(1, b"fill")
            c.forget(e[0], 1)  # the node's O_PATH fd pinned the unlinked blocks
            e2, fh2 = c.create(1, b"after")
            assert c.write(e2[0], fh2, 0, b"fits again") == 10
            c.ok(Op.FUSE_FSYNC, e2[0], F.fuse_fsync_in.pack(fh2, 0, 0))
            assert (d.shared / "after").read_bytes() == b"fits again"
    finally:
        assert d.stop() == 0
        _umount(tmp_path / "shared")


def test_eio_from_the_host_reaches_the_guest(tmp_path: Path) -> None:
    # Reading a process's /proc/PID/mem at address 0 fails with EIO: bind it
    # into the share as a regular file whose reads the host refuses.
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "eio").touch()
    subprocess.run(["mount", "--bind", f"/proc/{os.getpid()}/mem", str(shared / "eio")],
                   check=True)
    try:
        # Opening another process's mem needs CAP_SYS_PTRACE, which the
        # sandbox drops: this test is about errno propagation, so no sandbox.
        d = Daemon(tmp_path, "--sandbox", "none")
        try:
            with d.frontend() as fe:
                fe.start()
                c = FuseClient(fe)
                c.init()
                nodeid = c.lookup(1, b"eio")[0]
                fh = c.open(nodeid)
                r = c.call(Op.FUSE_READ, nodeid, F.fuse_read_in.pack(fh, 0, 4096, 0, 0, 0, 0),
                           reply_size=16 + 4096)
                assert r.error == -errno.EIO
                assert c.getattr(1)  # healthy
        finally:
            assert d.stop() == 0
    finally:
        _umount(shared / "eio")


def test_shared_dir_renamed_underneath(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    try:
        with d.frontend() as fe:
            fe.start()
            c = FuseClient(fe)
            c.init()
            c.mkdir(1, b"sub")
            moved = tmp_path / "moved"
            os.rename(d.shared, moved)
            # The daemon holds the directory, not its path: service goes on.
            e, fh = c.create(1, b"written-after-rename")
            assert c.write(e[0], fh, 0, b"ok") == 2
            c.ok(Op.FUSE_FSYNC, e[0], F.fuse_fsync_in.pack(fh, 0, 0))
            assert (moved / "written-after-rename").read_bytes() == b"ok"
            assert c.lookup(1, b"sub")
            os.rename(moved, d.shared)
    finally:
        assert d.stop() == 0


def test_shared_dir_unmounted_underneath(tmp_path: Path) -> None:
    _mount_tmpfs(tmp_path / "shared", "4m")
    d = Daemon(tmp_path)
    keep = -1
    try:
        with d.frontend() as fe:
            fe.start()
            c = FuseClient(fe)
            c.init()
            e, fh = c.create(1, b"synced")
            c.write(e[0], fh, 0, b"acknowledged")
            c.ok(Op.FUSE_FSYNC, e[0], F.fuse_fsync_in.pack(fh, 0, 0))
            keep = os.open(d.shared, os.O_RDONLY | os.O_DIRECTORY)
            _umount(d.shared, lazy=True)
            # The mount is detached but alive while the daemon holds it: the
            # guest keeps a consistent view, and nothing it was told is lost.
            assert c.read(e[0], fh, 0, 100) == b"acknowledged"
            assert c.getattr(1)
            fd = os.open("synced", os.O_RDONLY, dir_fd=keep)
            assert os.read(fd, 100) == b"acknowledged"
            os.close(fd)
    finally:
        assert d.stop() == 0
        if keep >= 0:
            os.close(keep)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_load_loses_nothing_acknowledged(tmp_path: Path, sig: int) -> None:
    d = Daemon(tmp_path, queues=2)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the guest: write, fsync, report each acknowledged file
        os.close(r)
        try:
            fe = d.frontend().start()
            c = FuseClient(fe)
            c.init()
            for i in range(100000):
                q = FuseClient(fe, queue=1 + i % 2)
                e, fh = q.create(1, f"f{i}".encode())
                q.write(e[0], fh, 0, f"payload {i}".encode() * 100)
                q.ok(Op.FUSE_FSYNC, e[0], F.fuse_fsync_in.pack(fh, 0, 0))
                q.release(e[0], fh)
                os.write(w, f"{i}\n".encode())
        except Exception:
            pass
        os._exit(0)
    os.close(w)
    acked: list[int] = []
    with os.fdopen(r) as f:
        while len(acked) < 50:
            acked.append(int(f.readline()))
        d.proc.send_signal(sig)
        assert d.proc.wait(DEADLINE_S) == 0
        # The guest stalls on a reply that will not come: stop it, then
        # count what it had seen acknowledged.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        acked += [int(line) for line in f.read().split()]
    assert len(acked) >= 50
    for i in acked:
        assert (d.shared / f"f{i}").read_bytes() == f"payload {i}".encode() * 100
    assert "shutting down" in d.log_text()
    d.stop()


def test_frontend_killed_mid_io(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    try:
        _settle(d)
        before = _fds(d)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # a VMM that dies with requests in flight
            os.close(r)
            fe = d.frontend().start()
            c = FuseClient(fe)
            c.init()
            e, fh = c.create(1, b"f")
            q = fe.queues[1]
            for i in range(64):
                args = F.fuse_write_in.pack(fh, i * 4096, 4096, 0, 0, 0, 0) + b"w" * 4096
                req = F.fuse_in_header.pack(40 + len(args), Op.FUSE_WRITE, 1000 + i, e[0], 0,
                                            0, 1, 0, 0) + args
                gpa = fe.ram.alloc(len(req))
                fe.ram.write(gpa, req)
                q.add([(gpa, len(req))], [(fe.ram.alloc(64), 64)])
            fe.kick_queue(1)
            os.write(w, b"x")
            time.sleep(DEADLINE_S)  # killed long before
            os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"x"
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        with d.frontend() as fe:  # the next VMM is served
            fe.start()
            c = FuseClient(fe)
            c.init()
            assert c.getattr(1)
        _settle(d)
        assert _fds(d) == before
    finally:
        assert d.stop() == 0
