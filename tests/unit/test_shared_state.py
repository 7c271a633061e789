"""The shared arena behind node and handle identity (fs/passthrough/shared.py)."""

from __future__ import annotations

import os
import random
import signal
import struct
from pathlib import Path

import pytest

from shardfs.fs.api import FsError
from shardfs.fs.passthrough.shared import (
    LOG_ENTRIES,
    SharedHandleTable,
    SharedNodeTable,
    SharedState,
    split_id,
)


@pytest.mark.parametrize("base", [0, 2040])  # 2040: runs wrap past the index end
def test_index_survives_random_insert_and_delete(base: int) -> None:
    s = SharedState(512, 16)
    # Force long collision runs: every key hashes to one of 8 homes.
    s._home = lambda dev, ino: (base + dev * 2 + ino // 1024) & (s.index_size - 1)  # type: ignore[method-assign]
    model: dict[tuple[int, int], int] = {}
    rng = random.Random(7)
    free = list(range(2, 500))
    for _ in range(5000):
        if model and rng.random() < 0.45:
            key = rng.choice(list(model))
            slot = model.pop(key)
            s.index_remove(*key, slot)
            free.append(slot)
        elif len(model) < 400:
            # Keys collide on purpose: few distinct homes in a 1024-entry index.
            key = (rng.randrange(4), rng.randrange(64) * 1024)
            if key in model:
                continue
            slot = free.pop(rng.randrange(len(free)))
            struct.pack_into("<QQ", s.mem, s.node_off(slot) + 16, *key)
            s.index_add(*key, slot)
            model[key] = slot
        for key, sl in list(model.items())[:5]:
            assert s.index_find(*key) == sl
    for key, sl in model.items():
        assert s.index_find(*key) == sl


def _open(p: Path) -> tuple[int, os.stat_result]:
    fd = os.open(p, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    return fd, os.stat(fd)


def test_two_tables_share_identity_and_counts(tmp_path: Path) -> None:
    s = SharedState(64, 16)
    a = SharedNodeTable(s, os.open(tmp_path, os.O_PATH), worker=0)
    b = SharedNodeTable(s, os.open(tmp_path, os.O_PATH), worker=1)
    (tmp_path / "f").write_text("x")
    n1 = a.insert(*_open(tmp_path / "f"))
    n2 = b.insert(*_open(tmp_path / "f"))
    assert n1.nodeid == n2.nodeid and a.nlookup(n1.nodeid) == 2
    assert os.path.samestat(os.stat(b.get(n1.nodeid).fd), os.stat(tmp_path / "f"))
    a.forget(n1.nodeid, 1)
    assert b.nlookup(n1.nodeid) == 1
    b.forget(n1.nodeid, 1 << 63)  # huge counts clamp
    with pytest.raises(FsError):
        a.get(n1.nodeid)
    b.sync()
    assert not b._cache and not a._cache
    a.close()
    b.close()


def test_log_overflow_falls_back_to_a_full_sweep(tmp_path: Path) -> None:
    s = SharedState(LOG_ENTRIES * 2, 16)
    a = SharedNodeTable(s, os.open(tmp_path, os.O_PATH), worker=0)
    b = SharedNodeTable(s, os.open(tmp_path, os.O_PATH), worker=1)
    (tmp_path / "keep").touch()
    keep = a.insert(*_open(tmp_path / "keep"))
    b.get(keep.nodeid)
    (tmp_path / "f").touch()
    for _ in range(LOG_ENTRIES + 10):  # more frees than the log holds
        n = a.insert(*_open(tmp_path / "f"))
        a.forget(n.nodeid, 1)
    b.sync()
    assert list(b._cache) == [split_id(keep.nodeid)[0]]
    a.close()
    b.close()


def test_handles_reopen_in_another_table(tmp_path: Path) -> None:
    s = SharedState(16, 16)
    a = SharedNodeTable(s, os.open(tmp_path, os.O_PATH), worker=0)
    b = SharedNodeTable(s, os.open(tmp_path, os.O_PATH), worker=1)
    reopened = []

    def reopen(node: object, flags: int, is_dir: bool) -> int:
        reopened.append(flags)
        return os.open(tmp_path / "f", flags)

    ha = SharedHandleTable(s, a, reopen)
    hb = SharedHandleTable(s, b, reopen)
    (tmp_path / "f").write_text("abc")
    node = a.insert(*_open(tmp_path / "f"))
    h = ha.add(os.open(tmp_path / "f", os.O_RDWR | os.O_TRUNC), node.nodeid, is_dir=False,
               flags=os.O_RDWR | os.O_TRUNC)
    other = hb.get(h.fh)
    assert reopened == [os.O_RDWR]  # O_TRUNC is not applied twice
    assert other.fd != h.fd
    hb.close(h.fh)
    with pytest.raises(FsError):
        ha.get(h.fh)
    assert not ha._cache and not hb._cache
    for t in (a, b):
        t.close()


def test_robust_mutex_recovers_from_a_holder_killed(tmp_path: Path) -> None:
    s = SharedState(16, 16)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child takes the lock and dies holding it
        s.lock.__enter__()
        os.write(w, b"x")
        os.kill(os.getpid(), signal.SIGKILL)
    os.read(r, 1)
    os.waitpid(pid, 0)
    with s.lock:
        pass
    assert s.lock.recovered == 1
    os.close(r)
    os.close(w)


def test_a_node_freed_elsewhere_keeps_its_fd_until_the_request_ends(tmp_path: Path) -> None:
    """Worker b holds node f for a request when worker a frees it (a hostile
    guest's FORGET on hiprio).  b's next get() in the same request evicts f,
    but f's fd stays open (and its number unused) until b reaps between
    requests; otherwise the next fd b opens could take f's number and the
    request would act on the wrong file."""
    s = SharedState(64, 16)
    a = SharedNodeTable(s, os.open(tmp_path, os.O_PATH), worker=0)
    b = SharedNodeTable(s, os.open(tmp_path, os.O_PATH), worker=1)
    (tmp_path / "f").write_text("x")
    (tmp_path / "g").write_text("y")
    f = a.insert(*_open(tmp_path / "f"))
    g = a.insert(*_open(tmp_path / "g"))
    held = b.get(f.nodeid)  # b opens f by file handle: its own fd
    a.forget(f.nodeid, 1)
    other = b.get(g.nodeid)  # syncs: f is evicted from b's cache...
    assert split_id(f.nodeid)[0] not in b._cache
    assert other.fd != held.fd
    assert os.path.samestat(os.fstat(held.fd), os.stat(tmp_path / "f"))  # ...but still open
    assert b.graveyard == [held.fd]
    b.reap()
    assert b.graveyard == []
    with pytest.raises(OSError):
        os.fstat(held.fd)
    a.close()
    b.close()


def test_a_live_node_never_reads_as_free_while_its_count_changes(tmp_path: Path) -> None:
    """Another worker reads (gen, state) without the lock while lookups on
    this one change the count.  The count is one 8-byte store: with
    struct.pack_into of the whole head (which zero-fills first) about 7% of
    such reads saw the node FREE, an ENOENT for a live nodeid.  Bounded by
    iterations, not time: it cannot fail when the stores are right."""
    s = SharedState(64, 16)
    t = SharedNodeTable(s, os.open(tmp_path, os.O_PATH), worker=0)
    (tmp_path / "f").write_text("x")
    node = t.insert(*_open(tmp_path / "f"))
    slot, gen = split_id(node.nodeid)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other worker: lookups and forgets of the same inode
        try:
            os.read(r, 1)
            for _ in range(200_000):
                t.bump(node.nodeid)
                t.forget(node.nodeid, 1)
        finally:
            os._exit(0)
    os.write(w, b"x")
    torn = 0
    for _ in range(400_000):
        g, state, _n = s.node_head(slot)
        torn += g != gen or state != 1
    os.waitpid(pid, 0)
    os.close(r)
    os.close(w)
    assert torn == 0
    assert t.nlookup(node.nodeid) == 1
    t.close()


def test_count_cached_counts_only_nodes_this_worker_holds(tmp_path: Path) -> None:
    """LOOKUP of a known name: counted on the cached node, no fd; anything else is None."""
    s = SharedState(64, 16)
    a = SharedNodeTable(s, os.open(tmp_path, os.O_PATH), worker=0)
    b = SharedNodeTable(s, os.open(tmp_path, os.O_PATH), worker=1)
    (tmp_path / "f").write_text("x")
    st = os.stat(tmp_path / "f")
    assert a.count_cached(st.st_dev, st.st_ino) is None  # not a node yet
    node = a.insert(*_open(tmp_path / "f"))
    got = a.count_cached(st.st_dev, st.st_ino)
    assert got is node and a.nlookup(node.nodeid) == 2
    # Worker b holds no fd for it: None, and the count is untouched.
    assert b.count_cached(st.st_dev, st.st_ino) is None and a.nlookup(node.nodeid) == 2
    # The root is counted like any node.
    root = os.stat(tmp_path)
    assert a.count_cached(root.st_dev, root.st_ino) is a.root
    # Freed (by b) and its slot reused: the stale cache entry never answers.
    b.forget(node.nodeid, 2)
    assert a.count_cached(st.st_dev, st.st_ino) is None
    (tmp_path / "g").write_text("y")
    fresh = b.insert(*_open(tmp_path / "g"))
    assert split_id(fresh.nodeid)[0] == split_id(node.nodeid)[0]  # the same slot
    g = os.stat(tmp_path / "g")
    assert a.count_cached(g.st_dev, g.st_ino) is None  # a's cache has the old gen
    assert b.count_cached(g.st_dev, g.st_ino) is fresh and b.nlookup(fresh.nodeid) == 2
    a.close()
    b.close()
