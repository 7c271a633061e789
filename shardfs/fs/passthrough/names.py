"""Namespace ops: LOOKUP, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK.

Every name passes :func:`check_name` and is resolved as one component under
its parent's O_PATH fd; nothing here follows a host symlink.  Ops that make
a new inode (MKNOD, MKDIR, SYMLINK; CREATE and TMPFILE live in ``files``)
run under the caller's fsuid/fsgid, apply the guest's umask (see
``core._creation_umask``), label the inode with the guest's security
context when one came (and remove it again if that fails), check the node
budget *before* touching the host, and answer an :class:`Entry` that counts
one lookup.  LINK runs under the caller's ids too, so the host's
``protected_hardlinks`` rule judges the caller.
"""

from __future__ import annotations

import errno
import os

from shardfs.abi.fuse import FUSE_ATTR_SUBMOUNT, FUSE_SUBMOUNTS
from shardfs.fs.api import Context, Entry, FsError, check_name
from shardfs.fs.passthrough import sys as lsys
from shardfs.fs.passthrough.core import MODE_PERM_MASK, S_IFMT_MASK, PassthroughBase
from shardfs.fs.passthrough.creds import caller_creds
from shardfs.fs.passthrough.mounts import is_mount_point
from shardfs.fs.passthrough.nodes import Node

#: A symlink target is at most PATH_MAX bytes including its NUL (linux/limits.h).
PATH_MAX = 4096

#: The mode bits MKNOD forwards: the file type and the permission bits.
MKNOD_MODE_MASK = S_IFMT_MASK | MODE_PERM_MASK

#: dev_t is 64-bit on Linux.
DEV_MAX = (1 << 64) - 1


class NameOps(PassthroughBase):
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        """Resolve ``name`` under ``parent``; +1 lookup on its node (new or not).

        Once FUSE_SUBMOUNTS is negotiated (``announce_submounts``), a
        directory on another mount than ``parent`` carries FUSE_ATTR_SUBMOUNT,
        so the guest mounts it apart with its own st_dev, as with virtiofsd.
        READDIRPLUS entries come from here too.
        """
        dirnode = self._dir(parent)
        check_name(name)
        node, st = self._lookup_node(dirnode, name, known=True)
        entry = self._entry(node, st)
        if (node.is_dir and self._shared.init_flags & FUSE_SUBMOUNTS
                and is_mount_point(dirnode.dev, node.fd, st)):
            entry.attr_flags = FUSE_ATTR_SUBMOUNT
        return entry

    def _created(self, ctx: Context, dirnode: Node, name: bytes, is_dir: bool = False) -> Entry:
        """The entry for a name just made (outside the caller's creds), labelled.

        The labels go on through the new inode's O_PATH fd (its magic link),
        so a FIFO or device is never opened.  If labelling fails, the name
        is removed again and the error raised.
        """
        node, st = self._lookup_node(dirnode, name)
        if ctx.secctx:
            try:
                self._label(self._proc_path(node), ctx.secctx)
            except BaseException:
                self._nodes.forget(node.nodeid, 1)
                (os.rmdir if is_dir else os.unlink)(name, dir_fd=dirnode.fd)
                raise
        return self._entry(node, st)

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        """Make symlink ``name`` -> ``target``; the target is stored, never resolved."""
        dirnode = self._dir(parent)
        check_name(name)
        if b"\0" in target:
            raise FsError(errno.EINVAL)
        if not target:
            raise FsError(errno.ENOENT)  # what symlink(2) says for an empty target
        if len(target) >= PATH_MAX:
            raise FsError(errno.ENAMETOOLONG)
        self._nodes.check_room()
        with caller_creds(ctx):
            os.symlink(target, name, dir_fd=dirnode.fd)
        return self._created(ctx, dirnode, name)

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int,
              umask: int) -> Entry:
        """mknodat(2) of a regular file, FIFO, socket or device (the kernel decides).

        A non-root caller has no CAP_MKNOD under its fsuid, so only guest
        root makes device nodes.
        """
        dirnode = self._dir(parent)
        check_name(name)
        if not 0 <= rdev <= DEV_MAX:
            raise FsError(errno.EINVAL)
        self._nodes.check_room()
        with self._creation_umask(umask) as mask, caller_creds(ctx):
            os.mknod(name, mode & MKNOD_MODE_MASK & ~mask, rdev, dir_fd=dirnode.fd)
        return self._created(ctx, dirnode, name)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        dirnode = self._dir(parent)
        check_name(name)
        self._nodes.check_room()
        with self._creation_umask(umask) as mask, caller_creds(ctx):
            os.mkdir(name, mode & MODE_PERM_MASK & ~mask, dir_fd=dirnode.fd)
        return self._created(ctx, dirnode, name, is_dir=True)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        """unlinkat(2); a node the guest still holds keeps its inode alive."""
        dirnode = self._dir(parent)
        check_name(name)
        os.unlink(name, dir_fd=dirnode.fd)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        dirnode = self._dir(parent)
        check_name(name)
        os.rmdir(name, dir_fd=dirnode.fd)

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        """renameat2(2) with RENAME_NOREPLACE/EXCHANGE/WHITEOUT; other flags EINVAL."""
        olddir = self._dir(parent)
        newdir = self._dir(newparent)
        check_name(name)
        check_name(newname)
        if flags & ~lsys.RENAME_FLAGS:
            raise FsError(errno.EINVAL)
        if flags:
            lsys.renameat2(olddir.fd, name, newdir.fd, newname, flags)
        else:
            os.rename(name, newname, src_dir_fd=olddir.fd, dst_dir_fd=newdir.fd)

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        """Hard-link the node as ``newname``: +1 lookup on the same nodeid.

        linkat(AT_SYMLINK_FOLLOW) of the node's /proc magic link links the
        inode itself (a symlink node gets a second name for the symlink;
        nothing is followed) without needing CAP_DAC_READ_SEARCH as
        AT_EMPTY_PATH would.
        """
        node = self._node(nodeid)
        dirnode = self._dir(newparent)
        check_name(newname)
        if node.is_dir:
            raise FsError(errno.EPERM)
        with caller_creds(ctx):
            os.link(str(node.fd), newname, src_dir_fd=self._proc_fd, dst_dir_fd=dirnode.fd,
                    follow_symlinks=True)
        st = os.stat(node.fd)
        return self._entry(self._nodes.bump(nodeid), st)
