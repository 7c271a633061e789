"""The coordinator's window logic in one process: real shared tables, real mmap.

A PassthroughFs makes nodes and handles in a SharedState, as workers do;
the Coordinator checks requests against that state, opens files by file
handle and sends SHMEM_MAP/UNMAP over a real socketpair to the in-repo
frontend's BackendServer, which maps them into a DaxWindow in this process.
So every check here is made on real mappings (/proc/self/maps) and real
file bytes.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shardfs.abi import fuse as F
from shardfs.abi.vhost_user import BackendReq
from shardfs.codec.backend_channel import encode_reply
from shardfs.fs.api import Context
from shardfs.fs.passthrough import PassthroughFs
from shardfs.fs.passthrough.shared import SharedState
from shardfs.proc.coordinator import BackendChannel, Coordinator, DaxSetup
from shardfs.proc.dax import DaxShared, Geometry
from shardfs.testing.dax import BackendServer, DaxWindow
from tests.unit.support import open_fd_count

PAGE = 4096
WINDOW = 64 * PAGE
NO_FH = F.FUSE_SETUPMAPPING_NO_FH
R = F.FUSE_SETUPMAPPING_FLAG_READ
W = F.FUSE_SETUPMAPPING_FLAG_WRITE
CTX = Context(0, 0, 1)
MAP, UNMAP = BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP


@dataclass
class Env:
    root: Path
    fs: PassthroughFs
    coord: Coordinator
    window: DaxWindow
    server: BackendServer
    counters: DaxShared
    data: bytes

    def lookup(self, name: bytes) -> int:
        return self.fs.lookup(CTX, 1, name).nodeid

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> int:
        return self.fs.open(CTX, nodeid, flags).fh

    def setup(self, nodeid: int, fh: int, foffset: int, length: int, moffset: int,
              flags: int = R) -> int:
        return self.coord.handle(["setup", nodeid, fh, foffset, length, flags, moffset]) or 0

    def remove(self, ranges: list[tuple[int, int]]) -> int:
        blob = b"".join(F.fuse_removemapping_one.pack(m, n) for m, n in ranges)
        return self.coord.handle(["remove", blob]) or 0

    def sent(self) -> list[tuple[str, int, int]]:
        return [(e.req.request.name, e.req.shm_offset, e.req.length) for e in self.server.events]


def make_env(tmp_path: Path, policy: str = "replace", readonly: bool = False) -> Env:
    root = tmp_path / "share"
    root.mkdir()
    data = bytes(range(256)) * (16 * PAGE // 256)
    (root / "f").write_bytes(data)
    (root / "g").write_bytes(b"g" * 4 * PAGE)
    (root / "d").mkdir()
    state = SharedState(64, 64)
    fs = PassthroughFs(str(root), shared=state, max_nodes=64, max_handles=64)
    mount_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    window = DaxWindow(WINDOW, policy)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = BackendServer(ours, window)
    counters = DaxShared()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.close()
    coord = Coordinator(a, DaxSetup(Geometry(WINDOW, PAGE), state, counters, mount_fd,
                                    readonly=readonly))
    coord.channel = BackendChannel(theirs.detach(), timeout_s=10)
    return Env(root, fs, coord, window, server, counters, data)


def close_env(env: Env) -> None:
    assert env.coord.dax is not None
    mount_fd = env.coord.dax.mount_fd
    env.coord.close()
    env.coord.sock.close()
    env.server.stop()
    env.window.close()
    env.fs.close()
    os.close(mount_fd)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    old = os.umask(0o022)
    e = make_env(tmp_path)
    try:
        yield e
    finally:
        close_env(e)
        os.umask(old)


def test_map_read_only_through_an_fh(env: Env) -> None:
    nid = env.lookup(b"f")
    fh = env.open(nid)
    assert env.setup(nid, fh, 2 * PAGE, 4 * PAGE, 8 * PAGE) == 0
    assert env.window.read(8 * PAGE, 4 * PAGE) == env.data[2 * PAGE:6 * PAGE]
    assert env.window.protections(8 * PAGE, 4 * PAGE) == ["r--s"]
    assert env.counters.get("mappings") == 1 and len(env.coord.table) == 1
    assert env.sent() == [("SHMEM_MAP", 8 * PAGE, 4 * PAGE)]


def test_write_through_a_read_write_mapping(env: Env) -> None:
    nid = env.lookup(b"f")
    fh = env.open(nid, os.O_RDWR)
    assert env.setup(nid, fh, 0, PAGE, 0, R | W) == 0
    env.window.write(100, b"through the window")
    assert (env.root / "f").read_bytes()[100:118] == b"through the window"


@pytest.mark.parametrize("open_flags,flags,want", [
    (os.O_RDONLY, R | W, errno.EACCES),   # a shared writable map needs O_RDWR
    (os.O_WRONLY, R, errno.EACCES),       # mmap needs read access
    (os.O_WRONLY, R | W, errno.EACCES),
    (os.O_RDWR, R | W, 0),
    (os.O_RDWR, R, 0),
])
def test_fh_mode_decides(env: Env, open_flags: int, flags: int, want: int) -> None:
    nid = env.lookup(b"f")
    fh = env.open(nid, open_flags)
    assert env.setup(nid, fh, 0, PAGE, 0, flags) == want
    if want:
        assert env.sent() == [] and env.window.is_reserved(0, PAGE)


def test_ids_are_checked(env: Env, tmp_path: Path) -> None:
    f, g, d = env.lookup(b"f"), env.lookup(b"g"), env.lookup(b"d")
    fh_g = env.open(g)
    dh = env.fs.opendir(CTX, d, os.O_RDONLY).fh
    fh_f = env.open(f)
    assert env.setup(0xDEAD_0000_0002, fh_f, 0, PAGE, 0) == errno.ENOENT   # forged node
    assert env.setup(f, 0x7777_0000_0009, 0, PAGE, 0) == errno.EBADF      # forged fh
    assert env.setup(f, fh_g, 0, PAGE, 0) == errno.EBADF                  # another node's fh
    assert env.setup(d, dh, 0, PAGE, 0) == errno.EINVAL                   # a directory
    assert env.setup(f, dh, 0, PAGE, 0) == errno.EBADF                    # a directory handle
    assert env.setup(f, NO_FH, 0, PAGE, WINDOW) == errno.EINVAL           # outside the window
    env.fs.release(CTX, f, fh_f)
    assert env.setup(f, fh_f, 0, PAGE, 0) == errno.EBADF                  # released
    assert env.sent() == [] and env.window.is_reserved(0, WINDOW)
    assert env.counters.get("refused") == 7 and env.counters.get("mappings") == 0


def test_no_fh_needs_a_compatible_open_handle(env: Env) -> None:
    nid = env.lookup(b"f")
    assert env.setup(nid, NO_FH, 0, PAGE, 0) == errno.EBADF        # not open anywhere
    env.open(nid, os.O_RDONLY)
    assert env.setup(nid, NO_FH, 0, PAGE, 0, R | W) == errno.EACCES
    assert env.sent() == []
    assert env.setup(nid, NO_FH, 0, PAGE, 0) == 0
    env.open(nid, os.O_WRONLY)  # the guest may write it: a writable map is opened O_RDWR
    assert env.setup(nid, NO_FH, 0, PAGE, PAGE, R | W) == 0
    env.window.write(PAGE, b"W")
    assert (env.root / "f").read_bytes()[:1] == b"W"


def test_readonly_share_refuses_writable_maps(tmp_path: Path) -> None:
    e = make_env(tmp_path, readonly=True)
    try:
        nid = e.lookup(b"f")
        assert e.setup(nid, e.open(nid, os.O_RDWR), 0, PAGE, 0, R | W) == errno.EROFS
        assert e.sent() == []
    finally:
        close_env(e)


def test_release_drops_fh_mappings_and_keeps_inode_mappings(env: Env) -> None:
    nid = env.lookup(b"f")
    fh = env.open(nid)
    assert env.setup(nid, fh, 0, PAGE, 0) == 0          # through the fh
    assert env.setup(nid, NO_FH, 0, PAGE, PAGE) == 0    # per inode, as Linux maps
    env.fs.release(CTX, nid, fh)
    assert env.coord.handle(["release", nid, fh]) is None
    assert env.window.is_reserved(0, PAGE)
    assert env.window.protections(PAGE, PAGE) == ["r--s"]  # the driver still uses it
    env.fs.forget(nid, 1)
    assert env.coord.handle(["forget", [nid]]) is None
    assert env.window.is_reserved(0, WINDOW) and len(env.coord.table) == 0


def test_forget_that_keeps_the_node_keeps_its_mappings(env: Env) -> None:
    nid = env.lookup(b"f")
    env.lookup(b"f")  # two lookups
    fh = env.open(nid)
    assert env.setup(nid, NO_FH, 0, PAGE, 0) == 0
    env.fs.release(CTX, nid, fh)
    env.fs.forget(nid, 1)
    env.coord.handle(["forget", [nid]])
    assert len(env.coord.table) == 1


def test_sweep_drops_what_a_dead_worker_never_reported(env: Env) -> None:
    nid = env.lookup(b"f")
    fh = env.open(nid)
    assert env.setup(nid, fh, 0, PAGE, 0) == 0
    env.fs.release(CTX, nid, fh)  # ...and the worker died before its notice
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env.coord._c_attach([0], [theirs.detach()])
    mine.close()  # EOF on the link
    env.coord._serve_link(next(iter(env.coord.links)))
    assert not env.coord.links and env.window.is_reserved(0, PAGE)


def test_remap_in_place_and_partial_overlap(env: Env) -> None:
    f, g = env.lookup(b"f"), env.lookup(b"g")
    fh_f, fh_g = env.open(f, os.O_RDWR), env.open(g)
    assert env.setup(f, fh_f, 0, 4 * PAGE, 0) == 0
    assert env.setup(f, fh_f, 0, 4 * PAGE, 0, R | W) == 0  # upgrade in place
    assert env.window.protections(0, 4 * PAGE) == ["rw-s"]
    assert env.setup(g, fh_g, 0, PAGE, PAGE) == 0          # one page replaced
    assert env.window.read(0, PAGE) == env.data[:PAGE]
    assert env.window.read(PAGE, PAGE) == b"g" * PAGE
    assert env.window.read(2 * PAGE, 2 * PAGE) == env.data[2 * PAGE:4 * PAGE]
    assert [(m.moffset // PAGE, m.length // PAGE, m.nodeid) for m in env.coord.table] == [
        (0, 1, f), (1, 1, g), (2, 2, f)]
    assert env.remove([(0, 4 * PAGE)]) == 0
    assert env.window.is_reserved(0, 4 * PAGE) and not env.coord.table


def test_a_frontend_that_refuses_overlaps_gets_an_unmap_first(tmp_path: Path) -> None:
    e = make_env(tmp_path, policy="exact")
    try:
        nid = e.lookup(b"f")
        fh = e.open(nid, os.O_RDWR)
        assert e.setup(nid, fh, 0, 4 * PAGE, 0) == 0
        assert e.setup(nid, fh, 0, 4 * PAGE, 0, R | W) == 0
        assert e.sent() == [("SHMEM_MAP", 0, 4 * PAGE), ("SHMEM_MAP", 0, 4 * PAGE),
                            ("SHMEM_UNMAP", 0, 4 * PAGE), ("SHMEM_MAP", 0, 4 * PAGE)]
        assert e.window.protections(0, 4 * PAGE) == ["rw-s"]
        assert e.remove([(0, 4 * PAGE)]) == 0 and e.window.is_reserved(0, WINDOW)
    finally:
        close_env(e)


def test_a_failed_map_is_eio_and_leaves_the_range_reserved(env: Env) -> None:
    nid = env.lookup(b"f")
    fh = env.open(nid)
    env.server.fail_next = 1
    assert env.setup(nid, fh, 0, PAGE, 0) == errno.EIO
    assert env.window.is_reserved(0, PAGE) and not env.coord.table
    assert env.counters.get("frontend_errors") == 1


def test_remove_many_entries_some_unmapped(env: Env) -> None:
    nid = env.lookup(b"f")
    fh = env.open(nid)
    for i in range(0, 32, 2):
        assert env.setup(nid, fh, 0, PAGE, i * PAGE) == 0
    before = env.server.count(UNMAP)
    assert env.remove([(i * PAGE, PAGE) for i in range(64)]) == 0
    assert env.server.count(UNMAP) - before == 16  # only what was mapped
    assert env.window.is_reserved(0, WINDOW) and not env.coord.table


@pytest.mark.parametrize("ranges", [[(0, PAGE), (WINDOW, PAGE)], [(1, PAGE)], [(0, 0)]])
def test_remove_checks_every_range_first(env: Env, ranges: list[tuple[int, int]]) -> None:
    nid = env.lookup(b"f")
    assert env.setup(nid, env.open(nid), 0, PAGE, 0) == 0
    assert env.remove(ranges) == errno.EINVAL
    assert env.window.protections(0, PAGE) == ["r--s"] and env.server.count(UNMAP) == 0


def test_destroy_and_reset_empty_the_window(env: Env) -> None:
    nid = env.lookup(b"f")
    fh = env.open(nid)
    for i in range(4):
        assert env.setup(nid, fh, 0, PAGE, i * PAGE) == 0
    assert env.coord.handle(["destroy"]) == 0
    assert env.window.is_reserved(0, WINDOW) and env.counters.get("mappings") == 0
    assert env.setup(nid, fh, 0, PAGE, 0) == 0
    env.coord._c_reset([], [])
    assert env.window.is_reserved(0, WINDOW) and not env.coord.table


def test_recovered_channel_drains_stale_replies_and_clears_the_window(env: Env) -> None:
    nid = env.lookup(b"f")
    assert env.setup(nid, env.open(nid), 0, 4 * PAGE, 8 * PAGE) == 0
    # A reply the dead coordinator never read, then a new coordinator.
    env.server.sock.sendall(encode_reply(MAP, 0))
    assert env.coord.channel is not None
    fd = os.dup(env.coord.channel.sock.fileno())
    env.coord.table.clear()
    env.coord._c_channel([True], [fd])
    assert env.window.is_reserved(0, WINDOW)
    assert env.sent()[-1] == ("SHMEM_UNMAP", 0, WINDOW)
    assert env.counters.get("restarts") == 1


def test_a_silent_frontend_is_a_lost_channel(env: Env) -> None:
    quiet, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert env.coord.channel is not None
        env.coord.channel.close()
        env.coord.channel = BackendChannel(theirs.detach(), timeout_s=0.2)
        nid = env.lookup(b"f")
        assert env.setup(nid, env.open(nid), 0, PAGE, 0) == errno.EIO
        assert env.coord.channel is None
        assert env.setup(nid, NO_FH, 0, PAGE, 0) == errno.ENOSYS
    finally:
        quiet.close()


def test_no_fd_leaks(env: Env) -> None:
    nid = env.lookup(b"f")
    fh = env.open(nid, os.O_RDWR)
    assert env.setup(nid, fh, 0, PAGE, 0) == 0  # warm up
    before = open_fd_count()
    for i in range(50):
        assert env.setup(nid, fh, 0, PAGE, (i % 8) * PAGE, R | (W if i % 2 else 0)) == 0
        if i % 5 == 0:
            assert env.remove([(0, WINDOW)]) == 0
        assert env.setup(nid, fh, 0, PAGE, WINDOW) == errno.EINVAL
    env.server.wait_for(lambda ev: len(ev) > 0)
    assert open_fd_count() == before


def test_unknown_and_malformed_link_messages(env: Env) -> None:
    assert env.coord.handle(["bogus"]) == errno.EINVAL
    assert env.coord.handle(["setup", 1, 2]) == errno.EINVAL
    bad: list[Any] = ["remove", b"\0" * 15]
    assert env.coord.handle(bad) == errno.EINVAL
