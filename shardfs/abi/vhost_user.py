"""vhost-user message layouts, request codes and feature bits.

Names follow QEMU ``docs/interop/vhost-user.rst``: ``VHOST_USER_SET_VRING_KICK``
is :attr:`FrontendReq.SET_VRING_KICK`, the backend-channel requests are
:class:`BackendReq`.  All integers are little-endian (x86 hosts only).
"""

from __future__ import annotations

import enum
import struct


class FrontendReq(enum.IntEnum):
    """Requests the frontend (QEMU) sends on the main socket."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44


class BackendReq(enum.IntEnum):
    """Requests the backend sends on the channel from SET_BACKEND_REQ_FD."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of VHOST_USER_PROTOCOL_F_*."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    #: SHMEM as alioth and rust-vmm 0.16 number it; QEMU master uses 22
    #: (DESIGN §3), so the daemon takes the bit from configuration.
    SHMEM = 21


# Header flags (spec: "Message Specification").
VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3

#: u32 request, u32 flags, u32 size
vhost_user_header = struct.Struct("<III")
u64 = struct.Struct("<Q")
#: struct vhost_vring_state { u32 index; u32 num; }
vhost_vring_state = struct.Struct("<II")
#: struct vhost_vring_addr { u32 index; u32 flags; u64 desc, used, avail, log; }
vhost_vring_addr = struct.Struct("<IIQQQQ")
#: struct VhostUserMemoryRegion { u64 guest_phys_addr, memory_size, userspace_addr, mmap_offset; }
vhost_user_memory_region = struct.Struct("<QQQQ")
#: struct VhostUserMemory { u32 nregions; u32 padding; regions[...]; }
vhost_user_memory = struct.Struct("<II")
#: ADD_MEM_REG/REM_MEM_REG: u64 padding then one region.
vhost_user_single_region = struct.Struct("<QQQQQ")
#: struct VhostUserConfig { u32 offset; u32 size; u32 flags; u8 payload[size]; }
vhost_user_config = struct.Struct("<III")
#: SHMEM_MAP/UNMAP payload: u8 shmid; u8 pad[7]; u64 fd_offset, shm_offset, len, flags.
vhost_user_shmem_msg = struct.Struct("<B7xQQQQ")
#: VhostUserMMap.flags bit 0 (VHOST_USER_FLAG_MAP_RW): map read-write, else read-only.
VHOST_USER_FLAG_MAP_RW = 0x1 << 0
#: VIRTIO Shared Memory Regions one GET_SHMEM_CONFIG reply describes: the array is
#: indexed by shmid (u8).  The merged spec text and rust-vmm's VhostUserShMemConfig
#: have 256 entries; early QEMU drafts had VHOST_MEMORY_BASELINE_NREGIONS (8).
VHOST_USER_MAX_SHMEM_REGIONS = 256
#: struct VhostUserShMemConfig { u32 nregions; u32 padding; u64 memory_sizes[256]; }
vhost_user_shmem_config = struct.Struct(f"<II{VHOST_USER_MAX_SHMEM_REGIONS}Q")

#: VHOST_USER_VRING_NOFD_MASK: bit 8 of the kick/call/err u64 means "no fd".
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8

#: At most this many fds travel with one message (spec: "at most 8").
VHOST_USER_MAX_FDS = 8
#: SET_MEM_TABLE carries at most this many regions (VHOST_MEMORY_BASELINE_NREGIONS).
VHOST_MEMORY_BASELINE_NREGIONS = 8
#: The largest payload we accept; nothing a vhost-user-fs frontend sends is near it.
VHOST_USER_MAX_PAYLOAD = 4096
#: The largest config space GET_CONFIG may ask for (VHOST_USER_MAX_CONFIG_SIZE).
VHOST_USER_MAX_CONFIG_SIZE = 256
#: Slots we offer through GET_MAX_MEM_SLOTS with CONFIGURE_MEM_SLOTS.
MAX_MEM_SLOTS = 32

#: Device status bits (virtio 1.2 §2.1), for SET_STATUS.
VIRTIO_CONFIG_S_DRIVER_OK = 4

# -- live migration (spec: "Migration", "Migrating back-end state") ----------

#: struct VhostUserLog { u64 mmap_size; u64 mmap_offset; } (SET_LOG_BASE with LOG_SHMFD).
#: The message list calls the payload "u64"; QEMU sends this 16-byte Log description.
vhost_user_log = struct.Struct("<QQ")
#: struct vhost_vring_addr flags bit 0: log used-ring writes at ``log`` (VHOST_VRING_F_LOG).
VHOST_VRING_F_LOG = 0x1 << 0
#: Dirty-log granularity: one bit per VHOST_LOG_PAGE bytes of guest-physical space.
VHOST_LOG_PAGE = 0x1000
#: struct VhostUserTransferDeviceState { u32 direction; u32 phase; } (SET_DEVICE_STATE_FD).
vhost_user_transfer_state = struct.Struct("<II")
VHOST_TRANSFER_STATE_DIRECTION_SAVE = 0
VHOST_TRANSFER_STATE_DIRECTION_LOAD = 1
#: The only phase the spec defines: both devices suspended, after RAM, before switch-over.
VHOST_TRANSFER_STATE_PHASE_STOPPED = 0
#: SET_DEVICE_STATE_FD reply: bits 0-7 the status (0 ok), bit 8 "no fd returned".
VHOST_USER_DEVICE_STATE_STATUS_MASK = 0xFF
VHOST_USER_DEVICE_STATE_NOFD = 0x1 << 8
