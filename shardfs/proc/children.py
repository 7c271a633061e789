"""The supervisor's children: how each is forked, and what it starts with.

There are three kinds, each forked by :class:`~shardfs.proc.spawn.ForkedProcess`
and returned as a :class:`Child`:

* a worker per request queue (:func:`fork_worker`), which serves its rings
  (:class:`~shardfs.proc.worker.Worker`) on the share it opens confined;
* the DAX coordinator (:func:`fork_coordinator`), only with a DAX window;
* the lock process (:func:`fork_locks`), only with host-visible locks.

Contracts:

* Everything children share is made by the supervisor *before* it forks, so
  that every child inherits the same mapping: node and handle identity
  (:class:`~shardfs.fs.passthrough.shared.SharedState`), the ring progress
  page (:data:`shardfs.proc.worker.PROGRESS`), the stats page and the DAX
  counters.  A replacement child is given the same objects.
* A child holds exactly what it was given: every inherited fd but stdio,
  its end of the control socket and logging's sockets is closed first
  (:func:`_close_fds_except`); memory, kick and call fds reach it later,
  through that socket.
* A child dies of SIGTERM (the default action) rather than inheriting the
  supervisor's handler.
* The supervisor owns the returned :class:`Child`: its control socket and
  pidfd are closed by whoever reaps the process.
"""

from __future__ import annotations

import logging
import mmap
import os
import resource
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardfs.config import Config
from shardfs.fs.api import FileSystem
from shardfs.fs.build import build_fs
from shardfs.fs.passthrough.mounts import submount_fds
from shardfs.fs.passthrough.shared import SharedState
from shardfs.proc.spawn import ForkedProcess
from shardfs.proc.worker import Worker
from shardfs.sandbox import SandboxPolicy, confine
from shardfs.sandbox.seccomp import ALLOWED_SYSCALLS

if TYPE_CHECKING:
    # Imported where used: the supervisor loads them before forking, and only
    # when DAX or host locks are configured (proc.supervisor).
    from shardfs.proc.dax import DaxShared

# The supervisor's logger: the line it logs is the one the supervisor logged.
log = logging.getLogger("shardfs.supervisor")


class Child:
    """A running child as the supervisor holds it; the supervisor owns ``sock`` and ``pidfd``."""

    name: str
    proc: ForkedProcess
    sock: socket.socket
    #: Readable once the process has exited (pidfd_open), for select().
    pidfd: int

    def __init__(self, name: str, proc: ForkedProcess, sock: socket.socket, pidfd: int) -> None:
        self.name = name
        self.proc = proc
        self.sock = sock
        self.pidfd = pidfd


def virtiofsd_fs_options(cfg: Config) -> dict[str, Any]:
    """The passthrough keyword options of virtiofsd's flags (``PassthroughFs``)."""
    return {"announce_submounts": cfg.announce_submounts, "readdirplus": cfg.readdirplus,
            "allow_mmap": cfg.allow_mmap, "preserve_noatime": cfg.preserve_noatime,
            "inode_file_handles": cfg.inode_file_handles,
            "cache_timeout_s": cfg.cache_timeout_s}


def _fork(name: str, title: str, run: Callable[[socket.socket], None]) -> Child:
    """Fork a child that runs ``run`` on its end of a new control socket."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def body() -> None:
        _close_fds_except(child.fileno())
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        run(child)

    proc = ForkedProcess(body, title)
    pid = proc.start()
    child.close()
    return Child(name, proc, parent, os.pidfd_open(pid))


def fork_worker(cfg: Config, wid: int, shared: SharedState, progress: mmap.mmap,
                stats_page: mmap.mmap, dax_shared: DaxShared | None) -> Child:
    """Worker ``wid``: serves the rings the device gives it (``owner_index``)."""
    return _fork(f"worker {wid}", f"shardfs-worker-{wid}",
                 lambda sock: _run_worker(sock, cfg, wid, shared, progress, stats_page,
                                          dax_shared))


def _run_worker(sock: socket.socket, cfg: Config, wid: int, shared: SharedState,
                progress: mmap.mmap, stats_page: mmap.mmap,
                dax_shared: DaxShared | None) -> None:
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

    dax = None
    if dax_shared is not None:
        from shardfs.proc.dax import DaxClient, Geometry

        dax = DaxClient(Geometry(cfg.dax_window), dax_shared)
    Worker(wid, sock, make_fs, progress, stats_page, cfg.poll_us, dax=dax).run()


def fork_coordinator(cfg: Config, shared: SharedState, dax_shared: DaxShared | None) -> Child:
    """The DAX coordinator (:mod:`shardfs.proc.coordinator`)."""
    return _fork("coordinator", "shardfs-coordinator",
                 lambda sock: _run_coordinator(sock, cfg, shared, dax_shared))


def _run_coordinator(sock: socket.socket, cfg: Config, state: SharedState,
                     counters: DaxShared | None) -> None:
    from shardfs.proc.coordinator import Coordinator, DaxSetup
    from shardfs.proc.dax import Geometry

    def open_share(path: str) -> int | None:
        # With DAX it opens files by file handle, which needs an fd on the share.
        if counters is None:
            return None
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

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
    Coordinator(sock, dax).run()


def fork_locks(cfg: Config) -> Child:
    """The lock process (:mod:`shardfs.proc.locks`)."""
    from shardfs.proc.locks import lock_process_body

    policy = SandboxPolicy(cfg.sandbox, cfg.seccomp, cfg.modcaps)
    shared_dir = cfg.shared_dir
    return _fork("lock process", "shardfs-locks",
                 lambda sock: lock_process_body(sock, policy, shared_dir))


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
