"""shardfs.abi.virtio against ``linux/virtio_ring.h`` and friends, as gcc sees them."""

from __future__ import annotations

import itertools

import pytest

from shardfs.abi import virtio as V
from tests.unit.abi.cc import print_value, require_header, run_c, struct_fields

HEADERS = ["linux/virtio_ring.h", "linux/virtio_config.h", "linux/virtio_ids.h",
           "linux/virtio_fs.h", "linux/vhost.h"]

#: Our name -> the kernel's name for the same constant.
SAME_CONSTANTS = {
    "VIRTQ_DESC_F_NEXT": "VRING_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE": "VRING_DESC_F_WRITE",
    "VIRTQ_DESC_F_INDIRECT": "VRING_DESC_F_INDIRECT",
    "VIRTQ_AVAIL_F_NO_INTERRUPT": "VRING_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_USED_F_NO_NOTIFY": "VRING_USED_F_NO_NOTIFY",
    "VIRTIO_RING_F_INDIRECT_DESC": "VIRTIO_RING_F_INDIRECT_DESC",
    "VIRTIO_RING_F_EVENT_IDX": "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_F_NOTIFY_ON_EMPTY": "VIRTIO_F_NOTIFY_ON_EMPTY",
    "VIRTIO_F_VERSION_1": "VIRTIO_F_VERSION_1",
    "VHOST_F_LOG_ALL": "VHOST_F_LOG_ALL",
    "VIRTIO_ID_FS": "VIRTIO_ID_FS",
}

#: Indices around the 16-bit wrap and the middle, for the event rule.
EVENT_VALUES = [0, 1, 2, 3, 0x7FFF, 0x8000, 0x8001, 0xFFFD, 0xFFFE, 0xFFFF]
RING_SIZES = [1, 2, 4, 16, 256, 1024, 32768]


@pytest.fixture(scope="module")
def kernel() -> dict[str, int]:
    for h in HEADERS:
        require_header(h)
    body = [
        print_value("sizeof.vring_desc", "sizeof(struct vring_desc)"),
        print_value("sizeof.vring_used_elem", "sizeof(struct vring_used_elem)"),
        print_value("offsetof.vring_desc.addr", "offsetof(struct vring_desc, addr)"),
        print_value("offsetof.vring_desc.len", "offsetof(struct vring_desc, len)"),
        print_value("offsetof.vring_desc.flags", "offsetof(struct vring_desc, flags)"),
        print_value("offsetof.vring_desc.next", "offsetof(struct vring_desc, next)"),
        print_value("offsetof.vring_used_elem.id", "offsetof(struct vring_used_elem, id)"),
        print_value("offsetof.vring_used_elem.len", "offsetof(struct vring_used_elem, len)"),
        print_value("offsetof.vring_avail.flags", "offsetof(struct vring_avail, flags)"),
        print_value("offsetof.vring_avail.idx", "offsetof(struct vring_avail, idx)"),
        print_value("offsetof.vring_avail.ring", "offsetof(struct vring_avail, ring)"),
        print_value("offsetof.vring_used.flags", "offsetof(struct vring_used, flags)"),
        print_value("offsetof.vring_used.idx", "offsetof(struct vring_used, idx)"),
        print_value("offsetof.vring_used.ring", "offsetof(struct vring_used, ring)"),
        print_value("offsetof.virtio_fs_config.num_request_queues",
                    "offsetof(struct virtio_fs_config, num_request_queues)"),
        print_value("sizeof.virtio_fs_config.tag", "sizeof(((struct virtio_fs_config *)0)->tag)"),
        print_value("sizeof.vhost_vring_state", "sizeof(struct vhost_vring_state)"),
        print_value("sizeof.vhost_vring_addr", "sizeof(struct vhost_vring_addr)"),
        print_value("sizeof.vhost_memory_region", "sizeof(struct vhost_memory_region)"),
        print_value("sizeof.vhost_memory", "sizeof(struct vhost_memory)"),
    ]
    for ours, theirs in SAME_CONSTANTS.items():
        body.append(print_value(f"const.{ours}", theirs))
    for num in RING_SIZES:
        body.append(print_value(f"vring_size.{num}", f"vring_size({num}, 2)"))
    for e, n, o in itertools.product(EVENT_VALUES, repeat=3):
        body.append(print_value(f"need_event.{e}.{n}.{o}", f"vring_need_event({e}, {n}, {o})"))
    return run_c(HEADERS, "".join(body))


def test_descriptor_and_used_element_layouts(kernel: dict[str, int]) -> None:
    assert V.virtq_desc.size == kernel["sizeof.vring_desc"] == 16
    assert V.virtq_used_elem.size == kernel["sizeof.vring_used_elem"] == 8
    desc = struct_fields(V.virtq_desc)
    assert sorted(desc) == [kernel[f"offsetof.vring_desc.{f}"]
                            for f in ("addr", "len", "flags", "next")]
    elem = struct_fields(V.virtq_used_elem)
    assert sorted(elem) == [kernel["offsetof.vring_used_elem.id"],
                            kernel["offsetof.vring_used_elem.len"]]


def test_ring_offsets(kernel: dict[str, int]) -> None:
    assert V.VIRTQ_AVAIL_FLAGS == kernel["offsetof.vring_avail.flags"]
    assert V.VIRTQ_AVAIL_IDX == kernel["offsetof.vring_avail.idx"]
    assert V.VIRTQ_AVAIL_RING == kernel["offsetof.vring_avail.ring"]
    assert V.VIRTQ_USED_FLAGS == kernel["offsetof.vring_used.flags"]
    assert V.VIRTQ_USED_IDX == kernel["offsetof.vring_used.idx"]
    assert V.VIRTQ_USED_RING == kernel["offsetof.vring_used.ring"]


@pytest.mark.parametrize("num", RING_SIZES)
def test_ring_sizes_add_up_to_vring_size(num: int, kernel: dict[str, int]) -> None:
    # With 2-byte alignment nothing is padded, so the three areas sum exactly.
    total = V.virtq_desc.size * num + V.avail_ring_size(num) + V.used_ring_size(num)
    assert total == kernel[f"vring_size.{num}"]


def test_constants_match_kernel(kernel: dict[str, int]) -> None:
    for ours in SAME_CONSTANTS:
        assert getattr(V, ours) == kernel[f"const.{ours}"], ours


def test_vring_need_event_matches_kernel(kernel: dict[str, int]) -> None:
    for e, n, o in itertools.product(EVENT_VALUES, repeat=3):
        assert V.vring_need_event(e, n, o) == bool(kernel[f"need_event.{e}.{n}.{o}"]), (e, n, o)


def test_virtio_fs_config(kernel: dict[str, int]) -> None:
    # The kernel header stops at num_request_queues; virtio 1.2 §5.11.4 adds
    # notify_buf_size after it, which shardfs includes (and leaves 0).
    assert V.VIRTIO_FS_TAG_MAX == kernel["sizeof.virtio_fs_config.tag"] == 36
    fields = struct_fields(V.virtio_fs_config)
    assert kernel["offsetof.virtio_fs_config.num_request_queues"] in fields
    assert V.virtio_fs_config.size == 36 + 4 + 4


def test_vhost_kernel_layouts_agree_with_vhost_user(kernel: dict[str, int]) -> None:
    """vhost-user reuses the kernel vhost structs for these three payloads."""
    from shardfs.abi import vhost_user as vu

    assert vu.vhost_vring_state.size == kernel["sizeof.vhost_vring_state"]
    assert vu.vhost_vring_addr.size == kernel["sizeof.vhost_vring_addr"]
    assert vu.vhost_user_memory_region.size == kernel["sizeof.vhost_memory_region"]
    assert vu.vhost_user_memory.size == kernel["sizeof.vhost_memory"]
