"""The command lines other stacks start virtiofsd with, given to shardfs's parser.

Kata Containers, podman machine and virtme-ng each exec virtiofsd with an
argument list of their own and rely on virtiofsd's defaults for whatever they
leave out.  :data:`LAUNCHERS` reproduces those lists as their sources generate
them -- only the paths, the socket and the fd number are ours -- with the
source cited beside each.  The tests here check, without a guest, that
shardfs reads each one as virtiofsd 1.13 would; ``tests/e2e/test_launchers.py``
starts ``scripts/shardfs`` with the same lists and boots a guest against them.

What a launcher also relies on beyond the argument list is recorded with it
(:class:`Launcher`): how it hands over the socket, how it decides the daemon
is up, what it does with stdout/stderr and how it stops the daemon.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

import pytest

from shardfs import cli
from shardfs.compat import parse_command_line
from shardfs.config import Config, load

#: The fd a Go launcher's first ``exec.Cmd.ExtraFiles`` entry gets in the child
#: (0-2 are stdio), which is what Kata passes as ``--fd``.
GO_FIRST_EXTRA_FD = 3

#: The line the Rust virtiofsd logs (info, to stderr) once it listens; Kata's
#: runtime-rs reads the daemon's stderr until it sees it (run_virtiofsd() in
#: src/runtime-rs/crates/resource/src/share_fs/share_virtio_fs_standalone.rs).
VIRTIOFSD_READY_LINE = "Waiting for vhost-user socket connection"


@dataclass(frozen=True)
class Launcher:
    """One stack's way of starting virtiofsd, and what virtiofsd makes of it.

    ``argv(shared_dir, socket_path)`` is the argument list after the binary.
    ``socket`` is ``"fd"`` when the launcher binds and listens itself and
    passes the socket as fd :data:`GO_FIRST_EXTRA_FD`, ``"path"`` when the
    daemon creates ``socket_path``.  ``ready`` is how the launcher decides
    the daemon is up: ``"none"`` (an inherited listening socket needs no
    wait), ``"socket"`` (the path exists), ``"stderr"`` (a line containing
    :data:`VIRTIOFSD_READY_LINE` on stderr) or ``"pidfile"``
    (``SOCKET_PATH.pid`` exists, virtiofsd's pid file).  ``cwd_is_share``:
    the launcher runs the daemon in the shared directory.  ``device`` is the
    ``-device vhost-user-fs-pci`` properties the stack gives QEMU besides
    ``chardev`` and ``tag``.  ``stop`` is what the launcher does to end the
    daemon: ``"sigkill"`` (Kata), ``"sigterm-pidfile"`` (virtme-ng: SIGTERM to
    the pid in the pid file) or ``"none"`` (podman: it only releases the
    process, so virtiofsd's exit when QEMU disconnects is what ends it).

    The remaining fields are virtiofsd 1.13's settings for this command line:
    what a drop-in must do with it.
    """

    name: str
    stack: str
    source: str
    argv: Callable[[str, str], list[str]]
    socket: str
    ready: str
    xattr: bool
    readonly: bool
    announce_submounts: bool
    cache: str
    sandbox: str
    seccomp: str
    syslog: bool
    stop: str
    cwd_is_share: bool = False
    env: dict[str, str] = field(default_factory=dict)
    device: str = ""


LAUNCHERS: tuple[Launcher, ...] = (
    Launcher(
        name="kata3", stack="Kata Containers 3.x, Go runtime (containerd-shim-kata-v2)",
        # kata-containers/kata-containers src/runtime/virtcontainers/virtiofsd.go, args()
        # (3.2.0 to 3.32.0): "--syslog", "--cache="+cache, "--shared-dir="+source,
        # "--fd=3", then virtio_fs_extra_args; src/runtime/Makefile: DEFVIRTIOFSCACHE auto,
        # DEFVIRTIOFSEXTRAARGS ["--thread-pool-size=1", "--announce-submounts"].
        # getSocketFD() binds and listens (net.ListenUnix) and passes the listener as
        # cmd.ExtraFiles[0]; Start() does not wait; Stop() sends SIGKILL.
        source="kata-containers/kata-containers src/runtime/virtcontainers/virtiofsd.go "
               "args() + src/runtime/Makefile DEFVIRTIOFSEXTRAARGS (3.32.0)",
        argv=lambda shared, sock: [
            "--syslog", "--cache=auto", f"--shared-dir={shared}",
            f"--fd={GO_FIRST_EXTRA_FD}", "--thread-pool-size=1", "--announce-submounts"],
        socket="fd", ready="none",
        xattr=False, readonly=False, announce_submounts=True, cache="auto",
        sandbox="namespace", seccomp="kill", syslog=True, stop="sigkill",
        # govmm's vhost-user-fs-pci with virtio_fs_queue_size (DEFVIRTIOFSQUEUESIZE 1024).
        device="queue-size=1024"),
    Launcher(
        name="katars", stack="Kata Containers 3.x, runtime-rs (containerd-shim-kata-v2 rust)",
        # kata-containers/kata-containers src/runtime-rs/crates/resource/src/share_fs/
        # share_virtio_fs_standalone.rs, virtiofsd_args() (3.32.0): "--socket-path", sock,
        # "--shared-dir", dir, "--cache", cache, then virtio_fs_extra_args
        # (src/runtime-rs/Makefile DEFVIRTIOFSEXTRAARGS ["--thread-pool-size=1", "-o",
        # "announce_submounts"]), then "--xattr" when the guest runs SELinux
        # (disable_guest_selinux = false: the branch taken here, so that one launcher
        # has xattrs on).  setup_virtiofsd() reads stderr until the ready line and
        # shutdown_virtiofsd() sends SIGKILL.
        source="kata-containers/kata-containers src/runtime-rs/crates/resource/src/share_fs/"
               "share_virtio_fs_standalone.rs virtiofsd_args() + src/runtime-rs/Makefile (3.32.0)",
        argv=lambda shared, sock: [
            "--socket-path", sock, "--shared-dir", shared, "--cache", "auto",
            "--thread-pool-size=1", "-o", "announce_submounts", "--xattr"],
        socket="path", ready="stderr",
        xattr=True, readonly=False, announce_submounts=True, cache="auto",
        sandbox="namespace", seccomp="kill", syslog=False, stop="sigkill",
        device="queue-size=1024"),
    Launcher(
        name="kata2", stack="Kata Containers 2.x (the C virtiofsd's -o syntax)",
        # kata-containers/kata-containers src/runtime/virtcontainers/virtiofsd.go, args()
        # at tag 2.5.0: "--syslog", "-o", "cache="+cache, "-o", "no_posix_lock",
        # "-o", "source="+source, "--fd=3", "-f", then virtio_fs_extra_args;
        # src/runtime/Makefile at 2.5.0: DEFVIRTIOFSCACHE auto, DEFVIRTIOFSEXTRAARGS
        # ["--thread-pool-size=1", "-o", "announce_submounts"].  Socket as kata3.
        source="kata-containers/kata-containers src/runtime/virtcontainers/virtiofsd.go "
               "args() + src/runtime/Makefile DEFVIRTIOFSEXTRAARGS (2.5.0)",
        argv=lambda shared, sock: [
            "--syslog", "-o", "cache=auto", "-o", "no_posix_lock", "-o", f"source={shared}",
            f"--fd={GO_FIRST_EXTRA_FD}", "-f", "--thread-pool-size=1",
            "-o", "announce_submounts"],
        socket="fd", ready="none",
        xattr=False, readonly=False, announce_submounts=True, cache="auto",
        sandbox="namespace", seccomp="kill", syslog=True, stop="sigkill",
        device="queue-size=1024"),
    Launcher(
        name="podman", stack="podman machine, QEMU provider (Linux)",
        # containers/podman pkg/machine/qemu/virtiofsd.go, createVirtiofsCmd() (v5.2.0 on;
        # main c6580b4): "--sandbox", "none", "--socket-path", socketPath, "--shared-dir",
        # ".", "--seccomp=none", with cmd.Dir = the host directory and RUST_LOG=ERROR;
        # spawnForMount() polls for the socket path, gives QEMU
        # vhost-user-fs-pci,queue-size=1024,chardev=...,tag=...; stubber.go only
        # Release()s the process: virtiofsd must exit by itself when QEMU goes away.
        source="containers/podman pkg/machine/qemu/virtiofsd.go createVirtiofsCmd() "
               "(v5.2.0 to main)",
        argv=lambda shared, sock: [
            "--sandbox", "none", "--socket-path", sock, "--shared-dir", ".", "--seccomp=none"],
        socket="path", ready="socket", cwd_is_share=True, env={"RUST_LOG": "ERROR"},
        xattr=False, readonly=False, announce_submounts=True, cache="auto",
        sandbox="none", seccomp="none", syslog=False, stop="none", device="queue-size=1024"),
    Launcher(
        name="virtmerw", stack="virtme-ng, a --rwdir share",
        # arighi/virtme-ng virtme/commands/run.py, VirtioFS.start() (main 4d9dc4d):
        # f"{virtiofsd_path} --syslog --no-announce-submounts {acl_opt}{readonly_opt}"
        # f"--socket-path {self.sock} --shared-dir {path} --sandbox none --cache {cache}"
        # through os.system(... &); export_virtiofs(): cache "auto" for a read-write share.
        # It waits for "{sock}.pid" and later SIGTERMs the pid read from it; before that
        # it probes "virtiofsd --version" (must exit 0).
        source="arighi/virtme-ng virtme/commands/run.py VirtioFS.start() + export_virtiofs() "
               "(main)",
        argv=lambda shared, sock: [
            "--syslog", "--no-announce-submounts", "--socket-path", sock,
            "--shared-dir", shared, "--sandbox", "none", "--cache", "auto"],
        socket="path", ready="pidfile",
        xattr=False, readonly=False, announce_submounts=False, cache="auto",
        sandbox="none", seccomp="kill", syslog=True,
        stop="sigterm-pidfile"),
    Launcher(
        name="virtmero", stack="virtme-ng, the read-only root share",
        # As virtmerw, for a read-only share: cache "always", and "--readonly " when
        # `virtiofsd --help` exits 0 and mentions --readonly (_supports_readonly()).
        source="arighi/virtme-ng virtme/commands/run.py VirtioFS.start() + export_virtiofs() "
               "(main)",
        argv=lambda shared, sock: [
            "--syslog", "--no-announce-submounts", "--readonly", "--socket-path", sock,
            "--shared-dir", shared, "--sandbox", "none", "--cache", "always"],
        socket="path", ready="pidfile",
        xattr=False, readonly=True, announce_submounts=False, cache="always",
        sandbox="none", seccomp="kill", syslog=True,
        stop="sigterm-pidfile"),
)

BY_NAME = {launcher.name: launcher for launcher in LAUNCHERS}


def config_for(argv: list[str]) -> Config:
    """The Config shardfs runs with for ``argv``, as ``shardfs.cli.main`` builds it."""
    cl = parse_command_line(argv)
    return load(cl.config_path, cl.overrides)


@pytest.fixture
def share(tmp_path: Path) -> Path:
    path = tmp_path / "share"
    path.mkdir()
    return path


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda launcher: launcher.name)
def test_parsed_as_virtiofsd_would(launcher: Launcher, share: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every setting virtiofsd derives from this command line, including its defaults."""
    sock = str(share.parent / "vhost.sock")
    if launcher.cwd_is_share:
        monkeypatch.chdir(share)
    cfg = config_for(launcher.argv(str(share), sock))
    assert os.path.realpath(cfg.shared_dir) == os.path.realpath(share)
    if launcher.socket == "fd":
        assert (cfg.fd, cfg.socket_path) == (GO_FIRST_EXTRA_FD, None)
    else:
        assert (cfg.fd, cfg.socket_path) == (None, sock)
    assert cfg.cache == launcher.cache
    assert cfg.xattr is launcher.xattr
    assert cfg.readonly is launcher.readonly
    assert cfg.announce_submounts is launcher.announce_submounts
    assert (cfg.sandbox, cfg.seccomp) == (launcher.sandbox, launcher.seccomp)
    assert cfg.log_target == ("syslog" if launcher.syslog else "stderr")
    # Left at virtiofsd's defaults by every one of these command lines.
    assert cfg.log_level == "info"
    assert not (cfg.writeback or cfg.posix_acl or cfg.killpriv_v2 or cfg.allow_direct_io
                or cfg.security_label or cfg.allow_mmap)
    assert cfg.readdirplus and cfg.tag is None and cfg.num_request_queues == 1
    assert cfg.uid_map == () and cfg.gid_map == () and cfg.rlimit_nofile is None
    assert cfg.translate_uid is None and cfg.translate_gid is None and cfg.xattrmap is None


def test_kata_thread_pool_size_is_accepted_and_noted(share: Path) -> None:
    """Kata's --thread-pool-size=1 parses, and the log says what it does in shardfs."""
    cl = parse_command_line(BY_NAME["kata3"].argv(str(share), ""))
    assert cl.overrides["thread_pool_size"] == 1
    assert any("--thread-pool-size" in note for note in cl.notes)


def test_kata2_legacy_options_override_nothing_else(share: Path) -> None:
    """The -o list sets what it names (no_posix_lock is accepted, locks stay local)."""
    cl = parse_command_line(BY_NAME["kata2"].argv(str(share), ""))
    assert cl.overrides["shared_dir"] == str(share)
    assert cl.overrides["cache"] == "auto" and cl.overrides["announce_submounts"] is True
    assert "xattr" not in cl.overrides


def test_no_config_file_under_a_launcher(share: Path) -> None:
    """A launcher's command line names no config file, so config/shardfs.toml (xattrs,
    its own socket) cannot change what virtiofsd's defaults give."""
    for launcher in LAUNCHERS:
        assert parse_command_line(launcher.argv(str(share), "s")).config_path is None


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = StringIO()
    with redirect_stdout(out):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse's --help
            code = int(e.code or 0)
    return code, out.getvalue()


def test_virtme_probes_version_and_help() -> None:
    """virtme-ng uses a virtiofsd only if ``--version`` exits 0 (_get_virtiofsd_path()),
    and passes --readonly only if ``--help`` exits 0 and mentions it."""
    code, out = run_cli(["--version"])
    assert code == 0 and out.strip()
    code, out = run_cli(["--help"])
    assert code == 0 and "--readonly" in out
