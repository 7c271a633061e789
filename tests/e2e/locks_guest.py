"""The guest side of tests/e2e/test_locks.py: ``python3 /mnt/locks_guest.py STEP``.

Copied into the shared directory by the test and run by both guests (and
from inside guest A's ``flock -c``).  Guests and the host test meet through
marker files under ``/mnt/sync`` (on the share itself): ``mark`` creates
one, ``waitfor`` polls for one.  Every wait has a generous bound and fails
loudly; nothing passes because of timing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import time

SYNC = "/mnt/sync"
#: Longest any step waits for the other side (TCG guests are slow).
WAIT_S = 600.0


def mark(name: str) -> None:
    with open(f"{SYNC}/{name}", "w"):
        pass


def waitfor(name: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not os.path.exists(f"{SYNC}/{name}"):
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {name}")
        time.sleep(0.1)


def seen(name: str) -> bool:
    return os.path.exists(f"{SYNC}/{name}")


def try_lock(fd: int, start: int, length: int, exclusive: bool = True) -> bool:
    """A non-blocking fcntl lock (F_SETLK); False when another owner holds it."""
    try:
        fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB,
                    length, start)
        return True
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False


def opened(name: str) -> int:
    return os.open(f"/mnt/{name}", os.O_RDWR | os.O_CREAT, 0o644)


def host_a() -> None:
    """Guest A against a host process, both ways."""
    fd = opened("h")
    assert try_lock(fd, 0, 100), "guest A could not lock a free range"
    mark("A_h_locked")
    waitfor("host_checked_a")  # the host tried bytes 0..99 and was refused
    fcntl.lockf(fd, fcntl.LOCK_UN, 100, 0)
    mark("A_h_unlocked")
    waitfor("host_h_locked")  # now the host holds 0..99
    assert not try_lock(fd, 50, 1), "the host's lock did not hold in the guest"
    mark("A_h_conflict")
    fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)  # SETLKW: granted once the host unlocks
    assert seen("host_h_released"), "guest A got the lock while the host held it"
    fcntl.lockf(fd, fcntl.LOCK_UN, 100, 0)
    os.close(fd)
    print("host_a: ok")


def disjoint_a() -> None:
    fd = opened("d")
    assert try_lock(fd, 0, 100)
    mark("A_d")
    waitfor("B_d_done")
    os.close(fd)
    print("disjoint_a: ok")


def disjoint_b() -> None:
    waitfor("A_d")
    fd = opened("d")
    assert try_lock(fd, 100, 100), "a disjoint range was refused across guests"
    assert not try_lock(fd, 50, 10), "an overlapping range was granted across guests"
    os.close(fd)
    mark("B_d_done")
    print("disjoint_b: ok")


def hold_k() -> None:
    """Guest A holds k until guest B has killed its waiter and seen its queue serve."""
    fd = opened("k")
    assert try_lock(fd, 0, 1)
    mark("A_k_held")
    waitfor("B_queue_ok")
    mark("A_k_release")
    os.close(fd)
    print("hold_k: ok")


def wait_k() -> None:
    """The process guest B kills while it waits in SETLKW."""
    fd = opened("k")
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0)
    print("wait_k: granted (not killed?)")


def kill_waiter_b() -> None:
    waitfor("A_k_held")
    child = subprocess.Popen([sys.executable, __file__, "wait_k"])
    # Wait until the child sleeps in the lock request (state D or S in a FUSE wait).
    deadline = time.monotonic() + WAIT_S
    while True:
        with open(f"/proc/{child.pid}/wchan") as f:
            wchan = f.read()
        with open(f"/proc/{child.pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if "fuse" in wchan or "request_wait" in wchan or state == "D":
            break
        assert child.poll() is None, "the waiter ended before A released"
        assert time.monotonic() < deadline, f"the waiter never blocked ({wchan})"
        time.sleep(0.2)
    child.kill()
    # The queue serves while that request waits: create, write, read, list.
    with open("/mnt/after-kill", "w") as f:
        f.write("served\n")
    with open("/mnt/after-kill") as f:
        assert f.read() == "served\n"
    assert "after-kill" in os.listdir("/mnt")
    mark("B_queue_ok")
    child.wait(WAIT_S)  # gone once its request ends (the driver may not interrupt it)
    fd = opened("k")
    deadline = time.monotonic() + WAIT_S
    while not try_lock(fd, 0, 1):  # A's release, then the dead waiter's FLUSH
        assert time.monotonic() < deadline, "the killed waiter's lock stayed"
        time.sleep(0.2)
    os.close(fd)
    print(f"kill_waiter_b: ok (wchan was {wchan!r})")


def hold_p_forever() -> None:
    """Guest A holds p and never unlocks: only its power-off can end the lock."""
    fd = opened("p")
    assert try_lock(fd, 0, 0)
    mark("A_p_held")
    while True:
        time.sleep(3600)


def poweroff_b() -> None:
    waitfor("A_p_held")
    fd = opened("p")
    assert not try_lock(fd, 0, 1), "guest A's lock on p did not hold"
    mark("B_p_conflict")
    fcntl.lockf(fd, fcntl.LOCK_EX, 0, 0)  # SETLKW until A powers off
    mark("B_p_got")
    os.close(fd)
    print("poweroff_b: ok")


if __name__ == "__main__":
    globals()[sys.argv[1]]()
