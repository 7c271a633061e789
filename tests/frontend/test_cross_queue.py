"""Node and handle identity across request queues (DESIGN §2).

Two request queues mean two worker processes; a nodeid or fh answered on one
queue must work on the other, FORGET on hiprio must count against lookups
made anywhere, and nothing may stay open once the guest lets go.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.testing.frontend import Frontend, FuseClient
from tests.frontend.conftest import Daemon


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Daemon, Frontend, FuseClient, FuseClient]]:
    d = Daemon(tmp_path, queues=2)
    fe = d.frontend().start()
    q1, q2 = FuseClient(fe, queue=1), FuseClient(fe, queue=2)
    q1.init()
    yield d, fe, q1, q2
    fe.close()
    assert d.stop() == 0
    assert "Traceback" not in d.log_path.read_text()


def _worker_fds(d: Daemon) -> dict[str, int]:
    return {n: len(os.listdir(f"/proc/{p}/fd")) for n, p in d.named_children().items()
            if n.startswith("shardfs-w")}


def _getattr(c: FuseClient, nodeid: int) -> int:
    return c.call(Op.FUSE_GETATTR, nodeid, F.fuse_getattr_in.pack(0, 0, 0)).error


def test_nodeid_from_one_queue_works_on_the_other(two: tuple) -> None:
    d, fe, q1, q2 = two
    (d.shared / "dir").mkdir()
    (d.shared / "dir" / "f").write_bytes(b"data")
    dnode = q1.lookup(1, b"dir")[0]
    fnode = q2.lookup(dnode, b"f")[0]  # a parent from worker 0 used by worker 1
    assert q1.getattr(fnode)[3 + 1] == 4  # size, seen by worker 0
    assert q1.lookup(dnode, b"f")[0] == fnode  # one inode, one nodeid everywhere


def test_fh_from_one_queue_works_on_the_other(two: tuple) -> None:
    d, fe, q1, q2 = two
    entry, fh = q1.create(1, b"f")
    assert q2.write(entry[0], fh, 0, b"written on queue 2") == 18
    assert q1.read(entry[0], fh, 0, 100) == b"written on queue 2"
    q2.release(entry[0], fh)
    r = q1.call(Op.FUSE_READ, entry[0], F.fuse_read_in.pack(fh, 0, 10, 0, 0, 0, 0))
    assert r.error == -errno.EBADF
    assert (d.shared / "f").read_bytes() == b"written on queue 2"


def test_dir_handle_across_queues(two: tuple) -> None:
    d, fe, q1, q2 = two
    for i in range(20):
        (d.shared / f"e{i}").touch()
    fh = int(F.fuse_open_out.unpack(q1.ok(Op.FUSE_OPENDIR, 1,
                                          F.fuse_open_in.pack(os.O_RDONLY, 0)))[0])
    first = q1.readdir(1, fh, 0, size=256)
    rest = []
    off = first[-1][1]
    while batch := q2.readdir(1, fh, off, size=256):
        rest += batch
        off = batch[-1][1]
    names = {n for *_, n in first + rest}
    assert names == {b".", b".."} | {f"e{i}".encode() for i in range(20)}


def test_lookup_counts_are_exact_across_queues_and_hiprio(two: tuple) -> None:
    d, fe, q1, q2 = two
    (d.shared / "f").touch()
    ids = {q1.lookup(1, b"f")[0] for _ in range(3)} | {q2.lookup(1, b"f")[0] for _ in range(2)}
    (nodeid,) = ids
    q1.forget(nodeid, 4)  # hiprio: worker 0
    assert _getattr(q2, nodeid) == 0
    q1.forget(nodeid, 1)
    assert _getattr(q2, nodeid) == -errno.ENOENT
    assert _getattr(q1, nodeid) == -errno.ENOENT
    # A new lookup gets a new nodeid: the old one stays dead.
    assert q2.lookup(1, b"f")[0] != nodeid


def test_forget_through_hiprio_closes_fds_in_every_worker(two: tuple) -> None:
    d, fe, q1, q2 = two
    for i in range(30):
        (d.shared / f"f{i}").write_bytes(b"x")
    assert q2.getattr(1) and q1.getattr(1)
    before = _worker_fds(d)
    nodes = []
    for i in range(30):
        nodes.append(q1.lookup(1, f"f{i}".encode())[0])
        assert _getattr(q2, nodes[-1]) == 0  # worker 1 opens it by file handle
        _, fh = q2.create(1, f"g{i}".encode())
        nodes.append(_[0])
        q1.release(nodes[-1], fh)  # released on the other queue
    grown = _worker_fds(d)
    assert all(grown[k] > before[k] for k in before)
    for n in nodes:
        q1.forget(n, 1)
    # One request on each queue lets each worker catch up with the frees.
    assert q1.getattr(1) and q2.getattr(1)
    assert _worker_fds(d) == before


def test_forged_and_stale_ids_on_every_queue(two: tuple) -> None:
    d, fe, q1, q2 = two
    (d.shared / "f").touch()
    nodeid = q1.lookup(1, b"f")[0]
    forged = [nodeid + 1, nodeid ^ (1 << 32), 0, (1 << 64) - 1, 1 << 31]
    for c in (q1, q2):
        for n in forged:
            assert _getattr(c, n) == -errno.ENOENT, hex(n)
        for fh in (0, 1, 1 << 32 | 1, (1 << 64) - 1):
            r = c.call(Op.FUSE_READ, nodeid, F.fuse_read_in.pack(fh, 0, 10, 0, 0, 0, 0))
            assert r.error == -errno.EBADF


def test_reinit_on_one_queue_resets_all(two: tuple) -> None:
    d, fe, q1, q2 = two
    (d.shared / "f").touch()
    nodeid = q2.lookup(1, b"f")[0]
    q1.init()  # a guest reboot: INIT arrives on one queue only
    assert _getattr(q2, nodeid) == -errno.ENOENT


def test_reinit_on_another_queue_than_the_first_resets_all(two: tuple) -> None:
    """The guest picks a queue by CPU: a reboot's INIT may reach a worker that never
    saw the first one, and must still drop the old session everywhere."""
    d, fe, q1, q2 = two
    (d.shared / "f").touch()
    nodeid = q1.lookup(1, b"f")[0]
    q2.init()  # the first INIT went to q1 (the fixture)
    assert "INIT again without DESTROY" in d.log_text()
    assert _getattr(q1, nodeid) == -errno.ENOENT


@pytest.fixture
def submounted(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted at shared/sub, with a file and a subdirectory in it."""
    sub = tmp_path / "shared" / "sub"
    sub.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "shardfs-test", str(sub)],
                   check=True)
    try:
        (sub / "f").write_bytes(b"on the submount")
        (sub / "d").mkdir()
        yield sub
    finally:
        subprocess.run(["umount", "-l", str(sub)], check=True)


@pytest.mark.parametrize("sandbox", ["namespace", "none"])
def test_submount_nodes_work_on_every_queue(tmp_path: Path, submounted: Path,
                                            sandbox: str) -> None:
    """A node on a filesystem mounted under the share, looked up on one queue,
    is served on the other: each worker opens it by handle through the fd on
    that mount it took at its start (fs/passthrough/mounts.py)."""
    d = Daemon(tmp_path, "--sandbox", sandbox, queues=2)
    fe = d.frontend().start()
    try:
        q1, q2 = FuseClient(fe, queue=1), FuseClient(fe, queue=2)
        q1.init()
        assert q1.getattr(1) and q2.getattr(1)
        before = _worker_fds(d)
        sub = q1.lookup(1, b"sub")[0]
        assert q2.getattr(sub)[3] == os.stat(submounted).st_ino  # the mount's root
        f = q2.lookup(sub, b"f")[0]  # a parent from worker 0, used by worker 1
        assert q1.getattr(f)[3] == os.stat(submounted / "f").st_ino
        entry, fh = q1.create(sub, b"new")
        assert q2.write(entry[0], fh, 0, b"written on queue 2") == 18
        assert q1.read(entry[0], fh, 0, 100) == b"written on queue 2"
        q2.release(entry[0], fh)
        assert (submounted / "new").read_bytes() == b"written on queue 2"
        dnode = q2.lookup(sub, b"d")[0]
        assert q1.getattr(dnode)[3] == os.stat(submounted / "d").st_ino
        for n in (f, entry[0], dnode, sub):
            q1.forget(n, 1)
        # Everything a worker opened on the submount is closed again.
        assert q1.getattr(1) and q2.getattr(1)
        assert _worker_fds(d) == before
    finally:
        fe.close()
    assert d.stop() == 0
    assert "Traceback" not in d.log_path.read_text()
