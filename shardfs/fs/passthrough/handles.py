"""Handles: fh -> an open host fd (OPEN, CREATE, OPENDIR).

The table itself is :class:`shardfs.fs.passthrough.shared.SharedHandleTable`,
shared by every worker process; this module holds the per-worker view of
one handle.

Contracts:

* The table owns every handle's fd.  :meth:`SharedHandleTable.add` takes
  ownership in every outcome (kept, or closed when the budget is spent);
  :meth:`SharedHandleTable.close` pops and closes it exactly once.
* Fhs come from an increasing counter and are never reused while the table
  lives, so a stale fh cannot reach a later file.  An fh never issued, or
  already released, is EBADF (DESIGN §4 "Ids": forged ids).
* A handle does not pin its node: its fd is a real open file that stays
  valid after the guest forgets the node.
* ``max_handles`` bounds the fds a guest can make us hold (CVE-2020-10717).

The table is not thread-safe: one instance is driven by one thread.
"""

from __future__ import annotations

#: Open handles one table holds unless told otherwise.
DEFAULT_MAX_HANDLES = 16_384

#: The first fh issued; 0 is left unused so a zeroed field never matches.
FIRST_FH = 1


class Handle:
    """One open file or directory."""

    __slots__ = ("fh", "fd", "nodeid", "is_dir", "flags")

    fh: int
    #: A real open fd (not O_PATH), owned by the table.
    fd: int
    nodeid: int
    is_dir: bool
    #: The host open flags the fd was opened with (O_ACCMODE etc.).
    flags: int

    def __init__(self, fh: int, fd: int, nodeid: int, is_dir: bool, flags: int) -> None:
        self.fh = fh
        self.fd = fd
        self.nodeid = nodeid
        self.is_dir = is_dir
        self.flags = flags
