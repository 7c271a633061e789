"""The frontend's side of the DAX window, for tests and benchmarks.

It plays what alioth's VMM does with a vhost-user-fs backend's SHMEM
requests (its ``DaxRegion`` map and unmap):

* :class:`DaxWindow` reserves the window at start as one anonymous
  PROT_NONE mapping; SHMEM_MAP becomes ``mmap(MAP_SHARED | MAP_FIXED)`` of
  the received fd at window + offset, SHMEM_UNMAP a PROT_NONE anonymous
  ``MAP_FIXED`` mapping over the range.  Unlike alioth it checks every
  request first (shmid, offset + length inside the window, page alignment,
  flags): a backend bug must fail a test, not scribble over the test
  process.  ``policy="exact"`` behaves like QEMU master's generic device
  instead: a map may not overlap a mapping and an unmap must name one
  exactly.
* :class:`BackendServer` serves the backend channel (the socketpair end we
  keep after SET_BACKEND_REQ_FD) on a thread, answering the u64 status the
  backend asks for with NEED_REPLY, and records every request so a test can
  wait for one without sleeping (:meth:`BackendServer.wait_for`).
* :class:`DaxFrontend` is a :class:`~shardfs.testing.frontend.Frontend`
  that negotiates SHMEM (+ BACKEND_REQ, BACKEND_SEND_FD), reads the window
  size with GET_SHMEM_CONFIG and sets all of the above up.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from shardfs.abi import fuse as F
from shardfs.abi import vhost_user as vu
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.abi.vhost_user import BackendReq
from shardfs.abi.vhost_user import FrontendReq as R
from shardfs.abi.vhost_user import ProtocolFeature as PF
from shardfs.abi.virtio import VIRTIO_FS_SHMCAP_ID_CACHE
from shardfs.codec.backend_channel import (
    ShmemRequest,
    decode_request,
    decode_shmem_config,
    encode_reply,
)
from shardfs.proc.dax import DaxTable, Mapping
from shardfs.testing.frontend import DEFAULT_TIMEOUT_S, Frontend, FrontendError, FuseClient
from shardfs.virtq.dirtylog import MAP_FAILED, libc_mmap, libc_munmap

# <sys/mman.h> on Linux x86-64 (Python's mmap module names neither).
PROT_NONE = 0
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000

PAGE = mmap.PAGESIZE
#: Protection strings /proc/self/maps shows for a reserved (PROT_NONE) range.
RESERVED = "---p"


def _check_mmap(addr: int | None) -> int:
    if addr is None or addr == MAP_FAILED:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return addr


class DaxWindow:
    """A PROT_NONE reservation that SHMEM requests map files into (see module doc)."""

    def __init__(self, size: int, policy: str = "replace") -> None:
        if policy not in ("replace", "exact"):
            raise ValueError(f"policy {policy!r}")
        self.size = size
        self.policy = policy
        self.addr = _check_mmap(libc_mmap(None, size, PROT_NONE,
                                      mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                                      -1, 0))
        #: What this frontend believes is mapped (the backend's table should agree).
        self.table = DaxTable()

    def _range_ok(self, offset: int, length: int) -> bool:
        return (0 < length and 0 <= offset and offset + length <= self.size
                and offset % PAGE == 0 and length % PAGE == 0)

    def map(self, fd: int, fd_offset: int, offset: int, length: int, writable: bool) -> int:
        """SHMEM_MAP: 0, or an errno (nothing changed)."""
        if not self._range_ok(offset, length) or fd_offset % PAGE:
            return errno.EINVAL
        if self.policy == "exact" and self.table.overlapping(offset, offset + length):
            return errno.EEXIST
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        got = libc_mmap(self.addr + offset, length, prot, mmap.MAP_SHARED | MAP_FIXED, fd,
                    fd_offset)
        if got is None or got == MAP_FAILED:
            err = ctypes.get_errno()
            self._reserve(offset, length)  # a failed MAP_FIXED may leave a hole
            self.table.cut(offset, offset + length)
            return err or errno.EIO
        self.table.insert(Mapping(offset, length, fd_offset, 0, 0, writable))
        return 0

    def unmap(self, offset: int, length: int) -> int:
        """SHMEM_UNMAP: back to PROT_NONE; 0 or an errno."""
        if not self._range_ok(offset, length):
            return errno.EINVAL
        if self.policy == "exact" and [(m.moffset, m.length) for m in
                                       self.table.overlapping(offset, offset + length)] != [
                (offset, length)]:
            return errno.ENOENT
        self._reserve(offset, length)
        self.table.cut(offset, offset + length)
        return 0

    def _reserve(self, offset: int, length: int) -> None:
        _check_mmap(libc_mmap(self.addr + offset, length, PROT_NONE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
                          -1, 0))

    def read(self, offset: int, n: int) -> bytes:
        """Bytes through the window; the range must be mapped (else SIGSEGV)."""
        if not (0 <= offset and offset + n <= self.size):
            raise ValueError("outside the window")
        return ctypes.string_at(self.addr + offset, n)

    def write(self, offset: int, data: bytes) -> None:
        if not (0 <= offset and offset + len(data) <= self.size):
            raise ValueError("outside the window")
        ctypes.memmove(self.addr + offset, data, len(data))

    def view(self) -> memoryview:
        """The whole window as bytes (touching an unmapped page faults)."""
        return memoryview((ctypes.c_char * self.size).from_address(self.addr)).cast("B")

    def protections(self, offset: int, length: int) -> list[str]:
        """The /proc/self/maps permissions of every mapping in [offset, offset+length)."""
        lo, hi = self.addr + offset, self.addr + offset + length
        out = []
        with open("/proc/self/maps") as f:
            for line in f:
                span, perms = line.split()[:2]
                a, b = (int(x, 16) for x in span.split("-"))
                if a < hi and b > lo:
                    out.append(perms)
        return out

    def is_reserved(self, offset: int, length: int) -> bool:
        """Whether the whole range is PROT_NONE again (nothing mapped there)."""
        return set(self.protections(offset, length)) == {RESERVED}

    def close(self) -> None:
        if self.addr:
            libc_munmap(self.addr, self.size)
            self.addr = 0


@dataclass(frozen=True)
class Event:
    """One request the backend sent, and the status we answered."""

    req: ShmemRequest
    status: int
    had_fd: bool


class BackendServer:
    """Serves the backend request channel on a thread (see the module doc)."""

    def __init__(self, sock: socket.socket, window: DaxWindow) -> None:
        self.sock = sock
        self.window = window
        self.events: list[Event] = []
        self.cond = threading.Condition()
        #: Answer this many upcoming requests with a failure, without acting.
        self.fail_next = 0
        self.thread = threading.Thread(target=self._run, name="backend-channel", daemon=True)
        self.thread.start()

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _run(self) -> None:
        while True:
            fds: list[int] = []
            try:
                data, fds, _flags, _ = socket.recv_fds(self.sock, vu.vhost_user_header.size,
                                                       vu.VHOST_USER_MAX_FDS)
                if not data:
                    break
                header = data + self._recv_exact(vu.vhost_user_header.size - len(data))
                size = vu.vhost_user_header.unpack(header)[2]
                req = decode_request(header, self._recv_exact(size))
                status = self._apply(req, fds)
                for fd in fds:  # the mapping holds its own reference
                    os.close(fd)
                fds = []
                if req.need_reply:
                    self.sock.sendall(encode_reply(req.request, status))
            except (OSError, EOFError):
                break
            finally:
                for fd in fds:
                    os.close(fd)
        with self.cond:
            self.cond.notify_all()

    def _apply(self, req: ShmemRequest, fds: list[int]) -> int:
        if self.fail_next:
            self.fail_next -= 1
            status = errno.EIO
        elif req.shmid != VIRTIO_FS_SHMCAP_ID_CACHE:
            status = errno.EINVAL
        elif req.request == BackendReq.SHMEM_MAP:
            status = (self.window.map(fds[0], req.fd_offset, req.shm_offset, req.length,
                                      req.writable)
                      if len(fds) == 1 and req.flags & ~vu.VHOST_USER_FLAG_MAP_RW == 0
                      else errno.EINVAL)
        else:
            status = self.window.unmap(req.shm_offset, req.length)
        with self.cond:
            self.events.append(Event(req, status, bool(fds)))
            self.cond.notify_all()
        return status

    def wait_for(self, pred: Callable[[list[Event]], bool],
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Block until ``pred(events)`` holds (checked at every new request)."""
        with self.cond:
            if not self.cond.wait_for(lambda: pred(self.events), timeout_s):
                seen = [(e.req.request.name, e.req.shm_offset, e.status) for e in self.events]
                raise FrontendError(f"backend channel: condition not met; events {seen}")

    def count(self, request: BackendReq) -> int:
        with self.cond:
            return sum(1 for e in self.events if e.req.request == request)

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(DEFAULT_TIMEOUT_S)
        self.sock.close()


class DaxFrontend(Frontend):
    """A Frontend that accepts SHMEM and serves a DAX window (see the module doc)."""

    def __init__(self, socket_path: str, *, shmem_bit: int = PF.SHMEM,
                 policy: str = "replace", **kw: object) -> None:
        super().__init__(socket_path, **kw)  # type: ignore[arg-type]
        self.shmem_bit = shmem_bit
        self.policy = policy
        self.extra_protocol_features = (1 << PF.BACKEND_REQ | 1 << PF.BACKEND_SEND_FD
                                        | 1 << shmem_bit)
        self.window: DaxWindow | None = None
        self.server: BackendServer | None = None

    def start(self, queues: int | None = None) -> DaxFrontend:
        super().start(queues)
        self.setup_dax()
        return self

    def shmem_config(self) -> list[int]:
        self.send(R.GET_SHMEM_CONFIG)
        return decode_shmem_config(self.recv_reply(R.GET_SHMEM_CONFIG))

    def setup_dax(self) -> None:
        """GET_SHMEM_CONFIG, reserve the window, SET_BACKEND_REQ_FD, start serving."""
        if not self.protocol_features >> self.shmem_bit & 1:
            raise FrontendError("the backend does not offer SHMEM")
        size = self.shmem_config()[VIRTIO_FS_SHMCAP_ID_CACHE]
        self.window = DaxWindow(size, self.policy)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.ack(R.SET_BACKEND_REQ_FD, b"", [theirs.fileno()]):
                raise FrontendError("SET_BACKEND_REQ_FD refused")
        finally:
            theirs.close()
        self.server = BackendServer(ours, self.window)

    @property
    def win(self) -> DaxWindow:
        assert self.window is not None
        return self.window

    @property
    def srv(self) -> BackendServer:
        assert self.server is not None
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        super().close()
        if self.window is not None:
            self.window.close()
            self.window = None


# -- FUSE requests --------------------------------------------------------------------


def setupmapping_args(fh: int, foffset: int, length: int, flags: int, moffset: int) -> bytes:
    return F.fuse_setupmapping_in.pack(fh, foffset, length, flags, moffset)


def removemapping_args(ranges: list[tuple[int, int]], count: int | None = None) -> bytes:
    """REMOVEMAPPING's arguments; ``count`` may lie about the entries (tests)."""
    n = len(ranges) if count is None else count
    return F.fuse_removemapping_in.pack(n) + b"".join(
        F.fuse_removemapping_one.pack(m, ln) for m, ln in ranges)


def setupmapping(c: FuseClient, nodeid: int, fh: int, foffset: int, length: int,
                 moffset: int, writable: bool = False) -> int:
    """SETUPMAPPING through ``c``; the reply's error (0 or -errno)."""
    flags = F.FUSE_SETUPMAPPING_FLAG_READ | (F.FUSE_SETUPMAPPING_FLAG_WRITE if writable else 0)
    return c.call(Op.FUSE_SETUPMAPPING, nodeid,
                  setupmapping_args(fh, foffset, length, flags, moffset)).error


def removemapping(c: FuseClient, ranges: list[tuple[int, int]]) -> int:
    return c.call(Op.FUSE_REMOVEMAPPING, 0, removemapping_args(ranges)).error
