"""Stopping a daemon subprocess the way an operator would."""

from __future__ import annotations

import subprocess

#: How long a daemon gets to shut down cleanly after SIGTERM.
STOP_TIMEOUT_S = 30.0


def stop(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM ``proc`` if it still runs, SIGKILL it if it has not exited within
    ``timeout_s``; return its exit status (negative: the signal that ended it)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
