"""The dispatcher's fast paths: GETATTR, LOOKUP, READ and WRITE in the shapes drivers send.

:meth:`shardfs.dispatch.Dispatcher.handle` looks the opcode up in
:data:`FAST`; a hit decodes and packs straight on the chain's views,
without reader and writer objects.  Any other shape goes to the general
path before the filesystem acts, so a fast path never half-serves a
request.  tests/unit/test_fastpath.py checks that both paths answer
byte for byte the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.dispatch.replies import (
    _ATTR_OUT,
    _ENTRY_OUT,
    _GETATTR_FH,
    _GETATTR_IN,
    _IN_HEADER_SIZE,
    _SPLIT_TIMEOUTS,
    _U64,
    MAX_NAME_BYTES,
    MAX_READ,
    MAX_WRITE,
    OUT_HDR,
    _pack_attr_out,
    _pack_entry_out,
    _split_timeout,
)
from shardfs.fs.api import Context
from shardfs.virtq.chain import ChainWriter, DescriptorChain

if TYPE_CHECKING:
    from shardfs.dispatch import Dispatcher

# -- fast paths (see FAST) ------------------------------------------------------
# Each takes (dispatcher, ctx, nodeid, args view, args position, body length,
# reply view, reply position, chain) and returns the reply body's length, or
# None, before acting, for a shape it leaves to the general path.  Each must
# answer exactly as its op_* does (tests/unit/test_fastpath.py checks it).

_READ_IN, _WRITE_IN, _WRITE_OUT = F.fuse_read_in, F.fuse_write_in, F.fuse_write_out
_unpack_getattr_in = _GETATTR_IN.unpack_from
_unpack_read_in = _READ_IN.unpack_from
_pack_write_out = _WRITE_OUT.pack_into
_ATTR_OUT_SIZE, _ENTRY_OUT_SIZE, _WRITE_OUT_SIZE = (_ATTR_OUT.size, _ENTRY_OUT.size,
                                                    _WRITE_OUT.size)
_MAX_OFFSET = _U64 >> 1


def _fast_getattr(d: Dispatcher, ctx: Context, nodeid: int, av: memoryview, apos: int,
                  body: int, rv: memoryview, rpos: int, chain: DescriptorChain) -> int | None:
    flags, _, fh = _unpack_getattr_in(av, apos)
    st, timeout = d.fs.getattr(ctx, nodeid, fh if flags & _GETATTR_FH else None)
    split = _SPLIT_TIMEOUTS.get(timeout)
    valid, valid_ns = split if split is not None else _split_timeout(timeout)
    _pack_attr_out(rv, rpos, valid, valid_ns, st)
    return _ATTR_OUT_SIZE


def _fast_lookup(d: Dispatcher, ctx: Context, nodeid: int, av: memoryview, apos: int,
                 body: int, rv: memoryview, rpos: int, chain: DescriptorChain) -> int | None:
    end = apos + (body if body < MAX_NAME_BYTES else MAX_NAME_BYTES)
    if end > len(av):
        return None  # the name runs on into another view
    data = bytes(av[apos:end])
    nul = data.find(b"\0")
    if nul < 0:
        return None  # the general path calls it malformed
    _pack_entry_out(rv, rpos, d.fs.lookup(ctx, nodeid, data[:nul]))
    return _ENTRY_OUT_SIZE


def _fast_read(d: Dispatcher, ctx: Context, nodeid: int, av: memoryview, apos: int,
               body: int, rv: memoryview, rpos: int, chain: DescriptorChain) -> int | None:
    fh, offset, size, _rflags, _owner, _flags, _ = _unpack_read_in(av, apos)
    if size > MAX_READ or offset > _MAX_OFFSET:
        return None
    wbufs = chain.writable
    w0 = wbufs[0]
    tail = chain.tail
    if tail is not None:
        # The pages after the reply header as raw iovecs (virtq.iovec): when
        # they are exactly the data, the filesystem reads into them as they are.
        # Otherwise the general path, which makes the views first (they may
        # merge with the ones seen here).
        if not (tail.writable and len(wbufs) == 1 and len(w0) == OUT_HDR
                and size == tail.nbytes):
            return None
        n = d.fs.read_iov(ctx, nodeid, fh, offset, tail.iov, tail.count)
        if n is None:
            return None
        d.stats.bytes_read += n
        return n
    if len(w0) == OUT_HDR and size == chain.writable_len - OUT_HDR:
        bufs = wbufs[1:]  # the data pages after a reply header of its own (Linux)
    elif size and len(w0) >= OUT_HDR + size:
        bufs = [w0[OUT_HDR:OUT_HDR + size]]  # header and data in one (merged) view
    else:
        bufs = ChainWriter(wbufs, chain.writable_len).views_at(OUT_HDR, size)
    n = d.fs.read(ctx, nodeid, fh, offset, bufs)
    d.stats.bytes_read += n
    return n


def _fast_write(d: Dispatcher, ctx: Context, nodeid: int, av: memoryview, apos: int,
                body: int, rv: memoryview, rpos: int, chain: DescriptorChain) -> int | None:
    fh, offset, size, write_flags, _owner, _flags, _ = _unpack_read_in(av, apos)
    args_end = apos + _WRITE_IN.size
    # The common shape only: the arguments end their view and the payload is
    # every view after it, nothing more (a header of its own, or with the
    # arguments in one view).
    if (size > MAX_WRITE or offset > _MAX_OFFSET or args_end != len(av)
            or size != body - _WRITE_IN.size or body + _IN_HEADER_SIZE != chain.readable_len):
        return None
    rbufs = chain.readable
    tail = chain.tail
    if tail is not None:
        # The payload as raw iovecs (virtq.iovec), when the views before the
        # tail are exactly the header and the arguments; otherwise the general
        # path, as for READ.
        if tail.writable or len(rbufs) != (1 if apos else 2):
            return None
        n = d.fs.write_iov(ctx, nodeid, fh, offset, tail.iov, tail.count, write_flags)
        if n is None:
            return None
        d.stats.bytes_written += n
        _pack_write_out(rv, rpos, n, 0)
        return _WRITE_OUT_SIZE
    payload = rbufs[1:] if apos else rbufs[2:]
    n = d.fs.write(ctx, nodeid, fh, offset, payload, write_flags)
    d.stats.bytes_written += n
    _pack_write_out(rv, rpos, n, 0)
    return _WRITE_OUT_SIZE


FastFn = Callable[["Dispatcher", Context, int, memoryview, int, int, memoryview, int,
                   DescriptorChain], "int | None"]
#: (argument bytes, fixed reply bytes, function)
FastSpec = tuple[int, int, FastFn]
#: The opcodes with a fast path (in Dispatcher.handle).  Recognised: the
#: arguments whole in the header's view (right after it) or at the start of
#: the next view, at least as many bytes of them as the header's ``len``
#: says, and the reply header and any fixed reply whole in the first
#: writable view, or the header alone there and the reply at the start of
#: the next one.  The op's function returns None too when it sees a shape it
#: leaves to the general path, always before the filesystem acts.
FAST: dict[int, FastSpec] = {
    int(Op.FUSE_GETATTR): (_GETATTR_IN.size, _ATTR_OUT_SIZE, _fast_getattr),
    int(Op.FUSE_LOOKUP): (0, _ENTRY_OUT_SIZE, _fast_lookup),
    int(Op.FUSE_READ): (_READ_IN.size, 0, _fast_read),
    int(Op.FUSE_WRITE): (_WRITE_IN.size, _WRITE_OUT_SIZE, _fast_write),
}
