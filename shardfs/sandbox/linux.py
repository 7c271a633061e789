"""Thin ctypes wrappers for the Linux calls the sandbox needs and :mod:`os` lacks.

Each wrapper is one syscall: arguments go straight through and a failure
raises ``OSError(errno)`` as :mod:`os` does.  Constants carry the names of
``<sched.h>``, ``<sys/mount.h>``, ``<linux/mount.h>``, ``<linux/prctl.h>``
and ``<linux/capability.h>``; syscall numbers are x86-64's (the only
architecture shardfs runs on, as its ABI tests check).
"""

from __future__ import annotations

import ctypes
import os

from shardfs.abi import capability

_libc = ctypes.CDLL(None, use_errno=True)

# <sched.h> clone flags, for unshare(2)
CLONE_NEWNS = 0x0002_0000
CLONE_NEWUTS = 0x0400_0000
CLONE_NEWIPC = 0x0800_0000
CLONE_NEWUSER = 0x1000_0000
CLONE_NEWNET = 0x4000_0000

# <sys/mount.h> mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
# umount2(2)
MNT_DETACH = 2

# <linux/mount.h>: open_tree(2) and move_mount(2), Linux 5.2
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4

# <linux/prctl.h>
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# x86-64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl)
SYS_pivot_root = 155
SYS_open_tree = 428
SYS_move_mount = 429

_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


_libc.capget.argtypes = [ctypes.POINTER(capability.cap_user_header),
                         ctypes.POINTER(capability.cap_user_data)]
_libc.capset.argtypes = [ctypes.POINTER(capability.cap_user_header),
                         ctypes.POINTER(capability.cap_user_data)]


def _check(ret: int) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags))


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)))


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(_b(target), flags))


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(SYS_pivot_root, _b(new_root), _b(put_old)))


def open_tree(dirfd: int, path: str, flags: int) -> int:
    """A detached copy of the mount at ``path`` (OPEN_TREE_CLONE); the caller owns the fd."""
    return _check(_libc.syscall(SYS_open_tree, ctypes.c_int(dirfd), _b(path),
                                ctypes.c_uint(flags)))


def move_mount(from_fd: int, from_path: str, to_fd: int, to_path: str, flags: int) -> None:
    _check(_libc.syscall(SYS_move_mount, ctypes.c_int(from_fd), _b(from_path),
                         ctypes.c_int(to_fd), _b(to_path), ctypes.c_uint(flags)))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5))


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of this thread, as 64-bit masks."""
    hdr = capability.header_v3()
    data = capability.cap_user_data_v3()
    _check(_libc.capget(ctypes.byref(hdr), data))
    return (data[0].effective | data[1].effective << 32,
            data[0].permitted | data[1].permitted << 32,
            data[0].inheritable | data[1].inheritable << 32)


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's three capability sets (each a 64-bit mask)."""
    hdr = capability.header_v3()
    data = capability.cap_user_data_v3()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFF_FFFF
        data[i].permitted = (permitted >> shift) & 0xFFFF_FFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFF_FFFF
    _check(_libc.capset(ctypes.byref(hdr), data))
