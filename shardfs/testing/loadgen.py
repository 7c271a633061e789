"""A load generator over the in-repo frontend: pre-built requests, one driver per queue.

The benchmarks measure the backend, so the frontend does as little as it can
per request: every chain (request bytes, reply buffer, descriptors) is laid
out once in guest RAM, and a run only republishes heads, kicks and reaps the
used ring.  Each request queue is driven by its own forked process, so N
queues are loaded in parallel as N guest vCPUs would.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass

import multiprocess

from shardfs.abi import fuse as F
from shardfs.testing.frontend import Frontend


@dataclass
class Prebuilt:
    head: int
    reply_gpa: int


def prebuild(fe: Frontend, queue: int, depth: int, make: Callable[[int], tuple[int, int, bytes]],
             reply_size: int) -> list[Prebuilt]:
    """Lay out ``depth`` chains on ``queue``; ``make(i)`` gives (opcode, nodeid, args)."""
    q = fe.queues[queue]
    out = []
    for i in range(depth):
        opcode, nodeid, args = make(i)
        req = F.fuse_in_header.pack(F.fuse_in_header.size + len(args), opcode, 2 * i + 2, nodeid,
                                    0, 0, 1, 0, 0) + args
        rgpa = fe.ram.alloc(len(req))
        fe.ram.write(rgpa, req)
        wgpa = fe.ram.alloc(reply_size, 64)
        ids = [q.free.pop(0), q.free.pop(0)]
        q.raw_desc(ids[0], rgpa, len(req), 1, ids[1])  # VIRTQ_DESC_F_NEXT
        q.raw_desc(ids[1], wgpa, reply_size, 2, 0)  # VIRTQ_DESC_F_WRITE
        out.append(Prebuilt(ids[0], wgpa))
    return out


def drive(fe: Frontend, queue: int, chains: list[Prebuilt], total: int) -> tuple[float, int]:
    """Keep every chain in flight until ``total`` completions; return (seconds, errors)."""
    q = fe.queues[queue]
    kick, call = fe.kick[queue], fe.call[queue]
    poller = select.poll()
    poller.register(call, select.POLLIN)
    by_head = {c.head: c for c in chains}
    errors = 0
    done = 0
    inflight = len(chains)
    start = time.perf_counter()
    for c in chains:
        q.publish(c.head)
    os.eventfd_write(kick, 1)
    while done < total:
        used = q.pop_used_raw()
        if not used:
            poller.poll(10_000)
            try:
                os.eventfd_read(call)
            except BlockingIOError:
                pass
            continue
        for head, _length in used:
            done += 1
            inflight -= 1
            if fe.ram.view[by_head[head].reply_gpa + 4] != 0:  # fuse_out_header.error != 0
                errors += 1
            if done + inflight < total:
                q.publish(head)
                inflight += 1
        os.eventfd_write(kick, 1)
    return time.perf_counter() - start, errors


def run_parallel(fe: Frontend, plans: dict[int, list[Prebuilt]], total: int) -> list[tuple]:
    """Drive every queue in ``plans`` from its own process; [(queue, seconds, errors)]."""
    ctx = multiprocess.get_context("fork")
    results = ctx.SimpleQueue()

    def body(queue: int) -> None:
        secs, errors = drive(fe, queue, plans[queue], total)
        q = fe.queues[queue]
        results.put((queue, secs, errors, q.avail_idx, q.last_used))

    procs = [ctx.Process(target=body, args=(qi,)) for qi in plans]
    for p in procs:
        p.start()
    out = [results.get() for _ in procs]
    for p in procs:
        p.join()
    # The drivers ran in children: carry their ring positions back.
    for queue, _secs, _errors, avail_idx, last_used in out:
        fe.queues[queue].avail_idx = avail_idx
        fe.queues[queue].last_used = last_used
    return sorted((queue, secs, errors) for queue, secs, errors, _, _ in out)
