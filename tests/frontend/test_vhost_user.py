"""The vhost-user rules of DESIGN §1, checked against the real daemon.

Each test drives the daemon (a real subprocess) through the in-repo
frontend: a Unix socket, memfd RAM, eventfds and split rings.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from shardfs.abi import fuse as F
from shardfs.abi import vhost_user as vu
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.abi.vhost_user import FrontendReq as R
from shardfs.abi.vhost_user import ProtocolFeature as PF
from shardfs.abi.virtio import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    virtio_fs_config,
)
from shardfs.testing.driver import GuestRam
from shardfs.testing.frontend import USER_ADDR_OFFSET, Frontend, FuseClient
from tests.frontend.conftest import REPO, Daemon


def test_features_and_queue_count(daemon: Daemon) -> None:
    with daemon.frontend() as fe:
        features = fe.get_u64(R.GET_FEATURES)
        for bit in (VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX,
                    VHOST_USER_F_PROTOCOL_FEATURES):
            assert features >> bit & 1, bit
        proto = fe.get_u64(R.GET_PROTOCOL_FEATURES)
        for bit in (PF.MQ, PF.REPLY_ACK, PF.CONFIGURE_MEM_SLOTS, PF.BACKEND_REQ,
                    PF.BACKEND_SEND_FD, PF.RESET_DEVICE, PF.STATUS, PF.CONFIG):
            assert proto >> bit & 1, bit.name
        assert fe.get_u64(R.GET_QUEUE_NUM) == 2
        fe.negotiate()
        assert fe.get_u64(R.GET_MAX_MEM_SLOTS) >= 8


def test_get_config_answers_tag_and_queue_count(daemon: Daemon) -> None:
    with daemon.frontend() as fe:
        fe.negotiate()
        fe.send(R.GET_CONFIG, vu.vhost_user_config.pack(0, virtio_fs_config.size, 0)
                + bytes(virtio_fs_config.size))
        reply = fe.recv_reply(R.GET_CONFIG)
        tag, nqueues, _ = virtio_fs_config.unpack_from(reply, vu.vhost_user_config.size)
        assert tag.rstrip(b"\0") == b"shardfs"
        assert nqueues == 1


def test_no_config_feature_without_tag(tmp_path: Path) -> None:
    d = Daemon(tmp_path, tag=None)
    try:
        with Frontend(d.socket) as fe:
            assert not fe.get_u64(R.GET_PROTOCOL_FEATURES) >> PF.CONFIG & 1
    finally:
        assert d.stop() == 0


def test_reply_ack_success_and_failure(daemon: Daemon) -> None:
    with daemon.frontend() as fe:
        fe.negotiate()
        assert fe.ack(R.SET_VRING_NUM, vu.vhost_vring_state.pack(1, 256)) == 0
        assert fe.ack(R.SET_VRING_NUM, vu.vhost_vring_state.pack(1, 100)) != 0
        assert fe.ack(R.SET_VRING_NUM, vu.vhost_vring_state.pack(9, 256)) != 0
        assert fe.ack(R.SET_CONFIG, vu.vhost_user_config.pack(0, 4, 0) + b"abcd") != 0


def test_ring_serves_only_after_enable(daemon: Daemon) -> None:
    with daemon.frontend() as fe:
        fe.negotiate()
        fe.set_mem_table()
        fe.setup_queue(0)
        q = fe.setup_queue(1, enable=False)
        ram = fe.ram
        req = F.fuse_in_header.pack(40 + 64, Op.FUSE_INIT, 2, 0, 0, 0, 0, 0, 0) + \
            F.fuse_init_in.pack(7, 38, 0, 0, 0)
        rgpa = ram.alloc(len(req))
        ram.write(rgpa, req)
        wgpa = ram.alloc(4096)
        q.add([(rgpa, len(req))], [(wgpa, 4096)])
        fe.kick_queue(1)
        # The ring is disabled: the daemon answers a round trip on the socket
        # (proof it processed the kick) without touching the ring.
        assert fe.get_u64(R.GET_QUEUE_NUM) == 2
        assert q.used_idx() == 0
        assert fe.ack(R.SET_VRING_ENABLE, vu.vhost_vring_state.pack(1, 1)) == 0
        (head, length), = fe.wait_used(1)
        assert length == F.fuse_out_header.size + F.fuse_init_out.size


def test_get_vring_base_returns_next_avail_and_restart_continues(daemon: Daemon) -> None:
    with daemon.frontend() as fe:
        fe.start()
        c = FuseClient(fe)
        c.init()
        for _ in range(5):
            c.getattr(1)
        assert fe.get_vring_base(1) == 6
        # Restart the ring where it stopped, as QEMU does after migration.
        q = fe.queues[1]
        fe.send(R.SET_VRING_BASE, vu.vhost_vring_state.pack(1, 6))
        assert fe.ack(R.SET_VRING_KICK, vu.u64.pack(1), [fe.kick[1]]) == 0
        assert q.avail_idx == 6
        assert c.getattr(1)[0] >= 0
        assert fe.get_vring_base(1) == 7


def test_call_fd_replaced_at_runtime(daemon: Daemon) -> None:
    with daemon.frontend() as fe:
        fe.start()
        c = FuseClient(fe)
        c.init()
        old = fe.call[1]
        new = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        assert fe.ack(R.SET_VRING_CALL, vu.u64.pack(1), [new]) == 0
        fe.call[1] = new
        os.close(old)
        assert c.getattr(1)  # waits on the new call fd
        # Mask (no fd), then unmask: the ring keeps working.
        assert fe.ack(R.SET_VRING_CALL, vu.u64.pack(1 | vu.VHOST_USER_VRING_NOFD_MASK)) == 0
        assert fe.ack(R.SET_VRING_CALL, vu.u64.pack(1), [new]) == 0
        assert c.getattr(1)


def test_memory_regions_added_and_removed_at_runtime(daemon: Daemon) -> None:
    with daemon.frontend() as fe:
        fe.start()
        c = FuseClient(fe)
        c.init()
        extra = GuestRam(1 << 20, base=1 << 32)
        try:
            region = vu.vhost_user_single_region.pack(0, extra.base, extra.size,
                                                      extra.base + USER_ADDR_OFFSET, 0)
            assert fe.ack(R.ADD_MEM_REG, region, [extra.fd]) == 0
            req = F.fuse_in_header.pack(56, Op.FUSE_GETATTR, 99, 1, 0, 0, 0, 0, 0) + \
                F.fuse_getattr_in.pack(0, 0, 0)
            rgpa = extra.alloc(len(req))
            extra.write(rgpa, req)
            wgpa = extra.alloc(256)
            q = fe.queues[1]
            q.add([(rgpa, len(req))], [(wgpa, 256)])
            fe.kick_queue(1)
            (_, length), = fe.wait_used(1)
            assert length == F.fuse_out_header.size + F.fuse_attr_out.size
            assert F.fuse_out_header.unpack(extra.read(wgpa, 16))[1:] == (0, 99)
            assert fe.ack(R.REM_MEM_REG, region) == 0
            # Buffers in the removed region are now outside guest memory:
            # the chain comes back empty and the daemon keeps serving.
            q.add([(rgpa, len(req))], [(wgpa, 256)])
            fe.kick_queue(1)
            (_, length), = fe.wait_used(1)
            assert length == 0
            assert c.getattr(1)
        finally:
            extra.close()


def test_garbage_on_socket_closes_connection_and_daemon_serves_next(daemon: Daemon) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(daemon.socket)
    s.sendall(b"\xff" * 64)
    s.settimeout(10)
    _assert_closed(s)
    with daemon.frontend() as fe:
        fe.start()
        FuseClient(fe).init()
    assert "closing the vhost-user connection" in daemon.log_text()


def _assert_closed(s: socket.socket) -> None:
    """The daemon closed the connection (EOF, or a reset if our bytes were unread)."""
    try:
        assert s.recv(1) == b""
    except ConnectionResetError:
        pass
    s.close()


def test_oversized_payload_is_refused(daemon: Daemon) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(daemon.socket)
    s.sendall(vu.vhost_user_header.pack(R.GET_FEATURES, 1, 1 << 30))
    s.settimeout(10)
    _assert_closed(s)


def test_bad_descriptors_are_dropped_and_counted(daemon: Daemon) -> None:
    with daemon.frontend() as fe:
        fe.start()
        c = FuseClient(fe)
        c.init()
        q = fe.queues[1]
        # A descriptor pointing outside guest memory.
        head = q.free.pop(0)
        q.raw_desc(head, 1 << 40, 64, 0, 0)
        q.publish(head)
        # A chain that loops on itself.
        a = q.free.pop(0)
        gpa = fe.ram.alloc(64)
        q.raw_desc(a, gpa, 64, VIRTQ_DESC_F_NEXT, a)
        q.publish(a)
        # A readable descriptor after a writable one.
        b1, b2 = q.free.pop(0), q.free.pop(0)
        q.raw_desc(b1, gpa, 64, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, b2)
        q.raw_desc(b2, gpa, 64, 0, 0)
        q.publish(b1)
        fe.kick_queue(1)
        used = fe.wait_used(1, 3)
        assert sorted(used) == sorted([(head, 0), (a, 0), (b1, 0)])
        assert c.getattr(1)
    assert daemon.log_text().count("malformed descriptor chain") == 3


def test_truncated_fuse_header_is_dropped(daemon: Daemon) -> None:
    with daemon.frontend() as fe:
        fe.start()
        c = FuseClient(fe)
        c.init()
        q = fe.queues[1]
        rgpa = fe.ram.alloc(20)
        fe.ram.write(rgpa, b"\x01" * 20)
        wgpa = fe.ram.alloc(256)
        head = q.add([(rgpa, 20)], [(wgpa, 256)])
        fe.kick_queue(1)
        assert fe.wait_used(1) == [(head, 0)]
        assert c.getattr(1)
    assert "too short for fuse_in_header" in daemon.log_text()


def test_forget_on_hiprio_returns_chain_with_zero_length(daemon: Daemon) -> None:
    with daemon.frontend() as fe:
        fe.start()
        c = FuseClient(fe)
        c.init()
        (daemon.shared / "f").write_text("x")
        entry = c.lookup(1, b"f")
        mark = fe.ram.mark
        req = F.fuse_in_header.pack(48, Op.FUSE_FORGET, 0, entry[0], 0, 0, 0, 0, 0) + \
            F.fuse_forget_in.pack(1)
        gpa = fe.ram.alloc(len(req))
        fe.ram.write(gpa, req)
        head = fe.queues[0].add([(gpa, len(req))], [])
        fe.kick_queue(0)
        assert fe.wait_used(0) == [(head, 0)]
        fe.ram.reset_alloc(mark)


def test_reinit_without_destroy_drops_nodes(daemon: Daemon) -> None:
    with daemon.frontend() as fe:
        fe.start()
        c = FuseClient(fe)
        c.init()
        (daemon.shared / "f").write_text("x")
        nodeid = c.lookup(1, b"f")[0]
        assert c.getattr(nodeid)
        c.init()  # a guest reboot
        r = c.call(Op.FUSE_GETATTR, nodeid, F.fuse_getattr_in.pack(0, 0, 0))
        assert r.error < 0


def test_reconnect_after_disconnect(daemon: Daemon) -> None:
    for _ in range(3):
        with daemon.frontend() as fe:
            fe.start()
            c = FuseClient(fe)
            c.init()
            assert c.getattr(1)


def test_process_tree_and_sigterm(daemon: Daemon) -> None:
    kids = daemon.children()
    # One worker; no DAX window, so no coordinator (it would idle, costing memory).
    names = sorted(open(f"/proc/{k}/comm").read().strip() for k in kids)
    assert names == ["shardfs-w0"]
    assert daemon.stop() == 0
    for k in kids:
        assert not os.path.exists(f"/proc/{k}")


def test_dax_window_adds_the_coordinator(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "--dax-window", str(2 << 20), queues=2)
    try:
        kids = d.children()
        names = sorted(open(f"/proc/{k}/comm").read().strip() for k in kids)
        assert names == ["shardfs-coord", "shardfs-w0", "shardfs-w1"]
    finally:
        assert d.stop() == 0
    for k in kids:
        assert not os.path.exists(f"/proc/{k}")


def test_two_request_queues_two_workers(tmp_path: Path) -> None:
    d = Daemon(tmp_path, queues=2)
    try:
        kids = d.children()
        assert len(kids) == 2  # two workers (no DAX window, no coordinator)
        with d.frontend() as fe:
            fe.start()
            assert fe.get_u64(R.GET_QUEUE_NUM) == 3
            c1 = FuseClient(fe, queue=1)
            c2 = FuseClient(fe, queue=2)
            c1.init()
            c2.init()
            assert c1.getattr(1) and c2.getattr(1)
    finally:
        assert d.stop() == 0


def test_print_capabilities() -> None:
    out = subprocess.run([sys.executable, "-m", "shardfs", "--print-capabilities"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.stdout)["type"] == "fs"


def test_bad_config_names_the_field() -> None:
    out = subprocess.run([sys.executable, "-m", "shardfs", "--socket-path", "/tmp/x.sock",
                          "--shared-dir", "/tmp", "--num-request-queues", "0"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "num_request_queues" in lines[0]


def test_reset_device_stops_rings_and_keeps_memory(daemon: Daemon) -> None:
    with daemon.frontend() as fe:
        fe.start()
        c = FuseClient(fe)
        c.init()
        assert fe.ack(R.RESET_DEVICE) == 0
        # The rings restart without a new SET_MEM_TABLE, as after a guest reset.
        fe.negotiate()
        fe.queues.clear()
        fe.setup_queue(0)
        fe.setup_queue(1)
        c.init()
        assert c.getattr(1)
