"""File locks across two real guests and the host (issue 13, ``--locks posix,flock``).

Two QEMU guests, each with its own shardfs daemon, share one host
directory; one pair of boots runs a scripted sequence, the guests and this
test meeting through marker files on the share (``tests/e2e/locks_guest.py``
holds the guest side).  Each check has its own pass/fail:

* guest A holds a ``flock`` and guest B's ``flock -w`` waits until A releases;
* an ``fcntl`` write lock in guest A refuses a host process's lock on the
  same range, and a host lock refuses guest A's (which then waits in SETLKW
  until the host unlocks);
* byte-range locks on disjoint ranges coexist across the guests;
* a guest process killed while it waits in SETLKW leaves its queue serving,
  and its lock goes once its request ends;
* both guests run concurrent sqlite writers on one database on the share:
  ``PRAGMA integrity_check`` is ok and every row is there;
* guest A powers off while holding a lock: guest B's SETLKW is granted.

The daemons run with ``cache = never``: locks order the guests' writes, but
a guest's page cache would serve pages another VM replaced for up to the
attribute timeout (README "Semantics", locks).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
import textwrap
import threading
import time
from pathlib import Path

import pytest
from guest import GuestResult, RunGuest, ShardfsDaemon, attach_artifact, short_socket_dir

pytestmark = [pytest.mark.guest, pytest.mark.timeout(1500)]

HERE = Path(__file__).resolve().parent
#: Transactions per guest in the sqlite check (2 guests; a few minutes under TCG).
SQLITE_TXNS = 300
#: The host side's bound on any one wait for a guest.
HOST_WAIT_S = 900.0

LIB = textwrap.dedent(
    """\
    S=/mnt/sync
    mark() { : >"$S/$1"; }
    waitfor() {
        _n=0
        while [ ! -e "$S/$1" ]; do
            _n=$((_n + 1)); [ $_n -gt 6000 ] && { echo "timed out waiting for $1"; return 1; }
            sleep 0.1
        done
    }
    """
)

PRELUDE = textwrap.dedent(
    """\
    CTL=/run/ctl
    step() {
        _name=$1; shift
        echo "=== step $_name: start"
        { ( set -eux; "$@" ); echo $? >"$CTL/$_name.rc"; } 2>&1 | tee "$CTL/$_name.log"
        echo "=== step $_name: exit $(cat "$CTL/$_name.rc")"
    }
    mount -t virtiofs shardfs /mnt || exit 1
    . /mnt/lib.sh
    G="python3 /mnt/locks_guest.py"
    """
)

SCRIPT_A = PRELUDE + textwrap.dedent(
    """\
    mark A_up; waitfor B_up
    flock_a() {
        flock -x /mnt/f.lock sh -c '. /mnt/lib.sh; mark A_flock; waitfor B_flock_waiting
                                    sleep 2; mark A_flock_release'
    }
    step flock flock_a
    step host $G host_a
    step disjoint $G disjoint_a
    step killwait $G hold_k
    sqlite_a() { waitfor B_sqlite_ready; mark A_sqlite_ready; sqlite3 /mnt/db.sqlite </mnt/A.sql; }
    step sqlite sqlite_a
    mark A_sqlite_done
    waitfor B_sqlite_done
    # Its own stdio: init's tee must not wait for it (the guest powers off under it).
    $G hold_p_forever </dev/null >/dev/null 2>&1 &
    waitfor A_p_held
    waitfor B_p_conflict
    echo "powering off with the lock on p held"
    """
)

SCRIPT_B = PRELUDE + textwrap.dedent(
    """\
    mark B_up; waitfor A_up
    flock_b() {
        waitfor A_flock; mark B_flock_waiting
        flock -w 600 -x /mnt/f.lock sh -c '. /mnt/lib.sh; mark B_flock_got
                                           test -e "$S/A_flock_release"'
    }
    step flock flock_b
    waitfor host_done
    step disjoint $G disjoint_b
    step killwait $G kill_waiter_b
    sqlite_b() { mark B_sqlite_ready; waitfor A_sqlite_ready; sqlite3 /mnt/db.sqlite </mnt/B.sql; }
    step sqlite sqlite_b
    mark B_sqlite_done
    step poweroff $G poweroff_b
    """
)


def sqlite_script(guest: str, n: int) -> str:
    """``n`` one-row transactions, each retried by sqlite's busy handler."""
    lines = [".timeout 600000", ".bail on"]
    lines += [f"BEGIN IMMEDIATE; INSERT INTO t VALUES('{guest}', {i}); COMMIT;"
              for i in range(n)]
    return "\n".join(lines) + "\n"


def prepare_share(shared: Path, n: int) -> None:
    (shared / "sync").mkdir(parents=True)
    (shared / "lib.sh").write_text(LIB)
    shutil.copy(HERE / "locks_guest.py", shared / "locks_guest.py")
    for g in ("A", "B"):
        (shared / f"{g}.sql").write_text(sqlite_script(g, n))
    db = sqlite3.connect(shared / "db.sqlite")
    db.execute("CREATE TABLE t (g TEXT NOT NULL, i INTEGER NOT NULL, PRIMARY KEY (g, i))")
    db.commit()
    db.close()


def start_daemon(base: Path, shared: Path, name: str, node: pytest.Item,
                 locks: str) -> ShardfsDaemon:
    sock_dir, _ = short_socket_dir(base / name)
    log = base / f"{name}.log"
    attach_artifact(node, f"{name} log", log)
    return ShardfsDaemon(socket_path=sock_dir / "vhost-user-fs.sock", shared_dir=shared,
                         log_path=log, extra_args=["--locks", locks, "--cache", "never"]).start()


class Marks:
    """The host's side of the marker files."""

    def __init__(self, shared: Path) -> None:
        self.dir = shared / "sync"

    def wait(self, name: str, stop: threading.Event) -> None:
        deadline = time.monotonic() + HOST_WAIT_S
        while not (self.dir / name).exists():
            if stop.is_set():
                raise RuntimeError(f"the guests finished before marking {name}")
            assert time.monotonic() < deadline, f"host: timed out waiting for {name}"
            time.sleep(0.05)

    def mark(self, name: str) -> None:
        (self.dir / name).touch()

    def ctime_ns(self, name: str) -> int:
        return (self.dir / name).stat().st_ctime_ns


def host_lock(fd: int, start: int, length: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
        return True
    except OSError:
        return False


def host_side(shared: Path, marks: Marks, stop: threading.Event, out: dict[str, object]) -> None:
    """fcntl locks of this (host) process against guest A's, both ways."""
    marks.wait("A_h_locked", stop)
    fd = os.open(shared / "h", os.O_RDWR)
    try:
        out["host_refused_while_guest_holds"] = not host_lock(fd, 0, 100)
        out["host_got_beside_guest_lock"] = host_lock(fd, 100, 10)
        fcntl.lockf(fd, fcntl.LOCK_UN, 10, 100)
        marks.mark("host_checked_a")
        marks.wait("A_h_unlocked", stop)
        out["host_got_after_guest_unlock"] = host_lock(fd, 0, 100)
        marks.mark("host_h_locked")
        marks.wait("A_h_conflict", stop)
        marks.mark("host_h_released")
        fcntl.lockf(fd, fcntl.LOCK_UN, 100, 0)
    finally:
        os.close(fd)
        marks.mark("host_done")


def boot_pair(run_guest: RunGuest, shared: Path, socks: tuple[Path, Path],
              host: bool) -> tuple[GuestResult, GuestResult, dict[str, object]]:
    results: dict[str, GuestResult | BaseException] = {}
    done = threading.Event()

    def boot(name: str, script: str, sock: Path) -> None:
        try:
            results[name] = run_guest(script, socket_path=sock, timeout_s=1200)
        except BaseException as e:  # reported below
            results[name] = e

    threads = [threading.Thread(target=boot, args=("A", SCRIPT_A, socks[0])),
               threading.Thread(target=boot, args=("B", SCRIPT_B, socks[1]))]
    for t in threads:
        t.start()
    out: dict[str, object] = {}
    try:
        if host:
            host_side(shared, Marks(shared), done, out)
    finally:
        for t in threads:
            t.join()
        done.set()
    for name in ("A", "B"):
        if isinstance(results[name], BaseException):
            raise results[name]  # type: ignore[misc]
    return results["A"], results["B"], out  # type: ignore[return-value]


def step_ok(result: GuestResult, name: str) -> None:
    rc = result.ctl(f"{name}.rc").strip()
    assert rc == "0", (f"step {name}: rc {rc!r}\n{result.ctl(name + '.log')}\n"
                       + result.describe(40))


def test_locks_across_two_guests_and_the_host(run_guest: RunGuest, tmp_path: Path,
                                              request: pytest.FixtureRequest) -> None:
    shared = tmp_path / "shared"
    prepare_share(shared, SQLITE_TXNS)
    a = start_daemon(tmp_path, shared, "daemonA", request.node, "posix,flock")
    b = start_daemon(tmp_path, shared, "daemonB", request.node, "posix,flock")
    try:
        ra, rb, host = boot_pair(run_guest, shared, (a.socket_path, b.socket_path), host=True)
    finally:
        problems = []
        for d in (a, b):
            try:
                d.stop_and_check()
            except AssertionError as e:
                problems.append(str(e))
    marks = Marks(shared)
    # 1. flock across guests: B waited until A released.
    step_ok(ra, "flock")
    step_ok(rb, "flock")
    grant_ms = (marks.ctime_ns("B_flock_got") - marks.ctime_ns("A_flock_release")) / 1e6
    print(f"\nflock wait granted across guests: {grant_ms:.0f} ms after A's release mark")
    # 2. fcntl against a host process, both ways.
    assert host == {"host_refused_while_guest_holds": True, "host_got_beside_guest_lock": True,
                    "host_got_after_guest_unlock": True}
    step_ok(ra, "host")
    # 3. disjoint ranges coexist.
    step_ok(ra, "disjoint")
    step_ok(rb, "disjoint")
    # 4. a killed SETLKW waiter leaves the queue serving.
    step_ok(ra, "killwait")
    step_ok(rb, "killwait")
    # 5. sqlite: every row of both guests, and an intact database.
    step_ok(ra, "sqlite")
    step_ok(rb, "sqlite")
    db = sqlite3.connect(shared / "db.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    rows = set(db.execute("SELECT g, i FROM t"))
    db.close()
    assert rows == {(g, i) for g in "AB" for i in range(SQLITE_TXNS)}
    # 6. A powered off holding p; B's SETLKW on it was granted.
    assert ra.exit_code == 0, ra.describe(40)
    step_ok(rb, "poweroff")
    assert (shared / "sync" / "B_p_got").exists()
    assert not problems, "\n".join(problems)
