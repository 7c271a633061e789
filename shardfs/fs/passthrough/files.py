"""File ops: OPEN, CREATE, TMPFILE, READ, WRITE, RELEASE, FLUSH, FSYNC,
FALLOCATE, LSEEK, COPY_FILE_RANGE.

A handle's fd is a real open file owned by the handle table.  READ and WRITE
move data straight between that fd and the guest-memory memoryviews with
preadv/pwritev, never through an intermediate ``bytes`` (DESIGN §5).

Opens run as the daemon: the guest kernel has checked the caller's access
(``creds`` says why), and a file's creation runs under the caller's ids.
setuid/setgid are cleared where the caller's own write, truncate or O_TRUNC
open would clear them (FUSE_WRITE_KILL_SUIDGID, FUSE_OPEN_KILL_SUIDGID).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Sequence

from shardfs.abi.fuse import FUSE_WRITE_KILL_SUIDGID
from shardfs.fs.api import Context, Entry, FsError, Opened, check_name
from shardfs.fs.passthrough import sys as lsys
from shardfs.fs.passthrough.core import (
    IOV_MAX,
    MODE_PERM_MASK,
    SPECIAL_OPEN_ERRNO,
    PassthroughBase,
    check_offset,
    kill_suidgid_mode,
    total_len,
)
from shardfs.fs.passthrough.creds import caller_creds
from shardfs.fs.passthrough.nodes import Node

#: The most one read/write/copy moves in one call (MAX_RW_COUNT: INT_MAX
#: rounded down to a page), so a guest length never overflows ssize_t.
MAX_RW_COUNT = 0x7FFF_F000

#: lseek(2) whences a guest may use (FUSE sends SEEK_DATA/SEEK_HOLE).
SEEK_WHENCES = frozenset({os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE})


def _vectored(op: Callable[[int, Sequence[memoryview], int], int], fd: int,
              buffers: list[memoryview], offset: int) -> int:
    """preadv/pwritev over any number of buffers, IOV_MAX at a time.

    Stops at the first short transfer, as one big call would.
    """
    if len(buffers) <= IOV_MAX:
        return op(fd, buffers, offset) if buffers else 0
    done = 0
    for i in range(0, len(buffers), IOV_MAX):
        chunk = buffers[i:i + IOV_MAX]
        n = op(fd, chunk, offset + done)
        done += n
        if n < total_len(chunk):
            break
    return done


def _kill_suidgid_fd(fd: int) -> None:
    """Clear S_ISUID/S_ISGID on the file ``fd`` is open on, as the kernel would.

    We run as root, so the host kernel keeps them on write (CAP_FSETID);
    the guest asks us to do its part with FUSE_WRITE_KILL_SUIDGID.
    """
    mode = os.fstat(fd).st_mode
    new = kill_suidgid_mode(mode)
    if new != mode:
        os.fchmod(fd, new & MODE_PERM_MASK)


class FileOps(PassthroughBase):
    def open(self, ctx: Context, nodeid: int, flags: int, kill_suidgid: bool = False) -> Opened:
        """Reopen a regular file (or directory) node for I/O under a new fh.

        Anything else is refused with SPECIAL_OPEN_ERRNO, never opened.
        O_TRUNC clears setuid/setgid as the caller's own truncation would
        (see :meth:`_truncated`).
        """
        node = self._node(nodeid)
        hflags = self._host_open_flags(flags)
        self._handles.check_room()
        fd = self._reopen(node, hflags)
        try:
            self._truncated(ctx, fd, hflags, kill_suidgid)
        except BaseException:
            os.close(fd)
            raise
        # A file handle even on a directory: the kind follows the op (OPEN
        # vs OPENDIR), so RELEASE, not RELEASEDIR, frees it.
        h = self._handles.add(fd, nodeid, is_dir=False, flags=hflags)
        return Opened(h.fh, self._policy.open_flags)

    def _truncated(self, ctx: Context, fd: int, hflags: int, kill_suidgid: bool) -> None:
        """After an O_TRUNC open (done as root, which keeps setuid/setgid):
        what the caller's own truncation would also do.

        setuid/setgid go when the guest asks (FUSE_OPEN_KILL_SUIDGID) or the
        caller is not root: a guest without killpriv_v2 cannot ask, because
        its kernel drops the kill step of an atomic O_TRUNC open.  The
        file is empty by then.  A remapped security.capability goes too.
        """
        if not hflags & os.O_TRUNC:
            return
        kill = kill_suidgid or ctx.uid != 0
        if (kill or self._mapped_capability is not None) and stat.S_ISREG(
                os.fstat(fd).st_mode):
            if kill:
                _kill_suidgid_fd(fd)
            self._drop_mapped_capability(fd)

    def create(self, ctx: Context, parent: int, name: bytes, flags: int, mode: int,
               umask: int, kill_suidgid: bool = False) -> tuple[Entry, Opened]:
        """Create (or, without O_EXCL, open) regular file ``name``.

        The file is made with O_CREAT|O_EXCL|O_NOFOLLOW under the caller's
        creds, and given ``ctx.secctx`` labels (it is removed again if that
        fails).  If the name exists and the guest did not ask for O_EXCL,
        it is looked up and opened as OPEN would: a regular file only (a
        symlink is ELOOP, a directory EISDIR, anything else
        SPECIAL_OPEN_ERRNO), so an existing FIFO or device is never opened.
        Budgets are checked first, so a refusal leaves nothing behind.
        """
        dirnode = self._dir(parent)
        check_name(name)
        hflags = self._host_open_flags(flags)
        self._nodes.check_room()
        self._handles.check_room()
        fd: int | None = None
        with self._creation_umask(umask) as mask, caller_creds(ctx):
            try:
                fd = self._open_child(dirnode, name, hflags | os.O_CREAT | os.O_EXCL,
                                      mode & MODE_PERM_MASK & ~mask)
            except OSError as e:
                if e.errno != errno.EEXIST or flags & os.O_EXCL:
                    raise
        if fd is None:
            fd = self._open_existing(dirnode, name, hflags)
            try:
                self._truncated(ctx, fd, hflags, kill_suidgid)
            except BaseException:
                os.close(fd)
                raise
        elif ctx.secctx:
            try:
                self._label(fd, ctx.secctx)
            except BaseException:
                os.close(fd)
                os.unlink(name, dir_fd=dirnode.fd)
                raise
        return self._open_entry(fd, hflags)

    def tmpfile(self, ctx: Context, parent: int, flags: int, mode: int,
                umask: int) -> tuple[Entry, Opened]:
        """An unnamed regular file in ``parent`` (O_TMPFILE), open for I/O.

        Made under the caller's ids like CREATE; with O_EXCL it can never
        be linked into the directory.  LINK of its node names it.  A
        failure after the open just closes it: an unnamed inode vanishes.
        """
        dirnode = self._dir(parent)
        hflags = self._host_open_flags(flags)
        self._nodes.check_room()
        self._handles.check_room()
        extra = os.O_TMPFILE | (flags & os.O_EXCL)
        with self._creation_umask(umask) as mask, caller_creds(ctx):
            fd = self._open_child(dirnode, b".", hflags | extra, mode & MODE_PERM_MASK & ~mask)
        if ctx.secctx:
            try:
                self._label(fd, ctx.secctx)
            except BaseException:
                os.close(fd)
                raise
        return self._open_entry(fd, hflags)

    def _open_entry(self, fd: int, hflags: int) -> tuple[Entry, Opened]:
        """A node (+1 lookup) and a handle for the open file ``fd``; takes ``fd``."""
        try:
            # No O_NOFOLLOW here: it would pin the /proc magic link itself.
            node_fd = self._reopen_fd(fd, os.O_PATH)
            try:
                st = os.stat(node_fd)
            except BaseException:
                os.close(node_fd)
                raise
            node = self._nodes.insert(node_fd, st)
        except BaseException:
            os.close(fd)
            raise
        try:
            h = self._handles.add(fd, node.nodeid, is_dir=False, flags=hflags)
        except FsError:
            self._nodes.forget(node.nodeid, 1)  # the guest never sees this lookup
            raise
        return self._entry(node, st), Opened(h.fh, self._policy.open_flags)

    def _open_existing(self, dirnode: Node, name: bytes, hflags: int) -> int:
        """Open an existing ``name`` for CREATE without O_EXCL; caller owns the fd.

        The name is pinned with an O_PATH fd first and its type checked on
        that fd, so what gets opened is exactly what was checked.
        """
        path_fd = self._open_child(dirnode, name, os.O_PATH)
        try:
            mode = os.stat(path_fd).st_mode
            if stat.S_ISLNK(mode):
                raise FsError(errno.ELOOP)
            if stat.S_ISDIR(mode):
                raise FsError(errno.EISDIR)
            if not stat.S_ISREG(mode):
                raise FsError(SPECIAL_OPEN_ERRNO)
            return self._reopen_fd(path_fd, hflags)
        finally:
            os.close(path_fd)

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int,
             buffers: list[memoryview]) -> int:
        """preadv into the guest's buffers; short only at end of file."""
        h = self._file_handle(fh, nodeid)
        return _vectored(os.preadv, h.fd, buffers, check_offset(offset))

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int,
              buffers: list[memoryview], write_flags: int) -> int:
        """pwritev from the guest's buffers.

        FUSE_WRITE_KILL_SUIDGID clears setuid/setgid *before* the data
        lands, as the kernel's file_remove_privs does, so no moment exists
        where new contents carry the old privileges.
        """
        return _vectored(os.pwritev, self._write_fd(nodeid, fh, offset, write_flags),
                         buffers, offset)

    def read_iov(self, ctx: Context, nodeid: int, fh: int, offset: int, iov: bytes,
                 count: int) -> int | None:
        """:meth:`read` into ready iovecs (``FileSystem.read_iov``): one preadv."""
        h = self._file_handle(fh, nodeid)
        return lsys.preadv_iov(h.fd, iov, count, check_offset(offset))

    def write_iov(self, ctx: Context, nodeid: int, fh: int, offset: int, iov: bytes,
                  count: int, write_flags: int) -> int | None:
        """:meth:`write` from ready iovecs (``FileSystem.write_iov``): one pwritev."""
        return lsys.pwritev_iov(self._write_fd(nodeid, fh, offset, write_flags), iov, count,
                                offset)

    def _write_fd(self, nodeid: int, fh: int, offset: int, write_flags: int) -> int:
        """The fd a WRITE goes to, after what must happen before its data lands."""
        h = self._file_handle(fh, nodeid)
        check_offset(offset)
        if write_flags & FUSE_WRITE_KILL_SUIDGID:
            _kill_suidgid_fd(h.fd)
        if self._mapped_capability is not None:
            self._drop_mapped_capability(h.fd)
        return h.fd

    def release(self, ctx: Context, nodeid: int, fh: int) -> None:
        self._file_handle(fh, nodeid)
        self._handles.close(fh)
        self._nodes.reap()  # the end of the request: see SharedNodeTable.graveyard

    def flush(self, ctx: Context, nodeid: int, fh: int) -> None:
        """close(dup(fd)): what a close in the guest means to the host file
        (POSIX locks released, NFS-style flush), as virtiofsd does."""
        h = self._file_handle(fh, nodeid)
        os.close(os.dup(h.fd))

    def lock_file(self, ctx: Context, nodeid: int, fh: int, reopen: bool) -> int | None:
        """A description of its own for a lock owner (OFD locks belong to one).

        Read-write when the host lets the daemon open it so (a write lock
        needs a writable description, and one owner may lock through fhs of
        both modes), else in the fh's own mode.  Never written through.
        """
        h = self._file_handle(fh, nodeid)
        if not reopen:
            return None
        try:
            return self._reopen_fd(h.fd, os.O_RDWR)
        except OSError:
            return self._reopen_fd(h.fd, h.flags & os.O_ACCMODE)

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        h = self._file_handle(fh, nodeid)
        (os.fdatasync if datasync else os.fsync)(h.fd)

    def fallocate(self, ctx: Context, nodeid: int, fh: int, offset: int, length: int,
                  mode: int) -> None:
        """fallocate(2) with the guest's FALLOC_FL_* mode (KEEP_SIZE, PUNCH_HOLE,
        ZERO_RANGE, ...); the host kernel vets the combination."""
        h = self._file_handle(fh, nodeid)
        lsys.fallocate(h.fd, mode, check_offset(offset), check_offset(length))

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        """lseek(2) on the handle (SEEK_DATA/SEEK_HOLE included); I/O uses
        explicit offsets, so moving it is harmless."""
        h = self._file_handle(fh, nodeid)
        if whence not in SEEK_WHENCES:
            raise FsError(errno.EINVAL)
        return os.lseek(h.fd, check_offset(offset), whence)

    def copy_file_range(self, ctx: Context, nodeid_in: int, fh_in: int, off_in: int,
                        nodeid_out: int, fh_out: int, off_out: int, length: int,
                        flags: int) -> int:
        """copy_file_range(2) between two handles; flags must be 0 (as the syscall's)."""
        src = self._file_handle(fh_in, nodeid_in)
        dst = self._file_handle(fh_out, nodeid_out)
        if flags:
            raise FsError(errno.EINVAL)
        count = min(max(length, 0), MAX_RW_COUNT)
        return os.copy_file_range(src.fd, dst.fd, count, check_offset(off_in),
                                  check_offset(off_out))
