"""Live migration through the real daemon: the dirty log and the device state.

Two daemons share one directory (the destination's share is a symlink to
the source's), each driven by the in-repo frontend the way QEMU's vhost code
drives it: SET_LOG_BASE + LOG_ALL + VHOST_VRING_F_LOG while "RAM" moves,
GET_VRING_BASE on every ring, then SET_DEVICE_STATE_FD/CHECK_DEVICE_STATE on
both sides.  The guest's nodeids and fhs from the source must then work on
every queue of the destination.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardfs.abi import vhost_user as vu
from shardfs.codec import devstate
from shardfs.fs.passthrough.fhandle import name_to_handle
from shardfs.testing import migration as M
from shardfs.testing.frontend import Frontend, FuseClient

from .conftest import Daemon

MEM = 16 << 20
PAGE = vu.VHOST_LOG_PAGE


def _start(d: Daemon) -> Frontend:
    fe = M.migrating_frontend(d.socket, num_queues=1 + d.queues, mem_size=MEM)
    fe.start()
    return fe


def _check_clean(d: Daemon) -> None:
    rc = d.stop()
    text = d.log_path.read_text()
    assert rc == 0, text
    assert "Traceback" not in text, text


@pytest.fixture
def pair(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Daemon, Daemon]]:
    """Source and destination daemons over one share; ``request.param``: extra flags
    (source, destination)."""
    src_args, dst_args = getattr(request, "param", ((), ()))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Daemon(tmp_path / "a", *src_args, queues=2)
    os.symlink(a.shared, tmp_path / "b" / "shared")
    b = Daemon(tmp_path / "b", *dst_args, queues=2)
    yield a, b
    _check_clean(a)
    _check_clean(b)


def _pages_changed(before: bytes, after: bytes) -> set[int]:
    out = set()
    for p in range(len(before) // PAGE):
        if before[p * PAGE:(p + 1) * PAGE] != after[p * PAGE:(p + 1) * PAGE]:
            out.add(p)
    return out


def _unlogged(lg: M.Log, pages: set[int], timeout_s: float = 10.0) -> set[int]:
    """The pages not marked in the log.  A reply's pages are marked before its
    chain is pushed, the used ring's at the end of the batch, just after the
    driver may have seen it: wait (generously) for those."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = pages - lg.pages()
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.01)


class Tracer:
    """Snapshots guest RAM right before each kick: what changes after it is the
    device's.  The daemon must not poll (``--poll-us 0``), or it could serve a
    chain before the kick."""

    def __init__(self, fe: Frontend) -> None:
        self.fe = fe
        self.before = b""
        kick = fe.kick_queue

        def traced_kick(index: int) -> None:
            self.before = bytes(fe.ram.map)
            kick(index)

        fe.kick_queue = traced_kick  # type: ignore[method-assign]

    def written(self) -> set[int]:
        return _pages_changed(self.before, bytes(self.fe.ram.map))


def test_dirty_log_marks_every_page_the_device_writes(tmp_path: Path) -> None:
    """Replies, READ data, READDIRPLUS buffers and used rings, on hiprio and both
    request queues (two workers): every page the device writes is marked."""
    d = Daemon(tmp_path, "--poll-us", "0", queues=2)
    try:
        fe = _start(d)
        lg = M.Log(MEM)
        tr = Tracer(fe)
        c1, c2 = FuseClient(fe, 1), FuseClient(fe, 2)
        c1.init()
        for i in range(20):
            c1.create(1, f"f{i}".encode())
        M.start_logging(fe, lg)
        payload = random.Random(1).randbytes(300 * 1024)
        entry, fh = c1.create(1, b"big")
        nodeid = entry[0]
        dh = struct.unpack_from("<Q", c2.ok(27, 1, struct.pack("<II", os.O_RDONLY, 0)))[0]
        steps = [
            ("create", lambda: c1.create(1, b"new")),
            ("write", lambda: c2.write(nodeid, fh, 0, payload)),
            ("read 300 KiB", lambda: c2.read(nodeid, fh, 0, len(payload))),
            ("readdirplus", lambda: c2.readdirplus_entries(1, dh, size=8192)),
            ("readdir", lambda: c1.readdir(1, dh, size=8192)),
            ("getattr", lambda: c1.getattr(nodeid)),
            ("lookup", lambda: c2.lookup(1, b"f3")),
            ("forget on hiprio", lambda: c1.forget(nodeid, 1)),
            ("error reply", lambda: c1.call(1, 1, b"missing\0")),
        ]
        for what, step in steps:
            lg.clear()
            step()
            written = tr.written()
            assert written, what
            missing = _unlogged(lg, written)
            assert not missing, f"{what}: pages {sorted(missing)} written but not logged"
        # Stopping the rings marks the used rings once more (avail_event, flags).
        lg.clear()
        M.stop_rings(fe)
        used_pages = {fe.queues[i].used // PAGE for i in fe.queues}
        assert used_pages <= lg.pages()
        fe.close()
        lg.close()
    finally:
        _check_clean(d)


def test_log_replaced_cleared_and_off(daemon: Daemon) -> None:
    """A new SET_LOG_BASE replaces the log at runtime; LOG_ALL cleared stops logging."""
    fe = _start(daemon)
    c = FuseClient(fe)
    c.init()
    first, second = M.Log(MEM), M.Log(MEM)
    reply = M.set_log_base(fe, first)
    assert vu.vhost_user_log.unpack(reply) == (first.size, 0)
    c.getattr(1)
    assert not first.pages(), "logging before LOG_ALL"
    assert M.set_log_all(fe, True) == 0
    c.getattr(1)
    assert first.pages()
    M.set_log_base(fe, second)
    first.clear()
    c.getattr(1)
    assert second.pages() and not first.pages()
    M.set_log_all(fe, False)
    second.clear()
    c.getattr(1)
    assert not second.pages(), "still logging after LOG_ALL was cleared"
    fe.close()


def _source_session(fe: Frontend, share: Path) -> dict[str, int]:
    c1, c2 = FuseClient(fe, 1), FuseClient(fe, 2)
    c1.init()
    d = c1.mkdir(1, b"dir")[0]
    f, fh = c1.create(d, b"held")
    c2.write(f[0], fh, 0, b"before ")
    c1.lookup(d, b"held")  # nlookup 2
    ro = c2.open(f[0], os.O_RDONLY)
    dfh = struct.unpack_from("<Q", c1.ok(27, d, struct.pack("<II", os.O_RDONLY, 0)))[0]
    return {"dir": d, "file": f[0], "fh": fh, "ro": ro, "dfh": dfh}


def _migrate(a: Daemon, b: Daemon, prepare: object = None) -> tuple[Frontend, Frontend,
                                                                     dict[str, int], bytes]:
    fa = _start(a)
    ids = _source_session(fa, a.shared)
    lg = M.Log(MEM)
    M.start_logging(fa, lg)
    M.stop_rings(fa)
    reply, data, check = M.save_state(fa)
    assert reply == vu.VHOST_USER_DEVICE_STATE_NOFD and check == 0, (hex(reply), check)
    fb = M.migrating_frontend(b.socket, num_queues=3, mem_size=MEM)
    fb.negotiate()
    return fa, fb, ids, data


def _resume(fe: Frontend) -> None:
    fe.set_mem_table()
    for i in range(1 + 2):
        fe.setup_queue(i)


def test_state_round_trip_every_queue(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    fa, fb, ids, data = _migrate(a, b)
    state = devstate.decode(data)
    assert len(state.nodes) == 2 and len(state.handles) == 3
    assert sorted(n.nlookup for n in state.nodes) == [1, 2]
    assert M.load_state(fb, data) == (vu.VHOST_USER_DEVICE_STATE_NOFD, 0)
    _resume(fb)
    c1, c2 = FuseClient(fb, 1), FuseClient(fb, 2)
    # The same nodeids and fhs, on both queues (two workers).
    assert c2.getattr(ids["file"])[0] > 0
    c1.write(ids["file"], ids["fh"], 7, b"after")
    assert c2.read(ids["file"], ids["ro"], 0, 100) == b"before after"
    assert [n for _, _, _, n in c1.readdir(ids["dir"], ids["dfh"])
            if n == b"held"] == [b"held"]
    assert (a.shared / "dir" / "held").read_bytes() == b"before after"
    # Lookup counts moved: two FORGETs of 1 each free the node, the second one frees.
    c1.forget(ids["file"], 1)
    c1.getattr(ids["file"])
    c1.release(ids["file"], ids["fh"])
    c1.release(ids["file"], ids["ro"])
    c1.forget(ids["file"], 1)
    with pytest.raises(OSError) as e:
        c2.getattr(ids["file"])
    assert e.value.errno == errno.ENOENT
    # New ids on the destination never collide with the migrated ones.
    entry, fh = c2.create(ids["dir"], b"new")
    assert entry[0] not in (ids["dir"], ids["file"]) and fh not in (ids["ro"], ids["dfh"])
    fa.close()
    fb.close()


def test_failed_migration_source_serves_on(pair: tuple[Daemon, Daemon]) -> None:
    """The destination refuses (a corrupt stream); the source restarts its rings
    after LOG_ALL is cleared and every id still works; then a ping-pong."""
    a, b = pair
    fa, fb, ids, data = _migrate(a, b)
    bad = bytearray(data)
    bad[-1] ^= 0xFF
    assert M.load_state(fb, bytes(bad))[1] == 1
    M.set_log_all(fa, False)
    _resume(fa)
    c = FuseClient(fa, 2)
    c.write(ids["file"], ids["fh"], 7, b"still")
    assert c.read(ids["file"], ids["ro"], 0, 100) == b"before still"
    # The destination's arena is untouched: the real state loads now.
    assert M.load_state(fb, data)[1] == 0
    _resume(fb)
    FuseClient(fb, 1).getattr(ids["file"])
    # Ping-pong: B back to A (A's frontend reconnects as a fresh QEMU would).
    M.stop_rings(fb)
    reply, back, check = M.save_state(fb)
    assert check == 0
    fa.close()
    fa2 = M.migrating_frontend(a.socket, num_queues=3, mem_size=MEM)
    fa2.negotiate()
    assert M.load_state(fa2, back)[1] == 0
    _resume(fa2)
    assert FuseClient(fa2, 2).read(ids["file"], ids["ro"], 0, 100) == b"before still"
    fa2.close()
    fb.close()


def _bad_streams(data: bytes, share: Path, outside_handle: tuple[int, bytes]) -> dict[str, bytes]:
    state = devstate.decode(data)
    hdr = bytearray(data[:48])
    out = {
        "truncated": data[:-5],
        "header only": data[:30],
        "corrupt": data[:60] + bytes([data[60] ^ 1]) + data[61:],
        "other version": data[:8] + struct.pack("<H", 99) + data[10:],
        "not ours": b"\x00" * 100,
    }
    struct.pack_into("<I", hdr, 32, 1 << 30)  # a billion nodes
    out["oversized count"] = bytes(hdr) + data[48:]
    for name, path in (("dotdot", b"../../etc"), ("absolute", b"/etc/passwd"),
                       ("dot component", b"dir/./held"), ("empty component", b"dir//held"),
                       ("symlink escape", b"link/passwd")):
        nodes = [devstate.NodeState(n.nodeid, n.nlookup, n.kind, path) if n.path == b"dir/held"
                 else n for n in state.nodes]
        out[name] = devstate.encode(devstate.DeviceState(state.mode, state.init_flags,
                                                         state.node_floor, state.handle_floor,
                                                         nodes, state.handles))
    htype, handle = outside_handle
    nodes = [devstate.NodeState(n.nodeid, n.nlookup, n.kind, None, htype, handle)
             for n in state.nodes if n.path == b"dir/held"]
    out["handle outside the share"] = devstate.encode(devstate.DeviceState(
        devstate.MODE_FILE_HANDLES, state.init_flags, state.node_floor, state.handle_floor,
        nodes, []))
    return out


def test_bad_streams_fail_check_and_change_nothing(pair: tuple[Daemon, Daemon],
                                                    tmp_path: Path) -> None:
    a, b = pair
    outside = tmp_path / "outside"
    outside.write_text("secret")
    fd = os.open(outside, os.O_RDONLY)
    try:
        htype, handle, _ = name_to_handle(fd)
    finally:
        os.close(fd)
    os.symlink("/etc", a.shared / "link")
    fa, fb, ids, data = _migrate(a, b)
    for what, bad in _bad_streams(data, a.shared, (htype, handle)).items():
        reply, check = M.load_state(fb, bad)
        assert check == 1, what
    text = b.log_text()
    assert "checksum mismatch" in text and "version 99" in text and "truncated" in text
    assert "outside the share" in text
    # Never opened anything outside: still nothing loaded, and the good state loads.
    assert M.load_state(fb, data)[1] == 0
    _resume(fb)
    FuseClient(fb).getattr(ids["dir"])
    fa.close()
    fb.close()


def test_fuzzed_streams_never_crash(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    fa, fb, ids, data = _migrate(a, b)
    rng = random.Random(12)
    loaded = 0
    for _ in range(40):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        if rng.random() < 0.5:  # keep the checksum right, so the record parser is reached
            struct.pack_into("<I", bad, 44, zlib.crc32(bytes(bad[48:])))
        if M.load_state(fb, bytes(bad))[1] == 0:
            loaded += 1  # a mutation the format cannot tell (a lookup count, a flag)
            break
    assert loaded or M.load_state(fb, data)[1] == 0
    _resume(fb)
    FuseClient(fb, 2).getattr(1)  # alive and serving
    fa.close()
    fb.close()


@pytest.mark.parametrize("pair", [(("--migration-on-error", "abort"), ())], indirect=True)
def test_unlinked_open_file_aborts_by_path(pair: tuple[Daemon, Daemon]) -> None:
    """find-paths cannot migrate an open but unlinked file: with abort the source
    refuses to save (QEMU's migration fails) and serves on, the file included."""
    a, b = pair
    fa = _start(a)
    ids = _source_session(fa, a.shared)
    FuseClient(fa).unlink(ids["dir"], b"held")
    M.stop_rings(fa)
    reply, data, check = M.save_state(fa)
    assert reply & vu.VHOST_USER_DEVICE_STATE_STATUS_MASK, hex(reply)
    assert "cannot be located by find-paths" in a.log_text()
    _resume(fa)
    c = FuseClient(fa, 2)
    c.write(ids["file"], ids["fh"], 7, b"kept")
    assert c.read(ids["file"], ids["ro"], 0, 100) == b"before kept"
    fa.close()


@pytest.mark.parametrize("pair", [(("--migration-on-error", "guest-error"),
                                   ("--migration-on-error", "guest-error"))], indirect=True)
def test_unlinked_open_file_guest_error(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    fa = _start(a)
    ids = _source_session(fa, a.shared)
    other, ofh = FuseClient(fa).create(1, b"other")
    FuseClient(fa).unlink(ids["dir"], b"held")
    M.stop_rings(fa)
    reply, data, check = M.save_state(fa)
    assert check == 0
    fb = M.migrating_frontend(b.socket, num_queues=3, mem_size=MEM)
    fb.negotiate()
    assert M.load_state(fb, data)[1] == 0
    _resume(fb)
    c = FuseClient(fb, 2)
    for call in (lambda: c.getattr(ids["file"]), lambda: c.read(ids["file"], ids["ro"], 0, 9)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.ESTALE
    c.write(other[0], ofh, 0, b"fine")
    assert (a.shared / "other").read_bytes() == b"fine"
    fa.close()
    fb.close()


@pytest.mark.parametrize("pair", [(("--migration-mode", "file-handles"), ())], indirect=True)
def test_file_handles_survive_a_host_rename(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    fa, fb, ids, data = _migrate(a, b)
    assert devstate.decode(data).mode == devstate.MODE_FILE_HANDLES
    os.rename(a.shared / "dir", a.shared / "moved")  # on the host, during the downtime
    assert M.load_state(fb, data)[1] == 0
    _resume(fb)
    c = FuseClient(fb, 2)
    c.write(ids["file"], ids["fh"], 7, b"moved")
    assert (a.shared / "moved" / "held").read_bytes() == b"before moved"
    fa.close()
    fb.close()


def test_paths_follow_guest_renames_but_not_host_ones_after_save(
        pair: tuple[Daemon, Daemon]) -> None:
    """By path: the path is read from the live inode at switch-over (a guest
    rename before it is followed); a host rename after the save is not."""
    a, b = pair
    fa = _start(a)
    _source_session(fa, a.shared)
    c = FuseClient(fa)
    c.ok(12, 1, struct.pack("<Q", 1) + b"dir\0renamed\0")  # FUSE_RENAME dir -> renamed
    M.stop_rings(fa)
    _, data, check = M.save_state(fa)
    assert b"renamed/held" in data and check == 0
    os.rename(a.shared / "renamed", a.shared / "again")
    fb = M.migrating_frontend(b.socket, num_queues=3, mem_size=MEM)
    fb.negotiate()
    assert M.load_state(fb, data)[1] == 1  # abort: the destination keeps nothing
    assert "path renamed" in b.log_text()
    os.rename(a.shared / "again", a.shared / "renamed")
    assert M.load_state(fb, data)[1] == 0
    fa.close()
    fb.close()


def test_a_second_load_is_refused_and_the_first_stands(pair: tuple[Daemon, Daemon]) -> None:
    """A state loads only into a fresh arena: loading it again fails CHECK_DEVICE_STATE
    (the check runs inside the apply, under the lock) and the session serves on."""
    a, b = pair
    fa, fb, ids, data = _migrate(a, b)
    assert M.load_state(fb, data)[1] == 0
    assert M.load_state(fb, data)[1] == 1
    assert "a migration loads into a fresh one" in b.log_text()
    _resume(fb)
    assert FuseClient(fb, 2).getattr(ids["file"])[0] > 0
    fa.close()
    fb.close()


@pytest.mark.parametrize("pair", [(("--writeback",), ())], indirect=True)
def test_init_flags_must_match(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    fa, fb, ids, data = _migrate(a, b)
    assert M.load_state(fb, data)[1] == 1
    assert "--writeback" in b.log_text()
    fa.close()
    fb.close()


def test_a_worker_replaced_mid_migration_logs_again(tmp_path: Path) -> None:
    """Crash isolation during a migration: the replacement worker maps the log
    and logs its ring before serving it (the supervisor replays both)."""
    from tests.frontend.test_crash import _wait_for, _workers

    d = Daemon(tmp_path, "--poll-us", "0", queues=2)
    try:
        fe = _start(d)
        lg = M.Log(MEM)
        tr = Tracer(fe)
        c2 = FuseClient(fe, 2)
        FuseClient(fe, 1).init()
        M.start_logging(fe, lg)
        before = _workers(d)["shardfs-w1"]
        os.kill(before, signal.SIGKILL)
        _wait_for(lambda: _workers(d).get("shardfs-w1") not in (None, before),
                  "a replacement worker")
        lg.clear()
        c2.getattr(1)
        written = tr.written()
        assert written and not _unlogged(lg, written), (written, lg.pages())
        fe.close()
        lg.close()
    finally:
        _check_clean_after_crash(d)


def _check_clean_after_crash(d: Daemon) -> None:
    assert d.stop() == 0
    assert "Traceback" not in d.log_path.read_text()


def test_reinit_after_migration_drops_the_migrated_session(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    fa, fb, ids, data = _migrate(a, b)
    assert M.load_state(fb, data)[1] == 0
    _resume(fb)
    c = FuseClient(fb)
    c.getattr(ids["file"])
    c.init()  # a guest reboot: INIT without DESTROY
    with pytest.raises(OSError) as e:
        c.getattr(ids["file"])
    assert e.value.errno == errno.ENOENT
    assert "INIT again without DESTROY" in b.log_text()
    fa.close()
    fb.close()


def _wait_used_idx(q: object, idx: int, timeout_s: float = 30.0) -> None:
    """Wait for used.idx itself (this driver asks for one call per publish only)."""
    deadline = time.monotonic() + timeout_s
    while q.used_idx() != idx:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, f"used.idx {q.used_idx()}, want {idx}"  # type: ignore[attr-defined]
        time.sleep(0.005)


def test_get_vring_base_with_requests_in_flight_loses_none(tmp_path: Path) -> None:
    """Chains published and kicked, then GET_VRING_BASE at once: every chain the
    device took is answered before the reply (used.idx == the base returned),
    and the rest, restarted at that base (as on a destination), are all served."""
    from shardfs.abi import fuse as F
    from shardfs.abi.vhost_user import FrontendReq as R
    from shardfs.testing.frontend import USER_ADDR_OFFSET

    daemon = Daemon(tmp_path, "--poll-us", "0")
    fe = _start(daemon)
    c = FuseClient(fe)
    c.init()
    q = fe.queues[1]
    heads = {}
    for i in range(64):
        unique = fe.next_unique()
        req = F.fuse_in_header.pack(40 + F.fuse_getattr_in.size, 3, unique, 1, 0, 0, 1, 0, 0)
        rgpa = fe.ram.alloc(len(req) + F.fuse_getattr_in.size)
        fe.ram.write(rgpa, req + F.fuse_getattr_in.pack(0, 0, 0))
        wgpa = fe.ram.alloc(256)
        heads[q.add([(rgpa, len(req) + F.fuse_getattr_in.size)], [(wgpa, 256)])] = wgpa
        if i < 32:
            fe.kick_queue(1)
        if i == 31:
            # Wait for those; the rest are published but never kicked, so the
            # (non-polling) worker has not taken them when the ring stops.
            _wait_used_idx(q, 1 + 32)
            done = q.pop_used()
    base = fe.get_vring_base(1)
    assert base == 1 + 32, base
    assert q.used_idx() == base, "a chain taken before GET_VRING_BASE was left unanswered"
    done += q.pop_used()
    # Restart the ring where it stood (what QEMU does on the destination, or here).
    fe.send(R.SET_VRING_NUM, vu.vhost_vring_state.pack(1, fe.queue_size))
    fe.send(R.SET_VRING_ADDR, vu.vhost_vring_addr.pack(
        1, 0, q.desc + USER_ADDR_OFFSET, q.used + USER_ADDR_OFFSET, q.avail + USER_ADDR_OFFSET, 0))
    fe.send(R.SET_VRING_BASE, vu.vhost_vring_state.pack(1, base))
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    os.close(fe.kick[1])
    fe.kick[1] = kick
    assert fe.ack(R.SET_VRING_KICK, vu.u64.pack(1), [kick]) == 0
    assert fe.ack(R.SET_VRING_ENABLE, vu.vhost_vring_state.pack(1, 1)) == 0
    fe.kick_queue(1)
    _wait_used_idx(q, 1 + 64)
    done += q.pop_used()
    assert sorted(h for h, _ in done) == sorted(heads)
    for head, length in done:
        total, error, _ = F.fuse_out_header.unpack(fe.ram.read(heads[head], 16))
        assert error == 0 and length == total > 16
    fe.close()
    _check_clean(daemon)


def test_get_vring_base_answers_a_parked_lock_wait(tmp_path: Path) -> None:
    """A SETLKW parked in the lock process is a request in flight: GET_VRING_BASE
    answers it (EINTR, as the guest's own interrupt would) before it replies,
    so no chain is left taken but unanswered across a migration."""
    from shardfs.abi import fuse as F
    from shardfs.abi.fuse import FuseOpcode as Op
    from tests.frontend.test_locks import WR, Async, lk_in, lock_daemon, make_file, setlk

    d = lock_daemon(tmp_path, queues=2)
    try:
        fe = d.frontend().start()
        q1, q2 = FuseClient(fe, queue=1), FuseClient(fe, queue=2)
        q1.init()
        nid, fh, hostfd = make_file(q1, d.shared, b"wait")
        os.close(hostfd)
        assert setlk(q2, nid, fh, 1, 0, 9, WR) == 0
        a = Async(fe, 1)
        head, _waiting = a.submit(Op.FUSE_SETLKW, nid, lk_in(fh, 2, 5, 5, WR))
        a.submit(Op.FUSE_GETATTR, nid, F.fuse_getattr_in.pack(0, 0, 0))
        a.wait()  # the GETATTR after it came back: the wait is parked
        q = fe.queues[1]
        base = fe.get_vring_base(1)
        assert q.used_idx() == base, "the parked lock wait was left unanswered"
        out, _unique = a.out[head]
        assert F.fuse_out_header.unpack(fe.ram.read(out, 16))[1] == -errno.EINTR
        fe.close()
    finally:
        _check_clean(d)


@pytest.mark.parametrize("pair", [(("--migration-verify-handles",), ())], indirect=True)
def test_verify_handles_catches_a_file_replaced_on_the_host(pair: tuple[Daemon, Daemon]) -> None:
    """By path, a file replaced on the host under the same name would be opened
    silently; with --migration-verify-handles the destination refuses it."""
    a, b = pair
    fa, fb, ids, data = _migrate(a, b)
    assert all(n.handle for n in devstate.decode(data).nodes)
    held = a.shared / "dir" / "held"
    held.rename(a.shared / "dir" / "old")
    held.write_bytes(b"an impostor")
    assert M.load_state(fb, data)[1] == 1
    assert "file handle differs" in b.log_text()
    held.unlink()
    (a.shared / "dir" / "old").rename(held)
    assert M.load_state(fb, data)[1] == 0
    fa.close()
    fb.close()
