"""The frontend's half of a live migration, for tests (what QEMU's vhost code does).

Over a started :class:`~shardfs.testing.frontend.Frontend`: share a dirty
log (SET_LOG_BASE with a memfd, LOG_ALL, VHOST_VRING_F_LOG per ring), read
it back, stop the rings, and move the device state through a pipe with
SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE, as ``vhost_save_backend_state``
and ``vhost_load_backend_state`` do.
"""

from __future__ import annotations

import mmap
import os
import threading

from shardfs.abi import vhost_user as vu
from shardfs.abi.vhost_user import FrontendReq as R
from shardfs.abi.vhost_user import ProtocolFeature as PF
from shardfs.abi.virtio import VHOST_F_LOG_ALL
from shardfs.testing.frontend import USER_ADDR_OFFSET, Frontend

#: Protocol features a migrating frontend accepts beyond Frontend's defaults.
MIGRATION_PROTOCOL_FEATURES = 1 << PF.LOG_SHMFD | 1 << PF.DEVICE_STATE
#: QEMU's log geometry: 64 pages per u64 word (VHOST_LOG_CHUNK).
_PAGES_PER_WORD = 64


def migrating_frontend(socket_path: str, **kw: object) -> Frontend:
    """A Frontend that accepts LOG_SHMFD and DEVICE_STATE (not started)."""
    fe = Frontend(socket_path, **kw)  # type: ignore[arg-type]
    fe.extra_protocol_features |= MIGRATION_PROTOCOL_FEATURES
    return fe


class Log:
    """The frontend's dirty log: a memfd sized as QEMU sizes it."""

    def __init__(self, mem_size: int) -> None:
        words = mem_size // (vu.VHOST_LOG_PAGE * _PAGES_PER_WORD) + 1
        self.size = words * 8
        self.fd = os.memfd_create("vhost-log", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED)

    def pages(self) -> set[int]:
        """The pages marked so far."""
        out = set()
        data = self.map[:]
        for i, byte in enumerate(data):
            if byte:
                for b in range(8):
                    if byte >> b & 1:
                        out.add(i * 8 + b)
        return out

    def clear(self) -> None:
        self.map[:] = bytes(self.size)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def set_log_base(fe: Frontend, lg: Log) -> bytes:
    """SET_LOG_BASE; the backend answers it (LOG_SHMFD) with the Log description."""
    fe.send(R.SET_LOG_BASE, vu.vhost_user_log.pack(lg.size, 0), [lg.fd])
    return fe.recv_reply(R.SET_LOG_BASE)


def set_log_all(fe: Frontend, on: bool) -> int:
    features = fe.features | (1 << VHOST_F_LOG_ALL if on else 0)
    return fe.ack(R.SET_FEATURES, vu.u64.pack(features))


def set_ring_log(fe: Frontend, index: int, on: bool) -> int:
    q = fe.queues[index]
    return fe.ack(R.SET_VRING_ADDR, vu.vhost_vring_addr.pack(
        index, vu.VHOST_VRING_F_LOG if on else 0, q.desc + USER_ADDR_OFFSET,
        q.used + USER_ADDR_OFFSET, q.avail + USER_ADDR_OFFSET, q.used))


def start_logging(fe: Frontend, lg: Log) -> None:
    """What vhost_migration_log(enable) sends: log base, LOG_ALL, each ring's flag."""
    set_log_base(fe, lg)
    assert set_log_all(fe, True) == 0
    for index in fe.queues:
        assert set_ring_log(fe, index, True) == 0


def stop_rings(fe: Frontend) -> dict[int, int]:
    """GET_VRING_BASE on every ring (vhost_dev_stop): index -> next avail index."""
    return {index: fe.get_vring_base(index) for index in sorted(fe.queues)}


def save_state(fe: Frontend) -> tuple[int, bytes, int]:
    """SET_DEVICE_STATE_FD(SAVE) and CHECK: (set reply, the bytes, check reply)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fe.send(R.SET_DEVICE_STATE_FD, vu.vhost_user_transfer_state.pack(
            vu.VHOST_TRANSFER_STATE_DIRECTION_SAVE, vu.VHOST_TRANSFER_STATE_PHASE_STOPPED), [w])
    finally:
        os.close(w)
    reply = int(vu.u64.unpack(fe.recv_reply(R.SET_DEVICE_STATE_FD))[0])
    chunks = []
    with os.fdopen(r, "rb") as f:
        while chunk := f.read(1 << 20):
            chunks.append(chunk)
    check = fe.get_u64(R.CHECK_DEVICE_STATE)
    return reply, b"".join(chunks), check


def load_state(fe: Frontend, data: bytes) -> tuple[int, int]:
    """SET_DEVICE_STATE_FD(LOAD), write ``data``, close, CHECK: (set reply, check reply)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fe.send(R.SET_DEVICE_STATE_FD, vu.vhost_user_transfer_state.pack(
            vu.VHOST_TRANSFER_STATE_DIRECTION_LOAD, vu.VHOST_TRANSFER_STATE_PHASE_STOPPED), [r])
    finally:
        os.close(r)
    reply = int(vu.u64.unpack(fe.recv_reply(R.SET_DEVICE_STATE_FD))[0])
    errors: list[OSError] = []

    def feed() -> None:
        try:
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except OSError as e:  # the backend stopped reading (oversized stream)
            errors.append(e)

    t = threading.Thread(target=feed)
    t.start()
    t.join()
    return reply, fe.get_u64(R.CHECK_DEVICE_STATE)
