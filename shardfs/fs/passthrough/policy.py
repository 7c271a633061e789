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
"never", as virtiofsd's does.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardfs.abi.fuse import FOPEN_CACHE_DIR, FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE

#: "Forever" for the guest's caches: one day, as virtiofsd uses.
LONG_TIMEOUT_S = 86400.0
#: The "auto" policy revalidates after a second.
AUTO_TIMEOUT_S = 1.0


@dataclass(slots=True, frozen=True)
class CachePolicy:
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


def cache_policy(name: str) -> CachePolicy:
    """The policy called ``name``; ValueError for an unknown one."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; choose from "
                         f"{', '.join(POLICIES)}") from None
