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

Names pass through the ``xattrmap`` (:mod:`shardfs.fs.xattrmap`) when one
is configured: guest names are rewritten before they reach the host, host
names are rewritten or hidden in listings.

POSIX ACLs (``system.posix_acl_access``/``_default``) are served only when
FUSE_POSIX_ACL was negotiated, so that the guest enforces what it sets;
otherwise they are hidden from listings, reading one answers ENODATA (no
ACL, what the guest kernel answers from its own ACL cache) and setting or
removing one answers EOPNOTSUPP.  Setting or
removing one runs with the caller's fsuid/fsgid (``creds``): only the owner
may, and the mode update it implies drops S_ISGID for a caller outside the
file's group, as the host kernel decides.  FUSE_SETXATTR_ACL_KILL_SGID
(the guest's verdict, which knows its groups) clears S_ISGID explicitly.

With ``xattr=False`` every op answers ENOSYS, which makes the guest kernel
stop asking (it remembers the op as unimplemented).
"""

from __future__ import annotations

import errno
import os
import stat

from shardfs.abi.fuse import FUSE_SETXATTR_ACL_KILL_SGID
from shardfs.fs.api import Context, FsError
from shardfs.fs.passthrough.core import MODE_PERM_MASK, PassthroughBase
from shardfs.fs.passthrough.creds import caller_creds

#: Largest value (linux/limits.h XATTR_SIZE_MAX).
XATTR_SIZE_MAX = 65536
#: Largest name list (linux/limits.h XATTR_LIST_MAX).
XATTR_LIST_MAX = 65536
#: Longest name (linux/limits.h XATTR_NAME_MAX).
XATTR_NAME_MAX = 255
#: The setxattr flags a guest may pass.
XATTR_FLAGS = os.XATTR_CREATE | os.XATTR_REPLACE
#: The POSIX ACL xattrs (linux/posix_acl_xattr.h).
ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
ACL_NAMES = frozenset({ACL_ACCESS, ACL_DEFAULT})


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

    def _host_xattr_name(self, name: bytes, *, getting: bool = False) -> bytes:
        """Check a guest xattr name and map it to the host's (see the module doc)."""
        _check_name(name)
        if name in ACL_NAMES and not self._acl_on:
            raise FsError(errno.EOPNOTSUPP)
        if self._xattrmap is not None:
            name = _check_name(self._xattrmap.to_host(name, getting=getting))
        return name

    def _guest_xattr_name(self, name: bytes) -> bytes | None:
        """A host name as the guest lists it, or None to hide it."""
        if self._xattrmap is not None:
            mapped = self._xattrmap.to_guest(name)
            if mapped is None:
                return None
            name = mapped
        if name in ACL_NAMES and not self._acl_on:
            return None
        return name

    def getxattr(self, ctx: Context, nodeid: int, name: bytes, size: int) -> bytes | int:
        path = self._xattr_path(nodeid)
        if name in ACL_NAMES and not self._acl_on:
            # "No ACL": what the guest kernel itself answers from its ACL
            # cache.  EOPNOTSUPP here made the answer depend on whether the
            # cache was warm, and coreutils' cp -a fails on that mix.
            _check_name(name)
            raise FsError(errno.ENODATA)
        value = os.getxattr(path, self._host_xattr_name(name, getting=True))
        return _sized(value, size, XATTR_SIZE_MAX)

    def listxattr(self, ctx: Context, nodeid: int, size: int) -> bytes | int:
        path = self._xattr_path(nodeid)
        names = []
        for n in os.listxattr(path):
            guest = self._guest_xattr_name(os.fsencode(n))
            if guest is not None:
                names.append(guest + b"\0")
        return _sized(b"".join(names), size, XATTR_LIST_MAX)

    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes,
                 flags: int, setxattr_flags: int = 0) -> None:
        """setxattr(2); ACLs under the caller's ids, ACL_KILL_SGID honoured."""
        path = self._xattr_path(nodeid)
        host_name = self._host_xattr_name(name)
        if flags & ~XATTR_FLAGS:
            raise FsError(errno.EINVAL)
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG)
        if name not in ACL_NAMES:
            os.setxattr(path, host_name, value, flags)
            return
        if name == ACL_ACCESS and setxattr_flags & FUSE_SETXATTR_ACL_KILL_SGID:
            mode = os.stat(self._node(nodeid).fd).st_mode
            if mode & stat.S_ISGID:
                os.chmod(path, mode & MODE_PERM_MASK & ~stat.S_ISGID)
        with caller_creds(ctx):
            os.setxattr(path, host_name, value, flags)

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        path = self._xattr_path(nodeid)
        host_name = self._host_xattr_name(name)
        if name in ACL_NAMES:
            with caller_creds(ctx):
                os.removexattr(path, host_name)
        else:
            os.removexattr(path, host_name)
