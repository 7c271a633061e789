"""The node table: nodeid -> host inode, held by an O_PATH fd.

Contracts (``shardfs.fs.api`` module docstring, DESIGN §4 "Ids"):

* The table owns every node's fd.  :meth:`NodeTable.insert` takes ownership
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
import os
import stat
from dataclasses import dataclass

from shardfs.abi.fuse import FUSE_ROOT_ID
from shardfs.fs.api import FsError

#: Nodes one table holds (the root included) unless told otherwise.
DEFAULT_MAX_NODES = 100_000

#: Errno for a spent budget: the guest sees "too many open files in system".
BUDGET_ERRNO = errno.ENFILE


@dataclass(slots=True)
class Node:
    """One host inode the guest knows about."""

    nodeid: int
    #: O_PATH|O_NOFOLLOW|O_CLOEXEC fd, owned by the table.
    fd: int
    dev: int
    ino: int
    #: ``stat.S_IFMT`` of the inode; a file's type never changes.
    kind: int
    #: Lookups the guest holds; FORGET drops them.
    nlookup: int
    generation: int = 0
    #: Mount id; 0 while the table keys on (dev, ino) alone.
    mnt_id: int = 0

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.kind == stat.S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.kind == stat.S_IFLNK


class NodeTable:
    """nodeid -> :class:`Node`, indexed by (dev, ino) too.  See the module doc."""

    def __init__(self, root_fd: int, max_nodes: int = DEFAULT_MAX_NODES) -> None:
        """Take ownership of ``root_fd`` (an O_PATH fd on the shared dir)."""
        try:
            if max_nodes < 1:
                raise ValueError("max_nodes must leave room for the root")
            st = os.stat(root_fd)
        except BaseException:
            os.close(root_fd)
            raise
        self.max_nodes = max_nodes
        self.root = Node(FUSE_ROOT_ID, root_fd, st.st_dev, st.st_ino,
                         stat.S_IFMT(st.st_mode), nlookup=1)
        self._by_id: dict[int, Node] = {FUSE_ROOT_ID: self.root}
        self._by_inode: dict[tuple[int, int], Node] = {(st.st_dev, st.st_ino): self.root}
        self._next_id = FUSE_ROOT_ID + 1

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, nodeid: int) -> bool:
        return nodeid in self._by_id

    def get(self, nodeid: int) -> Node:
        """The live node, or FsError(ENOENT) for an id never issued or forgotten."""
        node = self._by_id.get(nodeid)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def check_room(self) -> None:
        """Raise the budget error now if one more node would not fit.

        Creating ops call this before touching the host, so a spent budget
        leaves no file behind that the guest was told does not exist.
        """
        if len(self._by_id) >= self.max_nodes:
            raise FsError(BUDGET_ERRNO)

    def insert(self, fd: int, st: os.stat_result) -> Node:
        """Count one lookup of the inode ``fd`` refers to; return its node.

        Takes ownership of ``fd`` (see the module doc).  ``st`` must be the
        stat of ``fd``.
        """
        node = self._by_inode.get((st.st_dev, st.st_ino))
        if node is not None:
            os.close(fd)
            node.nlookup += 1
            return node
        if len(self._by_id) >= self.max_nodes:
            os.close(fd)
            raise FsError(BUDGET_ERRNO)
        node = Node(self._next_id, fd, st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode),
                    nlookup=1)
        self._next_id += 1
        self._by_id[node.nodeid] = node
        self._by_inode[(node.dev, node.ino)] = node
        return node

    def bump(self, nodeid: int) -> Node:
        """Count one more lookup of a live node (LINK answers with its node)."""
        node = self.get(nodeid)
        node.nlookup += 1
        return node

    def forget(self, nodeid: int, nlookup: int) -> None:
        """Drop ``nlookup`` lookups; release the node at zero.  Never raises."""
        node = self._by_id.get(nodeid)
        if node is None or node is self.root or nlookup <= 0:
            return
        node.nlookup = max(node.nlookup - nlookup, 0)
        if node.nlookup == 0:
            self._drop(node)

    def _drop(self, node: Node) -> None:
        del self._by_id[node.nodeid]
        del self._by_inode[(node.dev, node.ino)]
        os.close(node.fd)

    def clear(self) -> None:
        """Release every node but the root (DESTROY, or INIT after a reboot)."""
        for node in list(self._by_id.values()):
            if node is not self.root:
                self._drop(node)

    def close(self) -> None:
        """Release everything, the root included; the table is dead afterwards."""
        self.clear()
        if self._by_id:
            self._by_id.clear()
            self._by_inode.clear()
            os.close(self.root.fd)
