"""Run a creating operation with the caller's fsuid/fsgid (DESIGN §4).

A new inode takes its owner from the creating thread's fsuid and its group
from the fsgid (or from a setgid parent directory), so CREATE, MKNOD, MKDIR
and SYMLINK run under the guest caller's ids, as virtiofsd's credentials
guard does.  ``setfsuid``/``setfsgid`` act on the calling thread only.

Side effects worth knowing: changing the fsuid from 0 to another id clears
the filesystem capabilities (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER,
CAP_FSETID, CAP_MKNOD, ...) from the effective set until it returns to 0.
So under a non-root caller the host kernel checks the parent's permissions
against that caller, strips S_ISGID the way it would for them, and refuses
device nodes.  Supplementary groups are the daemon's own: the sandbox must
drop them at start (CVE-2022-0358).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from shardfs.fs.api import Context, FsError
from shardfs.fs.passthrough import sys as lsys


def _switch_gid(gid: int) -> int:
    old = lsys.setfsgid(gid)
    if lsys.setfsgid(lsys.ID_UNCHANGED) != gid:
        lsys.setfsgid(old)
        raise FsError(errno.EPERM)
    return old


def _switch_uid(uid: int) -> int:
    old = lsys.setfsuid(uid)
    if lsys.setfsuid(lsys.ID_UNCHANGED) != uid:
        lsys.setfsuid(old)
        raise FsError(errno.EPERM)
    return old


@contextmanager
def caller_creds(ctx: Context) -> Iterator[None]:
    """Switch fsgid then fsuid to the caller's for the block; always restore.

    EPERM if the switch does not take (the daemon lacks CAP_SETUID/SETGID,
    or the id is ``(uid_t)-1``).  The group goes first and comes back last
    so the uid switch never runs without the group already in place.
    """
    cur_uid = lsys.setfsuid(lsys.ID_UNCHANGED)
    cur_gid = lsys.setfsgid(lsys.ID_UNCHANGED)
    if ctx.uid == cur_uid and ctx.gid == cur_gid:
        yield
        return
    old_gid = _switch_gid(ctx.gid)
    try:
        old_uid = _switch_uid(ctx.uid)
        try:
            yield
        finally:
            lsys.setfsuid(old_uid)
    finally:
        lsys.setfsgid(old_gid)
