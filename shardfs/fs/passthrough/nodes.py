"""Nodes: host inodes the guest knows about, each held by an O_PATH fd.

The table itself is :class:`shardfs.fs.passthrough.shared.SharedNodeTable`,
shared by every worker process; this module holds the per-worker view of
one node and the budget constants.

Contracts (``shardfs.fs.api`` module docstring, DESIGN §4 "Ids"):

* The table owns every node's fd.  :meth:`SharedNodeTable.insert` takes ownership
  of the fd it is given in every outcome: it is kept, or closed because the
  inode already has a node, or closed because the budget is spent.
* One host inode has one node: the index by ``(st_dev, st_ino)`` makes a
  hard link or a repeated lookup return the same nodeid with its lookup
  count bumped.  The O_PATH fd pins the inode, so its number cannot be
  reused by another file while the node lives.
* Nodeids come from an increasing counter and are never reused while the
  table lives, so the generation is always 0 (FUSE needs (nodeid,
  generation) unique, and the nodeid alone already is).
* Lookup-count arithmetic is bounded: a FORGET larger than the count
  clamps to zero, never goes negative, and an unknown or forged nodeid is
  ignored.  The root (FUSE_ROOT_ID) is never dropped.
* ``max_nodes`` bounds the fds a guest can make us hold (CVE-2020-10717).

The table is not thread-safe: one instance is driven by one thread.
"""

from __future__ import annotations

import errno
import stat

#: Nodes one table holds (the root included) unless told otherwise.
DEFAULT_MAX_NODES = 100_000

#: Errno for a spent budget: the guest sees "too many open files in system".
BUDGET_ERRNO = errno.ENFILE


class Node:
    """One host inode the guest knows about."""

    __slots__ = ("nodeid", "fd", "dev", "ino", "kind", "nlookup", "generation", "mnt_id")

    nodeid: int
    #: O_PATH|O_NOFOLLOW|O_CLOEXEC fd, owned by the table.
    fd: int
    dev: int
    ino: int
    #: ``stat.S_IFMT`` of the inode; a file's type never changes.
    kind: int
    #: Lookups the guest holds; FORGET drops them.
    nlookup: int
    generation: int
    #: Mount id; 0 while the table keys on (dev, ino) alone.
    mnt_id: int

    def __init__(self, nodeid: int, fd: int, dev: int, ino: int, kind: int, nlookup: int,
                 generation: int = 0, mnt_id: int = 0) -> None:
        self.nodeid = nodeid
        self.fd = fd
        self.dev = dev
        self.ino = ino
        self.kind = kind
        self.nlookup = nlookup
        self.generation = generation
        self.mnt_id = mnt_id

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.kind == stat.S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.kind == stat.S_IFLNK
