"""Plain READDIR packed by the passthrough equals what the dispatcher packs.

``PassthroughFs.readdir_packed`` copies getdents64 records straight into the
reply (``shardfs.fs.passthrough.sys.pack_fuse_dirents``); the dispatcher's own
loop over ``readdir()`` is the reference.  Both run here on a real directory
through a real worker, dispatcher and ring, for many reply sizes and every
resume cookie, and the packer alone on corrupt getdents64 buffers.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.bench.hotpath import Harness
from shardfs.fs.idmap import IdMappedFs
from shardfs.fs.passthrough import sys as lsys
from shardfs.fs.passthrough.fs import PassthroughFs
from shardfs.fs.readonly import ReadOnlyFs

#: Names of every length class, and bytes that are not UTF-8.
NAMES = [b"a", b"bb", b"c" * 7, b"d" * 8, b"e" * 9, b"f" * 16, b"g" * 17, b"h" * 100,
         b"i" * 255, b"\xff\xfe-latin", b"sp ace", *(b"n%d" % i for i in range(300))]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[tuple[Harness, int, int]]:
    share = tmp_path / "share"
    (share / "dir").mkdir(parents=True)
    for name in NAMES:
        open(os.path.join(os.fsencode(share / "dir"), name), "w").close()
    h = Harness(share)
    nodeid = F.fuse_entry_out.unpack(h.call(Op.FUSE_LOOKUP, 1, b"dir\0"))[0]
    fh = F.fuse_open_out.unpack(h.call(Op.FUSE_OPENDIR, nodeid, F.fuse_open_in.pack(0, 0)))[0]
    yield h, nodeid, fh
    h.close()


def readdir(h: Harness, nodeid: int, fh: int, offset: int, size: int) -> bytes:
    return h.call(Op.FUSE_READDIR, nodeid, F.fuse_read_in.pack(fh, offset, size, 0, 0, 0, 0),
                  reply=size + F.fuse_out_header.size)


def cookies(body: bytes) -> list[int]:
    out, pos = [], 0
    while pos < len(body):
        _, off, namelen, _ = F.fuse_dirent.unpack_from(body, pos)
        out.append(off)
        pos += F.fuse_rec_align(F.FUSE_NAME_OFFSET + namelen)
    return out


def both(h: Harness, nodeid: int, fh: int, offset: int, size: int,
         monkeypatch: pytest.MonkeyPatch) -> bytes:
    """The packed reply, after checking it against the dispatcher's packing."""
    packed = readdir(h, nodeid, fh, offset, size)
    with monkeypatch.context() as m:
        m.setattr(PassthroughFs, "readdir_packed", lambda *a: None)
        reference = readdir(h, nodeid, fh, offset, size)
    assert packed == reference, (offset, size)
    return packed


@pytest.mark.parametrize("size", [4096, 1000, 333, 64, 40, 32, 25])
def test_whole_listing_equals_the_dispatchers_packing(harness, size: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    h, nodeid, fh = harness
    seen: list[bytes] = []
    offset = 0
    while True:
        body = both(h, nodeid, fh, offset, size, monkeypatch)
        if not body:
            break
        pos = 0
        while pos < len(body):
            _, offset, namelen, _ = F.fuse_dirent.unpack_from(body, pos)
            seen.append(body[pos + F.FUSE_NAME_OFFSET:pos + F.FUSE_NAME_OFFSET + namelen])
            pos += F.fuse_rec_align(F.FUSE_NAME_OFFSET + namelen)
    if size >= F.fuse_rec_align(F.FUSE_NAME_OFFSET + 255):
        assert sorted(seen) == sorted([b".", b"..", *NAMES])
    else:  # the listing stops, in both packings, at a record longer than the reply
        assert len(seen) < len(NAMES) + 2


def test_every_cookie_resumes_alike(harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h, nodeid, fh = harness
    every = []
    offset = 0
    while body := readdir(h, nodeid, fh, offset, 4096):
        every += cookies(body)
        offset = every[-1]
    for cookie in every[::7]:
        both(h, nodeid, fh, cookie, 512, monkeypatch)


def test_too_small_for_one_record_gives_an_empty_reply(harness,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    h, nodeid, fh = harness
    assert both(h, nodeid, fh, 0, 24, monkeypatch) == b""


def test_forwarding_filesystems_pass_it_on(tmp_path: Path) -> None:
    (tmp_path / "x").touch()
    inner = PassthroughFs(str(tmp_path))
    try:
        opened = inner.opendir(None, 1, 0)  # type: ignore[arg-type]
        want = bytearray(4096)
        n = inner.readdir_packed(None, 1, opened.fh, 0, want)  # type: ignore[arg-type]
        assert n and n > 0
        for fs in (ReadOnlyFs(inner), IdMappedFs(inner, "map:0:0:65536", None)):
            got = bytearray(4096)
            assert fs.readdir_packed(None, 1, opened.fh, 0, got) == n  # type: ignore[arg-type]
            assert got == want
    finally:
        inner.destroy()


_DIRENT64 = struct.Struct("=QqHB")


def record(ino: int, off: int, dtype: int, name: bytes, reclen: int | None = None) -> bytes:
    body = _DIRENT64.pack(ino, off, 0, dtype) + name + b"\0"
    size = reclen if reclen is not None else (len(body) + 7) & ~7
    return (_DIRENT64.pack(ino, off, size, dtype) + name + b"\0").ljust(size, b"\0")


def reference(buf: bytes, length: int, size: int, at: int) -> tuple[bytes, bool]:
    out = bytearray(size)
    for ino, off, dtype, name in lsys.parse_dirents(buf, length):
        rec = F.fuse_rec_align(F.FUSE_NAME_OFFSET + len(name))
        if at + rec > size:
            return bytes(out[:at]), True
        F.fuse_dirent.pack_into(out, at, ino, off, len(name), dtype)
        out[at + F.FUSE_NAME_OFFSET:at + F.FUSE_NAME_OFFSET + len(name)] = name
        at += rec
    return bytes(out[:at]), False


@pytest.mark.parametrize("tail", [
    b"",                                              # well formed
    record(9, 9, 8, b"short", reclen=8),              # reclen below the header
    record(9, 9, 8, b"long")[:-8],                    # runs past the filled length
    _DIRENT64.pack(9, 9, 24, 8) + b"nonulname",       # no NUL inside its record
    _DIRENT64.pack(9, 9, 0, 8),                       # reclen 0: must not loop
])
@pytest.mark.parametrize("size,at", [(4096, 0), (4096, 40), (100, 0), (60, 8)])
def test_packer_equals_parse_then_pack(tail: bytes, size: int, at: int) -> None:
    buf = b"".join(record(i + 1, 100 + i, 8, b"n" * (i % 20 + 1)) for i in range(12)) + tail
    out = bytearray(size)
    end, full = lsys.pack_fuse_dirents(buf, len(buf), out, at)
    want, want_full = reference(buf, len(buf), size, at)
    assert (bytes(out[:end]), full) == (want, want_full)
    assert not any(out[end:])  # nothing written past what it returned
