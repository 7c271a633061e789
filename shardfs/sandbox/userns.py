"""Rootless: the daemon in a user namespace of its own (``sandbox = namespace`` as non-root).

**Why.**  The namespace sandbox mounts (a tmpfs root, binds, ``pivot_root``),
the supervisor unshares an IPC namespace, and workers switch fsuid/fsgid
per request: all of it needs capabilities.  A non-root user has none in
the host's user namespace, but gets every capability in a user namespace
it creates (user_namespaces(7)).  virtiofsd does the same: with a non-root
euid its ``--sandbox namespace`` adds CLONE_NEWUSER, and ``--uid-map`` /
``--gid-map`` say which ids exist inside (libvirt's session mode passes
``--uid-map=:0:UID:1: --uid-map=:1:SUBUID:65536:`` and the same for gids).

**Maps.**  Without ``uid_map``/``gid_map`` only the caller exists inside,
as root: the process writes ``deny`` to ``/proc/self/setgroups``, then
``0 UID 1`` to ``uid_map`` and ``0 GID 1`` to ``gid_map`` itself (what
an unprivileged process may write for itself; unlike virtiofsd, which maps
the caller to its own id, the guest's root is then the invoking user, as
the daemon's requests run as root inside).  With maps given, the kernel
only takes them from a privileged writer: the setuid helpers ``newuidmap``
and ``newgidmap`` (Debian ``uidmap``) check them against ``/etc/subuid``
and ``/etc/subgid``.  They must run *outside* the namespace, on the
namespaced process's pid.  virtiofsd forks a helper before unshare; so do
we, and the daemon keeps its pid (libvirt's pidfile stays true): a
short-lived child waits on a pipe, the daemon unshares and writes to it,
the child runs the two helpers on the daemon's pid and reports their
complaint (or nothing) on a second pipe, and exits.  A map given for only
one of the two is completed with the caller's own id at 0.

**Order.**  The supervisor enters the namespace after the vhost-user
listener and the status socket are open (they are plain host sockets; a
user namespace changes nothing for them) and before anything else:
:func:`shardfs.sandbox.isolate_daemon` (CLONE_NEWIPC) right after, then the
forks.  Every child inherits the namespace; each builds its mount-namespace
sandbox and drops capabilities inside it as root does.  Only
``sandbox = namespace`` with a non-root euid enters one; root keeps the
host's namespace (its workers act on host ids directly).

**What a guest sees.**  Files the guest's root creates belong to the
invoking user on the host.  An id the maps leave out cannot be used: a
request from such a guest uid or gid is answered EINVAL (setfsuid(2) to an
unmapped id is a silent no-op, so ``fs.passthrough.creds`` checks the map;
virtiofsd's setresuid(2) answers EINVAL too).  A map that leaves 0 out
(virtiofsd's own default maps the caller to its own id) serves the guest's
root as the daemon's id, as virtiofsd never switches for 0.  The kernel
judges the rest:
capabilities inside apply only to inodes whose owner and group are mapped,
so a host file of an unmapped owner is open to the guest's root no further
than to the invoking user.  Supplementary groups cannot be dropped with
``setgroups = deny`` (that is the point of deny: dropping a group could
escape a negative ACL); with one mapped id that is harmless (no other id
can be switched to, virtiofsd's own rule).

**Limits** (refused at start, one line each, by :func:`refusal`):

* ``open_by_handle_at(2)`` needs CAP_DAC_READ_SEARCH in the *initial* user
  namespace (Linux 6.10+ relaxes this only for directories, and only with
  CAP_SYS_ADMIN over the mount, which a confined worker has dropped).
  Workers share nodes by file handle (``fs.passthrough.shared``), so a
  worker could not open what another one looked up; rather than answering
  the guest EPERM or ESTALE, a rootless daemon serves one request queue
  (``num_request_queues = 1``, the default).  The same holds for a
  non-root daemon with ``sandbox = none``, unless it holds
  CAP_DAC_READ_SEARCH (e.g. as an ambient capability).  Routes weighed and
  left: pidfd_getfd(2) from the worker holding the fd needs that worker
  dumpable, which every fsuid switch clears (commit_creds), plus Yama's
  consent; passing fds over a socket needs the holder alive and answering,
  which crash isolation rules out (``fs.passthrough.shared``).  For the
  same reason DAX (the coordinator maps files by handle) is refused, and a
  worker that is restarted after a crash answers EPERM for the nodes its
  predecessor looked up, until the guest looks them up again (not refused:
  a crash is a bug, and a restart is still better than none).
* ``sandbox = chroot`` needs CAP_SYS_CHROOT in the host's namespace (as
  virtiofsd: root only).
* ``uid_map``/``gid_map`` are only for a non-root daemon with
  ``sandbox = namespace`` (as virtiofsd).
"""

from __future__ import annotations

import errno
import os

from shardfs.abi.capability import CAP_DAC_READ_SEARCH
from shardfs.sandbox import linux

#: One ``(inside, outside, count)`` line of a uid or gid map.
IdRange = tuple[int, int, int]
IdMap = tuple[IdRange, ...]

NEWUIDMAP = "newuidmap"
NEWGIDMAP = "newgidmap"
#: The helper's word to go ahead, written once the namespace exists.
_GO = b"g"
_PROC_SELF = "/proc/self"


class UsernsError(OSError):
    """The user namespace could not be set up; ``strerror`` is one line naming the field."""


def wanted(mode: str) -> bool:
    """Whether the daemon must enter a user namespace: ``namespace`` mode, non-root."""
    return mode == "namespace" and os.geteuid() != 0


def refusal(mode: str, uid_map: IdMap, gid_map: IdMap, *, queues: int,
            dax: bool) -> str | None:
    """Why this configuration cannot run for this euid (one line naming the field), or None."""
    root = os.geteuid() == 0
    if not root and mode == "chroot":
        return ("sandbox: chroot needs root (chroot(2) needs CAP_SYS_CHROOT on the host); "
                "as a non-root user use sandbox = namespace (a user namespace) or none")
    for name, given in (("uid_map", uid_map), ("gid_map", gid_map)):
        if given and (root or mode != "namespace"):
            return (f"{name}: only for a non-root user with sandbox = namespace "
                    "(it maps ids into the daemon's user namespace)")
    # Capabilities inside a user namespace do not count for open_by_handle_at(2).
    by_handle = root if mode == "namespace" else root or _host_cap(CAP_DAC_READ_SEARCH)
    if not by_handle and queues > 1:
        return (f"num_request_queues: {queues}, but a non-root daemon serves 1 (workers share "
                "nodes by file handle, and open_by_handle_at(2) needs CAP_DAC_READ_SEARCH in "
                "the host's user namespace)")
    if not by_handle and dax:
        return ("dax_window: DAX needs root (the coordinator opens files by handle, and "
                "open_by_handle_at(2) needs CAP_DAC_READ_SEARCH in the host's user namespace)")
    if root or mode != "namespace":
        return None
    import shutil  # here, not at the top: only a rootless start with maps needs it

    for name, given, tool in (("uid_map", uid_map, NEWUIDMAP), ("gid_map", gid_map, NEWGIDMAP)):
        if given and shutil.which(tool) is None:
            return f"{name}: {tool} is not installed (Debian package uidmap)"
    return None


def _host_cap(cap: int) -> bool:
    """Whether ``cap`` is effective now (called before any user namespace is entered)."""
    return bool(linux.capget()[0] >> cap & 1)


def format_map(ranges: IdMap) -> str:
    """``ranges`` in virtiofsd's syntax, for messages: ``:0:1000:1: :1:100000:65536:``."""
    return " ".join(f":{i}:{o}:{c}:" for i, o, c in ranges)


def enter(uid_map: IdMap = (), gid_map: IdMap = ()) -> None:
    """unshare(CLONE_NEWUSER) and map ids (see the module doc); the pid stays the same.

    Must run single-threaded (unshare(2) refuses CLONE_NEWUSER otherwise).
    Raises :class:`UsernsError`; on failure the process may be in an
    unmapped namespace and must exit.
    """
    # Read before unshare: inside, an unmapped id reads as the overflow id.
    uid, gid = os.geteuid(), os.getegid()
    if not uid_map and not gid_map:
        _unshare()
        _map_self(uid, gid)
        return
    _enter_with_helper(uid_map or ((0, uid, 1),), gid_map or ((0, gid, 1),))


def _unshare() -> None:
    try:
        linux.unshare(linux.CLONE_NEWUSER)
    except OSError as e:
        hint = (" (the process must be single-threaded)" if e.errno == errno.EINVAL else
                " (user namespaces disabled or restricted for this user? see "
                "user.max_user_namespaces; or use sandbox = none)")
        raise UsernsError(e.errno or errno.EPERM,
                          f"sandbox namespace: unshare(CLONE_NEWUSER): {e.strerror}{hint}") from e


def _map_self(uid: int, gid: int) -> None:
    """Map only the caller (host ``uid``, ``gid``) to root: what it may write itself."""
    steps = (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1"))
    for name, text in steps:
        try:
            with open(f"{_PROC_SELF}/{name}", "w") as f:
                f.write(text)
        except OSError as e:
            raise UsernsError(e.errno or errno.EPERM,
                              f"sandbox namespace: writing {text!r} to /proc/self/{name}: "
                              f"{e.strerror}") from e


def _enter_with_helper(uid_map: IdMap, gid_map: IdMap) -> None:
    """Fork the helper, unshare, let it run newuidmap/newgidmap on our pid, check its word."""
    pid = os.getpid()
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    res_r, res_w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:  # pragma: no cover - the helper; its outcome is read below
        code = 1
        try:
            os.close(go_w)
            os.close(res_r)
            if os.read(go_r, 1) == _GO:
                problem = _run_helpers(pid, uid_map, gid_map)
                os.write(res_w, problem.encode())
                code = 0
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(res_w)
    try:
        _unshare()  # on failure, the EOF on its pipe sends the helper away
        os.write(go_w, _GO)
        os.close(go_w)
        go_w = -1
        chunks = []
        while chunk := os.read(res_r, 4096):
            chunks.append(chunk)
        problem = b"".join(chunks).decode(errors="replace")
    finally:
        if go_w >= 0:
            os.close(go_w)
        os.close(res_r)
        _, status = os.waitpid(child, 0)
    if problem:
        raise UsernsError(errno.EPERM, problem)
    if os.waitstatus_to_exitcode(status) != 0:
        raise UsernsError(errno.EPERM, "sandbox namespace: the id-map helper process failed")


def _run_helpers(pid: int, uid_map: IdMap, gid_map: IdMap) -> str:
    """Run newuidmap and newgidmap on ``pid``; "" or one line naming the refused map."""
    # Imported here: every daemon forks its children from a heap that would
    # otherwise carry subprocess (and what it imports) for this one helper.
    import subprocess

    for name, tool, ranges in (("uid_map", NEWUIDMAP, uid_map), ("gid_map", NEWGIDMAP, gid_map)):
        argv = [tool, str(pid)] + [str(n) for r in ranges for n in r]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False,
                                  stdin=subprocess.DEVNULL)
        except OSError as e:
            return f"{name}: cannot run {tool}: {e.strerror}"
        if done.returncode != 0:
            why = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
            return f"{name}: {tool} refused {format_map(ranges)} ({why})"
    return ""


def read_map(kind: str, pid: int | str = "self") -> IdMap:
    """The ``uid_map`` or ``gid_map`` of a process as (inside, outside, count) lines."""
    with open(f"/proc/{pid}/{kind}") as f:
        return tuple((int(a), int(b), int(c)) for a, b, c in (line.split() for line in f))


def may_setgroups(pid: int | str = "self") -> bool:
    """False when setgroups(2) is denied in this user namespace (see the module doc)."""
    try:
        with open(f"/proc/{pid}/setgroups") as f:
            return f.read().strip() != "deny"
    except OSError:
        return True
