"""The handle table: fh -> an open host fd (OPEN, CREATE, OPENDIR).

Contracts:

* The table owns every handle's fd.  :meth:`HandleTable.add` takes
  ownership in every outcome (kept, or closed when the budget is spent);
  :meth:`HandleTable.close` pops and closes it exactly once.
* Fhs come from an increasing counter and are never reused while the table
  lives, so a stale fh cannot reach a later file.  An fh never issued, or
  already released, is EBADF (DESIGN §4 "Ids": forged ids).
* A handle does not pin its node: its fd is a real open file that stays
  valid after the guest forgets the node.
* ``max_handles`` bounds the fds a guest can make us hold (CVE-2020-10717).

The table is not thread-safe: one instance is driven by one thread.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from shardfs.fs.api import FsError
from shardfs.fs.passthrough.nodes import BUDGET_ERRNO

#: Open handles one table holds unless told otherwise.
DEFAULT_MAX_HANDLES = 16_384

#: The first fh issued; 0 is left unused so a zeroed field never matches.
FIRST_FH = 1


@dataclass(slots=True)
class Handle:
    """One open file or directory."""

    fh: int
    #: A real open fd (not O_PATH), owned by the table.
    fd: int
    nodeid: int
    is_dir: bool
    #: The host open flags the fd was opened with (O_ACCMODE etc.).
    flags: int


class HandleTable:
    """fh -> :class:`Handle`.  See the module doc."""

    def __init__(self, max_handles: int = DEFAULT_MAX_HANDLES) -> None:
        if max_handles < 0:
            raise ValueError("max_handles must not be negative")
        self.max_handles = max_handles
        self._by_fh: dict[int, Handle] = {}
        self._next_fh = FIRST_FH

    def __len__(self) -> int:
        return len(self._by_fh)

    def __contains__(self, fh: int) -> bool:
        return fh in self._by_fh

    def check_room(self) -> None:
        """Raise the budget error now if one more handle would not fit."""
        if len(self._by_fh) >= self.max_handles:
            raise FsError(BUDGET_ERRNO)

    def add(self, fd: int, nodeid: int, *, is_dir: bool, flags: int) -> Handle:
        """Register ``fd`` under a fresh fh; takes ownership of ``fd``."""
        if len(self._by_fh) >= self.max_handles:
            os.close(fd)
            raise FsError(BUDGET_ERRNO)
        h = Handle(self._next_fh, fd, nodeid, is_dir, flags)
        self._next_fh += 1
        self._by_fh[h.fh] = h
        return h

    def get(self, fh: int) -> Handle:
        """The live handle, or FsError(EBADF)."""
        h = self._by_fh.get(fh)
        if h is None:
            raise FsError(errno.EBADF)
        return h

    def is_live(self, h: Handle) -> bool:
        """Whether ``h`` is still registered (its fd not yet closed)."""
        return self._by_fh.get(h.fh) is h

    def close(self, fh: int) -> None:
        """Release ``fh`` and close its fd (RELEASE/RELEASEDIR); EBADF if unknown."""
        h = self._by_fh.pop(fh, None)
        if h is None:
            raise FsError(errno.EBADF)
        os.close(h.fd)

    def clear(self) -> None:
        """Close every handle (DESTROY, or INIT after a reboot)."""
        handles, self._by_fh = list(self._by_fh.values()), {}
        for h in handles:
            try:
                os.close(h.fd)
            except OSError:
                pass  # the fd is released even when close reports an error
