"""FUSE reply encoding, the dispatcher's limits and counters.

The pieces of :mod:`shardfs.dispatch` that turn filesystem results
(:class:`~shardfs.fs.api.Entry`, ``os.stat_result``) into ``fuse_*_out``
bytes -- written in place into the chain's writable side where the reply
fits one view -- and the limits and counters every path shares.  Nothing
here decodes a request or calls a filesystem.
"""

from __future__ import annotations

import logging
import os

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.fs.api import NSEC_PER_SEC, Entry
from shardfs.virtq.chain import ChainWriter

log = logging.getLogger("shardfs.dispatch")

OUT_HDR = F.fuse_out_header.size
_pack_out = F.fuse_out_header.pack
_OUT_HEADER = F.fuse_out_header
_IN_HEADER = F.fuse_in_header
_IN_HEADER_SIZE = F.fuse_in_header.size
_unpack_in = F.fuse_in_header.unpack_from
_ENTRY_OUT, _ATTR_OUT, _GETATTR_IN = F.fuse_entry_out, F.fuse_attr_out, F.fuse_getattr_in
_GETATTR_FH = F.FUSE_GETATTR_FH
#: Opcodes that have no handler in TABLE, as plain ints (an IntEnum compares slowly).
_FORGET, _BATCH_FORGET, _INTERRUPT = (int(Op.FUSE_FORGET), int(Op.FUSE_BATCH_FORGET),
                                      int(Op.FUSE_INTERRUPT))
#: The used length :meth:`Dispatcher.handle` returns for a chain answered later
#: (a SETLKW that waits): the caller parks the chain (shardfs.proc.lockclient).
PENDING = -1
#: Callers whose Context a dispatcher keeps (see Dispatcher._context).
MAX_CACHED_CONTEXTS = 256
_U64 = 0xFFFFFFFFFFFFFFFF
_U32 = 0xFFFFFFFF
NSEC = NSEC_PER_SEC

#: Largest WRITE we accept, and what INIT advertises as max_write.
MAX_WRITE = 1 << 20
#: Pages per request advertised in INIT (FUSE_MAX_PAGES): 1 MiB of 4 KiB pages.
MAX_PAGES = MAX_WRITE // 4096
#: Upper bound for READDIR/READ reply buffers and xattr sizes we honour.
MAX_READ = MAX_WRITE
MAX_XATTR_SIZE = 1 << 16
#: A name or symlink target is at most PATH_MAX bytes plus its NUL.
MAX_NAME_BYTES = 4096 + 1
#: BATCH_FORGET entries per request that we accept.
MAX_BATCH_FORGET = 1 << 16
#: The first minor whose requests carry extensions (fuse_in_header.total_extlen).
EXTENSIONS_MINOR = 38
#: Supplementary groups one creating request may carry (Linux sends one).
MAX_EXT_GROUPS = 32


class Malformed(Exception):
    """The guest's request does not follow the FUSE ABI."""


class Stats:
    """Counters a worker exports; plain ints, updated on the hot path."""

    requests: int
    errors: int
    malformed: int
    dropped: int
    bugs: int
    bytes_read: int
    bytes_written: int

    def __init__(self, requests: int = 0, errors: int = 0, malformed: int = 0, dropped: int = 0,
                 bugs: int = 0, bytes_read: int = 0, bytes_written: int = 0) -> None:
        self.requests = requests
        self.errors = errors
        self.malformed = malformed
        self.dropped = dropped
        self.bugs = bugs
        self.bytes_read = bytes_read
        self.bytes_written = bytes_written


def encode_dev(rdev: int) -> int:
    """Linux new_encode_dev: the u32 device number FUSE carries."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & _U32


def decode_dev(dev: int) -> int:
    """Linux new_decode_dev, the inverse of :func:`encode_dev`."""
    major = (dev & 0xFFF00) >> 8
    minor = (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def attr_fields(st: os.stat_result) -> tuple[int, ...]:
    """``os.stat_result`` to the field order of ``struct fuse_attr``."""
    a_s, a_ns = divmod(st.st_atime_ns, NSEC)
    m_s, m_ns = divmod(st.st_mtime_ns, NSEC)
    c_s, c_ns = divmod(st.st_ctime_ns, NSEC)
    nlink, rdev = st.st_nlink, st.st_rdev
    return (st.st_ino & _U64, st.st_size & _U64, st.st_blocks & _U64, a_s & _U64, m_s & _U64,
            c_s & _U64, a_ns, m_ns, c_ns, st.st_mode, nlink if nlink < _U32 else _U32,
            st.st_uid, st.st_gid, encode_dev(rdev) if rdev else 0, st.st_blksize & _U32, 0)


#: Timeouts come from a cache policy, so few distinct values are ever split.
_SPLIT_TIMEOUTS: dict[float, tuple[int, int]] = {}


def _split_timeout(t: float) -> tuple[int, int]:
    got = _SPLIT_TIMEOUTS.get(t)
    if got is None:
        secs = int(t)
        got = (secs, int((t - secs) * NSEC))
        if len(_SPLIT_TIMEOUTS) < 64:
            _SPLIT_TIMEOUTS[t] = got
    return got


def pack_entry(e: Entry) -> bytes:
    ev, ens = _split_timeout(e.entry_timeout_s)
    av, ans = _split_timeout(e.attr_timeout_s)
    return F.fuse_entry_out.pack(e.nodeid, e.generation, ev, av, ens, ans,
                                 *attr_fields(e.attr)[:-1], e.attr_flags)


def pack_attr(st: os.stat_result, timeout_s: float) -> bytes:
    av, ans = _split_timeout(timeout_s)
    return F.fuse_attr_out.pack(av, ans, 0, *attr_fields(st))


# The two packers below spell attr_fields() out in the call: building a tuple
# and spreading it with * costs more than the stat itself.
def _pack_attr_out(view: memoryview, pos: int, valid: int, valid_ns: int,
                   st: os.stat_result) -> None:
    """``fuse_attr_out.pack_into(view, pos, valid, valid_ns, 0, *attr_fields(st))``."""
    # The first ten fields are a tuple: one unpack instead of six attribute
    # loads.  The whole seconds come from the _ns fields, as in attr_fields.
    mode, ino, _dev, nlink, uid, gid, size, _a, _m, _c = st
    a_s, a_ns = divmod(st.st_atime_ns, NSEC)
    m_s, m_ns = divmod(st.st_mtime_ns, NSEC)
    c_s, c_ns = divmod(st.st_ctime_ns, NSEC)
    rdev = st.st_rdev
    _ATTR_OUT.pack_into(view, pos, valid, valid_ns, 0, ino & _U64, size & _U64,
                        st.st_blocks & _U64, a_s & _U64, m_s & _U64, c_s & _U64, a_ns, m_ns,
                        c_ns, mode, nlink if nlink < _U32 else _U32, uid, gid,
                        encode_dev(rdev) if rdev else 0, st.st_blksize & _U32, 0)


def _pack_entry_out(view: memoryview | bytearray, pos: int, e: Entry) -> None:
    """``fuse_entry_out.pack_into(view, pos, ...)`` of :func:`pack_entry`."""
    ev, ens = _split_timeout(e.entry_timeout_s)
    av, ans = _split_timeout(e.attr_timeout_s)
    st = e.attr
    mode, ino, _dev, nlink, uid, gid, size, _a, _m, _c = st  # as in _pack_attr_out
    a_s, a_ns = divmod(st.st_atime_ns, NSEC)
    m_s, m_ns = divmod(st.st_mtime_ns, NSEC)
    c_s, c_ns = divmod(st.st_ctime_ns, NSEC)
    rdev = st.st_rdev
    _ENTRY_OUT.pack_into(view, pos, e.nodeid, e.generation, ev, av, ens, ans, ino & _U64,
                         size & _U64, st.st_blocks & _U64, a_s & _U64, m_s & _U64,
                         c_s & _U64, a_ns, m_ns, c_ns, mode,
                         nlink if nlink < _U32 else _U32, uid, gid,
                         encode_dev(rdev) if rdev else 0, st.st_blksize & _U32, e.attr_flags)


def _reply_entry(w: ChainWriter, e: Entry) -> int:
    """:func:`pack_entry` packed straight into the reply (no bytes in between)."""
    spot = w.span(OUT_HDR, _ENTRY_OUT.size)
    if spot is None:
        return reply(w, pack_entry(e))
    _pack_entry_out(spot[0], spot[1], e)
    return _ENTRY_OUT.size


def _reply_attr(w: ChainWriter, st: os.stat_result, timeout_s: float) -> int:
    """:func:`pack_attr` packed straight into the reply."""
    spot = w.span(OUT_HDR, _ATTR_OUT.size)
    if spot is None:
        return reply(w, pack_attr(st, timeout_s))
    av, ans = _split_timeout(timeout_s)
    _pack_attr_out(spot[0], spot[1], av, ans, st)
    return _ATTR_OUT.size


def reply(w: ChainWriter, data: bytes) -> int:
    """Write a reply body after the header's room; return its length."""
    w.write_at(OUT_HDR, data)
    return len(data)
