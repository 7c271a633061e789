"""Cache policy (``--cache``): timeouts and FOPEN_* flags, as a table.

The names and meanings follow virtiofsd's ``--cache`` option:

========  ===============  ==============  ==================  ======================
policy    entry timeout    attr timeout    OPEN/CREATE flags   OPENDIR flags
========  ===============  ==============  ==================  ======================
never     0                0               FOPEN_DIRECT_IO     0
metadata  1 day            1 day           FOPEN_DIRECT_IO     CACHE_DIR|KEEP_CACHE
auto      1 s              1 s             0                   0
always    1 day            1 day           FOPEN_KEEP_CACHE    CACHE_DIR|KEEP_CACHE
========  ===============  ==============  ==================  ======================

"metadata" caches directory contents like "always" and file data like
"never", as virtiofsd's does.  A ``timeout`` given with the policy (the C
virtiofsd's ``-o timeout=``, shardfs's ``cache_timeout_s``) replaces both
timeouts and leaves the flags as they are.
"""

from __future__ import annotations

from typing import NamedTuple

from shardfs.abi.fuse import FOPEN_CACHE_DIR, FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE

#: "Forever" for the guest's caches: one day, as virtiofsd uses.
LONG_TIMEOUT_S = 86400.0
#: The "auto" policy revalidates after a second.
AUTO_TIMEOUT_S = 1.0


class CachePolicy(NamedTuple):
    name: str
    entry_timeout_s: float
    attr_timeout_s: float
    open_flags: int
    opendir_flags: int


POLICIES: dict[str, CachePolicy] = {
    p.name: p
    for p in (
        CachePolicy("never", 0.0, 0.0, FOPEN_DIRECT_IO, 0),
        CachePolicy("metadata", LONG_TIMEOUT_S, LONG_TIMEOUT_S, FOPEN_DIRECT_IO,
                    FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE),
        CachePolicy("auto", AUTO_TIMEOUT_S, AUTO_TIMEOUT_S, 0, 0),
        CachePolicy("always", LONG_TIMEOUT_S, LONG_TIMEOUT_S, FOPEN_KEEP_CACHE,
                    FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE),
    )
}


def cache_policy(name: str, timeout_s: float | None = None) -> CachePolicy:
    """The policy called ``name``, its entry and attr timeouts replaced by
    ``timeout_s`` when given; ValueError for an unknown name or a negative timeout."""
    try:
        policy = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; choose from "
                         f"{', '.join(POLICIES)}") from None
    if timeout_s is None:
        return policy
    if timeout_s < 0:
        raise ValueError(f"cache timeout {timeout_s}: must not be negative")
    return policy._replace(entry_timeout_s=float(timeout_s), attr_timeout_s=float(timeout_s))
