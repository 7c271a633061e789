"""Virtio split-ring layouts and feature bits (virtio 1.2, section 2.7).

Names follow the spec and ``linux/virtio_ring.h``.  Ring indices are 16-bit
and wrap; every index read from guest memory is taken modulo the ring size
before it is used as an offset.
"""

from __future__ import annotations

import struct

# Feature bits (virtio 1.2 §6, and the vhost-user extension bit 30).
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VHOST_F_LOG_ALL = 26
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32

# struct virtq_desc flags (§2.7.5).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

# struct virtq_avail.flags / virtq_used.flags.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

#: struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
virtq_desc = struct.Struct("<QIHH")
#: struct virtq_used_elem { le32 id; le32 len; }
virtq_used_elem = struct.Struct("<II")
le16 = struct.Struct("<H")

#: The largest queue a split ring can have (§2.7: Queue Size max 32768).
VIRTQ_MAX_SIZE = 32768

#: Offsets inside the avail ring: flags, idx, ring[], used_event.
VIRTQ_AVAIL_FLAGS = 0
VIRTQ_AVAIL_IDX = 2
VIRTQ_AVAIL_RING = 4
#: Offsets inside the used ring: flags, idx, ring[], avail_event.
VIRTQ_USED_FLAGS = 0
VIRTQ_USED_IDX = 2
VIRTQ_USED_RING = 4


def avail_ring_size(num: int) -> int:
    """Bytes of the avail ring including used_event."""
    return VIRTQ_AVAIL_RING + 2 * num + 2


def used_ring_size(num: int) -> int:
    """Bytes of the used ring including avail_event."""
    return VIRTQ_USED_RING + virtq_used_elem.size * num + 2


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The used-event rule (§2.7.10): notify iff event_idx is in [old, new)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)

# virtio-fs device (virtio 1.2 §5.11).
VIRTIO_ID_FS = 26
VIRTIO_FS_F_NOTIFICATION = 0
#: struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; le32 notify_buf_size; }
virtio_fs_config = struct.Struct("<36sII")
VIRTIO_FS_TAG_MAX = 36
#: Queue 0 is hiprio; request queues follow (no notification queue offered).
VIRTIO_FS_HIPRIO_QUEUE = 0
VIRTIO_FS_FIRST_REQUEST_QUEUE = 1
#: The shared memory region id of the DAX window (linux/virtio_fs.h
#: VIRTIO_FS_SHMCAP_ID_CACHE): the shmid of SHMEM_MAP/UNMAP and GET_SHMEM_CONFIG.
VIRTIO_FS_SHMCAP_ID_CACHE = 0
