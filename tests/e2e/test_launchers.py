"""End-to-end: shardfs started exactly as Kata Containers, podman and virtme-ng start
virtiofsd, each daemon serving a real guest.

The command lines, with their sources cited, are the catalogue in
``tests/unit/test_launcher_cmdlines.py`` (``LAUNCHERS``).  Each is run here as its
stack runs it: ``scripts/shardfs`` exec'd with that argument list, the socket
handed over the stack's way (Kata binds and listens itself and passes fd 3),
the daemon judged ready the stack's way (nothing, the socket path, a line on
stderr, the pid file), its working directory and environment as the stack
sets them.

One boot serves every launcher, to keep the suite short: QEMU gets one
vhost-user-fs device per daemon, each with the tag of its launcher's name and
the device properties its stack uses.  The guest mounts every share and runs
a small workload on each (write and read back, mkdir, rename, ``cp -a`` of a
tree; reads and refused writes on the read-only one), plus probes that show
whether the command line had virtiofsd's effect: xattrs (off unless
``--xattr``), submounts announced or not, the cache policy, ``--readonly``.
On the host the test checks the results byte for byte, the workers' sandbox
and seccomp state, that each daemon exits by itself when QEMU goes away (as
virtiofsd does; podman relies on it), and that ``--syslog`` logs to syslog.

Every check runs twice: against shardfs, and against virtiofsd 1.13 itself
(``scripts/get-virtiofsd``'s, the benchmark's peer) in shardfs's place, which
shows that what is expected is virtiofsd's behaviour and not a guess.  The
checks that read shardfs's status socket are skipped for virtiofsd.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import guest
import pytest
from guest import (
    REPO_ROOT,
    TIMEOUT_SCALE,
    GuestImage,
    GuestResult,
    _die_with_parent,
    _group_members,
    attach_artifact,
    qemu_escape,
    read_text,
    tail,
)
from test_guest import PRELUDE, assert_same_tree, random_bytes, sha256_file

from shardfs.bench.common import find_virtiofsd
from tests.unit.test_launcher_cmdlines import (
    GO_FIRST_EXTRA_FD,
    LAUNCHERS,
    VIRTIOFSD_READY_LINE,
    Launcher,
)

pytestmark = [pytest.mark.guest, pytest.mark.timeout(1200)]

#: What the stacks exec in place of virtiofsd.
SHARDFS = REPO_ROOT / "scripts" / "shardfs"
#: Generous bounds on a loaded 2-core machine; none of them is a semantic wait.
START_TIMEOUT_S = 60.0 * TIMEOUT_SCALE
BOOT_TIMEOUT_S = 600.0
EXIT_TIMEOUT_S = 30.0 * TIMEOUT_SCALE
LEFTOVER_TIMEOUT_S = 10.0 * TIMEOUT_SCALE
POLL_S = 0.05
#: virtme-ng gives up on the pid file after 5 checks, 0.1 s doubling (3.1 s), and
#: falls back to 9p; reported, not asserted (timing).
VIRTME_PIDFILE_PATIENCE_S = 3.1
#: Launchers whose share gets the cache probe (a host change between two opens):
#: one with --cache auto, one with --cache always.
CACHE_PROBED = ("kata3", "virtmero")
#: /proc/PID/status "Seccomp:" values (linux/seccomp.h SECCOMP_MODE_*).
SECCOMP_MODE_DISABLED = 0
SECCOMP_MODE_FILTER = 2
XATTR_NAME = "user.launcher"
XATTR_VALUE = b"works"

# --------------------------------------------------------------------------- guest side

FUNCTIONS = textwrap.dedent(
    """\
    share_mount() {
        mkdir -p "/mnt/$1"
        mount -t virtiofs "$1" "/mnt/$1"
        grep " /mnt/$1 virtiofs " /proc/mounts
    }

    rw_workload() {
        m=/mnt/$1
        head -c 1234567 /dev/urandom >"$m/written.bin"
        sha256sum "$m/written.bin" | cut -d' ' -f1 >"$CTL/$1.written.sha256"
        drop_caches
        sha256sum "$m/written.bin" | cut -d' ' -f1 >"$CTL/$1.reread.sha256"
        cmp "$CTL/$1.written.sha256" "$CTL/$1.reread.sha256"
        mkdir -p "$m/made/deeper"
        chmod 0750 "$m/made"
        echo "renamed in the guest" >"$m/before-rename.txt"
        mv "$m/before-rename.txt" "$m/made/after-rename.txt"
        cp -a "$m/tree" "$m/tree-copy"
        drop_caches
        diff -r --no-dereference "$m/tree" "$m/tree-copy"
    }

    ro_read() {
        m=/mnt/$1
        sha256sum "$m/tree/big.bin" | cut -d' ' -f1 >"$CTL/$1.big.sha256"
        cp -a "$m/tree" "/mnt/$1-copy"
        diff -r --no-dereference "$m/tree" "/mnt/$1-copy"
    }

    # Runs "$@", which must fail with EROFS.
    expect_erofs() {
        if "$@" 2>"$CTL/erofs.err"; then echo "succeeded: $*"; return 1; fi
        grep "Read-only file system" "$CTL/erofs.err" || { cat "$CTL/erofs.err"; return 1; }
    }

    ro_writes() {
        m=/mnt/$1
        expect_erofs touch "$m/created.txt"
        expect_erofs mkdir "$m/created-dir"
        expect_erofs mv "$m/tree/small.txt" "$m/moved.txt"
        expect_erofs rm "$m/tree/small.txt"
        expect_erofs sh -c "echo appended >>'$m/tree/small.txt'"
        expect_erofs chmod 0600 "$m/tree/small.txt"
    }

    xattr_probe() {
        m=/mnt/$1
        : >"$m/xattr-probe"
        rc=0
        setfattr -n {xattr_name} -v {xattr_value} "$m/xattr-probe" 2>"$CTL/$1.setfattr.err" \\
            || rc=$?
        echo "$rc" >"$CTL/$1.setfattr.rc"
        cat "$CTL/$1.setfattr.err"
    }

    submount_probe() {
        m=/mnt/$1
        cat "$m/submnt/inside.txt" >"$CTL/$1.submount.txt"
        stat -c %d "$m" >"$CTL/$1.dev.root"
        stat -c %d "$m/submnt/inside.txt" >"$CTL/$1.dev.sub"
        grep -c " $m/submnt " /proc/mounts >"$CTL/$1.submount.mounts" || true
    }

    # The host file changes under the guest (through the 9p ctl share, where the
    # share lives) between two opens.
    cache_probe() {
        m=/mnt/$1
        cat "$m/cache-probe.txt" >"$CTL/$1.cache.before"
        printf 'version-two\\n' >"$CTL/shares/$1/cache-probe.txt"
        cat "$m/cache-probe.txt" >"$CTL/$1.cache.after"
    }

    mount -t tmpfs launchers /mnt
    """
).replace("{xattr_name}", XATTR_NAME).replace("{xattr_value}", XATTR_VALUE.decode())


def guest_script(daemons: list[Daemon]) -> str:
    """Mount every share and run its launcher's steps (``$CTL/NAME.STEP.rc``)."""
    parts = [PRELUDE, FUNCTIONS]
    for d in daemons:
        n = d.launcher.name
        steps = (["ro_read", "ro_writes"] if d.launcher.readonly
                 else ["rw_workload", "xattr_probe", "submount_probe"])
        if n in CACHE_PROBED:
            steps.append("cache_probe")
        body = "".join(f"    step {n}.{s} {s} {n}\n" for s in steps)
        parts.append(f'step {n}.mount share_mount {n}\n'
                     f'if [ "$(cat "$CTL/{n}.mount.rc")" = 0 ]; then\n{body}fi\n')
    parts.append("sync\n")
    return "".join(parts)


# --------------------------------------------------------------------------- host side


def make_tree(root: Path) -> None:
    """A small tree for ``cp -a``: sizes, nesting, modes, a symlink, a hard link, mtimes."""
    nested = root / "a" / "b" / "c"
    nested.mkdir(parents=True)
    (root / "big.bin").write_bytes(random_bytes(1, (1 << 20) + 4097))
    (root / "small.txt").write_text("small\n")
    (root / "empty").write_bytes(b"")
    (nested / "deep.bin").write_bytes(random_bytes(2, 5000))
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "script.sh", 0o755)
    (root / "private.txt").write_text("private\n")
    os.chmod(root / "private.txt", 0o600)
    os.symlink("a/b/c/deep.bin", root / "link")
    os.link(root / "small.txt", root / "hardlink.txt")
    for i, (dirpath, dirnames, filenames) in enumerate(os.walk(root, topdown=False)):
        for j, name in enumerate(sorted(dirnames + filenames)):
            t = 1_500_000_000 + 1000 * i + j
            os.utime(Path(dirpath) / name, (t, t), follow_symlinks=False)
    os.utime(root, (1_600_000_000, 1_600_000_000))


@dataclass
class Daemon:
    """One launcher's shardfs: where it runs and what was seen of it."""

    launcher: Launcher
    #: shardfs, or virtiofsd (the reference run)
    binary: Path
    shared: Path
    socket_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    #: Why it did not come up the way its launcher waits for it (None: it did).
    error: str | None = None
    ready_s: float = 0.0
    #: The pid file's text when the launcher saw it (virtiofsd removes it at exit).
    pid_file_text: str | None = None
    #: The status snapshot once it served (``shardfs stats``), or why there was none.
    stats: dict[str, Any] | None = None
    stats_error: str | None = None
    #: pid -> (mount namespace, /proc "Seccomp:" mode) of each worker, once up.
    workers: dict[int, tuple[str, int]] = field(default_factory=dict)
    #: After QEMU exited: did the daemon exit by itself, with what status, and what
    #: of its process group was still there once it had.
    exited_by_itself: bool = False
    returncode: int | None = None
    leftovers: list[int] = field(default_factory=list)
    submount: Path | None = None
    pumps: list[threading.Thread] = field(default_factory=list)

    @property
    def pid_file(self) -> Path:
        """virtiofsd's pid file, next to its socket (what virtme-ng waits for)."""
        return Path(f"{self.socket_path}.pid")

    @property
    def stats_socket(self) -> Path:
        if self.launcher.socket == "fd":
            assert self.proc is not None
            run = "/run" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR", "/run")
            return Path(run) / "shardfs" / f"stats-{self.proc.pid}.sock"
        return Path(f"{self.socket_path}.stats")

    def describe(self) -> str:
        cmd = self.launcher.argv(str(self.shared), str(self.socket_path))
        return (f"launcher {self.launcher.name}: {self.binary} {' '.join(cmd)}\n"
                f"--- daemon log {self.log_path} (tail) ---\n{tail(read_text(self.log_path), 40)}")


def _pump(pipe: Any, log_path: Path, ready: threading.Event) -> None:
    """Copy the daemon's stderr to its log, as runtime-rs reads it line by line
    (run_virtiofsd()), and flag the ready line."""
    with open(log_path, "ab") as log:
        for line in iter(pipe.readline, b""):
            log.write(line)
            log.flush()
            if VIRTIOFSD_READY_LINE.encode() in line:
                ready.set()


def _wait_for(what: str, d: Daemon, done: Any, deadline: float) -> None:
    """Poll ``done()`` until true; d.error if the daemon died or the deadline passed."""
    assert d.proc is not None
    while not done():
        if d.proc.poll() is not None:
            d.error = f"exited with status {d.proc.returncode} before {what}"
            return
        if time.monotonic() > deadline:
            d.error = f"no {what} within {START_TIMEOUT_S:.0f}s"
            return
        time.sleep(POLL_S)


def launch(d: Daemon, env_extra: dict[str, str]) -> None:
    """Start d's daemon the way its launcher does and wait the way it waits."""
    spec = d.launcher
    argv = [str(d.binary), *spec.argv(str(d.shared), str(d.socket_path))]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **spec.env, **env_extra)
    listener: socket.socket | None = None
    if spec.socket == "fd":
        # As Kata's getSocketFD(): bind and listen on the socket path, then hand the
        # listener over as the first of cmd.ExtraFiles, fd 3 in the child.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(d.socket_path))
        listener.listen()
    listen_fd = listener.fileno() if listener is not None else -1

    def preexec() -> None:  # pragma: no cover - runs in the child
        _die_with_parent()
        if listen_fd >= 0:
            os.dup2(listen_fd, GO_FIRST_EXTRA_FD)
            os.set_inheritable(GO_FIRST_EXTRA_FD, True)  # also when listen_fd was 3

    start = time.monotonic()
    with open(d.log_path, "wb") as log:
        d.proc = subprocess.Popen(
            argv, cwd=d.shared if spec.cwd_is_share else d.shared.parent, env=env,
            stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.PIPE if spec.ready == "stderr" else log,
            start_new_session=True, preexec_fn=preexec,
            # fd 3 must survive: Python's own fds are close-on-exec anyway.
            close_fds=listener is None)
    if listener is not None:
        listener.close()  # Kata closes its copy too (defer socketFD.Close())
    deadline = start + START_TIMEOUT_S
    if spec.ready == "stderr":
        ready = threading.Event()
        assert d.proc.stderr is not None
        pump = threading.Thread(target=_pump, args=(d.proc.stderr, d.log_path, ready),
                                daemon=True)
        pump.start()
        d.pumps.append(pump)
        _wait_for(f"the line {VIRTIOFSD_READY_LINE!r} on stderr (Kata runtime-rs waits for it)",
                  d, ready.is_set, deadline)
    elif spec.ready == "socket":
        _wait_for("its socket (podman polls for the path)", d, d.socket_path.exists, deadline)
    elif spec.ready == "pidfile":
        _wait_for(f"{d.pid_file} (virtme-ng waits for virtiofsd's pid file)", d,
                  d.pid_file.exists, deadline)
    d.ready_s = time.monotonic() - start
    if d.error is None and spec.ready == "pidfile":
        # The pid is written just after the file is created; virtme-ng reads it later.
        _wait_for("a pid in the pid file", d, lambda: _read_pid(d) is not None, deadline)
    if d.error is None and d.binary == SHARDFS:
        observe(d, deadline)


def _read_pid(d: Daemon) -> int | None:
    try:
        d.pid_file_text = d.pid_file.read_text()
        return int(d.pid_file_text.strip())
    except (OSError, ValueError):
        return None


def query_stats(path: Path) -> dict[str, Any] | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(path))
            s.sendall(b"json\n")
            chunks = []
            while chunk := s.recv(1 << 16):
                chunks.append(chunk)
        result: dict[str, Any] = json.loads(b"".join(chunks))
        return result
    except (OSError, ValueError):
        return None


def observe(d: Daemon, deadline: float) -> None:
    """Once the daemon answers on its status socket (answered only from its serving
    loop, so every worker is up and confined), note each worker's sandbox."""
    assert d.proc is not None
    while (snap := query_stats(d.stats_socket)) is None:
        if d.proc.poll() is not None:  # an inherited socket hides this from the launcher
            d.error = f"exited with status {d.proc.returncode} before serving"
            return
        if time.monotonic() > deadline:
            d.stats_error = f"no answer on the status socket {d.stats_socket}"
            return
        time.sleep(POLL_S)
    d.stats = snap
    for proc in snap.get("processes", []):
        if not str(proc.get("name", "")).startswith("worker"):
            continue
        pid = int(proc["pid"])
        status = Path(f"/proc/{pid}/status").read_text()
        found = re.search(r"^Seccomp:\s+(\d+)", status, re.MULTILINE)
        d.workers[pid] = (os.readlink(f"/proc/{pid}/ns/mnt"), int(found.group(1)) if found else -1)


def stop(d: Daemon) -> None:
    """After QEMU exited: let the daemon exit by itself (virtiofsd does), then stop
    what is left as its launcher would, and note leftovers."""
    if d.proc is None:
        return
    pgid = d.proc.pid
    if d.proc.poll() is None and d.error is None:
        signalled = True
        if d.launcher.stop == "sigkill":
            d.proc.send_signal(signal.SIGKILL)  # Kata's Stop() / shutdown_virtiofsd()
        elif d.launcher.stop == "sigterm-pidfile" and d.pid_file_text:
            # virtme-ng's _cleanup_virtiofs_temp_files(): SIGTERM the pid in the pid file
            os.kill(int(d.pid_file_text.strip()), signal.SIGTERM)
        else:
            signalled = False  # podman: nothing stops it but its own exit
        if signalled:
            try:
                d.proc.wait(timeout=EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
    deadline = time.monotonic() + LEFTOVER_TIMEOUT_S
    while (members := _group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    d.leftovers = members
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    d.proc.wait()
    for pump in d.pumps:
        pump.join(timeout=EXIT_TIMEOUT_S)


class SyslogSink:
    """A syslog socket for the daemon to log to (``SHARDFS_SYSLOG_SOCKET``): every
    datagram is kept, read by a thread so that a sender never blocks on it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                self.messages.append(self.sock.recv(1 << 16))
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        self.sock.close()


@dataclass
class LaunchBoot:
    binary: Path
    daemons: dict[str, Daemon]
    result: GuestResult | None
    boot_error: str | None
    syslog: list[bytes]
    pristine: Path

    def guest(self) -> GuestResult:
        if self.result is None:
            pytest.fail(f"the guest did not run: {self.boot_error}", pytrace=False)
        return self.result

    def daemon(self, name: str) -> Daemon:
        d = self.daemons[name]
        if d.error is not None:
            pytest.fail(f"{name}: shardfs did not start as the stack starts virtiofsd: "
                        f"{d.error}\n{d.describe()}", pytrace=False)
        return d

    def step(self, name: str, step: str) -> None:
        """Fail unless guest step NAME.STEP exited 0 (and the share mounted)."""
        result = self.guest()
        d = self.daemon(name)
        for s in ("mount", step):
            rc = result.ctl(f"{name}.{s}.rc").strip()
            if rc != "0":
                raise AssertionError(
                    f"guest step {name}.{s} " + ("did not run" if not rc else f"exited {rc}")
                    + f"\n--- step log ---\n{result.ctl(f'{name}.{s}.log')}\n"
                    + result.describe(lines=40) + "\n" + d.describe())


def _unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def daemon_binary(kind: str) -> Path:
    """scripts/shardfs, or the peer virtiofsd (a missing one fails under scripts/test)."""
    if kind == "shardfs":
        return SHARDFS
    peer = find_virtiofsd(None)
    if peer is None:
        if os.environ.get("SHARDFS_REQUIRE_PEER") == "1":
            pytest.fail("virtiofsd is missing: run scripts/get-virtiofsd", pytrace=False)
        pytest.skip("virtiofsd is missing (scripts/get-virtiofsd fetches it)")
    return Path(peer)


def launch_boot(kind: str, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[LaunchBoot]:
    """Start every launcher's daemon (shardfs or virtiofsd), boot once, observe."""
    binary = daemon_binary(kind)
    base = tmp_path_factory.mktemp(f"launchers-{kind}")
    work = base / "boot"
    shares = work / "ctl" / "shares"  # inside the 9p ctl share: the guest can change them
    shares.mkdir(parents=True)
    pristine = base / "pristine"
    make_tree(pristine)
    sock_dir = Path(tempfile.mkdtemp(prefix="shardfs-l-"))  # short: sockaddr_un
    sink = SyslogSink(sock_dir / "syslog")
    daemons: dict[str, Daemon] = {}
    result: GuestResult | None = None
    boot_error: str | None = None
    try:
        for spec in LAUNCHERS:
            shared = shares / spec.name
            shared.mkdir()
            subprocess.run(["cp", "-a", str(pristine), str(shared / "tree")], check=True)
            (shared / "cache-probe.txt").write_text("version-1\n")
            if spec.socket == "path" and spec.ready == "pidfile":
                # virtme-ng: tempfile.mkstemp(prefix="virtme"), removed again before start
                fd, name = tempfile.mkstemp(prefix="virtme", dir=sock_dir)
                os.close(fd)
                os.unlink(name)
                sock = Path(name)
            else:
                sock = sock_dir / f"{spec.name}.sock"
            d = daemons[spec.name] = Daemon(spec, binary, shared, sock,
                                            base / f"{spec.name}.log")
            if not spec.readonly:
                # Mounted before the daemon starts: its workers take their mounts then.
                d.submount = shared / "submnt"
                d.submount.mkdir()
                subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "launcher-sub",
                                str(d.submount)], check=True)
                (d.submount / "inside.txt").write_text(f"on the submount of {spec.name}\n")
            # One syslog-speaking launcher logs to a socket of ours, to see --syslog work;
            # the others get the machine's (CI has no /dev/log: virtiofsd runs all the same).
            launch(d, {"SHARDFS_SYSLOG_SOCKET": str(sink.path)} if spec.name == "kata3" else {})
        up = [d for d in daemons.values() if d.error is None]
        devices: list[str] = []
        for i, d in enumerate(up):
            props = ",".join(p for p in ("vhost-user-fs-pci", f"chardev=lfs{i}",
                                         f"tag={d.launcher.name}", d.launcher.device) if p)
            devices += ["-chardev", f"socket,id=lfs{i},path={qemu_escape(d.socket_path)}",
                        "-device", props]
        original = guest.qemu_command
        with pytest.MonkeyPatch.context() as mp:
            # run_guest() builds QEMU's command with qemu_command(); add our devices.
            mp.setattr(guest, "qemu_command",
                       lambda image, **kw: original(image, **kw) + devices)
            try:
                result = guest.run_guest(guest_script(up), work_dir=work, socket_path=None,
                                         image=guest_image, timeout_s=BOOT_TIMEOUT_S)
            except AssertionError as e:  # GuestTimeout
                boot_error = str(e)
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        for d in up:
            if d.proc is not None:
                try:
                    d.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                    d.exited_by_itself = True
                except subprocess.TimeoutExpired:
                    pass
                d.returncode = d.proc.returncode
    finally:
        for d in daemons.values():
            stop(d)
            if d.submount is not None:
                _unmount(d.submount)
        sink.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    yield LaunchBoot(binary, daemons, result, boot_error, sink.messages, pristine)


@pytest.fixture(scope="module")
def shardfs_boot(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[LaunchBoot]:
    yield from launch_boot("shardfs", guest_image, tmp_path_factory)


@pytest.fixture(scope="module")
def virtiofsd_boot(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[LaunchBoot]:
    yield from launch_boot("virtiofsd", guest_image, tmp_path_factory)


@pytest.fixture(params=["shardfs", "virtiofsd"])
def boot(request: pytest.FixtureRequest) -> LaunchBoot:
    """The boot of this test's daemon kind, its logs attached, known gaps marked."""
    launch_boot: LaunchBoot = request.getfixturevalue(f"{request.param}_boot")
    return prepare(launch_boot, request)


@pytest.fixture
def shardfs_only(shardfs_boot: LaunchBoot, request: pytest.FixtureRequest) -> LaunchBoot:
    """For the checks that read shardfs's status socket (virtiofsd has none)."""
    return prepare(shardfs_boot, request)


def prepare(launch_boot: LaunchBoot, request: pytest.FixtureRequest) -> LaunchBoot:
    node = request.node
    if launch_boot.result is not None:
        attach_artifact(node, "guest console", launch_boot.result.work_dir / "console.log")
        attach_artifact(node, "qemu output", launch_boot.result.work_dir / "qemu.log")
    callspec = getattr(node, "callspec", None)
    name = callspec.params.get("name") if callspec is not None else None
    if name is not None:
        attach_artifact(node, f"{name} daemon log", launch_boot.daemons[name].log_path)
    return launch_boot


NAMES = [launcher.name for launcher in LAUNCHERS]
RW_NAMES = [launcher.name for launcher in LAUNCHERS if not launcher.readonly]
RO_NAMES = [launcher.name for launcher in LAUNCHERS if launcher.readonly]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", NAMES)
def test_starts_as_its_stack_starts_virtiofsd(boot: LaunchBoot, name: str) -> None:
    d = boot.daemon(name)
    assert d.proc is not None
    if d.launcher.ready == "pidfile":
        # virtme-ng reads the pid to SIGTERM from it.
        assert (d.pid_file_text or "").strip() == str(d.proc.pid)
        if d.ready_s > VIRTME_PIDFILE_PATIENCE_S:
            print(f"note: the pid file took {d.ready_s:.1f}s; virtme-ng waits "
                  f"{VIRTME_PIDFILE_PATIENCE_S}s before falling back to 9p")


@pytest.mark.parametrize("name", NAMES)
def test_status_socket(shardfs_only: LaunchBoot, name: str) -> None:
    """``shardfs stats`` reaches a daemon a stack started: next to --socket-path, or
    at /run/shardfs/stats-PID.sock with --fd alone; it names the launcher's share."""
    d = shardfs_only.daemon(name)
    assert d.stats is not None, f"{d.stats_error}\n{d.describe()}"
    assert os.path.realpath(os.path.join(d.shared, d.stats["shared_dir"])) == str(d.shared)


@pytest.mark.parametrize("name", RW_NAMES)
def test_workload(boot: LaunchBoot, name: str) -> None:
    """Write and read back, mkdir, rename, cp -a: checked on the host, byte for byte."""
    boot.step(name, "rw_workload")
    result, shared = boot.guest(), boot.daemons[name].shared
    digest = result.ctl(f"{name}.written.sha256").strip()
    assert sha256_file(shared / "written.bin") == digest
    assert (shared / "written.bin").stat().st_size == 1234567
    assert stat.S_IMODE((shared / "made").stat().st_mode) == 0o750
    assert (shared / "made" / "deeper").is_dir()
    assert (shared / "made" / "after-rename.txt").read_text() == "renamed in the guest\n"
    assert not (shared / "before-rename.txt").exists()
    assert_same_tree(boot.pristine, shared / "tree-copy")
    assert_same_tree(boot.pristine, shared / "tree")


@pytest.mark.parametrize("name", RO_NAMES)
def test_readonly_share(boot: LaunchBoot, name: str) -> None:
    """--readonly: reads work, every change is refused with EROFS, the host is untouched."""
    boot.step(name, "ro_read")
    boot.step(name, "ro_writes")
    shared = boot.daemons[name].shared
    assert boot.guest().ctl(f"{name}.big.sha256").strip() == sha256_file(shared / "tree" /
                                                                          "big.bin")
    assert_same_tree(boot.pristine, shared / "tree")
    assert not (shared / "created.txt").exists() and not (shared / "created-dir").exists()


@pytest.mark.parametrize("name", RW_NAMES)
def test_xattrs_as_virtiofsd(boot: LaunchBoot, name: str) -> None:
    """virtiofsd serves xattrs only with --xattr: without it setfattr fails in the guest."""
    boot.step(name, "xattr_probe")
    d, result = boot.daemons[name], boot.guest()
    rc = int(result.ctl(f"{name}.setfattr.rc").strip())
    probe = d.shared / "xattr-probe"
    if d.launcher.xattr:
        assert rc == 0, result.ctl(f"{name}.setfattr.err")
        assert os.getxattr(probe, XATTR_NAME) == XATTR_VALUE
    else:
        assert rc != 0, "setfattr worked on a share started without --xattr"
        assert os.strerror(errno.EOPNOTSUPP) in result.ctl(f"{name}.setfattr.err")
        assert XATTR_NAME not in os.listxattr(probe)


@pytest.mark.parametrize("name", RW_NAMES)
def test_submounts_as_virtiofsd(boot: LaunchBoot, name: str) -> None:
    """--announce-submounts (virtiofsd 1.13's default): a mount under the share is its
    own submount in the guest, with its own st_dev; --no-announce-submounts: it is not."""
    boot.step(name, "submount_probe")
    d, result = boot.daemons[name], boot.guest()
    assert result.ctl(f"{name}.submount.txt") == f"on the submount of {name}\n"
    root_dev, sub_dev = (result.ctl(f"{name}.dev.{w}").strip() for w in ("root", "sub"))
    listed = int(result.ctl(f"{name}.submount.mounts").strip() or 0)
    if d.launcher.announce_submounts:
        assert root_dev != sub_dev and listed >= 1, (root_dev, sub_dev, listed)
    else:
        assert root_dev == sub_dev and listed == 0, (root_dev, sub_dev, listed)


@pytest.mark.parametrize("name", CACHE_PROBED)
def test_cache_reopen_sees_host_change(boot: LaunchBoot, name: str) -> None:
    """A file changed on the host is read anew, size and data, at the guest's next open,
    under --cache auto and --cache always alike: what virtiofsd 1.13 gives a Linux 6.12
    guest (checked with SHARDFS_LAUNCHERS_DAEMON).  Between the two policies nothing
    is observable without a dependence on timing (auto's 1 s attribute timeout)."""
    boot.step(name, "cache_probe")
    result = boot.guest()
    assert result.ctl(f"{name}.cache.before") == "version-1\n"
    assert result.ctl(f"{name}.cache.after") == "version-two\n", boot.daemons[name].launcher


@pytest.mark.parametrize("name", NAMES)
def test_sandbox_as_virtiofsd(shardfs_only: LaunchBoot, name: str) -> None:
    """--sandbox namespace (the default) puts the workers in a mount namespace of their
    own, --sandbox none leaves them in ours; --seccomp none loads no filter."""
    d = shardfs_only.daemon(name)
    assert d.workers, f"no worker seen: {d.stats_error}\n{d.describe()}"
    own = os.readlink("/proc/self/ns/mnt")
    for pid, (ns, seccomp) in d.workers.items():
        assert (ns != own) is (d.launcher.sandbox == "namespace"), (pid, ns, own)
        want = SECCOMP_MODE_DISABLED if d.launcher.seccomp == "none" else SECCOMP_MODE_FILTER
        assert seccomp == want, (pid, seccomp)


@pytest.mark.parametrize("name", NAMES)
def test_exits_when_the_vmm_goes_away(boot: LaunchBoot, name: str) -> None:
    """virtiofsd serves one frontend and exits 0 when it disconnects: podman only
    releases the process, so a daemon that stayed would leak one per VM start."""
    boot.guest()
    d = boot.daemon(name)
    assert d.exited_by_itself, (f"still running {EXIT_TIMEOUT_S:.0f}s after QEMU exited\n"
                                + d.describe())
    assert d.returncode == 0, d.describe()
    assert not d.leftovers, f"processes left behind: {d.leftovers}\n{d.describe()}"
    assert "Traceback (most recent call last)" not in read_text(d.log_path), d.describe()


def test_kata_syslog_goes_to_syslog(shardfs_only: LaunchBoot) -> None:
    """Kata passes --syslog: the daemon's log goes to the syslog socket."""
    shardfs_only.daemon("kata3")
    assert any(b"shardfs" in m for m in shardfs_only.syslog), shardfs_only.syslog[:5]
