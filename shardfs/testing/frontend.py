"""An in-repo vhost-user frontend: drives the real daemon the way a VMM does.

It connects to the daemon's socket, negotiates features, shares memfd guest
RAM through SET_MEM_TABLE, sets up split rings with real eventfds, and sends
FUSE requests through them.  Tests, fuzzers and benchmarks use it; nothing in
the daemon imports it.

Frontend virtual addresses differ from guest-physical ones on purpose
(``USER_ADDR_OFFSET``), so a backend that forgets to translate
SET_VRING_ADDR through ``user_addr`` fails here as it would under QEMU.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from dataclasses import dataclass

from shardfs.abi import fuse as F
from shardfs.abi import vhost_user as vu
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.abi.vhost_user import FrontendReq as R
from shardfs.abi.virtio import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from shardfs.codec.vhost_user import encode_request
from shardfs.testing.driver import DriverQueue, GuestRam

USER_ADDR_OFFSET = 0x7F00_0000_0000
DEFAULT_TIMEOUT_S = 30.0


class FrontendError(Exception):
    pass


@dataclass
class FuseReply:
    error: int
    unique: int
    data: bytes


class Frontend:
    """One vhost-user connection with RAM and rings."""

    def __init__(self, socket_path: str, *, mem_size: int = 64 << 20, queue_size: int = 256,
                 num_queues: int = 2, event_idx: bool = True, indirect: bool = True,
                 connect: bool = True) -> None:
        self.socket_path = socket_path
        self.ram = GuestRam(mem_size)
        self.queue_size = queue_size
        self.num_queues = num_queues
        self.want_event_idx = event_idx
        self.want_indirect = indirect
        self.sock: socket.socket | None = None
        self.queues: dict[int, DriverQueue] = {}
        self.kick: dict[int, int] = {}
        self.call: dict[int, int] = {}
        self.features = 0
        self.protocol_features = 0
        #: Protocol feature bits to accept beyond the defaults (testing.dax adds SHMEM).
        self.extra_protocol_features = 0
        self.unique = 0
        if connect:
            self.connect()

    # -- vhost-user messages ----------------------------------------------------

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Blocking connect: a Unix socket answers EAGAIN, not EINPROGRESS,
        # when the backlog is full, so a timeout socket would fail at once.
        self.sock.connect(self.socket_path)
        self.sock.settimeout(DEFAULT_TIMEOUT_S)

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False, flags: int | None = None) -> None:
        assert self.sock is not None
        data = encode_request(request, payload, need_reply)
        if flags is not None:
            data = vu.vhost_user_header.pack(request, flags, len(payload)) + payload
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def recv_reply(self, request: int) -> bytes:
        assert self.sock is not None
        hdr = self._recv_exact(vu.vhost_user_header.size)
        req, flags, size = vu.vhost_user_header.unpack(hdr)
        if req != request or not flags & vu.VHOST_USER_REPLY_MASK:
            raise FrontendError(f"reply to {req} flags {flags:#x}, expected {request}")
        return self._recv_exact(size)

    def _recv_exact(self, n: int) -> bytes:
        assert self.sock is not None
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise FrontendError("backend closed the connection")
            buf += chunk
        return buf

    def get_u64(self, request: int, payload: bytes = b"") -> int:
        self.send(request, payload)
        return int(vu.u64.unpack(self.recv_reply(request))[0])

    def ack(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
        """Send with NEED_REPLY and return the backend's u64 status (0 = success)."""
        self.send(request, payload, fds, need_reply=True)
        return int(vu.u64.unpack(self.recv_reply(request))[0])

    def negotiate(self) -> None:
        offered = self.get_u64(R.GET_FEATURES)
        want = 1 << VIRTIO_F_VERSION_1 | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        if self.want_event_idx:
            want |= 1 << VIRTIO_RING_F_EVENT_IDX
        if self.want_indirect:
            want |= 1 << VIRTIO_RING_F_INDIRECT_DESC
        self.features = offered & want
        self.send(R.SET_FEATURES, vu.u64.pack(self.features))
        proto = self.get_u64(R.GET_PROTOCOL_FEATURES)
        self.protocol_features = proto & (1 << vu.ProtocolFeature.MQ
                                          | 1 << vu.ProtocolFeature.REPLY_ACK
                                          | 1 << vu.ProtocolFeature.CONFIGURE_MEM_SLOTS
                                          | 1 << vu.ProtocolFeature.CONFIG
                                          | 1 << vu.ProtocolFeature.STATUS
                                          | 1 << vu.ProtocolFeature.RESET_DEVICE
                                          | self.extra_protocol_features)
        self.send(R.SET_PROTOCOL_FEATURES, vu.u64.pack(self.protocol_features))
        self.send(R.SET_OWNER)

    def set_mem_table(self) -> int:
        region = vu.vhost_user_memory_region.pack(self.ram.base, self.ram.size,
                                                  self.ram.base + USER_ADDR_OFFSET, 0)
        return self.ack(R.SET_MEM_TABLE, vu.vhost_user_memory.pack(1, 0) + region, [self.ram.fd])

    def setup_queue(self, index: int, enable: bool = True) -> DriverQueue:
        q = DriverQueue(self.ram, self.queue_size)
        self.queues[index] = q
        self.send(R.SET_VRING_NUM, vu.vhost_vring_state.pack(index, self.queue_size))
        self.send(R.SET_VRING_ADDR, vu.vhost_vring_addr.pack(
            index, 0, q.desc + USER_ADDR_OFFSET, q.used + USER_ADDR_OFFSET,
            q.avail + USER_ADDR_OFFSET, 0))
        self.send(R.SET_VRING_BASE, vu.vhost_vring_state.pack(index, 0))
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.kick[index], self.call[index] = kick, call
        self.send(R.SET_VRING_CALL, vu.u64.pack(index), [call])
        status = self.ack(R.SET_VRING_KICK, vu.u64.pack(index), [kick])
        if status:
            raise FrontendError(f"SET_VRING_KICK {index} failed")
        if enable:
            self.ack(R.SET_VRING_ENABLE, vu.vhost_vring_state.pack(index, 1))
        return q

    def start(self, queues: int | None = None) -> Frontend:
        """Negotiate, share RAM and start hiprio plus ``queues`` request queues."""
        self.negotiate()
        if self.set_mem_table():
            raise FrontendError("SET_MEM_TABLE failed")
        n = self.num_queues if queues is None else queues
        for i in range(n):
            self.setup_queue(i)
        return self

    def get_vring_base(self, index: int) -> int:
        self.send(R.GET_VRING_BASE, vu.vhost_vring_state.pack(index, 0))
        return int(vu.vhost_vring_state.unpack(self.recv_reply(R.GET_VRING_BASE))[1])

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for fd in list(self.kick.values()) + list(self.call.values()):
            os.close(fd)
        self.kick.clear()
        self.call.clear()
        self.ram.close()

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- rings -----------------------------------------------------------------

    def kick_queue(self, index: int) -> None:
        os.eventfd_write(self.kick[index], 1)

    def wait_used(self, index: int, count: int = 1,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> list[tuple[int, int]]:
        """Wait on the call eventfd until ``count`` chains come back."""
        q = self.queues[index]
        got: list[tuple[int, int]] = []
        got += q.pop_used()
        poller = select.poll()
        poller.register(self.call[index], select.POLLIN)
        while len(got) < count:
            if not poller.poll(timeout_s * 1000):
                raise FrontendError(f"queue {index}: no used chain after {timeout_s}s "
                                    f"({len(got)}/{count})")
            try:
                os.eventfd_read(self.call[index])
            except BlockingIOError:
                pass
            got += q.pop_used()
        return got

    # -- FUSE ------------------------------------------------------------------

    def next_unique(self) -> int:
        self.unique += 2
        return self.unique

    def fuse_request(self, opcode: int, nodeid: int = 0, args: bytes = b"", *,
                     queue: int = 1, reply_size: int = 4096, uid: int = 0, gid: int = 0,
                     split: int | None = None, indirect: bool = False,
                     check: bool = True) -> FuseReply | None:
        """Send one FUSE request and wait for its reply (None if it has none).

        ``split`` breaks the request bytes into descriptors of that size.
        With ``check=False`` a chain returned with length 0 (dropped) gives
        None instead of an error, for fuzzing.
        """
        mark = self.ram.mark
        unique = self.next_unique()
        req = F.fuse_in_header.pack(F.fuse_in_header.size + len(args), opcode, unique, nodeid,
                                    uid, gid, os.getpid(), 0, 0) + args
        readable = self._place(req, split)
        writable = []
        out_gpa = 0
        if reply_size:
            out_gpa = self.ram.alloc(reply_size, 8)
            self.ram.write(out_gpa, bytes(min(reply_size, 64)))
            writable = [(out_gpa, reply_size)]
        q = self.queues[queue]
        head = q.add(readable, writable, indirect=indirect)
        self.kick_queue(queue)
        used = self.wait_used(queue)
        self.ram.reset_alloc(mark)
        (h, length), = used
        if h != head:
            raise FrontendError(f"used head {h}, expected {head}")
        if not reply_size or (not check and length == 0):
            return None
        if length < F.fuse_out_header.size:
            raise FrontendError(f"reply of {length} bytes")
        total, error, uniq = F.fuse_out_header.unpack(self.ram.read(out_gpa,
                                                                    F.fuse_out_header.size))
        if total != length or uniq != unique:
            raise FrontendError(f"reply len {total}/{length} unique {uniq}/{unique}")
        data = self.ram.read(out_gpa + F.fuse_out_header.size, total - F.fuse_out_header.size)
        return FuseReply(error, uniq, data)

    def _place(self, data: bytes, split: int | None) -> list[tuple[int, int]]:
        step = split or len(data) or 1
        out = []
        for i in range(0, len(data), step):
            piece = data[i:i + step]
            gpa = self.ram.alloc(len(piece), 1)
            self.ram.write(gpa, piece)
            out.append((gpa, len(piece)))
        return out


class FuseClient:
    """FUSE operations over a started :class:`Frontend` (request queue 1 by default)."""

    def __init__(self, fe: Frontend, queue: int = 1) -> None:
        self.fe = fe
        self.queue = queue

    def call(self, opcode: int, nodeid: int = 0, args: bytes = b"", **kw: object) -> FuseReply:
        kw.setdefault("queue", self.queue)
        reply = self.fe.fuse_request(opcode, nodeid, args, **kw)  # type: ignore[arg-type]
        assert reply is not None
        return reply

    def ok(self, opcode: int, nodeid: int = 0, args: bytes = b"", **kw: object) -> bytes:
        r = self.call(opcode, nodeid, args, **kw)
        if r.error:
            raise OSError(-r.error, f"{Op(opcode).name}: {os.strerror(-r.error)}")
        return r.data

    def init(self, flags: int = 0xFFFFFFFF, flags2: int = 0) -> tuple:
        data = self.ok(Op.FUSE_INIT, 0, F.fuse_init_in.pack(7, 41, 1 << 17, flags, flags2))
        return F.fuse_init_out.unpack(data.ljust(F.fuse_init_out.size, b"\0"))

    def lookup(self, parent: int, name: bytes) -> tuple:
        return F.fuse_entry_out.unpack(self.ok(Op.FUSE_LOOKUP, parent, name + b"\0"))

    def getattr(self, nodeid: int) -> tuple:
        return F.fuse_attr_out.unpack(self.ok(Op.FUSE_GETATTR, nodeid,
                                              F.fuse_getattr_in.pack(0, 0, 0)))

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755) -> tuple:
        return F.fuse_entry_out.unpack(self.ok(Op.FUSE_MKDIR, parent,
                                               F.fuse_mkdir_in.pack(mode, 0) + name + b"\0"))

    def create(self, parent: int, name: bytes, flags: int = os.O_RDWR,
               mode: int = 0o644) -> tuple[tuple, int]:
        data = self.ok(Op.FUSE_CREATE, parent,
                       F.fuse_create_in.pack(flags, mode, 0, 0) + name + b"\0")
        entry = F.fuse_entry_out.unpack_from(data)
        fh = F.fuse_open_out.unpack_from(data, F.fuse_entry_out.size)[0]
        return entry, fh

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> int:
        return int(F.fuse_open_out.unpack(self.ok(Op.FUSE_OPEN, nodeid,
                                                  F.fuse_open_in.pack(flags, 0)))[0])

    def write(self, nodeid: int, fh: int, offset: int, data: bytes, **kw: object) -> int:
        args = F.fuse_write_in.pack(fh, offset, len(data), 0, 0, 0, 0) + data
        return int(F.fuse_write_out.unpack(self.ok(Op.FUSE_WRITE, nodeid, args, **kw))[0])

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        args = F.fuse_read_in.pack(fh, offset, size, 0, 0, 0, 0)
        return self.ok(Op.FUSE_READ, nodeid, args, reply_size=F.fuse_out_header.size + size)

    def release(self, nodeid: int, fh: int) -> None:
        self.ok(Op.FUSE_RELEASE, nodeid, F.fuse_release_in.pack(fh, 0, 0, 0))

    def forget(self, nodeid: int, nlookup: int, queue: int = 0) -> None:
        self.fe.fuse_request(Op.FUSE_FORGET, nodeid, F.fuse_forget_in.pack(nlookup),
                             queue=queue, reply_size=0)

    def unlink(self, parent: int, name: bytes) -> None:
        self.ok(Op.FUSE_UNLINK, parent, name + b"\0")

    def readdirplus_entries(self, nodeid: int, fh: int, offset: int = 0,
                            size: int = 4096) -> list[tuple[int, bytes]]:
        """READDIRPLUS as (nodeid, name) pairs: each non-zero nodeid is a lookup
        the caller owes a FORGET, as the kernel would."""
        data = self.ok(Op.FUSE_READDIRPLUS, nodeid,
                       F.fuse_read_in.pack(fh, offset, size, 0, 0, 0, 0),
                       reply_size=F.fuse_out_header.size + size)
        out = []
        pos = 0
        while pos < len(data):
            entry_nodeid = F.fuse_entry_out.unpack_from(data, pos)[0]
            _ino, _off, namelen, _typ = F.fuse_dirent.unpack_from(data,
                                                                  pos + F.fuse_entry_out.size)
            start = pos + F.FUSE_NAME_OFFSET_DIRENTPLUS
            out.append((entry_nodeid, data[start:start + namelen]))
            pos += F.fuse_rec_align(F.FUSE_NAME_OFFSET_DIRENTPLUS + namelen)
        return out

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = 4096,
                plus: bool = False) -> list[tuple[int, int, int, bytes]]:
        op = Op.FUSE_READDIRPLUS if plus else Op.FUSE_READDIR
        data = self.ok(op, nodeid, F.fuse_read_in.pack(fh, offset, size, 0, 0, 0, 0),
                       reply_size=F.fuse_out_header.size + size)
        out = []
        pos = 0
        skip = F.fuse_entry_out.size if plus else 0
        while pos < len(data):
            ino, off, namelen, typ = F.fuse_dirent.unpack_from(data, pos + skip)
            start = pos + skip + F.fuse_dirent.size
            out.append((ino, off, typ, data[start:start + namelen]))
            pos += F.fuse_rec_align(skip + F.fuse_dirent.size + namelen)
        return out


_u32 = struct.Struct("<I")
