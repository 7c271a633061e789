"""What the dispatcher calls besides the filesystem: the DAX window and the lock service.

Protocols, so that :mod:`shardfs.dispatch` depends on no process code: the
worker hands in ``shardfs.proc.dax.DaxClient`` and
``shardfs.proc.lockclient.LockClient``, tests hand in doubles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from shardfs.fs.api import Context
from shardfs.virtq.chain import ChainReader, ChainWriter

if TYPE_CHECKING:
    from shardfs.dispatch import Dispatcher

Handler = Callable[["Dispatcher", Context, int, ChainReader, ChainWriter], int]


class DaxMapper(Protocol):
    """The DAX window as the dispatcher sees it (``shardfs.proc.dax.DaxClient``).

    ``setup`` and ``remove`` raise FsError with the errno for the guest;
    ``released`` and ``forgotten`` are notices that never raise; ``destroy``
    returns once the window is empty.
    """

    @property
    def map_alignment_log2(self) -> int: ...

    def setup(self, nodeid: int, fh: int, foffset: int, length: int, flags: int,
              moffset: int) -> None: ...

    def remove(self, ranges: list[tuple[int, int]]) -> None: ...

    def released(self, nodeid: int, fh: int) -> None: ...

    def forgotten(self, nodeids: list[int]) -> None: ...

    def destroy(self) -> None: ...


class LockService(Protocol):
    """Host-visible file locks as the dispatcher sees them (``shardfs.proc.lockclient``).

    ``open_fd(reopen)`` checks the guest's fh against the node (EBADF) and,
    with ``reopen``, returns a new open file description of the file for
    the service to keep.  Errors are FsError; ``setlk`` raises Pending when
    a SETLKW (``wait_unique`` set) must wait.
    """

    init_flags: int

    def getlk(self, open_fd: Callable[[bool], int | None], nodeid: int, owner: int,
              start: int, end: int, typ: int) -> tuple[int, int, int, int]: ...

    def setlk(self, open_fd: Callable[[bool], int | None], nodeid: int, owner: int,
              is_flock: bool, start: int, end: int, typ: int, pid: int,
              wait_unique: int) -> None: ...

    def flush(self, nodeid: int, owner: int) -> None: ...

    def release(self, nodeid: int, owner: int, flock_unlock: bool) -> None: ...

    def interrupt(self, unique: int) -> None: ...

    def destroy(self) -> None: ...
