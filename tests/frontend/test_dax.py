"""The DAX window through the real daemon: SETUPMAPPING/REMOVEMAPPING over vhost-user SHMEM.

The in-repo frontend (:mod:`shardfs.testing.dax`) reserves a PROT_NONE
window in this test process and serves the backend channel on a thread, so
what the daemon maps is checked for real: bytes read through the window,
bytes written through it landing in the host file, ``/proc/self/maps``
showing ``---p`` again after an unmap, and a child that touches an unmapped
range dying of SIGSEGV.  Waits are on events (FUSE replies, the backend
channel's request log), never on time.
"""

from __future__ import annotations

import errno
import faulthandler
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shardfs.abi import fuse as F
from shardfs.abi import vhost_user as vu
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.abi.vhost_user import BackendReq
from shardfs.abi.vhost_user import FrontendReq as R
from shardfs.abi.vhost_user import ProtocolFeature as PF
from shardfs.testing.dax import (
    BackendServer,
    DaxFrontend,
    DaxWindow,
    Event,
    removemapping,
    removemapping_args,
    setupmapping,
    setupmapping_args,
)
from shardfs.testing.frontend import Frontend, FuseClient
from tests.frontend.conftest import Daemon

MiB = 1 << 20
WINDOW = 16 * MiB
CHUNK = 2 * MiB  # what the Linux driver maps at a time
PAGE = os.sysconf("SC_PAGE_SIZE")
NO_FH = F.FUSE_SETUPMAPPING_NO_FH
READ = F.FUSE_SETUPMAPPING_FLAG_READ
WRITE = F.FUSE_SETUPMAPPING_FLAG_WRITE
MAP, UNMAP = BackendReq.SHMEM_MAP, BackendReq.SHMEM_UNMAP


def dax_daemon(tmp_path: Path, *extra: str, queues: int = 1) -> Daemon:
    return Daemon(tmp_path, "--dax-window", str(WINDOW), *extra, queues=queues)


@pytest.fixture
def dd(tmp_path: Path) -> Iterator[Daemon]:
    d = dax_daemon(tmp_path, queues=2)
    yield d
    assert d.stop() == 0
    text = d.log_path.read_text()
    assert "Traceback" not in text, text


@pytest.fixture
def fe(dd: Daemon) -> Iterator[DaxFrontend]:
    f = DaxFrontend(dd.socket, num_queues=3).start()
    FuseClient(f).init()
    yield f
    f.close()


def unmapped(offset: int, length: int) -> Callable[[list[Event]], bool]:
    """A backend-channel condition: an UNMAP covering [offset, offset+length) was served."""
    return lambda ev: any(e.req.request == UNMAP and e.status == 0
                          and e.req.shm_offset <= offset
                          and e.req.shm_offset + e.req.length >= offset + length for e in ev)


def stats_text(d: Daemon, fmt: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(d.socket + ".stats")
        s.sendall(fmt.encode() + b"\n")
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def stats(d: Daemon) -> dict[str, Any]:
    return dict(json.loads(stats_text(d, "json")))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def submit(fe: Frontend, queue: int, opcode: int, nodeid: int, args: bytes) -> tuple[int, int]:
    """Publish a request without waiting; (head, reply gpa)."""
    req = F.fuse_in_header.pack(F.fuse_in_header.size + len(args), opcode, fe.next_unique(),
                                nodeid, 0, 0, os.getpid(), 0, 0) + args
    rgpa = fe.ram.alloc(len(req))
    fe.ram.write(rgpa, req)
    wgpa = fe.ram.alloc(F.fuse_out_header.size, 8)
    head = fe.queues[queue].add([(rgpa, len(req))], [(wgpa, F.fuse_out_header.size)])
    return head, wgpa


def reply_error(fe: Frontend, gpa: int) -> int:
    return int(F.fuse_out_header.unpack(fe.ram.read(gpa, F.fuse_out_header.size))[1])


# -- negotiation ------------------------------------------------------------------------


def test_dax_off_is_enosys_and_advertises_nothing(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    try:
        f = DaxFrontend(d.socket)
        proto = f.get_u64(R.GET_PROTOCOL_FEATURES)
        assert not proto >> 21 & 1 and not proto >> 22 & 1
        f.send(R.GET_SHMEM_CONFIG)
        assert f.recv_reply(R.GET_SHMEM_CONFIG) == b""  # refused, but answered
        Frontend.start(f)
        c = FuseClient(f)
        init = c.init()
        assert not init[3] & F.FUSE_MAP_ALIGNMENT and init[9] == 0
        assert setupmapping(c, 1, NO_FH, 0, PAGE, 0) == -errno.ENOSYS
        assert removemapping(c, [(0, PAGE)]) == -errno.ENOSYS
        f.close()
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("bit", [21, 22])
def test_shmem_bit_config_and_map_alignment(tmp_path: Path, bit: int) -> None:
    d = dax_daemon(tmp_path, "--shmem-bit", str(bit))
    try:
        f = DaxFrontend(d.socket, shmem_bit=bit, num_queues=2)
        proto = f.get_u64(R.GET_PROTOCOL_FEATURES)
        assert proto >> bit & 1 and not proto >> (43 - bit) & 1  # 21 xor 22
        assert proto >> PF.BACKEND_REQ & 1 and proto >> PF.BACKEND_SEND_FD & 1
        f.start()
        assert f.shmem_config()[0] == WINDOW and f.win.size == WINDOW
        assert f.win.is_reserved(0, WINDOW)
        c = FuseClient(f)
        init = c.init()
        assert init[3] & F.FUSE_MAP_ALIGNMENT and init[9] == PAGE.bit_length() - 1
        # A guest that does not offer FUSE_MAP_ALIGNMENT is not told one.
        init = c.init(flags=0xFFFFFFFF & ~F.FUSE_MAP_ALIGNMENT)
        assert not init[3] & F.FUSE_MAP_ALIGNMENT and init[9] == 0
        f.close()
    finally:
        assert d.stop() == 0


def test_a_channel_without_shmem_is_not_a_window(tmp_path: Path) -> None:
    """A VMM that gives a backend channel but never acked SHMEM gets no SHMEM_MAP."""
    d = dax_daemon(tmp_path)
    try:
        f = DaxFrontend(d.socket, num_queues=2)
        f.extra_protocol_features = 1 << PF.BACKEND_REQ | 1 << PF.BACKEND_SEND_FD
        Frontend.start(f)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        assert f.ack(R.SET_BACKEND_REQ_FD, b"", [theirs.fileno()]) == 0
        theirs.close()
        f.window = DaxWindow(WINDOW)
        f.server = BackendServer(ours, f.window)
        c = FuseClient(f)
        c.init()
        (d.shared / "f").write_bytes(b"n" * PAGE)
        nodeid = c.lookup(1, b"f")[0]
        assert setupmapping(c, nodeid, c.open(nodeid), 0, PAGE, 0) == -errno.ENOSYS
        assert f.srv.events == []
        f.close()
    finally:
        assert d.stop() == 0


# -- mapping ----------------------------------------------------------------------------


def test_two_workers_map_at_once_and_the_window_shows_the_file(dd: Daemon,
                                                               fe: DaxFrontend) -> None:
    data = os.urandom(4 * MiB)
    (dd.shared / "big").write_bytes(data)
    q1, q2 = FuseClient(fe, queue=1), FuseClient(fe, queue=2)
    nodeid = q1.lookup(1, b"big")[0]
    fh1, fh2 = q1.open(nodeid), q2.open(nodeid)
    mark = fe.ram.mark
    # Both queues' SETUPMAPPINGs are in flight together: two workers, one coordinator.
    h1, g1 = submit(fe, 1, Op.FUSE_SETUPMAPPING, nodeid,
                    setupmapping_args(fh1, 0, CHUNK, READ, 4 * MiB))
    h2, g2 = submit(fe, 2, Op.FUSE_SETUPMAPPING, nodeid,
                    setupmapping_args(fh2, CHUNK, CHUNK, READ, 6 * MiB))
    fe.kick_queue(1)
    fe.kick_queue(2)
    assert fe.wait_used(1) == [(h1, F.fuse_out_header.size)]
    assert fe.wait_used(2) == [(h2, F.fuse_out_header.size)]
    fe.ram.reset_alloc(mark)
    assert reply_error(fe, g1) == 0 and reply_error(fe, g2) == 0
    assert fe.win.read(4 * MiB, 4 * MiB) == data
    assert set(fe.win.protections(4 * MiB, 4 * MiB)) == {"r--s"}
    assert fe.srv.count(MAP) == 2
    assert stats(dd)["dax"]["mappings"] == 2
    # And a per-inode mapping (fh -1, as Linux sends) of the same file.
    assert setupmapping(q2, nodeid, NO_FH, 0, CHUNK, 0) == 0
    assert fe.win.read(0, 4096) == data[:4096]


def test_write_through_a_read_write_mapping(dd: Daemon, fe: DaxFrontend) -> None:
    c = FuseClient(fe)
    entry, fh = c.create(1, b"w", flags=os.O_RDWR)
    os.truncate(dd.shared / "w", CHUNK)
    assert setupmapping(c, entry[0], fh, 0, CHUNK, 2 * MiB, writable=True) == 0
    assert fe.win.protections(2 * MiB, CHUNK) == ["rw-s"]
    fe.win.write(2 * MiB + 12345, b"written through the DAX window")
    fd = os.open(dd.shared / "w", os.O_RDONLY)
    try:
        assert os.pread(fd, 30, 12345) == b"written through the DAX window"
    finally:
        os.close(fd)


def test_remove_restores_prot_none(dd: Daemon, fe: DaxFrontend) -> None:
    (dd.shared / "f").write_bytes(b"x" * CHUNK)
    c = FuseClient(fe)
    nodeid = c.lookup(1, b"f")[0]
    assert setupmapping(c, nodeid, c.open(nodeid), 0, CHUNK, 0) == 0
    assert fe.win.read(0, 4) == b"xxxx"
    assert removemapping(c, [(0, CHUNK)]) == 0
    assert fe.win.is_reserved(0, CHUNK)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child dies reading
        faulthandler.disable()  # the crash is the point; no traceback dump
        fe.win.read(0, 1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV


def test_remap_in_place_and_overlap(dd: Daemon, fe: DaxFrontend) -> None:
    (dd.shared / "a").write_bytes(b"a" * CHUNK)
    (dd.shared / "b").write_bytes(b"b" * CHUNK)
    c = FuseClient(fe)
    a, b = c.lookup(1, b"a")[0], c.lookup(1, b"b")[0]
    fa, fb = c.open(a, os.O_RDWR), c.open(b)
    assert setupmapping(c, a, fa, 0, CHUNK, 0) == 0
    assert setupmapping(c, a, fa, 0, CHUNK, 0, writable=True) == 0  # upgrade in place
    assert fe.win.protections(0, CHUNK) == ["rw-s"]
    assert setupmapping(c, b, fb, 0, PAGE, PAGE) == 0  # one page of it replaced
    assert fe.win.read(0, 1) == b"a" and fe.win.read(PAGE, 1) == b"b"
    assert fe.win.read(2 * PAGE, 1) == b"a"
    assert stats(dd)["dax"]["mappings"] == 3
    assert removemapping(c, [(0, CHUNK)]) == 0
    assert fe.win.is_reserved(0, CHUNK) and stats(dd)["dax"]["mappings"] == 0


def test_removemapping_with_many_entries(dd: Daemon, fe: DaxFrontend) -> None:
    (dd.shared / "f").write_bytes(b"m" * 64 * PAGE)
    c = FuseClient(fe)
    nodeid = c.lookup(1, b"f")[0]
    fh = c.open(nodeid)
    for i in range(0, 128, 2):
        assert setupmapping(c, nodeid, fh, 0, PAGE, i * PAGE) == 0
    entries = [(i * PAGE, PAGE) for i in range(256)]  # what one 4 KiB-page request holds
    assert removemapping(c, entries) == 0
    assert fe.srv.count(UNMAP) == 64  # only the mapped ones reach the frontend
    assert fe.win.is_reserved(0, 256 * PAGE)


def test_invalid_requests_get_their_errno_and_map_nothing(dd: Daemon, fe: DaxFrontend) -> None:
    (dd.shared / "f").write_bytes(b"f" * CHUNK)
    (dd.shared / "g").write_bytes(b"g" * CHUNK)
    (dd.shared / "d").mkdir()
    (dd.shared / "closed").write_bytes(b"c" * PAGE)
    c = FuseClient(fe)
    f, g, d = (c.lookup(1, n)[0] for n in (b"f", b"g", b"d"))
    closed = c.lookup(1, b"closed")[0]
    fh_ro, fh_g = c.open(f), c.open(g)
    fh_wo = c.open(f, os.O_WRONLY)
    dh = int(F.fuse_open_out.unpack(c.ok(Op.FUSE_OPENDIR, d,
                                         F.fuse_open_in.pack(os.O_RDONLY, 0)))[0])
    u64 = (1 << 64) - 1
    setup_cases = [
        ("past the window", f, fh_ro, 0, PAGE, READ, WINDOW, errno.EINVAL),
        ("runs past the end", f, fh_ro, 0, 2 * PAGE, READ, WINDOW - PAGE, errno.EINVAL),
        ("u64 wrap", f, fh_ro, 0, 2 * PAGE, READ, u64 - PAGE + 1, errno.EINVAL),
        ("zero length", f, fh_ro, 0, 0, READ, 0, errno.EINVAL),
        ("unaligned moffset", f, fh_ro, 0, PAGE, READ, 512, errno.EINVAL),
        ("unaligned foffset", f, fh_ro, 100, PAGE, READ, 0, errno.EINVAL),
        ("unaligned length", f, fh_ro, 0, PAGE + 1, READ, 0, errno.EINVAL),
        ("foffset past loff_t", f, fh_ro, u64 & ~(PAGE - 1), PAGE, READ, 0, errno.EINVAL),
        ("no flags", f, fh_ro, 0, PAGE, 0, 0, errno.EINVAL),
        ("unknown flag", f, fh_ro, 0, PAGE, READ | 8, 0, errno.EINVAL),
        ("forged nodeid", 0x1234_0000_0005, fh_ro, 0, PAGE, READ, 0, errno.ENOENT),
        ("a directory", d, dh, 0, PAGE, READ, 0, errno.EINVAL),
        ("forged fh", f, 0x55_0000_0003, 0, PAGE, READ, 0, errno.EBADF),
        ("a directory handle", f, dh, 0, PAGE, READ, 0, errno.EBADF),
        ("another file's fh", f, fh_g, 0, PAGE, READ, 0, errno.EBADF),
        ("write on a read-only fh", f, fh_ro, 0, PAGE, READ | WRITE, 0, errno.EACCES),
        ("read on a write-only fh", f, fh_wo, 0, PAGE, READ, 0, errno.EACCES),
        ("inode map of a closed file", closed, NO_FH, 0, PAGE, READ, 0, errno.EBADF),
        ("inode write map, not open rw", g, NO_FH, 0, PAGE, READ | WRITE, 0, errno.EACCES),
    ]
    for name, nodeid, fh, foffset, length, flags, moffset, want in setup_cases:
        r = c.call(Op.FUSE_SETUPMAPPING, nodeid,
                   setupmapping_args(fh, foffset, length, flags, moffset))
        assert r.error == -want, name
    remove_cases = [
        ("count 0", removemapping_args([], count=0), errno.EINVAL),
        ("count beyond the request", removemapping_args([(0, PAGE)], count=2), errno.EINVAL),
        ("count beyond any kernel", removemapping_args([(0, PAGE)], count=1 << 20),
         errno.EINVAL),
        ("entry past the window", removemapping_args([(0, PAGE), (WINDOW, PAGE)]),
         errno.EINVAL),
        ("unaligned entry", removemapping_args([(PAGE + 1, PAGE)]), errno.EINVAL),
        ("u64 wrap", removemapping_args([(u64 - PAGE + 1, 2 * PAGE)]), errno.EINVAL),
    ]
    for name, args, want in remove_cases:
        assert c.call(Op.FUSE_REMOVEMAPPING, 0, args).error == -want, name
    # Nothing reached the frontend and the window is untouched.
    assert fe.srv.events == [] and fe.win.is_reserved(0, WINDOW)
    snap = stats(dd)["dax"]
    assert snap["mappings"] == 0 and snap["frontend_errors"] == 0
    # Every format carries the coordinator's counters.
    refused = snap["refused"]
    assert refused >= len(remove_cases)
    prom = stats_text(dd, "prometheus").splitlines()
    assert "shardfs_dax_mappings 0" in prom and f"shardfs_dax_refused_total {refused}" in prom
    assert f"refused {refused}" in stats_text(dd, "text")


# -- lifecycle --------------------------------------------------------------------------


def test_release_drops_fh_mappings_forget_drops_inode_mappings(dd: Daemon,
                                                               fe: DaxFrontend) -> None:
    (dd.shared / "f").write_bytes(b"r" * CHUNK)
    c = FuseClient(fe, queue=2)
    nodeid = c.lookup(1, b"f")[0]
    fh = c.open(nodeid)
    assert setupmapping(c, nodeid, fh, 0, CHUNK, 0) == 0
    assert setupmapping(c, nodeid, NO_FH, 0, CHUNK, CHUNK) == 0
    c.release(nodeid, fh)  # worker 1; the coordinator hears it as a notice
    fe.srv.wait_for(unmapped(0, CHUNK))
    assert fe.win.is_reserved(0, CHUNK)
    # The inode's mapping stays: Linux reuses it after close without asking again.
    assert fe.win.read(CHUNK, 1) == b"r"
    c.forget(nodeid, 1)  # hiprio, worker 0
    fe.srv.wait_for(unmapped(CHUNK, CHUNK))
    assert fe.win.is_reserved(0, WINDOW)


def test_destroy_empties_the_window_before_it_answers(dd: Daemon, fe: DaxFrontend) -> None:
    (dd.shared / "f").write_bytes(b"d" * CHUNK)
    c = FuseClient(fe)
    nodeid = c.lookup(1, b"f")[0]
    fh = c.open(nodeid)
    for i in range(3):
        assert setupmapping(c, nodeid, fh, 0, CHUNK, i * CHUNK) == 0
    c.ok(Op.FUSE_DESTROY)
    assert fe.win.is_reserved(0, WINDOW) and stats(dd)["dax"]["mappings"] == 0


def test_reinit_empties_the_window(dd: Daemon, fe: DaxFrontend) -> None:
    (dd.shared / "f").write_bytes(b"i" * CHUNK)
    c = FuseClient(fe)
    nodeid = c.lookup(1, b"f")[0]
    assert setupmapping(c, nodeid, c.open(nodeid), 0, CHUNK, 0) == 0
    c.init()  # a reboot: INIT without DESTROY
    assert fe.win.is_reserved(0, WINDOW)


def test_reset_device_drops_mappings(dd: Daemon, fe: DaxFrontend) -> None:
    (dd.shared / "f").write_bytes(b"x" * CHUNK)
    c = FuseClient(fe)
    nodeid = c.lookup(1, b"f")[0]
    assert setupmapping(c, nodeid, c.open(nodeid), 0, CHUNK, 0) == 0
    assert fe.ack(R.RESET_DEVICE) == 0
    fe.srv.wait_for(unmapped(0, CHUNK))
    assert fe.win.is_reserved(0, WINDOW)


def test_disconnect_drops_the_table(dd: Daemon) -> None:
    (dd.shared / "f").write_bytes(b"y" * CHUNK)
    first = DaxFrontend(dd.socket, num_queues=3).start()
    c = FuseClient(first)
    c.init()
    nodeid = c.lookup(1, b"f")[0]
    for i in range(3):
        assert setupmapping(c, nodeid, c.open(nodeid), 0, CHUNK, i * CHUNK) == 0
    first.close()
    second = DaxFrontend(dd.socket, num_queues=3).start()
    try:
        c = FuseClient(second)
        c.init()
        nodeid = c.lookup(1, b"f")[0]
        assert setupmapping(c, nodeid, c.open(nodeid), 0, CHUNK, 0) == 0
        # The coordinator applies the supervisor's disconnect before any later request.
        assert stats(dd)["dax"]["mappings"] == 1
        assert second.srv.count(UNMAP) == 0  # nothing sent to the new frontend for the old
    finally:
        second.close()


def test_killed_coordinator_is_restarted_with_a_clean_window(dd: Daemon,
                                                             fe: DaxFrontend) -> None:
    (dd.shared / "f").write_bytes(b"k" * 2 * CHUNK)
    c = FuseClient(fe)
    nodeid = c.lookup(1, b"f")[0]
    fh = c.open(nodeid)
    assert setupmapping(c, nodeid, fh, 0, CHUNK, 0) == 0
    old = dd.child("shardfs-coord")
    os.kill(old, signal.SIGKILL)
    # The new coordinator unmaps the whole window before it serves anyone.
    fe.srv.wait_for(unmapped(0, WINDOW))
    assert fe.win.is_reserved(0, WINDOW)
    assert dd.child("shardfs-coord") != old
    snap = stats(dd)
    assert snap["coordinator_restarts"] == 1 and snap["dax"]["mappings"] == 0
    assert snap["dax"]["restarts"] == 1
    # Both workers were relinked: DAX works again from every queue.
    for q, moffset in ((1, 0), (2, CHUNK)):
        assert setupmapping(FuseClient(fe, queue=q), nodeid, fh, CHUNK, CHUNK, moffset) == 0
    assert fe.win.read(0, 1) == b"k" and stats(dd)["dax"]["mappings"] == 2
    assert "whole DAX window was unmapped" in dd.log_text()


def test_killed_worker_leaves_consistent_dax_state(dd: Daemon, fe: DaxFrontend) -> None:
    (dd.shared / "f").write_bytes(b"w" * CHUNK)
    c = FuseClient(fe, queue=1)
    nodeid = c.lookup(1, b"f")[0]
    fh = c.open(nodeid)
    assert setupmapping(c, nodeid, fh, 0, CHUNK, 0) == 0
    os.kill(dd.child("shardfs-w0"), signal.SIGKILL)
    # The fh is still open (shared state), so its mapping rightly stays; the
    # replacement worker has a new link and RELEASE through it unmaps.
    assert fe.win.read(0, 1) == b"w"
    c.release(nodeid, fh)
    fe.srv.wait_for(unmapped(0, CHUNK))
    assert fe.win.is_reserved(0, WINDOW)
    # The coordinator updates its table once the frontend's reply is in,
    # just after the frontend saw the UNMAP: wait for that, bounded.
    deadline = time.monotonic() + 30
    while stats(dd)["dax"]["mappings"] != 0:
        assert time.monotonic() < deadline, stats(dd)["dax"]
        time.sleep(0.01)


def test_no_fd_leaks_in_any_process(dd: Daemon, fe: DaxFrontend) -> None:
    (dd.shared / "f").write_bytes(b"l" * CHUNK)
    c1, c2 = FuseClient(fe, queue=1), FuseClient(fe, queue=2)
    nodeid = c1.lookup(1, b"f")[0]
    fh = c1.open(nodeid, os.O_RDWR)

    def cycle(i: int) -> None:
        c = c1 if i % 2 else c2
        assert setupmapping(c, nodeid, fh, 0, CHUNK, (i % 4) * CHUNK, writable=bool(i % 3)) == 0
        assert setupmapping(c, nodeid, fh, 0, CHUNK, WINDOW) == -errno.EINVAL
        if i % 4 == 3:
            assert removemapping(c, [(0, 4 * CHUNK)]) == 0

    cycle(0)
    pids = {n: dd.child(n) for n in ("shardfs-coord", "shardfs-w0", "shardfs-w1")}
    before = {n: fd_count(p) for n, p in pids.items()}
    mine = len(os.listdir("/proc/self/fd"))
    for i in range(1, 41):
        cycle(i)
    assert c1.getattr(1) and c2.getattr(1)
    assert {n: fd_count(p) for n, p in pids.items()} == before
    assert len(os.listdir("/proc/self/fd")) == mine
    assert vu.VHOST_USER_FLAG_MAP_RW in {e.req.flags for e in fe.srv.events}


def test_a_submount_node_is_served_through_the_queue_not_the_window(tmp_path: Path) -> None:
    """Workers open nodes on a filesystem mounted under the share; the
    coordinator keeps no fds on such mounts, so SETUPMAPPING says EOPNOTSUPP
    (the guest then reads through the queue) and nothing is mapped."""
    import subprocess
    sub = tmp_path / "shared" / "sub"
    sub.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "t", str(sub)], check=True)
    try:
        (sub / "f").write_bytes(b"s" * CHUNK)
        d = dax_daemon(tmp_path, queues=2)
        f = DaxFrontend(d.socket, num_queues=3).start()
        try:
            c = FuseClient(f, queue=2)
            c.init()
            node = c.lookup(c.lookup(1, b"sub")[0], b"f")[0]
            fh = c.open(node)
            assert setupmapping(c, node, fh, 0, CHUNK, 0) == -errno.EOPNOTSUPP
            assert f.srv.events == [] and f.win.is_reserved(0, WINDOW)
            assert c.read(node, fh, 0, 4) == b"ssss"
        finally:
            f.close()
        assert d.stop() == 0
        assert "Traceback" not in d.log_path.read_text()
    finally:
        subprocess.run(["umount", "-l", str(sub)], check=True)
