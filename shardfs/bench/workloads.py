"""The workloads ``scripts/bench`` runs, as pre-built request sequences.

Each workload lays its requests out once per queue (:func:`loadgen.prebuild`)
and names its unit.  Setup (files on the host, LOOKUP/OPEN/OPENDIR through
the frontend) is done before the clock starts.  What one operation is:

* ``getattr``: GETATTR of the root; ``lookup``: LOOKUP of one name in the
  root, repeated (each adds one to the node's lookup count, on both peers);
* ``create``: one pair is CREATE of a new file, then RELEASE of its handle,
  FORGET of its node and UNLINK of its name (what ``touch f; rm f`` costs a
  guest), four requests; the fh and nodeid are copied from the CREATE reply;
* ``read4k``/``read4k_qd1``: a 4 KiB READ at queue depth ``--depth`` / 1;
* ``read1m``/``write1m``: 1 MiB READ or WRITE, the data in its own
  descriptor, never touched by the frontend;
* ``readdirplus``: listing a directory of 10,000 files with READDIRPLUS, as a
  6.12 guest does (one page per request), each request resuming at the
  cookie of the previous reply's last record.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.bench.loadgen import (
    IN_ARGS_OFFSET,
    IN_NODEID_OFFSET,
    OUT_HDR,
    Advance,
    Chain,
    Request,
)
from shardfs.testing.frontend import FuseClient

MIB = 1 << 20
MB = 1_000_000
READ4K_FILE_BYTES = 1 << 20
BIG_FILE_BYTES = 32 * MIB
DIR_ENTRIES = 10_000

_u64 = struct.Struct("<Q")
_dirent_off_len = struct.Struct("<QI")  # fuse_dirent.off, fuse_dirent.namelen


@dataclass
class Target:
    """What a workload needs from a backend: its share on the host and a client."""

    name: str
    shared: Path
    client: FuseClient
    readdir_bytes: int = 4096
    #: Files in the READDIRPLUS directory (tests use fewer; the unit stays per entry).
    dir_entries: int = DIR_ENTRIES


Slots = list[list[list[Request]]]
Build = Callable[[Target, int, int], tuple[Slots, Advance | None]]


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    unit: str
    #: Units per completed operation (MB per 1 MiB transfer, entries per listing).
    per_op: float
    #: Default operations per queue per run.
    ops: int
    #: A fixed queue depth (slots per queue), or None for ``--depth``.
    depth: int | None
    build: Build


def _lookup(c: FuseClient, parent: int, name: bytes) -> int:
    return int(c.lookup(parent, name)[0])


def _file(path: Path, size: int) -> None:
    if not path.exists() or path.stat().st_size != size:
        with open(path, "wb") as f:
            for _ in range(0, size, MIB):
                f.write(os.urandom(min(MIB, size)))


def create_advance(view: memoryview, steps: list[list[Chain]], slot: int, step: int,
                   length: int) -> tuple[int, bool]:
    """After CREATE: its nodeid and fh go into the RELEASE and FORGET that follow."""
    if step:
        return 0, True
    reply = steps[0][0].reply_off + OUT_HDR
    nodeid = _u64.unpack_from(view, reply)[0]
    fh = _u64.unpack_from(view, reply + F.fuse_entry_out.size)[0]
    release, forget, _unlink = steps[1]
    _u64.pack_into(view, release.req_off + IN_NODEID_OFFSET, nodeid)
    _u64.pack_into(view, release.req_off + IN_ARGS_OFFSET, fh)  # fuse_release_in.fh
    _u64.pack_into(view, forget.req_off + IN_NODEID_OFFSET, nodeid)
    return 1, False


#: fuse_read_in.offset, from the start of the request.
READ_IN_OFFSET = IN_ARGS_OFFSET + 8


def readdirplus_advance(view: memoryview, steps: list[list[Chain]], slot: int, step: int,
                        length: int) -> tuple[int, bool]:
    """The next READDIRPLUS resumes at the last record's cookie; an empty reply ends
    the listing (one operation) and the next one starts again at offset 0."""
    c = steps[0][0]
    if length <= OUT_HDR:
        _u64.pack_into(view, c.req_off + READ_IN_OFFSET, 0)
        return 0, True
    pos, end, cookie = c.reply_off + OUT_HDR, c.reply_off + length, 0
    while pos < end:
        cookie, namelen = _dirent_off_len.unpack_from(view, pos + F.fuse_entry_out.size + 8)
        pos += F.fuse_rec_align(F.FUSE_NAME_OFFSET_DIRENTPLUS + namelen)
    _u64.pack_into(view, c.req_off + READ_IN_OFFSET, cookie)
    return 0, False


def build_getattr(t: Target, queue: int, depth: int) -> tuple[Slots, None]:
    req = Request(Op.FUSE_GETATTR, 1, F.fuse_getattr_in.pack(0, 0, 0),
                  OUT_HDR + F.fuse_attr_out.size)
    return [[[req]] for _ in range(depth)], None


def build_lookup(t: Target, queue: int, depth: int) -> tuple[Slots, None]:
    (t.shared / "lookup-target").touch()
    req = Request(Op.FUSE_LOOKUP, 1, b"lookup-target\0", OUT_HDR + F.fuse_entry_out.size)
    return [[[req]] for _ in range(depth)], None


def build_create(t: Target, queue: int, depth: int) -> tuple[Slots, Advance]:
    slots: Slots = []
    for s in range(depth):
        name = f"create-q{queue}-{s}".encode()
        for stale in (t.shared / name.decode(),):
            stale.unlink(missing_ok=True)
        create = Request(Op.FUSE_CREATE, 1,
                         F.fuse_create_in.pack(os.O_CREAT | os.O_RDWR, 0o100644, 0, 0)
                         + name + b"\0",
                         OUT_HDR + F.fuse_entry_out.size + F.fuse_open_out.size)
        release = Request(Op.FUSE_RELEASE, 0, F.fuse_release_in.pack(0, os.O_RDWR, 0, 0),
                          OUT_HDR)
        forget = Request(Op.FUSE_FORGET, 0, F.fuse_forget_in.pack(1), 0)
        unlink = Request(Op.FUSE_UNLINK, 1, name + b"\0", OUT_HDR)
        slots.append([[create], [release, forget, unlink]])
    return slots, create_advance


def _open(t: Target, name: str, size: int, flags: int) -> tuple[int, int]:
    _file(t.shared / name, size)
    nodeid = _lookup(t.client, 1, name.encode())
    return nodeid, t.client.open(nodeid, flags)


def build_read4k(t: Target, queue: int, depth: int) -> tuple[Slots, None]:
    nodeid, fh = _open(t, "read4k-target", READ4K_FILE_BYTES, os.O_RDONLY)
    return [[[Request(Op.FUSE_READ, nodeid, F.fuse_read_in.pack(
        fh, (s * 4096) % READ4K_FILE_BYTES, 4096, 0, 0, os.O_RDONLY, 0), OUT_HDR + 4096,
        split_reply=True)]] for s in range(depth)], None


def build_write4k(t: Target, queue: int, depth: int) -> tuple[Slots, None]:
    nodeid, fh = _open(t, f"write4k-target-q{queue}", READ4K_FILE_BYTES, os.O_RDWR)
    return [[[Request(Op.FUSE_WRITE, nodeid, F.fuse_write_in.pack(
        fh, (s * 4096) % READ4K_FILE_BYTES, 4096, 0, 0, os.O_RDWR, 0),
        OUT_HDR + F.fuse_write_out.size, payload=4096)]] for s in range(depth)], None


def build_read1m(t: Target, queue: int, depth: int) -> tuple[Slots, None]:
    nodeid, fh = _open(t, "read1m-target", BIG_FILE_BYTES, os.O_RDONLY)
    return [[[Request(Op.FUSE_READ, nodeid, F.fuse_read_in.pack(
        fh, (s * MIB) % BIG_FILE_BYTES, MIB, 0, 0, os.O_RDONLY, 0), OUT_HDR + MIB,
        split_reply=True)]] for s in range(depth)], None


def build_write1m(t: Target, queue: int, depth: int) -> tuple[Slots, None]:
    nodeid, fh = _open(t, f"write1m-target-q{queue}", BIG_FILE_BYTES, os.O_RDWR)
    return [[[Request(Op.FUSE_WRITE, nodeid, F.fuse_write_in.pack(
        fh, (s * MIB) % BIG_FILE_BYTES, MIB, 0, 0, os.O_RDWR, 0),
        OUT_HDR + F.fuse_write_out.size, payload=MIB)]] for s in range(depth)], None


def build_readdirplus(t: Target, queue: int, depth: int) -> tuple[Slots, Advance]:
    d = t.shared / f"dir-{t.dir_entries}"
    marker = t.shared / f"dir-{t.dir_entries}.complete"
    if not marker.exists():
        d.mkdir(exist_ok=True)
        for i in range(t.dir_entries):
            (d / f"entry-{i:05d}").touch()
        marker.touch()
    nodeid = _lookup(t.client, 1, d.name.encode())
    slots: Slots = []
    for _ in range(depth):
        fh = int(F.fuse_open_out.unpack(t.client.ok(Op.FUSE_OPENDIR, nodeid,
                                                     F.fuse_open_in.pack(0, 0)))[0])
        slots.append([[Request(Op.FUSE_READDIRPLUS, nodeid,
                               F.fuse_read_in.pack(fh, 0, t.readdir_bytes, 0, 0, 0, 0),
                               OUT_HDR + t.readdir_bytes)]])
    return slots, readdirplus_advance


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("getattr", "GETATTR", "ops/s", 1, 20_000, None, build_getattr),
    Workload("lookup", "LOOKUP", "ops/s", 1, 20_000, None, build_lookup),
    Workload("create", "CREATE+RELEASE+FORGET+UNLINK", "pairs/s", 1, 4_000, None,
             build_create),
    Workload("read4k_qd1", "4 KiB READ, depth 1", "ops/s", 1, 4_000, 1, build_read4k),
    Workload("read4k", "4 KiB READ", "ops/s", 1, 20_000, None, build_read4k),
    Workload("write4k", "4 KiB WRITE", "ops/s", 1, 20_000, None, build_write4k),
    Workload("read1m", "1 MiB READ", "MB/s", MIB / MB, 2_000, 8, build_read1m),
    Workload("write1m", "1 MiB WRITE", "MB/s", MIB / MB, 2_000, 8, build_write1m),
    Workload("readdirplus", "READDIRPLUS of 10,000 entries", "entries/s", DIR_ENTRIES, 3, 1,
             build_readdirplus),
]}
