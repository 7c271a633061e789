"""Directory ops: OPENDIR, READDIR, RELEASEDIR, FSYNCDIR.

READDIR offsets are the host's own getdents64 cookies (``d_off``): each call
seeks the handle's fd to the guest's cookie and reads from there, so the
guest can resume at any cookie it was given, through any handle, and the
fd's position from an earlier call never matters.  ``.`` and ``..`` are
passed on as the host returns them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from shardfs.fs.api import Context, DirEntry, Opened
from shardfs.fs.passthrough import sys as lsys
from shardfs.fs.passthrough.core import PassthroughBase, check_offset
from shardfs.fs.passthrough.handles import Handle

#: Bytes of the first getdents64 call of a request, doubling on each further
#: call up to DIRENT_BUF_SIZE.  A guest's reply is usually one 4 KiB page: a
#: READDIRPLUS page holds about 30 records (each carries a 128-byte entry),
#: about what 2 KiB of linux_dirent64 returns, and a plain READDIR page about
#: 128 records, which 2 + 4 KiB cover.  Entries read past the guest's early
#: stop are kernel work thrown away: a fixed 8 KiB read 250 names per
#: READDIRPLUS page, and getdents64 was 15% of its time (py-spy).
FIRST_DIRENT_BUF_SIZE = 2048
DIRENT_BUF_SIZE = 8192


class DirOps(PassthroughBase):
    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        """Open the directory node as ``.`` under its O_PATH fd; a new fh."""
        node = self._dir(nodeid)
        self._handles.check_room()
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=node.fd)
        h = self._handles.add(fd, nodeid, is_dir=True, flags=os.O_RDONLY)
        return Opened(h.fh, self._policy.opendir_flags)

    def readdir(self, ctx: Context, nodeid: int, fh: int, offset: int) -> Iterator[DirEntry]:
        """Records after cookie ``offset``, lazily (see the module doc).

        The handle, the cookie and the first getdents64 are checked here,
        eagerly, so those errors raise from the call itself.  The iterator
        stops quietly if the handle is released while it is suspended.
        """
        h = self._dir_handle(fh, nodeid)
        os.lseek(h.fd, check_offset(offset), os.SEEK_SET)
        buf = bytearray(FIRST_DIRENT_BUF_SIZE)
        filled = lsys.getdents64(h.fd, buf)
        return self._records(h, buf, filled)

    def readdir_packed(self, ctx: Context, nodeid: int, fh: int, offset: int,
                       out: bytearray) -> int | None:
        """Plain READDIR straight from getdents64 records into ``out`` (see
        FileSystem.readdir_packed): the same records :meth:`readdir` gives,
        with the same checks, buffer growth and handle liveness test."""
        h = self._dir_handle(fh, nodeid)
        os.lseek(h.fd, check_offset(offset), os.SEEK_SET)
        buf = bytearray(FIRST_DIRENT_BUF_SIZE)
        at = 0
        while True:
            filled = lsys.getdents64(h.fd, buf)
            if filled <= 0:
                return at
            at, full = lsys.pack_fuse_dirents(buf, filled, out, at)
            if full or not self._handles.is_live(h):
                return at
            if len(buf) < DIRENT_BUF_SIZE:
                buf = bytearray(min(2 * len(buf), DIRENT_BUF_SIZE))

    def _records(self, h: Handle, buf: bytearray, filled: int) -> Iterator[DirEntry]:
        while filled > 0:
            yield from lsys.parse_dirents(buf, filled)
            if not self._handles.is_live(h):
                return
            if len(buf) < DIRENT_BUF_SIZE:
                buf = bytearray(min(2 * len(buf), DIRENT_BUF_SIZE))
            filled = lsys.getdents64(h.fd, buf)

    def releasedir(self, ctx: Context, nodeid: int, fh: int) -> None:
        self._dir_handle(fh, nodeid)
        self._handles.close(fh)
        self._nodes.reap()  # the end of the request: see SharedNodeTable.graveyard

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        h = self._dir_handle(fh, nodeid)
        (os.fdatasync if datasync else os.fsync)(h.fd)

