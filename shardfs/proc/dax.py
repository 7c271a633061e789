"""The DAX window: its geometry and checks, the mapping table, and the worker's client.

FUSE_SETUPMAPPING and FUSE_REMOVEMAPPING (DESIGN §3) arrive on any request
queue; the coordinator process (:mod:`shardfs.proc.coordinator`) owns the
window and applies them one at a time.  This module holds what both sides
share:

* :class:`Geometry` and its checks.  Every guest-supplied offset and length
  is checked here before anything reaches the frontend: non-zero, aligned
  to the map alignment (the host page, which INIT announces as
  ``map_alignment``), inside the window *without wrapping* (alioth adds
  ``moffset + len`` unchecked and maps with MAP_FIXED, so an unchecked
  range is a write into the VMM's own memory), a file range that fits
  ``loff_t``, and only the READ and WRITE flags.  A failed check is EINVAL
  and nothing is sent anywhere.
* :class:`DaxTable`: what is mapped where, as non-overlapping
  :class:`Mapping` entries.  A new mapping *replaces* whatever it overlaps,
  as FUSE DAX needs (the Linux driver remaps a 2 MiB range in place, e.g.
  to upgrade it from read-only to writable), and an overlapped entry keeps
  the parts outside the new range, as MAP_FIXED leaves them.
* :class:`DaxShared`: a page of counters the coordinator writes and the
  workers and the supervisor read (mapping count, requests, refusals).
* The link between a worker and the coordinator, and :class:`DaxClient`,
  the worker's end of it, which the dispatcher calls.

**Message path (decision).**  Each worker has one SOCK_SEQPACKET socketpair
to the coordinator (the supervisor makes it and hands the ends over its
control sockets), carrying msgpack lists.  The design card proposed a
posix_ipc queue.  Measured here (``scripts/bench-dax --ipc``, medians of
msgpack round trips between two processes), the queue is 2 us faster when
both processes stay hot (9.0 against 10.9 us) and no different when a
wake-up crosses CPUs (49-66 against 52-63 us); a SETUPMAPPING costs about
330 us end to end, so the choice is made on semantics, where the socket
wins:

* a peer's death is seen at once as EOF (a worker blocked on a dead
  coordinator gets EIO immediately, the coordinator learns that a worker
  died), where a queue only ever times out;
* each link belongs to one incarnation of one worker, so a reply can never
  reach a replacement worker or another queue; per-worker reply queues
  would need sequence numbers to drop stale answers;
* no capacity of 10 messages and 8 KiB (``fs.mqueue.msg_max`` and
  ``msgsize_max`` here) to split a 4096-entry REMOVEMAPPING around, and no
  named kernel object that outlives a SIGKILLed daemon;
* back-pressure is structural: a worker has at most one request in flight
  (it waits for the answer), and its one-way notices (RELEASE, FORGET)
  block in ``send`` only if the coordinator stops reading.

**File descriptors.**  The file to map travels to the frontend by
SCM_RIGHTS on the backend channel, but no fd crosses the worker link: the
coordinator opens the file itself, by the file handle the shared node table
stores (``open_by_handle_at``), after checking the nodeid and fh in that
table at the moment it applies the request.  So the check and the use
cannot be separated by a RELEASE on another queue, a worker's fd cache is
never involved, and a worker crash cannot leave an fd in flight.  The cost:
nodes without a usable file handle, and nodes on a filesystem mounted under
the share (the coordinator keeps no mount fds), cannot be mapped
(EOPNOTSUPP); the guest then reads them through the queue.
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import socket
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

import msgpack

from shardfs.abi import fuse as F
from shardfs.fs.api import FsError

log = logging.getLogger("shardfs.dax")

#: loff_t is signed 64-bit: a file range must end at or below this.
OFF_MAX = (1 << 63) - 1
#: The flags a SETUPMAPPING may carry.
SETUP_FLAGS = F.FUSE_SETUPMAPPING_FLAG_READ | F.FUSE_SETUPMAPPING_FLAG_WRITE
#: The largest link message: a full REMOVEMAPPING is 64 KiB of ranges.
LINK_MAX_BYTES = 1 << 17
#: Nodeids per FORGET notice (a BATCH_FORGET may name 65536).
FORGET_CHUNK = 4096


class Geometry(NamedTuple):
    """The window's size and the alignment every offset and length must have."""

    window_bytes: int
    align_bytes: int = mmap.PAGESIZE

    @property
    def map_alignment_log2(self) -> int:
        """INIT's ``map_alignment``: log2 of the alignment (12 for 4 KiB pages)."""
        return self.align_bytes.bit_length() - 1

    def check_range(self, moffset: int, length: int) -> None:
        """A window range: non-empty, aligned, and inside the window; else EINVAL.

        The comparison is on unbounded integers, so a u64 ``moffset + len``
        that would wrap around is refused like any other range past the end.
        """
        a = self.align_bytes
        if length <= 0 or moffset < 0 or moffset % a or length % a:
            raise FsError(errno.EINVAL, f"window range {moffset:#x}+{length:#x} is empty "
                          f"or not aligned to {a}")
        if moffset + length > self.window_bytes:
            raise FsError(errno.EINVAL, f"window range {moffset:#x}+{length:#x} is outside "
                          f"the {self.window_bytes:#x}-byte window")

    def check_setup(self, foffset: int, length: int, flags: int, moffset: int) -> bool:
        """Check a SETUPMAPPING's numbers; return whether it asks for a writable map."""
        self.check_range(moffset, length)
        if foffset < 0 or foffset % self.align_bytes or foffset + length > OFF_MAX:
            raise FsError(errno.EINVAL, f"file range {foffset:#x}+{length:#x} is not "
                          f"aligned or does not fit loff_t")
        if flags & ~SETUP_FLAGS or not flags & SETUP_FLAGS:
            raise FsError(errno.EINVAL, f"SETUPMAPPING flags {flags:#x}")
        return bool(flags & F.FUSE_SETUPMAPPING_FLAG_WRITE)


class Mapping(NamedTuple):
    """``length`` bytes of a file at ``foffset``, mapped at window offset ``moffset``.

    ``fh`` is the handle it was set up through, or FUSE_SETUPMAPPING_NO_FH
    for the per-inode mappings the Linux driver makes; that decides what
    ends it (RELEASE of the fh, or only FORGET of the node).
    """

    moffset: int
    length: int
    foffset: int
    nodeid: int
    fh: int
    writable: bool

    @property
    def end(self) -> int:
        return self.moffset + self.length

    def piece(self, start: int, end: int) -> Mapping:
        """The part of this mapping in [start, end), which must lie inside it."""
        return self._replace(moffset=start, length=end - start,
                             foffset=self.foffset + (start - self.moffset))


class DaxTable:
    """Non-overlapping mappings ordered by window offset.

    Not thread-safe; the coordinator is single-threaded.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._items: list[Mapping] = []

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Mapping]:
        return iter(list(self._items))

    def _first(self, start: int) -> int:
        i = bisect.bisect_right(self._starts, start) - 1
        if i >= 0 and self._items[i].end > start:
            return i
        return i + 1

    def overlapping(self, start: int, end: int) -> list[Mapping]:
        """The entries that share a byte with [start, end), in order."""
        out = []
        i = self._first(start)
        while i < len(self._items) and self._items[i].moffset < end:
            out.append(self._items[i])
            i += 1
        return out

    def cut(self, start: int, end: int) -> list[Mapping]:
        """Remove [start, end) from the table; return the pieces that were in it.

        An entry that crosses a boundary keeps its outside part (with its
        file offset moved along).
        """
        removed = []
        for m in self.overlapping(start, end):
            self._remove(m)
            if m.moffset < start:
                self._add(m.piece(m.moffset, start))
            if m.end > end:
                self._add(m.piece(end, m.end))
            removed.append(m.piece(max(m.moffset, start), min(m.end, end)))
        return removed

    def insert(self, m: Mapping) -> None:
        """Add ``m``, replacing whatever it overlaps."""
        self.cut(m.moffset, m.end)
        self._add(m)

    def remove(self, m: Mapping) -> None:
        """Remove exactly the entry ``m`` (KeyError if it is not there)."""
        self._remove(m)

    def clear(self) -> None:
        self._starts.clear()
        self._items.clear()

    def _add(self, m: Mapping) -> None:
        i = bisect.bisect_left(self._starts, m.moffset)
        self._starts.insert(i, m.moffset)
        self._items.insert(i, m)

    def _remove(self, m: Mapping) -> None:
        i = bisect.bisect_left(self._starts, m.moffset)
        if i >= len(self._items) or self._items[i] != m:
            raise KeyError(m)
        del self._starts[i]
        del self._items[i]


class DaxShared:
    """Counters in shared memory: the coordinator writes, everyone else reads.

    Created by the supervisor before it forks, so every child maps the same
    page, and it survives a coordinator restart (which zeroes ``mappings``).

    ``mappings`` also tells a worker whether a RELEASE or FORGET needs a
    notice at all (:meth:`DaxClient.released`).  That is safe because the
    coordinator raises it *before* it checks a handle's liveness under the
    shared table's mutex, and a worker frees the handle under that mutex
    *before* it reads it: either the coordinator saw the handle freed, or
    the worker sees a non-zero count and sends the notice.  Both mutex
    operations are locked instructions, full barriers on x86.
    """

    FIELDS = ("mappings", "map_requests", "unmap_requests", "refused", "frontend_errors",
              "restarts")
    _LAYOUT = struct.Struct(f"<{len(FIELDS)}Q")

    def __init__(self) -> None:
        self.mem = mmap.mmap(-1, self._LAYOUT.size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        #: One aligned word per field: workers read ``mappings`` without a lock,
        #: and struct.pack_into would zero-fill it before storing.
        self._words = memoryview(self.mem).cast("Q")

    def read(self) -> dict[str, int]:
        return dict(zip(self.FIELDS, self._words.tolist(), strict=True))

    def get(self, name: str) -> int:
        return int(self._words[self.FIELDS.index(name)])

    def set(self, name: str, value: int) -> None:
        self._words[self.FIELDS.index(name)] = value

    def add(self, name: str, n: int = 1) -> None:
        self.set(name, self.get(name) + n)


# -- the worker <-> coordinator link ---------------------------------------------------
#
# Requests (one reply each, ``["reply", errno]``, errno 0 for success):
#   ["setup", nodeid, fh, foffset, length, flags, moffset]
#   ["remove", ranges]          ranges: n * fuse_removemapping_one as bytes
#   ["destroy"]                 DESTROY or a re-INIT: drop every mapping
# Notices (no reply):
#   ["release", nodeid, fh]     the fh was released
#   ["forget", [nodeid, ...]]   these nodes lost lookups (maybe all of them)


class LinkError(Exception):
    """The peer went away or sent something that is not a link message."""


def link_send(sock: socket.socket, msg: list[Any]) -> None:
    try:
        sock.send(msgpack.packb(msg, use_bin_type=True))
    except OSError as e:
        raise LinkError(f"send: {e}") from e


def link_recv(sock: socket.socket) -> list[Any]:
    """One message; LinkError on EOF, truncation or garbage."""
    try:
        data, _anc, flags, _ = sock.recvmsg(LINK_MAX_BYTES)
    except OSError as e:
        raise LinkError(f"recv: {e}") from e
    if not data:
        raise LinkError("peer closed the link")
    if flags & socket.MSG_TRUNC:
        raise LinkError("link message truncated")
    try:
        msg = msgpack.unpackb(data, raw=False)
    except Exception as e:
        raise LinkError(f"undecodable link message: {e}") from e
    if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
        raise LinkError("link message is not a list")
    return msg


class DaxClient:
    """A worker's end of its link to the coordinator (the dispatcher's ``dax``).

    Requests are synchronous: the worker serves one chain at a time, so it
    has at most one in flight.  Every failure reaches the guest as an errno
    (FsError); a dead link is EIO until the supervisor hands over a new one
    (:meth:`attach`).  Notices never raise.
    """

    def __init__(self, geometry: Geometry, shared: DaxShared) -> None:
        self.geometry = geometry
        self.shared = shared
        self.sock: socket.socket | None = None

    @property
    def map_alignment_log2(self) -> int:
        return self.geometry.map_alignment_log2

    def attach(self, fd: int) -> None:
        """Use the link socket ``fd`` (ours from now on), replacing any old one."""
        self.close()
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _call(self, msg: list[Any]) -> None:
        if self.sock is None:
            raise FsError(errno.EIO, "no link to the DAX coordinator")
        try:
            link_send(self.sock, msg)
            reply = link_recv(self.sock)
        except LinkError as e:
            log.error("DAX coordinator link lost (%s); DAX answers EIO until it is back", e)
            self.close()
            raise FsError(errno.EIO) from e
        err = reply[1] if len(reply) == 2 and reply[0] == "reply" else None
        if not isinstance(err, int) or err < 0:
            raise FsError(errno.EIO, f"bad reply from the coordinator: {reply!r}")
        if err:
            raise FsError(err)

    def _notice(self, msg: list[Any]) -> None:
        if self.sock is None:
            return
        try:
            link_send(self.sock, msg)
        except LinkError as e:
            log.warning("DAX notice %s not delivered: %s", msg[0], e)
            self.close()

    def setup(self, nodeid: int, fh: int, foffset: int, length: int, flags: int,
              moffset: int) -> None:
        """SETUPMAPPING: check the numbers here, the rest in the coordinator."""
        self.geometry.check_setup(foffset, length, flags, moffset)
        self._call(["setup", nodeid, fh, foffset, length, flags, moffset])

    def remove(self, ranges: list[tuple[int, int]]) -> None:
        """REMOVEMAPPING: every range checked before any is removed."""
        for moffset, length in ranges:
            self.geometry.check_range(moffset, length)
        blob = b"".join(F.fuse_removemapping_one.pack(m, n) for m, n in ranges)
        self._call(["remove", blob])

    def released(self, nodeid: int, fh: int) -> None:
        """The guest released ``fh``: its mappings go (a notice, sent only if any exist)."""
        if self.shared.get("mappings"):
            self._notice(["release", nodeid, fh])

    def forgotten(self, nodeids: list[int]) -> None:
        """Lookups were dropped: the coordinator unmaps the nodes that are gone."""
        if not self.shared.get("mappings"):
            return
        for i in range(0, len(nodeids), FORGET_CHUNK):
            self._notice(["forget", nodeids[i:i + FORGET_CHUNK]])

    def destroy(self) -> None:
        """DESTROY (or INIT again): every mapping goes before the guest hears back."""
        try:
            self._call(["destroy"])
        except FsError as e:
            log.error("DAX: unmapping the window at DESTROY failed: %s", e)
