"""The lock process: the one owner of every file lock a guest holds (issue 13).

With ``locks`` on, the guest's ``fcntl`` and ``flock`` locks are taken on the
host, so they conflict with host processes and with other VMs sharing the
directory through their own daemons.  GETLK, SETLK and SETLKW arrive on
every request queue, FLUSH and RELEASE too, INTERRUPT on hiprio: all of them
must see one set of locks.  So one process holds them, and workers forward
lock requests to it.

**Who holds the locks: a process of its own.**  Weighed:

* *the coordinator*: it serves one DAX request to completion and may wait
  up to ``BACKEND_REPLY_TIMEOUT_S`` for the frontend meanwhile; every lock
  request, FLUSH included, would wait behind a SHMEM_MAP.  Its crash
  already costs the DAX window; it should not cost every lock too.
* *the workers, through shared memory*: host locks belong to open file
  descriptions, which live in one process; a worker's crash would drop the
  locks of every guest process that happened to take one on its queue.
* *a lock process* (chosen): one small state machine that never blocks
  (below), one socket pair per worker, nothing else to serve.  A worker's
  crash costs no lock; the lock process's own death drops every host lock,
  so the supervisor does not hide it: it is logged, and lock requests
  answer ENOLCK afterwards (the guest learns, rather than believing it
  holds a lock nobody honours).

**Host locks: open file description (OFD) locks, one description per
(node, lock owner, kind).**  POSIX locks belong to a process
(``fl_owner``), which the guest sends as ``lock_owner``; the host's classic
POSIX locks would all belong to this one daemon process (two guest owners
would never conflict, and any close in the daemon would drop them all).
An OFD lock belongs to an open file description, so each guest owner gets
its own description of the file (``F_OFD_SETLK``), opened by the worker
(``FileSystem.lock_file``, which also refuses a forged fh: EBADF) and passed
here with SCM_RIGHTS the first time the owner needs it.  ``flock`` requests
(``FUSE_LK_FLOCK``) use ``flock(2)`` on a description of their own, so they
meet host ``flock`` users, as on a local filesystem.  The kernel does the
byte-range merging, splitting and atomic upgrades; :mod:`shardfs.fs.locks`
mirrors them only to know which guest pid holds a range (GETLK) and when
an owner holds nothing (its description is then closed).

**Blocking without blocking.**  SETLKW is first tried without waiting.  If
it conflicts, the worker is told "pending" and answers the chain later, out
of order (:mod:`shardfs.proc.lockclient`); meanwhile its queue serves on.
This process then retries the lock without waiting: at once whenever a lock
of this guest is released, and otherwise after a backoff from
:data:`RETRY_MIN_S` doubling to :data:`RETRY_MAX_S` (a host process or
another VM gives no notice when it unlocks).  It never calls F_OFD_SETLKW:
a blocked call needs a thread, and threads cannot be made after the seccomp
filter (no clone) and would escape the per-thread sandbox steps if made
before.  The price: a lock released outside this guest is granted up to
``RETRY_MAX_S`` late, and waiters are not served in strict FIFO order
against host waiters (the host kernel does not promise that either).

**Bounds.**  At most :data:`MAX_PENDING_WAITS` waits per guest (ENOLCK
beyond, as a local kernel answers when out of lock memory), and at most
:data:`MAX_LOCK_FILES` open descriptions (ENOLCK beyond).  Completions to a
worker are small and bounded by the wait budget, so its socket buffer
never fills and this process never blocks on a send.

**What ends a lock.**  An unlock; FLUSH with the owner (every POSIX lock of
that owner on the node: a ``close()`` in the guest); RELEASE with
FUSE_RELEASE_FLOCK_UNLOCK (the owner's ``flock``); DESTROY, INIT again, and
a frontend disconnect (everything, waits included: nothing is left on the
host).  A worker's crash withdraws the waits it had parked (the
replacement answers their chains, :meth:`LockOwner.orphans`) but keeps the
locks granted: the guest process that holds them is alive and still
believes it does.

**Deadlocks.**  The host kernel detects deadlocks (EDEADLK) only among
classic POSIX locks that *block*; OFD locks never get EDEADLK, and this
process never blocks.  So two guest processes that each wait for the
other's range wait until one is interrupted or killed, as with OFD locks
on a local filesystem.  A guest that needs EDEADLK must not rely on it here.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import signal
import socket
import struct
import time
from collections import deque
from typing import Any

from shardfs.abi.fuse import FUSE_FLOCK_LOCKS, FUSE_POSIX_LOCKS
from shardfs.fs.api import FsError
from shardfs.fs.locks import OwnerRanges, check_range, from_flock, to_flock_len
from shardfs.proc import control
from shardfs.sandbox import SandboxPolicy, confine

log = logging.getLogger("shardfs.locks")

#: Waits one guest may have pending; ENOLCK beyond.
MAX_PENDING_WAITS = 64
#: Open file descriptions the lock process may hold (one per owner and file); ENOLCK beyond.
MAX_LOCK_FILES = 4096
#: INTERRUPTs remembered that came before their SETLKW (see LockOwner.early_interrupts).
EARLY_INTERRUPTS = 256
#: Retry backoff for a wait on a lock held outside this guest.
RETRY_MIN_S = 0.001
RETRY_MAX_S = 0.05

#: ``struct flock`` on x86_64/aarch64 Linux: l_type, l_whence, l_start, l_len, l_pid.
FLOCK = struct.Struct("=hh4xqqi4x")
_CONFLICT = (errno.EAGAIN, errno.EACCES)

#: Link messages that get no reply.
LINK_CASTS = frozenset({"tag", "interrupt", "withdraw"})

#: (nodeid, lock owner, flock?)
Key = tuple[int, int, bool]


class Holder:
    """One guest owner's open description of one file, and what it holds through it."""

    fd: int
    ranges: OwnerRanges
    #: flock(2) state for flock holders: F_UNLCK, F_RDLCK (LOCK_SH) or F_WRLCK (LOCK_EX).
    flock_typ: int
    waits: int

    def __init__(self, fd: int, ranges: OwnerRanges | None = None,
                 flock_typ: int = fcntl.F_UNLCK, waits: int = 0) -> None:
        self.fd = fd
        self.ranges = OwnerRanges() if ranges is None else ranges
        self.flock_typ = flock_typ
        self.waits = waits

    def idle(self) -> bool:
        return not self.ranges and self.flock_typ == fcntl.F_UNLCK and not self.waits


class Wait:
    """A SETLKW that conflicted; retried until granted, interrupted or withdrawn."""

    wid: int
    unique: int
    key: Key
    start: int
    end: int
    typ: int
    pid: int
    due_s: float
    delay_s: float
    #: Where the worker parked the chain (ring index, head), -1 until told.
    ring: int
    head: int

    def __init__(self, wid: int, unique: int, key: Key, start: int, end: int, typ: int, pid: int,
                 due_s: float, delay_s: float = RETRY_MIN_S, ring: int = -1,
                 head: int = -1) -> None:
        self.wid = wid
        self.unique = unique
        self.key = key
        self.start = start
        self.end = end
        self.typ = typ
        self.pid = pid
        self.due_s = due_s
        self.delay_s = delay_s
        self.ring = ring
        self.head = head


class Link:
    """A worker's two sockets: calls (request, reply) and completions (one-way)."""

    def __init__(self, wid: int, call: socket.socket, done: socket.socket) -> None:
        self.wid = wid
        self.call = call
        self.done = done
        done.setblocking(False)

    def close(self) -> None:
        self.call.close()
        self.done.close()


def _checked(fd: int | None, start: int, end: int, typ: int) -> None:
    """:func:`check_range`, closing ``fd`` (which the caller would take) on refusal."""
    try:
        check_range(start, end, typ)
    except FsError:
        if fd is not None:
            os.close(fd)
        raise


def _flock_op(typ: int, nonblock: bool = True) -> int:
    op = {fcntl.F_RDLCK: fcntl.LOCK_SH, fcntl.F_WRLCK: fcntl.LOCK_EX}.get(typ, fcntl.LOCK_UN)
    return op | (fcntl.LOCK_NB if nonblock and op != fcntl.LOCK_UN else 0)


class LockOwner:
    """The lock table and the rules above; :meth:`run` is the process body.

    Everything but :meth:`run` is plain state changes on host fds, so the
    unit tests drive it directly.
    """

    def __init__(self, sock: socket.socket | None = None,
                 max_waits: int = MAX_PENDING_WAITS,
                 max_files: int = MAX_LOCK_FILES) -> None:
        self.sock = sock
        self.max_waits = max_waits
        self.max_files = max_files
        self.holders: dict[Key, Holder] = {}
        self.waits: dict[int, Wait] = {}
        #: ring index -> heads of parked chains whose worker died (see orphans()).
        self.orphaned: dict[int, list[int]] = {}
        self.links: dict[int, Link] = {}  # wid -> link
        self.by_fd: dict[int, Link] = {}  # call fd -> link
        self.ep = select.epoll()
        self.running = True
        self._retry_now = False
        #: INTERRUPTs that found no wait: hiprio and the request's queue are served
        #: by different workers, so one may overtake its SETLKW (bounded, oldest out).
        self.early_interrupts: deque[int] = deque(maxlen=EARLY_INTERRUPTS)

    # -- the operations ---------------------------------------------------------------

    def _holder(self, key: Key, fd: int | None) -> Holder | None:
        """The key's holder; made from ``fd`` (taken) if there is none yet."""
        h = self.holders.get(key)
        if h is not None:
            if fd is not None:
                os.close(fd)
            return h
        if fd is None:
            return None
        if len(self.holders) >= self.max_files:
            os.close(fd)
            raise OSError(errno.ENOLCK, "too many locked files")
        h = self.holders[key] = Holder(fd)
        return h

    def _tidy(self, key: Key, closing: bool = False) -> None:
        """Close the key's description if it holds nothing and nothing waits on it.

        An owner that only unlocked keeps it (sqlite locks and unlocks a
        file many times between two closes: one round trip each, no reopen)
        until its close in the guest (FLUSH, RELEASE: ``closing``), or while
        descriptions are scarce (over half of :data:`MAX_LOCK_FILES`).
        """
        h = self.holders.get(key)
        if h is not None and h.idle() and (closing or len(self.holders) > self.max_files // 2):
            del self.holders[key]
            os.close(h.fd)

    def getlk(self, nodeid: int, owner: int, start: int, end: int, typ: int,
              fd: int | None) -> tuple[int, int, int, int] | None:
        """(type, start, end, guest pid) of a lock that would conflict, F_UNLCK if none.

        None: the owner holds no description here yet and ``fd`` was not given.
        """
        _checked(fd, start, end, typ)
        key = (nodeid, owner, False)
        h = self.holders.get(key)
        if h is None and fd is None:
            return None
        use = h.fd if h is not None else fd
        try:
            got = fcntl.fcntl(use, fcntl.F_OFD_GETLK,  # type: ignore[arg-type]
                              FLOCK.pack(typ, os.SEEK_SET, start, to_flock_len(start, end), 0))
        finally:
            if fd is not None:
                os.close(fd)
        l_type, _, l_start, l_len, _pid = FLOCK.unpack(got)
        if l_type == fcntl.F_UNLCK:
            return (fcntl.F_UNLCK, start, end, 0)
        # One of this guest's owners?  Then its guest pid; a host pid never leaves.
        for (nid, other, is_flock), oh in self.holders.items():
            if nid == nodeid and not is_flock and other != owner:
                c = oh.ranges.conflict(start, end, typ)
                if c is not None:
                    return (c.typ, c.start, c.end, c.pid)
        c_start, c_end = from_flock(l_start, l_len)
        return (l_type, c_start, c_end, 0)

    def setlk(self, wid: int, nodeid: int, owner: int, is_flock: bool, start: int, end: int,
              typ: int, pid: int, wait_unique: int, fd: int | None) -> str | int:
        """Apply a lock or unlock.  0 granted; an errno; "need_fd"; "pending" (a wait)."""
        _checked(fd, start, end, typ)
        key = (nodeid, owner, is_flock)
        if typ == fcntl.F_UNLCK and key not in self.holders:
            if fd is not None:
                os.close(fd)
            return 0  # nothing held: unlocking nothing succeeds, as locally
        h = self._holder(key, fd)
        if h is None:
            return "need_fd"
        err = self._try(h, is_flock, start, end, typ, pid)
        if err in _CONFLICT and wait_unique:
            if wait_unique in self.early_interrupts:
                self.early_interrupts.remove(wait_unique)
                self._tidy(key)
                return errno.EINTR
            if len(self.waits) >= self.max_waits:
                self._tidy(key)
                return errno.ENOLCK
            if wait_unique in self.waits:
                self._tidy(key)
                return errno.EINVAL  # the guest reused a unique still in flight
            self.waits[wait_unique] = Wait(wid, wait_unique, key, start, end, typ, pid,
                                           time.monotonic() + RETRY_MIN_S)
            h.waits += 1
            return "pending"
        if typ == fcntl.F_UNLCK and not err:
            self._retry_now = True
        self._tidy(key)
        return err

    def _try(self, h: Holder, is_flock: bool, start: int, end: int, typ: int,
             pid: int) -> int:
        """One non-blocking attempt; 0 or the errno."""
        try:
            if is_flock:
                fcntl.flock(h.fd, _flock_op(typ))
                if h.flock_typ != fcntl.F_UNLCK and typ != h.flock_typ:
                    self._retry_now = True  # a downgrade or unlock frees others
                h.flock_typ = typ
            else:
                fcntl.fcntl(h.fd, fcntl.F_OFD_SETLK,  # type: ignore[arg-type]
                            FLOCK.pack(typ, os.SEEK_SET, start, to_flock_len(start, end), 0))
                h.ranges.set(start, end, typ, pid)
        except OSError as e:
            return e.errno or errno.EIO
        return 0

    def flush(self, nodeid: int, owner: int) -> None:
        """A close in the guest: every POSIX lock of ``owner`` on the node goes."""
        key = (nodeid, owner, False)
        h = self.holders.get(key)
        if h is None:
            return
        if h.ranges:
            fcntl.fcntl(h.fd, fcntl.F_OFD_SETLK,  # type: ignore[arg-type]
                        FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))
            h.ranges = OwnerRanges()
            self._retry_now = True
        self._tidy(key, closing=True)

    def release(self, nodeid: int, owner: int, flock_unlock: bool) -> None:
        """RELEASE: with FUSE_RELEASE_FLOCK_UNLOCK the owner's flock goes."""
        if not flock_unlock:
            return
        key = (nodeid, owner, True)
        h = self.holders.get(key)
        if h is None:
            return
        if h.flock_typ != fcntl.F_UNLCK:
            fcntl.flock(h.fd, fcntl.LOCK_UN)
            h.flock_typ = fcntl.F_UNLCK
            self._retry_now = True
        self._tidy(key, closing=True)

    def destroy(self) -> list[Wait]:
        """DESTROY, INIT again, disconnect: every lock and wait goes; returns the waits."""
        waits = list(self.waits.values())
        self.waits.clear()
        for h in self.holders.values():
            os.close(h.fd)
        self.holders.clear()
        self.orphaned.clear()
        return waits

    def cancel(self, unique: int) -> Wait | None:
        """Withdraw a wait (INTERRUPT, or its worker gave the chain up)."""
        w = self.waits.pop(unique, None)
        if w is not None:
            h = self.holders.get(w.key)
            if h is not None:
                h.waits -= 1
                self._tidy(w.key)
        return w

    def retry(self, now: float) -> list[tuple[Wait, int]]:
        """Try the waits that are due (all of them after a local release): (wait, errno)."""
        everyone = self._retry_now
        self._retry_now = False
        finished: list[tuple[Wait, int]] = []
        for w in list(self.waits.values()):
            if not everyone and w.due_s > now:
                continue
            h = self.holders.get(w.key)
            err = (errno.EIO if h is None
                   else self._try(h, w.key[2], w.start, w.end, w.typ, w.pid))
            if err in _CONFLICT:
                w.delay_s = min(w.delay_s * 2, RETRY_MAX_S)
                w.due_s = now + w.delay_s
                continue
            self.cancel(w.unique)
            finished.append((w, err))
        return finished

    def next_due(self) -> float | None:
        if self._retry_now and self.waits:
            return 0.0
        return min((w.due_s for w in self.waits.values()), default=None)

    def worker_gone(self, wid: int) -> None:
        """A worker died: withdraw its waits; remember the parked chains for its successor."""
        for w in [w for w in self.waits.values() if w.wid == wid]:
            self.cancel(w.unique)
            if w.ring >= 0:
                self.orphaned.setdefault(w.ring, []).append(w.head)

    def orphans(self, ring: int) -> list[int]:
        """The heads of ``ring``'s chains parked in a dead worker (once)."""
        return self.orphaned.pop(ring, [])

    # -- link messages ------------------------------------------------------------------

    def handle(self, wid: int, msg: list[Any], fds: list[int]) -> list[Any] | None:
        """One message from worker ``wid``; the reply, or None for a cast."""
        verb, args = msg[0], msg[1:]
        fd = fds[0] if fds else None
        for extra in fds[1:]:
            os.close(extra)
        try:
            if verb == "getlk":
                nodeid, owner, start, end, typ = args
                got = self.getlk(nodeid, owner, start, end, typ, fd)
                return ["need_fd"] if got is None else ["ok", list(got)]
            if verb == "setlk":
                nodeid, owner, is_flock, start, end, typ, pid, unique = args
                res = self.setlk(wid, nodeid, owner, bool(is_flock), start, end, typ, pid,
                                 unique, fd)
                if isinstance(res, str):
                    return [res]
                return ["ok", 0] if res == 0 else ["err", res]
            if fd is not None:
                os.close(fd)
                fd = None
            if verb == "flush":
                self.flush(*args)
            elif verb == "release":
                self.release(*args)
            elif verb == "destroy":
                self._finish(self.destroy(), errno.EINTR)
            elif verb == "orphans":
                return ["ok", self.orphans(*args)]
            elif verb == "tag":
                unique, ring, head = args
                w = self.waits.get(unique)
                if w is not None and w.wid == wid:
                    w.ring, w.head = ring, head
                return None
            elif verb == "interrupt":
                w = self.cancel(*args)
                if w is not None:
                    self._finish([w], errno.EINTR)
                else:
                    self.early_interrupts.append(args[0])
                return None
            elif verb == "withdraw":
                for unique in args[0]:
                    w = self.waits.get(unique)
                    if w is not None and w.wid == wid:
                        self.cancel(unique)
                return None
            else:
                return ["err", errno.EINVAL]
            return ["ok", 0]
        except (OSError, FsError) as e:
            return None if verb in LINK_CASTS else ["err", e.errno or errno.EIO]
        except (TypeError, ValueError) as e:
            log.warning("worker %d sent a bad %r: %s", wid, verb, e)
            if fd is not None:
                os.close(fd)
            return None if verb in LINK_CASTS else ["err", errno.EINVAL]

    def _finish(self, done: list[Wait] | list[tuple[Wait, int]], err: int = 0) -> None:
        """Tell each wait's worker its answer (one-way, never blocking)."""
        for item in done:
            w, e = item if isinstance(item, tuple) else (item, err)
            link = self.links.get(w.wid)
            if link is None:
                continue
            try:
                control.send(link.done, ["done", w.unique, e])
            except OSError as ex:
                log.error("cannot complete a lock wait on worker %d: %s", w.wid, ex)

    # -- process body ---------------------------------------------------------------------

    def attach(self, wid: int, call_fd: int, done_fd: int) -> None:
        old = self.links.get(wid)
        if old is not None:
            self._drop(old)
        link = Link(wid, socket.socket(fileno=call_fd), socket.socket(fileno=done_fd))
        self.links[wid] = link
        self.by_fd[link.call.fileno()] = link
        self.ep.register(link.call.fileno(), select.EPOLLIN)

    def _drop(self, link: Link) -> None:
        self.by_fd.pop(link.call.fileno(), None)
        if self.links.get(link.wid) is link:
            del self.links[link.wid]
        try:
            self.ep.unregister(link.call.fileno())
        except (OSError, ValueError):
            pass
        link.close()
        self.worker_gone(link.wid)

    def run(self) -> None:
        from shardfs.proc.worker import die_with_parent, set_process_name

        assert self.sock is not None
        set_process_name("shardfs-locks")
        die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ctrl = self.sock.fileno()
        self.ep.register(ctrl, select.EPOLLIN)
        while self.running:
            due = self.next_due()
            timeout = -1.0 if due is None else max(due - time.monotonic(), 0.0)
            try:
                events = self.ep.poll(timeout)
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == ctrl:
                    self._control()
                else:
                    link = self.by_fd.get(fd)
                    if link is not None:
                        self._serve(link)
            if self.waits:
                self._finish(self.retry(time.monotonic()))
        self.destroy()
        for link in list(self.links.values()):
            self._drop(link)

    def _serve(self, link: Link) -> None:
        try:
            msg, fds = control.recv(link.call)
        except (control.ControlError, OSError):
            log.info("worker %d's lock link closed: withdrawing its waits", link.wid)
            self._drop(link)
            return
        reply = self.handle(link.wid, msg, fds)
        if reply is not None:
            try:
                control.send(link.call, reply)
            except OSError as e:
                log.info("worker %d went away before its lock reply: %s", link.wid, e)

    def _control(self) -> None:
        assert self.sock is not None
        try:
            msg, fds = control.recv(self.sock)
        except control.ControlError:
            self.running = False
            return
        verb = msg[0]
        if verb == "attach" and len(fds) == 2:
            self.attach(msg[1], fds[0], fds[1])
            control.send(self.sock, ["ok", None])
            return
        for fd in fds:
            os.close(fd)
        if verb == "ping":
            control.send(self.sock, ["ok", "pong"])
        elif verb == "stats":
            control.send(self.sock, ["ok", {"files": len(self.holders),
                                            "waits": len(self.waits)}])
        elif verb == "exit":
            self.running = False
        else:
            control.send(self.sock, ["err", f"unknown verb {verb!r}"])


def attach_worker(owner: socket.socket, worker: socket.socket, wid: int, flags: int) -> None:
    """Link worker ``wid`` to the lock process: two socketpairs, an end of each to both.

    ``flags`` are the INIT flags the worker offers (FUSE_POSIX_LOCKS and/or
    FUSE_FLOCK_LOCKS).  The lock process gets its ends first and has dropped
    any older link of ``wid`` (withdrawing a dead worker's waits) before the
    worker can ask it anything.  OSError or ControlError if either is
    unreachable.
    """
    call_mine, call_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    done_mine, done_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        control.call(owner, ["attach", wid], [call_mine.fileno(), done_mine.fileno()])
        control.call(worker, ["lock_link", flags], [call_theirs.fileno(), done_theirs.fileno()])
    finally:
        for s in (call_mine, call_theirs, done_mine, done_theirs):
            s.close()


def init_flags(kinds: frozenset[str]) -> int:
    """The INIT flags the ``locks`` kinds offer the guest."""
    return ((FUSE_POSIX_LOCKS if "posix" in kinds else 0)
            | (FUSE_FLOCK_LOCKS if "flock" in kinds else 0))


def lock_process_body(sock: socket.socket, policy: SandboxPolicy, shared_dir: str) -> None:
    """The forked lock process: confined as a worker is (it opens nothing itself:
    every description arrives from a worker), then :meth:`LockOwner.run`."""
    try:
        confine(policy, shared_dir, lambda path: None)
    except OSError as e:
        log.error("the lock process cannot start: %s", e)
        return
    LockOwner(sock).run()
