"""A worker process: serves the virtqueues the supervisor assigns to it.

One worker per request queue (design card); worker 0 also serves the hiprio
queue, so FORGET meets the same node table as the LOOKUPs it balances.

The loop is single-threaded: epoll on the control socket and on each ring's
kick eventfd.  Because a request is served to completion before the next
event is taken, a control message (ring stop, memory change, call fd swap) is
always applied between requests; "ring stop returns once in-flight work is
settled" holds by construction.

Per kick, the worker drains the ring with notifications suppressed, re-enables
them, re-checks the avail index (DESIGN §1, EVENT_IDX) and loops until it is
empty, then signals the call fd at most once if the used-event rule asks.
With adaptive polling the re-enabling waits until the polling ends: while the
worker watches the ring, the driver is not asked to kick.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardfs.dispatch import PENDING, Dispatcher
from shardfs.fs.api import FileSystem
from shardfs.proc import control
from shardfs.proc.lockclient import LockClient, in_flight_heads
from shardfs.proc.pressure import CpuPressure
from shardfs.proc.stats import FIELDS, HIST_BUCKETS, MAX_QUEUES, QueueCounters, create_page
from shardfs.sandbox.userns import may_setgroups
from shardfs.virtq.dirtylog import DirtyLog, LogState
from shardfs.virtq.memory import GuestMemory, GuestMemoryError
from shardfs.virtq.split import CALL, OWED, QueueError, SplitQueue

if TYPE_CHECKING:
    from shardfs.proc.dax import DaxClient

log = logging.getLogger("shardfs.worker")

#: Per-ring progress word, shared with the supervisor: the next avail index
#: the owning worker will take (read by shardfs.proc.device.WorkerDevice.replay).
PROGRESS = struct.Struct("<I")
_pack_progress = PROGRESS.pack_into
(REQUESTS, ERRORS, MALFORMED, BYTES_READ, BYTES_WRITTEN, BUSY_NS, KICKS,
 NOTIFICATIONS) = range(len(FIELDS))

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1


def set_process_name(name: str) -> None:
    """Name the process for ps/top (prctl PR_SET_NAME; 15 bytes kept)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def die_with_parent() -> None:
    """SIGTERM this process when the supervisor dies (prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def drop_supplementary_groups() -> None:
    """CVE-2022-0358: a root daemon's groups must not leak into guest-created files.

    Requests run with the caller's fsuid/fsgid; supplementary groups stay
    with the process, so they are dropped before the first request.  Not in
    a rootless user namespace with ``setgroups = deny`` (sandbox.userns):
    there the kernel refuses, and only one id exists to switch to.
    """
    if os.geteuid() == 0 and may_setgroups():
        os.setgroups([])


class Ring:
    """A started ring: its queue and the two eventfds the worker owns."""

    queue: SplitQueue
    kick_fd: int
    call_fd: int | None
    enabled: bool
    counters: QueueCounters
    errors: list[str]

    def __init__(self, queue: SplitQueue, kick_fd: int, call_fd: int | None, enabled: bool,
                 counters: QueueCounters, errors: list[str] | None = None) -> None:
        self.queue = queue
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.enabled = enabled
        self.counters = counters
        self.errors = [] if errors is None else errors


def next_poll_window(window_ns: int, slept_ns: int, max_ns: int) -> int:
    """The polling window after a sleep that a kick ended ``slept_ns`` later.

    KVM's halt-polling rule: a kick that came within ``max_ns`` of going to
    sleep would have been caught by a longer spin, so the window grows (from
    an eighth of the maximum, doubling); one that came later would not have
    been caught by any allowed spin, so the window halves, down to 0.  A
    driver that keeps requests in flight keeps the window open; a slow one
    (a TCG guest: requests a millisecond apart) closes it in a few sleeps and
    stops paying up to ``max_ns`` of CPU per request for nothing.
    """
    floor = max_ns // 8
    if slept_ns <= max_ns:
        return min(max(window_ns * 2, floor), max_ns)
    window_ns //= 2
    return window_ns if window_ns >= floor else 0


class Worker:
    """State of one worker process; :meth:`run` is the process body."""

    def __init__(self, wid: int, sock: socket.socket, make_fs: Callable[[], FileSystem],
                 progress: mmap.mmap | None = None, stats_page: mmap.mmap | None = None,
                 poll_us: int = 0, dax: DaxClient | None = None) -> None:
        self.wid = wid
        #: This worker's link to the DAX coordinator (None: DAX is off).
        self.dax = dax
        self.poll_ns = poll_us * 1000
        #: The current spin before sleeping, 0..poll_ns (see next_poll_window).
        self.window_ns = self.poll_ns
        #: No spinning while tasks wait for a CPU (proc.pressure); opened here,
        #: before the sandbox hides /proc.
        self.pressure = CpuPressure() if poll_us else None
        self.stats_page = stats_page if stats_page is not None else create_page(MAX_QUEUES)
        #: Shared with the supervisor: per ring, the next avail index we take.
        self.progress = progress if progress is not None else mmap.mmap(-1, PROGRESS.size * 64)
        self.sock = sock
        self.make_fs = make_fs
        self.mem = GuestMemory()
        self.rings: dict[int, Ring] = {}
        self.by_kick: dict[int, Ring] = {}
        self.ep = select.epoll()
        self.dispatcher: Dispatcher | None = None
        self.running = True
        #: Host-visible locks (proc.lockclient): chains parked and answered later.
        self.locks: LockClient | None = None
        #: Live migration: the dirty log to mark after every guest-memory
        #: write, or None (the only cost when off: one test per request).
        self.logging = LogState()
        self.dirty: DirtyLog | None = None

    # -- process body ---------------------------------------------------------

    def run(self) -> None:
        set_process_name(f"shardfs-w{self.wid}")
        die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        drop_supplementary_groups()
        try:
            fs = self.make_fs()
        except (OSError, ValueError) as e:
            log.error("worker %d cannot serve the shared directory: %s", self.wid, e)
            return
        self.dispatcher = Dispatcher(fs, self.dax)
        self.ep.register(self.sock.fileno(), select.EPOLLIN)
        log.debug("worker %d ready", self.wid)
        clock = time.perf_counter_ns
        while self.running:
            asleep = clock()
            try:
                events = self.ep.poll()
            except InterruptedError:
                continue
            slept = clock() - asleep
            kicked = False
            for fd, _ in events:
                if fd == self.sock.fileno():
                    self._control()
                else:
                    ring = self.by_kick.get(fd)
                    if ring is not None:
                        kicked = True
                        self._kick(ring)
                    elif self.locks is not None and fd == self.locks.done_fd:
                        self.locks.complete(self.rings, self.mem, self.dirty)
            if self.poll_ns and self.rings:
                if kicked:
                    self.window_ns = next_poll_window(self.window_ns, slept, self.poll_ns)
                self._spin()

    # -- data path ------------------------------------------------------------

    def _kick(self, ring: Ring) -> None:
        try:
            os.eventfd_read(ring.kick_fd)
        except BlockingIOError:
            pass
        ring.counters.values[KICKS] += 1
        self.serve(ring)

    def _spin(self) -> None:
        """Adaptive polling: watch the rings for ``window_ns`` before sleeping.

        A cross-CPU eventfd wake-up costs tens of microseconds here (DESIGN
        §5); a request that arrives while we spin is taken without one.
        Every request served restarts the budget, so a busy queue is polled
        continuously and an idle one costs at most ``window_ns`` of CPU; the
        window itself follows how soon kicks come (:func:`next_poll_window`).
        No spin at all while other tasks wait for a CPU (:mod:`shardfs.proc.pressure`):
        under TCG they are the guest's vCPUs, and the spin would take their time.
        """
        clock = time.perf_counter_ns
        rings = list(self.rings.values())
        pressure = self.pressure
        window = self.window_ns
        if pressure is not None and pressure.contended(clock()):
            window = 0
        while True:
            deadline = clock() + window
            while clock() < deadline:
                for ring in rings:
                    q = ring.queue
                    try:
                        waiting = q.ready and ring.enabled and q.pending()
                    except QueueError:
                        waiting = False
                    if waiting:
                        self.serve(ring)
                        now = clock()
                        if pressure is not None and pressure.contended(now):
                            window = 0  # a busy ring spun on while the guest waited
                        deadline = now + window
            # serve() left the driver's notifications off while we watched the
            # rings: ask for kicks again before sleeping, and look once more.
            again = False
            for ring in rings:
                q = ring.queue
                if q.ready and ring.enabled:
                    try:
                        waiting = q.enable_notification()
                    except QueueError:
                        waiting = True  # serve() stops the ring and says why
                    if waiting:
                        self.serve(ring)
                        again = True
            if not again:
                return

    def serve(self, ring: Ring) -> None:
        """Drain ``ring``; signal its call fd once if the driver wants it."""
        q = ring.queue
        if not q.ready or not ring.enabled:
            return
        assert self.dispatcher is not None
        handle = self.dispatcher.handle
        mem = self.mem
        progress, slot = self.progress, PROGRESS.size * q.index
        clock = time.perf_counter_ns
        counters = ring.counters
        values, hist = counters.values, counters.hist
        st = self.dispatcher.stats
        before = (st.errors, st.malformed, st.bytes_read, st.bytes_written)
        pop, push = q.pop, q.push
        idle = self.dispatcher.fs.idle
        pushed = busy_ns = 0
        # A driver waiting for a completion is called as soon as one is ready,
        # not when the whole batch is: it refills the ring meanwhile.  When the
        # ring is empty after a push, the driver may be waiting for exactly that
        # reply (depth 1): the decision is made there and then, so the driver's
        # wake-up overlaps the bookkeeping below instead of following it.
        call_fd = ring.call_fd
        decide, needs_notification = q.decide, q.needs_notification
        owed = False  # pushes no call decision has covered yet
        # With polling, _spin() watches the ring next and asks for kicks only
        # before it sleeps: a driver publishing meanwhile need not kick.
        rearm = not self.poll_ns
        dirty = self.dirty
        t0 = clock()
        try:
            while True:
                q.disable_notification()
                while True:
                    chain = pop(mem)
                    if chain is None:
                        break
                    _pack_progress(progress, slot, q.last_avail_idx)
                    if isinstance(chain, int):
                        log.warning("queue %d: malformed descriptor chain at head %d dropped",
                                    q.index, chain)
                        push(chain, 0)
                        values[MALFORMED] += 1
                        owed = True
                    else:
                        idle()
                        used = handle(chain)
                        if dirty is not None:
                            # Before the push: once the driver can see the reply,
                            # its pages are in the log (a READ's raw iovecs too).
                            chain.materialize()
                            dirty.mark_views(chain.writable)
                        if used != PENDING:
                            push(chain.head, used)
                        elif self.locks is not None:
                            self.locks.park(q.index, chain.head)
                        # One clock read per request: this one ends it and starts the next.
                        t1 = clock()
                        dt = t1 - t0
                        t0 = t1
                        if call_fd is not None:
                            call = decide()
                            if call == CALL:
                                os.eventfd_write(call_fd, 1)
                                values[NOTIFICATIONS] += 1
                            owed = call == OWED
                        busy_ns += dt
                        bucket = (dt // 1000).bit_length()  # stats.latency_bucket, inlined
                        hist[bucket if bucket < HIST_BUCKETS else HIST_BUCKETS - 1] += 1
                    pushed += 1
                if not rearm or not q.enable_notification():
                    break
        except QueueError as e:
            # The driver broke the ring itself; serving on would read garbage.
            log.error("queue %d stopped: %s", q.index, e)
            ring.errors.append(str(e))
            q.ready = False
        if dirty is not None:
            dirty.mark_used(q.index)
        values[BUSY_NS] += busy_ns
        values[REQUESTS] += pushed
        values[ERRORS] += st.errors - before[0]
        values[MALFORMED] += st.malformed - before[1]
        values[BYTES_READ] += st.bytes_read - before[2]
        values[BYTES_WRITTEN] += st.bytes_written - before[3]
        self.dispatcher.fs.idle()
        if owed and call_fd is not None and q.ready and needs_notification():
            os.eventfd_write(call_fd, 1)
            values[NOTIFICATIONS] += 1
        if self.locks is not None and self.locks.parked:
            # Lock grants must not wait for a busy queue's polling to end.
            self.locks.complete(self.rings, self.mem, self.dirty)

    # -- control path ---------------------------------------------------------

    def _control(self) -> None:
        try:
            msg, fds = control.recv(self.sock)
        except control.ControlError:
            log.debug("worker %d: supervisor went away", self.wid)
            self.running = False
            return
        verb = msg[0]
        handler = getattr(self, f"c_{verb}", None)
        try:
            if handler is None:
                raise control.ControlError(f"unknown control verb {verb!r}")
            value = handler(msg[1:], fds)
            reply: list[Any] = ["ok", value]
        except (control.ControlError, GuestMemoryError, QueueError, OSError, ValueError) as e:
            log.error("worker %d: %s failed: %s", self.wid, verb, e)
            for fd in fds:
                _close(fd)
            reply = ["err", str(e)]
        try:
            control.send(self.sock, reply)
        except OSError:
            self.running = False

    def _resolve_rings(self) -> None:
        if self.dirty is not None:
            self.dirty.set_regions(self.mem)
        for ring in self.rings.values():
            if ring.queue.num:
                try:
                    ring.queue.resolve(self.mem)
                except QueueError as e:
                    log.warning("%s (ring paused until memory returns)", e)

    def c_mem_set(self, args: list[Any], fds: list[int]) -> None:
        (regions,) = args
        self.mem.clear()
        try:
            for (gpa, size, uaddr, off), fd in zip(regions, fds, strict=True):
                self.mem.add(gpa, size, uaddr, off, fd)
        finally:
            for fd in fds:
                _close(fd)
        self._resolve_rings()

    def c_mem_add(self, args: list[Any], fds: list[int]) -> None:
        (gpa, size, uaddr, off), = args
        try:
            self.mem.add(gpa, size, uaddr, off, fds[0])
        finally:
            for fd in fds:
                _close(fd)
        self._resolve_rings()

    def c_mem_remove(self, args: list[Any], fds: list[int]) -> bool:
        (gpa, size, _uaddr, _off), = args
        found = self.mem.remove(gpa, size)
        self._resolve_rings()
        return found

    def c_ring_start(self, args: list[Any], fds: list[int]) -> None:
        index, num, desc, avail, used, base, event_idx, indirect, enabled, recover = args
        self._drop_ring(index)
        kick_fd = fds[0]
        call_fd = fds[1] if len(fds) > 1 else None
        q = SplitQueue(index)
        try:
            q.configure(num, self.mem.user_to_gpa(desc, 16 * num),
                        self.mem.user_to_gpa(avail, 4), self.mem.user_to_gpa(used, 4),
                        base, event_idx, indirect, self.mem)
        except (GuestMemoryError, QueueError):
            for fd in fds:
                _close(fd)
            raise
        _pack_progress(self.progress, PROGRESS.size * index, q.last_avail_idx)
        os.set_blocking(kick_fd, False)
        ring = Ring(q, kick_fd, call_fd, enabled, QueueCounters(self.stats_page, index))
        if recover:
            self._fail_in_flight(ring)
        self.rings[index] = ring
        self.by_kick[kick_fd] = ring
        self.ep.register(kick_fd, select.EPOLLIN)
        # Chains may already be waiting: the driver kicked before we listened.
        self.serve(ring)

    def _fail_in_flight(self, ring: Ring) -> None:
        """After a crash: answer EIO to the chains the dead worker took but never returned.

        They sit between used.idx (what it completed) and our starting avail
        index (what it had taken, from the progress word).  Replaying them
        instead could repeat a non-idempotent request, or the one that
        crashed it.
        """
        q = ring.queue
        assert self.dispatcher is not None
        n = (q.last_avail_idx - q.used_idx) & 0xFFFF
        if n > q.num:
            log.error("queue %d: progress %d and used %d disagree; not recovering", q.index,
                      q.last_avail_idx, q.used_idx)
            return
        heads = in_flight_heads(q, self.locks.orphans(q.index) if self.locks else [])
        if heads is None:
            log.error("queue %d: %d in flight but parked lock waits disagree; not recovering",
                      q.index, n)
            return
        n = len(heads)
        for head in heads:
            chain = q.chain_at(self.mem, head)
            q.push(head, self.dispatcher.fail(chain, errno.EIO))
            if self.dirty is not None and chain is not None:
                self.dirty.mark_views(chain.writable)
        if self.dirty is not None:
            self.dirty.mark_used(q.index)
        if n:
            log.warning("queue %d: %d request(s) in flight in the dead worker answered EIO",
                        q.index, n)
            if ring.call_fd is not None:
                os.eventfd_write(ring.call_fd, 1)

    def c_ring_stop(self, args: list[Any], fds: list[int]) -> int:
        (index,) = args
        ring = self.rings.get(index)
        if ring is None:
            raise control.ControlError(f"ring {index} is not started here")
        if self.locks is not None:
            # Parked lock waits are requests in flight: answer them (EINTR) while
            # the ring still runs, so that GET_VRING_BASE leaves none taken but
            # unanswered (a migration would strand them; DESIGN §1 "Ring life").
            self.locks.abandon(index, ring.queue, self.mem, self.dirty)
        if self.dirty is not None:
            # Before QEMU's last harvest: avail_event/flags writes made after a batch.
            self.dirty.mark_used(index)
        base = ring.queue.stop()
        self._drop_ring(index)
        return base

    def c_ring_call(self, args: list[Any], fds: list[int]) -> None:
        (index,) = args
        ring = self.rings.get(index)
        if ring is None:
            for fd in fds:
                _close(fd)
            raise control.ControlError(f"ring {index} is not started here")
        _close(ring.call_fd)
        ring.call_fd = fds[0] if fds else None
        # A chain completed while the call fd was masked must still be signalled.
        if ring.call_fd is not None and ring.queue.ready:
            os.eventfd_write(ring.call_fd, 1)

    def c_ring_enable(self, args: list[Any], fds: list[int]) -> None:
        index, enabled = args
        ring = self.rings.get(index)
        if ring is None:
            raise control.ControlError(f"ring {index} is not started here")
        ring.enabled = bool(enabled)
        if ring.enabled:
            self.serve(ring)

    def c_stop_rings(self, args: list[Any], fds: list[int]) -> None:
        """RESET_DEVICE: drop every ring; memory stays mapped."""
        for index in list(self.rings):
            self._drop_ring(index)

    def c_reset(self, args: list[Any], fds: list[int]) -> None:
        """The frontend reset the device or left: drop rings, memory and FUSE state."""
        for index in list(self.rings):
            self._drop_ring(index)
        self.mem.clear()
        self.logging.close()
        self.dirty = None
        (drop_fs,) = args
        if drop_fs and self.dispatcher is not None:
            self.dispatcher.fs.destroy()
            if self.locks is not None:
                self.locks.destroy()  # nothing of this guest's stays locked on the host
            self.dispatcher.initialized = False

    def c_dirty_log(self, args: list[Any], fds: list[int]) -> None:
        """SET_LOG_BASE (with an fd) or LOG_ALL on/off (without): see virtq.dirtylog."""
        size, offset, enabled, has_fd = args
        try:
            self.dirty = self.logging.configure(size, offset, bool(enabled),
                                                fds[0] if has_fd and fds else None, self.mem)
        finally:
            for fd in fds:
                _close(fd)

    def c_dirty_ring(self, args: list[Any], fds: list[int]) -> None:
        """A ring's VHOST_VRING_F_LOG address (None: its used ring is not logged)."""
        index, log_gpa, num = args
        self.dirty = self.logging.ring(index, log_gpa, num, self.mem)

    def c_stats(self, args: list[Any], fds: list[int]) -> dict[str, Any]:
        assert self.dispatcher is not None
        s = self.dispatcher.stats
        return {"worker": self.wid, "pid": os.getpid(), "requests": s.requests,
                "errors": s.errors, "malformed": s.malformed, "dropped": s.dropped,
                "bugs": s.bugs, "rings": sorted(self.rings)}

    def c_dax_link(self, args: list[Any], fds: list[int]) -> None:
        """A (new) link to the DAX coordinator: at start, and after it restarted."""
        if self.dax is None or len(fds) != 1:
            raise control.ControlError("no DAX here, or not one fd")
        self.dax.attach(fds[0])

    def c_lock_link(self, args: list[Any], fds: list[int]) -> None:
        """The link to the lock process (proc.locks.attach_worker): call and completion fds."""
        if len(fds) != 2 or self.dispatcher is None:
            raise control.ControlError("a lock link needs two fds and a running dispatcher")
        if self.locks is not None:
            try:
                self.ep.unregister(self.locks.done_fd)
            except (OSError, ValueError):
                pass  # closed already: the lock process had gone
            self.locks.close()
        self.locks = LockClient(fds[0], fds[1], args[0])
        self.dispatcher.locks = self.locks
        self.ep.register(self.locks.done_fd, select.EPOLLIN)

    def c_migrated(self, args: list[Any], fds: list[int]) -> None:
        """The FUSE session was loaded from a migration stream (proc.migration):
        count it as initialized, so that a re-INIT (guest reboot) drops it."""
        if self.dispatcher is not None:
            self.dispatcher.initialized = True

    def c_ping(self, args: list[Any], fds: list[int]) -> str:
        return "pong"

    def c_exit(self, args: list[Any], fds: list[int]) -> None:
        self.running = False

    def _drop_ring(self, index: int) -> None:
        ring = self.rings.pop(index, None)
        if ring is None:
            return
        self.by_kick.pop(ring.kick_fd, None)
        try:
            self.ep.unregister(ring.kick_fd)
        except (OSError, ValueError):
            pass
        if self.locks is not None:
            self.locks.abandon(index, ring.queue, self.mem, self.dirty, ring.call_fd)
        _close(ring.kick_fd)
        _close(ring.call_fd)
        ring.queue.stop()


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
