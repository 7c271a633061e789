"""Crash isolation: kill -9 a worker; the supervisor replaces it and its queue resumes.

Requests the dead worker had taken but not completed are answered EIO
(README "Crash isolation"); requests it had not taken are served by the
replacement; other queues never notice.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import time
from pathlib import Path

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.testing.frontend import FuseClient
from tests.frontend.conftest import Daemon

SYS_openat = 257
#: Generous: the daemon restarts a worker at once; this only bounds a broken test.
DEADLINE_S = 30.0


def _workers(d: Daemon) -> dict[str, int]:
    return {n: p for n, p in d.named_children().items() if n.startswith("shardfs-w")}


def _wait_for(pred, what: str) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > DEADLINE_S:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - start


def _request(fe, queue: int, opcode: int, nodeid: int, args: bytes) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Publish a request without waiting; return (head, reply gpa)."""
    unique = fe.next_unique()
    req = F.fuse_in_header.pack(40 + len(args), opcode, unique, nodeid, 0, 0, 1, 0, 0) + args
    rgpa = fe.ram.alloc(len(req))
    fe.ram.write(rgpa, req)
    wgpa = fe.ram.alloc(4096)
    head = fe.queues[queue].add([(rgpa, len(req))], [(wgpa, 4096)])
    fe.kick_queue(queue)
    return head, wgpa


def test_killed_worker_is_replaced_and_its_queue_resumes(tmp_path: Path) -> None:
    d = Daemon(tmp_path, queues=2)
    try:
        fe = d.frontend().start()
        q1, q2 = FuseClient(fe, queue=1), FuseClient(fe, queue=2)
        q1.init()
        (d.shared / "f").write_bytes(b"before")
        nodeid = q1.lookup(1, b"f")[0]
        before = _workers(d)
        os.kill(before["shardfs-w0"], signal.SIGKILL)
        took = _wait_for(lambda: _workers(d).get("shardfs-w0") not in
                         (None, before["shardfs-w0"]), "a replacement worker")
        print(f"replacement worker up after {took * 1000:.0f} ms")
        assert _workers(d)["shardfs-w1"] == before["shardfs-w1"]  # untouched
        # Node state survived (it is shared), and both queues serve.
        assert q1.getattr(nodeid)[3] == os.stat(d.shared / "f").st_ino
        assert q2.getattr(nodeid)
        assert q1.read(nodeid, q1.open(nodeid), 0, 10) == b"before"
        fe.close()
    finally:
        assert d.stop() == 0
    assert "died with exit code -9; restarting it" in d.log_path.read_text()


def test_in_flight_request_of_a_killed_worker_gets_eio(tmp_path: Path) -> None:
    d = Daemon(tmp_path, queues=1)
    lease_fd = -1
    try:
        fe = d.frontend().start()
        q1 = FuseClient(fe)
        q1.init()
        path = d.shared / "leased"
        path.write_bytes(b"x")
        nodeid = q1.lookup(1, b"leased")[0]
        # A read lease held here makes the worker's open-for-write block in
        # the kernel until we let go: a request that is deterministically in
        # flight when the worker dies.
        lease_fd = os.open(path, os.O_RDONLY)
        signal.signal(signal.SIGIO, signal.SIG_IGN)
        fcntl.fcntl(lease_fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        pid = _workers(d)["shardfs-w0"]
        head, wgpa = _request(fe, 1, Op.FUSE_OPEN, nodeid, F.fuse_open_in.pack(os.O_WRONLY, 0))

        def blocked_in_open() -> bool:
            return open(f"/proc/{pid}/syscall").read().split()[0] == str(SYS_openat)

        _wait_for(blocked_in_open, "the worker to block in open")
        os.kill(pid, signal.SIGKILL)
        (h, length), = fe.wait_used(1, timeout_s=DEADLINE_S)
        assert h == head and length == F.fuse_out_header.size
        assert F.fuse_out_header.unpack(fe.ram.read(wgpa, 16))[1] == -errno.EIO
        # The queue goes on.
        assert q1.getattr(nodeid)
        fe.close()
    finally:
        if lease_fd >= 0:
            os.close(lease_fd)
        assert d.stop() == 0
    assert "answered EIO" in d.log_path.read_text()


def test_requests_not_yet_taken_are_served_by_the_replacement(tmp_path: Path) -> None:
    d = Daemon(tmp_path, queues=1)
    try:
        fe = d.frontend().start()
        q1 = FuseClient(fe)
        q1.init()
        pid = _workers(d)["shardfs-w0"]
        os.kill(pid, signal.SIGSTOP)  # it cannot take anything now
        heads = [_request(fe, 1, Op.FUSE_GETATTR, 1, F.fuse_getattr_in.pack(0, 0, 0))
                 for _ in range(3)]
        os.kill(pid, signal.SIGKILL)
        used = fe.wait_used(1, 3, timeout_s=DEADLINE_S)
        assert sorted(h for h, _ in used) == sorted(h for h, _ in heads)
        for _, wgpa in heads:
            assert F.fuse_out_header.unpack(fe.ram.read(wgpa, 16))[1] == 0
        fe.close()
    finally:
        assert d.stop() == 0
