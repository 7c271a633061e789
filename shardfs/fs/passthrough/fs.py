"""``PassthroughFs``: serve a host directory to the guest.

The op groups live in their own modules (``names``, ``files``, ``dirs``,
``attrs``, ``xattrs``) as mixins on ``core.PassthroughBase``; this module
combines them and owns construction, INIT/DESTROY and FORGET.

Process-wide effects of construction, on purpose:

* ``umask(0)``: the guest's umask arrives with every creating request and
  is applied here; a host umask on top would change the modes the guest
  asked for (virtiofsd does the same at start-up).
* The soft RLIMIT_NOFILE is raised to the hard limit, and the node and
  handle budgets plus :data:`FD_RESERVE` are fitted below it (scaled
  down, with a warning, when asked for more), so a guest can never run
  the daemon out of fds (CVE-2020-10717).  The budgets are per instance:
  the daemon runs one instance per process.

One instance is driven by one thread: the tables are not locked, and a
FORGET racing an op on another thread could close an fd that op is using.
"""

from __future__ import annotations

import logging
import os
import resource

from shardfs.fs.passthrough import creds
from shardfs.fs.passthrough import sys as lsys
from shardfs.fs.passthrough.attrs import AttrOps
from shardfs.fs.passthrough.core import PROC_SELF_FD, RESOLVE_ONE_NAME
from shardfs.fs.passthrough.dirs import DirOps
from shardfs.fs.passthrough.files import FileOps
from shardfs.fs.passthrough.handles import DEFAULT_MAX_HANDLES
from shardfs.fs.passthrough.names import NameOps
from shardfs.fs.passthrough.nodes import DEFAULT_MAX_NODES, Node
from shardfs.fs.passthrough.policy import cache_policy
from shardfs.fs.passthrough.session import InitOptions, wanted_flags
from shardfs.fs.passthrough.shared import SharedHandleTable, SharedNodeTable, SharedState
from shardfs.fs.passthrough.xattrs import XattrOps
from shardfs.fs.xattrmap import XattrMap

log = logging.getLogger("shardfs.fs.passthrough")

#: Fds kept free for the daemon itself (sockets, eventfds, memory regions,
#: the short-lived fds an op opens and closes).
FD_RESERVE = 1024
#: Without explicit budgets, nodes get this share of the fds available.
NODE_SHARE = 0.75
#: ``inode_file_handles`` values (virtiofsd's --inode-file-handles); see the class doc.
INODE_FILE_HANDLES = ("never", "prefer", "mandatory")
#: fs.nr_open's default: the most RLIMIT_NOFILE can be when the hard limit is infinite.
NR_OPEN_DEFAULT = 1 << 20


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; return the soft limit now.

    Only the soft limit moves (raising the hard one needs CAP_SYS_RESOURCE,
    which a sandboxed daemon does not have); an operator who wants more
    raises the hard limit before starting us.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NR_OPEN_DEFAULT if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass  # keep the soft limit we have; the budgets are checked against it
    return NR_OPEN_DEFAULT if soft == resource.RLIM_INFINITY else soft


def fd_budgets(max_nodes: int | None, max_handles: int | None) -> tuple[int, int]:
    """The node and handle budgets, fitted below RLIMIT_NOFILE.

    A budget left as None takes a share of what the limit allows (capped at
    the table's default).  Budgets that together exceed the limit, less
    :data:`FD_RESERVE`, are scaled down in proportion and a warning is
    logged: a guest must never be able to run the daemon out of fds
    (CVE-2020-10717), and refusing to start over a too-generous setting
    would help no one.  ValueError for budgets below the minimum (one node
    for the root, no negative handle count) or a limit too small for that.
    """
    if (max_nodes is not None and max_nodes < 1) or (max_handles is not None
                                                     and max_handles < 0):
        raise ValueError(f"budgets {max_nodes} nodes / {max_handles} handles: need at least "
                         "1 node (the root) and no negative handle count")
    limit = raise_fd_limit()
    available = limit - FD_RESERVE
    if available < 1:
        raise ValueError(f"RLIMIT_NOFILE {limit} leaves no fds for nodes after the "
                         f"{FD_RESERVE} reserved")
    if max_nodes is None:
        rest = available - (max_handles or 0)
        max_nodes = min(DEFAULT_MAX_NODES, int(rest * NODE_SHARE) if max_handles is None
                        else rest)
        max_nodes = max(max_nodes, 1)
    if max_handles is None:
        max_handles = max(min(DEFAULT_MAX_HANDLES, available - max_nodes), 0)
    total = max_nodes + max_handles
    if total > available:
        nodes = max(max_nodes * available // total, 1)
        handles = max(min(max_handles * available // total, available - nodes), 0)
        log.warning("%d nodes + %d handles + %d reserved fds exceed RLIMIT_NOFILE (%d); "
                    "using %d nodes and %d handles", max_nodes, max_handles, FD_RESERVE,
                    limit, nodes, handles)
        max_nodes, max_handles = nodes, handles
    return max_nodes, max_handles


def _probe_openat2(dirfd: int) -> bool:
    """Whether openat2 works here (Linux 5.6+, and not filtered by seccomp)."""
    try:
        fd = lsys.openat2(dirfd, b".", os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_ONE_NAME)
    except OSError:
        return False
    os.close(fd)
    return True


class PassthroughFs(XattrOps, DirOps, AttrOps, FileOps, NameOps):
    """A FileSystem that passes every op through to ``shared_dir`` on the host.

    Contracts (beyond ``shardfs.fs.api``): names never leave their parent
    and host symlinks are never followed; only regular files and
    directories are ever opened; ops whose outcome depends on the caller
    run with its fsuid/fsgid (``creds``); every fd is owned by the node
    table, the handle table, or the op that opened it (closed before it
    returns, error or not).
    """

    def __init__(self, shared_dir: str, *, cache: str = "auto",
                 max_nodes: int | None = None, max_handles: int | None = None,
                 xattr: bool = True, writeback: bool = False,
                 shared: SharedState | None = None, worker: int = 0,
                 posix_acl: bool = False, killpriv_v2: bool = False,
                 security_label: bool = False, xattrmap: XattrMap | str | None = None,
                 allow_direct_io: bool = False, guest_dac: bool = True,
                 submounts: dict[int, int] | None = None, announce_submounts: bool = True,
                 readdirplus: bool = True, allow_mmap: bool = False,
                 preserve_noatime: bool = False, inode_file_handles: str = "never",
                 cache_timeout_s: float | None = None) -> None:
        """Serve ``shared_dir`` (an admin-given path; symlinks in it are followed).

        ``cache`` is a ``policy`` name (never, metadata, auto, always).
        ``max_nodes`` counts the root; ``max_handles`` counts OPEN, CREATE
        and OPENDIR handles together; None sizes them from RLIMIT_NOFILE
        (see :func:`fd_budgets`).  ``writeback`` asks for
        FUSE_WRITEBACK_CACHE at INIT.  See the module doc for the
        process-wide effects.

        ``shared`` is the node and handle state every worker process shares
        (:mod:`shardfs.fs.passthrough.shared`); ``worker`` names this
        process in it.  Without one, the instance makes a private state
        sized by the budgets.

        The options named as virtiofsd's, each asked for at INIT only when
        the guest offers it: ``posix_acl`` (FUSE_POSIX_ACL with DONT_MASK,
        and SETXATTR_EXT when offered; needs ``xattr``), ``killpriv_v2``
        (FUSE_HANDLE_KILLPRIV_V2), ``security_label`` (FUSE_SECURITY_CTX).
        ``xattrmap`` renames xattrs (:mod:`shardfs.fs.xattrmap`; a string is
        parsed, ValueError if bad).  ``allow_direct_io`` passes a guest's
        O_DIRECT on to the host open.  ``guest_dac=False`` is for a daemon
        that may not call capset(2) (``creds.configure``).  The INIT flags
        of ``readdirplus``, ``announce_submounts`` (mount points then carry
        FUSE_ATTR_SUBMOUNT) and ``allow_mmap`` are in
        :mod:`~shardfs.fs.passthrough.session`.  ``preserve_noatime`` keeps
        a guest's O_NOATIME on host opens (stripped otherwise, as virtiofsd
        does).  ``cache_timeout_s`` replaces the cache policy's entry and
        attr timeouts (the C virtiofsd's ``-o timeout=``).

        ``inode_file_handles`` (virtiofsd's option): every node records a
        file handle whatever the value, because workers on other queues
        reopen nodes by handle, and each worker keeps an O_PATH fd for the
        nodes it uses; so ``never`` and ``prefer`` behave alike.
        ``mandatory`` answers a LOOKUP of a node whose filesystem makes no
        file handles (name_to_handle_at: EOPNOTSUPP, EOVERFLOW) with
        EOPNOTSUPP, as virtiofsd does; the supervisor refuses a share whose
        own root has none (:func:`shardfs.fs.passthrough.fhandle.check_handles`).

        ``submounts`` maps the ``st_dev`` of each mount under the share to an
        fd on it (:func:`shardfs.fs.passthrough.mounts.submount_fds`), so
        nodes there can be opened by handle in every worker; the instance
        owns those fds in every outcome.
        """
        if posix_acl and not xattr:
            for fd in (submounts or {}).values():
                os.close(fd)
            raise ValueError("posix_acl needs xattr")
        if isinstance(xattrmap, str):
            xattrmap = XattrMap.parse(xattrmap)
        self._xattrmap = xattrmap
        self._mapped_capability = None
        if xattrmap is not None:
            cap = xattrmap.host_name(b"security.capability")
            if cap != b"security.capability":
                self._mapped_capability = cap
        if inode_file_handles not in INODE_FILE_HANDLES:
            for fd in (submounts or {}).values():
                os.close(fd)
            raise ValueError(f"inode_file_handles {inode_file_handles!r}: one of "
                             f"{', '.join(INODE_FILE_HANDLES)}")
        self._posix_acl = posix_acl
        self._killpriv_v2 = killpriv_v2
        self._security_label = security_label
        self._allow_direct_io = allow_direct_io
        self._init_options = InitOptions(writeback, killpriv_v2, posix_acl, security_label,
                                         announce_submounts, readdirplus, allow_mmap)
        self._open_mask = self.open_mask(allow_direct_io, preserve_noatime)
        creds.configure(guest_dac=guest_dac)
        self._policy = cache_policy(cache, cache_timeout_s)
        max_nodes, max_handles = fd_budgets(max_nodes, max_handles)
        if shared is None:
            shared = SharedState(max_nodes, max_handles)
        self._shared = shared
        self._xattr = xattr
        self._writeback = writeback
        self._proc_fd = os.open(PROC_SELF_FD, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        root = os.stat("/")
        self._root_at_open = (root.st_dev, root.st_ino)
        try:
            root_fd = os.open(shared_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self._nodes = SharedNodeTable(shared, root_fd, worker, submounts)
            self._nodes.handles_mandatory = inode_file_handles == "mandatory"
        except BaseException:
            os.close(self._proc_fd)
            raise
        self._handles = SharedHandleTable(shared, self._nodes, self._reopen_handle)
        self._idle_seen = -1
        self._log_seq_word = shared._hdr64
        self._has_openat2 = _probe_openat2(root_fd)
        os.umask(0)

    # -- session ------------------------------------------------------------

    def init(self, capable: int) -> int:
        """Ask for what the options want (:func:`session.wanted_flags`).

        The dispatcher enables ``capable & returned`` (and tells us with
        :meth:`negotiated`), so each feature is on exactly when both hold.
        """
        wants = wanted_flags(self._init_options, capable)
        self._shared.init_flags = wants & capable
        return wants

    def negotiated(self, flags: int) -> None:
        """Record the flags in force where every worker sees them."""
        self._shared.init_flags = flags

    def session_flags(self) -> int:
        return self._shared.init_flags

    def _reopen_handle(self, node: Node, flags: int, is_dir: bool) -> int:
        """An fd for a handle another worker opened (OPEN on one queue, READ on another)."""
        if is_dir:
            return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=node.fd)
        return self._reopen(node, flags)

    def destroy(self) -> None:
        """Close every handle and drop every node but the root."""
        self._handles.clear()
        self._nodes.clear()
        self._nodes.reap()
        self._shared.init_flags = 0

    def idle(self) -> None:
        """Close the fds this worker cached for nodes and handles freed elsewhere.

        Cheap when nothing was freed (one read of the shared log's sequence),
        so the worker calls it before every request: a request answered on any
        queue has seen every FORGET and RELEASE completed before it was sent.
        """
        nodes = self._nodes
        seq = self._log_seq_word[1]  # SharedState.log_seq(), inlined
        if seq != self._idle_seen:
            nodes.sync()
            self._handles.sync()
            self._idle_seen = seq
        if nodes.graveyard:
            nodes.reap()

    def close(self) -> None:
        """Release every fd, the root's and /proc's included; the end of the instance."""
        self._handles.clear()
        self._nodes.close()
        if self._proc_fd >= 0:
            os.close(self._proc_fd)
            self._proc_fd = -1

    def __enter__(self) -> PassthroughFs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lookup counts ------------------------------------------------------

    def forget(self, nodeid: int, nlookup: int) -> None:
        """Drop ``nlookup`` lookups (clamped at zero); unknown ids are ignored."""
        try:
            self._nodes.forget(nodeid, nlookup)
            self._nodes.reap()  # a request of its own: nothing else holds a Node
        except OSError:
            pass  # close(2) of an O_PATH fd has nothing to report; never raise here

    def batch_forget(self, items: list[tuple[int, int]]) -> None:
        """BATCH_FORGET: ``forget`` for each (nodeid, nlookup) pair."""
        for nodeid, nlookup in items:
            self.forget(nodeid, nlookup)

    # -- introspection (tests, stats) ----------------------------------------

    def node_count(self) -> int:
        """Nodes held, the root included."""
        return len(self._nodes)

    def handle_count(self) -> int:
        return len(self._handles)

    def budgets(self) -> tuple[int, int]:
        """The (max_nodes, max_handles) in force after fitting them to RLIMIT_NOFILE."""
        return self._nodes.max_nodes, self._handles.max_handles

    def lookup_count(self, nodeid: int) -> int:
        """The node's lookup count; ENOENT once it is released."""
        return self._nodes.nlookup(nodeid)

