"""File handles (name_to_handle_at / open_by_handle_at) and a robust mutex.

These are the two building blocks of the node and handle state that every
worker shares (DESIGN §2):

* A file handle names an inode independently of any process's fds, so a
  worker that never saw a LOOKUP can still open the node the guest names,
  and a node survives the death of the worker that looked it up.
  open_by_handle_at needs CAP_DAC_READ_SEARCH (we run as root), and any fd
  on the same filesystem serves as its ``mount_fd``.
* A process-shared, *robust* pthread mutex guards the shared tables: if a
  worker is killed while holding it, the next locker gets EOWNERDEAD
  instead of a deadlock, marks the mutex consistent and carries on.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from shardfs.fs.passthrough.sys import AT_EMPTY_PATH

_libc = ctypes.CDLL(None, use_errno=True)

#: MAX_HANDLE_SZ from <linux/exportfs.h>.
MAX_HANDLE_SZ = 128
#: What name_to_handle_at answers on a filesystem that makes no handles
#: (EOVERFLOW: one longer than MAX_HANDLE_SZ), as virtiofsd reads them.
NO_HANDLES_ERRNOS = (errno.EOPNOTSUPP, errno.EOVERFLOW)


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_FileHandle),
                               ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_name_to_handle_at.restype = ctypes.c_int
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.POINTER(_FileHandle), ctypes.c_int]
_open_by_handle_at.restype = ctypes.c_int


def name_to_handle(fd: int) -> tuple[int, bytes, int]:
    """The file handle of the inode ``fd`` refers to: (type, bytes, mount_id).

    Raises OSError (EOPNOTSUPP on filesystems without handles).
    """
    fh = _FileHandle()
    fh.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    if _name_to_handle_at(fd, b"", ctypes.byref(fh), ctypes.byref(mount_id),
                          AT_EMPTY_PATH) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes]), mount_id.value


def open_by_handle(mount_fd: int, handle_type: int, handle: bytes, flags: int) -> int:
    """Open the inode a handle names; the caller owns the fd.

    ESTALE when the inode no longer exists.
    """
    if len(handle) > MAX_HANDLE_SZ:
        raise OSError(errno.EINVAL, "file handle too long")
    fh = _FileHandle()
    fh.handle_bytes = len(handle)
    fh.handle_type = handle_type
    ctypes.memmove(fh.f_handle, handle, len(handle))
    fd = _open_by_handle_at(mount_fd, ctypes.byref(fh), flags | os.O_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(fd)


def check_handles(path: str) -> str | None:
    """Why file handles cannot serve the directory ``path``, or None if they can.

    For ``inode_file_handles = mandatory``, checked at start as virtiofsd
    does: the root gets a handle, and the handle opens again (which needs
    CAP_DAC_READ_SEARCH in the host's user namespace).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {path}: {e.strerror}"
    try:
        try:
            htype, handle, _mnt = name_to_handle(fd)
        except OSError as e:
            return f"the filesystem of {path} makes no file handles ({e.strerror})"
        try:
            os.close(open_by_handle(fd, htype, handle, os.O_PATH))
        except OSError as e:
            return f"a file handle of {path} does not open ({e.strerror})"
    finally:
        os.close(fd)
    return None


# -- robust process-shared mutex ---------------------------------------------

PTHREAD_PROCESS_SHARED = 1
PTHREAD_MUTEX_ROBUST = 1
#: sizeof(pthread_mutex_t) on x86-64 glibc, rounded up with room to spare.
MUTEX_BYTES = 64
_MUTEXATTR_BYTES = 16


#: Called through prototypes (argument types fixed once), not as attributes
#: of the library: a lock and an unlock take 1.5 us instead of 2.0, and
#: every LOOKUP, CREATE, FORGET, OPEN and RELEASE takes the lock once or more.
_MUTEX_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
_mutex_lock = _MUTEX_FN(("pthread_mutex_lock", _libc))
_mutex_unlock = _MUTEX_FN(("pthread_mutex_unlock", _libc))


class RobustMutex:
    """A pthread mutex living in shared memory at ``mem[offset:]``.

    ``recovered`` counts the times a holder died and we took the lock over
    (EOWNERDEAD).  Callers keep every shared mutation small and ordered so
    the tables stay usable when that happens.
    """

    def __init__(self, mem: mmap.mmap, offset: int, create: bool) -> None:
        self._mem_ref = ctypes.c_char.from_buffer(mem, offset)
        self._ptr = ctypes.c_void_p(ctypes.addressof(self._mem_ref))
        self.recovered = 0
        if create:
            attr = ctypes.create_string_buffer(_MUTEXATTR_BYTES)
            _check(_libc.pthread_mutexattr_init(attr))
            _check(_libc.pthread_mutexattr_setpshared(attr, PTHREAD_PROCESS_SHARED))
            _check(_libc.pthread_mutexattr_setrobust(attr, PTHREAD_MUTEX_ROBUST))
            _check(_libc.pthread_mutex_init(self._ptr, attr))
            _libc.pthread_mutexattr_destroy(attr)

    def __enter__(self) -> RobustMutex:
        r = _mutex_lock(self._ptr)
        if r:
            if r != errno.EOWNERDEAD:
                raise OSError(r, os.strerror(r))
            _libc.pthread_mutex_consistent(self._ptr)
            self.recovered += 1
        return self

    def __exit__(self, *exc: object) -> None:
        _mutex_unlock(self._ptr)


def _check(r: int) -> None:
    if r:
        raise OSError(r, os.strerror(r))
