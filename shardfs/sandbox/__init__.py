"""Hardening of the processes that touch the share (DESIGN §4, "Hardening").

A second layer, never the only one: the passthrough already resolves every
guest name one component at a time under held fds.  The sandbox makes a bug
there harmless: a worker sees nothing of the host but the share, holds only
the capabilities passthrough needs, and may make only the system calls it
is known to make.

Modes (``sandbox =`` in the config, ``--sandbox``):

``namespace`` (default)
    new mount, network and UTS namespaces, root pivoted onto a read-only
    tmpfs that holds only the share and this process's own
    ``/proc/PID/fd`` (:mod:`shardfs.sandbox.namespace`); the share is
    served as ``/shared``.  The supervisor also gives the daemon's process
    tree a private IPC namespace (:func:`isolate_daemon`).  As root, in the
    host's user namespace; as a non-root user, the supervisor first enters
    a user namespace of its own where it is root (``uid_map``/``gid_map``
    through newuidmap/newgidmap), as virtiofsd does
    (:mod:`shardfs.sandbox.userns`, :func:`enter_user_namespace`).
``chroot``
    ``chroot(2)`` into the share (for hosts where namespaces are not
    allowed; needs CAP_SYS_CHROOT, so root only: refused at start
    otherwise).  The filesystem is opened before the chroot, so its
    ``/proc/self/fd`` directory fd is held; ``/proc/self/fd/N`` *paths*
    would resolve inside the share, so the passthrough names nodes relative
    to that held directory once the root has changed (``_proc_path``).
``none``
    no change.  A non-root daemon then acts with its own ids: the guest's
    root creates files as the invoking user, other guest ids get EPERM
    (as virtiofsd).  Only when ``modcaps`` is given does a root daemon
    reduce its capabilities here too, to the edited set, as virtiofsd
    does as root in every mode (without ``modcaps`` it keeps them: where
    virtiofsd would still drop to its default set, shardfs changes nothing).

In both confining modes capabilities are then reduced to
:data:`~shardfs.sandbox.caps.PASSTHROUGH_CAPS`, edited by ``modcaps``
(virtiofsd's ``--modcaps``), with no_new_privs, and finally the seccomp
filter (``seccomp = kill | log | none``, independent of the mode) is loaded.

Who calls what: the supervisor calls :func:`enter_user_namespace` and then
:func:`isolate_daemon`, once, before it forks; every child that serves the
share (each worker, the coordinator) calls :func:`confine` right after
fork, before it opens anything, and opens the share inside it.  The
supervisor itself is not confined: it must keep the vhost-user socket and
fork replacements, and never touches the share.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from shardfs.abi.capability import CAP_SETPCAP, CAP_SYS_CHROOT
from shardfs.sandbox import caps, linux, userns
from shardfs.sandbox.namespace import enter_namespace
from shardfs.sandbox.seccomp import SECCOMP_MODES, SeccompFilter

SANDBOX_MODES = ("namespace", "chroot", "none")

T = TypeVar("T")


class SandboxError(OSError):
    """A sandbox step failed; the message names the mode and the step (or the field)."""

    def __str__(self) -> str:
        return str(self.strerror)  # one line for the log, without "[Errno N]"


class _PolicyFields(NamedTuple):
    mode: str = "namespace"
    seccomp: str = "kill"
    #: virtiofsd's ``--modcaps`` (``+sys_admin:-chown``); None keeps PASSTHROUGH_CAPS.
    modcaps: str | None = None


class SandboxPolicy(_PolicyFields):
    """The ``sandbox``, ``seccomp`` and ``modcaps`` settings; ValueError for an
    unknown mode or a bad ``modcaps``.

    Immutable (a NamedTuple whose constructor checks the values).
    """

    __slots__ = ()

    def __new__(cls, mode: str = "namespace", seccomp: str = "kill",
                modcaps: str | None = None) -> SandboxPolicy:
        if mode not in SANDBOX_MODES:
            raise ValueError(f"sandbox mode {mode!r}: one of {', '.join(SANDBOX_MODES)}")
        if seccomp not in SECCOMP_MODES:
            raise ValueError(f"seccomp mode {seccomp!r}: one of {', '.join(SECCOMP_MODES)}")
        caps.kept_capabilities(modcaps)
        return super().__new__(cls, mode, seccomp, modcaps)

    @property
    def keep(self) -> frozenset[int]:
        """The capabilities a confined process keeps."""
        return caps.kept_capabilities(self.modcaps)


def _step(mode: str, what: str, fn: Callable[[], T]) -> T:
    """Run one sandbox step; an OSError becomes a SandboxError that names it."""
    try:
        return fn()
    except SandboxError:
        raise
    except OSError as e:
        hint = " (needs root; or set sandbox = none)" if e.errno == errno.EPERM else ""
        raise SandboxError(e.errno or errno.EIO,
                           f"sandbox {mode}: {what}: {e.strerror or e}{hint}") from e


def enter_user_namespace(policy: SandboxPolicy, uid_map: userns.IdMap = (),
                         gid_map: userns.IdMap = (), *, queues: int = 1,
                         dax: bool = False) -> bool:
    """In the supervisor, before :func:`isolate_daemon`: refuse a configuration this
    euid cannot run, and enter a user namespace when non-root in ``namespace`` mode.

    True when it entered one.  Every refusal and failure is a
    :class:`SandboxError` whose message is one line naming the field
    (see :mod:`shardfs.sandbox.userns`); the caller exits.
    """
    why = userns.refusal(policy.mode, uid_map, gid_map, queues=queues, dax=dax)
    if why is not None:
        raise SandboxError(errno.EPERM, why)
    if not userns.wanted(policy.mode):
        return False
    try:
        userns.enter(uid_map, gid_map)
    except userns.UsernsError as e:
        raise SandboxError(e.errno or errno.EPERM, str(e.strerror)) from e
    return True


def isolate_daemon(policy: SandboxPolicy) -> None:
    """In the supervisor, before any fork: a private IPC namespace for the whole tree.

    Children share it, so the posix_ipc message queues between workers and
    the coordinator still meet, while nothing of the host's System V or
    POSIX IPC is reachable.  Only in ``namespace`` mode.
    """
    if policy.mode == "namespace":
        _step(policy.mode, "unshare(CLONE_NEWIPC)", lambda: linux.unshare(linux.CLONE_NEWIPC))


def confine(policy: SandboxPolicy, shared_dir: str, open_fs: Callable[[str], T]) -> T:
    """Enter the sandbox, open the share with ``open_fs(path)`` and return what it returned.

    ``path`` is where the share is inside the sandbox (``/shared`` in
    namespace mode, ``shared_dir`` otherwise).  ``open_fs`` runs with the
    capabilities serving will have (so whatever it reads of them stays
    true: the credentials switch caches them) and before the seccomp filter
    is loaded.  In chroot mode it runs before the chroot, with
    CAP_SYS_CHROOT and CAP_SETPCAP still held for it.  Every failure is a
    :class:`SandboxError` (an OSError) and leaves the process unfit to
    serve: the caller exits.  Irreversible.
    """
    mode = policy.mode
    flt = None
    if policy.seccomp != "none":
        flt = _step(mode, "seccomp filter", lambda: SeccompFilter(policy.seccomp))
    cap_last = caps.last_cap()
    keep = policy.keep

    def drop(also: frozenset[int] = frozenset()) -> None:
        _step(mode, "capabilities", lambda: caps.drop_capabilities(keep | also, cap_last))

    try:
        if mode == "namespace":
            path = _step(mode, "mount namespace", lambda: enter_namespace(shared_dir))
            drop()
            fs = open_fs(path)
        elif mode == "chroot":
            # chroot(2) needs CAP_SYS_CHROOT, and dropping it from the bounding
            # set afterwards CAP_SETPCAP.
            drop(frozenset({CAP_SYS_CHROOT, CAP_SETPCAP}))
            fs = open_fs(shared_dir)
            _step(mode, "chroot", lambda: enter_chroot(shared_dir))
            drop()
        else:
            if policy.modcaps is not None and os.geteuid() == 0:
                drop()  # see "none" in the module doc
            fs = open_fs(shared_dir)
        if flt is not None:
            _step(mode, "seccomp load", flt.load)
            flt = None
    finally:
        if flt is not None:
            flt.release()
    return fs


def enter_chroot(shared_dir: str) -> None:
    """chroot(2) into ``shared_dir`` and check that ``/`` is now that directory."""
    before = os.stat(shared_dir)
    os.chroot(shared_dir)
    os.chdir("/")
    after = os.stat("/")
    if (before.st_dev, before.st_ino) != (after.st_dev, after.st_ino):
        raise SandboxError(errno.EXDEV, f"{shared_dir} changed under the chroot")


__all__ = ["SANDBOX_MODES", "SECCOMP_MODES", "SandboxError", "SandboxPolicy", "confine",
           "enter_chroot", "enter_user_namespace", "isolate_daemon"]
