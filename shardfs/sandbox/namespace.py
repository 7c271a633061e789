"""The namespace sandbox: a private mount namespace whose whole world is the share.

After :func:`enter_namespace` the calling process lives in new mount, network
and UTS namespaces, and its root is a tiny read-only tmpfs holding exactly
two things:

``/shared``
    the shared directory (a recursive bind, so submounts come along);
``/proc/self/fd``
    a read-only bind of this process's own ``/proc/PID/fd`` directory and
    nothing else of procfs.

Why not pivot straight into the share, as virtiofsd does: the passthrough
reaches inodes through ``/proc/self/fd/N`` *by path* (the xattr calls take
no dir fd, see ``fs/passthrough/xattrs.py``), so that path must resolve in
the sandbox; a ``proc`` directory cannot be conjured inside the share
without writing to it, and a directory the guest can create there would be
guest-controlled.  A full procfs, on the other hand, is an escape hatch
without a pid namespace (``/proc/1/root`` is the host's root).  Binding
only our own fd directory gives the magic links and nothing else: from it
``..`` reaches the tmpfs, never procfs or the host.

The binds are cloned with ``open_tree(OPEN_TREE_CLONE)`` before the tmpfs
is mounted, so the tmpfs may sit anywhere, even over the share's own path
(where it is put: that path always exists), without ending up inside its
own copy of the share.

Steps, each a single syscall: ``unshare(NEWNS|NEWNET|NEWUTS)``; make every
mount a slave (``MS_SLAVE|MS_REC``), so nothing we do propagates to the
host; clone the share and ``/proc/PID/fd``; mount the tmpfs; create the two
mount points; move the clones there; ``pivot_root(".", ".")`` and detach
the old root (``umount2(".", MNT_DETACH)``, as virtiofsd); remount the
tmpfs and the proc bind read-only, nosuid, nodev, noexec.

Not done: a pid namespace.  Only a process forked after ``unshare(NEWPID)``
enters it, and the supervisor watches, signals and restarts its children by
pid; a forking stage inside every worker is a change for the process tree,
not the sandbox.  Without one, /proc is simply not mounted.

Requires CAP_SYS_ADMIN in the process's user namespace and Linux 5.2
(``open_tree``): root, or a non-root daemon inside the user namespace it
made for itself (:mod:`shardfs.sandbox.userns`).  There the host's mounts
are copied into a less privileged mount namespace, so their flags are
locked: the final remounts keep MS_NOSUID, MS_NODEV and MS_NOEXEC (a
remount that dropped them would be EPERM) and leave the atime flags as
they are; the share itself is only ever bound, never remounted.
"""

from __future__ import annotations

import os

from shardfs.sandbox import linux

#: Where the share appears inside the sandbox.
SHARED_MOUNT = "/shared"
#: The only piece of procfs inside the sandbox (``PROC_SELF_FD`` of the passthrough).
PROC_FD_MOUNT = "/proc/self/fd"
#: Namespaces every sandboxed process gets to itself.
UNSHARE_FLAGS = linux.CLONE_NEWNS | linux.CLONE_NEWNET | linux.CLONE_NEWUTS
#: The root tmpfs: a handful of inodes, never written after set-up.
ROOT_TMPFS_OPTIONS = "mode=0755,size=16k,nr_inodes=16"
_LOCKED = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC


def enter_namespace(shared_dir: str) -> str:
    """Enter the namespace sandbox around ``shared_dir``; return its path inside.

    ``shared_dir`` is an administrator's path (symlinks followed).  On
    failure an OSError is raised and the process may be half-way in: the
    caller must exit rather than serve.
    """
    pid = os.getpid()
    linux.unshare(UNSHARE_FLAGS)
    linux.mount(None, "/", None, linux.MS_SLAVE | linux.MS_REC)
    share = linux.open_tree(linux.AT_FDCWD, shared_dir,
                            linux.OPEN_TREE_CLONE | linux.OPEN_TREE_CLOEXEC | linux.AT_RECURSIVE)
    try:
        procfd = linux.open_tree(linux.AT_FDCWD, f"/proc/{pid}/fd",
                                 linux.OPEN_TREE_CLONE | linux.OPEN_TREE_CLOEXEC)
        try:
            _build_root(shared_dir, share, procfd)
        finally:
            os.close(procfd)
    finally:
        os.close(share)
    return SHARED_MOUNT


def _build_root(attach: str, share: int, procfd: int) -> None:
    linux.mount("tmpfs", attach, "tmpfs", _LOCKED, ROOT_TMPFS_OPTIONS)
    root = os.open(attach, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.mkdir(SHARED_MOUNT.lstrip("/"), 0o755, dir_fd=root)
        parts = PROC_FD_MOUNT.strip("/").split("/")
        for i in range(len(parts)):
            os.mkdir("/".join(parts[:i + 1]), 0o555, dir_fd=root)
        linux.move_mount(share, "", root, SHARED_MOUNT.lstrip("/"),
                         linux.MOVE_MOUNT_F_EMPTY_PATH)
        linux.move_mount(procfd, "", root, PROC_FD_MOUNT.lstrip("/"),
                         linux.MOVE_MOUNT_F_EMPTY_PATH)
        os.fchdir(root)
    finally:
        os.close(root)
    # The old root ends up stacked on the new one; detaching "." removes it.
    linux.pivot_root(".", ".")
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")
    linux.mount(None, "/", None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | _LOCKED)
    linux.mount(None, PROC_FD_MOUNT, None,
                linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | _LOCKED)
