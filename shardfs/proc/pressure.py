"""Whether a worker may spin: only while no task waits for a CPU.

Polling trades CPU for latency: a worker watching its rings catches a
request without the tens of microseconds a cross-CPU wake-up costs (DESIGN
§5).  That pays only if the CPU it burns was idle.  Under TCG the guest's
vCPUs are host threads on the same cores; a spinning worker takes their
time, the guest issues requests later, and spinning longer makes it worse.
The adaptive window (:func:`shardfs.proc.worker.next_poll_window`) sees
only when kicks come, not what the spin cost, and with several queues each
worker keeps its own window open.

So a worker spins only while the kernel's CPU pressure (PSI,
``/proc/pressure/cpu``, the ``some`` line: time at least one runnable task
waited for a CPU) stayed below :data:`MAX_STALL_SHARE` of the last
:data:`SAMPLE_NS`.  The counter is read at most once per sample, from an fd
kept open (a ``pread`` regenerates the file), so the check costs a clock
comparison almost always.  Without PSI (kernels before 4.20, or
``psi=0``) nothing is ever called contended: the window alone decides, as
before.
"""

from __future__ import annotations

import os

PSI_CPU = "/proc/pressure/cpu"
#: How often the stall counter is read again (ns).
SAMPLE_NS = 20_000_000
#: Stalled share of a sample above which spinning takes a CPU someone needs.
MAX_STALL_SHARE = 0.10
_NS_PER_US = 1000
#: Bytes read from the PSI file: its two lines fit with room to spare.
_READ_BYTES = 256


def stall_total_us(text: bytes) -> int | None:
    """The ``total=`` of the ``some`` line (microseconds), or None if absent."""
    for line in text.splitlines():
        if line.startswith(b"some "):
            for field in line.split():
                if field.startswith(b"total="):
                    try:
                        return int(field[6:])
                    except ValueError:
                        return None
    return None


class CpuPressure:
    """Samples PSI's CPU stall counter; :meth:`contended` says whether to hold off."""

    def __init__(self, path: str = PSI_CPU, max_share: float = MAX_STALL_SHARE,
                 sample_ns: int = SAMPLE_NS) -> None:
        self.max_share = max_share
        self.sample_ns = sample_ns
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = None
        self._at_ns: int | None = None
        self._total_us = 0
        self._contended = False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _read(self) -> int | None:
        if self._fd is None:
            return None
        try:
            return stall_total_us(os.pread(self._fd, _READ_BYTES, 0))
        except OSError:
            return None

    def contended(self, now_ns: int) -> bool:
        """Whether tasks waited for a CPU for more than ``max_share`` of the last sample.

        ``now_ns`` is a monotonic clock (the caller has one at hand); the
        answer changes at most once per ``sample_ns``.
        """
        at = self._at_ns
        if at is not None and now_ns - at < self.sample_ns:
            return self._contended
        total = self._read()
        if total is None:
            self._contended = False
        elif at is not None and now_ns > at:
            self._contended = (total - self._total_us) * _NS_PER_US > self.max_share * (
                now_ns - at)
        self._at_ns = now_ns
        if total is not None:
            self._total_us = total
        return self._contended
