"""The backend request channel for the DAX window, sans-IO.

The frontend hands the backend a socket with SET_BACKEND_REQ_FD; on it the
*backend* sends requests and the *frontend* replies (QEMU
``docs/interop/vhost-user.rst``, "Back-end message types").  shardfs sends
two of them, for the virtio-fs DAX window (DESIGN §3):

``VHOST_USER_BACKEND_SHMEM_MAP`` (9)
    payload ``VhostUserMMap {u8 shmid; u8 padding[7]; u64 fd_offset;
    u64 shm_offset; u64 len; u64 flags}``, with the file's fd attached by
    SCM_RIGHTS: map ``len`` bytes of the file at ``fd_offset`` into shared
    memory region ``shmid`` at ``shm_offset``; flags bit 0
    (VHOST_USER_FLAG_MAP_RW) asks for a writable mapping.
``VHOST_USER_BACKEND_SHMEM_UNMAP`` (10)
    the same payload without an fd; ``fd_offset`` and ``flags`` are unused.

Both need the SHMEM protocol feature, BACKEND_REQ and (for the fd)
BACKEND_SEND_FD.  Early spec text always expected a reply to them, later
text only with NEED_REPLY, so requests are always sent with NEED_REPLY and
the u64 status that comes back is 0 for success (spec: "REPLY_ACK").

This module only turns requests into bytes and bytes into replies, and
checks what it parses; :mod:`shardfs.proc.coordinator` does the socket
I/O and the in-repo frontend (:mod:`shardfs.testing.dax`) the other side.
It also encodes the GET_SHMEM_CONFIG reply, which travels on the main
socket but describes the same window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from shardfs.abi import vhost_user as vu
from shardfs.abi.vhost_user import BackendReq

HEADER_BYTES = vu.vhost_user_header.size
#: The only two requests shardfs sends on the channel.
SHMEM_REQUESTS = frozenset({BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP})
_U64_MAX = (1 << 64) - 1


class ChannelProtocolError(Exception):
    """Bytes on the backend channel that are not what the peer should send."""


class ShmemRequest(NamedTuple):
    """One decoded SHMEM_MAP or SHMEM_UNMAP (as the frontend sees it)."""

    request: BackendReq
    need_reply: bool
    shmid: int
    fd_offset: int
    shm_offset: int
    length: int
    flags: int

    @property
    def writable(self) -> bool:
        return bool(self.flags & vu.VHOST_USER_FLAG_MAP_RW)


def _check_u64(*values: int) -> None:
    for v in values:
        if not 0 <= v <= _U64_MAX:
            raise ValueError(f"{v} does not fit a u64")


def encode_shmem_map(shmid: int, fd_offset: int, shm_offset: int, length: int,
                     writable: bool) -> bytes:
    """SHMEM_MAP with NEED_REPLY; the caller attaches the file's fd to these bytes."""
    _check_u64(fd_offset, shm_offset, length)
    flags = vu.VHOST_USER_FLAG_MAP_RW if writable else 0
    payload = vu.vhost_user_shmem_msg.pack(shmid, fd_offset, shm_offset, length, flags)
    return _request(BackendReq.SHMEM_MAP, payload)


def encode_shmem_unmap(shmid: int, shm_offset: int, length: int) -> bytes:
    """SHMEM_UNMAP with NEED_REPLY (no fd)."""
    _check_u64(shm_offset, length)
    payload = vu.vhost_user_shmem_msg.pack(shmid, 0, shm_offset, length, 0)
    return _request(BackendReq.SHMEM_UNMAP, payload)


def _request(request: int, payload: bytes) -> bytes:
    flags = vu.VHOST_USER_VERSION | vu.VHOST_USER_NEED_REPLY_MASK
    return vu.vhost_user_header.pack(request, flags, len(payload)) + payload


def parse_reply_header(header: bytes) -> tuple[int, int]:
    """(request, payload size) of a reply header; ChannelProtocolError if it is not one.

    A reply must carry version 1 and the REPLY flag, and a payload no larger
    than the u64 status it should hold.
    """
    if len(header) != HEADER_BYTES:
        raise ChannelProtocolError(f"reply header of {len(header)} bytes")
    request, flags, size = vu.vhost_user_header.unpack(header)
    if flags & vu.VHOST_USER_VERSION_MASK != vu.VHOST_USER_VERSION:
        raise ChannelProtocolError(f"reply with bad version in flags {flags:#x}")
    if not flags & vu.VHOST_USER_REPLY_MASK:
        raise ChannelProtocolError(f"message {request} on the backend channel is not a reply")
    if size != vu.u64.size:
        raise ChannelProtocolError(f"reply to {request} with a {size}-byte payload")
    return request, size


def parse_status(payload: bytes) -> int:
    """The u64 status of a reply: 0 success, anything else failure."""
    if len(payload) != vu.u64.size:
        raise ChannelProtocolError(f"status of {len(payload)} bytes")
    return int(vu.u64.unpack(payload)[0])


def decode_request(header: bytes, payload: bytes) -> ShmemRequest:
    """A SHMEM_MAP/UNMAP the backend sent (the frontend's side, and tests)."""
    if len(header) != HEADER_BYTES:
        raise ChannelProtocolError(f"header of {len(header)} bytes")
    request, flags, size = vu.vhost_user_header.unpack(header)
    if flags & vu.VHOST_USER_VERSION_MASK != vu.VHOST_USER_VERSION:
        raise ChannelProtocolError(f"bad version in flags {flags:#x}")
    if request not in SHMEM_REQUESTS:
        raise ChannelProtocolError(f"unexpected backend request {request}")
    if size != vu.vhost_user_shmem_msg.size or len(payload) != size:
        raise ChannelProtocolError(f"SHMEM payload of {size}/{len(payload)} bytes")
    shmid, fd_offset, shm_offset, length, mflags = vu.vhost_user_shmem_msg.unpack(payload)
    return ShmemRequest(BackendReq(request), bool(flags & vu.VHOST_USER_NEED_REPLY_MASK),
                        shmid, fd_offset, shm_offset, length, mflags)


def encode_reply(request: int, status: int) -> bytes:
    """The frontend's u64 reply to a backend request (0 = success)."""
    flags = vu.VHOST_USER_VERSION | vu.VHOST_USER_REPLY_MASK
    return vu.vhost_user_header.pack(request, flags, vu.u64.size) + vu.u64.pack(status)


def encode_shmem_config(sizes: Sequence[int]) -> bytes:
    """GET_SHMEM_CONFIG's reply body: ``sizes[shmid]`` for each region, 0 = none.

    ``nregions`` counts the regions that exist (non-zero size), as the
    spec's "VIRTIO Shared Memory Region configuration" has it; the array is
    indexed by shmid.
    """
    if len(sizes) > vu.VHOST_USER_MAX_SHMEM_REGIONS:
        raise ValueError(f"{len(sizes)} shared memory regions")
    _check_u64(*sizes)
    padded = list(sizes) + [0] * (vu.VHOST_USER_MAX_SHMEM_REGIONS - len(sizes))
    return vu.vhost_user_shmem_config.pack(sum(1 for s in sizes if s), 0, *padded)


def decode_shmem_config(payload: bytes) -> list[int]:
    """The region sizes of a GET_SHMEM_CONFIG reply, indexed by shmid."""
    if len(payload) != vu.vhost_user_shmem_config.size:
        raise ChannelProtocolError(f"GET_SHMEM_CONFIG reply of {len(payload)} bytes, "
                                   f"expected {vu.vhost_user_shmem_config.size}")
    nregions, _pad, *sizes = vu.vhost_user_shmem_config.unpack(payload)
    if nregions != sum(1 for s in sizes if s):
        raise ChannelProtocolError(f"nregions {nregions} does not match the sizes")
    return list(sizes)
