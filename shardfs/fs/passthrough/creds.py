"""Run an operation with the caller's fsuid/fsgid (DESIGN §4).

**What runs under the caller's ids.**  Every op whose *outcome* depends on
who asks: CREATE, TMPFILE, MKNOD, MKDIR, SYMLINK and LINK (the owner and
group of a new inode, setgid inheritance from the parent, S_ISGID dropped
for a creator outside the parent's group, ``protected_hardlinks``), SETATTR
(chmod by a non-owner is EPERM and drops S_ISGID for a caller outside the
file's group; a non-root truncate clears setuid/setgid; explicit times
need the owner; chown alone runs as the daemon, see ``attrs``), the POSIX
ACL xattrs (owner only; the mode update drops
S_ISGID) and ACCESS.  The host kernel applies those rules itself, so they
are its own and not a re-implementation.

**What the guest kernel decides.**  virtio-fs always mounts with
``default_permissions``, so the guest kernel has already checked the
caller's permission with its full credentials, supplementary groups and
(with ``posix_acl``) ACLs included, before any request reaches us.  The
host knows one fsgid and, for creating ops, at most one supplementary group
(FUSE_CREATE_SUPP_GROUP), so a second DAC check on the host could only
*wrongly* refuse what a guest group member may do.  Hence, while switched,
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH stay in the effective set (as
virtiofsd keeps DAC_OVERRIDE when it cannot learn the groups); CAP_CHOWN,
CAP_FOWNER, CAP_FSETID and CAP_MKNOD do not, so the ownership rules above
are the host's.  ACCESS alone (``strict=True``) is judged without them:
it exists to ask the host that very question.

Keeping DAC needs capset(2); a daemon whose seccomp filter forbids it is
built with ``guest_dac=False`` (:func:`configure`), and then switched ops
meet the host's DAC check with the caller's fsuid, fsgid and the one
supplementary group of FUSE_CREATE_SUPP_GROUP, as virtiofsd does when it
can learn that group.

Ops whose result does not depend on the caller (LOOKUP, GETATTR, READ,
WRITE, READDIR, UNLINK, RENAME, the other xattrs...) run as the daemon.
Each change of credentials costs the kernel about 2 us here (it copies and
commits a new ``struct cred``), so a switch and its restore cost about
13 us for a non-root caller (ids, capset, ids back): doing it for every op
would make a 2 us GETATTR take 15 us, for no change in any result.  For
callers with the daemon's own ids nothing is switched.

Node and handle ids are resolved *before* switching: reopening a node by
file handle needs CAP_DAC_READ_SEARCH in full, and a handle's fd is never
reopened under the caller's ids (an open file survives a later chmod).

**Rootless** (``sandbox.userns``).  In a user namespace only the mapped ids
exist, and setfsuid(2) to any other id is a silent no-op: a create would
then quietly make a file owned by the daemon.  So a switch is read back
unless the first call of :func:`_read_home` saw an id no user namespace
maps (``(uid_t)-2``) take, and a switch that does not take is EINVAL when
the daemon holds CAP_SETUID/CAP_SETGID (the id is not mapped: what
virtiofsd's setresuid(2) answers), EPERM otherwise.  With
``setgroups = deny`` (the namespace maps only the caller) a create's
supplementary group cannot be set and is left out; the guest kernel has
checked the caller's groups already.  A daemon that is not uid 0 and
cannot become it (non-root with ``sandbox = none``, or a user namespace
whose map leaves 0 out) serves the guest's root as itself, as virtiofsd
never switches for uid 0; the same for gid 0.  Other ids then get EPERM
(no CAP_SETUID) or EINVAL (not mapped).

Side effects: ``setfsuid``/``setfsgid``/``capset`` act on the calling
thread; ``setgroups`` (for the one supplementary group a create may carry)
acts on the process, which is single-threaded.  Supplementary groups are
otherwise empty: the worker drops them at start (CVE-2022-0358).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from types import TracebackType

from shardfs.abi import capability
from shardfs.fs.api import Context, FsError
from shardfs.fs.passthrough import sys as lsys

#: Kept in the effective set while switched (see the module doc).
KEEP_DAC_MASK = (1 << capability.CAP_DAC_OVERRIDE) | (1 << capability.CAP_DAC_READ_SEARCH)


class _Home:
    """The daemon's own ids and capabilities, read once."""

    __slots__ = ("fsuid", "fsgid", "groups", "switched", "restore", "setid", "sure", "groups_ok",
                 "root_uid_self", "root_gid_self")

    fsuid: int
    fsgid: int
    groups: list[int]
    #: capset to apply after switching away from fsuid 0 (None: leave the kernel's).
    switched: lsys.PreparedCaps | None
    #: capset to apply after switching back (None: the kernel's restore is exact).
    restore: lsys.PreparedCaps | None
    #: CAP_SETUID and CAP_SETGID are effective: setfsuid/setfsgid cannot fail
    #: for a valid id (so a switch that does not take is EINVAL, not EPERM).
    setid: bool
    #: ``setid``, and every id exists (no user namespace map leaves ids out):
    #: the switch needs no read-back.
    sure: bool
    #: setgroups(2) is allowed (not denied by a user namespace).
    groups_ok: bool
    #: The daemon is not uid (gid) 0 and cannot become it: the guest's root
    #: is served as the daemon's own uid (gid) (see the module doc).
    root_uid_self: bool
    root_gid_self: bool

    def __init__(self, fsuid: int, fsgid: int, groups: list[int],
                 switched: lsys.PreparedCaps | None, restore: lsys.PreparedCaps | None,
                 setid: bool, sure: bool, groups_ok: bool, root_uid_self: bool,
                 root_gid_self: bool) -> None:
        self.fsuid = fsuid
        self.fsgid = fsgid
        self.groups = groups
        self.switched = switched
        self.restore = restore
        self.setid = setid
        self.sure = sure
        self.groups_ok = groups_ok
        self.root_uid_self = root_uid_self
        self.root_gid_self = root_gid_self


_home: _Home | None = None
_guest_dac = True


def configure(*, guest_dac: bool) -> None:
    """Choose whether switched ops keep CAP_DAC_OVERRIDE/READ_SEARCH (see the
    module doc); process-wide, like the credentials themselves."""
    global _home, _guest_dac
    _guest_dac = guest_dac
    _home = None


def _read_home() -> _Home:
    global _home
    if _home is None:
        fsuid = lsys.setfsuid(lsys.ID_UNCHANGED)
        fsgid = lsys.setfsgid(lsys.ID_UNCHANGED)
        switched = restore = None
        try:
            caps = lsys.capget()
        except OSError:
            caps = None
        setid_mask = (1 << capability.CAP_SETUID) | (1 << capability.CAP_SETGID)
        setid = caps is not None and caps.effective & setid_mask == setid_mask
        sure = setid and _every_id_exists()
        groups = os.getgroups()
        try:
            os.setgroups(groups)  # changes nothing; EPERM under setgroups = deny
            groups_ok = True
        except OSError:
            groups_ok = False
        root_uid_self = fsuid != 0 and not _takes(lsys.setfsuid, 0)
        root_gid_self = fsgid != 0 and not _takes(lsys.setfsgid, 0)
        if caps is not None and fsuid == 0:
            if _guest_dac:
                eff = (caps.effective & ~capability.CAP_FS_MASK) | (caps.permitted & KEEP_DAC_MASK)
                switched = lsys.PreparedCaps(caps._replace(effective=eff))
            # Back at fsuid 0 the kernel raises every permitted fs capability.
            if caps.effective & capability.CAP_FS_MASK != caps.permitted & capability.CAP_FS_MASK:
                restore = lsys.PreparedCaps(caps)
        _home = _Home(fsuid, fsgid, groups, switched, restore, setid, sure, groups_ok,
                      root_uid_self, root_gid_self)
    return _home


#: An id that only a map of every id (the host's own) contains: ``(uid_t)-2``.
_PROBE_ID = lsys.ID_UNCHANGED - 1


def _takes(setfs: Callable[[int], int], ident: int) -> bool:
    """Whether ``setfs(ident)`` (setfsuid or setfsgid) takes; the old id comes back."""
    old = setfs(ident)
    ok = setfs(lsys.ID_UNCHANGED) == ident
    setfs(old)
    return ok


def _every_id_exists() -> bool:
    """Whether setfsuid/setfsgid to ``(uid_t)-2`` take (they do with CAP_SETUID/
    CAP_SETGID unless a user namespace map leaves that id out)."""
    return _takes(lsys.setfsuid, _PROBE_ID) and _takes(lsys.setfsgid, _PROBE_ID)


class _Switched:
    """The context manager for a real switch; see :func:`caller_creds`."""

    __slots__ = ("uid", "gid", "groups", "strict", "_old_uid", "_old_gid", "_caps",
                 "_grouped")

    def __init__(self, uid: int, gid: int, groups: tuple[int, ...], strict: bool) -> None:
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.strict = strict
        self._old_uid = self._old_gid = -1
        self._caps = False
        self._grouped = False

    def __enter__(self) -> None:
        home = _read_home()
        if self.uid == lsys.ID_UNCHANGED or self.gid == lsys.ID_UNCHANGED:
            raise FsError(errno.EINVAL)  # (uid_t)-1 is "query", never an id
        try:
            if self.groups:
                os.setgroups(list(self.groups))
                self._grouped = True
            if self.gid != home.fsgid:
                self._old_gid = lsys.setfsgid(self.gid)
                if not home.sure and lsys.setfsgid(lsys.ID_UNCHANGED) != self.gid:
                    raise FsError(errno.EINVAL if home.setid else errno.EPERM)
            if self.uid != home.fsuid:
                self._old_uid = lsys.setfsuid(self.uid)
                if not home.sure and lsys.setfsuid(lsys.ID_UNCHANGED) != self.uid:
                    raise FsError(errno.EINVAL if home.setid else errno.EPERM)
            if home.fsuid == 0 and self.uid != 0:
                self._caps = True  # the kernel dropped the fs capabilities
                if home.switched is not None and not self.strict:
                    home.switched.apply()
        except BaseException:
            self._restore(home)
            raise

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._restore(_read_home())

    def _restore(self, home: _Home) -> None:
        """Back to the daemon's ids, group last (it was switched first)."""
        if self._old_uid >= 0:
            lsys.setfsuid(self._old_uid)
        if self._old_gid >= 0:
            lsys.setfsgid(self._old_gid)
        if self._caps and home.restore is not None:
            home.restore.apply()
        if self._grouped:
            os.setgroups(home.groups)
        self._old_uid = self._old_gid = -1
        self._caps = self._grouped = False


class _Unchanged:
    """The no-op context manager for callers with the daemon's own ids."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None


_UNCHANGED = _Unchanged()


def caller_creds(ctx: Context, *, strict: bool = False) -> _Switched | _Unchanged:
    """A context manager running its block with the caller's fsuid/fsgid.

    ``ctx.supp_groups`` (host ids) become the supplementary groups for the
    block.  Unless ``strict``, DAC checks stay the guest kernel's (see the
    module doc).  EPERM if the switch does not take (no CAP_SETUID/SETGID),
    EINVAL for the id ``(uid_t)-1`` and for an id the user namespace does
    not map.  The daemon's ids, capabilities and
    groups always come back, whatever the block raises.  A caller with the
    daemon's own ids and no extra groups switches nothing.
    """
    home = _read_home()
    uid, gid = ctx.uid, ctx.gid
    groups = ctx.supp_groups if home.groups_ok else ()
    if uid == 0 and home.root_uid_self:
        uid = home.fsuid
    if gid == 0 and home.root_gid_self:
        gid = home.fsgid
    if uid == home.fsuid and gid == home.fsgid and not groups:
        return _UNCHANGED
    return _Switched(uid, gid, groups, strict)
