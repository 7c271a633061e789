"""The filesystem interface the dispatcher calls.

This is the border between the FUSE protocol and filesystem semantics, in the
style of virtiofsd's ``FileSystem`` trait and pyfuse3's ``Operations``: it
speaks domain types (``os.stat_result``, :class:`Entry`, :class:`DirEntry`),
never wire structs.  ``shardfs.dispatch`` converts at the border.

Contracts every implementation keeps:

* The only exception a method may raise on purpose is :class:`FsError`;
  an ``OSError`` is treated the same way (its errno reaches the guest).
  Anything else is a bug: the dispatcher logs it and answers EIO.
* Every method defaults to ENOSYS, so an implementation opts in per op.
* Lookup counts: every :class:`Entry` returned by ``lookup``, ``mknod``,
  ``mkdir``, ``symlink``, ``link``, ``create`` and ``tmpfile`` adds one to the node's
  lookup count, which the guest later drops with ``forget``.  A node whose
  count reaches zero is released.  The root's count is never dropped.
* Ids are opaque: a nodeid or fh the guest sends may be forged, and an
  implementation answers ENOENT/EBADF for one it never issued.
* Names are guest-controlled bytes; see :func:`check_name`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import NamedTuple, NewType

NodeId = NewType("NodeId", int)
FileHandle = NewType("FileHandle", int)

#: Times travel as whole seconds and nanoseconds (struct timespec, fuse_attr).
NSEC_PER_SEC = 1_000_000_000


class FsError(Exception):
    """A filesystem operation failed with ``errno``; the guest sees -errno."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(err, message or os.strerror(err))
        self.errno = err


class SecContext(NamedTuple):
    """A security label for a new inode (FUSE_SECURITY_CTX): xattr name and value."""

    name: bytes
    value: bytes


class Context(NamedTuple):
    """Who asked: the caller's ids from ``fuse_in_header``.

    The request extensions of creating ops add to it: ``supp_groups`` is the
    supplementary group the guest says the caller holds (FUSE_EXT_GROUPS:
    the parent directory's group, when the caller is a member), ``secctx``
    the labels to give the new inode (FUSE_SECURITY_CTX).  Both are empty
    unless negotiated at INIT.
    """

    uid: int
    gid: int
    pid: int
    supp_groups: tuple[int, ...] = ()
    secctx: tuple[SecContext, ...] = ()


class Entry:
    """A looked-up node.  Returning one adds 1 to its lookup count."""

    __slots__ = ("nodeid", "generation", "attr", "entry_timeout_s", "attr_timeout_s",
                 "attr_flags")

    nodeid: int
    generation: int
    attr: os.stat_result
    entry_timeout_s: float
    attr_timeout_s: float
    #: ``fuse_attr.flags``: FUSE_ATTR_SUBMOUNT on a directory that is another mount.
    attr_flags: int

    def __init__(self, nodeid: int, generation: int, attr: os.stat_result,
                 entry_timeout_s: float, attr_timeout_s: float, attr_flags: int = 0) -> None:
        self.nodeid = nodeid
        self.generation = generation
        self.attr = attr
        self.entry_timeout_s = entry_timeout_s
        self.attr_timeout_s = attr_timeout_s
        self.attr_flags = attr_flags


class Statx:
    """The result of STATX (statx(2)'s fields that ``fuse_statx`` carries).

    ``mask`` says which fields are valid (STATX_* of <linux/stat.h>); times
    are (seconds, nanoseconds).  The host's device numbers are not part of
    it: the guest has its own.
    """

    __slots__ = ("mask", "blksize", "attributes", "nlink", "uid", "gid", "mode", "ino", "size",
                 "blocks", "attributes_mask", "atime", "btime", "ctime", "mtime", "rdev_major",
                 "rdev_minor")

    mask: int
    blksize: int
    attributes: int
    nlink: int
    uid: int
    gid: int
    mode: int
    ino: int
    size: int
    blocks: int
    attributes_mask: int
    atime: tuple[int, int]
    btime: tuple[int, int]
    ctime: tuple[int, int]
    mtime: tuple[int, int]
    rdev_major: int
    rdev_minor: int

    def __init__(self, mask: int, blksize: int, attributes: int, nlink: int, uid: int, gid: int,
                 mode: int, ino: int, size: int, blocks: int, attributes_mask: int,
                 atime: tuple[int, int], btime: tuple[int, int], ctime: tuple[int, int],
                 mtime: tuple[int, int], rdev_major: int, rdev_minor: int) -> None:
        self.mask = mask
        self.blksize = blksize
        self.attributes = attributes
        self.nlink = nlink
        self.uid = uid
        self.gid = gid
        self.mode = mode
        self.ino = ino
        self.size = size
        self.blocks = blocks
        self.attributes_mask = attributes_mask
        self.atime = atime
        self.btime = btime
        self.ctime = ctime
        self.mtime = mtime
        self.rdev_major = rdev_major
        self.rdev_minor = rdev_minor


class DirEntry(NamedTuple):
    """One directory record.  ``offset`` is the cookie that resumes *after* it.

    A tuple, so that READDIR unpacks it and the passthrough makes one per
    name with ``tuple.__new__``: a class's ``__init__`` was 40% of a plain
    READDIR's cost per name.
    """

    ino: int
    offset: int
    type: int  # DT_* value
    name: bytes


class SetattrIn:
    """The fields of ``fuse_setattr_in`` that ``valid`` (FATTR_*) selects."""

    __slots__ = ("valid", "fh", "size", "atime_ns", "mtime_ns", "mode", "uid", "gid")

    valid: int
    fh: int
    size: int
    atime_ns: int
    mtime_ns: int
    mode: int
    uid: int
    gid: int

    def __init__(self, valid: int, fh: int, size: int, atime_ns: int, mtime_ns: int, mode: int,
                 uid: int, gid: int) -> None:
        self.valid = valid
        self.fh = fh
        self.size = size
        self.atime_ns = atime_ns
        self.mtime_ns = mtime_ns
        self.mode = mode
        self.uid = uid
        self.gid = gid


class Opened:
    """The result of OPEN/OPENDIR/CREATE: a handle and FOPEN_* flags."""

    __slots__ = ("fh", "open_flags")

    fh: int
    open_flags: int

    def __init__(self, fh: int, open_flags: int) -> None:
        self.fh = fh
        self.open_flags = open_flags


def check_name(name: bytes) -> bytes:
    """Refuse names that could leave the directory they are resolved in.

    DESIGN §4: a name with ``/``, an empty name, ``.`` and ``..`` are refused,
    and so is a NUL inside it.  Absolute names are covered by the ``/`` rule,
    which matters because ``symlinkat``/``mkdirat`` ignore the dirfd for them.
    """
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL)
    if len(name) > 255:
        raise FsError(errno.ENAMETOOLONG)
    return name


class FileSystem:
    """Base class: every operation answers ENOSYS until overridden."""

    def init(self, capable: int) -> int:
        """Called on FUSE_INIT (and again on a re-INIT, after ``destroy``).

        ``capable`` is the INIT flag set the guest offers; return the subset
        this filesystem wants switched on (the dispatcher adds its own).
        """
        return 0

    def negotiated(self, flags: int) -> None:
        """Called after INIT with the flags now in force (what the reply carries)."""

    def session_flags(self) -> int:
        """The INIT flags in force, as *every* worker sees them (0 before INIT).

        Only one worker serves INIT; the dispatcher of any worker asks this
        to decode requests whose layout depends on negotiation
        (FUSE_SETXATTR_EXT, request extensions).
        """
        return 0

    def destroy(self) -> None:
        """Drop every node and handle except the root (FUSE_DESTROY, reboot)."""

    def idle(self) -> None:
        """Called before each request and after each batch: a chance to release
        resources that another process freed (shared state).  Must be cheap
        when there is nothing to do.  Never raises."""

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        raise FsError(errno.ENOSYS)

    def forget(self, nodeid: int, nlookup: int) -> None:
        """Drop ``nlookup`` from the node's count; never raises, never replies."""

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[os.stat_result, float]:
        raise FsError(errno.ENOSYS)

    def statx(self, ctx: Context, nodeid: int, fh: int | None, sx_flags: int,
              sx_mask: int) -> tuple[Statx, float]:
        """FUSE_STATX (7.39): GETATTR with the birth time.  ``sx_flags`` are the
        guest's AT_STATX_* sync flags, ``sx_mask`` the STATX_* fields it wants.
        ENOSYS makes the guest fall back to GETATTR for good."""
        raise FsError(errno.ENOSYS)

    def setattr(self, ctx: Context, nodeid: int, attr: SetattrIn) -> tuple[os.stat_result, float]:
        raise FsError(errno.ENOSYS)

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        raise FsError(errno.ENOSYS)

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        raise FsError(errno.ENOSYS)

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int,
              umask: int) -> Entry:
        raise FsError(errno.ENOSYS)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        raise FsError(errno.ENOSYS)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        raise FsError(errno.ENOSYS)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        raise FsError(errno.ENOSYS)

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        raise FsError(errno.ENOSYS)

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        raise FsError(errno.ENOSYS)

    def open(self, ctx: Context, nodeid: int, flags: int, kill_suidgid: bool = False) -> Opened:
        """Open the node; ``kill_suidgid`` (FUSE_OPEN_KILL_SUIDGID) asks that an
        O_TRUNC open clear setuid/setgid, as the caller's own truncate would."""
        raise FsError(errno.ENOSYS)

    def create(self, ctx: Context, parent: int, name: bytes, flags: int, mode: int,
               umask: int, kill_suidgid: bool = False) -> tuple[Entry, Opened]:
        raise FsError(errno.ENOSYS)

    def tmpfile(self, ctx: Context, parent: int, flags: int, mode: int,
                umask: int) -> tuple[Entry, Opened]:
        """O_TMPFILE in directory ``parent`` (FUSE_TMPFILE): an unnamed, open
        regular file; +1 lookup on its node, as CREATE."""
        raise FsError(errno.ENOSYS)

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int,
             buffers: list[memoryview]) -> int:
        """Fill ``buffers`` (guest memory) from the file; return bytes read."""
        raise FsError(errno.ENOSYS)

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int,
              buffers: list[memoryview], write_flags: int) -> int:
        """Write ``buffers`` (guest memory) to the file; return bytes written."""
        raise FsError(errno.ENOSYS)

    def read_iov(self, ctx: Context, nodeid: int, fh: int, offset: int, iov: bytes,
                 count: int) -> int | None:
        """:meth:`read` into ``count`` ready ``struct iovec`` entries: optional.

        ``iov`` addresses guest memory in this process (at most IOV_MAX
        entries, every one checked by the caller, mapped until the request
        ends).  Exactly :meth:`read`'s checks, errors and result, on the same
        bytes.  None (the default): the caller makes views and calls
        :meth:`read`.  A passthrough can hand the array to ``preadv`` as it is.
        """
        return None

    def write_iov(self, ctx: Context, nodeid: int, fh: int, offset: int, iov: bytes,
                  count: int, write_flags: int) -> int | None:
        """:meth:`write` from ``count`` ready ``struct iovec`` entries: optional, as
        :meth:`read_iov` is."""
        return None

    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        raise FsError(errno.ENOSYS)

    def release(self, ctx: Context, nodeid: int, fh: int) -> None:
        raise FsError(errno.ENOSYS)

    def flush(self, ctx: Context, nodeid: int, fh: int) -> None:
        raise FsError(errno.ENOSYS)

    def lock_file(self, ctx: Context, nodeid: int, fh: int, reopen: bool) -> int | None:
        """For host-visible locks (shardfs.proc.locks): check that ``fh`` is a file
        handle of ``nodeid`` (EBADF otherwise) and, with ``reopen``, return a new
        open file description of the file, read-write where the host allows,
        which the caller owns."""
        raise FsError(errno.ENOSYS)

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        raise FsError(errno.ENOSYS)

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        raise FsError(errno.ENOSYS)

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int) -> Iterator[DirEntry]:
        """Yield the records after cookie ``offset`` (0 = from the start).

        The caller stops pulling when its reply buffer is full, so an
        implementation must not assume the iterator is drained.
        """
        raise FsError(errno.ENOSYS)

    def readdir_packed(self, ctx: Context, nodeid: int, fh: int, offset: int,
                       out: bytearray) -> int | None:
        """Plain READDIR's reply, packed by the filesystem: optional.

        Write the records after cookie ``offset`` into the zeroed ``out`` as
        ``struct fuse_dirent`` records (8-byte aligned), as many as fit, and
        return the bytes used; exactly what the dispatcher would pack from
        :meth:`readdir`.  None (the default): the dispatcher packs
        :meth:`readdir`'s records itself.  A passthrough can copy the host's
        records with no object per name.
        """
        return None

    def releasedir(self, ctx: Context, nodeid: int, fh: int) -> None:
        raise FsError(errno.ENOSYS)

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        raise FsError(errno.ENOSYS)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        raise FsError(errno.ENOSYS)

    def fallocate(self, ctx: Context, nodeid: int, fh: int, offset: int, length: int,
                  mode: int) -> None:
        raise FsError(errno.ENOSYS)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        raise FsError(errno.ENOSYS)

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        raise FsError(errno.ENOSYS)

    def getxattr(self, ctx: Context, nodeid: int, name: bytes, size: int) -> bytes | int:
        """Return the value, or its length when ``size`` is 0 (the probe form)."""
        raise FsError(errno.ENOSYS)

    def listxattr(self, ctx: Context, nodeid: int, size: int) -> bytes | int:
        """Return NUL-separated names, or their total length when ``size`` is 0."""
        raise FsError(errno.ENOSYS)

    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes,
                 flags: int, setxattr_flags: int = 0) -> None:
        """``flags`` are XATTR_CREATE/REPLACE; ``setxattr_flags`` the
        FUSE_SETXATTR_* bits of FUSE_SETXATTR_EXT (ACL_KILL_SGID)."""
        raise FsError(errno.ENOSYS)

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        raise FsError(errno.ENOSYS)

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int,
                        nodeid_out: int, fh_out: int, off_out: int, length: int,
                        flags: int) -> int:
        raise FsError(errno.ENOSYS)
