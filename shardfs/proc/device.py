"""The vhost-user device the daemon offers, and its implementation by the workers.

What is advertised (:func:`session_config`): the virtio and vhost-user
protocol features of DESIGN §1, the CONFIG space only with a tag (QEMU
7.1-8.0 crash on it), and shared memory region 0 only with a DAX window.

The supervisor runs the sans-IO :class:`~shardfs.codec.vhost_user.VhostUserSession`
and :class:`WorkerDevice` implements its :class:`~shardfs.codec.vhost_user.Device`
by sending control messages to the workers (:mod:`shardfs.proc.control`).

Queue ownership (virtio 1.2 §5.11.2): queue 0 is hiprio, queues 1..N are the
request queues (no notification queue is offered).  Request queue ``i`` is
served by worker ``i - 1``; hiprio by worker 0.

Guest memory: region fds from SET_MEM_TABLE/ADD_MEM_REG are passed to every
worker, which maps them ``MAP_SHARED``; the supervisor keeps only the table.

Fds: the device owns its dups of the memory-region, kick, call and backend
channel fds, and closes them when a region or ring is dropped, on reset
and on disconnect; a worker gets copies through its control socket.  That
is what lets :meth:`WorkerDevice.replay` restart the rings of a worker that
died in a fresh one, at the avail index the dead one had reached: each
worker keeps that index in its word of the progress page
(:data:`shardfs.proc.worker.PROGRESS`), which the supervisor maps shared before it forks.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable
from typing import Any

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
    MemRegion,
    ProtocolError,
    SessionConfig,
    VringState,
    used_log_gpa,
)
from shardfs.config import Config
from shardfs.proc import control
from shardfs.proc.children import Child
from shardfs.proc.migration import MigrationDevice
from shardfs.proc.worker import PROGRESS

# The supervisor's logger: these lines are the supervisor's, wherever the code sits.
log = logging.getLogger("shardfs.supervisor")

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


class RingRecord:
    """What it takes to start a ring again in a fresh worker (crash recovery)."""

    args: list[Any]  # ring_start arguments after the index, base excluded
    kick_fd: int
    call_fd: int | None
    enabled: bool

    def __init__(self, args: list[Any], kick_fd: int, call_fd: int | None,
                 enabled: bool) -> None:
        self.args = args
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.enabled = enabled


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
                base = PROGRESS.unpack_from(self.progress, PROGRESS.size * index)[0]
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
