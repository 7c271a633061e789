"""The supervisor: owns the vhost-user socket and the process tree.

Start-up order: listen (or take ``--fd``), fork the coordinator, fork one
worker per request queue, then accept frontends one at a time.  The
supervisor runs the sans-IO :class:`~shardfs.codec.vhost_user.VhostUserSession`
and implements its :class:`~shardfs.codec.vhost_user.Device` by sending
control messages to the workers (:mod:`shardfs.proc.control`).

Queue ownership (virtio 1.2 §5.11.2): queue 0 is hiprio, queues 1..N are the
request queues (no notification queue is offered).  Request queue ``i`` is
served by worker ``i - 1``; hiprio by worker 0.

Guest memory: region fds from SET_MEM_TABLE/ADD_MEM_REG are passed to every
worker, which maps them ``MAP_SHARED``; the supervisor keeps only the table.

Shutdown: SIGTERM or SIGINT ends the current connection cleanly (rings are
stopped between requests, so nothing acknowledged is lost), tells the
children to exit, and returns.  A frontend disconnect resets the device and
either waits for the next frontend or, with ``once``, returns.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
from dataclasses import dataclass
from typing import Any

import multiprocess

from shardfs.abi import vhost_user as vu
from shardfs.abi.vhost_user import ProtocolFeature as PF
from shardfs.abi.virtio import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_FS_TAG_MAX,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    virtio_fs_config,
)
from shardfs.codec.vhost_user import (
    Device,
    FramingError,
    MemRegion,
    ProtocolError,
    SessionConfig,
    VhostUserSession,
    VringState,
    parse_header,
)
from shardfs.config import Config
from shardfs.fs.passthrough import PassthroughFs
from shardfs.fs.passthrough.fs import fd_budgets
from shardfs.fs.passthrough.shared import SharedState
from shardfs.proc import control
from shardfs.proc.coordinator import Coordinator
from shardfs.proc.worker import Worker, set_process_name

log = logging.getLogger("shardfs.supervisor")

VIRTIO_FEATURES = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC
                   | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VHOST_USER_F_PROTOCOL_FEATURES)
PROTOCOL_FEATURES = (1 << PF.MQ | 1 << PF.REPLY_ACK | 1 << PF.CONFIGURE_MEM_SLOTS
                     | 1 << PF.BACKEND_REQ | 1 << PF.BACKEND_SEND_FD | 1 << PF.RESET_DEVICE
                     | 1 << PF.STATUS)


def session_config(cfg: Config) -> SessionConfig:
    """What we advertise: DESIGN §1, and CONFIG only with a tag (QEMU 7.1-8.0 crash on it)."""
    proto = PROTOCOL_FEATURES
    space = b""
    if cfg.tag:
        proto |= 1 << PF.CONFIG
        space = virtio_fs_config.pack(cfg.tag.encode().ljust(VIRTIO_FS_TAG_MAX, b"\0"),
                                      cfg.num_request_queues, 0)
    return SessionConfig(num_queues=1 + cfg.num_request_queues, tag=cfg.tag,
                         config_space=space, virtio_features=VIRTIO_FEATURES,
                         protocol_features=proto)


@dataclass
class Child:
    name: str
    proc: Any
    sock: socket.socket


class WorkerDevice(Device):
    """The Device the session drives, implemented over worker control sockets."""

    def __init__(self, workers: list[Child]) -> None:
        self.workers = workers
        self.backend_fd: int | None = None
        self.regions: list[MemRegion] = []

    def owner(self, index: int) -> Child:
        """hiprio (0) and request queue 1 go to worker 0; queue i to worker i-1."""
        return self.workers[max(index - 1, 0) % len(self.workers)]

    def _call(self, child: Child, msg: list[Any], fds: list[int] | tuple[int, ...] = ()) -> Any:
        try:
            return control.call(child.sock, msg, fds)
        except (control.ControlError, OSError) as e:
            raise ProtocolError(f"{child.name}: {msg[0]}: {e}") from e

    def _all(self, msg: list[Any], fds: list[int]) -> None:
        try:
            errors = []
            for child in self.workers:
                try:
                    self._call(child, msg, fds)
                except ProtocolError as e:
                    errors.append(str(e))
            if errors:
                raise ProtocolError("; ".join(errors))
        finally:
            for fd in fds:
                os.close(fd)

    def mem_set(self, regions: list[tuple[MemRegion, int]]) -> None:
        self.regions = [r for r, _ in regions]
        log.info("memory table: %s", ", ".join(
            f"gpa {r.gpa:#x}+{r.size:#x}" for r in self.regions))
        self._all(["mem_set", [[r.gpa, r.size, r.user_addr, r.mmap_offset]
                               for r in self.regions]], [fd for _, fd in regions])

    def mem_add(self, region: MemRegion, fd: int) -> None:
        self.regions.append(region)
        log.info("memory region added: gpa %#x+%#x", region.gpa, region.size)
        self._all(["mem_add", [region.gpa, region.size, region.user_addr, region.mmap_offset]],
                  [fd])

    def mem_remove(self, region: MemRegion) -> None:
        self.regions = [r for r in self.regions if (r.gpa, r.size) != (region.gpa, region.size)]
        log.info("memory region removed: gpa %#x+%#x", region.gpa, region.size)
        self._all(["mem_remove", [region.gpa, region.size, region.user_addr,
                                  region.mmap_offset]], [])

    def ring_start(self, index: int, state: VringState, kick_fd: int, call_fd: int | None,
                   event_idx: bool, indirect: bool) -> None:
        fds = [kick_fd] + ([call_fd] if call_fd is not None else [])
        try:
            self._call(self.owner(index), [
                "ring_start", index, state.num, state.desc_addr, state.avail_addr,
                state.used_addr, state.base, event_idx, indirect, state.enabled], fds)
        finally:
            for fd in fds:
                os.close(fd)

    def ring_stop(self, index: int) -> int:
        return int(self._call(self.owner(index), ["ring_stop", index]))

    def ring_call(self, index: int, call_fd: int | None) -> None:
        fds = [call_fd] if call_fd is not None else []
        try:
            self._call(self.owner(index), ["ring_call", index], fds)
        finally:
            for fd in fds:
                os.close(fd)

    def ring_enable(self, index: int, enabled: bool) -> None:
        self._call(self.owner(index), ["ring_enable", index, enabled])

    def backend_channel(self, fd: int) -> None:
        if self.backend_fd is not None:
            os.close(self.backend_fd)
        self.backend_fd = fd

    def reset(self, drop_fs: bool = False) -> None:
        self.regions = []
        for child in self.workers:
            try:
                self._call(child, ["reset", drop_fs])
            except ProtocolError as e:
                log.error("%s", e)
        if self.backend_fd is not None:
            os.close(self.backend_fd)
            self.backend_fd = None


class Supervisor:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.workers: list[Child] = []
        self.coordinator: Child | None = None
        self.stopping = False
        # Node and handle identity shared by every worker (fs.passthrough.shared),
        # made before any fork so that every child inherits the same mapping.
        self.shared = SharedState(*fd_budgets(cfg.max_nodes, cfg.max_handles))
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- process tree ---------------------------------------------------------

    def _fork_worker(self, wid: int) -> Child:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cfg = self.cfg
        shared = self.shared

        def body() -> None:
            parent.close()
            self._close_inherited()

            def make_fs() -> PassthroughFs:
                return PassthroughFs(cfg.shared_dir, cache=cfg.cache, max_nodes=cfg.max_nodes,
                                     max_handles=cfg.max_handles, xattr=cfg.xattr,
                                     writeback=cfg.writeback, shared=shared, worker=wid)

            Worker(wid, child, make_fs).run()

        ctx = multiprocess.get_context("fork")
        proc = ctx.Process(target=body, name=f"shardfs-worker-{wid}", daemon=False)
        proc.start()
        child.close()
        return Child(f"worker {wid}", proc, parent)

    def _fork_coordinator(self) -> Child:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

        def body() -> None:
            parent.close()
            self._close_inherited()
            Coordinator(child).run()

        ctx = multiprocess.get_context("fork")
        proc = ctx.Process(target=body, name="shardfs-coordinator", daemon=False)
        proc.start()
        child.close()
        return Child("coordinator", proc, parent)

    def _close_inherited(self) -> None:
        """In a child: drop the supervisor's sockets so only it holds them."""
        for c in self.workers + ([self.coordinator] if self.coordinator else []):
            c.sock.close()
        if self._listener is not None:
            self._listener.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    # -- main loop ------------------------------------------------------------

    def run(self, listener: socket.socket) -> int:
        set_process_name("shardfs")
        self._listener: socket.socket | None = listener
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            self.coordinator = self._fork_coordinator()
            control.call(self.coordinator.sock, ["ping"])
            self.workers = [self._fork_worker(i) for i in range(self.cfg.num_request_queues)]
            for w in self.workers:
                control.call(w.sock, ["ping"])  # each child is up and has named itself
        except control.ControlError as e:
            log.error("a child process failed to start (%s); see its log above", e)
            self._shutdown()
            return 1
        log.info("serving %s on %s with %d request queue(s), pids: coordinator %d, workers %s",
                 self.cfg.shared_dir, self.cfg.socket_path or f"fd {self.cfg.fd}",
                 self.cfg.num_request_queues, self.coordinator.proc.pid,
                 ", ".join(str(w.proc.pid) for w in self.workers))
        try:
            while not self.stopping:
                conn = self._accept(listener)
                if conn is None:
                    continue
                self._serve(conn)
                if self.cfg.once:
                    break
        finally:
            self._shutdown()
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        self.stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _accept(self, listener: socket.socket) -> socket.socket | None:
        r, _, _ = select.select([listener.fileno(), self._wake_r], [], [])
        if listener.fileno() not in r:
            return None
        try:
            conn, _ = listener.accept()
        except InterruptedError:
            return None
        log.info("frontend connected")
        return conn

    def _serve(self, conn: socket.socket) -> None:
        device = WorkerDevice(self.workers)
        session = VhostUserSession(device, session_config(self.cfg))
        try:
            while not self.stopping:
                r, _, _ = select.select([conn.fileno(), self._wake_r], [], [])
                if conn.fileno() not in r:
                    continue
                if not self._one_message(conn, session):
                    break
        finally:
            log.info("frontend disconnected; resetting the device")
            session.close()
            device.reset(drop_fs=True)
            conn.close()

    def _one_message(self, conn: socket.socket, session: VhostUserSession) -> bool:
        """Read, apply and answer one message; False when the connection is done."""
        try:
            data, fds, msg_flags, _ = socket.recv_fds(conn, vu.vhost_user_header.size,
                                                      vu.VHOST_USER_MAX_FDS)
        except ConnectionResetError:
            return False
        try:
            if not data:
                return False
            if msg_flags & socket.MSG_CTRUNC:
                raise FramingError("more than 8 fds with one message")
            if len(data) < vu.vhost_user_header.size:
                data += _recv_exact(conn, vu.vhost_user_header.size - len(data))
            request, flags, size = parse_header(data)
            payload = _recv_exact(conn, size) if size else b""
        except (FramingError, EOFError, OSError) as e:
            for fd in fds:
                os.close(fd)
            log.error("closing the vhost-user connection: %s", e)
            return False
        reply = session.handle(request, flags, payload, fds)
        if reply is not None:
            try:
                conn.sendall(reply)
            except OSError as e:
                log.error("cannot reply to the frontend: %s", e)
                return False
        return True

    def stats(self) -> list[dict[str, Any]]:
        return [control.call(w.sock, ["stats"]) for w in self.workers]

    def _shutdown(self) -> None:
        children = self.workers + ([self.coordinator] if self.coordinator else [])
        for c in children:
            try:
                control.send(c.sock, ["exit"])
            except OSError:
                pass
        for c in children:
            c.proc.join(5)
            if c.proc.is_alive():
                log.warning("%s did not exit; killing it", c.name)
                c.proc.kill()
                c.proc.join()
            c.sock.close()
        log.info("shut down")


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError("frontend closed mid-message")
        buf += chunk
    return bytes(buf)


def open_listener(cfg: Config) -> socket.socket:
    """The listening socket: inherited ``--fd`` (libvirt) or a fresh path."""
    if cfg.fd is not None:
        sock = socket.socket(fileno=cfg.fd)
        if sock.family != socket.AF_UNIX:
            raise OSError(errno.EINVAL, f"--fd {cfg.fd} is not a Unix socket")
        return sock
    assert cfg.socket_path
    parent = os.path.dirname(cfg.socket_path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        os.unlink(cfg.socket_path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(cfg.socket_path)
    sock.listen(1)
    return sock
