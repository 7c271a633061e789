"""``ForwardingFs``: a FileSystem that hands every call to another one.

The base of the decorators that change one aspect of a filesystem and leave
the rest alone (:mod:`shardfs.fs.readonly`, :mod:`shardfs.fs.idmap`), as
virtiofsd wraps its passthrough filesystem for ``--readonly``.  A subclass
overrides only the ops it changes; everything else, lookup counts included,
is the inner filesystem's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from shardfs.fs.api import Context, DirEntry, Entry, FileSystem, Opened, SetattrIn, Statx


class ForwardingFs(FileSystem):
    """Every op goes to ``inner`` unchanged."""

    def __init__(self, inner: FileSystem) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        """Anything else (``close``, ``node_count``...) is the inner filesystem's;
        the FileSystem ops themselves are all defined below."""
        if name == "inner":
            raise AttributeError(name)  # not set yet: never recurse
        return getattr(self.inner, name)

    def init(self, capable: int) -> int:
        return self.inner.init(capable)

    def negotiated(self, flags: int) -> None:
        self.inner.negotiated(flags)

    def session_flags(self) -> int:
        return self.inner.session_flags()

    def destroy(self) -> None:
        self.inner.destroy()

    def idle(self) -> None:
        self.inner.idle()

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        return self.inner.lookup(ctx, parent, name)

    def forget(self, nodeid: int, nlookup: int) -> None:
        self.inner.forget(nodeid, nlookup)

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[os.stat_result, float]:
        return self.inner.getattr(ctx, nodeid, fh)

    def statx(self, ctx: Context, nodeid: int, fh: int | None, sx_flags: int,
              sx_mask: int) -> tuple[Statx, float]:
        return self.inner.statx(ctx, nodeid, fh, sx_flags, sx_mask)

    def setattr(self, ctx: Context, nodeid: int, attr: SetattrIn) -> tuple[os.stat_result, float]:
        return self.inner.setattr(ctx, nodeid, attr)

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        return self.inner.readlink(ctx, nodeid)

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        return self.inner.symlink(ctx, parent, name, target)

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int,
              umask: int) -> Entry:
        return self.inner.mknod(ctx, parent, name, mode, rdev, umask)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        return self.inner.mkdir(ctx, parent, name, mode, umask)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        self.inner.unlink(ctx, parent, name)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        self.inner.rmdir(ctx, parent, name)

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        self.inner.rename(ctx, parent, name, newparent, newname, flags)

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        return self.inner.link(ctx, nodeid, newparent, newname)

    def open(self, ctx: Context, nodeid: int, flags: int, kill_suidgid: bool = False) -> Opened:
        return self.inner.open(ctx, nodeid, flags, kill_suidgid)

    def create(self, ctx: Context, parent: int, name: bytes, flags: int, mode: int,
               umask: int, kill_suidgid: bool = False) -> tuple[Entry, Opened]:
        return self.inner.create(ctx, parent, name, flags, mode, umask, kill_suidgid)

    def tmpfile(self, ctx: Context, parent: int, flags: int, mode: int,
                umask: int) -> tuple[Entry, Opened]:
        return self.inner.tmpfile(ctx, parent, flags, mode, umask)

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int,
             buffers: list[memoryview]) -> int:
        return self.inner.read(ctx, nodeid, fh, offset, buffers)

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int,
              buffers: list[memoryview], write_flags: int) -> int:
        return self.inner.write(ctx, nodeid, fh, offset, buffers, write_flags)

    def read_iov(self, ctx: Context, nodeid: int, fh: int, offset: int, iov: bytes,
                 count: int) -> int | None:
        # Forwarded only while read() is: a subclass that changes read() must
        # see every read (None: the dispatcher calls read() with views).
        if type(self).read is not ForwardingFs.read:
            return None
        return self.inner.read_iov(ctx, nodeid, fh, offset, iov, count)

    def write_iov(self, ctx: Context, nodeid: int, fh: int, offset: int, iov: bytes,
                  count: int, write_flags: int) -> int | None:
        # As read_iov: ReadOnlyFs's write() refuses, so its writes never pass here.
        if type(self).write is not ForwardingFs.write:
            return None
        return self.inner.write_iov(ctx, nodeid, fh, offset, iov, count, write_flags)

    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        return self.inner.statfs(ctx, nodeid)

    def release(self, ctx: Context, nodeid: int, fh: int) -> None:
        self.inner.release(ctx, nodeid, fh)

    def flush(self, ctx: Context, nodeid: int, fh: int) -> None:
        self.inner.flush(ctx, nodeid, fh)

    def lock_file(self, ctx: Context, nodeid: int, fh: int, reopen: bool) -> int | None:
        return self.inner.lock_file(ctx, nodeid, fh, reopen)

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        self.inner.fsync(ctx, nodeid, fh, datasync)

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        return self.inner.opendir(ctx, nodeid, flags)

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int) -> Iterator[DirEntry]:
        return self.inner.readdir(ctx, nodeid, fh, offset)

    def readdir_packed(self, ctx: Context, nodeid: int, fh: int, offset: int,
                       out: bytearray) -> int | None:
        return self.inner.readdir_packed(ctx, nodeid, fh, offset, out)

    def releasedir(self, ctx: Context, nodeid: int, fh: int) -> None:
        self.inner.releasedir(ctx, nodeid, fh)

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        self.inner.fsyncdir(ctx, nodeid, fh, datasync)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        self.inner.access(ctx, nodeid, mask)

    def fallocate(self, ctx: Context, nodeid: int, fh: int, offset: int, length: int,
                  mode: int) -> None:
        self.inner.fallocate(ctx, nodeid, fh, offset, length, mode)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        return self.inner.lseek(ctx, nodeid, fh, offset, whence)

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        self.inner.syncfs(ctx, nodeid)

    def getxattr(self, ctx: Context, nodeid: int, name: bytes, size: int) -> bytes | int:
        return self.inner.getxattr(ctx, nodeid, name, size)

    def listxattr(self, ctx: Context, nodeid: int, size: int) -> bytes | int:
        return self.inner.listxattr(ctx, nodeid, size)

    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes,
                 flags: int, setxattr_flags: int = 0) -> None:
        self.inner.setxattr(ctx, nodeid, name, value, flags, setxattr_flags)

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        self.inner.removexattr(ctx, nodeid, name)

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int,
                        nodeid_out: int, fh_out: int, off_out: int, length: int,
                        flags: int) -> int:
        return self.inner.copy_file_range(ctx, nodeid_in, fh_in, off_in, nodeid_out, fh_out,
                                          off_out, length, flags)
