"""Capabilities: keep what passthrough needs, drop the rest from every set.

A sandboxed process keeps exactly :data:`PASSTHROUGH_CAPS` (virtiofsd's
default set plus CAP_DAC_READ_SEARCH, which ``open_by_handle_at`` needs
for the shared node table, as virtiofsd's ``--inode-file-handles``):

==================  =====================================================
CAP_CHOWN           SETATTR uid/gid, and creating as the guest's caller
CAP_DAC_OVERRIDE    root in the guest is root on the share
CAP_DAC_READ_SEARCH ``open_by_handle_at`` (a node opened by another worker)
CAP_FOWNER          utimes, chmod, xattrs on inodes root does not own
CAP_FSETID          keep S_ISGID/S_ISUID where the guest's root may
CAP_SETGID          ``setfsgid`` per request, ``setgroups([])`` at start
CAP_SETUID          ``setfsuid`` per request
CAP_MKNOD           MKNOD of device nodes by the guest's root
CAP_SETFCAP         ``security.capability`` xattrs (file capabilities)
==================  =====================================================

``modcaps`` (virtiofsd's ``--modcaps=+sys_admin:-chown``) adds to or
removes from that set (:func:`kept_capabilities`), as virtiofsd edits its
own default set; a capability the process does not have is never gained.

Everything else goes: CAP_SYS_ADMIN (no mount, umount, pivot_root,
setns, or another unshare after the sandbox is built), CAP_SYS_CHROOT,
CAP_SYS_PTRACE, CAP_NET_*, CAP_SYS_MODULE, CAP_KILL and the rest.

Order matters: the bounding set is trimmed first (PR_CAPBSET_DROP needs
CAP_SETPCAP, which the capset below removes), ambient capabilities are
cleared, then the effective, permitted and inheritable sets are set with
capset(2).  Finally ``no_new_privs`` is set, so no execve could ever
regain anything (and seccomp can be loaded without CAP_SYS_ADMIN).

The kernel clears the filesystem capabilities from the effective set
while a request runs under a non-root fsuid, and raises them again from
the permitted set when it returns to 0 (capabilities(7), "Effect of user
ID changes on capabilities"): keeping them in the permitted set is what
lets that work.
"""

from __future__ import annotations

import errno

from shardfs.abi.capability import (
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH,
    CAP_FOWNER,
    CAP_FSETID,
    CAP_MKNOD,
    CAP_SETFCAP,
    CAP_SETGID,
    CAP_SETUID,
    parse_modcaps,
)
from shardfs.sandbox import linux

#: What a sandboxed passthrough process keeps (see the module doc).
PASSTHROUGH_CAPS = frozenset({CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER,
                              CAP_FSETID, CAP_SETGID, CAP_SETUID, CAP_MKNOD, CAP_SETFCAP})



def kept_capabilities(modcaps: str | None) -> frozenset[int]:
    """:data:`PASSTHROUGH_CAPS` edited by ``modcaps`` (items applied in order);
    ValueError for a bad ``modcaps`` (the config has checked it already)."""
    keep = set(PASSTHROUGH_CAPS)
    for add, cap in parse_modcaps(modcaps) if modcaps else ():
        if add:
            keep.add(cap)
        else:
            keep.discard(cap)
    return frozenset(keep)


_CAP_LAST_CAP_PATH = "/proc/sys/kernel/cap_last_cap"
#: If /proc cannot tell (it always can before the sandbox), drop this many.
_CAP_LAST_CAP_FALLBACK = 63


def mask(caps: frozenset[int] | set[int]) -> int:
    """The 64-bit mask of a set of capability numbers."""
    out = 0
    for c in caps:
        out |= 1 << c
    return out


def last_cap() -> int:
    """The highest capability number this kernel knows."""
    try:
        with open(_CAP_LAST_CAP_PATH) as f:
            return int(f.read())
    except (OSError, ValueError):
        return _CAP_LAST_CAP_FALLBACK


def drop_capabilities(keep: frozenset[int] = PASSTHROUGH_CAPS, cap_last: int | None = None) -> None:
    """Reduce every capability set of this process to ``keep`` and set no_new_privs.

    Idempotent: calling it again with the same ``keep`` changes nothing.

    ``keep`` is intersected with what the process has: it never gains a
    capability.  ``cap_last`` is the highest capability to drop from the
    bounding set (read it with :func:`last_cap` before /proc goes away).
    Raises OSError if the kernel refuses (e.g. without CAP_SETPCAP).
    """
    top = last_cap() if cap_last is None else cap_last
    for cap in range(top + 1):
        if cap in keep:
            continue
        try:
            if linux.prctl(linux.PR_CAPBSET_READ, cap):  # dropping twice would need SETPCAP
                linux.prctl(linux.PR_CAPBSET_DROP, cap)
        except OSError as e:
            # EINVAL: a number this kernel does not know; nothing to drop.
            if e.errno != errno.EINVAL:
                raise
    linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
    _eff, permitted, _inh = linux.capget()
    kept = permitted & mask(keep)
    linux.capset(kept, kept, 0)
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)


def status_masks(pid: int | str = "self") -> dict[str, int]:
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb of a process, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.startswith("Cap"):
                out[key] = int(value.strip(), 16)
    return out
