"""Node and handle state shared by every worker process (DESIGN §2).

**Decision.** The guest may send a nodeid from a LOOKUP answered on one
request queue on any other queue, FORGET arrives on hiprio, and an fh from
OPEN on queue 1 may be READ on queue 3.  So the *identity* of nodes and
handles lives in one shared-memory arena that the supervisor creates before
it forks the workers (inherited ``MAP_SHARED`` memory), and each worker keeps
only a *cache* of fds:

* A node slot holds the lookup count, (dev, ino), the inode type and the
  inode's **file handle**.  A worker that meets a nodeid it has no fd for
  opens it with ``open_by_handle_at`` (O_PATH), checks (dev, ino), and caches
  the fd.  A handle slot holds the node and the open flags; a worker without
  an fd for it reopens the node with those flags (minus O_CREAT, O_EXCL and
  O_TRUNC, which already took effect).
* Lookup counts are exact: every change happens under one robust,
  process-shared mutex, so LOOKUP on queue 2 and FORGET on hiprio compose.
* Ids carry a generation: ``nodeid = gen << 32 | slot`` and likewise for
  fhs.  A freed slot's generation moves on, so a stale or forged id is
  ENOENT/EBADF, never another file.  The root is slot 1, generation 0:
  FUSE_ROOT_ID.
* When a node or handle is freed, its (slot, generation) goes into a shared
  log; every worker replays the log before it resolves an id and closes the
  fds it cached for freed slots, so nothing leaks when the guest forgets or
  releases through another queue.  A worker that fell more than
  :data:`LOG_ENTRIES` behind re-checks its whole cache.

Why not the alternatives: a coordinator round trip costs about 82 us per
call here (DESIGN §5), far too slow for LOOKUP and READ; SCM_RIGHTS fd
passing needs the worker that holds the fd to be alive and to answer, which
breaks crash isolation.  File handles survive the worker that made them.

Submounts: a node on a filesystem mounted under the share is opened by
handle through an fd on that mount, which every worker takes at its start
(:mod:`shardfs.fs.passthrough.mounts`).

Limits: a node on a filesystem without file handles, or on a mount that
appeared under the share after the worker that looks it up started, is
*owned* by that worker; other workers answer ESTALE for it.  With one
request queue there is no other worker, so nothing changes.

virtiofsd's ``inode_file_handles``: a handle is recorded for every node
whatever its value, and each worker holds an O_PATH fd for the nodes it
uses, so ``never`` and ``prefer`` both behave as above.  ``mandatory``
refuses what virtiofsd refuses: a node whose filesystem makes no handles
(EOPNOTSUPP to its LOOKUP, ``handles_mandatory``), and, in the supervisor,
a share whose root has none (``fhandle.check_handles``).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import struct
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from shardfs.abi.fuse import FUSE_ROOT_ID
from shardfs.fs.api import FsError
from shardfs.fs.passthrough.fhandle import (
    MAX_HANDLE_SZ,
    MUTEX_BYTES,
    NO_HANDLES_ERRNOS,
    RobustMutex,
    name_to_handle,
    open_by_handle,
)
from shardfs.fs.passthrough.handles import Handle
from shardfs.fs.passthrough.nodes import BUDGET_ERRNO, Node

if sys.byteorder != "little":  # the word views below store "<"-layout fields natively
    raise ImportError("shardfs.fs.passthrough.shared assumes a little-endian host")

#: Freed-slot log entries kept for workers to replay.
LOG_ENTRIES = 4096
LOG_NODE, LOG_HANDLE, LOG_CLEAR_NODES, LOG_CLEAR_HANDLES = 1, 2, 3, 4
FREE, USED = 0, 1
#: ``owner`` of a slot any worker may reopen (it has a usable file handle).
ANY_WORKER = -1
_SLOT_MASK = 0xFFFF_FFFF
_GEN_SHIFT = 32

# header: capacity_nodes, capacity_handles, nodes_used, handles_used,
#         node_free_top, handle_free_top, init_flags, log_seq
_HDR = struct.Struct("=IIIIIIQQ")  # native: read as words (see SharedState)
_U32 = struct.Struct("<I")
# node slot: gen, state, nlookup, dev, ino, kind, owner, handle_type, handle_bytes, handle
_NODE = struct.Struct(f"<IIQQQIiiI{MAX_HANDLE_SZ}s")
_NODE_HEAD = struct.Struct("<IIQ")  # gen, state, nlookup
_NODE_KEY = struct.Struct("<QQ")  # dev, ino: right after the head
# handle slot: gen, state, nodeid, flags, is_dir
_HANDLE = struct.Struct("<IIQiI")
_HANDLE_HEAD = struct.Struct("<II")  # gen, state
_HANDLE_NODEID_OFF = struct.calcsize("<II")
_WORD = struct.calcsize("<Q")
_LOG = struct.Struct("<III4x")  # kind, slot, gen


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


class SharedState:
    """The arena: header, free stacks, (dev, ino) index, slots and the log.

    Create it once, before forking; every process that inherits it calls
    the tables' constructors with its own worker id.
    """

    def __init__(self, max_nodes: int, max_handles: int) -> None:
        self.cap_nodes = max_nodes + 1  # slot 0 is never used
        self.cap_handles = max_handles + 1
        self.index_size = _pow2_at_least(2 * self.cap_nodes)
        off = MUTEX_BYTES
        self.hdr_off = off
        off += _HDR.size
        self.node_free_off = off
        off += 4 * self.cap_nodes
        self.handle_free_off = off
        off += 4 * self.cap_handles
        self.index_off = off
        off += 4 * self.index_size
        self.log_off = off = (off + 7) & ~7
        off += _LOG.size * LOG_ENTRIES
        self.nodes_off = off
        off += _NODE.size * self.cap_nodes
        self.handles_off = off
        off += _HANDLE.size * self.cap_handles
        self.size = (off + 7) & ~7
        self.mem = mmap.mmap(-1, self.size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        # Words that other processes read without the lock are stored one
        # aligned word at a time through these views (see _hdr32 below).
        assert self.nodes_off % 8 == 0 and _NODE.size % 8 == 0 and _NODE_HEAD.size == 16
        assert self.handles_off % 8 == 0 and _HANDLE.size % 8 == 0
        self._q = memoryview(self.mem).cast("Q")
        self.lock = RobustMutex(self.mem, 0, create=True)
        _HDR.pack_into(self.mem, self.hdr_off, self.cap_nodes, self.cap_handles, 0, 0, 0, 0,
                       0, 0)
        # Header fields as native words: one load or store each.  Other
        # processes read some of them without the lock (the log sequence, the
        # counts), and struct.pack_into zero-fills its target before storing.
        view = memoryview(self.mem)
        self._hdr32 = view[self.hdr_off:self.hdr_off + 24].cast("I")
        self._hdr64 = view[self.hdr_off + 24:self.hdr_off + _HDR.size].cast("Q")
        self._init_free(self.node_free_off, self.cap_nodes, first=FUSE_ROOT_ID + 1, hdr_field=4)
        self._init_free(self.handle_free_off, self.cap_handles, first=1, hdr_field=5)

    # -- header fields ----------------------------------------------------------

    def _hdr(self, i: int) -> int:
        return self._hdr32[i] if i < 6 else self._hdr64[i - 6]

    def _set_hdr(self, i: int, value: int) -> None:
        if i < 6:
            self._hdr32[i] = value
        else:
            self._hdr64[i - 6] = value

    @property
    def init_flags(self) -> int:
        """The FUSE INIT flags in force, seen by every worker (only one gets INIT)."""
        return self._hdr(6)

    @init_flags.setter
    def init_flags(self, value: int) -> None:
        self._set_hdr(6, value)

    def log_seq(self) -> int:
        return self._hdr64[1]

    # -- free stacks -------------------------------------------------------------

    def _init_free(self, off: int, cap: int, first: int, hdr_field: int) -> None:
        slots = list(range(cap - 1, first - 1, -1))
        for i, s in enumerate(slots):
            _U32.pack_into(self.mem, off + 4 * i, s)
        self._set_hdr(hdr_field, len(slots))

    def pop_free(self, off: int, hdr_field: int) -> int | None:
        top = self._hdr(hdr_field)
        if top == 0:
            return None
        top -= 1
        self._set_hdr(hdr_field, top)
        return int(_U32.unpack_from(self.mem, off + 4 * top)[0])

    def push_free(self, off: int, hdr_field: int, slot: int) -> None:
        top = self._hdr(hdr_field)
        _U32.pack_into(self.mem, off + 4 * top, slot)
        self._set_hdr(hdr_field, top + 1)

    # -- log -----------------------------------------------------------------------

    def append_log(self, kind: int, slot: int, gen: int) -> None:
        seq = self.log_seq()
        _LOG.pack_into(self.mem, self.log_off + _LOG.size * (seq % LOG_ENTRIES), kind, slot, gen)
        self._set_hdr(7, seq + 1)

    def read_log(self, seq: int) -> tuple[int, int, int]:
        kind, slot, gen = _LOG.unpack_from(self.mem, self.log_off + _LOG.size * (seq % LOG_ENTRIES))
        return kind, slot, gen

    # -- (dev, ino) index: linear probing with backward-shift deletion -------------

    def _home(self, dev: int, ino: int) -> int:
        return hash((dev, ino)) & (self.index_size - 1)

    def _index_get(self, i: int) -> int:
        return int(_U32.unpack_from(self.mem, self.index_off + 4 * i)[0])

    def _index_set(self, i: int, slot1: int) -> None:
        _U32.pack_into(self.mem, self.index_off + 4 * i, slot1)

    def index_find(self, dev: int, ino: int) -> int | None:
        """The node slot for (dev, ino), or None.

        Every LOOKUP calls this under the lock, so _index_get and node_key
        are spelled out here: their frames were a third of it.
        """
        mask = self.index_size - 1
        mem, index_off = self.mem, self.index_off
        key_off = self.nodes_off + _NODE_HEAD.size
        get_u32, get_key, node_size = _U32.unpack_from, _NODE_KEY.unpack_from, _NODE.size
        i = self._home(dev, ino)
        while True:
            v = get_u32(mem, index_off + 4 * i)[0]
            if v == 0:
                return None
            sdev, sino = get_key(mem, key_off + node_size * (v - 1))
            if sdev == dev and sino == ino:
                slot: int = v - 1
                return slot
            i = (i + 1) & mask

    def index_add(self, dev: int, ino: int, slot: int) -> None:
        mask = self.index_size - 1
        i = self._home(dev, ino)
        while self._index_get(i):
            i = (i + 1) & mask
        self._index_set(i, slot + 1)

    def index_remove(self, dev: int, ino: int, slot: int) -> None:
        mask = self.index_size - 1
        i = self._home(dev, ino)
        while self._index_get(i) != slot + 1:
            if self._index_get(i) == 0:
                return
            i = (i + 1) & mask
        # Backward shift: pull later entries of the run into the hole.
        j = i
        while True:
            j = (j + 1) & mask
            v = self._index_get(j)
            if v == 0:
                break
            home = self._home(*self.node_key(v - 1))
            # Move v to the hole i unless its home lies cyclically in (i, j].
            if (j - home) & mask >= (j - i) & mask:
                self._index_set(i, v)
                i = j
        self._index_set(i, 0)

    # -- node slots -------------------------------------------------------------------

    def node_off(self, slot: int) -> int:
        return self.nodes_off + _NODE.size * slot

    def node_key(self, slot: int) -> tuple[int, int]:
        off = self.node_off(slot) + _NODE_HEAD.size
        dev, ino = _NODE_KEY.unpack_from(self.mem, off)
        return dev, ino

    def node_head(self, slot: int) -> tuple[int, int, int]:
        """(gen, state, nlookup) of a node slot."""
        gen, state, nlookup = _NODE_HEAD.unpack_from(self.mem, self.node_off(slot))
        return gen, state, nlookup

    def set_nlookup(self, slot: int, n: int) -> None:
        """Store a live node's lookup count as one 8-byte store (under the lock).

        Readers check (gen, state) without the lock; ``struct.pack_into`` of
        the whole head zero-fills it first, and a concurrent reader then saw
        a live node as FREE (ENOENT) in about 7% of racing reads, measured.
        """
        self._q[(self.node_off(slot) + 8) >> 3] = n

    def handle_off(self, slot: int) -> int:
        return self.handles_off + _HANDLE.size * slot

    def handle_head(self, slot: int) -> tuple[int, int]:
        """(gen, state) of a handle slot."""
        gen, state = _HANDLE_HEAD.unpack_from(self.mem, self.handle_off(slot))
        return gen, state

    # -- read-only views for the DAX coordinator (proc/coordinator.py) -------------
    # It holds no fds of nodes or handles: it checks ids here and opens files
    # by their file handle.  Each view reads under the lock, so it never sees
    # a slot half-written.

    def node_record(self, nodeid: int) -> NodeRecord | None:
        """The live node ``nodeid`` names; None if it is freed, forged or out of range."""
        slot, gen = split_id(nodeid)
        if not 0 < slot < self.cap_nodes:
            return None
        with self.lock:
            (sgen, state, _n, dev, ino, kind, owner, htype, hlen,
             handle) = _NODE.unpack_from(self.mem, self.node_off(slot))
        if sgen != gen or state != USED:
            return None
        return NodeRecord(dev, ino, kind, owner, htype, bytes(handle[:hlen]))

    def handle_record(self, fh: int) -> tuple[int, int, bool] | None:
        """(nodeid, open flags, is_dir) of the live handle ``fh``; None otherwise."""
        slot, gen = split_id(fh)
        if not 0 < slot < self.cap_handles:
            return None
        with self.lock:
            sgen, state, nodeid, flags, is_dir = _HANDLE.unpack_from(self.mem,
                                                                     self.handle_off(slot))
        if sgen != gen or state != USED:
            return None
        return nodeid, flags, bool(is_dir)

    def file_handles_of(self, nodeid: int) -> list[tuple[int, int]]:
        """(fh, open flags) of every live file (not directory) handle on ``nodeid``.

        The nodeid field of every handle slot is read in one strided pass
        over the arena (about 10 ns a slot; a byte search is 10 times
        slower here, the arena being mostly zeros), and each slot that
        names the node is checked.  A freed slot keeps its old nodeid, so
        the state decides.
        """
        base, size, n = self.handles_off, _HANDLE.size, self.cap_handles
        with self.lock:
            if base % _WORD == 0 and size % _WORD == 0:
                with memoryview(self.mem) as mv:
                    ids = mv[base:base + size * n].cast("Q")[
                        _HANDLE_NODEID_OFF // _WORD::size // _WORD].tolist()
            else:
                ids = [fields[2] for fields in _HANDLE.iter_unpack(self.mem[base:base + size * n])]
            out = []
            slot = -1
            while True:
                try:
                    slot = ids.index(nodeid, slot + 1)
                except ValueError:
                    break
                gen, state, _nid, flags, is_dir = _HANDLE.unpack_from(self.mem,
                                                                      self.handle_off(slot))
                if state == USED and not is_dir:
                    out.append((make_id(slot, gen), flags))
        return out


class NodeRecord(NamedTuple):
    """What the shared table knows of a live node (see :meth:`SharedState.node_record`)."""

    dev: int
    ino: int
    #: stat.S_IFMT of the inode.
    kind: int
    #: ANY_WORKER when ``handle`` opens it anywhere; else the worker that owns it.
    owner: int
    handle_type: int
    handle: bytes


def replay_log(s: SharedState, seen: int, kind_freed: int, kind_clear: int,
               evict: Callable[[int, int], None], sweep: Callable[[], None]) -> int:
    """Apply the log entries of one table's kinds written since ``seen``; return the new seen.

    A reader more than :data:`LOG_ENTRIES` behind has lost entries, so it
    re-checks its whole cache instead.
    """
    seq = s.log_seq()
    if seq == seen:
        return seq
    if seq - seen > LOG_ENTRIES:
        sweep()
        return seq
    for n in range(seen, seq):
        kind, slot, gen = s.read_log(n)
        if kind == kind_freed:
            evict(slot, gen)
        elif kind == kind_clear:
            sweep()
    return seq


def split_id(ident: int) -> tuple[int, int]:
    """(slot, gen) of a nodeid or fh."""
    return ident & _SLOT_MASK, ident >> _GEN_SHIFT


def make_id(slot: int, gen: int) -> int:
    return gen << _GEN_SHIFT | slot


class _FdCache:
    """This worker's fds for one table's slots, kept in step with the shared log.

    ``_cache`` maps a slot to (gen, entry); every entry has an ``fd`` the
    cache owns.  Entries of slots freed anywhere are dropped at :meth:`sync`
    and their fds go to the ``graveyard``, closed between requests.
    """

    LOG_FREED = LOG_CLEAR = 0  # this table's log kinds
    s: SharedState
    graveyard: list[int]
    _cache: dict[int, tuple[int, Any]]
    _seen: int
    _seq_word: memoryview

    def sync(self) -> None:
        """Drop cached fds of slots freed anywhere since the last sync."""
        self._seen = replay_log(self.s, self._seen, self.LOG_FREED, self.LOG_CLEAR,
                                self._evict, self._sweep)

    def _live(self, slot: int, gen: int) -> bool:
        raise NotImplementedError

    def _evict(self, slot: int, gen: int) -> None:
        cached = self._cache.get(slot)
        if cached is not None and cached[0] == gen:
            del self._cache[slot]
            self.graveyard.append(cached[1].fd)

    def _sweep(self) -> None:
        for slot, (gen, entry) in list(self._cache.items()):
            if not self._live(slot, gen):
                del self._cache[slot]
                self.graveyard.append(entry.fd)


class SharedNodeTable(_FdCache):
    """The NodeTable interface over :class:`SharedState` (see the module doc).

    Fd ownership: this worker's cache owns the fds in it; ``insert`` takes
    ownership of the fd it is given in every outcome, as NodeTable does.
    """

    def __init__(self, state: SharedState, root_fd: int, worker: int,
                 submounts: dict[int, int] | None = None) -> None:
        self.s = state
        self.worker = worker
        self.max_nodes = state.cap_nodes - 1
        #: st_dev -> an fd on that mount under the share (mounts.submount_fds):
        #: the mount_fd that opens its nodes by handle.  Owned here.
        self.submounts = dict(submounts or {})
        #: inode_file_handles = mandatory: a node without a file handle is EOPNOTSUPP.
        self.handles_mandatory = False
        try:
            st = os.stat(root_fd)
        except BaseException:
            os.close(root_fd)
            for fd in self.submounts.values():
                os.close(fd)
            raise
        self.root = Node(FUSE_ROOT_ID, root_fd, st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode),
                         nlookup=1)
        self.root_dev = st.st_dev
        # open_by_handle_at refuses an O_PATH mount_fd: keep a real one.
        self.mount_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
        self._cache: dict[int, tuple[int, Node]] = {}
        #: Fds of cache entries dropped while a request may still hold their
        #: Node or Handle: closed by :meth:`reap` between requests, so an fd
        #: number is never reused under a request in flight.
        self.graveyard: list[int] = []
        self._seen = state.log_seq()
        #: The shared header words; [1] is the log sequence (SharedState.log_seq).
        self._seq_word = state._hdr64
        with state.lock:
            gen, state_, _ = state.node_head(FUSE_ROOT_ID)
            if state_ != USED:
                _NODE.pack_into(state.mem, state.node_off(FUSE_ROOT_ID), 0, USED, 1, st.st_dev,
                                st.st_ino, stat.S_IFMT(st.st_mode), ANY_WORKER, 0, 0, b"")
                state.index_add(st.st_dev, st.st_ino, FUSE_ROOT_ID)
                state._set_hdr(2, state._hdr(2) + 1)

    # -- cache upkeep -------------------------------------------------------------

    LOG_FREED, LOG_CLEAR = LOG_NODE, LOG_CLEAR_NODES

    def _live(self, slot: int, gen: int) -> bool:
        sgen, state, _ = self.s.node_head(slot)
        return sgen == gen and state == USED

    # -- NodeTable interface ------------------------------------------------------

    def __len__(self) -> int:
        return self.s._hdr(2)

    def __contains__(self, nodeid: int) -> bool:
        try:
            self.get(nodeid)
        except FsError:
            return False
        return True

    def check_room(self) -> None:
        if self.s._hdr(2) >= self.max_nodes:
            raise FsError(BUDGET_ERRNO)

    def get(self, nodeid: int) -> Node:
        """The node for ``nodeid`` with an fd this worker owns; ENOENT if not live."""
        if nodeid == FUSE_ROOT_ID:
            return self.root
        if self._seq_word[1] != self._seen:  # sync()'s first test, without the calls
            self.sync()
        slot, gen = split_id(nodeid)
        if not 1 < slot < self.s.cap_nodes:
            raise FsError(errno.ENOENT)
        sgen, state, nlookup = self.s.node_head(slot)
        if sgen != gen or state != USED:
            raise FsError(errno.ENOENT)
        cached = self._cache.get(slot)
        if cached is not None and cached[0] == gen:
            return cached[1]
        return self._open(slot, gen, nodeid)

    def _open(self, slot: int, gen: int, nodeid: int) -> Node:
        (sgen, state, nlookup, dev, ino, kind, owner, htype, hlen,
         handle) = _NODE.unpack_from(self.s.mem, self.s.node_off(slot))
        if sgen != gen or state != USED:
            raise FsError(errno.ENOENT)
        if owner != ANY_WORKER:
            raise FsError(errno.ESTALE)  # see "Limits" in the module doc
        mount_fd = self.mount_fd if dev == self.root_dev else self.submounts.get(dev)
        if mount_fd is None:
            raise FsError(errno.ESTALE)  # a mount this worker did not see at its start
        fd = open_by_handle(mount_fd, htype, handle[:hlen], os.O_PATH | os.O_NOFOLLOW)
        try:
            st = os.stat(fd)
            if (st.st_dev, st.st_ino) != (dev, ino):
                raise FsError(errno.ESTALE)
        except BaseException:
            os.close(fd)
            raise
        node = Node(nodeid, fd, dev, ino, kind, nlookup)
        self._cache[slot] = (gen, node)
        return node

    def insert(self, fd: int, st: os.stat_result) -> Node:
        """Count one lookup of the inode ``fd`` refers to; takes ownership of ``fd``.

        The fd becomes this worker's cached fd for the node unless it already
        has one (then it is closed), as NodeTable does for a known inode.
        """
        try:
            found = self._count(st)
            if found is None:
                found = self._add(st, self._handle_of(fd, st))
        except BaseException:
            os.close(fd)
            raise
        slot, gen = found
        if slot == FUSE_ROOT_ID:
            os.close(fd)
            return self.root
        cached = self._cache.get(slot)
        if cached is not None and cached[0] == gen:
            os.close(fd)
            return cached[1]
        if cached is not None:
            self.graveyard.append(cached[1].fd)
        node = Node(make_id(slot, gen), fd, st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode), 0)
        self._cache[slot] = (gen, node)
        return node

    def count_cached(self, dev: int, ino: int) -> Node | None:
        """Count one lookup of (dev, ino) if it is a live node this worker holds an fd for.

        Returns that node, or None with nothing changed.  The LOOKUP of a
        known name (the guest's caches expire, it looks again) then needs no
        fd of its own: the cached O_PATH fd pins the inode, so while the
        generation read under the lock matches the one cached, (dev, ino)
        can only be that inode.  Anything else (a new inode, a node another
        worker made, a slot freed and reused) is None, and the caller takes
        the :meth:`insert` path.
        """
        s = self.s
        with s.lock:
            slot = s.index_find(dev, ino)
            if slot is None:
                return None
            gen, state, nlookup = s.node_head(slot)
            if slot == FUSE_ROOT_ID:
                node = self.root
            else:
                cached = self._cache.get(slot)
                if cached is None or cached[0] != gen or state != USED:
                    return None
                node = cached[1]
            s.set_nlookup(slot, nlookup + 1)
        return node

    def _handle_of(self, fd: int, st: os.stat_result) -> tuple[int, int, bytes]:
        """(owner, handle_type, handle) for a new node.

        A node on a mount this worker has no mount fd for stays its own:
        no other worker could open it by handle either (they all take
        their mount table at start).  With ``handles_mandatory`` a node
        whose filesystem makes no handles is refused (EOPNOTSUPP), as virtiofsd.
        """
        unknown_mount = st.st_dev != self.root_dev and st.st_dev not in self.submounts
        if unknown_mount and not self.handles_mandatory:
            return self.worker, 0, b""
        try:
            htype, handle, _mnt = name_to_handle(fd)
        except OSError as e:
            if self.handles_mandatory and e.errno in NO_HANDLES_ERRNOS:
                raise FsError(errno.EOPNOTSUPP, "inode_file_handles = mandatory") from None
            return self.worker, 0, b""
        return (self.worker, 0, b"") if unknown_mount else (ANY_WORKER, htype, handle)

    def _count_locked(self, st: os.stat_result) -> tuple[int, int] | None:
        s = self.s
        slot = s.index_find(st.st_dev, st.st_ino)
        if slot is None:
            return None
        gen, state, nlookup = s.node_head(slot)
        s.set_nlookup(slot, nlookup + 1)
        return slot, gen

    def _count(self, st: os.stat_result) -> tuple[int, int] | None:
        """Add a lookup to the node of (dev, ino) if there is one: its (slot, gen)."""
        with self.s.lock:
            return self._count_locked(st)

    def _add(self, st: os.stat_result, handle: tuple[int, int, bytes]) -> tuple[int, int]:
        """Make a node with one lookup (or count one, if another worker just made it)."""
        s = self.s
        owner, htype, hbytes = handle
        with s.lock:
            found = self._count_locked(st)
            if found is not None:
                return found
            slot = s.pop_free(s.node_free_off, 4) if s._hdr(2) < self.max_nodes else None
            if slot is None:
                raise FsError(BUDGET_ERRNO)
            gen = s.node_head(slot)[0]
            _NODE.pack_into(s.mem, s.node_off(slot), gen, USED, 1, st.st_dev, st.st_ino,
                            stat.S_IFMT(st.st_mode), owner, htype, len(hbytes), hbytes)
            s.index_add(st.st_dev, st.st_ino, slot)
            s._set_hdr(2, s._hdr(2) + 1)
            return slot, gen

    def bump(self, nodeid: int) -> Node:
        node = self.get(nodeid)
        slot, gen = split_id(nodeid)
        s = self.s
        with s.lock:
            sgen, state, nlookup = s.node_head(slot)
            if sgen != gen or state != USED:
                raise FsError(errno.ENOENT)
            s.set_nlookup(slot, nlookup + 1)
        return node

    def nlookup(self, nodeid: int) -> int:
        slot, gen = split_id(nodeid)
        sgen, state, n = self.s.node_head(slot)
        if sgen != gen or state != USED:
            raise FsError(errno.ENOENT)
        return n

    def forget(self, nodeid: int, nlookup: int) -> None:
        """Drop lookups (clamped at zero); free the node at zero.  Never raises."""
        slot, gen = split_id(nodeid)
        if nlookup <= 0 or slot == FUSE_ROOT_ID or not 1 < slot < self.s.cap_nodes:
            return
        s = self.s
        with s.lock:
            sgen, state, count = s.node_head(slot)
            if sgen != gen or state != USED:
                return
            count = max(count - nlookup, 0)
            if count:
                s.set_nlookup(slot, count)
                return
            self._free_locked(slot, sgen)
        self.sync()

    def _free_locked(self, slot: int, gen: int) -> None:
        s = self.s
        dev, ino = s.node_key(slot)
        s.index_remove(dev, ino, slot)
        off = s.node_off(slot) >> 3
        s._q[off] = FREE << 32 | ((gen + 1) & _SLOT_MASK)  # gen and state: one store
        s._q[off + 1] = 0
        s.push_free(s.node_free_off, 4, slot)
        s._set_hdr(2, s._hdr(2) - 1)
        s.append_log(LOG_NODE, slot, gen)

    def clear(self) -> None:
        """Release every node but the root, in every worker (DESTROY, re-INIT)."""
        s = self.s
        with s.lock:
            for slot in range(FUSE_ROOT_ID + 1, s.cap_nodes):
                gen, state, _ = s.node_head(slot)
                if state == USED:
                    self._free_locked(slot, gen)
            s.append_log(LOG_CLEAR_NODES, 0, 0)
        self.sync()

    def reap(self) -> None:
        """Close the fds evicted since the last call; only between requests."""
        graveyard = self.graveyard
        while graveyard:
            os.close(graveyard.pop())

    def close(self) -> None:
        self.reap()
        for _, node in self._cache.values():
            os.close(node.fd)
        self._cache.clear()
        if self.root.fd >= 0:
            os.close(self.root.fd)
            os.close(self.mount_fd)
            self.root.fd = self.mount_fd = -1
        for fd in self.submounts.values():
            os.close(fd)
        self.submounts.clear()


class SharedHandleTable(_FdCache):
    """The HandleTable interface over :class:`SharedState`.

    ``reopen(node, flags, is_dir)`` opens an fd for a handle this worker has
    not seen; it receives the node from ``nodes``.
    """

    def __init__(self, state: SharedState, nodes: SharedNodeTable,
                 reopen: Callable[[Node, int, bool], int]) -> None:
        self.s = state
        self.nodes = nodes
        self.reopen = reopen
        self.max_handles = state.cap_handles - 1
        self._cache: dict[int, tuple[int, Handle]] = {}
        self.graveyard = nodes.graveyard  # one for both tables (see SharedNodeTable)
        self._seen = state.log_seq()
        self._seq_word = state._hdr64  # as SharedNodeTable

    LOG_FREED, LOG_CLEAR = LOG_HANDLE, LOG_CLEAR_HANDLES

    def _live(self, slot: int, gen: int) -> bool:
        return self.s.handle_head(slot) == (gen, USED)

    def __len__(self) -> int:
        return self.s._hdr(3)

    def __contains__(self, fh: int) -> bool:
        try:
            self.get(fh)
        except (FsError, OSError):
            return False
        return True

    def check_room(self) -> None:
        if self.s._hdr(3) >= self.max_handles:
            raise FsError(BUDGET_ERRNO)

    def add(self, fd: int, nodeid: int, *, is_dir: bool, flags: int) -> Handle:
        """Register ``fd`` under a fresh fh; takes ownership of ``fd``."""
        s = self.s
        try:
            with s.lock:
                if s._hdr(3) >= self.max_handles:
                    raise FsError(BUDGET_ERRNO)
                slot = s.pop_free(s.handle_free_off, 5)
                if slot is None:
                    raise FsError(BUDGET_ERRNO)
                gen = struct.unpack_from("<I", s.mem, s.handle_off(slot))[0]
                _HANDLE.pack_into(s.mem, s.handle_off(slot), gen, USED, nodeid, flags,
                                  int(is_dir))
                s._set_hdr(3, s._hdr(3) + 1)
        except BaseException:
            os.close(fd)
            raise
        h = Handle(make_id(slot, gen), fd, nodeid, is_dir, flags)
        self._cache[slot] = (gen, h)
        return h

    def get(self, fh: int) -> Handle:
        """The live handle with an fd this worker owns, or FsError(EBADF)."""
        if self._seq_word[1] != self._seen:  # sync()'s first test, without the calls
            self.sync()
        slot, gen = split_id(fh)
        if not 0 < slot < self.s.cap_handles:
            raise FsError(errno.EBADF)
        sgen, state, nodeid, flags, is_dir = _HANDLE.unpack_from(self.s.mem,
                                                                 self.s.handle_off(slot))
        if sgen != gen or state != USED:
            raise FsError(errno.EBADF)
        cached = self._cache.get(slot)
        if cached is not None and cached[0] == gen:
            return cached[1]
        node = self.nodes.get(nodeid)
        fd = self.reopen(node, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC), bool(is_dir))
        h = Handle(fh, fd, nodeid, bool(is_dir), flags)
        self._cache[slot] = (gen, h)
        return h

    def is_live(self, h: Handle) -> bool:
        slot, gen = split_id(h.fh)
        cached = self._cache.get(slot)
        if cached is None or cached[1] is not h:
            return False
        sgen, state = self.s.handle_head(slot)
        return bool(sgen == gen and state == USED)

    def close(self, fh: int) -> None:
        """RELEASE: free the fh everywhere; EBADF if it is not live."""
        slot, gen = split_id(fh)
        if not 0 < slot < self.s.cap_handles:
            raise FsError(errno.EBADF)
        s = self.s
        with s.lock:
            sgen, state = s.handle_head(slot)
            if sgen != gen or state != USED:
                raise FsError(errno.EBADF)
            self._free_locked(slot, sgen)
        self.sync()

    def _free_locked(self, slot: int, gen: int) -> None:
        s = self.s
        s._q[s.handle_off(slot) >> 3] = FREE << 32 | ((gen + 1) & _SLOT_MASK)  # one store
        s.push_free(s.handle_free_off, 5, slot)
        s._set_hdr(3, s._hdr(3) - 1)
        s.append_log(LOG_HANDLE, slot, gen)

    def clear(self) -> None:
        s = self.s
        with s.lock:
            for slot in range(1, s.cap_handles):
                gen, state = s.handle_head(slot)
                if state == USED:
                    self._free_locked(slot, gen)
            s.append_log(LOG_CLEAR_HANDLES, 0, 0)
        self.sync()
