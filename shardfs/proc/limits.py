"""RLIMIT_NOFILE for the whole daemon, set once before any fork (virtiofsd's --rlimit-nofile).

virtiofsd raises the limit at start to ``min(1,000,000, fs.nr_open)`` unless
told otherwise, so that a guest's working set of open files is bounded by
the budgets rather than by a distribution's default of 1,024; libvirt's
``<openfiles max='N'/>`` passes ``--rlimit-nofile=N``.  shardfs does the
same in the supervisor, whose children inherit it, and then sizes each
worker's node and handle budgets below it
(:func:`shardfs.fs.passthrough.fs.fd_budgets`).

Contract of :func:`apply_rlimit_nofile`:

``None`` (the default)
    try virtiofsd's default; if raising the hard limit is not permitted
    (an unprivileged user), keep the hard limit and raise only the soft
    one to it.  Never an error.
``0``
    leave the limit as inherited.
``N``
    set soft and hard to N; an OSError (EPERM when N exceeds the hard limit
    without CAP_SYS_RESOURCE, EINVAL beyond fs.nr_open) is the caller's to
    report: the user asked for exactly this.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("shardfs")

#: virtiofsd's default target, capped by fs.nr_open.
DEFAULT_RLIMIT_NOFILE = 1_000_000
NR_OPEN_PATH = "/proc/sys/fs/nr_open"


def _nr_open() -> int:
    try:
        with open(NR_OPEN_PATH) as f:
            return int(f.read())
    except (OSError, ValueError):
        return DEFAULT_RLIMIT_NOFILE


def apply_rlimit_nofile(wanted: int | None) -> int:
    """Set RLIMIT_NOFILE as described above; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted == 0:
        return soft
    if wanted is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
        except ValueError as e:  # Python's own check (e.g. above the hard limit)
            raise OSError(1, f"cannot set {wanted}: {e}") from None
        except OSError as e:
            raise OSError(e.errno, f"cannot set {wanted}: {e.strerror}") from None
        return wanted
    target = min(DEFAULT_RLIMIT_NOFILE, _nr_open())
    if hard != resource.RLIM_INFINITY and hard >= target and soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)
                                                    if hard != resource.RLIM_INFINITY
                                                    else hard))
        return target
    except (OSError, ValueError):
        pass
    if soft != hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug("RLIMIT_NOFILE: raised the soft limit to the hard one (%d)", hard)
        return hard
    return soft
