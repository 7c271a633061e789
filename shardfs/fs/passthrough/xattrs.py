"""Extended attributes: GETXATTR, LISTXATTR, SETXATTR, REMOVEXATTR.

Python's xattr calls take a path or an fd, never a dir_fd, and an O_PATH fd
is refused by f*xattr, so every node is reached through its
``/proc/self/fd/N`` magic link with the following variant of the call.  The
magic link jumps to the inode the O_PATH fd holds and the walk ends there:
for a symlink node that is the symlink itself, whose target is never
followed (the contract tests plant one pointing outside and check).  No
file is opened, so FIFOs and devices are safe too.

The procfs path means /proc must be mounted wherever the daemon runs.

Sizes follow getxattr(2)/listxattr(2): ``size`` 0 asks for the length, a
buffer too small is ERANGE, values are capped at XATTR_SIZE_MAX (E2BIG
beyond), names at XATTR_NAME_MAX (ERANGE beyond, or when empty).

With ``xattr=False`` every op answers ENOSYS, which makes the guest kernel
stop asking (it remembers the op as unimplemented).
"""

from __future__ import annotations

import errno
import os

from shardfs.fs.api import Context, FsError
from shardfs.fs.passthrough.core import PassthroughBase

#: Largest value (linux/limits.h XATTR_SIZE_MAX).
XATTR_SIZE_MAX = 65536
#: Largest name list (linux/limits.h XATTR_LIST_MAX).
XATTR_LIST_MAX = 65536
#: Longest name (linux/limits.h XATTR_NAME_MAX).
XATTR_NAME_MAX = 255
#: The setxattr flags a guest may pass.
XATTR_FLAGS = os.XATTR_CREATE | os.XATTR_REPLACE


def _check_name(name: bytes) -> bytes:
    if not name or len(name) > XATTR_NAME_MAX:
        raise FsError(errno.ERANGE)
    if b"\0" in name:
        raise FsError(errno.EINVAL)
    return name


def _sized(data: bytes, size: int, limit: int) -> bytes | int:
    """The getxattr/listxattr answer for a guest buffer of ``size`` bytes."""
    if size < 0:
        raise FsError(errno.EINVAL)
    if size == 0:
        return len(data)
    if len(data) > min(size, limit):
        raise FsError(errno.ERANGE)
    return data


class XattrOps(PassthroughBase):
    def _xattr_path(self, nodeid: int) -> str:
        if not self._xattr:
            raise FsError(errno.ENOSYS)
        return self._proc_path(self._node(nodeid))

    def getxattr(self, ctx: Context, nodeid: int, name: bytes, size: int) -> bytes | int:
        path = self._xattr_path(nodeid)
        value = os.getxattr(path, _check_name(name))
        return _sized(value, size, XATTR_SIZE_MAX)

    def listxattr(self, ctx: Context, nodeid: int, size: int) -> bytes | int:
        path = self._xattr_path(nodeid)
        names = b"".join(os.fsencode(n) + b"\0" for n in os.listxattr(path))
        return _sized(names, size, XATTR_LIST_MAX)

    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes,
                 flags: int) -> None:
        path = self._xattr_path(nodeid)
        _check_name(name)
        if flags & ~XATTR_FLAGS:
            raise FsError(errno.EINVAL)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        os.setxattr(path, name, value, flags)

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        path = self._xattr_path(nodeid)
        os.removexattr(path, _check_name(name))
