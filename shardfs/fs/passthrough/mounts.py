"""Mount fds for the filesystems mounted under the share (submounts).

``open_by_handle_at`` decodes a file handle on the filesystem of its
``mount_fd``, so a worker that opens a node by handle needs an fd on the
node's own filesystem.  For the share itself that is the root fd; for a
node on a submount it is an fd on that mount.  :func:`submount_fds` opens
one for every mount under the share *before* the worker enters its sandbox
(where ``/proc/self/mountinfo`` is out of reach), keyed by ``st_dev``; the
fds keep working after ``pivot_root``.

Each mount point is opened one name at a time beneath the share
(``openat2`` with RESOLVE_BENEATH and no symlinks), so a path the guest
has tampered with (a renamed parent, a planted symlink) is skipped, never
followed out of the share; and an fd is only kept if its ``st_dev`` is the
one ``mountinfo`` gives for that mount.  A handle decoded through it is
still checked against the node's (dev, ino), as every open by handle is.

Mounts that appear under the share after a worker started are not in its
table: nodes on them stay with the worker that looked them up (ESTALE on
other queues), the limit that shared.py states.

:func:`is_mount_point` tells which looked-up directories to announce to the
guest as submounts (FUSE_ATTR_SUBMOUNT), from the host as it is at the
LOOKUP, so it needs no table.
"""

from __future__ import annotations

import os
import re

from shardfs.fs.passthrough import sys as lsys

#: Resolution for a mount point below the share: no symlinks, never above it.
_RESOLVE = lsys.RESOLVE_BENEATH | lsys.RESOLVE_NO_SYMLINKS | lsys.RESOLVE_NO_MAGICLINKS
_OCTAL = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> bytes:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    return _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field)


def parse_mountinfo(text: bytes) -> list[tuple[int, bytes]]:
    """(st_dev, mount point) of every line of ``/proc/self/mountinfo``."""
    out = []
    for line in text.splitlines():
        fields = line.split(b" ")
        if len(fields) < 5 or b":" not in fields[2]:
            continue
        major, minor = fields[2].split(b":", 1)
        try:
            dev = os.makedev(int(major), int(minor))
        except ValueError:
            continue
        out.append((dev, _unescape(fields[4])))
    return out


def is_mount_point(parent_dev: int, fd: int, st: os.stat_result) -> bool:
    """Whether the directory ``fd`` (stat ``st``), just looked up under a parent on
    ``parent_dev``, belongs to another mount than its parent: virtiofsd's rule
    (another ``st_dev``, as a btrfs subvolume has, or another mount id).

    A name resolved in its parent reaches another mount exactly when the
    child is that mount's root, so the mount id test is statx's
    STATX_ATTR_MOUNT_ROOT (one call, on directories only).
    """
    if st.st_dev != parent_dev:
        return True
    fields = lsys.statx(fd, b"", lsys.AT_EMPTY_PATH, 0)
    return bool(fields[lsys.STATX_ATTRIBUTES] & fields[lsys.STATX_ATTRIBUTES_MASK]
                & lsys.STATX_ATTR_MOUNT_ROOT)


def submount_fds(share: str, mountinfo: str = "/proc/self/mountinfo") -> dict[int, int]:
    """Fds of the mounts strictly below ``share`` (directories opened read-only),
    by ``st_dev``; the caller owns them.  Mounts that cannot be opened safely are left out."""
    root = os.fsencode(os.path.realpath(share)).rstrip(b"/") + b"/"
    try:
        with open(mountinfo, "rb") as f:
            mounts = parse_mountinfo(f.read())
    except OSError:
        return {}
    out: dict[int, int] = {}
    share_fd = os.open(share, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        share_dev = os.fstat(share_fd).st_dev
        for dev, point in mounts:
            if not point.startswith(root) or dev in out or dev == share_dev:
                continue
            try:
                # open_by_handle_at refuses an O_PATH mount_fd: a real open.
                fd = lsys.openat2(share_fd, point[len(root):],
                                  os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0, _RESOLVE)
            except OSError:
                continue  # gone, shadowed, or reached through a symlink: skip it
            if os.fstat(fd).st_dev == dev:
                out[dev] = fd
            else:
                os.close(fd)  # another mount stacked over it: that one has its own line
    finally:
        os.close(share_fd)
    return out
