"""A worker's side of the lock process, and its chains answered out of order.

:class:`LockClient` is what the dispatcher calls for GETLK, SETLK, SETLKW,
FLUSH, RELEASE, INTERRUPT and DESTROY (the ``LockService`` protocol in
:mod:`shardfs.dispatch`).  It forwards each to the lock process
(:mod:`shardfs.proc.locks`) over the worker's call socket and waits for the
answer, which never blocks there: the lock process only ever tries locks
without waiting.

**Deferred completion.**  A SETLKW that conflicts raises
:class:`~shardfs.fs.locks.Pending`; the dispatcher answers nothing and the
worker calls :meth:`LockClient.park` with the ring index and the chain's
head.  The chain stays taken (not in the used ring) while the worker serves
the rest of its queue.  The lock process later sends ``["done", unique,
errno]`` on the worker's *completion* socket, which the worker polls beside
its kick fds; :meth:`LockClient.complete` then walks the chain again at its
head (no views of guest memory are kept meanwhile, so memory may change
under a parked chain), writes the reply header and pushes it: the request
completes out of order.  The contract with the worker is three calls:
``park`` after a PENDING dispatch, ``complete`` when ``done_fd`` is
readable, ``abandon`` before a ring stops.

**Abandoned chains.**  A ring that stops (GET_VRING_BASE, reset,
disconnect) answers its parked chains EINTR first (the guest kernel
restarts an interrupted lock call by itself, fs/fuse/file.c ``fuse_setlk``)
and withdraws the waits.  A worker that crashes leaves its parked chains to
the lock process, which withdraws the waits and hands their heads to the
replacement (:meth:`LockClient.orphans`, used by the worker's crash
recovery).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from shardfs.abi import fuse as F
from shardfs.fs.api import FsError
from shardfs.fs.locks import Pending, check_range
from shardfs.proc import control
from shardfs.virtq.chain import ChainWriter, ShortRead
from shardfs.virtq.memory import GuestMemory
from shardfs.virtq.split import QueueError, SplitQueue

log = logging.getLogger("shardfs.locks")


class DirtyLike(Protocol):
    """The live-migration dirty log (``shardfs.virtq.dirtylog.DirtyLog``)."""

    def mark_views(self, views: Iterable[memoryview]) -> None: ...

    def mark_used(self, index: int) -> None: ...


class RingLike(Protocol):
    """What :meth:`LockClient.complete` needs of a worker's ring."""

    queue: SplitQueue
    call_fd: int | None


def answer(q: SplitQueue, mem: GuestMemory, head: int, unique: int, err: int,
           dirty: DirtyLike | None = None) -> None:
    """Reply ``-err`` (0: success, no body) to the parked chain at ``head`` and push it;
    with a dirty log (live migration), mark what was written."""
    chain = q.chain_at(mem, head)
    used = 0
    if chain is not None:
        w = ChainWriter(chain.writable, chain.writable_len)
        try:
            w.write_at(0, F.fuse_out_header.pack(F.fuse_out_header.size, -err, unique))
            used = F.fuse_out_header.size
        except ShortRead:
            used = 0
        if dirty is not None:
            dirty.mark_views(chain.writable)
    q.push(head, used)
    if dirty is not None:
        dirty.mark_used(q.index)


class LockClient:
    """One worker's link to the lock process (see the module doc)."""

    def __init__(self, call_fd: int, done_fd: int, init_flags: int) -> None:
        self.call = socket.socket(fileno=call_fd)
        self.done = socket.socket(fileno=done_fd)
        self.done.setblocking(False)
        #: FUSE_POSIX_LOCKS and/or FUSE_FLOCK_LOCKS, offered at INIT.
        self.init_flags = init_flags
        #: unique -> (ring index, head) of chains parked here.
        self.parked: dict[int, tuple[int, int]] = {}
        self._last_pending: int | None = None
        self.broken = False

    @property
    def done_fd(self) -> int:
        return self.done.fileno()

    def close(self) -> None:
        self.call.close()
        self.done.close()

    # -- requests ---------------------------------------------------------------------

    def _call(self, msg: list[Any], fd: int | None = None) -> list[Any]:
        if self.broken:
            raise FsError(errno.ENOLCK, "the lock process is gone")
        try:
            control.send(self.call, msg, [fd] if fd is not None else [])
            reply, fds = control.recv(self.call)
        except (OSError, control.ControlError) as e:
            self.broken = True
            log.error("the lock process is unreachable (%s): locks answer ENOLCK", e)
            raise FsError(errno.ENOLCK, "the lock process is gone") from None
        finally:
            if fd is not None:
                os.close(fd)
        for extra in fds:
            os.close(extra)
        if reply[0] == "err":
            raise FsError(int(reply[1]))
        return reply

    def _cast(self, msg: list[Any]) -> None:
        if self.broken:
            return
        try:
            control.send(self.call, msg)
        except OSError as e:
            self.broken = True
            log.error("the lock process is unreachable (%s)", e)

    def _with_fd(self, msg: list[Any], open_fd: Callable[[bool], int | None]) -> list[Any]:
        """Ask; if the lock process needs a description of the file, open one and ask again.

        ``open_fd(False)`` only checks the guest's fh (a forged one raises
        EBADF); ``open_fd(True)`` returns a new open file description.
        """
        open_fd(False)
        reply = self._call(msg)
        if reply[0] == "need_fd":
            fd = open_fd(True)
            reply = self._call(msg, fd)
        return reply

    def getlk(self, open_fd: Callable[[bool], int | None], nodeid: int, owner: int,
              start: int, end: int, typ: int) -> tuple[int, int, int, int]:
        """(type, start, end, pid) of a conflicting lock; F_UNLCK if none."""
        check_range(start, end, typ)
        reply = self._with_fd(["getlk", nodeid, owner, start, end, typ], open_fd)
        if reply[0] != "ok":
            raise FsError(errno.EIO, f"lock process answered {reply[0]!r}")
        t, s, e, p = reply[1]
        return int(t), int(s), int(e), int(p)

    def setlk(self, open_fd: Callable[[bool], int | None], nodeid: int, owner: int,
              is_flock: bool, start: int, end: int, typ: int, pid: int,
              wait_unique: int) -> None:
        """Lock or unlock; raises Pending when a SETLKW (``wait_unique`` set) must wait."""
        check_range(start, end, typ)
        reply = self._with_fd(["setlk", nodeid, owner, is_flock, start, end, typ, pid,
                               wait_unique], open_fd)
        if reply[0] == "pending":
            self._last_pending = wait_unique
            raise Pending()
        if reply[0] != "ok":
            raise FsError(errno.EIO, f"lock process answered {reply[0]!r}")

    def flush(self, nodeid: int, owner: int) -> None:
        self._call(["flush", nodeid, owner])

    def release(self, nodeid: int, owner: int, flock_unlock: bool) -> None:
        if flock_unlock:
            self._call(["release", nodeid, owner, True])

    def interrupt(self, unique: int) -> None:
        self._cast(["interrupt", unique])

    def destroy(self) -> None:
        try:
            self._call(["destroy"])
        except FsError:
            pass

    # -- deferred completion (the worker's three calls) --------------------------------------

    def park(self, ring: int, head: int) -> None:
        """The chain just dispatched is PENDING: remember where it is."""
        unique = self._last_pending
        self._last_pending = None
        if unique is None:
            log.error("a chain was parked with no wait pending; answering nothing")
            return
        self.parked[unique] = (ring, head)
        self._cast(["tag", unique, ring, head])

    def complete(self, rings: Mapping[int, RingLike], mem: GuestMemory,
                 dirty: DirtyLike | None = None) -> int:
        """Answer the chains whose waits ended; return how many rings were touched.

        If the lock process is gone, every parked chain is answered ENOLCK and
        the completion socket is closed (which takes it out of the worker's epoll).
        """
        touched: dict[int, RingLike] = {}
        while True:
            try:
                msg, fds = control.recv(self.done)
            except BlockingIOError:
                break
            except (OSError, control.ControlError) as e:
                # The lock process died (or is shutting down with the daemon):
                # every parked wait ends with ENOLCK.
                (log.error if self.parked else log.info)(
                    "the lock process went away (%s): %d parked lock wait(s) fail",
                    e, len(self.parked))
                self.broken = True
                msg, fds = ["gone"], []
            for fd in fds:
                os.close(fd)
            if msg[0] == "gone":
                done = [(u, errno.ENOLCK) for u in list(self.parked)]
            elif msg[0] == "done" and len(msg) == 3:
                done = [(int(msg[1]), int(msg[2]))]
            else:
                continue
            for unique, err in done:
                spot = self.parked.pop(unique, None)
                if spot is None:
                    continue
                ring = rings.get(spot[0])
                if ring is None or not ring.queue.ready:
                    continue
                try:
                    answer(ring.queue, mem, spot[1], unique, err, dirty)
                except QueueError as e:
                    log.error("queue %d: a lock reply could not be pushed: %s", spot[0], e)
                    continue
                touched[spot[0]] = ring
            if self.broken:
                self.done.close()
                break
        for ring in touched.values():
            if ring.call_fd is not None and ring.queue.needs_notification():
                os.eventfd_write(ring.call_fd, 1)
        return len(touched)

    def abandon(self, index: int, q: SplitQueue, mem: GuestMemory,
                dirty: DirtyLike | None = None, call_fd: int | None = None) -> None:
        """Ring ``index`` stops: answer its parked chains EINTR (signalling ``call_fd``
        if given) and withdraw their waits."""
        gone = [u for u, (ring, _) in self.parked.items() if ring == index]
        if not gone:
            return
        pushed = False
        for unique in gone:
            _, head = self.parked.pop(unique)
            if q.ready:
                try:
                    answer(q, mem, head, unique, errno.EINTR, dirty)
                    pushed = True
                except QueueError:
                    pass
        self._cast(["withdraw", gone])
        if pushed and call_fd is not None:
            os.eventfd_write(call_fd, 1)

    def orphans(self, index: int) -> list[int]:
        """Heads of ring ``index``'s chains parked in a worker that died before us."""
        try:
            reply = self._call(["orphans", index])
        except FsError:
            return []
        return [int(h) for h in reply[1]]


def in_flight_heads(q: SplitQueue, orphans: list[int]) -> list[int] | None:
    """After a crash: the heads a dead worker took and never answered.

    Without parked chains they are the last ``n`` the avail ring gave it
    (``n`` = taken minus completed), as requests are answered in order.
    Parked chains (``orphans``) break that order; every other chain is
    still answered in order before the next is taken, so at most the last
    one taken can be unanswered besides them.  None if the counts disagree.
    """
    n = (q.last_avail_idx - q.used_idx) & 0xFFFF
    if n > q.num:
        return None
    if not orphans:
        return [q.head_at((q.used_idx + k) & 0xFFFF) for k in range(n)]
    rest = n - len(orphans)
    if rest not in (0, 1):
        return None
    last = [q.head_at((q.last_avail_idx - 1) & 0xFFFF)] if rest else []
    return orphans + [h for h in last if h not in orphans]
