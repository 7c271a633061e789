"""The supervisor: owns the vhost-user socket and the process tree.

Start-up order: listen (or take ``--fd``; :mod:`shardfs.proc.sockets`), fork
the DAX coordinator (only with a DAX window), the lock process (only with
host-visible locks), and one worker per request queue
(:mod:`shardfs.proc.children`), link each worker to those two, then accept
frontends one at a time.  For each frontend the supervisor runs the sans-IO
:class:`~shardfs.codec.vhost_user.VhostUserSession` over a fresh
:class:`~shardfs.proc.device.WorkerDevice`, which carries the session's
calls to the workers (queue ownership and guest memory: that module's doc).

Crashes: a worker that dies is replaced at once, relinked, and brought up to
the session's state (:meth:`~shardfs.proc.device.WorkerDevice.replay`); the
other workers' queues never notice.  A coordinator that dies is replaced,
every worker is relinked to it, and it is handed the backend channel again.
Both happen whether or not a frontend is connected, as do answers on the
status socket (``shardfs stats``): all are served from one select().

Shutdown: SIGTERM or SIGINT ends the current connection cleanly (rings are
stopped between requests, so nothing acknowledged is lost), tells the
children to exit, and returns.  A frontend disconnect resets the device and
either waits for the next frontend or, with ``once``, returns.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import signal
import socket
from typing import TYPE_CHECKING, Any

from shardfs.abi import vhost_user as vu
from shardfs.codec.vhost_user import (
    FramingError,
    ProtocolError,
    VhostUserSession,
    parse_header,
)
from shardfs.config import Config
from shardfs.fs.passthrough.fhandle import check_handles
from shardfs.fs.passthrough.fs import fd_budgets
from shardfs.fs.passthrough.shared import SharedState
from shardfs.proc import control
from shardfs.proc.children import Child, fork_coordinator, fork_locks, fork_worker
from shardfs.proc.device import WorkerDevice, session_config
from shardfs.proc.migration import Migration
from shardfs.proc.sockets import open_status_socket, recv_exact
from shardfs.proc.stats import create_page, encode, process_info, read_page
from shardfs.proc.worker import PROGRESS, set_process_name
from shardfs.sandbox import SandboxPolicy, enter_user_namespace, isolate_daemon

if TYPE_CHECKING:
    from shardfs.proc.dax import DaxShared

log = logging.getLogger("shardfs.supervisor")


class Supervisor:
    """The daemon's parent process; see the module doc.  :meth:`run` is its whole life."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.workers: list[Child] = []
        self.coordinator: Child | None = None
        #: The lock process (proc.locks), with ``locks`` on.
        self.lock_proc: Child | None = None
        self.stopping = False
        # Node and handle identity shared by every worker (fs.passthrough.shared),
        # made before any fork so that every child inherits the same mapping.
        self.shared = SharedState(*fd_budgets(cfg.max_nodes, cfg.max_handles))
        # Where each ring's worker has got to, so a replacement can resume it.
        self.progress = mmap.mmap(-1, PROGRESS.size * (1 + cfg.num_request_queues),
                                  mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.stats_page = create_page(1 + cfg.num_request_queues)
        # The DAX coordinator's counters (mapping count included), seen by all.
        self.dax_shared: DaxShared | None = None
        if cfg.dax_window:
            # DAX and host locks are imported only when configured, and before
            # any fork, so that the children share the modules' pages: a
            # daemon without them does not carry them (about 0.5 MB).
            from shardfs.proc import coordinator, dax

            self.dax_shared = dax.DaxShared()
            self._attach_dax = coordinator.attach_worker
        if cfg.lock_kinds():
            from shardfs.proc import locks

            self._attach_locks = locks.attach_worker
            self._lock_flags = locks.init_flags(cfg.lock_kinds())
        self.coordinator_restarts = 0
        self.status: socket.socket | None = None
        self.device: WorkerDevice | None = None
        self.restarts = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # From here a SIGTERM or SIGINT is a clean shutdown, even one sent the
        # moment the socket appears (before run()): the caller binds it after this.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    # -- process tree ---------------------------------------------------------

    def _fork_worker(self, wid: int) -> Child:
        """Worker ``wid``, given the state every worker shares (at start and on restart)."""
        return fork_worker(self.cfg, wid, self.shared, self.progress, self.stats_page,
                           self.dax_shared)

    def _link_locks(self, wid: int) -> None:
        """Give worker ``wid`` and the lock process a new lock link (proc.locks)."""
        if self.lock_proc is None:
            return
        try:
            self._attach_locks(self.lock_proc.sock, self.workers[wid].sock, wid,
                               self._lock_flags)
        except (OSError, control.ControlError) as e:
            log.error("cannot link worker %d to the lock process: %s", wid, e)

    def _restart_dead_workers(self) -> None:
        """Replace every worker that has exited, and resume its rings.

        Other workers are not touched: their queues never notice.
        """
        for wid, w in enumerate(self.workers):
            if w.proc.is_alive():
                continue
            w.proc.join()
            log.error("%s (pid %d) died with exit code %s; restarting it", w.name,
                      w.proc.pid, w.proc.exitcode)
            if w.proc.exitcode == -signal.SIGSYS:
                log.error("%s made a system call outside the seccomp allow-list "
                          "(shardfs/sandbox/seccomp.py; dmesg names it, or run with "
                          "--seccomp log)", w.name)
            w.sock.close()
            os.close(w.pidfd)
            new = self._fork_worker(wid)
            self.workers[wid] = new
            self.restarts += 1
            try:
                control.call(new.sock, ["ping"])
                self._link_dax(wid)
                self._link_locks(wid)
                if self.device is not None:
                    self.device.replay(wid)
            except (control.ControlError, ProtocolError) as e:
                log.error("the replacement %s failed: %s", new.name, e)

    def _restart_coordinator(self) -> None:
        """The coordinator died: fork a new one, relink the workers, hand it the channel.

        It cannot know what the dead one mapped, so it unmaps the whole
        DAX window before it serves (coordinator module doc, "Crashes").
        """
        old = self.coordinator
        assert old is not None
        old.proc.join()
        log.error("the coordinator (pid %d) died with exit code %s; restarting it",
                  old.proc.pid, old.proc.exitcode)
        old.sock.close()
        os.close(old.pidfd)
        self.coordinator = fork_coordinator(self.cfg, self.shared, self.dax_shared)
        self.coordinator_restarts += 1
        try:
            control.call(self.coordinator.sock, ["ping"])
        except control.ControlError as e:
            log.error("the replacement coordinator failed: %s", e)
            return
        for wid in range(len(self.workers)):
            self._link_dax(wid)
        device = self.device
        if device is not None and device.backend_fd is not None and device.shmem_acked():
            self._dax_cast(["channel", True], [device.backend_fd])

    def _link_dax(self, wid: int) -> None:
        """Give worker ``wid`` and the coordinator each an end of a new DAX link."""
        if self.dax_shared is None or self.coordinator is None:
            return
        try:
            self._attach_dax(self.coordinator.sock, self.workers[wid].sock, wid)
        except (OSError, control.ControlError) as e:
            log.error("cannot link worker %d to the DAX coordinator: %s", wid, e)

    def _dax_cast(self, msg: list[Any], fds: list[int]) -> None:
        """A one-way message to the coordinator; it gets copies of ``fds``."""
        if self.coordinator is None:
            return
        try:
            control.send(self.coordinator.sock, msg, fds)
        except OSError as e:
            log.error("the DAX coordinator is unreachable (%s): %s", msg[0], e)

    def _wait(self, fds: list[int]) -> list[int]:
        """select() on ``fds``, the wake pipe, the status socket and worker pidfds.

        Dead workers are restarted and status requests answered here, so
        both happen whether or not a frontend is connected.
        """
        pidfds = [w.pidfd for w in self.workers]
        extra = [self.status.fileno()] if self.status is not None else []
        coord = [self.coordinator.pidfd] if self.coordinator is not None else []
        r, _, _ = select.select(fds + [self._wake_r] + pidfds + extra + coord, [], [])
        # A SIGTERM to the whole process group (libvirt stopping a domain) ends the
        # children too: once stopping, a dead child is shutdown, not a crash.
        if any(p in r for p in pidfds) and not self.stopping:
            self._restart_dead_workers()
        if coord and coord[0] in r and not self.stopping:
            self._restart_coordinator()
        if extra and extra[0] in r:
            self._answer_status()
        return r

    def snapshot(self) -> dict[str, Any]:
        """Everything ``shardfs stats`` shows; reads shared memory and /proc only."""
        procs = [process_info("supervisor", os.getpid())]
        if self.coordinator is not None:
            procs.append(process_info("coordinator", self.coordinator.proc.pid))
        if self.lock_proc is not None:
            procs.append(process_info("locks", self.lock_proc.proc.pid))
        procs += [process_info(f"worker-{i}", w.proc.pid) for i, w in enumerate(self.workers)]
        return {"shared_dir": self.cfg.shared_dir, "connected": self.device is not None,
                "num_request_queues": self.cfg.num_request_queues,
                "worker_restarts": self.restarts, "poll_us": self.cfg.poll_us,
                "coordinator_restarts": self.coordinator_restarts,
                **({"dax": self.dax_shared.read()} if self.dax_shared is not None else {}),
                "queues": read_page(self.stats_page, 1 + self.cfg.num_request_queues),
                "processes": procs}

    def _answer_status(self) -> None:
        assert self.status is not None
        try:
            conn, _ = self.status.accept()
        except OSError:
            return
        with conn:
            try:
                conn.settimeout(1.0)
                fmt = conn.recv(64).decode(errors="replace").strip() or "json"
                conn.sendall(encode(self.snapshot(), fmt))
            except OSError as e:
                log.debug("status client: %s", e)

    # -- main loop ------------------------------------------------------------

    def run(self, listener: socket.socket) -> int:
        set_process_name("shardfs")
        self._listener: socket.socket | None = listener
        self._announced_wait = False
        self.status = open_status_socket(self.cfg)
        try:
            policy = SandboxPolicy(self.cfg.sandbox, self.cfg.seccomp)
            # Non-root: a user namespace first (sandbox.userns), then the IPC one.
            enter_user_namespace(policy, self.cfg.uid_map, self.cfg.gid_map,
                                 queues=self.cfg.num_request_queues,
                                 dax=bool(self.cfg.dax_window))
            isolate_daemon(policy)
            why = (check_handles(self.cfg.shared_dir)
                   if self.cfg.inode_file_handles == "mandatory" else None)
            if why is not None:
                raise OSError(errno.EOPNOTSUPP, f"inode_file_handles: mandatory, but {why}")
        except OSError as e:
            log.error("%s", e.strerror if e.errno == errno.EOPNOTSUPP else e)
            self._shutdown()
            return 1
        try:
            if self.dax_shared is not None:
                # Without a DAX window it would have nothing to serialize, and
                # an idle process still costs its private pages (about 3 MB).
                self.coordinator = fork_coordinator(self.cfg, self.shared, self.dax_shared)
                control.call(self.coordinator.sock, ["ping"])
            if self.cfg.lock_kinds():
                self.lock_proc = fork_locks(self.cfg)
                control.call(self.lock_proc.sock, ["ping"])
            self.workers = [self._fork_worker(i) for i in range(self.cfg.num_request_queues)]
            for w in self.workers:
                control.call(w.sock, ["ping"])  # each child is up and has named itself
            for wid in range(len(self.workers)):
                self._link_dax(wid)
                self._link_locks(wid)
        except control.ControlError as e:
            log.error("a child process failed to start (%s); see its log above", e)
            self._shutdown()
            return 1
        log.info("serving %s on %s with %d request queue(s), pids: workers %s%s",
                 self.cfg.shared_dir, self.cfg.socket_path or f"fd {self.cfg.fd}",
                 self.cfg.num_request_queues, ", ".join(str(w.proc.pid) for w in self.workers),
                 f", DAX coordinator {self.coordinator.proc.pid}" if self.coordinator else "")
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
        if not self._announced_wait:
            # virtiofsd's words: Kata's runtime-rs waits for this line on stderr.
            log.info("Waiting for vhost-user socket connection...")
            self._announced_wait = True
        r = self._wait([listener.fileno()])
        if listener.fileno() not in r:
            return None
        try:
            conn, _ = listener.accept()
        except InterruptedError:
            return None
        self._announced_wait = False
        log.info("frontend connected")
        return conn

    def _serve(self, conn: socket.socket) -> None:
        device = self.device = WorkerDevice(self.workers, self.progress)
        device.migration = Migration(self.cfg, self.shared)
        if self.dax_shared is not None:
            device.dax_cast = self._dax_cast
        session = VhostUserSession(device, session_config(self.cfg))
        bit = self.cfg.shmem_bit
        device.shmem_acked = lambda: bool(session.acked_protocol_features >> bit & 1)
        try:
            while not self.stopping:
                r = self._wait([conn.fileno()])
                if conn.fileno() not in r:
                    continue
                if not self._one_message(conn, session):
                    break
        finally:
            log.info("frontend disconnected; resetting the device")
            session.close()
            device.migration.close()
            self.device = None
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
                data += recv_exact(conn, vu.vhost_user_header.size - len(data))
            request, flags, size = parse_header(data)
            payload = recv_exact(conn, size) if size else b""
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

    def _shutdown(self) -> None:
        children = self.workers + ([self.coordinator] if self.coordinator else [])
        children += [self.lock_proc] if self.lock_proc else []
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
            os.close(c.pidfd)
        if self.status is not None:
            self.status.close()
            path = self.cfg.status_socket()
            if path:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        log.info("shut down")
        # Done: a SIGTERM now (libvirt stopping the domain as the VMM leaves) must
        # not turn a clean exit into a death by signal while Python finalizes
        # (which restores the default handlers).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
