"""FUSE request extensions (7.38+): security contexts and supplementary groups.

A creating request may carry ``fuse_ext_header`` records after its
arguments; the dispatcher reads them here into the caller's Context.
Every length is checked against the bytes the request really has.
"""

from __future__ import annotations

from shardfs.abi import fuse as F
from shardfs.dispatch.replies import _U64, MAX_EXT_GROUPS, MAX_XATTR_SIZE, NSEC, Malformed
from shardfs.fs.api import SecContext
from shardfs.virtq.chain import ChainReader


def _extension_area(r: ChainReader) -> bytes:
    """The request's extension bytes: the last ``8 * total_extlen`` of its length.

    ``handle`` bounds the reader to the op's arguments, so the header is
    read again from the start of the chain's views (it was already checked
    there: ``len`` fits the chain and covers the extensions).
    """
    whole = ChainReader(r._bufs, sum(len(b) for b in r._bufs))
    length, *_, extlen, _pad = whole.read_struct(F.fuse_in_header)
    if not extlen:
        return b""
    whole.skip(length - F.fuse_in_header.size - 8 * extlen)
    return whole.read_bytes(8 * extlen)


def _secctx(body: bytes, count: int) -> tuple[SecContext, ...]:
    """``count`` security contexts: fuse_secctx{size}, a NUL-ended name, the value."""
    out = []
    pos = 0
    for _ in range(count):
        if pos + F.fuse_secctx.size > len(body):
            raise Malformed("security context truncated")
        size, _pad = F.fuse_secctx.unpack_from(body, pos)
        pos += F.fuse_secctx.size
        end = body.find(b"\0", pos)
        if end <= pos or end + 1 + size > len(body) or size > MAX_XATTR_SIZE:
            raise Malformed("security context name or value out of bounds")
        out.append(SecContext(body[pos:end], body[end + 1:end + 1 + size]))
        pos = end + 1 + size
    return tuple(out)


def _supp_groups(body: bytes) -> tuple[int, ...]:
    """fuse_supp_groups: nr_groups, then the gids."""
    if len(body) < F.fuse_supp_groups.size:
        raise Malformed("supplementary groups truncated")
    (nr,) = F.fuse_supp_groups.unpack_from(body)
    if nr > MAX_EXT_GROUPS or F.fuse_supp_groups.size + 4 * nr > len(body):
        raise Malformed(f"{nr} supplementary groups in {len(body)} bytes")
    return tuple(int.from_bytes(body[4 + 4 * i:8 + 4 * i], "little") for i in range(nr))


def _ns(secs: int, nsec: int) -> int:
    if secs > _U64 >> 1:
        secs -= 1 << 64
    return secs * NSEC + nsec
