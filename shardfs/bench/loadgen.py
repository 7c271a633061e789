"""A load generator over the in-repo frontend: pre-built requests, one driver per queue.

The benchmarks measure the backend, so the frontend does as little as it can
per request, and never copies a payload:

* every chain (request bytes, WRITE payload, reply buffer, descriptors) is
  laid out once in guest RAM; a run only republishes heads and reaps the
  used ring, with ``struct`` on the shared mapping and no per-request bytes;
* it behaves as Linux's virtio driver does under EVENT_IDX: it kicks only
  when ``avail_event`` asks (virtio 1.2 §2.7.10) and asks for a call
  (``used_event``) only just before it sleeps, with a full barrier between
  the index it publishes and the event index it reads on both sides;
* each request queue is driven by its own forked process, as N guest vCPUs
  would drive N queues.

A workload is a list of *slots* (independent request sequences kept in
flight at once: the queue depth).  A slot cycles through *steps*; the chains
of one step are published together, and the next step goes out when all of
them are back.  ``advance`` may patch the next step's requests from the
replies (CREATE's fh into RELEASE, a READDIRPLUS cookie into the next one)
and decides when a cycle is complete; one complete cycle is one operation.
"""

from __future__ import annotations

import os
import select
import struct
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import multiprocess

from shardfs.abi import fuse as F
from shardfs.abi.virtio import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTQ_AVAIL_IDX,
    VIRTQ_AVAIL_RING,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    VIRTQ_USED_FLAGS,
    VIRTQ_USED_IDX,
    VIRTQ_USED_RING,
    virtq_desc,
    virtq_used_elem,
    vring_need_event,
)
from shardfs.testing.frontend import Frontend
from shardfs.virtq.split import full_barrier

_u16 = struct.Struct("<H")
_i32 = struct.Struct("<i")
#: Where fuse_in_header keeps nodeid, and where a request's arguments start.
IN_NODEID_OFFSET = 16
IN_ARGS_OFFSET = F.fuse_in_header.size
OUT_HDR = F.fuse_out_header.size


@dataclass(slots=True)
class Request:
    """One FUSE request to lay out.  ``payload`` readable bytes follow ``args``
    in their own descriptor (a WRITE's data, laid out once and never copied);
    ``reply_bytes`` is the writable buffer (0: none, as FORGET), given to the
    device as the out header plus one data descriptor when ``split_reply``."""

    opcode: int
    nodeid: int
    args: bytes
    reply_bytes: int
    payload: int = 0
    split_reply: bool = False


@dataclass(slots=True)
class Chain:
    head: int
    req_off: int  # offset in guest RAM of the request (header first)
    reply_off: int  # offset of the reply header, -1 without a reply


#: advance(ram view, slot's steps, slot, step done, used length of its last chain) ->
#: (next step, whether the slot completed a cycle: one operation).
Advance = Callable[[memoryview, list[list[Chain]], int, int, int], tuple[int, bool]]


@dataclass
class Plan:
    """Pre-built work for one request queue."""

    queue: int
    slots: list[list[list[Chain]]]
    advance: Advance | None = None
    descriptors: int = 0
    extra: dict[str, int] = field(default_factory=dict)


#: How requests are laid out in descriptors (``prebuild``'s ``layout``):
#: ``compact``: the header and arguments in one descriptor, a payload in one
#: more, the reply in one (a READ's data in its own); ``linux``: as Linux's
#: virtio-fs driver does (virtio_fs_enqueue_req), the in header, the
#: arguments, each 4 KiB page of a payload, the out header, the out
#: arguments and each page of READ data in descriptors of their own, all in
#: an indirect table.
LAYOUTS = ("compact", "linux")
PAGE = 4096


def _pages(gpa: int, n: int, flags: int) -> list[tuple[int, int, int]]:
    """One descriptor per 4 KiB page of ``[gpa, gpa + n)``, in descending address order:
    a guest's pages are rarely adjacent, so a backend must not find them mergeable."""
    count = -(-n // PAGE)
    return [(gpa + (count - 1 - k) * PAGE, min(PAGE, n - k * PAGE), flags)
            for k in range(count)]


def prebuild(fe: Frontend, queue: int, slots: list[list[list[Request]]],
             advance: Advance | None = None, layout: str = "compact") -> Plan:
    """Lay out every request of every slot on ``queue`` once."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    linux = layout == "linux"
    q = fe.queues[queue]
    ram = fe.ram
    out: list[list[list[Chain]]] = []
    used = 0
    unique = 0
    for steps in slots:
        built_steps = []
        for step in steps:
            built = []
            for r in step:
                unique += 2
                hdr = F.fuse_in_header.pack(F.fuse_in_header.size + len(r.args) + r.payload,
                                            r.opcode, unique, r.nodeid, 0, 0, 1, 0, 0)
                rgpa = ram.alloc(len(hdr) + len(r.args), 64)
                ram.write(rgpa, hdr + r.args)
                if linux:
                    bufs = [(rgpa, len(hdr), 0)]
                    if r.args:
                        bufs.append((rgpa + len(hdr), len(r.args), 0))
                else:
                    bufs = [(rgpa, len(hdr) + len(r.args), 0)]
                if r.payload:
                    pgpa = ram.alloc(r.payload, PAGE)
                    bufs += _pages(pgpa, r.payload, 0) if linux else [(pgpa, r.payload, 0)]
                wgpa = -1
                if r.reply_bytes:
                    wgpa = ram.alloc(r.reply_bytes, PAGE if r.split_reply else 64)
                    ram.write(wgpa, bytes(OUT_HDR))
                    rest = r.reply_bytes - OUT_HDR
                    w = VIRTQ_DESC_F_WRITE
                    if linux:
                        bufs.append((wgpa, OUT_HDR, w))
                        if rest:
                            bufs += (_pages(wgpa + OUT_HDR, rest, w) if r.split_reply
                                     else [(wgpa + OUT_HDR, rest, w)])
                    elif r.split_reply:
                        bufs += [(wgpa, OUT_HDR, w), (wgpa + OUT_HDR, rest, w)]
                    else:
                        bufs.append((wgpa, r.reply_bytes, w))
                if linux:  # one ring descriptor pointing at a table of them all
                    table = ram.alloc(virtq_desc.size * len(bufs), 16)
                    for k, (gpa, n, flags) in enumerate(bufs):
                        more = VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0
                        ram.write(table + k * virtq_desc.size,
                                  virtq_desc.pack(gpa, n, flags | more, k + 1 if more else 0))
                    bufs = [(table, virtq_desc.size * len(bufs), VIRTQ_DESC_F_INDIRECT)]
                if len(bufs) > len(q.free):
                    raise RuntimeError(f"queue {queue}: {fe.queue_size} descriptors are too few")
                ids = [q.free.pop(0) for _ in bufs]
                for k, (gpa, n, flags) in enumerate(bufs):
                    more = VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0
                    q.raw_desc(ids[k], gpa, n, flags | more, ids[k + 1] if more else 0)
                used += len(bufs)
                built.append(Chain(ids[0], rgpa - ram.base,
                                   wgpa - ram.base if wgpa >= 0 else -1))
            built_steps.append(built)
        out.append(built_steps)
    return Plan(queue, out, advance, used)


@dataclass
class DriveResult:
    queue: int
    seconds: float
    errors: int
    cpu_s: float
    kicks: int
    sleeps: int


def drive(fe: Frontend, plan: Plan, total: int, timeout_s: float = 120.0,
          coalesce: bool = True) -> DriveResult:
    """Keep every slot busy until ``total`` cycles complete; time it.

    With ``coalesce``, the driver asks to be called when half of what it has
    in flight is done (as Linux's virtqueue_enable_cb_delayed does) rather
    than at the first completion (virtqueue_enable_cb, what virtio-fs uses):
    fewer wake-ups of the frontend, whose CPU the backend shares here.
    """
    q = fe.queues[plan.queue]
    ram = fe.ram
    view = ram.view
    base = ram.base
    num = q.num
    mask = num - 1
    event_idx = bool(fe.features & (1 << VIRTIO_RING_F_EVENT_IDX))
    avail_ring = q.avail + VIRTQ_AVAIL_RING - base
    avail_idx_off = q.avail + VIRTQ_AVAIL_IDX - base
    used_event_off = q.avail + VIRTQ_AVAIL_RING + 2 * num - base
    used_flags_off = q.used + VIRTQ_USED_FLAGS - base
    used_idx_off = q.used + VIRTQ_USED_IDX - base
    used_ring = q.used + VIRTQ_USED_RING - base
    avail_event_off = q.used + VIRTQ_USED_RING + virtq_used_elem.size * num - base
    get16 = _u16.unpack_from
    # Index stores must be single 16-bit stores: struct.pack_into zero-fills its
    # target first, and the device polls these (see shardfs.virtq.split).
    ram16 = view.cast("H")
    get_used, get_i32 = virtq_used_elem.unpack_from, _i32.unpack_from
    kick_fd, call_fd = fe.kick[plan.queue], fe.call[plan.queue]
    poller = select.poll()
    poller.register(call_fd, select.POLLIN)
    advance = plan.advance
    slots = plan.slots
    where = {}
    for s, steps in enumerate(slots):
        for k, step in enumerate(steps):
            for c in step:
                where[c.head] = (s, k, c)
    left = [0] * len(slots)
    avail = q.avail_idx
    last_used = q.last_used
    errors = kicks = sleeps = 0

    def publish(chains: list[Chain]) -> None:
        nonlocal avail, kicks
        old = avail
        for c in chains:
            ram16[(avail_ring >> 1) + (avail & mask)] = c.head
            avail = (avail + 1) & 0xFFFF
        ram16[avail_idx_off >> 1] = avail
        full_barrier()
        if event_idx:
            if not vring_need_event(get16(view, avail_event_off)[0], avail, old):
                return
        elif get16(view, used_flags_off)[0] & VIRTQ_USED_F_NO_NOTIFY:
            return
        os.eventfd_write(kick_fd, 1)
        kicks += 1

    cpu0 = time.process_time()
    start = time.perf_counter()
    deadline = start + timeout_s
    started = min(total, len(slots))
    first: list[Chain] = []
    for s in range(started):
        first += slots[s][0]
        left[s] = len(slots[s][0])
    ram16[used_event_off >> 1] = last_used
    publish(first)
    done = 0
    while done < total:
        idx = get16(view, used_idx_off)[0]
        if idx == last_used:
            # Ask for a call once half of what is in flight has completed (at
            # the next completion when little is), then look once more (§2.7.10).
            wait_for = max(((avail - last_used) & 0xFFFF) // 2, 1) if coalesce else 1
            ram16[used_event_off >> 1] = (last_used + wait_for - 1) & 0xFFFF
            full_barrier()
            if get16(view, used_idx_off)[0] != last_used:
                continue
            if not poller.poll(1000):
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"queue {plan.queue}: no completion for "
                                       f"{timeout_s:.0f}s ({done}/{total})")
                continue
            sleeps += 1
            try:
                os.eventfd_read(call_fd)
            except BlockingIOError:
                pass
            continue
        nxt: list[Chain] = []
        while last_used != idx:
            head, length = get_used(view, used_ring + 8 * (last_used & mask))
            last_used = (last_used + 1) & 0xFFFF
            s, k, c = where[head]
            if c.reply_off >= 0 and get_i32(view, c.reply_off + 4)[0]:
                errors += 1
            left[s] -= 1
            if left[s]:
                continue
            steps = slots[s]
            if advance is not None:
                k2, complete = advance(view, steps, s, k, length)
            else:
                k2 = k + 1 if k + 1 < len(steps) else 0
                complete = k2 == 0
            if complete:
                done += 1
                if started >= total:
                    continue
                started += 1
            nxt += steps[k2]
            left[s] = len(steps[k2])
        if nxt:
            publish(nxt)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    q.avail_idx, q.last_used = avail, last_used
    return DriveResult(plan.queue, seconds, errors, cpu, kicks, sleeps)


def run_parallel(fe: Frontend, plans: list[Plan], total: int,
                 timeout_s: float = 300.0) -> list[DriveResult]:
    """Drive every plan's queue from its own process; results sorted by queue.

    A driver that fails or dies is reported as a RuntimeError (never a hang).
    """
    ctx = multiprocess.get_context("fork")
    conns = []
    procs = []
    for plan in plans:
        parent, child = ctx.Pipe(duplex=False)

        def body(plan: Plan = plan, child: object = child) -> None:
            try:
                res = drive(fe, plan, total)
                q = fe.queues[plan.queue]
                child.send(("ok", res, q.avail_idx, q.last_used))  # type: ignore[attr-defined]
            except BaseException:
                child.send(("error", traceback.format_exc(), 0, 0))  # type: ignore[attr-defined]

        p = ctx.Process(target=body)
        p.start()
        child.close()
        conns.append(parent)
        procs.append(p)
    out = []
    deadline = time.monotonic() + timeout_s
    failure = None
    for plan, conn, p in zip(plans, conns, procs, strict=True):
        while not conn.poll(0.2):
            if not p.is_alive() and not conn.poll(0):
                failure = failure or f"driver of queue {plan.queue} died ({p.exitcode})"
                break
            if time.monotonic() > deadline:
                failure = failure or f"driver of queue {plan.queue} timed out"
                p.kill()
                break
        else:
            status, res, avail_idx, last_used = conn.recv()
            if status != "ok":
                failure = failure or f"driver of queue {plan.queue} failed:\n{res}"
                continue
            # The driver ran in a child: carry its ring position back.
            fe.queues[plan.queue].avail_idx = avail_idx
            fe.queues[plan.queue].last_used = last_used
            out.append(res)
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
    for conn in conns:
        conn.close()
    if failure:
        raise RuntimeError(failure)
    return sorted(out, key=lambda r: r.queue)
