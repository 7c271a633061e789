"""The coordinator process: the single owner of the DAX window (DESIGN §3).

FUSE_SETUPMAPPING and FUSE_REMOVEMAPPING arrive on every request queue, but
they change one table (what file range is mapped at which window offset)
and the frontend must see them in one order.  So one process applies them,
one at a time, to completion: the coordinator.  It holds

* the **mapping table** (:class:`~shardfs.proc.dax.DaxTable`),
* the **backend request channel** from SET_BACKEND_REQ_FD, which the
  supervisor passes on (a dup of it; the supervisor keeps one to hand to a
  restarted coordinator),
* one **link** (SOCK_SEQPACKET) per worker, over which workers forward
  requests; why a socket and not posix_ipc is in :mod:`shardfs.proc.dax`,
* the shared node and handle table (inherited memory, read only here) and
  an fd of the share, to open files by their file handle.

**A request, step by step.**  The worker checks the numbers
(:meth:`Geometry.check_setup`) and forwards it.  The coordinator checks the
numbers again, then the ids against the shared table *at this moment*: the
node must be live and a regular file; an explicit fh must be a live file
handle of that node opened for a mode that allows the mapping (PROT_WRITE
on MAP_SHARED needs O_RDWR, any mapping needs read access: EACCES
otherwise); the Linux driver's fh of -1 (it maps per inode) needs the guest
to hold a file handle on the node open for reading, or for writing if the
map is writable (EBADF if it holds none, EACCES if only other modes; such
a writable map is opened O_RDWR even if the guest's handle is O_WRONLY,
since a shared writable mapping needs it).  A read-only share refuses
writable maps (EROFS).  Only then does it open the file by
file handle with O_RDONLY or O_RDWR, send SHMEM_MAP with the fd attached and
NEED_REPLY set, wait for the frontend's u64 status, close the fd, update
the table and answer the worker.  A refused request reaches nothing: no
message to the frontend, no fd opened.

**Overlaps.**  A map over mapped bytes replaces them, as MAP_FIXED does
(alioth, rust-vmm frontends), and the table keeps the outside parts of what
it overlapped.  A frontend that refuses to map over a mapping (QEMU master's
generic device does) gets the overlapped entries unmapped first and the map
sent once more.

**What ends a mapping.**  REMOVEMAPPING; RELEASE of the fh it was set up
through; FORGET that frees its node; DESTROY and INIT-again (synchronous:
the window is empty before the guest hears back); RESET_DEVICE (unmapped
through the channel, which stays); frontend disconnect (the table is
dropped, the channel is gone).  A mapping made with the driver's fh of -1
belongs to the inode and survives RELEASE: the driver keeps such ranges
across close and reuses them without asking again.

**Crashes.**  A worker's death shows up as EOF on its link; the coordinator
then sweeps its table and unmaps whatever belongs to a node or handle that
is no longer live (a worker killed between freeing a handle and sending its
RELEASE notice leaves nothing behind).  The coordinator's own death is
seen by the supervisor through its pidfd: it forks a new one, gives it the
backend channel marked ``recovered`` and new links to every worker.  The
new coordinator knows no table, so it drains any reply still on the
channel and unmaps the *whole* window with one SHMEM_UNMAP, then starts
empty.  Requests in flight in the dead one fail with EIO.

**Deadlock bound.**  While it waits for the frontend's reply, the
coordinator serves nothing else.  A frontend that waits for the backend on
its main socket meanwhile (QEMU handles the backend channel on its main
loop) would deadlock the pair; the wait is bounded by
:data:`BACKEND_REPLY_TIMEOUT_S`, after which the channel counts as lost and
the table is dropped.  Supervisor messages that can arrive mid-session are
one-way casts, never calls, so the supervisor never waits on the
coordinator while a frontend waits on the supervisor.  (It may still wait
on a *worker* that waits on the coordinator, for a ring change: the same
bound applies.)
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from shardfs.abi import fuse as F
from shardfs.abi import vhost_user as vu
from shardfs.abi.virtio import VIRTIO_FS_SHMCAP_ID_CACHE
from shardfs.codec.backend_channel import (
    ChannelProtocolError,
    encode_shmem_map,
    encode_shmem_unmap,
    parse_reply_header,
    parse_status,
)
from shardfs.fs.api import FsError
from shardfs.fs.passthrough.fhandle import open_by_handle
from shardfs.fs.passthrough.shared import ANY_WORKER, NodeRecord, SharedState
from shardfs.proc import control
from shardfs.proc.dax import DaxShared, DaxTable, Geometry, LinkError, Mapping, link_recv, link_send

log = logging.getLogger("shardfs.coordinator")

#: How long the frontend may take to answer a SHMEM_MAP/UNMAP before the
#: channel counts as lost (see "Deadlock bound" in the module doc).
BACKEND_REPLY_TIMEOUT_S = 5.0
#: Supervisor messages that get no reply (see the module doc).
CASTS = frozenset({"attach", "channel", "reset", "disconnect"})
_NO_FH = F.FUSE_SETUPMAPPING_NO_FH
#: Nodes whose open modes are remembered at once (a bound, not a tuning knob).
_OPEN_MODES_CACHED = 1024
#: Bytes read at a time when stale replies are discarded.
_DRAIN_CHUNK = 1 << 16


class ChannelError(Exception):
    """The backend channel broke: closed, timed out or out of step."""


class BackendChannel:
    """The backend request channel (a stream socket); the coordinator owns its fd."""

    def __init__(self, fd: int, timeout_s: float = BACKEND_REPLY_TIMEOUT_S) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.sock.close()

    def drain(self) -> int:
        """Discard bytes already waiting (replies meant for a dead coordinator)."""
        dropped = 0
        self.sock.setblocking(False)
        try:
            while True:
                chunk = self.sock.recv(_DRAIN_CHUNK)
                if not chunk:
                    break
                dropped += len(chunk)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            raise ChannelError(f"draining: {e}") from e
        finally:
            self.sock.setblocking(True)
        return dropped

    def call(self, data: bytes, fds: Sequence[int] = ()) -> int:
        """Send one request (NEED_REPLY) and return the frontend's u64 status.

        A reply to another request (left over from a coordinator that died
        waiting) is skipped.  ChannelError if the channel breaks or the
        frontend does not answer within ``timeout_s``.
        """
        request = vu.vhost_user_header.unpack_from(data)[0]
        try:
            if fds:
                sent = socket.send_fds(self.sock, [data], list(fds))
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
        except OSError as e:
            raise ChannelError(f"send: {e}") from e
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                got, size = parse_reply_header(self._recv_exact(vu.vhost_user_header.size,
                                                                deadline))
                status = parse_status(self._recv_exact(size, deadline))
            except ChannelProtocolError as e:
                raise ChannelError(str(e)) from e
            if got == request:
                return status
            log.warning("backend channel: dropped a stale reply to request %d", got)

    def _recv_exact(self, n: int, deadline: float) -> bytes:
        buf = bytearray()
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise ChannelError(f"no reply from the frontend within {self.timeout_s}s")
            try:
                chunk = self.sock.recv(n - len(buf))
            except OSError as e:
                raise ChannelError(f"recv: {e}") from e
            if not chunk:
                raise ChannelError("the frontend closed the backend channel")
            buf += chunk
        return bytes(buf)


class DaxSetup(NamedTuple):
    """What a coordinator that owns a DAX window is given at fork."""

    geometry: Geometry
    state: SharedState
    counters: DaxShared
    #: An fd of the share (``open_by_handle_at`` needs one on that filesystem).
    mount_fd: int
    readonly: bool = False
    shmid: int = VIRTIO_FS_SHMCAP_ID_CACHE
    reply_timeout_s: float = BACKEND_REPLY_TIMEOUT_S


class Coordinator:
    """The process body (:meth:`run`) and the window logic it applies.

    Without ``dax`` it only answers the supervisor's pings, and workers
    answer SETUPMAPPING/REMOVEMAPPING with ENOSYS, as virtiofsd does.
    """

    def __init__(self, sock: socket.socket, dax: DaxSetup | None = None) -> None:
        self.sock = sock
        self.dax = dax
        self.table = DaxTable()
        self.channel: BackendChannel | None = None
        #: link fd -> (worker id, socket)
        self.links: dict[int, tuple[int, socket.socket]] = {}
        #: nodeid -> (shared log position, access modes the guest holds it open in)
        self._open_modes: dict[int, tuple[int, frozenset[int]]] = {}
        self.ep = select.epoll()
        self.running = True

    # -- process body -------------------------------------------------------------

    def run(self) -> None:
        from shardfs.proc.worker import die_with_parent, set_process_name

        set_process_name("shardfs-coord")
        die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ctrl = self.sock.fileno()
        self.ep.register(ctrl, select.EPOLLIN)
        self._publish()  # a restarted coordinator starts with nothing mapped
        try:
            while self.running:
                try:
                    events = self.ep.poll()
                except InterruptedError:
                    continue
                ready = {fd for fd, _ in events}
                if ctrl in ready:
                    self._drain_control()
                for fd in ready - {ctrl}:
                    # The supervisor's casts (reset, disconnect) go first: they
                    # were sent before any request that depends on them.
                    self._drain_control()
                    if self.running and fd in self.links:
                        self._serve_link(fd)
        finally:
            self.close()

    def close(self) -> None:
        for _, s in self.links.values():
            s.close()
        self.links.clear()
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.ep.close()

    # -- supervisor -----------------------------------------------------------------

    def _drain_control(self) -> None:
        while self.running and select.select([self.sock], [], [], 0)[0]:
            self._control()

    def _control(self) -> None:
        try:
            msg, fds = control.recv(self.sock)
        except control.ControlError:
            self.running = False
            return
        verb = msg[0]
        if verb in CASTS:
            if self.dax is None:
                for fd in fds:
                    os.close(fd)
                log.warning("coordinator without DAX got %r", verb)
                return
            getattr(self, f"_c_{verb}")(msg[1:], fds)
            return
        for fd in fds:
            os.close(fd)
        if verb == "ping":
            control.send(self.sock, ["ok", "pong"])
        elif verb == "stats":
            stats: dict[str, Any] = {"mappings": len(self.table)}
            if self.dax is not None:
                stats.update(self.dax.counters.read())
            control.send(self.sock, ["ok", stats])
        elif verb == "exit":
            self.running = False
        else:
            control.send(self.sock, ["err", f"unknown verb {verb!r}"])

    def _c_attach(self, args: list[Any], fds: list[int]) -> None:
        """A worker's link (a new worker, or all of them after our restart)."""
        (wid,) = args
        for fd, (w, _sock) in list(self.links.items()):
            if w == wid:
                self._drop_link(fd)
        sock = socket.socket(fileno=fds[0])
        sock.setblocking(True)
        self.links[sock.fileno()] = (wid, sock)
        self.ep.register(sock.fileno(), select.EPOLLIN)

    def _c_channel(self, args: list[Any], fds: list[int]) -> None:
        """SET_BACKEND_REQ_FD; ``recovered``: we replace a coordinator that died."""
        (recovered,) = args
        assert self.dax is not None
        if self.channel is not None:
            self.channel.close()
        self.channel = BackendChannel(fds[0], self.dax.reply_timeout_s)
        if recovered:
            self._reset_window()

    def _c_reset(self, args: list[Any], fds: list[int]) -> None:
        """RESET_DEVICE: unmap everything; the channel stays."""
        log.info("device reset: unmapping %d DAX mapping(s)", len(self.table))
        self._drop(lambda m: True)

    def _c_disconnect(self, args: list[Any], fds: list[int]) -> None:
        """The frontend left: its window went with it; forget the table and channel."""
        if self.table:
            log.info("frontend gone: dropping %d DAX mapping(s)", len(self.table))
        self.table.clear()
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self._publish()

    def _reset_window(self) -> None:
        """After a coordinator crash: no table survived, so clear the whole window."""
        assert self.dax is not None and self.channel is not None
        self.dax.counters.add("restarts")
        try:
            stale = self.channel.drain()
            if stale:
                log.warning("backend channel: %d stale byte(s) dropped", stale)
            status = self.channel.call(encode_shmem_unmap(
                self.dax.shmid, 0, self.dax.geometry.window_bytes))
        except ChannelError as e:
            self._lost_channel(e)
            return
        if status:
            self.dax.counters.add("frontend_errors")
            log.error("the frontend refused to unmap the whole DAX window (status %d); "
                      "mappings of the previous coordinator may remain", status)
        else:
            log.warning("coordinator restarted: the whole DAX window was unmapped")
        self.table.clear()
        self._publish()

    # -- worker links ---------------------------------------------------------------

    def _drop_link(self, fd: int) -> None:
        _, sock = self.links.pop(fd)
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass
        sock.close()

    def _serve_link(self, fd: int) -> None:
        wid, sock = self.links[fd]
        if not select.select([sock], [], [], 0)[0]:
            return  # the fd was reused by a new link since epoll reported it
        try:
            msg = link_recv(sock)
        except LinkError as e:
            log.info("worker %d's DAX link closed (%s): sweeping stale mappings", wid, e)
            self._drop_link(fd)
            self._sweep()
            return
        reply = self.handle(msg)
        if reply is not None:
            try:
                link_send(sock, ["reply", reply])
            except LinkError as e:
                log.info("worker %d went away before its DAX reply: %s", wid, e)

    def handle(self, msg: list[Any]) -> int | None:
        """Apply one link message; the errno to answer (0 = success), None for notices."""
        verb, args = msg[0], msg[1:]
        try:
            if verb == "setup":
                self.setup(*args)
            elif verb == "remove":
                self.remove(*args)
            elif verb == "destroy":
                self._drop(lambda m: True)
            elif verb == "release":
                nodeid, fh = args
                self._drop(lambda m: m.fh == fh and not self._live(m))
                return None
            elif verb == "forget":
                (nodeids,) = args
                gone = set(nodeids)
                self._drop(lambda m: m.nodeid in gone and not self._live(m))
                return None
            else:
                log.error("unknown DAX link message %r", verb)
                return errno.EINVAL
        except FsError as e:
            if self.dax is not None:
                self.dax.counters.add("refused")
            log.debug("DAX %s refused: %s", verb, e)
            return e.errno
        except (TypeError, ValueError) as e:
            log.error("malformed DAX link message %r: %s", verb, e)
            return errno.EINVAL
        return 0

    # -- the window -------------------------------------------------------------------

    def _need_window(self) -> DaxSetup:
        if self.dax is None or self.channel is None:
            raise FsError(errno.ENOSYS, "no DAX window (off, or the frontend gave no channel)")
        return self.dax

    def setup(self, nodeid: int, fh: int, foffset: int, length: int, flags: int,
              moffset: int) -> None:
        """SETUPMAPPING: validate (module doc), open by file handle, SHMEM_MAP, record."""
        dax = self._need_window()
        dax.counters.add("map_requests")
        writable = dax.geometry.check_setup(foffset, length, flags, moffset)
        if writable and dax.readonly:
            raise FsError(errno.EROFS)
        # Announce the mapping before the liveness checks (DaxShared's doc).
        dax.counters.set("mappings", len(self.table) + 1)
        try:
            rec = self._check_ids(dax.state, nodeid, fh, writable)
            fd = self._open(dax, rec, writable)
            try:
                self._map(Mapping(moffset, length, foffset, nodeid, fh, writable), fd)
            finally:
                os.close(fd)
        finally:
            self._publish()

    def _check_ids(self, state: SharedState, nodeid: int, fh: int,
                   writable: bool) -> NodeRecord:
        rec = state.node_record(nodeid)
        if rec is None:
            raise FsError(errno.ENOENT, f"no node {nodeid:#x}")
        if rec.kind != stat.S_IFREG:
            raise FsError(errno.EINVAL, "only regular files are mapped")
        if fh != _NO_FH:
            h = state.handle_record(fh)
            if h is None or h[2] or h[0] != nodeid:
                raise FsError(errno.EBADF, f"fh {fh:#x} is not an open file of node "
                              f"{nodeid:#x}")
            mode = h[1] & os.O_ACCMODE
            # What mmap(2) itself asks of the fd: read access always, and
            # O_RDWR for a shared writable mapping.
            if mode == os.O_WRONLY or (writable and mode != os.O_RDWR):
                raise FsError(errno.EACCES, f"fh {fh:#x} is open {mode:#o}")
            return rec
        # The Linux driver maps a file 2 MiB at a time, so what a scan of the
        # handles found is remembered: it stays true until something is freed
        # anywhere (the shared log moves).  A refusal is never taken from it,
        # since an OPEN since then may have added the mode.
        want = {os.O_WRONLY, os.O_RDWR} if writable else {os.O_RDONLY, os.O_RDWR}
        seq = state.log_seq()
        cached = self._open_modes.get(nodeid)
        if cached is not None and cached[0] == seq and cached[1] & want:
            return rec
        modes = frozenset(flags & os.O_ACCMODE for _, flags in state.file_handles_of(nodeid))
        if not modes:
            raise FsError(errno.EBADF, f"the guest holds node {nodeid:#x} open nowhere")
        if len(self._open_modes) >= _OPEN_MODES_CACHED:
            self._open_modes.clear()
        self._open_modes[nodeid] = (seq, modes)
        if not modes & want:
            raise FsError(errno.EACCES, f"node {nodeid:#x} is not open for "
                          f"{'writing' if writable else 'reading'}")
        return rec

    @staticmethod
    def _open(dax: DaxSetup, rec: NodeRecord, writable: bool) -> int:
        """The file, opened by handle for the mapping's access; the caller closes it."""
        if rec.owner != ANY_WORKER or not rec.handle:
            raise FsError(errno.EOPNOTSUPP, "the node has no file handle")
        if rec.dev != os.fstat(dax.mount_fd).st_dev:
            # Its handle decodes only through a mount fd on that filesystem,
            # and the coordinator keeps none: DAX covers the share's own.
            raise FsError(errno.EOPNOTSUPP, "the node is on a submount")
        fd = open_by_handle(dax.mount_fd, rec.handle_type, rec.handle,
                            os.O_RDWR if writable else os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (rec.dev, rec.ino) or not stat.S_ISREG(st.st_mode):
                raise FsError(errno.ESTALE)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _map(self, m: Mapping, fd: int) -> None:
        dax = self._need_window()
        over = self.table.overlapping(m.moffset, m.end)
        msg = encode_shmem_map(dax.shmid, m.foffset, m.moffset, m.length, m.writable)
        status = self._send(msg, [fd])
        if status and over:
            log.info("the frontend would not map over %d mapping(s); unmapping them first",
                     len(over))
            for old in over:
                if not self._send(encode_shmem_unmap(dax.shmid, old.moffset, old.length)):
                    self.table.remove(old)
            status = self._send(msg, [fd])
        if status:
            dax.counters.add("frontend_errors")
            # A failed MAP_FIXED may leave a hole: ask for the reservation back.
            if not self._send(encode_shmem_unmap(dax.shmid, m.moffset, m.length)):
                self.table.cut(m.moffset, m.end)
            raise FsError(errno.EIO, f"the frontend refused SHMEM_MAP (status {status})")
        self.table.insert(m)
        log.debug("mapped node %#x [%#x+%#x) at %#x%s", m.nodeid, m.foffset, m.length,
                  m.moffset, " rw" if m.writable else "")

    def remove(self, blob: bytes) -> None:
        """REMOVEMAPPING: every range checked first; mapped bytes in them unmapped."""
        dax = self._need_window()
        dax.counters.add("unmap_requests")
        one = F.fuse_removemapping_one
        if (not isinstance(blob, bytes) or not blob or len(blob) % one.size
                or len(blob) // one.size > F.FUSE_REMOVEMAPPING_MAX_ENTRIES):
            raise FsError(errno.EINVAL, "REMOVEMAPPING ranges malformed")
        ranges = list(one.iter_unpack(blob))
        for moffset, length in ranges:
            dax.geometry.check_range(moffset, length)
        failed = 0
        for moffset, length in ranges:
            for old in self.table.overlapping(moffset, moffset + length):
                lo, hi = max(old.moffset, moffset), min(old.end, moffset + length)
                if self._send(encode_shmem_unmap(dax.shmid, lo, hi - lo)):
                    failed += 1
                else:
                    self.table.cut(lo, hi)
        self._publish()
        if failed:
            dax.counters.add("frontend_errors", failed)
            raise FsError(errno.EIO, f"the frontend refused {failed} SHMEM_UNMAP(s)")

    def _drop(self, doomed: Callable[[Mapping], bool]) -> None:
        """Unmap every mapping ``doomed`` picks; one the frontend refuses stays listed."""
        if self.dax is None:
            return
        for m in self.table:
            if not doomed(m):
                continue
            if self.channel is None:
                self.table.remove(m)
                continue
            try:
                status = self._send(encode_shmem_unmap(self.dax.shmid, m.moffset, m.length))
            except FsError:
                return  # the channel is lost and the table with it
            if status:
                self.dax.counters.add("frontend_errors")
                log.error("the frontend refused to unmap %#x+%#x (status %d)", m.moffset,
                          m.length, status)
            else:
                self.table.remove(m)
        self._publish()

    def _live(self, m: Mapping) -> bool:
        """Whether what backs ``m`` (its node; its fh, if it has one) still exists."""
        assert self.dax is not None
        state = self.dax.state
        if state.node_record(m.nodeid) is None:
            return False
        if m.fh == _NO_FH:
            return True
        h = state.handle_record(m.fh)
        return h is not None and h[0] == m.nodeid

    def _sweep(self) -> None:
        if self.dax is not None and self.table:
            self._drop(lambda m: not self._live(m))

    def _send(self, data: bytes, fds: Sequence[int] = ()) -> int:
        """One request on the channel; a lost channel drops the table and is EIO."""
        if self.channel is None:
            raise FsError(errno.EIO, "no backend channel")
        try:
            return self.channel.call(data, fds)
        except ChannelError as e:
            self._lost_channel(e)
            raise FsError(errno.EIO, str(e)) from e

    def _lost_channel(self, e: Exception) -> None:
        log.error("backend channel lost (%s): DAX is off until the frontend reconnects", e)
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.table.clear()
        self._publish()

    def _publish(self) -> None:
        if self.dax is not None:
            self.dax.counters.set("mappings", len(self.table))


# -- the supervisor's side ------------------------------------------------------------


def attach_worker(coordinator: socket.socket, worker: socket.socket, wid: int) -> None:
    """Link worker ``wid`` to the coordinator: one socketpair, an end to each.

    The coordinator's end goes as a cast (no reply awaited); the worker's
    through its control socket (its ``dax_link`` verb).  OSError or
    ControlError if either cannot be reached.
    """
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        control.send(coordinator, ["attach", wid], [mine.fileno()])
        control.call(worker, ["dax_link"], [theirs.fileno()])
    finally:
        mine.close()
        theirs.close()


def send_channel(coordinator: socket.socket, fd: int, recovered: bool) -> None:
    """Give the coordinator a dup of the backend channel ``fd`` (the caller keeps its own)."""
    dup = os.dup(fd)
    try:
        control.send(coordinator, ["channel", recovered], [dup])
    finally:
        os.close(dup)
