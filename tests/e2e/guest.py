"""Helpers for the end-to-end tests: boot a real Linux guest in QEMU against shardfs.

The guest (built by ``scripts/build-guest``) mounts the host's ``/`` read-only
over 9p, chroots into it and runs ``/run/ctl/script.sh`` from a per-run
read-write 9p share (the *ctl dir*), so guest scripts use the host's own
binaries (git, sqlite3, stress-ng, tar, cp).  The script's exit status lands in
``<ctl>/exit_code`` and its output in ``<ctl>/script.log`` and on the serial
console.  Scripts mount the virtio-fs share themselves
(``mount -t virtiofs shardfs /mnt``).

Nothing here depends on timing except one generous overall timeout per boot,
which kills QEMU and fails loudly with the tail of the console log.

Environment knobs (all optional):

``SHARDFS_QEMU``            QEMU binary (default ``qemu-system-x86_64``)
``SHARDFS_GUEST_ACCEL``     ``tcg`` (default) or ``kvm``; KVM does not work on the CI machines
``SHARDFS_GUEST_DIR``       where ``scripts/build-guest`` puts the guest (default ``.guest``)
``SHARDFS_GUEST_TIMEOUT``   multiplier for every boot timeout (default 1)
``SHARDFS_REQUIRE_GUEST``   ``1``: fail instead of skipping when QEMU or the kernel is missing
``SHARDFS_E2E_DAEMON_ARGS`` extra arguments for the daemon (shell syntax)
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_GUEST = REPO_ROOT / "scripts" / "build-guest"
GUEST_DIR = Path(os.environ.get("SHARDFS_GUEST_DIR", str(REPO_ROOT / ".guest")))
QEMU = os.environ.get("SHARDFS_QEMU", "qemu-system-x86_64")
ACCEL = os.environ.get("SHARDFS_GUEST_ACCEL", "tcg")
TIMEOUT_SCALE = float(os.environ.get("SHARDFS_GUEST_TIMEOUT", "1"))

#: Where the ctl share is mounted inside the guest (also exported as $CTL).
GUEST_CTL = "/run/ctl"
#: Default overall timeout for one boot, in seconds.
DEFAULT_TIMEOUT_S = 180.0
#: After the daemon dies mid-boot, how long the guest may still log before QEMU is killed.
DAEMON_DEATH_GRACE_S = 5.0
#: Longest Unix socket path that fits in sockaddr_un (108 bytes incl. NUL).
_MAX_SUN_PATH = 107

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child after fork
    """preexec_fn: SIGKILL the child if the test process dies (no leftovers even on os._exit)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal the whole process group of *proc* (it was started in a new session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group *pgid*."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state, fields[2] the process group
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry.name))
    return members


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def short_socket_dir(preferred: Path) -> tuple[Path, bool]:
    """A directory for a Unix socket whose path fits in sockaddr_un.

    Returns ``(dir, is_temporary)``; a temporary directory must be removed by the caller.
    """
    if len(str(preferred / "vhost-user-fs.sock")) <= _MAX_SUN_PATH:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred, False
    return Path(tempfile.mkdtemp(prefix="shardfs-sock-")), True


# --------------------------------------------------------------------------- guest image


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


_prereq_cache: dict[str, str | None] = {}


def missing_prerequisites() -> str | None:
    """Why guest tests cannot run here (QEMU or kernel missing), or None if they can."""
    if "reason" in _prereq_cache:
        return _prereq_cache["reason"]
    reason: str | None = None
    hint = "run scripts/install-test-deps as root"
    qemu = shutil.which(QEMU)
    if qemu is None:
        reason = f"{QEMU} not found ({hint})"
    else:
        probe = subprocess.run(
            [qemu, "-device", "help"], capture_output=True, text=True, timeout=60, check=False
        )
        if "vhost-user-fs-pci" not in probe.stdout:
            reason = f"{qemu} has no vhost-user-fs-pci device ({hint})"
    if reason is None:
        kernel = subprocess.run(
            [str(BUILD_GUEST), "--print-kernel"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if kernel.returncode != 0:
            reason = f"no usable guest kernel: {kernel.stderr.strip()} ({hint})"
    _prereq_cache["reason"] = reason
    return reason


def build_guest() -> GuestImage:
    """Run ``scripts/build-guest`` (a no-op when its inputs did not change)."""
    env = dict(os.environ, SHARDFS_GUEST_DIR=str(GUEST_DIR))
    res = subprocess.run(
        [str(BUILD_GUEST)], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(
            f"scripts/build-guest failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}"
        )
    image = GuestImage(kernel=GUEST_DIR / "vmlinuz", initrd=GUEST_DIR / "initramfs.cpio.gz")
    for p in (image.kernel, image.initrd):
        if not p.exists():
            raise RuntimeError(f"scripts/build-guest did not produce {p}")
    return image


# --------------------------------------------------------------------------- running


class GuestTimeout(AssertionError):
    """The guest did not power off within its timeout, or its daemon died (QEMU was killed)."""


@dataclass
class GuestResult:
    #: Exit status of script.sh, or None if it never finished (guest crashed, init failed, ...).
    exit_code: int | None
    console_log: str
    ctl_dir: Path
    qemu_returncode: int
    qemu_log: str
    duration_s: float
    work_dir: Path
    command: list[str] = field(default_factory=list)

    @property
    def script_log(self) -> str:
        return read_text(self.ctl_dir / "script.log")

    def ctl(self, name: str) -> str:
        """Text of a file the guest script wrote to $CTL (empty if missing)."""
        return read_text(self.ctl_dir / name)

    def describe(self, lines: int = 80) -> str:
        parts = [
            f"guest script exit code: {self.exit_code}, qemu exit: {self.qemu_returncode}, "
            f"{self.duration_s:.1f}s, work dir {self.work_dir}",
        ]
        init_error = self.ctl("init_error").strip()
        if init_error:
            parts.append(f"guest init error: {init_error}")
        if self.qemu_log.strip():
            parts.append("--- qemu output (tail) ---\n" + tail(self.qemu_log, 20))
        parts.append(f"--- console log (tail) ---\n{tail(self.console_log, lines)}")
        return "\n".join(parts)

    def assert_ok(self) -> None:
        """Fail with the console tail unless the script ran and exited 0."""
        if self.exit_code != 0:
            raise AssertionError("guest script failed\n" + self.describe())


def qemu_escape(value: object) -> str:
    """Escape a value for a QEMU ``key=value,...`` option (commas are doubled)."""
    return str(value).replace(",", ",,")


def virtiofs_args(
    socket_path: Path, *, tag: str, num_request_queues: int, queue_size: int = 1024
) -> list[str]:
    return [
        "-chardev", f"socket,id=vfs,path={qemu_escape(socket_path)}",
        "-device",
        f"vhost-user-fs-pci,chardev=vfs,tag={tag},"
        f"num-request-queues={num_request_queues},queue-size={queue_size}",
    ]


def qemu_command(
    image: GuestImage,
    *,
    ctl_dir: Path,
    console_path: Path,
    socket_path: Path | None,
    tag: str,
    num_request_queues: int,
    vcpus: int,
    mem: str,
    append: str = "",
) -> list[str]:
    cmd = [
        QEMU,
        "-machine", "q35",
        "-accel", ACCEL,
        "-m", mem,
        "-smp", str(vcpus),
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-numa", "node,memdev=mem",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", f"console=ttyS0 quiet panic=-1 {append}".strip(),
        "-nographic",
        "-nodefaults",
        "-no-user-config",
        "-monitor", "none",
        "-chardev", f"file,id=console,path={qemu_escape(console_path)}",
        "-serial", "chardev:console",
        "-no-reboot",
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=ctl,path={qemu_escape(ctl_dir)},security_model=none,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=ctl,mount_tag=ctl",
    ]
    if ACCEL == "kvm":
        cmd += ["-cpu", "host"]
    if socket_path is not None:
        cmd += virtiofs_args(socket_path, tag=tag, num_request_queues=num_request_queues)
    return cmd


def run_guest(
    script: str,
    *,
    work_dir: Path,
    socket_path: Path | None,
    image: GuestImage | None = None,
    tag: str = "shardfs",
    num_request_queues: int = 1,
    vcpus: int = 1,
    mem: str = "512M",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    append: str = "",
) -> GuestResult:
    """Boot the guest, run *script* (POSIX sh) in it, and return when it powered off.

    *socket_path* is the vhost-user-fs socket of a running backend, or None for a
    guest without a virtio-fs device.  In the script, ``$CTL`` is a read-write
    directory shared with the host (``result.ctl_dir``).  Raises GuestTimeout
    (after killing QEMU) if the guest is still running after *timeout_s*, or soon
    after the daemon serving *socket_path* (a ShardfsDaemon) exited.
    """
    if image is None:
        image = build_guest()
    work_dir.mkdir(parents=True, exist_ok=True)
    ctl_dir = work_dir / "ctl"
    ctl_dir.mkdir(exist_ok=True)
    for stale in ("exit_code", "script.log", "init_error"):
        (ctl_dir / stale).unlink(missing_ok=True)
    (ctl_dir / "script.sh").write_text(script)
    console_path = work_dir / "console.log"
    console_path.unlink(missing_ok=True)
    qemu_log_path = work_dir / "qemu.log"
    cmd = qemu_command(
        image,
        ctl_dir=ctl_dir,
        console_path=console_path,
        socket_path=socket_path,
        tag=tag,
        num_request_queues=num_request_queues,
        vcpus=vcpus,
        mem=mem,
        append=append,
    )
    (work_dir / "qemu.cmd").write_text(shlex.join(cmd) + "\n")
    timeout = timeout_s * TIMEOUT_SCALE
    start = time.monotonic()
    with open(qemu_log_path, "wb") as qemu_log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=qemu_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        daemon = ShardfsDaemon.serving(socket_path)
        abort_reason: str | None = None
        abort_at = 0.0
        try:
            while True:
                try:
                    returncode = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                if abort_reason is None and daemon is not None and daemon.exited():
                    # The guest's virtio-fs requests would hang forever: give the
                    # console a moment to show errors, then stop.
                    abort_reason = (
                        f"the shardfs daemon exited (status {daemon.proc_returncode()}) "
                        "while the guest was running"
                    )
                    abort_at = now + DAEMON_DEATH_GRACE_S
                if abort_reason is not None and now >= abort_at:
                    message = abort_reason + "; QEMU killed"
                elif now - start >= timeout:
                    message = f"guest did not finish within {timeout:.0f}s; QEMU killed"
                else:
                    continue
                _kill_group(proc)
                proc.wait()
                details = GuestResult(
                    exit_code=None,
                    console_log=read_text(console_path),
                    ctl_dir=ctl_dir,
                    qemu_returncode=proc.returncode,
                    qemu_log=read_text(qemu_log_path),
                    duration_s=time.monotonic() - start,
                    work_dir=work_dir,
                    command=cmd,
                ).describe()
                if daemon is not None:
                    details += "\n" + daemon.describe(lines=40)
                raise GuestTimeout(message + "\n" + details)
        finally:
            # Whatever happened (pytest-timeout, KeyboardInterrupt, ...): no QEMU left behind.
            _kill_group(proc)
            proc.wait()
    duration = time.monotonic() - start
    code_text = read_text(ctl_dir / "exit_code").strip()
    exit_code = int(code_text) if code_text.lstrip("-").isdigit() else None
    return GuestResult(
        exit_code=exit_code,
        console_log=read_text(console_path),
        ctl_dir=ctl_dir,
        qemu_returncode=returncode,
        qemu_log=read_text(qemu_log_path),
        duration_s=duration,
        work_dir=work_dir,
        command=cmd,
    )


# --------------------------------------------------------------------------- daemon


class DaemonError(AssertionError):
    """The shardfs daemon failed to start or exited abnormally."""


def daemon_python() -> str:
    venv_python = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


class ShardfsDaemon:
    """The shardfs daemon as a real subprocess (``python -m shardfs``).

    Extra daemon arguments can be given in ``$SHARDFS_E2E_DAEMON_ARGS`` (shell
    syntax), e.g. to try a different cache policy without editing the tests.
    """

    _serving: dict[str, ShardfsDaemon] = {}

    @classmethod
    def serving(cls, socket_path: Path | None) -> ShardfsDaemon | None:
        """The daemon started by this process that listens on *socket_path*, if any."""
        if socket_path is None:
            return None
        return cls._serving.get(str(socket_path))

    def __init__(
        self,
        *,
        socket_path: Path,
        shared_dir: Path,
        log_path: Path,
        tag: str = "shardfs",
        num_request_queues: int = 1,
        log_level: str = "debug",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.socket_path = socket_path
        self.shared_dir = shared_dir
        self.log_path = log_path
        self.tag = tag
        self.num_request_queues = num_request_queues
        self.command = [
            daemon_python(), "-m", "shardfs",
            "--socket-path", str(socket_path),
            "--shared-dir", str(shared_dir),
            "--tag", tag,
            "--num-request-queues", str(num_request_queues),
            "--log-level", log_level,
            # The workloads copy and check xattrs (cp -a, stress-ng); xattrs are off
            # unless asked for, as in virtiofsd, and later arguments may turn them off.
            "--xattr",
            # A test may boot several guests against one daemon.
            "--no-once",
            *shlex.split(os.environ.get("SHARDFS_E2E_DAEMON_ARGS", "")),
            *extra_args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.sent_sigterm = False
        self.needed_sigkill = False
        self.leftover_pids: list[int] = []

    @property
    def log(self) -> str:
        return read_text(self.log_path)

    def describe(self, lines: int = 60) -> str:
        return (
            f"daemon: {shlex.join(self.command)}\n"
            f"--- daemon log {self.log_path} (tail) ---\n{tail(self.log, lines)}"
        )

    def start(self, timeout_s: float = 60.0) -> ShardfsDaemon:
        """Start the daemon and wait until its socket exists (or it dies)."""
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        ShardfsDaemon._serving[str(self.socket_path)] = self
        deadline = time.monotonic() + timeout_s * TIMEOUT_SCALE
        while True:
            if self._socket_ready():
                return self
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                raise DaemonError(
                    f"shardfs daemon exited with {self.returncode} before creating "
                    f"{self.socket_path}\n{self.describe()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise DaemonError(
                    f"shardfs daemon did not create {self.socket_path} within "
                    f"{timeout_s:.0f}s\n{self.describe()}"
                )
            time.sleep(0.05)

    def _socket_ready(self) -> bool:
        try:
            return stat.S_ISSOCK(os.stat(self.socket_path).st_mode)
        except FileNotFoundError:
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def proc_returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc.wait()
            self.returncode = self.proc.returncode

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the daemon (if still running), wait; SIGKILL if it hangs.

        Processes the daemon left behind in its process group (e.g. queue
        workers) are noted in ``leftover_pids`` and killed.
        """
        if self.proc is None:
            return None
        ShardfsDaemon._serving.pop(str(self.socket_path), None)
        if self.proc.poll() is None:
            self.sent_sigterm = True
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s * TIMEOUT_SCALE)
            except subprocess.TimeoutExpired:
                self.needed_sigkill = True
                _kill_group(self.proc)
                self.proc.wait()
        self.returncode = self.proc.returncode
        deadline = time.monotonic() + 5.0
        while (members := _group_members(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if members:
            self.leftover_pids = members
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.returncode

    def problems(self) -> list[str]:
        """Why the daemon's exit counts as abnormal (empty if it exited cleanly)."""
        found: list[str] = []
        if self.needed_sigkill:
            found.append("did not exit within the timeout after SIGTERM (killed with SIGKILL)")
        rc = self.returncode
        clean = {0} | ({-signal.SIGTERM} if self.sent_sigterm else set())
        if rc is not None and rc not in clean and not self.needed_sigkill:
            found.append(f"exited with status {rc}")
        if self.leftover_pids:
            found.append(f"left processes running after it exited: {self.leftover_pids}")
        if "Traceback (most recent call last)" in self.log:
            found.append("logged a Python traceback")
        return found

    def stop_and_check(self) -> None:
        self.stop()
        found = self.problems()
        if found:
            raise DaemonError(
                "shardfs daemon exited abnormally: " + "; ".join(found) + "\n" + self.describe()
            )


# --------------------------------------------------------------------------- pytest glue

#: (title, path) of logs to attach to the report of a failing test.
ARTIFACTS = pytest.StashKey[list[tuple[str, Path]]]()


def attach_artifact(node: pytest.Item, title: str, path: Path) -> None:
    node.stash.setdefault(ARTIFACTS, []).append((title, path))


class GuestRunner:
    """:func:`run_guest` with one image, a fresh numbered work dir under
    *base_dir* per boot, and the console and QEMU logs attached to *node*."""

    def __init__(self, image: GuestImage, base_dir: Path, node: pytest.Item | None) -> None:
        self.image = image
        self.base_dir = base_dir
        self.node = node
        self._counter = itertools.count()

    def __call__(
        self,
        script: str,
        *,
        socket_path: Path | None,
        tag: str = "shardfs",
        num_request_queues: int = 1,
        vcpus: int = 1,
        mem: str = "512M",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> GuestResult:
        work_dir = self.base_dir / f"guest{next(self._counter)}"
        if self.node is not None:
            attach_artifact(self.node, "guest console", work_dir / "console.log")
            attach_artifact(self.node, "qemu output", work_dir / "qemu.log")
        return run_guest(script, work_dir=work_dir, socket_path=socket_path, image=self.image,
                         tag=tag, num_request_queues=num_request_queues, vcpus=vcpus, mem=mem,
                         timeout_s=timeout_s)


#: The ``run_guest`` fixture's type, and how tests outside it make one.
RunGuest = make_guest_runner = GuestRunner


class DaemonPool:
    """Starts daemons under *base_dir* (call it); ``close()`` stops them and
    reports problems."""

    def __init__(self, base_dir: Path, node: pytest.Item | None) -> None:
        self.base_dir = base_dir
        self.node = node
        self.daemons: list[ShardfsDaemon] = []
        self._temp_dirs: list[Path] = []
        self._counter = itertools.count()

    def __call__(
        self,
        *,
        shared_dir: Path | None = None,
        tag: str = "shardfs",
        num_request_queues: int = 1,
    ) -> ShardfsDaemon:
        """Start a daemon (``shared_dir`` defaults to *base_dir*/shared)."""
        n = next(self._counter)
        sock_dir, temporary = short_socket_dir(self.base_dir / f"daemon{n}")
        if temporary:
            self._temp_dirs.append(sock_dir)
        log_path = self.base_dir / f"daemon{n}.log"
        if self.node is not None:
            attach_artifact(self.node, "shardfs daemon log", log_path)
        daemon = ShardfsDaemon(
            socket_path=sock_dir / "vhost-user-fs.sock",
            shared_dir=shared_dir if shared_dir is not None else self.base_dir / "shared",
            log_path=log_path,
            tag=tag,
            num_request_queues=num_request_queues,
        )
        self.daemons.append(daemon)
        return daemon.start()

    def close(self) -> list[str]:
        errors = []
        for daemon in self.daemons:
            try:
                daemon.stop_and_check()
            except AssertionError as e:
                errors.append(str(e))
        for d in self._temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        return errors


#: The ``shardfs_daemon`` fixture's type: a pool, called to start a daemon.
StartDaemon = DaemonPool
