"""Export and import of the shared node and handle tables, for live migration.

The tables (:mod:`shardfs.fs.passthrough.shared`) are the whole FUSE session
state of every worker: node and handle *identity* lives there, fds are only
per-worker caches.  So the supervisor, which holds the arena, saves and
loads them on its own, while every ring is stopped (the device is
"suspended": no worker touches the tables), and the workers simply find
the restored slots at their next request, on any queue.

How a node is found again (virtiofsd's ``--migration-mode``):

``find-paths`` (default)
    The source sends the node's path from the share root.  It is read from
    the live inode at switch-over (``/proc/self/fd`` of an fd opened by file
    handle), so every rename or unlink the guest made, and any rename made
    on the host before switch-over, is already in it.  A node with no path
    (open but unlinked, replaced on the host, outside the share) is sent
    with ENOENT.  The destination walks the path one component at a time
    from the share root, O_NOFOLLOW, each name checked as a guest name
    (DESIGN §4), so a stream cannot reach outside the share.
``file-handles``
    The source sends the file handle; the destination opens it with
    ``open_by_handle_at``, which needs the same filesystem on both sides and
    CAP_DAC_READ_SEARCH.  It survives renames and replacements on the host
    and open-but-unlinked files.  A handle could name any inode of that
    filesystem, so the destination accepts it only when the inode's path
    (``/proc/self/fd``) lies inside the share.

On the destination every node is checked (it exists, its file type is the
one the source had, and, when the source ran with
``--migration-verify-handles`` and so sent file handles too, its file handle
is the source's) and every handle is reopened once with its flags, before
anything is applied.  What fails goes by ``--migration-on-error``: ``abort``
refuses the whole state (the arena is untouched, CHECK_DEVICE_STATE fails
and the source keeps serving); ``guest-error`` applies the rest and leaves
the lost nodes in place so that the guest's requests on them, and on handles
opened on them, answer ESTALE; FORGET still frees a lost node, while a lost
handle answers RELEASE with ESTALE too and its slot goes with the session.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat

from shardfs.abi.devstate import MODE_FILE_HANDLES, DeviceState, HandleState, NodeState
from shardfs.abi.fuse import FUSE_ROOT_ID
from shardfs.fs.api import FsError, check_name
from shardfs.fs.passthrough.fhandle import (
    MAX_HANDLE_SZ,
    _FileHandle,
    _name_to_handle_at,
    name_to_handle,
    open_by_handle,
)
from shardfs.fs.passthrough.shared import (
    _HANDLE,
    _NODE,
    ANY_WORKER,
    FREE,
    LOG_CLEAR_HANDLES,
    LOG_CLEAR_NODES,
    USED,
    SharedState,
    make_id,
    split_id,
)

log = logging.getLogger("shardfs.migration")

#: ``owner`` of a node the destination could not find again (guest-error):
#: no worker opens it, so every request on it answers ESTALE.
LOST_OWNER = -2
_DELETED = b" (deleted)"
#: Directory fds the loader keeps open at most (see _DirCache).
_DIR_CACHE_FDS = 1024
_GEN_MASK = 0xFFFF_FFFF
_OPEN_CHECK_DROP = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND


class _HandleReader:
    """name_to_handle_at(dirfd, name) with one reused buffer: the loader asks for
    tens of thousands of handles, and building the ctypes objects for each call
    cost more than the system call (measured: 18 us against 4 us)."""

    def __init__(self) -> None:
        self.buf = _FileHandle()
        self.mnt = ctypes.c_int()
        self.buf_ref, self.mnt_ref = ctypes.byref(self.buf), ctypes.byref(self.mnt)

    def __call__(self, dir_fd: int, name: bytes) -> tuple[int, bytes]:
        """(type, bytes) of the entry ``name`` itself (a final symlink is not followed)."""
        self.buf.handle_bytes = MAX_HANDLE_SZ
        if _name_to_handle_at(dir_fd, name, self.buf_ref, self.mnt_ref, 0) < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return self.buf.handle_type, bytes(self.buf.f_handle[:self.buf.handle_bytes])


class MigrationError(Exception):
    """The state cannot be applied (one line naming the node or handle)."""


class Share:
    """The shared directory as the supervisor sees it: fds it owns, and its path."""

    path: bytes
    root_fd: int  # O_PATH directory fd: the walk's start
    mount_fd: int  # O_RDONLY directory fd: open_by_handle_at's mount_fd
    root_dev: int
    root_ino: int

    def __init__(self, path: bytes, root_fd: int, mount_fd: int, root_dev: int,
                 root_ino: int) -> None:
        self.path = path
        self.root_fd = root_fd
        self.mount_fd = mount_fd
        self.root_dev = root_dev
        self.root_ino = root_ino

    @classmethod
    def open(cls, path: str) -> Share:
        real = os.path.realpath(path)
        root_fd = os.open(real, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            mount_fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            os.close(root_fd)
            raise
        st = os.fstat(root_fd)
        return cls(os.fsencode(real), root_fd, mount_fd, st.st_dev, st.st_ino)

    def close(self) -> None:
        for fd in (self.root_fd, self.mount_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def relative(self, fd: int) -> bytes | None:
        """The path of the inode ``fd`` refers to, relative to the share, or None
        when it has none there (unlinked, or outside the share)."""
        try:
            target = os.readlink(f"/proc/self/fd/{fd}".encode())
        except OSError:
            return None
        if target.endswith(_DELETED):
            return None
        if target == self.path:
            return b""
        prefix = self.path.rstrip(b"/") + b"/"
        if not target.startswith(prefix):
            return None
        return target[len(prefix):]

    def inside(self, fd: int) -> bool:
        """Whether ``fd``'s inode lies in the share (an unlinked one: where it was)."""
        try:
            target = os.readlink(f"/proc/self/fd/{fd}".encode())
        except OSError:
            return False
        if target.endswith(_DELETED):
            target = target[:-len(_DELETED)]
        return target == self.path or target.startswith(self.path.rstrip(b"/") + b"/")


# -- save ---------------------------------------------------------------------------


def collect_paths(s: SharedState, share: Share) -> dict[int, bytes]:
    """nodeid -> path of every live node now (find-paths' premigration pass).

    Run while the guest still runs (QEMU is copying RAM), so that the save at
    switch-over only has to confirm each path with one ``fstatat`` instead of
    opening every node by handle (:func:`export_state`); a path that no
    longer leads to its inode by then is looked up again.
    """
    with s.lock:
        live = []
        for slot in range(FUSE_ROOT_ID + 1, s.cap_nodes):
            gen, st_, _n = s.node_head(slot)
            if st_ == USED:
                live.append((make_id(slot, gen), _NODE.unpack_from(s.mem, s.node_off(slot))))
    out = {}
    for nodeid, (_g, _st, _n, dev, _ino, _kind, owner, htype, hlen, handle) in live:
        if owner == ANY_WORKER and hlen:
            path, _err = _path_of(share, dev, htype, bytes(handle[:hlen]))
            if path:
                out[nodeid] = path
    return out


def export_state(s: SharedState, share: Share, mode: int, verify_handles: bool,
                 known: dict[int, bytes] | None = None) -> DeviceState:
    """Every live node and handle of the arena (rings stopped: nothing changes under us).

    ``known``: paths from :func:`collect_paths`, each used only if it still
    leads to the node's inode (same st_dev and st_ino, not following a final
    symlink); any other node is opened by handle and its path read again.
    """
    state = DeviceState(mode, s.init_flags)
    node_floor = handle_floor = 0
    with s.lock:
        raw_nodes = []
        heads = _slot_heads(s, s.nodes_off, _NODE.size, s.cap_nodes)
        node_floor = max(w & _GEN_MASK for w in heads)
        for slot in range(FUSE_ROOT_ID + 1, s.cap_nodes):
            if heads[slot] >> 32 == USED:
                raw_nodes.append((slot, _NODE.unpack_from(s.mem, s.node_off(slot))))
        for slot in range(1, s.cap_handles):
            gen, st_, nodeid, flags, is_dir = _HANDLE.unpack_from(s.mem, s.handle_off(slot))
            handle_floor = max(handle_floor, gen)
            if st_ == USED:
                state.handles.append(HandleState(make_id(slot, gen), nodeid, flags,
                                                 bool(is_dir)))
    state.node_floor, state.handle_floor = node_floor, handle_floor
    known = known or {}
    for slot, (gen, _st, nlookup, dev, ino, kind, owner, htype, hlen, handle) in raw_nodes:
        hbytes = bytes(handle[:hlen])
        nodeid = make_id(slot, gen)
        if owner != ANY_WORKER or not hlen:
            # No handle: a node on a mount only its worker saw (shared.py "Limits").
            state.nodes.append(NodeState(nodeid, nlookup, kind, error=errno.ESTALE))
            continue
        if mode == MODE_FILE_HANDLES:
            state.nodes.append(NodeState(nodeid, nlookup, kind, None, htype, hbytes))
            continue
        path = _confirm(share, known.get(nodeid), dev, ino)
        error = 0
        if path is None:
            path, error = _path_of(share, dev, htype, hbytes)
        keep = hbytes if verify_handles else b""
        state.nodes.append(NodeState(nodeid, nlookup, kind, path, htype if keep else 0, keep,
                                     error))
    return state


def _confirm(share: Share, path: bytes | None, dev: int, ino: int) -> bytes | None:
    """``path`` if it still names the inode (dev, ino) under the share, else None."""
    if not path:
        return None
    try:
        st = os.stat(path, dir_fd=share.root_fd, follow_symlinks=False)
    except OSError:
        return None
    return path if (st.st_dev, st.st_ino) == (dev, ino) else None


def _slot_heads(s: SharedState, base: int, size: int, count: int) -> list[int]:
    """The first word (state << 32 | generation) of every slot of a table, read
    in one strided pass (the layout shared.py stores with one aligned store)."""
    with memoryview(s.mem) as mv:
        return mv[base:base + size * count].cast("Q")[::size // 8].tolist()


def _path_of(share: Share, dev: int, htype: int, handle: bytes) -> tuple[bytes | None, int]:
    if dev != share.root_dev:
        return None, errno.EXDEV  # a submount: its handles need its own mount fd
    try:
        fd = open_by_handle(share.mount_fd, htype, handle, os.O_PATH | os.O_NOFOLLOW)
    except OSError as e:
        return None, e.errno or errno.ESTALE
    try:
        path = share.relative(fd)
    finally:
        os.close(fd)
    if not path:
        return None, errno.ENOENT  # unlinked, replaced, or not under the share
    return path, 0


# -- load ---------------------------------------------------------------------------


class Plan:
    """What the destination will write into its arena, all checked beforehand."""

    nodes: list[tuple[NodeState, tuple[int, int, int, int, int, bytes] | None]]
    handles: list[tuple[HandleState, bool]]
    lost: list[str]

    def __init__(self,
                 nodes: list[tuple[NodeState, tuple[int, int, int, int, int, bytes] | None]]
                 | None = None,
                 handles: list[tuple[HandleState, bool]] | None = None,
                 lost: list[str] | None = None) -> None:
        self.nodes = [] if nodes is None else nodes
        self.handles = [] if handles is None else handles
        self.lost = [] if lost is None else lost


def plan_import(state: DeviceState, share: Share, on_error: str) -> Plan:
    """Find every node and reopen every handle; MigrationError under ``abort``."""
    plan = Plan()
    dirs = _DirCache(share.root_fd)
    try:
        _plan_nodes(state, share, on_error, plan, dirs)
    finally:
        dirs.close()
    return plan


def _plan_nodes(state: DeviceState, share: Share, on_error: str, plan: Plan,
                dirs: _DirCache) -> None:
    found: dict[int, tuple[int, int, int, int, int, bytes] | None] = {}
    keys: dict[tuple[int, int], int] = {}
    for n in state.nodes:
        try:
            if n.error:
                raise MigrationError(f"the source could not locate it "
                                     f"({errno.errorcode.get(n.error, n.error)})")
            rec = _locate(n, share, state.mode, dirs)
            key = (rec[0], rec[1])
            if key in keys or key == (share.root_dev, share.root_ino):
                raise MigrationError(f"it is the same inode as node {keys.get(key, 1):#x}")
            keys[key] = n.nodeid
        except (MigrationError, OSError, FsError) as e:
            why = f"node {n.nodeid:#x} ({_describe(n)}): {_reason(e)}"
            if on_error == "abort":
                raise MigrationError(why) from None
            plan.lost.append(why)
            rec = None
        found[n.nodeid] = rec
        plan.nodes.append((n, rec))
    for h in state.handles:
        ok = True
        rec = found.get(h.nodeid) if h.nodeid != FUSE_ROOT_ID else None
        try:
            if h.nodeid != FUSE_ROOT_ID and rec is None:
                raise MigrationError("its node is lost")
            _check_open(share, rec, h)
        except (MigrationError, OSError) as e:
            why = f"handle {h.fh:#x} on node {h.nodeid:#x}: {_reason(e)}"
            if on_error == "abort":
                raise MigrationError(why) from None
            plan.lost.append(why)
            ok = False
        plan.handles.append((h, ok))


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _describe(n: NodeState) -> str:
    if n.path is not None:
        return "path " + n.path.decode(errors="backslashreplace")
    return "by file handle" if n.handle else "no location"


class _DirCache:
    """O_PATH fds of the directories walked so far while loading, by path: the
    nodes of one directory are found with one open each, not one per component.
    Every entry was itself opened one checked component at a time."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.fds: dict[bytes, int] = {}
        self.handle_of = _HandleReader()

    def get(self, path: bytes) -> int:
        """The directory ``path`` (b"" is the root); the cache keeps the fd."""
        if not path:
            return self.root_fd
        fd = self.fds.get(path)
        if fd is None:
            parent, _, name = path.rpartition(b"/")
            check_name(name)
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC,
                         dir_fd=self.get(parent))
            if len(self.fds) >= _DIR_CACHE_FDS:
                self.close()  # bounded: a share of many directories costs re-walks, not fds
            self.fds[path] = fd
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _locate(n: NodeState, share: Share, mode: int,
            dirs: _DirCache) -> tuple[int, int, int, int, int, bytes]:
    """(dev, ino, kind, owner, handle type, handle) of the inode ``n`` names, found
    as the mode says and checked; raises MigrationError, OSError or FsError."""
    if mode == MODE_FILE_HANDLES:
        if not n.handle:
            raise MigrationError("no file handle in the state")
        fd = open_by_handle(share.mount_fd, n.handle_type, n.handle, os.O_PATH | os.O_NOFOLLOW)
        try:
            if not share.inside(fd):
                raise MigrationError("its file handle names an inode outside the share")
            return _record(fd, n, None)
        finally:
            os.close(fd)
    if n.path is None:
        raise MigrationError("no path in the state")
    parent, _, name = n.path.rpartition(b"/")
    check_name(name)
    # By name under the held parent, nothing opened: a stat and a handle of the
    # entry itself.  Were the entry swapped between the two, the workers' own
    # (st_dev, st_ino) check on opening the handle answers ESTALE, never another file.
    dir_fd = dirs.get(parent)
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    htype, handle = dirs.handle_of(dir_fd, name)
    # The source sends handles by path only with --migration-verify-handles
    # (a source option, as virtiofsd's): any handle in the stream is compared.
    return _checked(st, n, htype, handle, n.handle or None)


def _record(fd: int, n: NodeState, expect_handle: bytes | None
            ) -> tuple[int, int, int, int, int, bytes]:
    htype, handle, _mnt = name_to_handle(fd)
    return _checked(os.fstat(fd), n, htype, handle, expect_handle)


def _checked(st: os.stat_result, n: NodeState, htype: int, handle: bytes,
             expect_handle: bytes | None) -> tuple[int, int, int, int, int, bytes]:
    kind = stat.S_IFMT(st.st_mode)
    if kind != n.kind:
        raise MigrationError(f"it is now a different kind of file ({kind:o}, was {n.kind:o})")
    if expect_handle is not None and (handle != expect_handle or htype != n.handle_type):
        raise MigrationError("its file handle differs from the source's "
                             "(--migration-verify-handles: replaced on the host?)")
    return st.st_dev, st.st_ino, kind, ANY_WORKER, htype, handle


def _check_open(share: Share, rec: tuple[int, int, int, int, int, bytes] | None,
                h: HandleState) -> None:
    """Reopen the handle once, as a worker will (flags that took effect dropped)."""
    if rec is None:
        fd = os.open(share.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        os.close(fd)
        return
    dev, ino, kind, _owner, htype, handle = rec
    if h.is_dir != (kind == stat.S_IFDIR):
        raise MigrationError("handle and node disagree on being a directory")
    if kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise MigrationError("a handle on something not a file or directory")
    flags = (os.O_RDONLY | os.O_DIRECTORY if h.is_dir
             else h.flags & ~_OPEN_CHECK_DROP)
    fd = open_by_handle(share.mount_fd, htype, handle,
                        flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    os.close(fd)


def apply_import(s: SharedState, state: DeviceState, plan: Plan) -> None:
    """Write the planned nodes and handles into an empty arena (under its lock)."""
    with s.lock:
        if s._hdr(2) > 1 or s._hdr(3) > 0:
            raise MigrationError(f"this daemon already serves {s._hdr(2) - 1} nodes and "
                                 f"{s._hdr(3)} handles; a migration loads into a fresh one")
        used_nodes: set[int] = set()
        for n, _rec in plan.nodes:
            slot, gen = split_id(n.nodeid)
            if not 1 < slot < s.cap_nodes:
                raise MigrationError(f"node {n.nodeid:#x} is beyond max_nodes")
            used_nodes.add(slot)
        used_handles: set[int] = set()
        for h, _ok in plan.handles:
            slot, gen = split_id(h.fh)
            if not 0 < slot < s.cap_handles:
                raise MigrationError(f"handle {h.fh:#x} is beyond max_handles")
            used_handles.add(slot)
        _reset_free(s, s.cap_nodes, FUSE_ROOT_ID + 1, s.node_free_off, 4, used_nodes,
                    state.node_floor, s.node_off)
        _reset_free(s, s.cap_handles, 1, s.handle_free_off, 5, used_handles,
                    state.handle_floor, s.handle_off)
        for n, rec in plan.nodes:
            slot, gen = split_id(n.nodeid)
            if rec is None:
                _NODE.pack_into(s.mem, s.node_off(slot), gen, USED, n.nlookup, 0, 0, n.kind,
                                LOST_OWNER, 0, 0, b"")
            else:
                dev, ino, kind, owner, htype, handle = rec
                _NODE.pack_into(s.mem, s.node_off(slot), gen, USED, n.nlookup, dev, ino, kind,
                                owner, htype, len(handle), handle)
                s.index_add(dev, ino, slot)
        lost_nodes = {n.nodeid for n, rec in plan.nodes if rec is None}
        for h, ok in plan.handles:
            slot, gen = split_id(h.fh)
            # A handle on a lost node keeps it (ESTALE, from the node); one that
            # failed to reopen on a found node names none (ENOENT).
            nodeid = h.nodeid if ok or h.nodeid in lost_nodes else 0
            _HANDLE.pack_into(s.mem, s.handle_off(slot), gen, USED, nodeid, h.flags,
                              int(h.is_dir))
        s._set_hdr(2, 1 + len(plan.nodes))
        s._set_hdr(3, len(plan.handles))
        s.init_flags = state.init_flags
        s.append_log(LOG_CLEAR_NODES, 0, 0)
        s.append_log(LOG_CLEAR_HANDLES, 0, 0)


def _reset_free(s: SharedState, cap: int, first: int, free_off: int, hdr_field: int,
                used: set[int], floor: int, off_of: object) -> None:
    """Rebuild a free stack without ``used`` and move every free slot's generation
    to ``floor`` (so no id from before the migration names a new node)."""
    assert callable(off_of)
    top = 0
    q = s._q
    for slot in range(cap - 1, first - 1, -1):
        if slot in used:
            continue
        q[off_of(slot) >> 3] = FREE << 32 | floor
        s.mem[free_off + 4 * top:free_off + 4 * top + 4] = slot.to_bytes(4, "little")
        top += 1
    s._set_hdr(hdr_field, top)
