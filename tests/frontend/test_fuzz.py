"""Bounded fuzzing of the real daemon through the in-repo frontend.

Three classes, each seeded (reproducible) and bounded by a case count so it
runs in CI: mutated FUSE requests, hostile descriptor chains, and random
vhost-user message sequences.  Afterwards the daemon still answers a normal
request, its processes' fd counts are back to baseline, and nothing logged a
traceback (the fixture checks that).
"""

from __future__ import annotations

import os
import random
import socket
import struct

from shardfs.abi import fuse as F
from shardfs.abi import vhost_user as vu
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.abi.virtio import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from shardfs.testing.frontend import Frontend, FuseClient
from tests.frontend.conftest import Daemon

FUSE_CASES = 12000
CHAIN_CASES = 3000
VHOST_SESSIONS = 1000
SEED = int(os.environ.get("SHARDFS_FUZZ_SEED", "20261124"))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _tree_fds(d: Daemon) -> dict[str, int]:
    out = {"supervisor": _fds(d.proc.pid)}
    out.update({n: _fds(p) for n, p in d.named_children().items()})
    return out


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _random_args(rng: random.Random, opcode: int, names: list[bytes]) -> bytes:
    """Plausible-but-hostile op arguments: right-sized structs with wild values,
    truncated structs, unterminated or path-like names, random bytes."""
    choice = rng.random()
    if choice < 0.15:
        return rng.randbytes(rng.randrange(0, 64))
    words = struct.pack("<8Q", *(rng.choice([0, 1, 2, 3, 4096, 1 << 20, (1 << 63) - 1,
                                             (1 << 64) - 1, rng.getrandbits(64)])
                                 for _ in range(8)))
    size = rng.choice([0, 4, 8, 16, 24, 32, 40, 48, 64])
    name = rng.choice(names + [b"", b".", b"..", b"../x", b"/etc", b"a/b", b"x" * 300])
    tail = name + (b"\0" if rng.random() < 0.85 else b"")
    if rng.random() < 0.3:
        tail += rng.choice(names) + b"\0"
    if opcode in (Op.FUSE_WRITE, Op.FUSE_SETXATTR) and rng.random() < 0.5:
        tail += rng.randbytes(rng.randrange(0, 5000))
    return words[:size] + (tail if rng.random() < 0.8 else b"")


def test_fuse_request_fuzz(daemon: Daemon) -> None:
    rng = random.Random(SEED)
    fe = daemon.frontend(mem_size=32 << 20).start()
    c = FuseClient(fe)
    c.init()
    (daemon.shared / "file").write_bytes(b"0123456789" * 100)
    (daemon.shared / "dir").mkdir()
    base_fds = _tree_fds(daemon)
    base_rss = _rss(daemon.child("shardfs-w0"))
    names = [b"file", b"dir", b"new", b"n2", b"link"]
    nodeids = [1, 2, 3, 4, 5, 1 << 32 | 2, (1 << 64) - 1, 0]
    opcodes = [int(o) for o in Op if o not in (Op.FUSE_INIT, Op.FUSE_DESTROY)] + [0, 7, 19, 99,
                                                                                   4096]
    answered = dropped = 0
    for _ in range(FUSE_CASES):
        opcode = rng.choice(opcodes)
        args = _random_args(rng, opcode, names)
        nodeid = rng.choice(nodeids)
        reply_size = rng.choice([0, 8, 16, 100, 200, 4096, 70000])
        split = rng.choice([None, None, 1, 3, 17, 40])
        if split and (40 + len(args)) // split > 200:  # keep within the ring
            split = None
        queue = 0 if opcode in (Op.FUSE_FORGET, Op.FUSE_BATCH_FORGET) and rng.random() < 0.5 \
            else 1
        r = fe.fuse_request(opcode, nodeid, args, queue=queue, reply_size=reply_size,
                            split=split, check=False)
        if r is None:
            dropped += 1
        else:
            answered += 1
            assert r.error <= 0
        if rng.random() < 0.02:
            # Learn real nodeids so later cases reach real nodes too.
            got = c.call(Op.FUSE_LOOKUP, 1, rng.choice(names) + b"\0")
            if got.error == 0:
                nodeids.append(F.fuse_entry_out.unpack_from(got.data)[0])
    assert answered > FUSE_CASES // 2
    assert c.getattr(1)  # still serving
    c.ok(Op.FUSE_DESTROY)  # drop every node and handle the fuzz created
    c.init()
    assert _tree_fds(daemon) == base_fds
    worker = daemon.child("shardfs-w0")
    assert _rss(worker) < base_rss + (64 << 20)
    fe.close()


def test_descriptor_chain_fuzz(daemon: Daemon) -> None:
    rng = random.Random(SEED + 1)
    fe = daemon.frontend(mem_size=16 << 20).start()
    c = FuseClient(fe)
    c.init()
    base_fds = _tree_fds(daemon)
    q = fe.queues[1]
    ram = fe.ram
    good = F.fuse_in_header.pack(56, Op.FUSE_GETATTR, 7, 1, 0, 0, 0, 0, 0) + \
        F.fuse_getattr_in.pack(0, 0, 0)
    req_gpa = ram.alloc(len(good))
    ram.write(req_gpa, good)
    reply_gpa = ram.alloc(4096)
    mark = ram.mark
    for _ in range(CHAIN_CASES):
        ram.reset_alloc(mark)
        n = rng.randrange(1, 6)
        ids = rng.sample(range(q.num), n)
        for k, i in enumerate(ids):
            kind = rng.random()
            addr = rng.choice([req_gpa, reply_gpa, ram.size - 8, ram.size + 4096, 1 << 40,
                               (1 << 64) - 16, 0])
            length = rng.choice([0, 1, 16, 40, 56, 4096, 1 << 20, (1 << 32) - 1])
            flags = 0
            if k + 1 < n or rng.random() < 0.2:
                flags |= VIRTQ_DESC_F_NEXT
            if kind < 0.3:
                flags |= VIRTQ_DESC_F_WRITE
            if kind > 0.85:
                flags |= VIRTQ_DESC_F_INDIRECT
                if rng.random() < 0.5:  # a table that points at itself or nests
                    table = ram.alloc(64)
                    for t in range(4):
                        ram.write(table + 16 * t, struct.pack(
                            "<QIHH", rng.choice([table, req_gpa]), rng.choice([16, 64, 56]),
                            rng.choice([VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                        VIRTQ_DESC_F_WRITE]), rng.randrange(8)))
                    addr, length = table, rng.choice([64, 60, 0, 1 << 20])
            nxt = ids[k + 1] if k + 1 < n else rng.randrange(q.num)
            q.raw_desc(i, addr, length, flags, nxt)
        q.publish(ids[0])
        fe.kick_queue(1)
        (head, length), = fe.wait_used(1)
        assert head == ids[0]
        assert length in (0, 16, 16 + F.fuse_attr_out.size)
    assert c.getattr(1)
    assert _tree_fds(daemon) == base_fds
    fe.close()


VHOST_REQUESTS = [int(r) for r in vu.FrontendReq] + [0, 45, 60, 255, 1 << 20]


def test_vhost_user_message_fuzz(daemon: Daemon) -> None:
    rng = random.Random(SEED + 2)
    base_fds = _tree_fds(daemon)
    for _ in range(VHOST_SESSIONS):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(daemon.socket)
        s.setblocking(False)
        owned = []
        try:
            for _ in range(rng.randrange(1, 25)):
                request = rng.choice(VHOST_REQUESTS)
                flags = rng.choice([1, 1, 1, 5, 9, 0, 2, 0xFFFFFFFF])
                size = rng.choice([0, 4, 8, 12, 16, 40, 48, 300, 4096, 5000])
                payload = rng.randbytes(min(size, 300))
                if rng.random() < 0.5 and payload[:8]:
                    # Small indices and sizes reach deeper into the handlers.
                    payload = struct.pack("<II", rng.randrange(4), rng.choice([0, 1, 256, 300])) \
                        + payload[8:]
                hdr = vu.vhost_user_header.pack(request, flags, size)
                nfds = rng.choice([0, 0, 0, 1, 2, 8, 9])
                fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
                owned += fds
                try:
                    if fds:
                        socket.send_fds(s, [hdr + payload], fds)
                    else:
                        s.sendall(hdr + payload)
                except (BlockingIOError, BrokenPipeError, ConnectionResetError, OSError):
                    break
        finally:
            s.close()
            for fd in owned:
                os.close(fd)
    # The daemon still serves a well-behaved frontend, and let go of everything.
    with Frontend(daemon.socket, num_queues=2) as fe:
        fe.start()
        c = FuseClient(fe)
        c.init()
        assert c.getattr(1)
    final = _wait_settled(daemon, base_fds)
    assert final == base_fds


def _wait_settled(daemon: Daemon, base: dict[str, int]) -> dict[str, int]:
    """fd counts once the supervisor has processed the last disconnect.

    Status requests are answered from the supervisor's loop, before the
    other events of the same wake-up; after two round trips, every earlier
    connection's close has been handled.
    """
    for _ in range(2):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(daemon.socket + ".stats")
            s.sendall(b"json\n")
            while s.recv(65536):
                pass
    return _tree_fds(daemon)
