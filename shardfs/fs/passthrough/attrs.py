"""Attribute ops: GETATTR, SETATTR, READLINK, STATFS, ACCESS, SYNCFS.

Everything works from the node's O_PATH fd: fstat, fstatfs, readlinkat and
fchownat/utimensat with AT_EMPTY_PATH act on the inode itself (a symlink
included) and never open it.  What needs a real fd or a path reopens a
regular file through /proc, and refuses the rest.
"""

from __future__ import annotations

import errno
import os
import stat

from shardfs.abi.fuse import (
    FATTR_ATIME,
    FATTR_ATIME_NOW,
    FATTR_FH,
    FATTR_GID,
    FATTR_KILL_SUIDGID,
    FATTR_MODE,
    FATTR_MTIME,
    FATTR_MTIME_NOW,
    FATTR_SIZE,
    FATTR_UID,
)
from shardfs.fs.api import NSEC_PER_SEC, Context, FsError, SetattrIn, Statx
from shardfs.fs.passthrough import sys as lsys
from shardfs.fs.passthrough.core import (
    MODE_PERM_MASK,
    PassthroughBase,
    check_offset,
    kill_suidgid_mode,
)
from shardfs.fs.passthrough.creds import caller_creds
from shardfs.fs.passthrough.nodes import Node

#: time_t is signed 64-bit.
TIME_MIN, TIME_MAX = -(1 << 63), (1 << 63) - 1

#: The ACCESS mask bits (R_OK|W_OK|X_OK; F_OK is 0).
ACCESS_MASK = os.R_OK | os.W_OK | os.X_OK


def _timespec(valid: int, set_bit: int, now_bit: int, time_ns: int) -> tuple[int, int]:
    """One utimensat timespec from the FATTR_* bits (NOW wins, unset is OMIT)."""
    if valid & now_bit:
        return 0, lsys.UTIME_NOW
    if not valid & set_bit:
        return 0, lsys.UTIME_OMIT
    sec, nsec = divmod(time_ns, NSEC_PER_SEC)
    if not TIME_MIN <= sec <= TIME_MAX:
        raise FsError(errno.EINVAL)
    return sec, nsec


class AttrOps(PassthroughBase):
    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[os.stat_result, float]:
        """fstat of the node's O_PATH fd (a handle names the same inode)."""
        # self._nodes.get() is self._node() without its frame: every GETATTR.
        return os.stat(self._nodes.get(nodeid).fd), self._policy.attr_timeout_s

    def statx(self, ctx: Context, nodeid: int, fh: int | None, sx_flags: int,
              sx_mask: int) -> tuple[Statx, float]:
        """statx(2) of the node's O_PATH fd: GETATTR's answer plus the birth time.

        Only the guest's sync flags pass (the path flags are ours: the node
        itself, never a symlink's target), and only fields fuse_statx carries
        are asked for and reported.
        """
        node = self._node(nodeid)
        want = sx_mask & (lsys.STATX_BASIC_STATS | lsys.STATX_BTIME)
        (mask, blksize, attributes, nlink, uid, gid, mode, _spare, ino, size, blocks,
         attributes_mask, a_s, a_ns, _r1, b_s, b_ns, _r2, c_s, c_ns, _r3, m_s, m_ns, _r4,
         rdev_major, rdev_minor, _dev_major, _dev_minor) = lsys.statx(
            node.fd, b"", lsys.AT_EMPTY_PATH | lsys.AT_SYMLINK_NOFOLLOW
            | (sx_flags & lsys.AT_STATX_SYNC_TYPE), want | lsys.STATX_BASIC_STATS)
        mask &= lsys.STATX_BASIC_STATS | lsys.STATX_BTIME
        return Statx(mask, blksize, attributes, nlink, uid, gid, mode, ino, size, blocks,
                     attributes_mask, (a_s, a_ns), (b_s, b_ns), (c_s, c_ns), (m_s, m_ns),
                     rdev_major, rdev_minor), self._policy.attr_timeout_s

    def setattr(self, ctx: Context, nodeid: int, attr: SetattrIn) -> tuple[os.stat_result, float]:
        """Apply the FATTR_* fields in kernel order; return the fresh stat.

        MODE, SIZE and times run under the caller's ids (``creds``), so the
        host kernel's rules are the result: chmod by a non-owner is EPERM
        and drops S_ISGID for a caller outside the file's group, a
        non-root truncate clears setuid/setgid, explicit times need the
        owner.  Two things run as the daemon, because the guest kernel
        sends them on another's behalf: a chmod that only *clears*
        setuid/setgid (the guest's own kill-privilege step after a
        non-owner's write), and chown (the guest kernel has vetted it; the
        host clears setuid/setgid on any chown of a non-directory).

        MODE on a symlink is EOPNOTSUPP (Linux has no lchmod); SIZE of
        anything but a regular file is EISDIR/EINVAL as truncate(2) says.
        With FATTR_FH the handle must be one we issued for this node (EBADF
        otherwise).  KILL_SUIDGID (without MODE) clears setuid/setgid as
        the kernel would for a caller without CAP_FSETID.
        """
        node = self._node(nodeid)
        valid = attr.valid
        hfd = None
        if valid & FATTR_FH:
            h = self._handles.get(attr.fh)
            if h.nodeid != nodeid:
                raise FsError(errno.EBADF)
            hfd = h.fd
        if valid & FATTR_MODE:
            mode = attr.mode & MODE_PERM_MASK
            cur = stat.S_IMODE(os.stat(node.fd).st_mode)
            if mode == cur & ~(stat.S_ISUID | stat.S_ISGID) and mode != cur:
                self._chmod(node, hfd, mode)  # a pure privilege drop
            else:
                with caller_creds(ctx):
                    self._chmod(node, hfd, mode)
        elif valid & FATTR_KILL_SUIDGID and node.is_reg:
            mode = os.stat(node.fd).st_mode
            if kill_suidgid_mode(mode) != mode:
                self._chmod(node, hfd, kill_suidgid_mode(mode) & MODE_PERM_MASK)
        if valid & (FATTR_UID | FATTR_GID):
            uid = attr.uid if valid & FATTR_UID else lsys.ID_UNCHANGED
            gid = attr.gid if valid & FATTR_GID else lsys.ID_UNCHANGED
            lsys.fchownat(node.fd, b"", uid, gid, lsys.AT_EMPTY_PATH | lsys.AT_SYMLINK_NOFOLLOW)
            if node.is_reg:
                self._drop_mapped_capability(self._proc_path(node))
        if valid & FATTR_SIZE:
            size = check_offset(attr.size)
            with caller_creds(ctx):
                self._truncate(node, hfd, size)
            self._drop_mapped_capability(self._proc_path(node))
        if valid & (FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW):
            times = (_timespec(valid, FATTR_ATIME, FATTR_ATIME_NOW, attr.atime_ns),
                     _timespec(valid, FATTR_MTIME, FATTR_MTIME_NOW, attr.mtime_ns))
            with caller_creds(ctx):
                lsys.utimensat(node.fd, b"", times, lsys.AT_EMPTY_PATH)
        return os.stat(node.fd), self._policy.attr_timeout_s

    def _chmod(self, node: Node, hfd: int | None, mode: int) -> None:
        if hfd is not None:
            os.fchmod(hfd, mode)
        elif node.is_symlink:
            raise FsError(errno.EOPNOTSUPP)
        else:
            # chmod through the magic link changes the inode the O_PATH fd
            # holds; it opens nothing, so a FIFO or device is safe here.
            os.chmod(str(node.fd), mode, dir_fd=self._proc_fd)

    def _truncate(self, node: Node, hfd: int | None, size: int) -> None:
        if hfd is not None:
            os.ftruncate(hfd, size)
            return
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if not node.is_reg:
            raise FsError(errno.EINVAL)
        fd = self._reopen(node, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        """readlinkat(fd, "") on the symlink's O_PATH fd; EINVAL if not a symlink.

        Python's buffer bounds the answer to PATH_MAX.
        """
        node = self._node(nodeid)
        if not node.is_symlink:
            raise FsError(errno.EINVAL)
        return os.readlink(b"", dir_fd=node.fd)

    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        """fstatfs works on an O_PATH fd."""
        return os.fstatvfs(self._node(nodeid).fd)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        """faccessat2(AT_EACCESS|AT_EMPTY_PATH) under the caller's fsuid/fsgid.

        So the host kernel judges the caller's ids against the inode's mode
        and ACLs, as it would for that user (strictly: no capability is
        kept, and the only groups are the fsgid; see ``creds``).  virtio-fs
        guests mount with default_permissions and do not send ACCESS.
        """
        node = self._node(nodeid)
        if mask & ~ACCESS_MASK:
            raise FsError(errno.EINVAL)
        with caller_creds(ctx, strict=True):
            lsys.faccessat(node.fd, b"", mask, lsys.AT_EACCESS | lsys.AT_EMPTY_PATH)

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        """syncfs(2) on the filesystem holding the node.

        syncfs needs a real fd, so a directory node is opened as ``.``, a
        regular file read-only through /proc, and for any other node the
        shared directory's root stands in (it is the same filesystem
        unless the node sits on a submount).
        """
        node = self._node(nodeid)
        if node.is_reg:
            fd = self._reopen(node, os.O_RDONLY | os.O_NONBLOCK)
        else:
            target = node if node.is_dir else self._nodes.root
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=target.fd)
        try:
            lsys.syncfs(fd)
        finally:
            os.close(fd)

