"""What both front-ends of ``scripts/bench`` share: where the peer is, and how a
daemon's CPU time is read from /proc.

Its own module so that the frontend bench (:mod:`shardfs.bench.run`) and the
guest bench (:mod:`shardfs.bench.guest`) import it rather than each other.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PEER = REPO / ".peer" / "virtiofsd" / "usr" / "libexec" / "virtiofsd"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- CPU accounting -------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (children of any of their threads)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            except FileNotFoundError:
                pass
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``'s process tree: every thread of every process.

    Each thread's ``schedstat`` (nanoseconds on a CPU) is summed, so a
    multi-threaded daemon such as virtiofsd counts all its threads.  Where
    schedstat is missing, the process's utime + stime (all threads, clock
    ticks) stands in.
    """
    total = 0.0
    for p in process_tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        try:
            for tid in tids:
                with open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0]) / 1e9
        except (FileNotFoundError, ProcessLookupError):
            pass
        except OSError:
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / CLK_TCK
            except (OSError, IndexError):
                pass
    return total


def find_virtiofsd(explicit: str | None) -> str | None:
    """The peer binary: ``--virtiofsd``, else .peer/ (scripts/get-virtiofsd), else PATH."""
    candidates = [explicit] if explicit else [str(PEER), "/usr/libexec/virtiofsd",
                                              "virtiofsd"]
    for c in candidates:
        path = c if os.path.sep in c else None
        if path is None:
            from shutil import which
            path = which(c)
        if path and os.access(path, os.X_OK):
            try:
                subprocess.run([path, "--version"], check=True, capture_output=True, timeout=10)
            except (OSError, subprocess.SubprocessError):
                continue
            return path
    return None


def version_of(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    return (out.stdout or out.stderr).strip().splitlines()[0]
