"""The DAX wire formats: backend-channel SHMEM requests and replies, GET_SHMEM_CONFIG."""

from __future__ import annotations

import pytest

from shardfs.abi import vhost_user as vu
from shardfs.abi.vhost_user import BackendReq
from shardfs.abi.vhost_user import FrontendReq as R
from shardfs.abi.vhost_user import ProtocolFeature as PF
from shardfs.codec.backend_channel import (
    ChannelProtocolError,
    decode_request,
    decode_shmem_config,
    encode_reply,
    encode_shmem_config,
    encode_shmem_map,
    encode_shmem_unmap,
    parse_reply_header,
    parse_status,
)
from shardfs.codec.vhost_user import Device, SessionConfig, VhostUserSession

HDR = vu.vhost_user_header.size


def split(msg: bytes) -> tuple[bytes, bytes]:
    return msg[:HDR], msg[HDR:]


def test_shmem_payload_layout_matches_the_spec() -> None:
    # u8 shmid; u8 padding[7]; u64 fd_offset, shm_offset, len, flags
    assert vu.vhost_user_shmem_msg.size == 40
    # u32 nregions; u32 padding; u64 memory_sizes[256]
    assert vu.vhost_user_shmem_config.size == 8 + 8 * 256


def test_map_request_round_trip() -> None:
    msg = encode_shmem_map(0, 0x20_0000, 0x40_0000, 0x20_0000, writable=True)
    request, flags, size = vu.vhost_user_header.unpack_from(msg)
    assert request == BackendReq.SHMEM_MAP == 9
    assert flags & vu.VHOST_USER_NEED_REPLY_MASK and size == 40
    req = decode_request(*split(msg))
    assert (req.shmid, req.fd_offset, req.shm_offset, req.length) == (0, 0x20_0000, 0x40_0000,
                                                                      0x20_0000)
    assert req.writable and req.need_reply
    assert not decode_request(*split(encode_shmem_map(0, 0, 0, 4096, False))).writable


def test_unmap_request_round_trip() -> None:
    req = decode_request(*split(encode_shmem_unmap(0, 0x1000, 0x2000)))
    assert req.request == BackendReq.SHMEM_UNMAP == 10
    assert (req.shm_offset, req.length, req.flags) == (0x1000, 0x2000, 0)


def test_values_beyond_u64_are_refused() -> None:
    with pytest.raises(ValueError):
        encode_shmem_unmap(0, 1 << 64, 4096)


def test_reply_parsing() -> None:
    h, p = split(encode_reply(BackendReq.SHMEM_MAP, 0))
    assert parse_reply_header(h) == (BackendReq.SHMEM_MAP, 8)
    assert parse_status(p) == 0
    assert parse_status(split(encode_reply(BackendReq.SHMEM_UNMAP, 1))[1]) == 1


@pytest.mark.parametrize("header", [
    vu.vhost_user_header.pack(9, vu.VHOST_USER_VERSION, 8),                     # not a reply
    vu.vhost_user_header.pack(9, vu.VHOST_USER_REPLY_MASK, 8),                  # no version
    vu.vhost_user_header.pack(9, vu.VHOST_USER_VERSION | vu.VHOST_USER_REPLY_MASK, 4096),
    b"\0" * 5,
])
def test_bad_replies(header: bytes) -> None:
    with pytest.raises(ChannelProtocolError):
        parse_reply_header(header)


def test_unexpected_backend_requests_are_refused_by_the_frontend_side() -> None:
    msg = vu.vhost_user_header.pack(BackendReq.CONFIG_CHANGE_MSG, vu.VHOST_USER_VERSION, 0)
    with pytest.raises(ChannelProtocolError):
        decode_request(msg, b"")
    good = encode_shmem_unmap(0, 0, 4096)
    with pytest.raises(ChannelProtocolError):
        decode_request(good[:HDR], good[HDR:-1])


def test_shmem_config() -> None:
    body = encode_shmem_config([64 << 20])
    nregions, _pad, *sizes = vu.vhost_user_shmem_config.unpack(body)
    assert nregions == 1 and sizes[0] == 64 << 20 and not any(sizes[1:])
    assert decode_shmem_config(body)[0] == 64 << 20
    with pytest.raises(ChannelProtocolError):
        decode_shmem_config(body[:72])  # the 8-entry layout of early drafts


class _NullDevice(Device):
    def reset(self) -> None:
        pass

    def disconnect(self) -> None:
        pass


def _session(shmem: tuple[int, ...], bit: int = PF.SHMEM) -> VhostUserSession:
    cfg = SessionConfig(num_queues=2, tag=None, config_space=b"", virtio_features=0,
                        protocol_features=1 << PF.REPLY_ACK | 1 << bit, shmem_sizes=shmem,
                        shmem_bit=bit)
    return VhostUserSession(_NullDevice(), cfg)


def _ack_protocol(s: VhostUserSession, features: int) -> None:
    s.handle(R.SET_PROTOCOL_FEATURES, vu.VHOST_USER_VERSION, vu.u64.pack(features), [])


@pytest.mark.parametrize("bit", [21, 22])
def test_get_shmem_config_answers_the_window(bit: int) -> None:
    s = _session((8 << 20,), bit)
    _ack_protocol(s, 1 << bit)
    reply = s.handle(R.GET_SHMEM_CONFIG, vu.VHOST_USER_VERSION, b"", [])
    assert reply is not None
    request, flags, size = vu.vhost_user_header.unpack_from(reply)
    assert request == R.GET_SHMEM_CONFIG == 44 and flags & vu.VHOST_USER_REPLY_MASK
    assert decode_shmem_config(reply[HDR:HDR + size])[0] == 8 << 20


def test_get_shmem_config_without_the_feature_is_refused_but_answered() -> None:
    s = _session((8 << 20,))
    _ack_protocol(s, 0)  # SHMEM not negotiated
    reply = s.handle(R.GET_SHMEM_CONFIG, vu.VHOST_USER_VERSION, b"", [])
    assert reply is not None and vu.vhost_user_header.unpack_from(reply)[2] == 0
    off = _session(())
    _ack_protocol(off, 1 << PF.SHMEM)
    reply = off.handle(R.GET_SHMEM_CONFIG, vu.VHOST_USER_VERSION, b"", [])
    assert reply is not None and vu.vhost_user_header.unpack_from(reply)[2] == 0
