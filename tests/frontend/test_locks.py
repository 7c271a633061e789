"""Host-visible file locks (``--locks posix,flock``, issue 13), through a real frontend.

Every lock opcode against the real daemon: byte ranges, merging and
splitting, upgrades, conflicts with this test process's own host locks
(both ways), flock, FLUSH and RELEASE, SETLKW completing out of order while
the queue serves on, INTERRUPT, the wait budget, forged and malformed
requests, and a disconnect or a worker crash with waits pending.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.fs.locks import OFFSET_MAX
from shardfs.proc.locks import MAX_PENDING_WAITS
from shardfs.testing.frontend import Frontend, FuseClient
from tests.frontend.conftest import Daemon

RD, WR, UN = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK
#: Generous overall bound for things the daemon does in the background.
SETTLE_S = 30.0


def lock_daemon(tmp: Path, kinds: str = "posix,flock", queues: int = 1) -> Daemon:
    """A daemon with ``locks = KINDS`` from a TOML file (the ``--locks`` flag sets the same)."""
    conf = tmp / "locks.toml"
    conf.write_text(f'locks = "{kinds}"\n')
    return Daemon(tmp, "--config", str(conf), queues=queues)


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[tuple[Daemon, Frontend, FuseClient, FuseClient]]:
    d = lock_daemon(tmp_path, queues=2)
    fe = d.frontend().start()
    q1, q2 = FuseClient(fe, queue=1), FuseClient(fe, queue=2)
    q1.init()
    yield d, fe, q1, q2
    fe.close()
    assert d.stop() == 0
    text = d.log_path.read_text()
    assert "Traceback" not in text, text


def lk_in(fh: int, owner: int, start: int, end: int, typ: int, pid: int = 0,
          flags: int = 0) -> bytes:
    return F.fuse_lk_in.pack(fh, owner, start, end, typ, pid, flags, 0)


def setlk(c: FuseClient, nid: int, fh: int, owner: int, start: int, end: int, typ: int,
          pid: int = 0, flags: int = 0, op: int = Op.FUSE_SETLK) -> int:
    return -c.call(op, nid, lk_in(fh, owner, start, end, typ, pid, flags)).error


def getlk(c: FuseClient, nid: int, fh: int, owner: int, start: int, end: int,
          typ: int) -> tuple[int, int, int, int]:
    data = c.ok(Op.FUSE_GETLK, nid, lk_in(fh, owner, start, end, typ))
    start_, end_, typ_, pid_ = F.fuse_lk_out.unpack(data)
    return typ_, start_, end_, pid_


def host_lock(fd: int, typ: int, start: int, length: int) -> bool:
    """A classic POSIX lock taken by this (host) process; False if it conflicts."""
    try:
        fcntl.lockf(fd, {RD: fcntl.LOCK_SH, WR: fcntl.LOCK_EX, UN: fcntl.LOCK_UN}[typ]
                    | (fcntl.LOCK_NB if typ != UN else 0), length, start)
        return True
    except OSError as e:
        assert e.errno in (errno.EAGAIN, errno.EACCES)
        return False


def make_file(c: FuseClient, path: Path, name: bytes) -> tuple[int, int, int]:
    """A file in the share: (nodeid, fh, host fd of the same file)."""
    entry, fh = c.create(1, name)
    return entry[0], fh, os.open(path / name.decode(), os.O_RDWR)


class Async:
    """Requests sent without waiting, answered whenever the daemon answers."""

    def __init__(self, fe: Frontend, queue: int) -> None:
        self.fe, self.queue = fe, queue
        self.out: dict[int, tuple[int, int]] = {}  # head -> (out gpa, unique)

    def submit(self, opcode: int, nodeid: int, args: bytes) -> tuple[int, int]:
        fe = self.fe
        unique = fe.next_unique()
        req = F.fuse_in_header.pack(F.fuse_in_header.size + len(args), opcode, unique, nodeid,
                                    0, 0, os.getpid(), 0, 0) + args
        out = fe.ram.alloc(256, 8)
        head = fe.queues[self.queue].add(fe._place(req, None), [(out, 256)])
        self.out[head] = (out, unique)
        fe.kick_queue(self.queue)
        return head, unique

    def _used(self, n: int) -> list[tuple[int, int]]:
        """Like Linux's driver: after taking used chains, ask for a call at the next
        one (``used_event``), so a completion that comes later is signalled."""
        q, call = self.fe.queues[self.queue], self.fe.call[self.queue]
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + SETTLE_S
        while True:
            got += q.pop_used()
            q.set_used_event(q.last_used)
            got += q.pop_used()
            if len(got) >= n:
                return got
            left = deadline - time.monotonic()
            assert left > 0, f"queue {self.queue}: {len(got)}/{n} chains came back"
            select.select([call], [], [], left)
            try:
                os.eventfd_read(call)
            except BlockingIOError:
                pass

    def park_setlkw(self, nid: int, fh: int, owner: int, typ: int) -> int:
        """Send a SETLKW of the whole file that must wait; return its unique once it
        is parked (a GETATTR sent after it on this queue has been answered)."""
        _, waiting = self.submit(Op.FUSE_SETLKW, nid, lk_in(fh, owner, 0, 0, typ))
        self.submit(Op.FUSE_GETATTR, nid, F.fuse_getattr_in.pack(0, 0, 0))
        (unique, error, _), = self.wait()
        assert unique != waiting and error == 0
        return waiting

    def wait(self, n: int = 1) -> list[tuple[int, int, bytes]]:
        """(unique, error, data) of the next ``n`` chains returned, in used-ring order."""
        got = []
        for head, length in self._used(n):
            out, unique = self.out.pop(head)
            total, error, uniq = F.fuse_out_header.unpack(self.fe.ram.read(out, 16))
            assert uniq == unique and total == length
            got.append((unique, error, self.fe.ram.read(out + 16, total - 16)))
        return got


def test_init_offers_both_kinds(tmp_path: Path) -> None:
    d = lock_daemon(tmp_path)
    try:
        with d.frontend().start() as fe:
            flags = FuseClient(fe).init()[3]
            assert flags & F.FUSE_POSIX_LOCKS and flags & F.FUSE_FLOCK_LOCKS
    finally:
        assert d.stop() == 0


def test_without_the_option_locks_stay_refused(fuse: FuseClient, here: Path) -> None:
    assert not fuse.init()[3] & (F.FUSE_POSIX_LOCKS | F.FUSE_FLOCK_LOCKS)
    entry, fh = fuse.create(1, b"nolocks")
    for op in (Op.FUSE_GETLK, Op.FUSE_SETLK, Op.FUSE_SETLKW):
        assert fuse.call(op, entry[0], lk_in(fh, 1, 0, 9, WR)).error == -errno.ENOSYS


def test_ranges_conflicts_and_guest_pids(locked: tuple, tmp_path: Path) -> None:
    d, fe, q1, q2 = locked
    nid, fh, hostfd = make_file(q1, d.shared, b"ranges")
    assert setlk(q1, nid, fh, owner=1, start=0, end=99, typ=WR, pid=111) == 0
    # Another owner, on the other queue (another worker): the same table.
    assert setlk(q2, nid, fh, 2, 50, 60, WR) == errno.EAGAIN
    assert getlk(q2, nid, fh, 2, 50, 60, RD) == (WR, 0, 99, 111)
    assert getlk(q1, nid, fh, 1, 50, 60, WR) == (UN, 50, 60, 0)  # own locks never conflict
    assert setlk(q2, nid, fh, 2, 100, 199, WR, pid=222) == 0  # disjoint ranges coexist
    # Split and upgrade: owner 1 turns 0..99 into read, then 40..59 into write.
    assert setlk(q1, nid, fh, 1, 0, 99, RD, pid=111) == 0
    assert setlk(q1, nid, fh, 1, 40, 59, WR, pid=111) == 0
    assert getlk(q2, nid, fh, 2, 0, 10, RD)[0] == UN
    assert getlk(q2, nid, fh, 2, 0, 10, WR) == (RD, 0, 39, 111)
    assert getlk(q2, nid, fh, 2, 45, 46, RD) == (WR, 40, 59, 111)
    # Unlocking the middle leaves both ends held.
    assert setlk(q1, nid, fh, 1, 40, 59, UN) == 0
    assert setlk(q2, nid, fh, 2, 40, 59, WR) == 0
    assert getlk(q2, nid, fh, 2, 60, 99, WR) == (RD, 60, 99, 111)
    # To the end of file (end = OFFSET_MAX), and unlocking nothing succeeds.
    assert setlk(q1, nid, fh, 3, 1000, OFFSET_MAX, WR) == 0
    assert getlk(q2, nid, fh, 2, 1 << 40, 1 << 41, RD)[:3] == (WR, 1000, OFFSET_MAX)
    assert setlk(q1, nid, fh, 99, 0, OFFSET_MAX, UN) == 0
    os.close(hostfd)


def test_host_process_conflicts_both_ways(locked: tuple) -> None:
    d, fe, q1, q2 = locked
    nid, fh, hostfd = make_file(q1, d.shared, b"host")
    try:
        assert setlk(q1, nid, fh, 1, 0, 99, WR, pid=7) == 0
        assert not host_lock(hostfd, WR, 0, 100)  # the guest's lock holds on the host
        assert not host_lock(hostfd, RD, 99, 1)
        assert host_lock(hostfd, WR, 100, 100)  # beside it
        assert setlk(q1, nid, fh, 1, 0, 99, UN) == 0
        assert host_lock(hostfd, WR, 0, 100)
        # The reverse: a host lock refuses the guest's, and GETLK leaks no host pid.
        assert setlk(q2, nid, fh, 2, 10, 20, RD) == errno.EAGAIN
        assert getlk(q2, nid, fh, 2, 10, 20, RD) == (WR, 0, 199, 0)
        assert host_lock(hostfd, UN, 0, 0)
        assert setlk(q2, nid, fh, 2, 10, 20, RD) == 0
    finally:
        os.close(hostfd)


def test_flush_and_release_drop_an_owners_locks(locked: tuple) -> None:
    d, fe, q1, q2 = locked
    nid, fh, hostfd = make_file(q1, d.shared, b"flush")
    try:
        assert setlk(q1, nid, fh, 5, 0, 9, WR) == 0
        assert setlk(q1, nid, fh, 5, 20, 29, RD) == 0
        q1.ok(Op.FUSE_FLUSH, nid, F.fuse_flush_in.pack(fh, 0, 0, 6))  # another owner: kept
        assert not host_lock(hostfd, WR, 0, 10)
        q2.ok(Op.FUSE_FLUSH, nid, F.fuse_flush_in.pack(fh, 0, 0, 5))  # any queue
        assert host_lock(hostfd, WR, 0, 30) and host_lock(hostfd, UN, 0, 0)
        # flock: released by RELEASE with FUSE_RELEASE_FLOCK_UNLOCK and its owner.
        fh2 = q1.open(nid, os.O_RDONLY)
        assert setlk(q1, nid, fh2, 77, 0, OFFSET_MAX, WR, flags=F.FUSE_LK_FLOCK) == 0
        with pytest.raises(BlockingIOError):
            fcntl.flock(hostfd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        assert setlk(q2, nid, fh, 78, 0, OFFSET_MAX, RD, flags=F.FUSE_LK_FLOCK) == \
            errno.EAGAIN
        q1.ok(Op.FUSE_RELEASE, nid, F.fuse_release_in.pack(fh2, 0,
                                                           F.FUSE_RELEASE_FLOCK_UNLOCK, 77))
        fcntl.flock(hostfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert setlk(q2, nid, fh, 78, 0, OFFSET_MAX, RD, flags=F.FUSE_LK_FLOCK) == \
            errno.EAGAIN  # the host holds it now
        fcntl.flock(hostfd, fcntl.LOCK_UN)
        assert setlk(q2, nid, fh, 78, 0, OFFSET_MAX, RD, flags=F.FUSE_LK_FLOCK) == 0
        assert setlk(q2, nid, fh, 78, 0, OFFSET_MAX, UN, flags=F.FUSE_LK_FLOCK) == 0
    finally:
        os.close(hostfd)


def test_setlkw_completes_out_of_order_while_the_queue_serves(locked: tuple) -> None:
    d, fe, q1, q2 = locked
    nid, fh, hostfd = make_file(q1, d.shared, b"wait")
    os.close(hostfd)
    assert setlk(q2, nid, fh, 1, 0, 9, WR) == 0
    a = Async(fe, 1)
    _, waiting = a.submit(Op.FUSE_SETLKW, nid, lk_in(fh, 2, 5, 5, WR))
    # The same queue keeps serving: 20 GETATTRs come back while the wait is parked.
    for _ in range(20):
        a.submit(Op.FUSE_GETATTR, nid, F.fuse_getattr_in.pack(0, 0, 0))
        (unique, error, _data), = a.wait()
        assert unique != waiting and error == 0
    # The holder unlocks (through the same queue): the wait is granted, out of order.
    a.submit(Op.FUSE_SETLK, nid, lk_in(fh, 1, 0, 9, UN))
    got = {u: e for u, e, _ in a.wait(2)}
    assert got[waiting] == 0
    assert setlk(q2, nid, fh, 3, 0, 9, RD) == errno.EAGAIN  # owner 2 holds byte 5 now


def test_setlkw_waits_for_a_host_process(locked: tuple) -> None:
    d, fe, q1, q2 = locked
    nid, fh, hostfd = make_file(q1, d.shared, b"hostwait")
    try:
        assert host_lock(hostfd, WR, 0, 0)
        a = Async(fe, 1)
        _, waiting = a.submit(Op.FUSE_SETLKW, nid, lk_in(fh, 2, 0, 0, RD))
        assert q1.getattr(nid)  # the queue serves meanwhile
        assert host_lock(hostfd, UN, 0, 0)
        (unique, error, _), = a.wait()  # granted once the lock process retries
        assert (unique, error) == (waiting, 0)
        assert not host_lock(hostfd, WR, 0, 1)
    finally:
        os.close(hostfd)


def test_interrupt_answers_eintr_and_withdraws_the_wait(locked: tuple) -> None:
    d, fe, q1, q2 = locked
    nid, fh, hostfd = make_file(q1, d.shared, b"intr")
    try:
        assert setlk(q1, nid, fh, 1, 0, 0, WR) == 0
        a = Async(fe, 2)
        _, waiting = a.submit(Op.FUSE_SETLKW, nid, lk_in(fh, 2, 0, 0, WR))
        fe.fuse_request(Op.FUSE_INTERRUPT, 0, F.fuse_interrupt_in.pack(waiting), queue=0,
                        reply_size=0)
        (unique, error, _), = a.wait()
        assert (unique, error) == (waiting, -errno.EINTR)
        assert setlk(q1, nid, fh, 1, 0, 0, UN) == 0
        assert host_lock(hostfd, WR, 0, 0)  # the withdrawn wait took nothing
        assert host_lock(hostfd, UN, 0, 0)
        # An INTERRUPT for nothing in flight is ignored.
        fe.fuse_request(Op.FUSE_INTERRUPT, 0, F.fuse_interrupt_in.pack(12345), queue=0,
                        reply_size=0)
        assert q1.getattr(nid)
    finally:
        os.close(hostfd)


def test_pending_waits_are_budgeted(locked: tuple) -> None:
    d, fe, q1, q2 = locked
    nid, fh, hostfd = make_file(q1, d.shared, b"budget")
    os.close(hostfd)
    assert setlk(q2, nid, fh, 1, 0, 0, WR) == 0
    a = Async(fe, 1)
    uniques = [a.submit(Op.FUSE_SETLKW, nid, lk_in(fh, 100 + i, 0, 0, WR))[1]
               for i in range(MAX_PENDING_WAITS)]
    _, extra = a.submit(Op.FUSE_SETLKW, nid, lk_in(fh, 999, 0, 0, WR))
    (unique, error, _), = a.wait()
    assert (unique, error) == (extra, -errno.ENOLCK)
    for u in uniques:
        fe.fuse_request(Op.FUSE_INTERRUPT, 0, F.fuse_interrupt_in.pack(u), queue=0,
                        reply_size=0)
    got = a.wait(len(uniques))
    assert {u for u, _, _ in got} == set(uniques)
    assert {e for _, e, _ in got} == {-errno.EINTR}


@pytest.mark.parametrize(("start", "end", "typ"), [
    (10, 9, WR), (0, OFFSET_MAX + 1, WR), (OFFSET_MAX + 1, OFFSET_MAX + 1, RD),
    ((1 << 64) - 1, (1 << 64) - 1, WR), (0, 9, 7), (0, 9, 0xFFFFFFFF),
])
def test_bad_ranges_and_types_are_einval(locked: tuple, start: int, end: int,
                                         typ: int) -> None:
    d, fe, q1, q2 = locked
    entry, fh = q1.create(1, b"bad%d_%d" % (start & 0xFFFF, typ & 0xFF))
    for op in (Op.FUSE_GETLK, Op.FUSE_SETLK, Op.FUSE_SETLKW):
        assert q1.call(op, entry[0], lk_in(fh, 1, start, end, typ)).error == -errno.EINVAL


def test_forged_and_truncated_requests_are_refused(locked: tuple) -> None:
    d, fe, q1, q2 = locked
    nid, fh, hostfd = make_file(q1, d.shared, b"forged")
    os.close(hostfd)
    other, ofh = q1.create(1, b"other")
    dirfh = int(F.fuse_open_out.unpack(q1.ok(Op.FUSE_OPENDIR, 1,
                                             F.fuse_open_in.pack(0, 0)))[0])
    for bad_fh in (fh + 0x1000, ofh, dirfh, 0xFFFFFFFFFFFFFFFF):
        for op in (Op.FUSE_GETLK, Op.FUSE_SETLK, Op.FUSE_SETLKW):
            assert q1.call(op, nid, lk_in(bad_fh, 1, 0, 9, WR)).error == -errno.EBADF
    assert q1.call(Op.FUSE_SETLK, 0xDEAD0000, lk_in(fh, 1, 0, 9, WR)).error in (
        -errno.EBADF, -errno.ENOENT)
    assert q1.call(Op.FUSE_SETLK, nid, lk_in(fh, 1, 0, 9, WR)[:20]).error == -errno.EINVAL
    # A GETLK reply buffer too small for fuse_lk_out is refused before anything happens.
    r = q1.call(Op.FUSE_GETLK, nid, lk_in(fh, 1, 0, 9, WR), reply_size=F.fuse_out_header.size)
    assert r.error == -errno.EINVAL
    # An INTERRUPT too short is dropped, and the daemon serves on.
    fe.fuse_request(Op.FUSE_INTERRUPT, 0, b"\1\2", queue=0, reply_size=0)
    assert setlk(q1, nid, fh, 1, 0, 9, WR) == 0


def _wait_for(cond: object, what: str) -> None:
    deadline = time.monotonic() + SETTLE_S
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_disconnect_with_waits_pending_leaves_nothing(tmp_path: Path) -> None:
    d = lock_daemon(tmp_path)
    try:
        fe = d.frontend().start()
        c = FuseClient(fe)
        c.init()
        nid, fh, hostfd = make_file(c, d.shared, b"gone")
        assert setlk(c, nid, fh, 1, 0, 99, WR) == 0
        assert setlk(c, nid, fh, 2, 0, 0, WR, flags=F.FUSE_LK_FLOCK) == 0
        a = Async(fe, 1)
        a.submit(Op.FUSE_SETLKW, nid, lk_in(fh, 3, 0, 0, RD))
        assert not host_lock(hostfd, WR, 0, 100)
        fe.close()  # the guest leaves with a lock held and a wait pending
        _wait_for(lambda: host_lock(hostfd, WR, 0, 0), "the host lock stayed after disconnect")
        fcntl.flock(hostfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(hostfd)
    finally:
        assert d.stop() == 0
    assert "Traceback" not in d.log_path.read_text()


def test_worker_crash_keeps_locks_and_answers_its_parked_wait(tmp_path: Path) -> None:
    d = lock_daemon(tmp_path, "posix")
    try:
        fe = d.frontend().start()
        c = FuseClient(fe)
        c.init()
        nid, fh, hostfd = make_file(c, d.shared, b"crash")
        assert setlk(c, nid, fh, 1, 0, 9, WR) == 0
        a = Async(fe, 1)
        waiting = a.park_setlkw(nid, fh, 2, WR)
        worker = d.child("shardfs-w0")
        os.kill(worker, signal.SIGKILL)
        (unique, error, _), = a.wait()  # the replacement answers the parked chain
        assert unique == waiting and error in (-errno.EIO, -errno.EINTR)
        assert not host_lock(hostfd, WR, 0, 1)  # owner 1's lock survived the crash
        assert setlk(c, nid, fh, 1, 0, 9, UN) == 0
        assert host_lock(hostfd, WR, 0, 1)  # and the withdrawn wait took nothing
        os.close(hostfd)
        fe.close()
    finally:
        assert d.stop() == 0


def test_lock_unlock_round_trips(locked: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a benchmark gate: a count for the closing note (printed with -s)."""
    d, fe, q1, q2 = locked
    nid, fh, hostfd = make_file(q1, d.shared, b"rate")
    os.close(hostfd)
    n = 500
    t0 = time.perf_counter()
    for _ in range(n):
        assert setlk(q1, nid, fh, 1, 0, 99, WR) == 0
        assert setlk(q1, nid, fh, 1, 0, 99, UN) == 0
    dt = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nlock+unlock pairs: {n / dt:.0f}/s ({2 * n / dt:.0f} round trips/s)")


def test_lock_process_death_fails_locks_loudly_and_nothing_else(tmp_path: Path) -> None:
    """Its death drops every host lock: waits and later requests answer ENOLCK (the
    guest learns it holds nothing), and every other operation is served on."""
    d = lock_daemon(tmp_path)
    try:
        fe = d.frontend().start()
        c = FuseClient(fe)
        c.init()
        nid, fh, hostfd = make_file(c, d.shared, b"orphan")
        assert setlk(c, nid, fh, 1, 0, 0, WR) == 0
        a = Async(fe, 1)
        waiting = a.park_setlkw(nid, fh, 2, WR)
        locker = d.child("shardfs-locks")
        os.kill(locker, signal.SIGKILL)
        (unique, error, _), = a.wait()
        assert (unique, error) == (waiting, -errno.ENOLCK)
        assert host_lock(hostfd, WR, 0, 0)  # the host lock went with the process
        assert setlk(c, nid, fh, 1, 0, 0, WR) == errno.ENOLCK
        assert c.getattr(nid) and c.write(nid, fh, 0, b"still served") == 12
        os.close(hostfd)
        fe.close()
    finally:
        d.stop()
    assert "lock process went away" in d.log_path.read_text()


def test_destroy_and_init_again_drop_every_lock(locked: tuple) -> None:
    d, fe, q1, q2 = locked
    nid, fh, hostfd = make_file(q1, d.shared, b"destroy")
    try:
        assert setlk(q1, nid, fh, 1, 0, 9, WR) == 0
        assert setlk(q1, nid, fh, 2, 0, 0, RD, flags=F.FUSE_LK_FLOCK) == 0
        q1.init()  # INIT again, as after a guest reboot: the old session's locks go
        assert host_lock(hostfd, WR, 0, 10) and host_lock(hostfd, UN, 0, 0)
        fcntl.flock(hostfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(hostfd, fcntl.LOCK_UN)
        entry, fh = q1.create(1, b"destroy2")
        assert setlk(q1, entry[0], fh, 1, 0, 9, WR) == 0
        q1.ok(Op.FUSE_DESTROY, 0, b"")
        fd2 = os.open(d.shared / "destroy2", os.O_RDWR)
        assert host_lock(fd2, WR, 0, 10)
        os.close(fd2)
    finally:
        os.close(hostfd)
    stats = subprocess.run([sys.executable, "-m", "shardfs", "stats", "--socket-path", d.socket,
                            "--format", "json"], capture_output=True, text=True, check=True)
    assert "locks" in {p["name"] for p in json.loads(stats.stdout)["processes"]}
