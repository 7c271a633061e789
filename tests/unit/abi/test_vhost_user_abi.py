"""shardfs.abi.vhost_user against QEMU ``docs/interop/vhost-user.rst``.

QEMU ships no C header for these, so the sizes are the spec's, written out.
"""

from __future__ import annotations

import pytest

from shardfs.abi import vhost_user as vu
from shardfs.abi.vhost_user import BackendReq, FrontendReq, ProtocolFeature
from tests.unit.abi.cc import struct_fields

SPEC_SIZES = [
    (vu.vhost_user_header, 12),          # u32 request, flags, size
    (vu.vhost_vring_state, 8),           # "A vring state description"
    (vu.vhost_vring_addr, 40),           # "A vring address description"
    (vu.vhost_user_memory_region, 32),   # "Memory region description"
    (vu.vhost_user_memory, 8),           # num regions + padding, before the regions
    (vu.vhost_user_single_region, 40),   # "Single memory region description"
    (vu.vhost_user_config, 12),          # "Device config space" header
    (vu.vhost_user_shmem_msg, 40),       # "VIRTIO Shared Memory mapping settings"
    (vu.u64, 8),
]


@pytest.mark.parametrize(("st", "size"), SPEC_SIZES, ids=lambda v: getattr(v, "format", v))
def test_sizes_match_spec(st: object, size: int) -> None:
    assert st.size == size  # type: ignore[attr-defined]


def test_vring_addr_field_order() -> None:
    # index, flags, descriptor, used, available, log: all u64 after two u32.
    fields = struct_fields(vu.vhost_vring_addr)
    assert sorted(fields.items()) == [(0, (4, False)), (4, (4, False)), (8, (8, False)),
                                      (16, (8, False)), (24, (8, False)), (32, (8, False))]


def test_single_region_is_padding_then_a_region() -> None:
    packed = vu.vhost_user_single_region.pack(0, 1, 2, 3, 4)
    assert packed[8:] == vu.vhost_user_memory_region.pack(1, 2, 3, 4)


def test_shmem_msg_layout() -> None:
    # u8 shmid; u8 padding[7]; u64 fd_offset, shm_offset, len, flags.
    assert sorted(struct_fields(vu.vhost_user_shmem_msg)) == [0, 8, 16, 24, 32]


def test_header_flag_bits() -> None:
    assert vu.VHOST_USER_VERSION == 0x1
    assert vu.VHOST_USER_REPLY_MASK == 1 << 2
    assert vu.VHOST_USER_NEED_REPLY_MASK == 1 << 3
    assert vu.VHOST_USER_VRING_NOFD_MASK == 1 << 8
    assert vu.VHOST_USER_VRING_IDX_MASK == 0xFF
    assert vu.VHOST_USER_MAX_FDS == 8


@pytest.mark.parametrize(("req", "value"), [
    (FrontendReq.GET_FEATURES, 1), (FrontendReq.SET_MEM_TABLE, 5),
    (FrontendReq.SET_VRING_KICK, 12), (FrontendReq.SET_VRING_CALL, 13),
    (FrontendReq.GET_PROTOCOL_FEATURES, 15), (FrontendReq.SET_VRING_ENABLE, 18),
    (FrontendReq.SET_BACKEND_REQ_FD, 21), (FrontendReq.GET_CONFIG, 24),
    (FrontendReq.RESET_DEVICE, 34), (FrontendReq.GET_MAX_MEM_SLOTS, 36),
    (FrontendReq.ADD_MEM_REG, 37), (FrontendReq.REM_MEM_REG, 38),
    (FrontendReq.SET_STATUS, 39), (FrontendReq.GET_STATUS, 40),
    (FrontendReq.SET_DEVICE_STATE_FD, 42), (FrontendReq.CHECK_DEVICE_STATE, 43),
    (BackendReq.SHMEM_MAP, 9), (BackendReq.SHMEM_UNMAP, 10),
])
def test_request_codes_match_spec(req: int, value: int) -> None:
    assert req == value


def test_protocol_feature_bits_match_spec() -> None:
    assert ProtocolFeature.MQ == 0
    assert ProtocolFeature.REPLY_ACK == 3
    assert ProtocolFeature.BACKEND_REQ == 5
    assert ProtocolFeature.CONFIG == 9
    assert ProtocolFeature.BACKEND_SEND_FD == 10
    assert ProtocolFeature.RESET_DEVICE == 13
    assert ProtocolFeature.CONFIGURE_MEM_SLOTS == 15
    assert ProtocolFeature.STATUS == 16
    assert ProtocolFeature.DEVICE_STATE == 19
    assert ProtocolFeature.SHMEM == 21  # DESIGN §3: alioth/rust-vmm numbering, configurable


def test_request_codes_are_dense_and_unique() -> None:
    values = [r.value for r in FrontendReq]
    assert values == list(range(1, len(values) + 1))
    assert len({r.value for r in BackendReq}) == len(BackendReq)
