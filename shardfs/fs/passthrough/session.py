"""What the passthrough asks for at FUSE INIT, from its options.

The dispatcher turns on the flags every session gets
(``Dispatcher.WANTED_INIT_FLAGS``); the ones an option governs are asked
for here, as virtiofsd's ``PassthroughFs::init`` does, and each is on
exactly when it is asked for and the guest offers it:

====================  ===========================================  ==================
option                flags                                        virtiofsd flag
====================  ===========================================  ==================
readdirplus (on)      FUSE_DO_READDIRPLUS, FUSE_READDIRPLUS_AUTO   --no-readdirplus
announce_submounts    FUSE_SUBMOUNTS; then LOOKUP and READDIRPLUS  --announce-submounts
(on)                  mark mount points FUSE_ATTR_SUBMOUNT         (default on)
allow_mmap            FUSE_DIRECT_IO_ALLOW_MMAP (flags2)           --allow-mmap
writeback             FUSE_WRITEBACK_CACHE                         --writeback
killpriv_v2           FUSE_HANDLE_KILLPRIV_V2                      --killpriv-v2
posix_acl             FUSE_POSIX_ACL, FUSE_DONT_MASK, SETXATTR_EXT  --posix-acl
security_label        FUSE_SECURITY_CTX                            --security-label
(always)              FUSE_CREATE_SUPP_GROUP                       (always)
====================  ===========================================  ==================

With readdirplus off the guest never sends READDIRPLUS; one that does
anyway is still answered, as virtiofsd answers it.  virtiofsd offers
FUSE_SUBMOUNTS even with announcing off; shardfs then leaves it out, which
the guest cannot tell apart (no entry carries FUSE_ATTR_SUBMOUNT either way).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from shardfs.abi.fuse import (
    FUSE_CREATE_SUPP_GROUP,
    FUSE_DIRECT_IO_ALLOW_MMAP,
    FUSE_DO_READDIRPLUS,
    FUSE_DONT_MASK,
    FUSE_HANDLE_KILLPRIV_V2,
    FUSE_POSIX_ACL,
    FUSE_READDIRPLUS_AUTO,
    FUSE_SECURITY_CTX,
    FUSE_SETXATTR_EXT,
    FUSE_SUBMOUNTS,
    FUSE_WRITEBACK_CACHE,
)

log = logging.getLogger("shardfs.fs.passthrough")


class InitOptions(NamedTuple):
    """The passthrough's options that decide INIT flags (virtiofsd's defaults)."""

    writeback: bool = False
    killpriv_v2: bool = False
    posix_acl: bool = False
    security_label: bool = False
    announce_submounts: bool = True
    readdirplus: bool = True
    allow_mmap: bool = False


def wanted_flags(opts: InitOptions, capable: int) -> int:
    """The INIT flags to ask for when the guest offers ``capable``.

    Pure apart from logging: a feature the options want and the guest does
    not offer is logged once per INIT and stays off.  POSIX ACLs are asked
    for only together with DONT_MASK (the guest must send modes unmasked).
    """
    wants = FUSE_CREATE_SUPP_GROUP
    if opts.readdirplus:
        wants |= FUSE_DO_READDIRPLUS | FUSE_READDIRPLUS_AUTO
    if opts.announce_submounts:
        wants |= FUSE_SUBMOUNTS
        if not capable & FUSE_SUBMOUNTS:
            log.info("announce_submounts: the guest does not offer FUSE_SUBMOUNTS; "
                     "mount points are not announced")
    if opts.allow_mmap:
        wants |= FUSE_DIRECT_IO_ALLOW_MMAP
    if opts.writeback:
        wants |= FUSE_WRITEBACK_CACHE
    if opts.killpriv_v2:
        wants |= FUSE_HANDLE_KILLPRIV_V2
    if opts.posix_acl:
        if capable & (FUSE_POSIX_ACL | FUSE_DONT_MASK) == FUSE_POSIX_ACL | FUSE_DONT_MASK:
            wants |= FUSE_POSIX_ACL | FUSE_DONT_MASK | FUSE_SETXATTR_EXT
        else:
            log.warning("posix_acl: the guest does not offer FUSE_POSIX_ACL and "
                        "FUSE_DONT_MASK; ACLs stay off")
    if opts.security_label:
        wants |= FUSE_SECURITY_CTX
    for flag, name in ((FUSE_HANDLE_KILLPRIV_V2, "killpriv_v2"),
                       (FUSE_SECURITY_CTX, "security_label")):
        if wants & flag and not capable & flag:
            log.warning("%s: the guest does not offer it; off for this session", name)
    return wants
