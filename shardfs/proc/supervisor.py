"""The supervisor: owns the vhost-user socket and the process tree.

Start-up order: listen (or take ``--fd``), fork the DAX coordinator (only with a
DAX window), the lock process (only with host-visible locks), and one
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
import grp
import logging
import mmap
import os
import resource
import select
import signal
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shardfs.abi import vhost_user as vu
from shardfs.abi.vhost_user import ProtocolFeature as PF
from shardfs.abi.virtio import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_FS_TAG_MAX,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    virtio_fs_config,
)
from shardfs.codec.vhost_user import (
    FramingError,
    MemRegion,
    ProtocolError,
    SessionConfig,
    VhostUserSession,
    VringState,
    parse_header,
    used_log_gpa,
)
from shardfs.config import Config
from shardfs.fs.api import FileSystem
from shardfs.fs.build import build_fs
from shardfs.fs.passthrough.fhandle import check_handles
from shardfs.fs.passthrough.fs import fd_budgets
from shardfs.fs.passthrough.mounts import submount_fds
from shardfs.fs.passthrough.shared import SharedState
from shardfs.proc import control
from shardfs.proc.coordinator import Coordinator, DaxSetup, attach_worker
from shardfs.proc.dax import DaxClient, DaxShared, Geometry
from shardfs.proc.locks import attach_worker as attach_locks
from shardfs.proc.locks import init_flags as lock_init_flags
from shardfs.proc.locks import lock_process_body
from shardfs.proc.migration import Migration, MigrationDevice
from shardfs.proc.spawn import ForkedProcess
from shardfs.proc.stats import create_page, encode, process_info, read_page
from shardfs.proc.worker import Worker, set_process_name
from shardfs.sandbox import SandboxPolicy, confine, enter_user_namespace, isolate_daemon
from shardfs.sandbox.seccomp import ALLOWED_SYSCALLS

log = logging.getLogger("shardfs.supervisor")

#: Frontends queue here while one is served (a VMM restarting, libvirt probing).
LISTEN_BACKLOG = 16
#: Per-ring progress word: the next avail index the owning worker will take.
_PROGRESS = struct.Struct("<I")

VIRTIO_FEATURES = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC
                   | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VHOST_USER_F_PROTOCOL_FEATURES
                   | 1 << VHOST_F_LOG_ALL)
PROTOCOL_FEATURES = (1 << PF.MQ | 1 << PF.REPLY_ACK | 1 << PF.CONFIGURE_MEM_SLOTS
                     | 1 << PF.BACKEND_REQ | 1 << PF.BACKEND_SEND_FD | 1 << PF.RESET_DEVICE
                     | 1 << PF.STATUS | 1 << PF.LOG_SHMFD | 1 << PF.DEVICE_STATE)


def session_config(cfg: Config) -> SessionConfig:
    """What we advertise: DESIGN §1, and CONFIG only with a tag (QEMU 7.1-8.0 crash on it)."""
    proto = PROTOCOL_FEATURES
    space = b""
    if cfg.tag:
        proto |= 1 << PF.CONFIG
        space = virtio_fs_config.pack(cfg.tag.encode().ljust(VIRTIO_FS_TAG_MAX, b"\0"),
                                      cfg.num_request_queues, 0)
    shmem: tuple[int, ...] = ()
    if cfg.dax_window:
        # The DAX window is shared memory region 0 (VIRTIO_FS_SHMCAP_ID_CACHE);
        # BACKEND_REQ and BACKEND_SEND_FD, which SHMEM_MAP needs, are always offered.
        proto |= 1 << cfg.shmem_bit
        shmem = (cfg.dax_window,)
    return SessionConfig(num_queues=1 + cfg.num_request_queues, tag=cfg.tag,
                         config_space=space, virtio_features=VIRTIO_FEATURES,
                         protocol_features=proto, shmem_sizes=shmem,
                         shmem_bit=cfg.shmem_bit)


def virtiofsd_fs_options(cfg: Config) -> dict[str, Any]:
    """The passthrough keyword options of virtiofsd's flags (``PassthroughFs``)."""
    return {"announce_submounts": cfg.announce_submounts, "readdirplus": cfg.readdirplus,
            "allow_mmap": cfg.allow_mmap, "preserve_noatime": cfg.preserve_noatime,
            "inode_file_handles": cfg.inode_file_handles,
            "cache_timeout_s": cfg.cache_timeout_s}


@dataclass
class Child:
    name: str
    proc: ForkedProcess
    sock: socket.socket
    #: Readable once the process has exited (pidfd_open), for select().
    pidfd: int


def _close_fds_except(keep: int) -> None:
    """In a fresh child: close every inherited fd but stdio, ``keep`` and logging's.

    The supervisor holds the listener, the frontend connection and dups of
    memory, kick and call fds; a worker must get those only through its
    control socket, so that what it holds is exactly what it was given.
    A syslog handler's socket stays: it is connected already, so it keeps
    working inside the sandbox, where /dev/log cannot be reached.
    """
    keep_fds = sorted({keep} | _logging_fds())
    start = 3
    for fd in keep_fds:
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _logging_fds() -> set[int]:
    fds = set()
    for handler in logging.getLogger().handlers:
        sock = getattr(handler, "socket", None)
        if sock is not None:
            try:
                fds.add(sock.fileno())
            except OSError:
                pass
    return fds


@dataclass
class RingRecord:
    """What it takes to start a ring again in a fresh worker (crash recovery)."""

    args: list[Any]  # ring_start arguments after the index, base excluded
    kick_fd: int
    call_fd: int | None
    enabled: bool


class WorkerDevice(MigrationDevice):
    """The Device the session drives, implemented over worker control sockets.

    It keeps its own dups of the memory-region, kick and call fds, so that a
    worker that dies can be replaced and its rings restarted where they
    stood (:meth:`replay`).
    """

    def __init__(self, workers: list[Child], progress: mmap.mmap) -> None:
        self.workers = workers
        self.progress = progress
        self.backend_fd: int | None = None
        #: Sends a one-way message (and copies of fds) to the DAX coordinator.
        self.dax_cast: Callable[[list[Any], list[int]], None] | None = None
        #: Whether the frontend acknowledged SHMEM: only then is the backend
        #: channel a DAX window (a VMM without it would not know SHMEM_MAP).
        self.shmem_acked: Callable[[], bool] = lambda: False
        self.regions: dict[tuple[int, int], tuple[MemRegion, int]] = {}
        self.rings: dict[int, RingRecord] = {}

    def owner_index(self, index: int) -> int:
        """hiprio (0) and request queue 1 go to worker 0; queue i to worker i-1."""
        return max(index - 1, 0) % len(self.workers)

    def owner(self, index: int) -> Child:
        return self.workers[self.owner_index(index)]

    def _call(self, child: Child, msg: list[Any], fds: list[int] | tuple[int, ...] = ()) -> Any:
        try:
            return control.call(child.sock, msg, fds)
        except (control.ControlError, OSError) as e:
            raise ProtocolError(f"{child.name}: {msg[0]}: {e}") from e

    def _all(self, msg: list[Any], fds: list[int]) -> None:
        errors = []
        for child in self.workers:
            try:
                self._call(child, msg, fds)
            except ProtocolError as e:
                errors.append(str(e))
        if errors:
            raise ProtocolError("; ".join(errors))

    @staticmethod
    def _region_args(r: MemRegion) -> list[int]:
        return [r.gpa, r.size, r.user_addr, r.mmap_offset]

    def _mem_set_msg(self) -> tuple[list[Any], list[int]]:
        regions = list(self.regions.values())
        return ["mem_set", [self._region_args(r) for r, _ in regions]], [fd for _, fd in regions]

    def mem_set(self, regions: list[tuple[MemRegion, int]]) -> None:
        self._drop_regions()
        self.regions = {(r.gpa, r.size): (r, fd) for r, fd in regions}
        log.info("memory table: %s", ", ".join(
            f"gpa {r.gpa:#x}+{r.size:#x}" for r, _ in regions))
        self._all(*self._mem_set_msg())

    def mem_add(self, region: MemRegion, fd: int) -> None:
        old = self.regions.pop((region.gpa, region.size), None)
        if old is not None:
            os.close(old[1])
        self.regions[(region.gpa, region.size)] = (region, fd)
        log.info("memory region added: gpa %#x+%#x", region.gpa, region.size)
        self._all(["mem_add", self._region_args(region)], [fd])

    def mem_remove(self, region: MemRegion) -> None:
        old = self.regions.pop((region.gpa, region.size), None)
        if old is not None:
            os.close(old[1])
        log.info("memory region removed: gpa %#x+%#x", region.gpa, region.size)
        self._all(["mem_remove", self._region_args(region)], [])

    def _drop_regions(self) -> None:
        for _, fd in self.regions.values():
            os.close(fd)
        self.regions = {}

    def _ring_fds(self, rec: RingRecord) -> list[int]:
        return [rec.kick_fd] + ([rec.call_fd] if rec.call_fd is not None else [])

    def ring_start(self, index: int, state: VringState, kick_fd: int, call_fd: int | None,
                   event_idx: bool, indirect: bool) -> None:
        self._drop_ring(index)
        rec = RingRecord([state.num, state.desc_addr, state.avail_addr, state.used_addr,
                          event_idx, indirect], kick_fd, call_fd, state.enabled)
        self.rings[index] = rec
        self.ring_starting(index, used_log_gpa(state), state.num)
        self._start(index, rec, state.base, recover=False)

    def _start(self, index: int, rec: RingRecord, base: int, recover: bool) -> None:
        num, desc, avail, used, event_idx, indirect = rec.args
        self._call(self.owner(index), ["ring_start", index, num, desc, avail, used, base,
                                       event_idx, indirect, rec.enabled, recover],
                   self._ring_fds(rec))

    def ring_stop(self, index: int) -> int:
        try:
            return int(self._call(self.owner(index), ["ring_stop", index]))
        finally:
            self._drop_ring(index)

    def _drop_ring(self, index: int) -> None:
        rec = self.rings.pop(index, None)
        if rec is not None:
            for fd in self._ring_fds(rec):
                os.close(fd)

    def ring_call(self, index: int, call_fd: int | None) -> None:
        rec = self.rings.get(index)
        if rec is not None:
            if rec.call_fd is not None:
                os.close(rec.call_fd)
            rec.call_fd = call_fd
        fds = [call_fd] if call_fd is not None else []
        self._call(self.owner(index), ["ring_call", index], fds)
        if rec is None:
            for fd in fds:
                os.close(fd)

    def ring_enable(self, index: int, enabled: bool) -> None:
        rec = self.rings.get(index)
        if rec is not None:
            rec.enabled = enabled
        self._call(self.owner(index), ["ring_enable", index, enabled])

    def backend_channel(self, fd: int) -> None:
        if self.backend_fd is not None:
            os.close(self.backend_fd)
        self.backend_fd = fd
        if self.dax_cast is not None and self.shmem_acked():
            self.dax_cast(["channel", False], [fd])

    def replay(self, wid: int) -> None:
        """Bring a replacement worker up to the session's state.

        Its rings resume at the avail index the dead worker had reached
        (the per-ring progress words it kept in shared memory); chains it
        had taken but not completed are answered EIO by the new worker.
        """
        if not self.regions:
            return
        self._call(self.workers[wid], *self._mem_set_msg())
        self.replay_log(wid)
        for index, rec in self.rings.items():
            if self.owner_index(index) == wid:
                base = _PROGRESS.unpack_from(self.progress, _PROGRESS.size * index)[0]
                self._start(index, rec, base, recover=True)
                log.warning("vring %d resumed in the new worker at avail index %d",
                            index, base)

    def reset(self) -> None:
        """RESET_DEVICE: stop the rings; memory and the backend channel stay."""
        for index in list(self.rings):
            self._drop_ring(index)
        self._each(["stop_rings"])
        if self.dax_cast is not None:
            self.dax_cast(["reset"], [])

    def disconnect(self) -> None:
        """Frontend gone: rings, memory, the backend channel and all FUSE state."""
        for index in list(self.rings):
            self._drop_ring(index)
        self._drop_regions()
        self._each(["reset", True])
        if self.backend_fd is not None:
            os.close(self.backend_fd)
            self.backend_fd = None
        if self.dax_cast is not None:
            self.dax_cast(["disconnect"], [])

    def _each(self, msg: list[Any]) -> None:
        for child in self.workers:
            try:
                self._call(child, msg)
            except ProtocolError as e:
                log.error("%s", e)


class Supervisor:
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
        self.progress = mmap.mmap(-1, _PROGRESS.size * (1 + cfg.num_request_queues),
                                  mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.stats_page = create_page(1 + cfg.num_request_queues)
        # The DAX coordinator's counters (mapping count included), seen by all.
        self.dax_shared = DaxShared() if cfg.dax_window else None
        self.coordinator_restarts = 0
        self.status: socket.socket | None = None
        self.device: WorkerDevice | None = None
        self.restarts = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- process tree ---------------------------------------------------------

    def _fork_worker(self, wid: int) -> Child:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cfg = self.cfg
        shared = self.shared
        progress = self.progress
        stats_page = self.stats_page
        dax_shared = self.dax_shared

        def body() -> None:
            _close_fds_except(child.fileno())
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            submounts: dict[int, int] = {}

            def open_fs(path: str) -> FileSystem:
                return build_fs(path, cache=cfg.cache, max_nodes=cfg.max_nodes,
                                max_handles=cfg.max_handles, xattr=cfg.xattr,
                                writeback=cfg.writeback, shared=shared, worker=wid,
                                readonly=cfg.readonly, translate_uid=cfg.translate_uid,
                                translate_gid=cfg.translate_gid, xattrmap=cfg.xattrmap,
                                posix_acl=cfg.posix_acl, killpriv_v2=cfg.killpriv_v2,
                                security_label=cfg.security_label,
                                allow_direct_io=cfg.allow_direct_io,
                                # creds keeps DAC checks the guest's with capset(2).
                                guest_dac=cfg.seccomp != "kill"
                                or "capset" in ALLOWED_SYSCALLS, submounts=submounts,
                                **virtiofsd_fs_options(cfg))

            def make_fs() -> FileSystem:
                # Mounts under the share are found before the sandbox hides
                # /proc/self/mountinfo; their fds work inside it.
                nonlocal submounts
                submounts = submount_fds(cfg.shared_dir)
                # The share is opened inside the sandbox, at the path it has there.
                return confine(SandboxPolicy(cfg.sandbox, cfg.seccomp, cfg.modcaps),
                               cfg.shared_dir, open_fs)

            dax = (DaxClient(Geometry(cfg.dax_window), dax_shared)
                   if dax_shared is not None else None)
            Worker(wid, child, make_fs, progress, stats_page, cfg.poll_us, dax=dax).run()

        proc = ForkedProcess(body, f"shardfs-worker-{wid}")
        pid = proc.start()
        child.close()
        return Child(f"worker {wid}", proc, parent, os.pidfd_open(pid))

    def _fork_coordinator(self) -> Child:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cfg = self.cfg
        state, counters = self.shared, self.dax_shared

        def open_share(path: str) -> int | None:
            # With DAX it opens files by file handle, which needs an fd on the share.
            if counters is None:
                return None
            return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

        def body() -> None:
            _close_fds_except(child.fileno())
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            try:
                # Confined like a worker; inside, the share is at the path it is given.
                mount_fd = confine(SandboxPolicy(cfg.sandbox, cfg.seccomp, cfg.modcaps),
                                   cfg.shared_dir, open_share)
            except OSError as e:
                log.error("the coordinator cannot start: %s", e)
                return
            dax = None
            if counters is not None and mount_fd is not None:
                dax = DaxSetup(Geometry(cfg.dax_window), state, counters, mount_fd,
                               readonly=cfg.readonly)
            Coordinator(child, dax).run()

        proc = ForkedProcess(body, "shardfs-coordinator")
        pid = proc.start()
        child.close()
        return Child("coordinator", proc, parent, os.pidfd_open(pid))

    def _fork_locks(self) -> Child:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        policy = SandboxPolicy(self.cfg.sandbox, self.cfg.seccomp, self.cfg.modcaps)

        def body() -> None:
            _close_fds_except(child.fileno())
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            lock_process_body(child, policy, self.cfg.shared_dir)

        proc = ForkedProcess(body, "shardfs-locks")
        pid = proc.start()
        child.close()
        return Child("lock process", proc, parent, os.pidfd_open(pid))

    def _link_locks(self, wid: int) -> None:
        """Give worker ``wid`` and the lock process a new lock link (proc.locks)."""
        if self.lock_proc is None:
            return
        try:
            attach_locks(self.lock_proc.sock, self.workers[wid].sock, wid,
                         lock_init_flags(self.cfg.lock_kinds()))
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
        self.coordinator = self._fork_coordinator()
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
            attach_worker(self.coordinator.sock, self.workers[wid].sock, wid)
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
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
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
                self.coordinator = self._fork_coordinator()
                control.call(self.coordinator.sock, ["ping"])
            if self.cfg.lock_kinds():
                self.lock_proc = self._fork_locks()
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


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError("frontend closed mid-message")
        buf += chunk
    return bytes(buf)


def _remove_stale_stats_sockets(directory: str) -> None:
    """Remove ``stats-PID.sock`` left by daemons that were killed (their pid is gone)."""
    for name in os.listdir(directory):
        pid = name.removeprefix("stats-").removesuffix(".sock")
        if name.startswith("stats-") and name.endswith(".sock") and pid.isdigit():
            if not os.path.exists(f"/proc/{pid}"):
                try:
                    os.unlink(os.path.join(directory, name))
                except OSError:
                    pass


def open_status_socket(cfg: Config) -> socket.socket | None:
    """The status socket ``shardfs stats`` reads; None when there is no path for it."""
    path = cfg.status_socket()
    parent = os.path.dirname(path)
    if parent and not cfg.stats_socket and not cfg.socket_path:
        # The default place (--fd alone): a directory of our own, never one that
        # someone else made for us in /tmp.
        os.makedirs(parent, mode=0o700, exist_ok=True)
        st = os.lstat(parent)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            log.warning("no status socket: %s is not a directory of this user", parent)
            return None
        _remove_stale_stats_sockets(parent)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(4)
    return sock


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
    if cfg.socket_group is not None:
        # As virtiofsd's --socket-group: the VMM's group may connect, others not.
        os.chown(cfg.socket_path, -1, grp.getgrnam(cfg.socket_group).gr_gid)
        os.chmod(cfg.socket_path, 0o660)
    sock.listen(LISTEN_BACKLOG)
    return sock
