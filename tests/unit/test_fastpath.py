"""The dispatcher's fast paths (dispatch.FAST) answer exactly as the general path.

Every request is served twice, on two identical rings with two identical
filesystems: once as the worker serves it, once with the fast paths turned
off.  The used length, every byte of the writable side, the counters and what
the filesystem was asked must be equal, for well-formed requests in every
layout (header, arguments and reply split at each place a driver may split
them) and for malformed ones: truncated arguments, wrong ``len``,
extensions, names without NUL, sizes past the limits or the buffers, replies
that do not fit, filesystem errors and bugs.  The cases are drawn from a
seeded generator, so a failure is reproducible; a count check makes sure the
fast paths were really taken, so the comparison is not vacuous.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator
from typing import Any

import pytest

from shardfs import dispatch as D
from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.dispatch import Dispatcher
from shardfs.fs.api import Context, FsError
from tests.unit.support import Rig, fuse_request
from tests.unit.test_dispatch import ROOT, FakeFs

HDR = F.fuse_in_header.size
OUT = F.fuse_out_header.size
#: A nodeid whose getattr is a bug in the filesystem (EIO, counted in bugs).
BUGGY = 77
#: A nodeid whose write fails with an OSError.
READONLY = 78
CASES = 2000


class Fs(FakeFs):
    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[os.stat_result, float]:
        self.lookups.append(b"getattr %d %r" % (nodeid, fh))
        if nodeid == BUGGY:
            raise RuntimeError("a bug in getattr")
        return super().getattr(ctx, nodeid, fh)

    def read(self, ctx: Context, nodeid: int, fh: int, offset: int,
             buffers: list[memoryview]) -> int:
        self.lookups.append(b"read %d %d %d %d" % (nodeid, fh, offset,
                                                   sum(len(b) for b in buffers)))
        if nodeid == BUGGY:
            raise FsError(errno.EBADF)
        return super().read(ctx, nodeid, fh, offset, buffers)

    def write(self, ctx: Context, nodeid: int, fh: int, offset: int,
              buffers: list[memoryview], write_flags: int) -> int:
        if nodeid == READONLY:
            raise OSError(errno.EROFS, "read-only")
        n = super().write(ctx, nodeid, fh, offset, buffers, write_flags)
        self.lookups.append(b"write %d %d %d %d %d" % (nodeid, fh, offset, write_flags, n))
        return n


def _name(rnd: random.Random) -> bytes:
    return rnd.choice([b"a", b"b", b"missing", b"", b"x" * 300, b"with/slash", b".."])


def _request(rnd: random.Random) -> tuple[bytes, dict[str, Any], int]:
    """A request (well-formed or not), how to lay it out, and the writable length."""
    op = rnd.choice([Op.FUSE_GETATTR, Op.FUSE_LOOKUP, Op.FUSE_READ, Op.FUSE_WRITE,
                     Op.FUSE_STATFS])
    nodeid = rnd.choice([ROOT, 2, 3, 9, BUGGY, READONLY])
    if op == Op.FUSE_GETATTR:
        body = F.fuse_getattr_in.pack(rnd.choice([0, F.FUSE_GETATTR_FH]), 0,
                                      rnd.randrange(1 << 16))
        reply = OUT + F.fuse_attr_out.size
    elif op == Op.FUSE_LOOKUP:
        name = _name(rnd)
        body = name + (b"\0" if rnd.random() < 0.85 else b"") + (
            b"trailing\0" if rnd.random() < 0.1 else b"")
        reply = OUT + F.fuse_entry_out.size
    elif op == Op.FUSE_READ:
        size = rnd.choice([0, 1, 100, 4096, 8192, D.MAX_READ + 1])
        offset = rnd.choice([0, 5, 4096, 1 << 63])
        body = F.fuse_read_in.pack(rnd.randrange(8), offset, size, 0, 0, 0, 0)
        reply = OUT + rnd.choice([size, size // 2, 4096, 0])
    elif op == Op.FUSE_WRITE:
        size = rnd.choice([0, 1, 7, 4096, 5000])
        offset = rnd.choice([0, 9, 1 << 63])
        payload = bytes(rnd.randrange(256) for _ in range(min(size, 64))) * (
            size // 64 + 1)
        payload = payload[:size]
        declared = rnd.choice([size, size, size, size + 1, max(size - 1, 0), D.MAX_WRITE + 1])
        body = F.fuse_write_in.pack(rnd.randrange(8), offset, declared, rnd.randrange(4), 0, 0,
                                    0) + payload
        reply = OUT + F.fuse_write_out.size
    else:
        body = b""
        reply = OUT + F.fuse_kstatfs.size
    # Malformed variants of the body and header.
    roll = rnd.random()
    length: int | None = None
    extlen = 0
    if roll < 0.08:
        body = body[:rnd.randrange(len(body) + 1)]  # truncated arguments
    elif roll < 0.14:
        length = HDR + len(body) + rnd.choice([1, 8, 100])  # len past the chain
    elif roll < 0.20:
        length = rnd.choice([0, HDR - 1, HDR, HDR + max(len(body) - 3, 0)])
    elif roll < 0.25:
        extlen = 1
        body += bytes(8)
    elif roll < 0.30:
        body += bytes(rnd.randrange(1, 20))  # trailing bytes past the arguments
    req = fuse_request(op, body, nodeid=nodeid, unique=rnd.randrange(1 << 40),
                       uid=rnd.choice([0, 1000]), gid=1000, pid=rnd.randrange(1, 5),
                       length=length, extlen=extlen)
    # Layouts: whole; Linux's (header apart, arguments apart); cuts anywhere.
    kind = rnd.random()
    if kind < 0.3:
        rsplits: list[int] = []
    elif kind < 0.7 and op == Op.FUSE_WRITE:  # arguments apart, payload in pages or not
        args_end = HDR + F.fuse_write_in.size
        rsplits = rnd.choice([[HDR, args_end], [args_end], [args_end, args_end + 3],
                              [HDR, args_end, args_end + 4096]])
    elif kind < 0.7:
        rsplits = [HDR, HDR + rnd.choice([16, 40, len(body)])]
    else:
        rsplits = sorted({rnd.randrange(1, max(len(req), 2)) for _ in range(rnd.randrange(1, 4))})
    wlen = rnd.choice([reply, reply, reply, reply + 100, OUT, OUT + 8, 0, 3, max(reply - 1, 0)])
    wkind = rnd.random()
    if wkind < 0.35:
        wsplits: list[int] = []
    elif wkind < 0.75:
        wsplits = [OUT] + ([OUT + 4096 * k for k in range(1, 3)] if rnd.random() < 0.5 else [])
    else:
        wsplits = sorted({rnd.randrange(1, max(wlen, 2)) for _ in range(rnd.randrange(1, 3))})
    return req, {"rsplits": rsplits, "wsplits": wsplits, "indirect": rnd.random() < 0.5}, wlen


class Side:
    """One ring, one filesystem, one dispatcher."""

    def __init__(self) -> None:
        self.rig = Rig(num=256, size=4 << 20)
        self.fs = Fs()
        self.disp = Dispatcher(self.fs)

    def serve(self, req: bytes, layout: dict[str, Any], wlen: int) -> tuple[int, bytes]:
        chain, wbufs = self.rig.chain(req, wlen, **layout)
        used = self.disp.handle(chain)
        reply = self.rig.reply(wbufs, wlen)
        self.rig.complete(chain.head, used)
        return used, reply

    def state(self) -> tuple[Any, ...]:
        s = self.disp.stats
        return (s.requests, s.errors, s.malformed, s.dropped, s.bugs, s.bytes_read,
                s.bytes_written, self.fs.lookups, self.fs.written)


@pytest.fixture
def sides() -> Iterator[tuple[Side, Side]]:
    a, b = Side(), Side()
    yield a, b
    a.rig.close()
    b.rig.close()


def test_fast_paths_answer_as_the_general_path(sides: tuple[Side, Side],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fast, general = sides
    taken = {op: 0 for op in D.FAST}
    real = dict(D.FAST)

    def counting(op: int) -> D.FastSpec:
        args, reply, fn = real[op]

        def wrapped(*a: Any) -> int | None:
            try:
                n = fn(*a)
            except Exception:
                taken[op] += 1  # the fast path acted and failed: compared too
                raise
            if n is not None:
                taken[op] += 1
            return n
        return args, reply, wrapped

    counted = {op: counting(op) for op in real}
    rnd = random.Random(11)
    for case in range(CASES):
        req, layout, wlen = _request(rnd)
        monkeypatch.setattr(D, "FAST", counted)
        got = fast.serve(req, layout, wlen)
        monkeypatch.setattr(D, "FAST", {})
        want = general.serve(req, layout, wlen)
        assert got == want, (case, req[:64], layout, wlen)
        assert fast.state() == general.state(), (case, req[:64], layout, wlen)
    # Every fast path answered a good share of the cases itself.
    assert all(n > 10 for n in taken.values()), taken


@pytest.mark.parametrize("layout", [{}, {"rsplits": [HDR]}, {"rsplits": [HDR, HDR + 40]},
                                    {"rsplits": [HDR], "wsplits": [OUT], "indirect": True}])
def test_common_shapes_take_the_fast_path(sides: tuple[Side, Side], layout: dict[str, Any],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The shapes Linux and the load generator send are the ones recognised."""
    side = sides[0]
    calls: list[int] = []
    monkeypatch.setattr(D, "ChainReader", lambda *a, **k: calls.append(1))  # never built
    read = F.fuse_read_in.pack(0, 0, 4096, 0, 0, 0, 0)
    write = F.fuse_write_in.pack(0, 0, 40, 0, 0, 0, 0)
    for op, body, wlen in [(Op.FUSE_GETATTR, F.fuse_getattr_in.pack(0, 0, 0),
                            OUT + F.fuse_attr_out.size),
                           (Op.FUSE_LOOKUP, b"a\0", OUT + F.fuse_entry_out.size),
                           (Op.FUSE_READ, read, OUT + 4096),
                           (Op.FUSE_WRITE, write + bytes(40), OUT + F.fuse_write_out.size)]:
        kw = dict(layout)
        if op == Op.FUSE_WRITE:  # the payload in views of its own, as drivers send it
            kw["rsplits"] = [HDR, HDR + 40] if kw.get("rsplits") else [HDR + 40]
        used, reply = side.serve(fuse_request(op, body, nodeid=ROOT), kw, wlen)
        assert used > OUT and F.fuse_out_header.unpack_from(reply)[1] == 0, op
    assert not calls
