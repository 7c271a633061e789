"""``ReadOnlyFs``: the ``readonly`` option, as a decorator (virtiofsd's ``--readonly``).

Every op that would modify the share answers EROFS without reaching the
filesystem underneath; OPEN (and CREATE of an existing name) is allowed
only for reading.  Reads, lookups, xattr reads, readdir and fsync pass
through unchanged.  The results follow a host ``mount -o ro`` where that is
cheap to match:

* CREATE of an existing regular file without O_EXCL, read-only, opens it;
  with O_EXCL it is EEXIST; a name that does not exist is EROFS; any write
  access or O_TRUNC is EROFS.
* Other creating and namespace ops (MKDIR, MKNOD, SYMLINK, LINK, UNLINK,
  RMDIR, RENAME, TMPFILE) are EROFS at once, without first checking for
  EEXIST/ENOENT as the host VFS would (virtiofsd does the same; the
  guest's own lookup usually answered those already).
* ACCESS with W_OK is EROFS; other masks are the filesystem's answer.
* Reading may still update a file's atime on the host, as reading a
  ``ro`` bind mount of a writable filesystem does not; mount the share
  ``noatime`` for a share that must not change at all.
"""

from __future__ import annotations

import errno
import os
import stat

from shardfs.abi.fuse import FUSE_HANDLE_KILLPRIV_V2, FUSE_WRITEBACK_CACHE
from shardfs.fs.api import Context, Entry, FsError, Opened, SetattrIn
from shardfs.fs.forward import ForwardingFs

#: Open flags that would modify the file besides a write access mode (O_APPEND
#: with O_RDONLY changes nothing, and a ro mount allows it too).
_MODIFYING_OPEN_FLAGS = os.O_TRUNC


def _erofs() -> FsError:
    return FsError(errno.EROFS)


class ReadOnlyFs(ForwardingFs):
    """A FileSystem that refuses every modification with EROFS."""

    def init(self, capable: int) -> int:
        """Never ask for the writeback cache or killpriv: nothing is written."""
        return self.inner.init(capable) & ~(FUSE_WRITEBACK_CACHE | FUSE_HANDLE_KILLPRIV_V2)

    @staticmethod
    def _check_read_only(flags: int) -> None:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & _MODIFYING_OPEN_FLAGS:
            raise _erofs()

    def open(self, ctx: Context, nodeid: int, flags: int, kill_suidgid: bool = False) -> Opened:
        self._check_read_only(flags)
        return self.inner.open(ctx, nodeid, flags & ~(os.O_CREAT | os.O_EXCL))

    def create(self, ctx: Context, parent: int, name: bytes, flags: int, mode: int,
               umask: int, kill_suidgid: bool = False) -> tuple[Entry, Opened]:
        """Open an existing regular file for reading; see the module doc."""
        try:
            e = self.inner.lookup(ctx, parent, name)
        except FsError as err:
            if err.errno == errno.ENOENT:
                raise _erofs() from None
            raise
        except FileNotFoundError:
            raise _erofs() from None
        try:
            if flags & os.O_EXCL:
                raise FsError(errno.EEXIST)
            self._check_read_only(flags)
            kind = stat.S_IFMT(e.attr.st_mode)
            if kind != stat.S_IFREG:
                raise FsError({stat.S_IFDIR: errno.EISDIR,
                               stat.S_IFLNK: errno.ELOOP}.get(kind, errno.ENXIO))
            return e, self.inner.open(ctx, e.nodeid, flags & ~(os.O_CREAT | os.O_EXCL))
        except BaseException:
            self.inner.forget(e.nodeid, 1)  # the guest never learns of this lookup
            raise

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        if mask & os.W_OK:
            raise _erofs()
        self.inner.access(ctx, nodeid, mask)

    # -- refused outright ---------------------------------------------------------

    def setattr(self, ctx: Context, nodeid: int, attr: SetattrIn) -> tuple[os.stat_result, float]:
        raise _erofs()

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        raise _erofs()

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int,
              umask: int) -> Entry:
        raise _erofs()

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        raise _erofs()

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        raise _erofs()

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        raise _erofs()

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        raise _erofs()

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        raise _erofs()

    def tmpfile(self, ctx: Context, parent: int, flags: int, mode: int,
                umask: int) -> tuple[Entry, Opened]:
        raise _erofs()

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int,
              buffers: list[memoryview], write_flags: int) -> int:
        raise _erofs()

    def fallocate(self, ctx: Context, nodeid: int, fh: int, offset: int, length: int,
                  mode: int) -> None:
        raise _erofs()

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int,
                        nodeid_out: int, fh_out: int, off_out: int, length: int,
                        flags: int) -> int:
        raise _erofs()

    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes,
                 flags: int, setxattr_flags: int = 0) -> None:
        raise _erofs()

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        raise _erofs()
