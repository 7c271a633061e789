"""The backend side of vhost-user, sans-IO.

:class:`VhostUserSession` takes one decoded message (request, flags, payload,
fds) and returns the reply bytes, if any.  It never touches a socket: the
effects on the device (map memory, start or stop a ring, swap a call fd) go
through the :class:`Device` interface, which the supervisor implements by
talking to its workers and a test implements with plain lists.

Rules enforced here, each from QEMU ``docs/interop/vhost-user.rst``:

* Header version must be 0x1; payloads are bounded by
  :data:`VHOST_USER_MAX_PAYLOAD` (framing errors end the connection, since a
  stream cannot be resynchronised).
* "Ring states": rings start stopped; SET_VRING_KICK starts one,
  GET_VRING_BASE stops it and answers the next avail index.  When
  VHOST_USER_F_PROTOCOL_FEATURES is negotiated rings start disabled until
  SET_VRING_ENABLE, otherwise enabled.
* REPLY_ACK: a message without a reply body that carries NEED_REPLY gets a
  u64, 0 for success; GET_* requests always reply.
* Kick/call/err payloads: bits 0-7 are the index, bit 8 means "no fd".

Fd ownership: every fd that arrives with a message belongs to the session
from that moment.  An fd handed to the :class:`Device` becomes the device's;
every other fd is closed before :meth:`VhostUserSession.handle` returns.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

from shardfs.abi import vhost_user as vu
from shardfs.abi.vhost_user import FrontendReq, ProtocolFeature
from shardfs.abi.virtio import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTQ_MAX_SIZE,
)
from shardfs.codec.backend_channel import encode_shmem_config

log = logging.getLogger("shardfs.vhost_user")


class FramingError(Exception):
    """The byte stream is not vhost-user; the connection must be closed."""


class ProtocolError(Exception):
    """A well-framed message breaks a protocol rule; it is refused."""


def parse_header(data: bytes) -> tuple[int, int, int]:
    """Decode and check a 12-byte header: (request, flags, size)."""
    if len(data) != vu.vhost_user_header.size:
        raise FramingError(f"short header: {len(data)} bytes")
    request, flags, size = vu.vhost_user_header.unpack(data)
    if flags & vu.VHOST_USER_VERSION_MASK != vu.VHOST_USER_VERSION:
        raise FramingError(f"bad version in flags {flags:#x} (request {request})")
    if size > vu.VHOST_USER_MAX_PAYLOAD:
        raise FramingError(f"payload of {size} bytes exceeds {vu.VHOST_USER_MAX_PAYLOAD}")
    return request, flags, size


def encode_reply(request: int, payload: bytes) -> bytes:
    flags = vu.VHOST_USER_VERSION | vu.VHOST_USER_REPLY_MASK
    return vu.vhost_user_header.pack(request, flags, len(payload)) + payload


def encode_request(request: int, payload: bytes, need_reply: bool = False) -> bytes:
    """A message in the frontend's direction (for the backend channel and tests)."""
    flags = vu.VHOST_USER_VERSION | (vu.VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
    return vu.vhost_user_header.pack(request, flags, len(payload)) + payload


class MemRegion(NamedTuple):
    gpa: int
    size: int
    user_addr: int
    mmap_offset: int


class VringState:
    """What the frontend has told us about one ring."""

    __slots__ = ("num", "desc_addr", "avail_addr", "used_addr", "log_addr", "addr_flags", "base",
                 "call_fd", "err_fd", "enabled", "started")

    num: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    log_addr: int
    addr_flags: int
    base: int
    call_fd: int | None
    err_fd: int | None
    enabled: bool
    started: bool

    def __init__(self, num: int = 0, desc_addr: int = 0, avail_addr: int = 0, used_addr: int = 0,
                 log_addr: int = 0, addr_flags: int = 0, base: int = 0,
                 call_fd: int | None = None, err_fd: int | None = None, enabled: bool = False,
                 started: bool = False) -> None:
        self.num = num
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.log_addr = log_addr
        self.addr_flags = addr_flags
        self.base = base
        self.call_fd = call_fd
        self.err_fd = err_fd
        self.enabled = enabled
        self.started = started

    def _key(self) -> tuple[object, ...]:
        return (self.num, self.desc_addr, self.avail_addr, self.used_addr, self.log_addr,
                self.addr_flags, self.base, self.call_fd, self.err_fd, self.enabled, self.started)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VringState):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # compared by value, and mutable


class Device:
    """What the session asks of the device.  Methods own the fds they get."""

    def mem_set(self, regions: list[tuple[MemRegion, int]]) -> None:
        raise NotImplementedError

    def mem_add(self, region: MemRegion, fd: int) -> None:
        raise NotImplementedError

    def mem_remove(self, region: MemRegion) -> None:
        raise NotImplementedError

    def ring_start(self, index: int, state: VringState, kick_fd: int, call_fd: int | None,
                   event_idx: bool, indirect: bool) -> None:
        """Start ring ``index``; ``call_fd`` is a dup the device owns."""
        raise NotImplementedError

    def ring_stop(self, index: int) -> int:
        """Stop ring ``index`` once its in-flight chains are settled; return next avail."""
        raise NotImplementedError

    def ring_call(self, index: int, call_fd: int | None) -> None:
        raise NotImplementedError

    def ring_enable(self, index: int, enabled: bool) -> None:
        raise NotImplementedError

    def backend_channel(self, fd: int) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """RESET_DEVICE: stop every ring.  Memory and the backend channel stay:
        the spec has the back-end keep ownership of the device through it."""
        raise NotImplementedError

    def disconnect(self) -> None:
        """The frontend went away: release memory, channels and guest state."""
        raise NotImplementedError

    # -- migration (spec: "Migration", "Migrating back-end state"); a device
    # -- without it refuses, so the session answers failure, never crashes.

    def log_base(self, fd: int, size: int, offset: int) -> None:
        """SET_LOG_BASE: the dirty log is ``size`` bytes at ``offset`` in ``fd`` (owned)."""
        os.close(fd)
        raise ProtocolError("this device keeps no dirty log")

    def log_all(self, enabled: bool) -> None:
        """VHOST_F_LOG_ALL was acked (True) or cleared (False) by SET_FEATURES."""

    def ring_log(self, index: int, log_gpa: int | None, num: int) -> None:
        """A started ring's used-ring logging changed (SET_VRING_ADDR flags)."""

    def device_state(self, direction: int, fd: int) -> None:
        """SET_DEVICE_STATE_FD: start saving into / loading from ``fd`` (owned)."""
        os.close(fd)
        raise ProtocolError("this device has no migratable state")

    def check_device_state(self) -> bool:
        """CHECK_DEVICE_STATE: wait for the transfer to end; whether it succeeded."""
        return False


class SessionConfig:
    num_queues: int
    tag: str | None
    config_space: bytes
    virtio_features: int
    protocol_features: int
    max_mem_slots: int
    #: VIRTIO Shared Memory Region sizes by shmid, for GET_SHMEM_CONFIG (the DAX
    #: window); empty when there is none.
    shmem_sizes: tuple[int, ...]
    #: The bit that numbers the SHMEM protocol feature (it moved between versions).
    shmem_bit: int

    def __init__(self, num_queues: int, tag: str | None, config_space: bytes,
                 virtio_features: int, protocol_features: int,
                 max_mem_slots: int = vu.MAX_MEM_SLOTS, shmem_sizes: tuple[int, ...] = (),
                 shmem_bit: int = ProtocolFeature.SHMEM) -> None:
        self.num_queues = num_queues
        self.tag = tag
        self.config_space = config_space
        self.virtio_features = virtio_features
        self.protocol_features = protocol_features
        self.max_mem_slots = max_mem_slots
        self.shmem_sizes = shmem_sizes
        self.shmem_bit = shmem_bit


class VhostUserSession:
    """One frontend connection's protocol state."""

    device: Device
    config: SessionConfig
    acked_features: int
    acked_protocol_features: int
    status: int
    owner: bool
    vrings: list[VringState]

    def __init__(self, device: Device, config: SessionConfig) -> None:
        self.device = device
        self.config = config
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.status = 0
        self.owner = False
        # A session starts with fresh rings, one per queue.
        self.vrings = [VringState() for _ in range(config.num_queues)]

    # -- public ---------------------------------------------------------------

    def handle(self, request: int, flags: int, payload: bytes, fds: list[int]) -> bytes | None:
        """Apply one message; return the reply bytes to send, or None."""
        fds = list(fds)
        try:
            name = FrontendReq(request).name
        except ValueError:
            name = f"UNKNOWN({request})"
        handler = getattr(self, f"_h_{name}", None)
        need_reply = bool(flags & vu.VHOST_USER_NEED_REPLY_MASK) and self._has_protocol(
            ProtocolFeature.REPLY_ACK)
        ok = True
        reply: bytes | None = None
        try:
            if handler is None:
                raise ProtocolError(f"unsupported request {name}")
            reply = handler(payload, fds)
        except ProtocolError as e:
            log.warning("vhost-user %s refused: %s", name, e)
            ok = False
            # Fix (unit tests): GET_* always reply, refused or not.  Answering
            # nothing left the frontend blocked forever on its read.
            if request in _ALWAYS_REPLY and (request != FrontendReq.SET_LOG_BASE
                                             or self._has_protocol(ProtocolFeature.LOG_SHMFD)):
                reply = _refusal(request, payload)
        finally:
            for fd in fds:
                _close(fd)
        if reply is not None:
            return encode_reply(request, reply)
        if need_reply:
            return encode_reply(request, vu.u64.pack(0 if ok else 1))
        return None

    def close(self) -> None:
        """The connection ended: release every fd we hold and let the device go."""
        self._reset_rings()
        self.device.disconnect()

    def _reset_rings(self) -> None:
        self.device.reset()
        for vr in self.vrings:
            _close(vr.call_fd)
            _close(vr.err_fd)
        self.vrings = [VringState() for _ in range(self.config.num_queues)]

    # -- helpers --------------------------------------------------------------

    def _has_protocol(self, bit: int) -> bool:
        return bool(self.acked_protocol_features >> bit & 1)

    def _rings_start_enabled(self) -> bool:
        return not self.acked_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1

    def _vring(self, index: int) -> VringState:
        if not 0 <= index < len(self.vrings):
            raise ProtocolError(f"vring index {index} out of range {len(self.vrings)}")
        return self.vrings[index]

    @staticmethod
    def _u64(payload: bytes) -> int:
        if len(payload) < vu.u64.size:
            raise ProtocolError("payload too short for u64")
        return vu.u64.unpack_from(payload)[0]

    @staticmethod
    def _state(payload: bytes) -> tuple[int, int]:
        if len(payload) < vu.vhost_vring_state.size:
            raise ProtocolError("payload too short for vring state")
        return vu.vhost_vring_state.unpack_from(payload)

    @staticmethod
    def _take_fd(fds: list[int]) -> int:
        if len(fds) != 1:
            raise ProtocolError(f"expected one fd, got {len(fds)}")
        return fds.pop()

    # -- handlers (one per request; names match FrontendReq) ------------------

    def _h_GET_FEATURES(self, payload: bytes, fds: list[int]) -> bytes:
        return vu.u64.pack(self.config.virtio_features)

    def _h_SET_FEATURES(self, payload: bytes, fds: list[int]) -> None:
        features = self._u64(payload)
        extra = features & ~self.config.virtio_features
        if extra:
            raise ProtocolError(f"features {extra:#x} were not offered")
        logging_was = self.acked_features >> VHOST_F_LOG_ALL & 1
        self.acked_features = features
        log.info("virtio features acked: %#x", features)
        if features >> VHOST_F_LOG_ALL & 1 != logging_was:
            # QEMU starts dirty logging with LOG_ALL, and clears it when a
            # migration ends or is cancelled (the source then serves on).
            self.device.log_all(not logging_was)

    def _h_GET_PROTOCOL_FEATURES(self, payload: bytes, fds: list[int]) -> bytes:
        return vu.u64.pack(self.config.protocol_features)

    def _h_SET_PROTOCOL_FEATURES(self, payload: bytes, fds: list[int]) -> None:
        features = self._u64(payload)
        extra = features & ~self.config.protocol_features
        if extra:
            raise ProtocolError(f"protocol features {extra:#x} were not offered")
        self.acked_protocol_features = features
        log.info("protocol features acked: %#x", features)

    def _h_SET_OWNER(self, payload: bytes, fds: list[int]) -> None:
        self.owner = True

    def _h_RESET_OWNER(self, payload: bytes, fds: list[int]) -> None:
        self._reset()

    def _h_RESET_DEVICE(self, payload: bytes, fds: list[int]) -> None:
        self._reset()

    def _reset(self) -> None:
        self._reset_rings()
        self.acked_features = 0
        self.status = 0

    def _h_GET_QUEUE_NUM(self, payload: bytes, fds: list[int]) -> bytes:
        return vu.u64.pack(self.config.num_queues)

    def _h_GET_MAX_MEM_SLOTS(self, payload: bytes, fds: list[int]) -> bytes:
        return vu.u64.pack(self.config.max_mem_slots)

    def _h_SET_MEM_TABLE(self, payload: bytes, fds: list[int]) -> None:
        if len(payload) < vu.vhost_user_memory.size:
            raise ProtocolError("SET_MEM_TABLE payload too short")
        nregions, _ = vu.vhost_user_memory.unpack_from(payload)
        if nregions > vu.VHOST_MEMORY_BASELINE_NREGIONS:
            raise ProtocolError(f"{nregions} regions exceed {vu.VHOST_MEMORY_BASELINE_NREGIONS}")
        need = vu.vhost_user_memory.size + nregions * vu.vhost_user_memory_region.size
        if len(payload) < need or len(fds) != nregions:
            raise ProtocolError(f"{nregions} regions need {need} bytes and {nregions} fds, "
                                f"got {len(payload)} bytes and {len(fds)} fds")
        regions = []
        for i in range(nregions):
            off = vu.vhost_user_memory.size + i * vu.vhost_user_memory_region.size
            regions.append(MemRegion(*vu.vhost_user_memory_region.unpack_from(payload, off)))
        handed = [(r, fds[i]) for i, r in enumerate(regions)]
        fds.clear()
        self.device.mem_set(handed)

    def _single_region(self, payload: bytes) -> MemRegion:
        if len(payload) < vu.vhost_user_single_region.size:
            raise ProtocolError("memory region payload too short")
        return MemRegion(*vu.vhost_user_single_region.unpack_from(payload)[1:])

    def _h_ADD_MEM_REG(self, payload: bytes, fds: list[int]) -> None:
        region = self._single_region(payload)
        fd = self._take_fd(fds)
        self.device.mem_add(region, fd)

    def _h_REM_MEM_REG(self, payload: bytes, fds: list[int]) -> None:
        self.device.mem_remove(self._single_region(payload))

    def _h_SET_VRING_NUM(self, payload: bytes, fds: list[int]) -> None:
        index, num = self._state(payload)
        if num == 0 or num > VIRTQ_MAX_SIZE or num & (num - 1):
            raise ProtocolError(f"vring size {num} is not a power of two up to {VIRTQ_MAX_SIZE}")
        self._vring(index).num = num

    def _h_SET_VRING_ADDR(self, payload: bytes, fds: list[int]) -> None:
        if len(payload) < vu.vhost_vring_addr.size:
            raise ProtocolError("SET_VRING_ADDR payload too short")
        index, flags, desc, used, avail, log_addr = vu.vhost_vring_addr.unpack_from(payload)
        vr = self._vring(index)
        vr.addr_flags, vr.desc_addr, vr.used_addr, vr.avail_addr = flags, desc, used, avail
        vr.log_addr = log_addr
        if vr.started:
            # QEMU toggles VHOST_VRING_F_LOG on running rings when logging starts/stops.
            self.device.ring_log(index, used_log_gpa(vr), vr.num)

    def _h_SET_VRING_BASE(self, payload: bytes, fds: list[int]) -> None:
        index, base = self._state(payload)
        self._vring(index).base = base & 0xFFFF

    def _h_GET_VRING_BASE(self, payload: bytes, fds: list[int]) -> bytes:
        index, _ = self._state(payload)
        vr = self._vring(index)
        base = vr.base
        if vr.started:
            base = self.device.ring_stop(index)
            vr.started = False
            log.info("vring %d stopped at avail index %d", index, base)
        vr.base = base
        return vu.vhost_vring_state.pack(index, base)

    def _fd_index(self, payload: bytes, fds: list[int]) -> tuple[VringState, int, int | None]:
        value = self._u64(payload)
        index = value & vu.VHOST_USER_VRING_IDX_MASK
        vr = self._vring(index)
        if value & vu.VHOST_USER_VRING_NOFD_MASK:
            if fds:
                raise ProtocolError("NOFD flag set but an fd was sent")
            return vr, index, None
        return vr, index, self._take_fd(fds)

    def _h_SET_VRING_KICK(self, payload: bytes, fds: list[int]) -> None:
        vr, index, fd = self._fd_index(payload, fds)
        if fd is None:
            raise ProtocolError(f"vring {index}: polling without a kick fd is not supported")
        if vr.num == 0:
            _close(fd)
            raise ProtocolError(f"vring {index}: kick before SET_VRING_NUM")
        if vr.started:
            vr.base = self.device.ring_stop(index)
        if self._rings_start_enabled():
            vr.enabled = True
        call = os.dup(vr.call_fd) if vr.call_fd is not None else None
        event_idx = bool(self.acked_features >> VIRTIO_RING_F_EVENT_IDX & 1)
        indirect = bool(self.acked_features >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        self.device.ring_start(index, vr, fd, call, event_idx, indirect)
        vr.started = True
        log.info("vring %d started: size %d base %d enabled %s", index, vr.num, vr.base,
                 vr.enabled)

    def _h_SET_VRING_CALL(self, payload: bytes, fds: list[int]) -> None:
        vr, index, fd = self._fd_index(payload, fds)
        _close(vr.call_fd)
        vr.call_fd = fd
        if vr.started:
            self.device.ring_call(index, os.dup(fd) if fd is not None else None)

    def _h_SET_VRING_ERR(self, payload: bytes, fds: list[int]) -> None:
        vr, _, fd = self._fd_index(payload, fds)
        _close(vr.err_fd)
        vr.err_fd = fd

    def _h_SET_VRING_ENABLE(self, payload: bytes, fds: list[int]) -> None:
        index, enable = self._state(payload)
        if not self.acked_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            raise ProtocolError("SET_VRING_ENABLE without PROTOCOL_FEATURES")
        if enable > 1:
            raise ProtocolError(f"SET_VRING_ENABLE value {enable}")
        vr = self._vring(index)
        vr.enabled = bool(enable)
        if vr.started:
            self.device.ring_enable(index, vr.enabled)

    def _h_SET_BACKEND_REQ_FD(self, payload: bytes, fds: list[int]) -> None:
        if not self._has_protocol(ProtocolFeature.BACKEND_REQ):
            raise ProtocolError("SET_BACKEND_REQ_FD without BACKEND_REQ")
        self.device.backend_channel(self._take_fd(fds))

    def _h_SET_LOG_BASE(self, payload: bytes, fds: list[int]) -> bytes:
        """Map the dirty log (spec: "Migration").  With LOG_SHMFD the frontend
        waits for a reply carrying this request code; the Log description is
        echoed, as rust-vmm does (QEMU checks only the code)."""
        if not self._has_protocol(ProtocolFeature.LOG_SHMFD):
            raise ProtocolError("SET_LOG_BASE without LOG_SHMFD")
        if len(payload) < vu.vhost_user_log.size:
            raise ProtocolError("SET_LOG_BASE payload too short for the Log description")
        size, offset = vu.vhost_user_log.unpack_from(payload)
        self.device.log_base(self._take_fd(fds), size, offset)
        return vu.vhost_user_log.pack(size, offset)

    def _h_SET_LOG_FD(self, payload: bytes, fds: list[int]) -> None:
        """An optional "log modified" eventfd; QEMU sends none and we signal none."""

    def _h_SET_DEVICE_STATE_FD(self, payload: bytes, fds: list[int]) -> bytes:
        """Start a state transfer over the frontend's pipe (we offer no fd of ours,
        so the reply always has the "no fd" bit; bits 0-7 say success)."""
        if not self._has_protocol(ProtocolFeature.DEVICE_STATE):
            raise ProtocolError("SET_DEVICE_STATE_FD without DEVICE_STATE")
        if len(payload) < vu.vhost_user_transfer_state.size:
            raise ProtocolError("SET_DEVICE_STATE_FD payload too short")
        direction, phase = vu.vhost_user_transfer_state.unpack_from(payload)
        fd = self._take_fd(fds)
        status = 0
        try:
            if direction not in (vu.VHOST_TRANSFER_STATE_DIRECTION_SAVE,
                                 vu.VHOST_TRANSFER_STATE_DIRECTION_LOAD):
                _close(fd)
                raise ProtocolError(f"unknown transfer direction {direction}")
            if phase != vu.VHOST_TRANSFER_STATE_PHASE_STOPPED:
                _close(fd)
                raise ProtocolError(f"unknown transfer phase {phase}")
            self.device.device_state(direction, fd)
        except ProtocolError as e:
            log.error("SET_DEVICE_STATE_FD refused: %s", e)
            status = 1
        return vu.u64.pack(vu.VHOST_USER_DEVICE_STATE_NOFD | status)

    def _h_CHECK_DEVICE_STATE(self, payload: bytes, fds: list[int]) -> bytes:
        if not self._has_protocol(ProtocolFeature.DEVICE_STATE):
            raise ProtocolError("CHECK_DEVICE_STATE without DEVICE_STATE")
        return vu.u64.pack(0 if self.device.check_device_state() else 1)

    def _h_GET_CONFIG(self, payload: bytes, fds: list[int]) -> bytes:
        if len(payload) < vu.vhost_user_config.size:
            raise ProtocolError("GET_CONFIG payload too short")
        offset, size, flags = vu.vhost_user_config.unpack_from(payload)
        if offset + size > vu.VHOST_USER_MAX_CONFIG_SIZE:
            raise ProtocolError(f"config range {offset}+{size} out of bounds")
        space = self.config.config_space.ljust(vu.VHOST_USER_MAX_CONFIG_SIZE, b"\0")
        return vu.vhost_user_config.pack(offset, size, flags) + space[offset:offset + size]

    def _h_SET_CONFIG(self, payload: bytes, fds: list[int]) -> None:
        raise ProtocolError("the virtio-fs config space is read-only")

    def _h_SET_STATUS(self, payload: bytes, fds: list[int]) -> None:
        self.status = self._u64(payload) & 0xFF

    def _h_GET_STATUS(self, payload: bytes, fds: list[int]) -> bytes:
        return vu.u64.pack(self.status)

    def _h_GET_SHMEM_CONFIG(self, payload: bytes, fds: list[int]) -> bytes:
        """The shared memory regions (spec: "VIRTIO Shared Memory Region
        configuration"); valid only once the SHMEM feature is negotiated."""
        if not self.config.shmem_sizes or not self._has_protocol(self.config.shmem_bit):
            raise ProtocolError("GET_SHMEM_CONFIG without the SHMEM protocol feature")
        return encode_shmem_config(self.config.shmem_sizes)


def used_log_gpa(vr: VringState) -> int | None:
    """Where a ring's used-ring writes are logged: ``log_guest_addr`` when
    SET_VRING_ADDR set VHOST_VRING_F_LOG, else None (spec: "Migration")."""
    return vr.log_addr if vr.addr_flags & vu.VHOST_VRING_F_LOG else None


#: Requests whose reply the frontend always waits for (spec: "REPLY_ACK").
_ALWAYS_REPLY = frozenset([r for r in FrontendReq if r.name.startswith("GET_")]
                          + [FrontendReq.SET_DEVICE_STATE_FD, FrontendReq.CHECK_DEVICE_STATE,
                             FrontendReq.SET_LOG_BASE])


def _refusal(request: int, payload: bytes) -> bytes:
    """The reply body of a refused GET_*: one the frontend rejects by its size.

    GET_CONFIG has a form in the spec ("uses zero length of payload to
    indicate an error"): the config header with size 0, as rust-vmm sends it.
    Any other GET_* answers an empty body, which QEMU's size check turns into
    an error instead of a hang.
    """
    if request == FrontendReq.SET_DEVICE_STATE_FD:
        return vu.u64.pack(vu.VHOST_USER_DEVICE_STATE_NOFD | 1)
    if request == FrontendReq.CHECK_DEVICE_STATE:
        return vu.u64.pack(1)
    if request == FrontendReq.GET_CONFIG and len(payload) >= vu.vhost_user_config.size:
        offset, _, flags = vu.vhost_user_config.unpack_from(payload)
        return vu.vhost_user_config.pack(offset, 0, flags)
    return b""


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
