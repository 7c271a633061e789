"""The daemon's listening sockets: vhost-user (or ``--fd``) and status.

Contracts:

* :func:`open_listener` returns the vhost-user listener: the inherited
  ``--fd`` (libvirt), which must be a Unix socket, or a fresh socket bound
  at ``socket_path`` (a stale file there is replaced; the pid file, taken
  first by the caller, is what keeps a live daemon's socket from being
  stolen).  With ``socket_group`` it is mode 0660 in that group, as
  virtiofsd's ``--socket-group``.  Up to :data:`LISTEN_BACKLOG` frontends
  wait while one is served.
* :func:`open_status_socket` returns the socket ``shardfs stats`` reads,
  mode 0600, or None when the default directory is not this user's own.
  The supervisor owns it and unlinks its path at shutdown; in the default
  directory, sockets of daemons that are gone are removed first.
* :func:`recv_exact` reads the rest of a vhost-user message from the frontend.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket
import stat

from shardfs.config import Config

# The supervisor's logger: the line it logs is the one the supervisor logged.
log = logging.getLogger("shardfs.supervisor")

#: Frontends queue here while one is served (a VMM restarting, libvirt probing).
LISTEN_BACKLOG = 16


def recv_exact(conn: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from the frontend; EOFError if it closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError("frontend closed mid-message")
        buf += chunk
    return bytes(buf)


def _remove_stale_stats_sockets(directory: str) -> None:
    """Remove ``stats-PID.sock`` left by daemons that were killed (their pid is gone)."""
    for name in os.listdir(directory):
        pid = name.removeprefix("stats-").removesuffix(".sock")
        if name.startswith("stats-") and name.endswith(".sock") and pid.isdigit():
            if not os.path.exists(f"/proc/{pid}"):
                try:
                    os.unlink(os.path.join(directory, name))
                except OSError:
                    pass


def open_status_socket(cfg: Config) -> socket.socket | None:
    """The status socket ``shardfs stats`` reads; None when there is no path for it."""
    path = cfg.status_socket()
    parent = os.path.dirname(path)
    if parent and not cfg.stats_socket and not cfg.socket_path:
        # The default place (--fd alone): a directory of our own, never one that
        # someone else made for us in /tmp.
        os.makedirs(parent, mode=0o700, exist_ok=True)
        st = os.lstat(parent)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            log.warning("no status socket: %s is not a directory of this user", parent)
            return None
        _remove_stale_stats_sockets(parent)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(4)
    return sock


def open_listener(cfg: Config) -> socket.socket:
    """The listening socket: inherited ``--fd`` (libvirt) or a fresh path."""
    if cfg.fd is not None:
        sock = socket.socket(fileno=cfg.fd)
        if sock.family != socket.AF_UNIX:
            raise OSError(errno.EINVAL, f"--fd {cfg.fd} is not a Unix socket")
        return sock
    assert cfg.socket_path
    parent = os.path.dirname(cfg.socket_path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        os.unlink(cfg.socket_path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(cfg.socket_path)
    if cfg.socket_group is not None:
        # As virtiofsd's --socket-group: the VMM's group may connect, others not.
        os.chown(cfg.socket_path, -1, grp.getgrnam(cfg.socket_group).gr_gid)
        os.chmod(cfg.socket_path, 0o660)
    sock.listen(LISTEN_BACKLOG)
    return sock
