"""VhostUserSession, sans-IO: messages in, replies and Device calls out.

The Device is a recorder.  Fds are real eventfds so ownership is checked for
real: after every test, each fd that went in is either closed or held by the
fake device, and the process's fd count is back where it started.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from shardfs.abi import vhost_user as vu
from shardfs.abi.vhost_user import FrontendReq as R
from shardfs.abi.vhost_user import ProtocolFeature as PF
from shardfs.abi.virtio import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    virtio_fs_config,
)
from shardfs.codec.vhost_user import (
    Device,
    FramingError,
    MemRegion,
    SessionConfig,
    VhostUserSession,
    VringState,
    encode_reply,
    encode_request,
    parse_header,
)
from tests.unit.support import open_fd_count

FEATURES = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VHOST_USER_F_PROTOCOL_FEATURES)
PROTOCOL = (1 << PF.MQ | 1 << PF.REPLY_ACK | 1 << PF.CONFIGURE_MEM_SLOTS | 1 << PF.BACKEND_REQ
            | 1 << PF.CONFIG | 1 << PF.RESET_DEVICE | 1 << PF.STATUS)
CONFIG_SPACE = virtio_fs_config.pack(b"shardfs".ljust(36, b"\0"), 2, 0)
NEED_REPLY = vu.VHOST_USER_VERSION | vu.VHOST_USER_NEED_REPLY_MASK
PLAIN = vu.VHOST_USER_VERSION
NOFD = vu.VHOST_USER_VRING_NOFD_MASK


class FakeDevice(Device):
    """Records every call; owns (and later closes) every fd it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.owned: list[int] = []
        self.stop_value = 0

    def _own(self, fd: int | None) -> None:
        if fd is not None:
            os.fstat(fd)  # it must be open when handed over
            self.owned.append(fd)

    def mem_set(self, regions: list[tuple[MemRegion, int]]) -> None:
        for _, fd in regions:
            self._own(fd)
        self.calls.append(("mem_set", [r for r, _ in regions]))

    def mem_add(self, region: MemRegion, fd: int) -> None:
        self._own(fd)
        self.calls.append(("mem_add", region))

    def mem_remove(self, region: MemRegion) -> None:
        self.calls.append(("mem_remove", region))

    def ring_start(self, index: int, state: VringState, kick_fd: int, call_fd: int | None,
                   event_idx: bool, indirect: bool) -> None:
        self._own(kick_fd)
        self._own(call_fd)
        self.calls.append(("ring_start", index, state.enabled, state.base, state.num,
                           call_fd is not None, event_idx, indirect))

    def ring_stop(self, index: int) -> int:
        self.calls.append(("ring_stop", index))
        return self.stop_value

    def ring_call(self, index: int, call_fd: int | None) -> None:
        self._own(call_fd)
        self.calls.append(("ring_call", index, call_fd is not None))

    def ring_enable(self, index: int, enabled: bool) -> None:
        self.calls.append(("ring_enable", index, enabled))

    def backend_channel(self, fd: int) -> None:
        self._own(fd)
        self.calls.append(("backend_channel",))

    def reset(self) -> None:
        self.calls.append(("reset",))

    def disconnect(self) -> None:
        self.calls.append(("disconnect",))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def close(self) -> None:
        for fd in self.owned:
            os.close(fd)
        self.owned = []


class Harness:
    def __init__(self, protocol: int = PROTOCOL) -> None:
        self.dev = FakeDevice()
        self.session = VhostUserSession(self.dev, SessionConfig(
            num_queues=2, tag="shardfs", config_space=CONFIG_SPACE, virtio_features=FEATURES,
            protocol_features=protocol))

    def send(self, req: int, payload: bytes = b"", fds: list[int] | None = None,
             flags: int = PLAIN) -> bytes | None:
        return self.session.handle(req, flags, payload, fds or [])

    def reply(self, req: int, payload: bytes = b"", fds: list[int] | None = None,
              flags: int = PLAIN) -> bytes:
        """Send and decode the reply, checking its header."""
        out = self.send(req, payload, fds, flags)
        assert out is not None, f"{R(req).name} got no reply"
        request, rflags, size = parse_header(out[:12])
        assert request == req
        assert rflags & vu.VHOST_USER_REPLY_MASK
        assert not rflags & vu.VHOST_USER_NEED_REPLY_MASK
        assert size == len(out) - 12
        return out[12:]

    def u64(self, req: int, flags: int = PLAIN) -> int:
        return vu.u64.unpack(self.reply(req, flags=flags))[0]

    def ack(self, req: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
        """Send with NEED_REPLY (REPLY_ACK negotiated) and return the u64 status."""
        body = self.reply(req, payload, fds, NEED_REPLY)
        assert len(body) == 8
        return vu.u64.unpack(body)[0]

    def negotiate(self, features: int = FEATURES, protocol: int = PROTOCOL) -> None:
        assert self.send(R.SET_OWNER) is None
        assert self.send(R.SET_FEATURES, vu.u64.pack(features)) is None
        if features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            assert self.send(R.SET_PROTOCOL_FEATURES, vu.u64.pack(protocol)) is None

    def setup_ring(self, index: int, num: int = 256, base: int = 0) -> None:
        assert self.ack(R.SET_VRING_NUM, vu.vhost_vring_state.pack(index, num)) == 0
        assert self.ack(R.SET_VRING_ADDR,
                        vu.vhost_vring_addr.pack(index, 0, 0x1000, 0x3000, 0x2000, 0)) == 0
        assert self.ack(R.SET_VRING_BASE, vu.vhost_vring_state.pack(index, base)) == 0


def efd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def h() -> Iterator[Harness]:
    before = open_fd_count()
    harness = Harness()
    yield harness
    harness.session.close()  # the connection ends: the session drops its call/err fds
    harness.dev.close()
    assert open_fd_count() == before, "an fd that went into the session leaked"


@pytest.fixture
def hn(h: Harness) -> Harness:
    """Negotiated with PROTOCOL_FEATURES and REPLY_ACK."""
    h.negotiate()
    return h


# -- framing ------------------------------------------------------------------------


def test_parse_header_accepts_version_1_and_reply_flags() -> None:
    assert parse_header(vu.vhost_user_header.pack(R.GET_FEATURES, PLAIN, 0)) == (1, PLAIN, 0)
    assert parse_header(vu.vhost_user_header.pack(5, NEED_REPLY, 264)) == (5, NEED_REPLY, 264)
    limit = vu.VHOST_USER_MAX_PAYLOAD
    assert parse_header(vu.vhost_user_header.pack(5, PLAIN, limit))[2] == limit


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x8, 0x6])
def test_parse_header_rejects_bad_version(flags: int) -> None:
    with pytest.raises(FramingError, match="version"):
        parse_header(vu.vhost_user_header.pack(R.GET_FEATURES, flags, 0))


@pytest.mark.parametrize("size", [vu.VHOST_USER_MAX_PAYLOAD + 1, 1 << 20, 0xFFFFFFFF])
def test_parse_header_rejects_oversize_payloads(size: int) -> None:
    with pytest.raises(FramingError, match="exceeds"):
        parse_header(vu.vhost_user_header.pack(R.SET_MEM_TABLE, PLAIN, size))


@pytest.mark.parametrize("data", [b"", b"\x01" * 11, b"\x01" * 13])
def test_parse_header_rejects_wrong_length(data: bytes) -> None:
    with pytest.raises(FramingError):
        parse_header(data)


def test_encoders_round_trip() -> None:
    msg = encode_request(R.GET_VRING_BASE, vu.vhost_vring_state.pack(1, 0), need_reply=True)
    assert parse_header(msg[:12]) == (R.GET_VRING_BASE, NEED_REPLY, 8)
    rep = encode_reply(R.GET_FEATURES, vu.u64.pack(7))
    req, flags, size = parse_header(rep[:12])
    assert (req, size) == (R.GET_FEATURES, 8) and flags & vu.VHOST_USER_REPLY_MASK


# -- features and REPLY_ACK ---------------------------------------------------------


def test_get_requests_always_reply(h: Harness) -> None:
    assert h.u64(R.GET_FEATURES) == FEATURES
    assert h.u64(R.GET_PROTOCOL_FEATURES) == PROTOCOL
    assert h.u64(R.GET_QUEUE_NUM) == 2
    assert h.u64(R.GET_MAX_MEM_SLOTS) == vu.MAX_MEM_SLOTS
    assert h.u64(R.GET_STATUS) == 0


def test_get_with_need_reply_answers_the_body_not_an_ack(hn: Harness) -> None:
    assert hn.u64(R.GET_FEATURES, flags=NEED_REPLY) == FEATURES


def test_set_features_refuses_unoffered_bits(h: Harness) -> None:
    assert h.send(R.SET_FEATURES, vu.u64.pack(FEATURES | 1 << 33)) is None
    assert h.session.acked_features == 0
    assert h.send(R.SET_FEATURES, vu.u64.pack(1 << VIRTIO_F_VERSION_1)) is None
    assert h.session.acked_features == 1 << VIRTIO_F_VERSION_1


def test_set_protocol_features_refuses_unoffered_bits(h: Harness) -> None:
    h.send(R.SET_PROTOCOL_FEATURES, vu.u64.pack(PROTOCOL | 1 << PF.LOG_SHMFD))
    assert h.session.acked_protocol_features == 0
    h.send(R.SET_PROTOCOL_FEATURES, vu.u64.pack(1 << PF.MQ))
    assert h.session.acked_protocol_features == 1 << PF.MQ


def test_short_payloads_are_refused(hn: Harness) -> None:
    for req in (R.SET_FEATURES, R.SET_VRING_NUM, R.SET_VRING_ADDR, R.SET_VRING_CALL,
                R.SET_MEM_TABLE, R.ADD_MEM_REG, R.SET_STATUS):
        assert hn.ack(req, b"\0" * 4) != 0, req.name


def test_no_reply_without_reply_ack(h: Harness) -> None:
    h.negotiate(protocol=1 << PF.MQ)  # REPLY_ACK not negotiated
    assert h.send(R.SET_VRING_NUM, vu.vhost_vring_state.pack(0, 64), flags=NEED_REPLY) is None
    assert h.send(R.SET_VRING_NUM, vu.vhost_vring_state.pack(0, 3), flags=NEED_REPLY) is None


def test_reply_ack_only_when_need_reply_is_set(hn: Harness) -> None:
    assert hn.send(R.SET_VRING_NUM, vu.vhost_vring_state.pack(0, 64)) is None
    assert hn.ack(R.SET_VRING_NUM, vu.vhost_vring_state.pack(0, 64)) == 0
    assert hn.session.vrings[0].num == 64


@pytest.mark.parametrize("num", [0, 3, 100, 65536])
def test_reply_ack_reports_failure(hn: Harness, num: int) -> None:
    assert hn.ack(R.SET_VRING_NUM, vu.vhost_vring_state.pack(0, num)) != 0
    assert hn.session.vrings[0].num == 0


def test_vring_index_out_of_range(hn: Harness) -> None:
    assert hn.ack(R.SET_VRING_NUM, vu.vhost_vring_state.pack(2, 64)) != 0
    assert hn.ack(R.SET_VRING_BASE, vu.vhost_vring_state.pack(99, 0)) != 0
    assert hn.ack(R.SET_VRING_ADDR, vu.vhost_vring_addr.pack(7, 0, 0, 0, 0, 0)) != 0
    fd = efd()
    assert hn.ack(R.SET_VRING_CALL, vu.u64.pack(5), [fd]) != 0
    assert not is_open(fd)


def test_unknown_requests_are_refused_without_crashing(hn: Harness) -> None:
    fd = efd()
    assert hn.ack(999, b"junk", [fd]) != 0
    assert not is_open(fd)
    assert hn.send(999, b"junk") is None
    for req in (R.SEND_RARP, R.IOTLB_MSG, R.SET_LOG_BASE, R.POSTCOPY_ADVISE, R.SET_INFLIGHT_FD,
                R.VRING_KICK):
        assert hn.ack(req, bytes(8)) != 0, req.name
    assert hn.dev.calls == []


def test_set_config_is_refused(hn: Harness) -> None:
    assert hn.ack(R.SET_CONFIG, vu.vhost_user_config.pack(0, 4, 0) + b"evil") != 0


def test_status_round_trip(hn: Harness) -> None:
    assert hn.ack(R.SET_STATUS, vu.u64.pack(0x10F)) == 0
    assert hn.u64(R.GET_STATUS) == 0x0F


# -- rings ----------------------------------------------------------------------------


def test_ring_starts_only_on_kick_and_enabled_without_protocol_features(h: Harness) -> None:
    h.negotiate(features=1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX)
    h.send(R.SET_VRING_NUM, vu.vhost_vring_state.pack(1, 128))
    h.send(R.SET_VRING_ADDR, vu.vhost_vring_addr.pack(1, 0, 0x1000, 0x3000, 0x2000, 0))
    h.send(R.SET_VRING_BASE, vu.vhost_vring_state.pack(1, 77))
    assert h.dev.calls == []
    assert h.send(R.SET_VRING_KICK, vu.u64.pack(1), [efd()]) is None
    assert h.dev.calls == [("ring_start", 1, True, 77, 128, False, True, False)]
    vr = h.session.vrings[1]
    assert vr.started and vr.enabled
    assert (vr.desc_addr, vr.avail_addr, vr.used_addr) == (0x1000, 0x2000, 0x3000)


def test_with_protocol_features_rings_start_disabled(hn: Harness) -> None:
    hn.setup_ring(0)
    assert hn.ack(R.SET_VRING_KICK, vu.u64.pack(0), [efd()]) == 0
    assert hn.dev.calls == [("ring_start", 0, False, 0, 256, False, True, True)]
    assert hn.ack(R.SET_VRING_ENABLE, vu.vhost_vring_state.pack(0, 1)) == 0
    assert hn.dev.calls[-1] == ("ring_enable", 0, True)
    assert hn.ack(R.SET_VRING_ENABLE, vu.vhost_vring_state.pack(0, 0)) == 0
    assert hn.dev.calls[-1] == ("ring_enable", 0, False)
    assert hn.ack(R.SET_VRING_ENABLE, vu.vhost_vring_state.pack(0, 2)) != 0


def test_enable_before_kick_is_remembered(hn: Harness) -> None:
    hn.setup_ring(1)
    assert hn.ack(R.SET_VRING_ENABLE, vu.vhost_vring_state.pack(1, 1)) == 0
    assert hn.dev.calls == []  # not started: nothing to tell the device yet
    hn.ack(R.SET_VRING_KICK, vu.u64.pack(1), [efd()])
    assert hn.dev.calls[-1][:3] == ("ring_start", 1, True)


def test_set_vring_enable_needs_protocol_features(h: Harness) -> None:
    h.negotiate(features=1 << VIRTIO_F_VERSION_1)
    h.send(R.SET_VRING_NUM, vu.vhost_vring_state.pack(0, 64))
    h.send(R.SET_VRING_ENABLE, vu.vhost_vring_state.pack(0, 1))
    assert not h.session.vrings[0].enabled
    assert h.dev.calls == []


def test_kick_before_num_is_refused_and_the_fd_closed(hn: Harness) -> None:
    fd = efd()
    assert hn.ack(R.SET_VRING_KICK, vu.u64.pack(0), [fd]) != 0
    assert not is_open(fd)
    assert hn.dev.calls == []


def test_kick_needs_exactly_one_fd(hn: Harness) -> None:
    hn.setup_ring(0)
    assert hn.ack(R.SET_VRING_KICK, vu.u64.pack(0)) != 0
    a, b = efd(), efd()
    assert hn.ack(R.SET_VRING_KICK, vu.u64.pack(0), [a, b]) != 0
    assert not is_open(a) and not is_open(b)
    assert hn.ack(R.SET_VRING_KICK, vu.u64.pack(NOFD)) != 0  # polling mode: unsupported
    assert hn.dev.calls == []


def test_nofd_with_an_fd_is_refused(hn: Harness) -> None:
    hn.setup_ring(0)
    for req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        fd = efd()
        assert hn.ack(req, vu.u64.pack(NOFD), [fd]) != 0, req.name
        assert not is_open(fd)


def test_index_bits_select_the_ring(hn: Harness) -> None:
    hn.setup_ring(1)
    assert hn.ack(R.SET_VRING_KICK, vu.u64.pack(1 | 0xABC0_0000_0000), [efd()]) == 0
    assert hn.dev.calls[-1][:2] == ("ring_start", 1)
    assert not hn.session.vrings[0].started


def test_call_fd_before_start_goes_with_the_start(hn: Harness) -> None:
    hn.setup_ring(0)
    call = efd()
    assert hn.ack(R.SET_VRING_CALL, vu.u64.pack(0), [call]) == 0
    assert hn.dev.calls == []
    hn.ack(R.SET_VRING_KICK, vu.u64.pack(0), [efd()])
    assert hn.dev.calls[-1][5] is True
    given = hn.dev.owned[-1]
    assert given != call and is_open(call)  # the device gets a dup, the session keeps its own


def test_call_fd_after_start_is_passed_on(hn: Harness) -> None:
    hn.setup_ring(0)
    first = efd()
    hn.ack(R.SET_VRING_CALL, vu.u64.pack(0), [first])
    hn.ack(R.SET_VRING_KICK, vu.u64.pack(0), [efd()])
    second = efd()
    before = open_fd_count()
    assert hn.ack(R.SET_VRING_CALL, vu.u64.pack(0), [second]) == 0
    assert hn.dev.calls[-1] == ("ring_call", 0, True)
    # The device now owns a dup of ``second``; ``first`` was closed to make room.
    # (Fd numbers are reused, so count rather than probe ``first``.)
    assert open_fd_count() == before
    # The device's fd signals the same eventfd the frontend gave us.
    os.eventfd_write(hn.dev.owned[-1], 1)
    assert os.eventfd_read(second) == 1
    assert hn.ack(R.SET_VRING_CALL, vu.u64.pack(NOFD)) == 0  # mask: no call fd
    assert hn.dev.calls[-1] == ("ring_call", 0, False)
    assert not is_open(second)


def test_call_and_err_on_a_stopped_ring_only_update_state(hn: Harness) -> None:
    err = efd()
    assert hn.ack(R.SET_VRING_ERR, vu.u64.pack(1), [err]) == 0
    assert hn.ack(R.SET_VRING_CALL, vu.u64.pack(1), [efd()]) == 0
    assert hn.dev.calls == []
    assert hn.session.vrings[1].err_fd == err


def test_get_vring_base_stops_the_ring(hn: Harness) -> None:
    hn.setup_ring(1, base=5)
    hn.ack(R.SET_VRING_KICK, vu.u64.pack(1), [efd()])
    hn.dev.stop_value = 4242
    body = hn.reply(R.GET_VRING_BASE, vu.vhost_vring_state.pack(1, 0))
    assert vu.vhost_vring_state.unpack(body) == (1, 4242)
    assert hn.dev.calls[-1] == ("ring_stop", 1)
    assert not hn.session.vrings[1].started
    # Stopped already: answer the same index without asking the device again.
    body = hn.reply(R.GET_VRING_BASE, vu.vhost_vring_state.pack(1, 0))
    assert vu.vhost_vring_state.unpack(body) == (1, 4242)
    assert [c[0] for c in hn.dev.calls].count("ring_stop") == 1


def test_get_vring_base_of_a_ring_never_started(hn: Harness) -> None:
    hn.setup_ring(0, base=9)
    body = hn.reply(R.GET_VRING_BASE, vu.vhost_vring_state.pack(0, 0))
    assert vu.vhost_vring_state.unpack(body) == (0, 9)
    assert hn.dev.calls == []


def test_get_vring_base_bad_index_still_replies(hn: Harness) -> None:
    """GET_* always reply: a frontend blocked on a reply that never comes hangs."""
    out = hn.send(R.GET_VRING_BASE, vu.vhost_vring_state.pack(7, 0))
    assert out is not None
    request, flags, size = parse_header(out[:12])
    assert request == R.GET_VRING_BASE and flags & vu.VHOST_USER_REPLY_MASK
    assert size != vu.vhost_vring_state.size  # not a valid state: the frontend sees an error


def test_kick_on_a_started_ring_restarts_it(hn: Harness) -> None:
    hn.setup_ring(0)
    hn.ack(R.SET_VRING_KICK, vu.u64.pack(0), [efd()])
    hn.dev.stop_value = 17
    hn.ack(R.SET_VRING_KICK, vu.u64.pack(0), [efd()])
    assert hn.dev.names()[-2:] == ["ring_stop", "ring_start"]
    assert hn.dev.calls[-1][3] == 17  # restarted from where it stopped


def test_features_reach_ring_start(h: Harness) -> None:
    h.negotiate(features=1 << VIRTIO_F_VERSION_1)
    h.send(R.SET_VRING_NUM, vu.vhost_vring_state.pack(0, 64))
    h.send(R.SET_VRING_KICK, vu.u64.pack(0), [efd()])
    assert h.dev.calls[-1][6:] == (False, False)  # no EVENT_IDX, no INDIRECT


# -- memory -------------------------------------------------------------------------


def mem_table(n: int, size: int = 0x10000) -> bytes:
    regions = b"".join(vu.vhost_user_memory_region.pack(i * size, size, 0x7000_0000 + i * size,
                                                        0) for i in range(n))
    return vu.vhost_user_memory.pack(n, 0) + regions


def test_set_mem_table_hands_regions_and_fds_to_the_device(hn: Harness) -> None:
    fds = [efd(), efd()]
    assert hn.ack(R.SET_MEM_TABLE, mem_table(2), fds) == 0
    assert hn.dev.calls == [("mem_set", [MemRegion(0, 0x10000, 0x7000_0000, 0),
                                         MemRegion(0x10000, 0x10000, 0x7001_0000, 0)])]
    assert hn.dev.owned == fds and all(is_open(fd) for fd in fds)


@pytest.mark.parametrize(("nregions", "nfds"), [(2, 1), (1, 2), (0, 1), (3, 0)])
def test_set_mem_table_fd_count_mismatch(hn: Harness, nregions: int, nfds: int) -> None:
    fds = [efd() for _ in range(nfds)]
    assert hn.ack(R.SET_MEM_TABLE, mem_table(nregions), fds) != 0
    assert hn.dev.calls == []
    assert not any(is_open(fd) for fd in fds)


def test_set_mem_table_limits(hn: Harness) -> None:
    fds = [efd() for _ in range(9)]
    assert hn.ack(R.SET_MEM_TABLE, mem_table(9), fds) != 0
    assert not any(is_open(fd) for fd in fds)
    fds = [efd(), efd()]
    assert hn.ack(R.SET_MEM_TABLE, mem_table(2)[:-1], fds) != 0  # truncated region
    assert not any(is_open(fd) for fd in fds)
    assert hn.ack(R.SET_MEM_TABLE, vu.vhost_user_memory.pack(0xFFFFFFFF, 0)) != 0
    assert hn.dev.calls == []


def single(gpa: int, size: int = 0x1000) -> bytes:
    return vu.vhost_user_single_region.pack(0, gpa, size, 0x7000_0000 + gpa, 0)


def test_add_and_remove_memory_regions(hn: Harness) -> None:
    fd = efd()
    assert hn.ack(R.ADD_MEM_REG, single(0x4000), [fd]) == 0
    assert hn.dev.calls[-1] == ("mem_add", MemRegion(0x4000, 0x1000, 0x7000_4000, 0))
    assert hn.dev.owned == [fd]
    # QEMU may send the region's fd with REM_MEM_REG too: it must be closed.
    extra = efd()
    assert hn.ack(R.REM_MEM_REG, single(0x4000), [extra]) == 0
    assert hn.dev.calls[-1] == ("mem_remove", MemRegion(0x4000, 0x1000, 0x7000_4000, 0))
    assert not is_open(extra)


def test_add_mem_reg_needs_exactly_one_fd(hn: Harness) -> None:
    assert hn.ack(R.ADD_MEM_REG, single(0)) != 0
    a, b = efd(), efd()
    assert hn.ack(R.ADD_MEM_REG, single(0), [a, b]) != 0
    assert not is_open(a) and not is_open(b)
    assert hn.dev.calls == []


# -- config, backend channel, reset -------------------------------------------------


def test_get_config_returns_the_config_bytes(hn: Harness) -> None:
    size = virtio_fs_config.size
    body = hn.reply(R.GET_CONFIG, vu.vhost_user_config.pack(0, size, 0) + bytes(size))
    assert vu.vhost_user_config.unpack_from(body) == (0, size, 0)
    assert body[12:] == CONFIG_SPACE
    body = hn.reply(R.GET_CONFIG, vu.vhost_user_config.pack(36, 4, 0) + bytes(4))
    assert body[12:] == (2).to_bytes(4, "little")  # num_request_queues alone


@pytest.mark.parametrize(("offset", "size"), [
    (0, vu.VHOST_USER_MAX_CONFIG_SIZE + 1),
    (vu.VHOST_USER_MAX_CONFIG_SIZE, 1),
    (0xFFFFFFFF, 4),
    (4, 0xFFFFFFFF),
])
def test_get_config_refuses_out_of_range(hn: Harness, offset: int, size: int) -> None:
    # The spec: "vhost-user back-end uses zero length of payload to indicate an error";
    # like rust-vmm, the reply is the config header with size 0 and no config bytes.
    body = hn.reply(R.GET_CONFIG, vu.vhost_user_config.pack(offset, size, 1))
    assert body == vu.vhost_user_config.pack(offset, 0, 1)


def test_get_config_short_payload_still_replies(hn: Harness) -> None:
    assert hn.reply(R.GET_CONFIG, b"\0" * 4) == b""


def test_backend_channel_needs_backend_req(h: Harness) -> None:
    h.negotiate(protocol=1 << PF.REPLY_ACK)
    fd = efd()
    assert h.ack(R.SET_BACKEND_REQ_FD, b"", [fd]) != 0
    assert not is_open(fd)
    h.send(R.SET_PROTOCOL_FEATURES, vu.u64.pack(1 << PF.REPLY_ACK | 1 << PF.BACKEND_REQ))
    fd = efd()
    assert h.ack(R.SET_BACKEND_REQ_FD, b"", [fd]) == 0
    assert h.dev.calls == [("backend_channel",)] and h.dev.owned == [fd]


def test_reset_device(hn: Harness) -> None:
    hn.setup_ring(0)
    call, err = efd(), efd()
    hn.ack(R.SET_VRING_CALL, vu.u64.pack(0), [call])
    hn.ack(R.SET_VRING_ERR, vu.u64.pack(0), [err])
    hn.ack(R.SET_VRING_KICK, vu.u64.pack(0), [efd()])
    hn.ack(R.SET_STATUS, vu.u64.pack(0xF))
    hn.ack(R.SET_BACKEND_REQ_FD, b"", [efd()])
    assert hn.ack(R.RESET_DEVICE) == 0
    # RESET_DEVICE stops the rings but keeps the connection's backend channel.
    assert hn.dev.calls[-1] == ("reset",)
    assert ("disconnect",) not in hn.dev.calls
    assert not is_open(call) and not is_open(err)
    assert hn.session.acked_features == 0 and hn.session.status == 0
    assert all(vr == VringState() for vr in hn.session.vrings)


def test_close_releases_fds(h: Harness) -> None:
    h.negotiate()
    call = efd()
    h.send(R.SET_VRING_CALL, vu.u64.pack(1), [call])
    h.session.close()
    assert not is_open(call)
    assert h.dev.calls[-2:] == [("reset",), ("disconnect",)]
