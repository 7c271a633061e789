"""State and helpers shared by the passthrough op groups.

:class:`PassthroughBase` holds the node and handle tables and the rules
every op group relies on:

* A guest name is checked by :func:`check_name`, then resolved as a single
  component from the parent's O_PATH fd with O_NOFOLLOW, through
  ``openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)`` where the kernel has it
  (belt and braces: even a name that slipped past ``check_name`` cannot
  leave the parent).  A host symlink is never followed.
* A node is reopened for I/O through ``/proc/self/fd/N`` (as virtiofsd
  does): that reaches exactly the inode the O_PATH fd holds, with no path
  walk a guest could influence.  Only regular files and directories are
  ever reopened (CVE-2020-35517).
* Guest open flags pass through an allow-list (:data:`HOST_OPEN_FLAGS`).
* A handle is used only with the node it was opened on: a READ, WRITE,
  RELEASE... naming another node is EBADF, as in virtiofsd.

The op groups are mixins on this base; ``fs.PassthroughFs`` combines them
and owns the constructor.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from shardfs.abi.fuse import FUSE_DONT_MASK, FUSE_POSIX_ACL, FUSE_WRITEBACK_CACHE
from shardfs.fs.api import Entry, FileSystem, FsError, SecContext
from shardfs.fs.passthrough import sys as lsys
from shardfs.fs.passthrough.handles import Handle
from shardfs.fs.passthrough.nodes import Node
from shardfs.fs.passthrough.policy import CachePolicy
from shardfs.fs.passthrough.shared import SharedHandleTable, SharedNodeTable, SharedState
from shardfs.fs.xattrmap import XattrMap

#: OPEN of anything but a regular file or directory answers this (DESIGN §4,
#: CVE-2020-35517).  ENXIO is what open(2) itself says for a socket, and a
#: guest kernel never sends OPEN for a FIFO or device (it serves those
#: itself), so only a hostile or confused guest ever sees it.
SPECIAL_OPEN_ERRNO = errno.ENXIO

#: Guest open flags forwarded to the host open; everything else (O_CREAT,
#: O_EXCL, O_NOCTTY, O_PATH, O_TMPFILE, O_ASYNC, O_LARGEFILE, unknown bits)
#: is dropped.  O_NOFOLLOW is dropped too: the node is already resolved and
#: the /proc magic link would make it ELOOP.  O_DIRECT is forwarded only
#: with ``allow_direct_io`` (as virtiofsd): FUSE serves a guest's O_DIRECT
#: I/O at any offset and length, which the host's O_DIRECT would refuse
#: (EINVAL) unless aligned to its block size.  O_NOATIME is forwarded only
#: with ``preserve_noatime`` (as virtiofsd): on the host it needs the file's
#: owner or CAP_FOWNER, which an unprivileged daemon lacks (EPERM).
HOST_OPEN_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC
                   | os.O_NONBLOCK)

#: How a guest name is resolved under its parent when openat2 is available.
RESOLVE_ONE_NAME = lsys.RESOLVE_BENEATH | lsys.RESOLVE_NO_SYMLINKS | lsys.RESOLVE_NO_MAGICLINKS

#: Permission bits (with setuid, setgid, sticky) a guest mode may carry.
MODE_PERM_MASK = (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IRWXU | stat.S_IRWXG
                  | stat.S_IRWXO)

#: The file-type bits of a mode (``stat`` has only the S_IFMT() function).
S_IFMT_MASK = stat.S_IFMT(0xFFFF_FFFF)

#: Largest file offset: loff_t is signed 64-bit.
OFF_MAX = (1 << 63) - 1

#: iovecs one preadv/pwritev takes (UIO_MAXIOV); longer lists are split.
IOV_MAX = os.sysconf("SC_IOV_MAX")

#: Where the reopen magic links live.
PROC_SELF_FD = "/proc/self/fd"


def check_offset(offset: int) -> int:
    """A guest file offset must fit loff_t."""
    if not 0 <= offset <= OFF_MAX:
        raise FsError(errno.EINVAL)
    return offset


def kill_suidgid_mode(mode: int) -> int:
    """The mode without the bits a write or truncate by a non-CAP_FSETID caller kills.

    As ``setattr_should_drop_suidgid``: S_ISUID always; S_ISGID only with
    S_IXGRP (without it the bit marks mandatory locking, not setgid).
    """
    kill = stat.S_ISUID
    if mode & stat.S_IXGRP:
        kill |= stat.S_ISGID
    return mode & ~kill


def total_len(buffers: Sequence[memoryview]) -> int:
    return sum(b.nbytes for b in buffers)


class PassthroughBase(FileSystem):
    """Tables, policy and the resolution helpers (see the module doc)."""

    _nodes: SharedNodeTable
    _handles: SharedHandleTable
    _shared: SharedState
    _policy: CachePolicy
    _xattr: bool
    _writeback: bool
    _allow_direct_io: bool
    #: Guest open flags forwarded to the host (:meth:`open_mask`).
    _open_mask: int
    _xattrmap: XattrMap | None
    #: Where the map puts the guest's security.capability, when it moves it:
    #: the host kernel then no longer drops it on write/truncate/chown, so we do.
    _mapped_capability: bytes | None
    _has_openat2: bool
    #: O_PATH fd on /proc/self/fd, for the reopen magic links.
    _proc_fd: int
    #: What ``/`` was when ``_proc_fd`` was opened, and the magic-link prefix
    #: chosen at the first use (see ``_proc_path``).
    _root_at_open: tuple[int, int]
    _proc_prefix: str | None = None

    @property
    def _writeback_on(self) -> bool:
        """Writeback as negotiated at INIT, which only one worker sees: shared state."""
        return bool(self._shared.init_flags & FUSE_WRITEBACK_CACHE)

    @property
    def _acl_on(self) -> bool:
        """POSIX ACLs negotiated: the guest enforces them and sends modes unmasked."""
        return bool(self._shared.init_flags & FUSE_POSIX_ACL)

    @contextmanager
    def _creation_umask(self, umask: int) -> Iterator[int]:
        """Yield the mask to apply to a new inode's mode; set the umask for the block.

        Without POSIX ACLs the guest's umask is applied here (the daemon
        runs with umask 0), and the block sees it as the mask to use.  With
        them (FUSE_DONT_MASK) the mode arrives unmasked and only the host
        kernel knows whether the parent's default ACL replaces the umask,
        so the process umask is the guest's for the block and the mask
        yielded is 0, as virtiofsd does.
        """
        umask &= MODE_PERM_MASK
        if not self._shared.init_flags & FUSE_DONT_MASK:
            yield umask
            return
        old = os.umask(umask)
        try:
            yield 0
        finally:
            os.umask(old)

    # -- ids ------------------------------------------------------------------

    def _node(self, nodeid: int) -> Node:
        return self._nodes.get(nodeid)

    def _dir(self, nodeid: int) -> Node:
        """A node that must be a directory (a parent in a name op)."""
        node = self._nodes.get(nodeid)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return node

    def _file_handle(self, fh: int, nodeid: int) -> Handle:
        """A handle from OPEN/CREATE on ``nodeid``; EBADF for a directory handle,
        or one opened on another node."""
        h = self._handles.get(fh)
        if h.is_dir or h.nodeid != nodeid:
            raise FsError(errno.EBADF)
        return h

    def _dir_handle(self, fh: int, nodeid: int) -> Handle:
        """A handle from OPENDIR on ``nodeid``; EBADF for a file handle or another node."""
        h = self._handles.get(fh)
        if not h.is_dir or h.nodeid != nodeid:
            raise FsError(errno.EBADF)
        return h

    # -- resolution ---------------------------------------------------------

    def _open_child(self, parent: Node, name: bytes, flags: int, mode: int = 0) -> int:
        """Open the single component ``name`` under ``parent``; caller owns the fd.

        ``name`` must already have passed ``check_name``.  O_NOFOLLOW and
        O_CLOEXEC are always added.
        """
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        if self._has_openat2:
            return lsys.openat2(parent.fd, name, flags, mode, RESOLVE_ONE_NAME)
        return os.open(name, flags, mode, dir_fd=parent.fd)

    def _reopen_fd(self, fd: int, flags: int) -> int:
        """Open the inode an fd holds, through its /proc magic link; caller owns it.

        O_NOFOLLOW is always stripped: it would open (O_PATH) or refuse
        (ELOOP) the magic link instead of the inode behind it.
        """
        return os.open(str(fd), (flags & ~os.O_NOFOLLOW) | os.O_CLOEXEC, dir_fd=self._proc_fd)

    def _reopen(self, node: Node, flags: int) -> int:
        """Open a regular file or directory node for I/O; caller owns the fd."""
        if not (node.is_reg or node.is_dir):
            raise FsError(SPECIAL_OPEN_ERRNO)
        return self._reopen_fd(node.fd, flags)

    def _proc_path(self, node: Node) -> str:
        """The magic-link path of a node, for calls that take no dir_fd (xattrs).

        It resolves to the node's own inode, never further: when the node
        is a symlink, the symlink itself (checked by the contract tests).

        Under a chroot into the share, ``/proc/self/fd/N`` would resolve
        inside the share -- a path the guest can create.  So the first call
        after the root changed moves the working directory onto the
        ``/proc/self/fd`` directory this instance opened before the chroot,
        and every later path is relative to it (virtiofsd does the same).
        The workers are single-threaded and nothing else uses relative
        paths, so the working directory is this method's alone.
        """
        prefix = self._proc_prefix
        if prefix is None:
            prefix = self._proc_prefix = self._choose_proc_prefix()
        return f"{prefix}{node.fd}"

    def _choose_proc_prefix(self) -> str:
        st = os.stat("/")
        if (st.st_dev, st.st_ino) == self._root_at_open:
            return PROC_SELF_FD + "/"
        os.fchdir(self._proc_fd)
        return ""

    def _lookup_node(self, parent: Node, name: bytes,
                     known: bool = False) -> tuple[Node, os.stat_result]:
        """Resolve ``name`` and count one lookup of its node.

        With ``known`` (LOOKUP: the name has most likely been seen before),
        an ``fstatat`` of the single checked component comes first, without
        following a symlink; when its inode is a node this worker already
        holds, no fd is opened at all (``SharedNodeTable.count_cached``).
        Otherwise, and always for a name just created, the name is opened
        O_PATH as below and the inode behind that fd is what counts.
        """
        if known:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
            node = self._nodes.count_cached(st.st_dev, st.st_ino)
            if node is not None:
                return node, st
        fd = self._open_child(parent, name, os.O_PATH)
        try:
            st = os.stat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self._nodes.insert(fd, st), st

    def _entry(self, node: Node, st: os.stat_result) -> Entry:
        return Entry(node.nodeid, node.generation, st, self._policy.entry_timeout_s,
                     self._policy.attr_timeout_s)

    def _label(self, target: int | str, labels: tuple[SecContext, ...]) -> None:
        """Give a new inode its security labels (FUSE_SECURITY_CTX), names mapped.

        ``target`` is the new file's open fd or its node's magic-link path.
        Only ``security.*`` names are labels; anything else is EINVAL.
        """
        for sc in labels:
            if not sc.name.startswith(b"security.") or b"\0" in sc.name:
                raise FsError(errno.EINVAL)
            name = self._xattrmap.to_host(sc.name) if self._xattrmap is not None else sc.name
            os.setxattr(target, name, sc.value)

    def _drop_mapped_capability(self, target: int | str) -> None:
        """Remove the guest's remapped security.capability, as the kernel drops the
        real one on a write, truncate or chown.  ``target`` is an open fd or a
        magic-link path; a missing xattr is fine."""
        if self._mapped_capability is None:
            return
        try:
            os.removexattr(target, self._mapped_capability)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise

    # -- flags --------------------------------------------------------------

    @staticmethod
    def open_mask(allow_direct_io: bool, preserve_noatime: bool) -> int:
        """:data:`HOST_OPEN_FLAGS` plus O_DIRECT and O_NOATIME where the options allow."""
        return (HOST_OPEN_FLAGS | (os.O_DIRECT if allow_direct_io else 0)
                | (os.O_NOATIME if preserve_noatime else 0))

    def _host_open_flags(self, flags: int) -> int:
        """Guest open flags -> host flags (allow-list; writeback adjustments).

        With the writeback cache the guest kernel may READ through a handle
        it opened write-only (to fill a partial page) and keeps the append
        position itself, so O_WRONLY becomes O_RDWR and O_APPEND is dropped,
        as virtiofsd does.
        """
        flags &= self._open_mask
        if flags & os.O_ACCMODE == os.O_ACCMODE:
            raise FsError(errno.EINVAL)
        if self._writeback_on:
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        return flags
