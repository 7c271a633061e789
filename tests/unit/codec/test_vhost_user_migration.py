"""The session's migration messages, sans-IO (spec: "Migration", "Migrating
back-end state"): what needs which feature, what is answered, and fd ownership."""

from __future__ import annotations

import os
from typing import Any

from shardfs.abi import vhost_user as vu
from shardfs.abi.vhost_user import FrontendReq as R
from shardfs.abi.vhost_user import ProtocolFeature as PF
from shardfs.abi.virtio import VHOST_F_LOG_ALL
from shardfs.codec.vhost_user import (
    Device,
    SessionConfig,
    VhostUserSession,
    encode_reply,
)
from tests.unit.support import open_fd_count

PLAIN = vu.VHOST_USER_VERSION
SAVE = vu.vhost_user_transfer_state.pack(vu.VHOST_TRANSFER_STATE_DIRECTION_SAVE,
                                         vu.VHOST_TRANSFER_STATE_PHASE_STOPPED)


class MigratingDevice(Device):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.check = True

    def log_base(self, fd: int, size: int, offset: int) -> None:
        os.close(fd)
        self.calls.append(("log_base", size, offset))

    def log_all(self, enabled: bool) -> None:
        self.calls.append(("log_all", enabled))

    def ring_log(self, index: int, log_gpa: int | None, num: int) -> None:
        self.calls.append(("ring_log", index, log_gpa))

    def device_state(self, direction: int, fd: int) -> None:
        os.close(fd)
        self.calls.append(("device_state", direction))

    def check_device_state(self) -> bool:
        return self.check

    def reset(self) -> None:
        pass

    def disconnect(self) -> None:
        pass


def session(protocol: int) -> tuple[VhostUserSession, MigratingDevice]:
    dev = MigratingDevice()
    cfg = SessionConfig(num_queues=2, tag=None, config_space=b"",
                        virtio_features=1 << VHOST_F_LOG_ALL | 1 << 30,
                        protocol_features=protocol)
    s = VhostUserSession(dev, cfg)
    s.acked_protocol_features = protocol
    return s, dev


def memfd() -> int:
    fd = os.memfd_create("log", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    return fd


def test_set_log_base_needs_log_shmfd_and_echoes_the_description() -> None:
    before = open_fd_count()
    s, dev = session(1 << PF.LOG_SHMFD)
    payload = vu.vhost_user_log.pack(4096, 0)
    assert s.handle(R.SET_LOG_BASE, PLAIN, payload, [memfd()]) == encode_reply(R.SET_LOG_BASE,
                                                                             payload)
    assert dev.calls == [("log_base", 4096, 0)]
    s2, dev2 = session(0)
    assert s2.handle(R.SET_LOG_BASE, PLAIN, payload, [memfd()]) is None  # no reply expected
    assert dev2.calls == []
    # A short payload with LOG_SHMFD: refused, but still answered (QEMU waits).
    assert s.handle(R.SET_LOG_BASE, PLAIN, b"\0" * 8, [memfd()]) == encode_reply(
        R.SET_LOG_BASE, b"")
    assert open_fd_count() == before


def test_log_all_and_ring_flag_reach_the_device() -> None:
    s, dev = session(1 << PF.LOG_SHMFD)
    s.handle(R.SET_FEATURES, PLAIN, vu.u64.pack(1 << VHOST_F_LOG_ALL | 1 << 30), [])
    s.handle(R.SET_FEATURES, PLAIN, vu.u64.pack(1 << VHOST_F_LOG_ALL | 1 << 30), [])
    s.vrings[1].started = True
    s.vrings[1].num = 8
    s.handle(R.SET_VRING_ADDR, PLAIN, vu.vhost_vring_addr.pack(1, vu.VHOST_VRING_F_LOG, 0, 0,
                                                               0, 0x5000), [])
    s.handle(R.SET_FEATURES, PLAIN, vu.u64.pack(1 << 30), [])
    assert dev.calls == [("log_all", True), ("ring_log", 1, 0x5000), ("log_all", False)]


def test_device_state_messages() -> None:
    before = open_fd_count()
    s, dev = session(1 << PF.DEVICE_STATE)
    r, w = os.pipe()
    ok = encode_reply(R.SET_DEVICE_STATE_FD, vu.u64.pack(vu.VHOST_USER_DEVICE_STATE_NOFD))
    assert s.handle(R.SET_DEVICE_STATE_FD, PLAIN, SAVE, [w]) == ok
    os.close(r)
    assert s.handle(R.CHECK_DEVICE_STATE, PLAIN, b"", []) == encode_reply(
        R.CHECK_DEVICE_STATE, vu.u64.pack(0))
    dev.check = False
    assert s.handle(R.CHECK_DEVICE_STATE, PLAIN, b"", []) == encode_reply(
        R.CHECK_DEVICE_STATE, vu.u64.pack(1))
    failed = encode_reply(R.SET_DEVICE_STATE_FD, vu.u64.pack(vu.VHOST_USER_DEVICE_STATE_NOFD | 1))
    for payload in (vu.vhost_user_transfer_state.pack(7, 0),
                    vu.vhost_user_transfer_state.pack(0, 3), b"\0"):
        r, w = os.pipe()
        assert s.handle(R.SET_DEVICE_STATE_FD, PLAIN, payload, [w]) == failed
        os.close(r)
    # Without DEVICE_STATE negotiated: refused, answered as failures.
    s2, dev2 = session(0)
    r, w = os.pipe()
    assert s2.handle(R.SET_DEVICE_STATE_FD, PLAIN, SAVE, [w]) == failed
    os.close(r)
    assert s2.handle(R.CHECK_DEVICE_STATE, PLAIN, b"", []) == encode_reply(
        R.CHECK_DEVICE_STATE, vu.u64.pack(1))
    assert dev.calls == [("device_state", 0)] and dev2.calls == []
    assert open_fd_count() == before
