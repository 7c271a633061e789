"""Thin ctypes wrappers for the Linux calls Python's :mod:`os` lacks.

Each wrapper is one syscall: arguments go straight through, and a failure
raises ``OSError(errno)`` as :mod:`os` does, so callers treat both alike
(the FileSystem contract maps an ``OSError`` to ``-errno`` for the guest).

Nothing here knows about FUSE or nodes.  Constants carry the names of
``<linux/fcntl.h>``, ``<linux/stat.h>``, ``<linux/openat2.h>`` and
``<linux/fs.h>``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable, Iterator
from typing import NamedTuple

from shardfs.abi import capability
from shardfs.abi.fuse import FUSE_NAME_OFFSET, fuse_dirent
from shardfs.fs.api import DirEntry

_libc = ctypes.CDLL(None, use_errno=True)

# <linux/fcntl.h>
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EACCESS = 0x200
AT_EMPTY_PATH = 0x1000

# renameat2(2) flags, <linux/fs.h>
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2
RENAME_FLAGS = RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT

# utimensat(2) special nanosecond values, <linux/stat.h>
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

# openat2(2), <linux/openat2.h>; the syscall number is the same on every arch.
SYS_openat2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

#: ``(uid_t)-1``/``(gid_t)-1``: "leave unchanged" for fchownat, "query" for setfsuid.
ID_UNCHANGED = 0xFFFF_FFFF

#: ``struct linux_dirent64`` header: d_ino u64, d_off s64, d_reclen u16, d_type u8.
_DIRENT64 = struct.Struct("=QqHB")


class Timespec(ctypes.Structure):
    """``struct timespec`` (time_t and long are both 64-bit on Linux LP64)."""

    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_long)]


class Caps(NamedTuple):
    """A thread's capability sets as 64-bit masks (bit n = capability n)."""

    effective: int
    permitted: int
    inheritable: int


class OpenHow(ctypes.Structure):
    """``struct open_how`` for openat2(2)."""

    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def _fn(name: str, restype: type, *argtypes: type) -> Callable[..., int]:
    """The libc function ``name`` with its C signature declared."""
    f = getattr(_libc, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


_c_int, _c_uint, _c_char_p = ctypes.c_int, ctypes.c_uint, ctypes.c_char_p
_renameat2 = _fn("renameat2", _c_int, _c_int, _c_char_p, _c_int, _c_char_p, _c_uint)
_utimensat = _fn("utimensat", _c_int, _c_int, _c_char_p, ctypes.POINTER(Timespec), _c_int)
_fchownat = _fn("fchownat", _c_int, _c_int, _c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                _c_int)
_fallocate = _fn("fallocate", _c_int, _c_int, _c_int, ctypes.c_int64, ctypes.c_int64)
_syncfs = _fn("syncfs", _c_int, _c_int)
_setfsuid = _fn("setfsuid", _c_int, ctypes.c_uint32)
_setfsgid = _fn("setfsgid", _c_int, ctypes.c_uint32)
_getdents64 = _fn("getdents64", ctypes.c_ssize_t, _c_int, ctypes.c_void_p, ctypes.c_size_t)
_faccessat = _fn("faccessat", _c_int, _c_int, _c_char_p, _c_int, _c_int)
_capget = _fn("capget", _c_int, ctypes.c_void_p, ctypes.c_void_p)
_capset = _fn("capset", _c_int, ctypes.c_void_p, ctypes.c_void_p)
_statx = _fn("statx", _c_int, _c_int, _c_char_p, _c_int, _c_uint, ctypes.c_void_p)
_preadv = _fn("preadv", ctypes.c_ssize_t, _c_int, _c_char_p, _c_int, ctypes.c_int64)
_pwritev = _fn("pwritev", ctypes.c_ssize_t, _c_int, _c_char_p, _c_int, ctypes.c_int64)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def preadv_iov(fd: int, iov: bytes, count: int, offset: int) -> int:
    """preadv(2) into ``count`` ready ``struct iovec`` entries (at most IOV_MAX)."""
    return _retry(_preadv, fd, iov, count, offset)


def pwritev_iov(fd: int, iov: bytes, count: int, offset: int) -> int:
    """pwritev(2) from ``count`` ready ``struct iovec`` entries (at most IOV_MAX)."""
    return _retry(_pwritev, fd, iov, count, offset)


def _retry(fn: Callable[..., int], *args: object) -> int:
    """``fn(*args)``, again after EINTR, as :mod:`os` does (PEP 475)."""
    while True:
        n = fn(*args)
        if n >= 0:
            return int(n)
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> None:
    """renameat2(2): RENAME_NOREPLACE/EXCHANGE/WHITEOUT; never follows a symlink."""
    _check(_renameat2(olddirfd, old, newdirfd, new, flags))


def utimensat(fd: int, path: bytes, times: tuple[tuple[int, int], tuple[int, int]],
              flags: int) -> None:
    """utimensat(2); ``times`` is ((atime_s, atime_ns), (mtime_s, mtime_ns)).

    A nanosecond field of UTIME_NOW or UTIME_OMIT takes its special meaning.
    With ``path=b""`` and AT_EMPTY_PATH it works on an O_PATH fd (Linux 5.8+)
    and sets the times of the inode itself, even a symlink.
    """
    ts = (Timespec * 2)(Timespec(*times[0]), Timespec(*times[1]))
    _check(_utimensat(fd, path, ts, flags))


# statx(2), <linux/stat.h> and <linux/fcntl.h>
STATX_BASIC_STATS = 0x7FF
STATX_BTIME = 0x800
AT_STATX_SYNC_TYPE = 0x6000  # AT_STATX_FORCE_SYNC | AT_STATX_DONT_SYNC
#: stx_attributes: the inode is the root of a mount (Linux 5.8).
STATX_ATTR_MOUNT_ROOT = 0x2000
#: Indices of stx_attributes and stx_attributes_mask in STATX_FIELDS.
STATX_ATTRIBUTES, STATX_ATTRIBUTES_MASK = 2, 11
#: struct statx up to stx_dev_minor (what fuse_statx carries; the rest is newer
#: fields and spare): mask, blksize, attributes, nlink, uid, gid, mode,
#: spare, ino, size, blocks, attributes_mask, four statx_timestamps (atime,
#: btime, ctime, mtime), rdev_major, rdev_minor, dev_major, dev_minor.
STATX_FIELDS = struct.Struct("<IIQIIIHHQQQQ" + "qIi" * 4 + "IIII")
_STATX_SIZE = 256


def statx(fd: int, path: bytes, flags: int, mask: int) -> tuple[int, ...]:
    """statx(2), unpacked by :data:`STATX_FIELDS` (the reserved words included)."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    _check(_statx(fd, path, flags, mask, buf))
    return STATX_FIELDS.unpack_from(buf)


def fchownat(fd: int, path: bytes, uid: int, gid: int, flags: int) -> None:
    """fchownat(2); ID_UNCHANGED (``-1``) leaves that id alone."""
    _check(_fchownat(fd, path, uid & ID_UNCHANGED, gid & ID_UNCHANGED, flags))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with the FALLOC_FL_* ``mode`` passed through unchanged."""
    _check(_fallocate(fd, ctypes.c_int(mode).value, offset, length))


def syncfs(fd: int) -> None:
    """syncfs(2): the fd must be a real open file, not O_PATH."""
    _check(_syncfs(fd))


def setfsuid(uid: int) -> int:
    """setfsuid(2) for the calling thread only; returns the previous fsuid.

    The syscall reports no error: check with ``setfsuid(ID_UNCHANGED)``,
    which changes nothing and returns the current value.
    """
    return int(_setfsuid(uid & ID_UNCHANGED)) & ID_UNCHANGED


def setfsgid(gid: int) -> int:
    """setfsgid(2) for the calling thread only; returns the previous fsgid."""
    return int(_setfsgid(gid & ID_UNCHANGED)) & ID_UNCHANGED


def capget() -> Caps:
    """capget(2) of the calling thread (version 3: 64 capability bits)."""
    hdr = capability.header_v3()
    data = capability.cap_user_data_v3()
    _check(_capget(ctypes.byref(hdr), data))
    return Caps(*(getattr(data[0], f) | getattr(data[1], f) << 32
                  for f in ("effective", "permitted", "inheritable")))


class PreparedCaps:
    """Capability sets packed once for capset(2), so applying them is one call."""

    __slots__ = ("caps", "_hdr", "_data")

    def __init__(self, caps: Caps) -> None:
        self.caps = caps
        self._hdr = capability.header_v3()
        self._data = capability.cap_user_data_v3()
        for i in range(2):
            self._data[i].effective = (caps.effective >> (32 * i)) & 0xFFFF_FFFF
            self._data[i].permitted = (caps.permitted >> (32 * i)) & 0xFFFF_FFFF
            self._data[i].inheritable = (caps.inheritable >> (32 * i)) & 0xFFFF_FFFF

    def apply(self) -> None:
        """capset(2) for the calling thread; EPERM if a set is not allowed."""
        self._hdr.version = capability._LINUX_CAPABILITY_VERSION_3
        _check(_capset(ctypes.byref(self._hdr), self._data))


def faccessat(fd: int, path: bytes, mode: int, flags: int) -> None:
    """faccessat2(2) (glibc routes flags to it); raises on denial."""
    _check(_faccessat(fd, path, mode, flags))


def openat2(dirfd: int, path: bytes, flags: int, mode: int, resolve: int) -> int:
    """openat2(2): open ``path`` under ``dirfd`` with RESOLVE_* restrictions.

    Returns a new fd that the caller owns.  Unlike openat, unknown flag bits
    and a mode without O_CREAT/O_TMPFILE are EINVAL.
    """
    how = OpenHow(flags, mode, resolve)
    ret = _syscall(ctypes.c_long(SYS_openat2), ctypes.c_long(dirfd), ctypes.c_char_p(path),
                   ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    return _check(int(ret))


def getdents64(fd: int, buf: bytearray) -> int:
    """getdents64(2) into ``buf``; returns the bytes filled (0 at the end)."""
    cbuf = (ctypes.c_char * len(buf)).from_buffer(buf)
    return _check(int(_getdents64(fd, ctypes.addressof(cbuf), len(buf))))


def parse_dirents(buf: bytes | bytearray, length: int) -> Iterator[DirEntry]:
    """Parse the first ``length`` bytes getdents64 filled in ``buf``, lazily.

    Records come from the kernel, but lengths are still checked so that a
    short or corrupt record ends the walk instead of looping or overrunning.
    ``d_off`` is the cookie that resumes after the record: DirEntry.offset.
    """
    pos = 0
    hdr = _DIRENT64.size
    length = min(length, len(buf))
    unpack, find, new = _DIRENT64.unpack_from, buf.find, tuple.__new__
    while pos + hdr <= length:
        ino, off, reclen, dtype = unpack(buf, pos)
        if reclen < hdr or pos + reclen > length:
            return
        end = find(b"\0", pos + hdr, pos + reclen)
        if end < 0:
            end = pos + reclen
        # DirEntry(...) without its Python-level __new__ (see DirEntry).
        yield new(DirEntry, (ino, off, dtype, bytes(buf[pos + hdr:end])))
        pos += reclen


def pack_fuse_dirents(buf: bytes | bytearray, length: int, out: bytearray,
                      at: int) -> tuple[int, bool]:
    """Copy the getdents64 records in ``buf[:length]`` into ``out`` from ``at``
    as ``struct fuse_dirent`` records, each padded to 8 bytes.

    Returns ``(at, full)``: the end of what was written, and whether a record
    did not fit (the caller stops there; it resumes at the last cookie
    written).  The padding is left as ``out`` has it, so ``out`` should be
    zeroed.  A short or corrupt record ends the walk of this buffer, as in
    :func:`parse_dirents`, whose records (``ino, off, type, name``) this packs
    exactly as the dispatcher packs them: one loop instead of two generators,
    a tuple and a copy of the name per record (plain READDIR, in a guest's
    listings, is the bulk of a directory's traffic).
    """
    pos = 0
    hdr = _DIRENT64.size
    size = len(out)
    length = min(length, len(buf))
    unpack, find, pack = _DIRENT64.unpack_from, buf.find, fuse_dirent.pack_into
    while pos + hdr <= length:
        ino, off, reclen, dtype = unpack(buf, pos)
        if reclen < hdr or pos + reclen > length:
            break
        start = pos + hdr
        end = find(b"\0", start, pos + reclen)
        if end < 0:
            end = pos + reclen
        n = end - start
        rec = (FUSE_NAME_OFFSET + n + 7) & ~7  # fuse_rec_align
        if at + rec > size:
            return at, True
        pack(out, at, ino, off, n, dtype)
        name_at = at + FUSE_NAME_OFFSET
        out[name_at:name_at + n] = buf[start:end]
        at += rec
        pos += reclen
    return at, False
