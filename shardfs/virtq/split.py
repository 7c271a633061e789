"""The device side of a split virtqueue (virtio 1.2 §2.7).

The queue holds only ring state and views of the three ring areas; guest
memory is passed in when the rings are (re)resolved, as in rust-vmm.

Notification rules:

* Without EVENT_IDX the device suppresses calls when the driver sets
  VIRTQ_AVAIL_F_NO_INTERRUPT, and sets VIRTQ_USED_F_NO_NOTIFY while it is
  draining the ring.
* With EVENT_IDX (§2.7.10) the device writes ``avail_event`` to ask for the
  next kick and signals only when ``vring_need_event`` says so.  Deciding
  needs a store-then-load full barrier between publishing ``used.idx`` and
  reading ``used_event`` (the spec's mb()), and likewise between writing
  ``avail_event`` and re-reading ``avail.idx``.  Python has none, and x86 may
  reorder exactly that pair, so :func:`full_barrier` executes locked
  instructions: it takes and drops a private ``threading.Lock``, which CPython
  builds on a POSIX semaphore, so glibc's ``sem_trywait`` (``lock cmpxchg``)
  and ``sem_post`` (``lock xadd``) run.  That costs a third of the ctypes
  call into ``pthread_spin_trylock`` it replaces (about 160 against 510 ns
  here), and a worker pays it once or twice per batch.
* Ring indices are read and written as single 16-bit accesses.  Reading
  with ``struct`` (``<H`` is the native memcpy on little-endian hosts) is one
  load.  Writing must not use ``struct.pack_into``: it zero-fills the
  target before storing, so a driver polling ``used.idx`` could read 0 and
  take the whole ring for completed (seen here as a device reading
  ``avail.idx`` 0 from a polling driver).  Stores go through a ``H``-cast
  view of the used ring instead: one 16-bit store each.
"""

from __future__ import annotations

import struct
import sys
import threading

from shardfs.abi.virtio import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_AVAIL_IDX,
    VIRTQ_AVAIL_RING,
    VIRTQ_MAX_SIZE,
    VIRTQ_USED_F_NO_NOTIFY,
    VIRTQ_USED_FLAGS,
    VIRTQ_USED_IDX,
    VIRTQ_USED_RING,
    avail_ring_size,
    used_ring_size,
    virtq_desc,
    virtq_used_elem,
    vring_need_event,
)
from shardfs.virtq.chain import DescriptorChain, walk_chain
from shardfs.virtq.memory import GuestMemory, GuestMemoryError

if sys.byteorder != "little":  # the "H" views below are native; virtio 1.x rings are LE
    raise ImportError("shardfs.virtq.split assumes a little-endian host")

_u16 = struct.Struct("<H")
_unpack_u16 = _u16.unpack_from
_pack_used = virtq_used_elem.pack_into
_USED_ELEM_SIZE = virtq_used_elem.size
#: Positions of used.flags and used.idx in the used ring seen as u16s.
_USED_FLAGS16, _USED_IDX16 = VIRTQ_USED_FLAGS // _u16.size, VIRTQ_USED_IDX // _u16.size

#: Never contended: only its locked instructions matter (see the module doc).
_fence_lock = threading.Lock()
_fence_acquire, _fence_release = _fence_lock.acquire, _fence_lock.release


def full_barrier() -> None:
    """A store-load fence: locked read-modify-writes on x86 (see module doc)."""
    _fence_acquire(False)
    _fence_release()


#: What :meth:`SplitQueue.decide` says of the driver's call after a push:
#: signal it now; nothing is owed; or decide at the end of the batch.
CALL, COVERED, OWED = 1, 0, 2


class QueueError(Exception):
    """The ring is misconfigured or the driver broke a ring invariant."""


class SplitQueue:
    """Ring state for one queue; methods take no locks (one owner process)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.desc_gpa = self.avail_gpa = self.used_gpa = 0
        self.last_avail_idx = 0
        self.used_idx = 0
        self.event_idx = False
        self.indirect = False
        self.ready = False
        self._desc = self._avail = self._used = memoryview(b"")
        #: The used ring as u16s, for single-store index writes (see module doc).
        self._used16 = memoryview(b"").cast("H")
        self._signalled_used: int | None = None
        #: Chains dropped as malformed; each is still returned with length 0.
        self.malformed = 0

    def configure(self, num: int, desc_gpa: int, avail_gpa: int, used_gpa: int,
                  base: int, event_idx: bool, indirect: bool, mem: GuestMemory) -> None:
        """Set the ring up (SET_VRING_NUM/ADDR/BASE gathered) and resolve it."""
        if num == 0 or num > VIRTQ_MAX_SIZE or num & (num - 1):
            raise QueueError(f"queue size {num} is not a power of two up to {VIRTQ_MAX_SIZE}")
        if desc_gpa % 16 or avail_gpa % 2 or used_gpa % 4:
            raise QueueError("ring addresses are misaligned (§2.7: 16, 2 and 4 bytes)")
        self.num = num
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc_gpa, avail_gpa, used_gpa
        self.last_avail_idx = base & 0xFFFF
        self.event_idx = event_idx
        self.indirect = indirect
        self.resolve(mem)
        # The used index continues from what the driver has seen.
        self.used_idx = _unpack_u16(self._used, VIRTQ_USED_IDX)[0]
        self._signalled_used = None
        self.ready = True

    def resolve(self, mem: GuestMemory) -> None:
        """Re-take the ring views after guest memory changed."""
        try:
            self._desc = mem.view(self.desc_gpa, virtq_desc.size * self.num)
            self._avail = mem.view(self.avail_gpa, avail_ring_size(self.num))
            self._used = mem.view(self.used_gpa, used_ring_size(self.num))
            self._used16 = self._used.cast("H")
        except GuestMemoryError as e:
            self.ready = False
            raise QueueError(f"queue {self.index}: {e}") from e

    def stop(self) -> int:
        """Stop the ring; return the next avail index to process (GET_VRING_BASE)."""
        self.ready = False
        self._desc = self._avail = self._used = memoryview(b"")
        self._used16 = memoryview(b"").cast("H")
        return self.last_avail_idx

    def avail_idx(self) -> int:
        return _unpack_u16(self._avail, VIRTQ_AVAIL_IDX)[0]

    def pending(self) -> int:
        """How many chains the driver has made available and we have not taken."""
        n = (self.avail_idx() - self.last_avail_idx) & 0xFFFF
        if n > self.num:
            raise QueueError(f"queue {self.index}: avail idx moved {n} past a ring of {self.num}")
        return n

    def pop(self, mem: GuestMemory) -> DescriptorChain | int | None:
        """Take the next chain.

        Returns the chain; or the head index alone when the chain is
        malformed (the caller returns it with length 0 and counts it); or
        None when the ring is empty.
        """
        avail, last, num = self._avail, self.last_avail_idx, self.num
        n = (_unpack_u16(avail, VIRTQ_AVAIL_IDX)[0] - last) & 0xFFFF  # pending(), inlined
        if not n:
            return None
        if n > num:
            raise QueueError(f"queue {self.index}: avail idx moved {n} past a ring of {num}")
        head = _unpack_u16(avail, VIRTQ_AVAIL_RING + 2 * (last & (num - 1)))[0]
        self.last_avail_idx = (last + 1) & 0xFFFF
        if head >= num:
            self.malformed += 1
            raise QueueError(f"queue {self.index}: head {head} out of range")
        try:
            return walk_chain(mem, self._desc, num, head, self.indirect)
        except Exception:
            self.malformed += 1
            return head

    def head_at(self, avail_pos: int) -> int:
        """The head index the driver published at avail position ``avail_pos``."""
        return int(_unpack_u16(self._avail, VIRTQ_AVAIL_RING + 2 * (avail_pos % self.num))[0])

    def chain_at(self, mem: GuestMemory, head: int) -> DescriptorChain | None:
        """Walk the chain at ``head`` again (crash recovery); None if malformed.

        The chain comes with views only (no iovec tail): its callers answer
        it through readers and writers.
        """
        if head >= self.num:
            return None
        try:
            chain = walk_chain(mem, self._desc, self.num, head, self.indirect)
        except Exception:
            return None
        chain.materialize()
        return chain

    def push(self, head: int, length: int) -> None:
        """Return a chain to the driver (the used element first, then used.idx)."""
        idx = self.used_idx
        # The element may be written any way (the driver reads it only once
        # used.idx covers it); the index with one 16-bit store.
        _pack_used(self._used, VIRTQ_USED_RING + _USED_ELEM_SIZE * (idx & (self.num - 1)),
                   head, length)
        idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        self._used16[_USED_IDX16] = idx

    def needs_notification(self) -> bool:
        """Whether to signal the call fd for the chains pushed since the last signal."""
        full_barrier()
        old = self._signalled_used
        new = self.used_idx
        self._signalled_used = new
        if not self.event_idx:
            flags = _unpack_u16(self._avail, 0)[0]
            return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
        if old is None:
            return True
        used_event = _unpack_u16(self._avail, VIRTQ_AVAIL_RING + 2 * self.num)[0]
        return vring_need_event(used_event, new, old)

    def decide(self) -> int:
        """After a push: whether to call the driver, as :data:`CALL`,
        :data:`OWED` or :data:`COVERED`.

        Nothing more waiting (the driver may be waiting for exactly this
        reply): :meth:`needs_notification` decides at once, CALL or COVERED.
        More chains waiting: under EVENT_IDX, CALL when the driver already
        asks for a call for the chains pushed since the last signal, so that
        it refills the ring while we serve on; otherwise OWED, and the end of
        the batch decides with :meth:`needs_notification`.  The early test is
        read without a barrier: CALL is safe to act on (one call too many is
        harmless) and counts as the signal, OWED is not final.  One method,
        not two, because the worker asks after every request.
        """
        avail = self._avail
        if _unpack_u16(avail, VIRTQ_AVAIL_IDX)[0] == self.last_avail_idx:
            return CALL if self.needs_notification() else COVERED
        old = self._signalled_used
        if old is None or not self.event_idx:
            return OWED
        new = self.used_idx
        event = _unpack_u16(avail, VIRTQ_AVAIL_RING + 2 * self.num)[0]
        if ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF):  # vring_need_event
            self._signalled_used = new
            return CALL
        return OWED

    def disable_notification(self) -> None:
        """Ask the driver not to kick while we drain (without EVENT_IDX)."""
        if not self.event_idx:
            self._used16[_USED_FLAGS16] = VIRTQ_USED_F_NO_NOTIFY

    def enable_notification(self) -> bool:
        """Ask for the next kick; return True if chains arrived meanwhile.

        The caller loops while this returns True, so a chain made available
        between the last pop and the request for a kick is never stranded.
        """
        if self.event_idx:
            self._used16[(VIRTQ_USED_RING + _USED_ELEM_SIZE * self.num) // _u16.size] = \
                self.last_avail_idx  # avail_event
        else:
            self._used16[_USED_FLAGS16] = 0
        full_barrier()
        return self.pending() != 0
