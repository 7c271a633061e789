"""Forking the daemon's children: workers, the coordinator, the lock process.

Why not ``multiprocess.get_context("fork").Process``: importing
``multiprocess`` imports ``dill``, and the two add about 5 MB of heap to the
supervisor before it forks.  Every child inherits that heap; the pages are
shared until touched, but they are still charged to the daemon (PSS), and a
host running a hundred VMs pays it a hundred times.  A child here needs
only fork, a body to run and an exit status, which is what this module does.
``multiprocess`` stays what the benchmark's driver processes and the soak
test's clients run on (``shardfs.bench.loadgen``), where handing a closure
to a child is the point and a few MB do not matter.

Contract of :class:`ForkedProcess` (the subset of ``multiprocessing.Process``
the supervisor uses): :meth:`start` forks and runs ``target`` in the child,
which then leaves with ``os._exit``: 0 when ``target`` returns, the code of
a ``SystemExit``, 1 (and a traceback on stderr) for any other exception.
The parent's atexit handlers and buffered output never run twice.
:attr:`exitcode` is None while the child runs, then its code, or minus the
signal that killed it.

Before the first fork the supervisor's heap is frozen (:func:`gc.freeze`):
the collector in a child then never walks, and so never writes to, the
objects it inherited, which would copy their pages one by one.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import sys
import traceback
from collections.abc import Callable


class ForkedProcess:
    """One forked child running ``target``; see the module doc for the contract."""

    def __init__(self, target: Callable[[], object], name: str) -> None:
        self.target = target
        self.name = name
        #: 0 until started.
        self.pid = 0
        self.exitcode: int | None = None

    def start(self) -> int:
        """Fork; return the child's pid."""
        if self.pid:
            raise RuntimeError(f"{self.name}: already started")
        gc.collect()
        gc.freeze()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; its effects are tested
            os._exit(_run_child(self.target))
        self.pid = pid
        return pid

    def _reap(self, options: int) -> bool:
        """waitpid; True once the exit status is known."""
        if self.exitcode is not None:
            return True
        if not self.pid:
            raise RuntimeError(f"{self.name}: not started")
        try:
            pid, status = os.waitpid(self.pid, options)
        except ChildProcessError:
            # Reaped elsewhere (cannot happen in the supervisor, which reaps
            # only through here); the status is lost.
            self.exitcode = -signal.SIGKILL
            return True
        if pid == 0:
            return False
        self.exitcode = os.waitstatus_to_exitcode(status)
        return True

    def is_alive(self) -> bool:
        return not self._reap(os.WNOHANG)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the child to exit, at most ``timeout`` seconds (None: for ever)."""
        if timeout is None:
            self._reap(0)
            return
        if self._reap(os.WNOHANG):
            return
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self._reap(0)
            return
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while True:
                try:
                    poller.poll(max(int(timeout * 1000), 0))
                    break
                except InterruptedError:
                    continue
        finally:
            os.close(pidfd)
        self._reap(os.WNOHANG)

    def kill(self) -> None:
        if self.pid and self.exitcode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _run_child(target: Callable[[], object]) -> int:
    """The child's whole life: run ``target``; return the exit code."""
    code = 0
    try:
        target()
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
    return code
