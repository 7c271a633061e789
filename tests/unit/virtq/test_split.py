"""SplitQueue against a guest-side driver: ring state, wrap, notifications (§2.7)."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator

import pytest

from shardfs.abi.virtio import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_AVAIL_IDX,
    VIRTQ_USED_F_NO_NOTIFY,
    VIRTQ_USED_FLAGS,
    VIRTQ_USED_IDX,
    vring_need_event,
)
from shardfs.virtq.chain import ChainReader, DescriptorChain
from shardfs.virtq.split import QueueError, SplitQueue, full_barrier
from tests.unit.support import RAM_BASE, Rig

u16 = struct.Struct("<H")
NUM = 8


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig(num=NUM) as r:
        yield r


@pytest.fixture
def ev_rig() -> Iterator[Rig]:
    with Rig(num=NUM, event_idx=True) as r:
        yield r


def reconfigure(rig: Rig, *, base: int = 0, used_idx: int | None = None) -> None:
    """Restart the ring as after GET/SET_VRING_BASE, with the driver in step."""
    if used_idx is not None:
        rig.ram.write(rig.drv.used + VIRTQ_USED_IDX, u16.pack(used_idx))
        rig.drv.last_used = used_idx
    rig.drv.avail_idx = base & 0xFFFF
    rig.ram.write(rig.drv.avail + VIRTQ_AVAIL_IDX, u16.pack(base & 0xFFFF))
    rig.queue.configure(rig.num, rig.drv.desc, rig.drv.avail, rig.drv.used, base,
                        rig.event_idx, rig.indirect, rig.mem)


def used_flags(rig: Rig) -> int:
    return u16.unpack(rig.ram.read(rig.drv.used + VIRTQ_USED_FLAGS, 2))[0]


def set_avail_flags(rig: Rig, flags: int) -> None:
    rig.ram.write(rig.drv.avail, u16.pack(flags))


# -- pop and push -------------------------------------------------------------------


def test_empty_ring_pops_none(rig: Rig) -> None:
    assert rig.queue.pending() == 0
    assert rig.queue.pop(rig.mem) is None


def test_pop_push_round_trip(rig: Rig) -> None:
    heads = [rig.publish(f"req{i}".encode(), 8)[0] for i in range(3)]
    assert rig.queue.pending() == 3
    for i, head in enumerate(heads):
        chain = rig.queue.pop(rig.mem)
        assert isinstance(chain, DescriptorChain) and chain.head == head
        r = ChainReader(chain.readable, chain.readable_len)
        assert r.read_bytes(chain.readable_len) == f"req{i}".encode()
        assert chain.writable_len == 8
        chain.writable[0][:2] = b"ok"
        rig.queue.push(head, 2 + i)
    assert rig.queue.pop(rig.mem) is None
    assert rig.drv.pop_used() == [(h, 2 + i) for i, h in enumerate(heads)]
    assert rig.drv.used_idx() == 3 == rig.queue.used_idx


def test_indirect_chain_pops(rig: Rig) -> None:
    rig.publish(b"indirect request", 4, rsplits=[3, 9], indirect=True)
    chain = rig.queue.pop(rig.mem)
    assert isinstance(chain, DescriptorChain)
    assert ChainReader(chain.readable, chain.readable_len).read_bytes(16) == b"indirect request"


def test_ring_of_chains_reused_many_times(rig: Rig) -> None:
    """Descriptors recycle through the free list for several laps of the ring."""
    for i in range(5 * NUM):
        head, _ = rig.publish(i.to_bytes(4, "little"), 4)
        chain = rig.queue.pop(rig.mem)
        assert isinstance(chain, DescriptorChain)
        assert bytes(chain.readable[0]) == i.to_bytes(4, "little")
        assert rig.complete(chain.head, 0) == [(head, 0)]


def test_avail_and_used_idx_wrap_at_65535(rig: Rig) -> None:
    reconfigure(rig, base=65534, used_idx=65535)
    assert rig.queue.last_avail_idx == 65534 and rig.queue.used_idx == 65535
    heads = [rig.publish(bytes([i]), 1)[0] for i in range(4)]
    assert rig.drv.avail_idx == 2  # 65534, 65535, 0, 1 -> 2
    assert rig.queue.pending() == 4
    popped = []
    while (chain := rig.queue.pop(rig.mem)) is not None:
        assert isinstance(chain, DescriptorChain)
        popped.append(chain.head)
        rig.queue.push(chain.head, 1)
    assert popped == heads
    assert rig.queue.last_avail_idx == 2
    assert rig.queue.used_idx == 3  # 65535 + 4
    assert rig.drv.pop_used() == [(h, 1) for h in heads]


def test_pending_beyond_ring_size_is_a_queue_error(rig: Rig) -> None:
    rig.ram.write(rig.drv.avail + VIRTQ_AVAIL_IDX, u16.pack(NUM + 1))
    with pytest.raises(QueueError, match="past a ring"):
        rig.queue.pending()
    with pytest.raises(QueueError):
        rig.queue.pop(rig.mem)
    rig.ram.write(rig.drv.avail + VIRTQ_AVAIL_IDX, u16.pack(NUM))
    assert rig.queue.pending() == NUM  # exactly a full ring is fine


def test_pending_beyond_ring_size_across_the_wrap(rig: Rig) -> None:
    reconfigure(rig, base=65530)
    rig.ram.write(rig.drv.avail + VIRTQ_AVAIL_IDX, u16.pack((65530 + NUM + 1) & 0xFFFF))
    with pytest.raises(QueueError):
        rig.queue.pending()
    rig.ram.write(rig.drv.avail + VIRTQ_AVAIL_IDX, u16.pack(65529))  # moved backwards
    with pytest.raises(QueueError):
        rig.queue.pending()


def test_malformed_chain_is_returned_as_its_head(rig: Rig) -> None:
    rig.drv.raw_desc(5, RAM_BASE + rig.ram.size, 16, 0, 0)  # outside guest memory
    rig.drv.free.remove(5)
    rig.drv.publish(5)
    good, _ = rig.publish(b"fine", 4)
    assert rig.queue.pop(rig.mem) == 5
    assert rig.queue.malformed == 1
    rig.queue.push(5, 0)  # what the worker does
    chain = rig.queue.pop(rig.mem)
    assert isinstance(chain, DescriptorChain) and chain.head == good
    rig.queue.push(good, 4)
    assert rig.drv.pop_used() == [(5, 0), (good, 4)]


def test_indirect_without_the_feature_is_malformed() -> None:
    with Rig(num=NUM, indirect=False) as rig:
        head, _ = rig.publish(b"x", 1, indirect=True)
        assert rig.queue.pop(rig.mem) == head
        assert rig.queue.malformed == 1


def test_head_out_of_range_stops_the_ring(rig: Rig) -> None:
    """A head that is not a descriptor cannot be returned; the ring is broken."""
    rig.drv.publish(NUM + 3)
    with pytest.raises(QueueError, match="out of range"):
        rig.queue.pop(rig.mem)
    assert rig.queue.malformed == 1
    assert rig.queue.last_avail_idx == 1  # consumed, so it is not re-read forever


# -- GET_VRING_BASE ----------------------------------------------------------------


def test_stop_returns_the_next_avail_index(rig: Rig) -> None:
    for _ in range(3):
        rig.publish(b"r", 1)
    rig.queue.pop(rig.mem)
    rig.queue.pop(rig.mem)
    assert rig.queue.stop() == 2  # the third is still pending: it will be processed next
    assert not rig.queue.ready


def test_stop_right_after_configure_returns_the_base(rig: Rig) -> None:
    reconfigure(rig, base=1234)
    assert rig.queue.stop() == 1234
    reconfigure(rig, base=0x1_0005)  # SET_VRING_BASE is taken modulo 2**16
    assert rig.queue.stop() == 5


def test_restart_resumes_where_it_stopped(rig: Rig) -> None:
    heads = [rig.publish(bytes([i]), 1)[0] for i in range(3)]
    assert isinstance(rig.queue.pop(rig.mem), DescriptorChain)
    rig.queue.push(heads[0], 0)
    base = rig.queue.stop()
    q = SplitQueue(0)
    q.configure(NUM, rig.drv.desc, rig.drv.avail, rig.drv.used, base, False, True, rig.mem)
    assert q.used_idx == 1  # continues from the used ring the driver has seen
    chain = q.pop(rig.mem)
    assert isinstance(chain, DescriptorChain) and chain.head == heads[1]


# -- configuration -----------------------------------------------------------------


@pytest.mark.parametrize("num", [0, 3, 6, 65536, 1 << 16])
def test_queue_size_must_be_a_power_of_two(rig: Rig, num: int) -> None:
    q = SplitQueue(1)
    with pytest.raises(QueueError, match="power of two"):
        q.configure(num, rig.drv.desc, rig.drv.avail, rig.drv.used, 0, False, False, rig.mem)
    assert not q.ready


@pytest.mark.parametrize(("desc", "avail", "used"), [(8, 0, 0), (0, 1, 0), (0, 0, 2)])
def test_ring_alignment(rig: Rig, desc: int, avail: int, used: int) -> None:
    q = SplitQueue(1)
    with pytest.raises(QueueError, match="misaligned"):
        q.configure(NUM, rig.drv.desc + desc, rig.drv.avail + avail, rig.drv.used + used, 0,
                    False, False, rig.mem)


def test_rings_outside_memory(rig: Rig) -> None:
    q = SplitQueue(1)
    end = RAM_BASE + rig.ram.size
    with pytest.raises(QueueError):
        q.configure(NUM, end - 16, rig.drv.avail, rig.drv.used, 0, False, False, rig.mem)
    with pytest.raises(QueueError):
        q.configure(NUM, rig.drv.desc, rig.drv.avail, end - 8, 0, False, False, rig.mem)
    assert not q.ready


def test_resolve_after_the_region_went_away(rig: Rig) -> None:
    assert rig.mem.remove(RAM_BASE, rig.ram.size)
    with pytest.raises(QueueError):
        rig.queue.resolve(rig.mem)
    assert not rig.queue.ready


# -- notifications -----------------------------------------------------------------


def test_full_barrier_runs() -> None:
    for _ in range(3):
        full_barrier()


def test_without_event_idx_no_interrupt_suppresses(rig: Rig) -> None:
    rig.queue.push(0, 0)
    assert rig.queue.needs_notification()
    set_avail_flags(rig, VIRTQ_AVAIL_F_NO_INTERRUPT)
    rig.queue.push(0, 0)
    assert not rig.queue.needs_notification()
    set_avail_flags(rig, 0)
    rig.queue.push(0, 0)
    assert rig.queue.needs_notification()


def test_without_event_idx_no_notify_while_draining(rig: Rig) -> None:
    rig.queue.disable_notification()
    assert used_flags(rig) == VIRTQ_USED_F_NO_NOTIFY
    assert rig.queue.enable_notification() is False
    assert used_flags(rig) == 0
    rig.publish(b"x", 1)
    rig.queue.disable_notification()
    assert rig.queue.enable_notification() is True


def test_event_idx_enable_writes_avail_event(ev_rig: Rig) -> None:
    rig = ev_rig
    rig.queue.disable_notification()
    assert used_flags(rig) == 0  # with EVENT_IDX the flag is not used
    for _ in range(3):
        rig.publish(b"x", 1)
    for _ in range(3):
        rig.queue.pop(rig.mem)
    assert rig.queue.enable_notification() is False
    assert rig.drv.avail_event() == 3 == rig.queue.last_avail_idx


def test_event_idx_enable_reports_chains_that_raced_in(ev_rig: Rig) -> None:
    rig = ev_rig
    rig.publish(b"x", 1)
    rig.queue.pop(rig.mem)
    rig.publish(b"y", 1)  # arrives after the last pop, before the request for a kick
    assert rig.queue.enable_notification() is True
    assert rig.drv.avail_event() == 1
    rig.queue.pop(rig.mem)
    assert rig.queue.enable_notification() is False
    assert rig.drv.avail_event() == 2


def test_event_idx_avail_event_wraps(ev_rig: Rig) -> None:
    rig = ev_rig
    reconfigure(rig, base=65535)
    rig.publish(b"x", 1)
    assert rig.queue.enable_notification() is True
    assert rig.drv.avail_event() == 65535
    rig.queue.pop(rig.mem)
    assert rig.queue.enable_notification() is False
    assert rig.drv.avail_event() == 0


def test_event_idx_first_decision_always_notifies(ev_rig: Rig) -> None:
    rig = ev_rig
    rig.drv.set_used_event(0xFFFF)  # far away: would suppress
    rig.queue.push(0, 0)
    assert rig.queue.needs_notification()  # nothing signalled yet: must not lose a wake-up
    rig.queue.push(0, 0)
    assert not rig.queue.needs_notification()


@pytest.mark.parametrize("start", [0, 100, 65530, 65535])
def test_event_idx_follows_vring_need_event(ev_rig: Rig, start: int) -> None:
    """Notify iff used_event is in [old, new): check a batch walk across the wrap."""
    rig = ev_rig
    reconfigure(rig, used_idx=start)
    rig.queue.push(0, 0)
    assert rig.queue.needs_notification()
    old = (start + 1) & 0xFFFF
    for batch, delta in itertools.product([1, 2, 3, 7], [-2, -1, 0, 1, 2, 3, 6, 7, 100]):
        used_event = (old + delta) & 0xFFFF
        rig.drv.set_used_event(used_event)
        for _ in range(batch):
            rig.queue.push(0, 0)
        new = (old + batch) & 0xFFFF
        expected = 0 <= delta < batch  # in range: the driver asked to hear about it
        assert vring_need_event(used_event, new, old) == expected
        assert rig.queue.needs_notification() == expected, (start, batch, delta)
        old = new
