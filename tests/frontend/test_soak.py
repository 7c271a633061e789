"""A bounded soak: mixed load on two request queues, then fds, RSS and processes are flat.

``SHARDFS_SOAK_ROUNDS`` scales it (each round is ~8 FUSE requests per queue);
the CI default is a bounded variant of the minutes-long soak an operator runs
with a larger value.
"""

from __future__ import annotations

import os
from pathlib import Path

import multiprocess

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.testing.frontend import FuseClient
from tests.frontend.conftest import Daemon

ROUNDS = int(os.environ.get("SHARDFS_SOAK_ROUNDS", "8000"))


def _profile(d: Daemon) -> tuple[int, dict[str, int], dict[str, int]]:
    procs = {"supervisor": d.proc.pid, **d.named_children()}
    fds = {n: len(os.listdir(f"/proc/{p}/fd")) for n, p in procs.items()}
    rss = {}
    for n, p in procs.items():
        with open(f"/proc/{p}/statm") as f:
            rss[n] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return len(procs), fds, rss


def _mixed(fe, queue: int, rounds: int, tag: str) -> int:  # type: ignore[no-untyped-def]
    c = FuseClient(fe, queue=queue)
    errors = 0
    for i in range(rounds):
        name = f"{tag}-{i % 50}".encode()
        e, fh = c.create(1, name, flags=os.O_RDWR | os.O_TRUNC)
        c.write(e[0], fh, 0, name * 64)
        if c.read(e[0], fh, 0, 4096) != name * 64:
            errors += 1
        c.release(e[0], fh)
        c.getattr(e[0])
        c.lookup(1, name)
        c.forget(e[0], 2, queue=queue)  # not hiprio: its ring has one driver, not two
        if i % 10 == 0:
            dfh = int(F.fuse_open_out.unpack(c.ok(Op.FUSE_OPENDIR, 1,
                                                  F.fuse_open_in.pack(os.O_RDONLY, 0)))[0])
            for nodeid, _name in c.readdirplus_entries(1, dfh, 0, 4096):
                if nodeid:
                    c.forget(nodeid, 1, queue=queue)
            c.ok(Op.FUSE_RELEASEDIR, 1, F.fuse_release_in.pack(dfh, 0, 0, 0))
        if i % 50 == 49:
            for k in range(50):
                c.unlink(1, f"{tag}-{k}".encode())
    return errors


def test_soak_is_flat(tmp_path: Path) -> None:
    d = Daemon(tmp_path, queues=2)
    try:
        fe = d.frontend(mem_size=64 << 20).start()
        FuseClient(fe).init()
        _mixed(fe, 1, 100, "warm1")
        _mixed(fe, 2, 100, "warm2")
        nproc0, fds0, rss0 = _profile(d)
        ctx = multiprocess.get_context("fork")
        results = ctx.SimpleQueue()

        def body(queue: int) -> None:
            # Each driver allocates request buffers from its own part of RAM.
            fe.ram.reset_alloc(queue * (16 << 20))
            try:
                errors = _mixed(fe, queue, ROUNDS, f"q{queue}")
            except Exception as e:
                errors = repr(e)  # type: ignore[assignment]
            q = fe.queues[queue]
            results.put((queue, errors, q.avail_idx, q.last_used, fe.unique))

        procs = [ctx.Process(target=body, args=(q,)) for q in (1, 2)]
        for p in procs:
            p.start()
        done = sorted(results.get() for _ in procs)
        for p in procs:
            p.join()
        assert [errors for _, errors, *_ in done] == [0, 0]
        for queue, _, avail_idx, last_used, unique in done:  # the drivers ran in children
            fe.queues[queue].avail_idx, fe.queues[queue].last_used = avail_idx, last_used
            fe.unique = max(fe.unique, unique)
        # A worker closes fds of nodes another worker freed at its next batch:
        # one request on each queue lets both catch up before we count.
        for q in (1, 2):
            FuseClient(fe, queue=q).getattr(1)
        nproc1, fds1, rss1 = _profile(d)
        assert nproc1 == nproc0
        assert fds1 == fds0, (fds0, fds1)
        for name in rss0:
            assert rss1[name] < rss0[name] + (16 << 20), (name, rss0[name], rss1[name])
        fe.close()
    finally:
        assert d.stop() == 0
