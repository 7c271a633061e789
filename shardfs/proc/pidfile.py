"""``SOCKET_PATH.pid``: who serves a socket path, as virtiofsd records it.

virtiofsd writes its pid to ``<socket-path>.pid`` and holds an exclusive
lock on that file while it runs.  Two things follow, and shardfs keeps both:

* a launcher can wait for the file to know the daemon is up (virtme-ng
  does, and falls back to 9p if it does not appear);
* a second daemon started on the same socket path finds the lock taken and
  stops, instead of unlinking and re-binding a socket a live daemon and its
  VM are using.

The lock is ``flock(2)`` on the open file description, taken before the
socket is bound; the supervisor keeps the fd for its lifetime and removes
the file at shutdown.  With ``--fd`` there is no path and no pid file: the
launcher owns the socket.
"""

from __future__ import annotations

import errno
import fcntl
import os


class PidFileBusy(OSError):
    """Another live daemon holds the pid file; the message names its pid."""


def pid_file_path(socket_path: str) -> str:
    return f"{socket_path}.pid"


def take_pid_file(socket_path: str) -> int:
    """Create and lock ``socket_path.pid`` with our pid; return its fd (the caller keeps it).

    Raises :class:`PidFileBusy` when another process holds it, OSError otherwise.
    """
    path = pid_file_path(socket_path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise PidFileBusy(errno.EADDRINUSE,
                              f"{socket_path} is served by another daemon (pid {other}, "
                              f"{path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def release_pid_file(socket_path: str, fd: int) -> None:
    """Remove the file, then drop the lock (in that order, so no one locks a dead file)."""
    try:
        os.unlink(pid_file_path(socket_path))
    except OSError:
        pass
    os.close(fd)
