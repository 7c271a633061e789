"""End-to-end: real libvirt 11.3 starts shardfs as it starts virtiofsd, and a guest uses it.

libvirt launches the backend with virtiofsd's command line (``<binary>``, or a
vhost-user JSON found by discovery), or attaches to one started by hand
(``<source socket>``).  Each case is a guest that mounts the share, reads
what the host put there, writes, and powers off; the host then verifies the
bytes, and reads in libvirt's own log which command line libvirt used.

Guest boots are the cost (libvirt starts one shardfs per ``<filesystem>``,
then QEMU under TCG), so one domain carries several filesystems, one per
case, each with its own tag and share; a test checks one of them.  See
``libvirt.py`` for how the daemons run without systemd and why QEMU runs as
libvirt-qemu:kvm.
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import random
import shlex
import shutil
import stat
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from guest import GuestImage, ShardfsDaemon, attach_artifact, daemon_python, read_text
from libvirt import (
    PAUSE_STEP,
    QEMU_GROUP,
    SHARDFS_BINARY,
    DomainRun,
    Libvirt,
    SessionLibvirt,
    SystemLibvirt,
    VirtioFs,
    make_base_dir,
    missing_prerequisites,
    num_request_queues_override,
    option_given,
)
from test_guest import PRELUDE

from tests.frontend.test_rootless import SUBID_COUNT, rootless_account, runtime, user_python

pytestmark = [pytest.mark.guest, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_VHOST_USER_JSON = REPO_ROOT / "scripts" / "install-vhost-user-json"
VHOST_USER_DIR = Path("/etc/qemu/vhost-user")
#: Size of the file the host seeds each share with (crosses several FUSE reads).
HOST_FILE_SIZE = 1_500_007
#: The config-file route to N queues: what the wrapper's ``--config`` file says.
QUEUES_CONFIG = "[shardfs]\nnum_request_queues = 2\n"
#: Bytes the guest writes to each share from /dev/urandom.
GUEST_FILE_SIZE = 1_000_003

#: Shell functions for one share, called as ``step TAG_what share_what TAG``.
#: ``$SHARES`` is exported for the ``sh -c`` the two-queue test runs.
SHARE_FUNCTIONS = textwrap.dedent(
    f"""\
    export SHARES=/run/shares  # the guest's / is the host's, read-only; /run is a tmpfs
    share_mount() {{
        mkdir -p $SHARES/$1
        mount -t virtiofs $1 $SHARES/$1
        grep " $SHARES/$1 virtiofs " /proc/mounts
    }}
    share_read() {{
        digest=$(sha256sum <$SHARES/$1/from_host.bin)  # no pipe: a read error fails the step
        echo "${{digest%% *}}" >"$CTL/$1.from_host.sha256"
    }}
    share_write() {{
        cp $SHARES/$1/from_host.bin $SHARES/$1/copy.bin
        head -c {GUEST_FILE_SIZE} /dev/urandom >$SHARES/$1/from_guest.bin
        digest=$(sha256sum <$SHARES/$1/from_guest.bin)
        echo "${{digest%% *}}" >"$CTL/$1.from_guest.sha256"
        mkdir -p $SHARES/$1/dir/sub
        echo "written by the guest on $1" >$SHARES/$1/dir/sub/note.txt
        sync
    }}
    share_setfattr() {{
        setfattr -n user.x -v from-the-guest $SHARES/$1/copy.bin
        getfattr -n user.x --only-values $SHARES/$1/copy.bin
    }}
    share_refused() {{
        if touch $SHARES/$1/new 2>"$CTL/$1.refused"; then exit 1; fi
        cat "$CTL/$1.refused"
        grep -qi 'read-only' "$CTL/$1.refused"
    }}
    share_parallel() {{
        for cpu in 0 1; do
            taskset -c $cpu sh -c '
                for i in 1 2 3 4 5 6 7 8; do
                    head -c 300000 /dev/urandom >$SHARES/$1/cpu$0-$i.bin
                done
                cd $SHARES/$1 && sha256sum cpu$0-*.bin >"$CTL/$1.cpu$0.sha256"
            ' $cpu $1 &
        done
        wait
        nproc >"$CTL/nproc"
        cat /proc/interrupts >"$CTL/$1.interrupts"
    }}
    share_umount() {{ sync; umount $SHARES/$1; }}
    """
)


def share_steps(tag: str, *, writable: bool = True, setfattr: bool = False,
                parallel: bool = False) -> str:
    """Guest steps for the share with *tag*: mount, read, write (or refuse), umount.

    *parallel*: also write from both vCPUs at once (``check_two_queues``).
    """
    steps = [f"step {tag}_mount share_mount {tag}", f"step {tag}_read share_read {tag}"]
    if writable:
        steps.append(f"step {tag}_write share_write {tag}")
        if setfattr:
            steps.append(f"step {tag}_setfattr share_setfattr {tag}")
        if parallel:
            steps.append(f"step {tag}_parallel share_parallel {tag}")
    else:
        steps.append(f"step {tag}_refused share_refused {tag}")
    steps.append(f"step {tag}_umount share_umount {tag}")
    return "\n".join(steps) + "\n"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def seed_share(path: Path, seed: int) -> Path:
    """A fresh share dir holding from_host.bin (seeded random bytes)."""
    path.mkdir(parents=True)
    (path / "from_host.bin").write_bytes(random.Random(seed).randbytes(HOST_FILE_SIZE))
    return path


def check_share(run: DomainRun, share: Path, tag: str, *, writable: bool = True) -> None:
    """The guest read the host's bytes and (if *writable*) the host has the guest's, exactly."""
    run.assert_step(f"{tag}_mount")
    run.assert_step(f"{tag}_read")
    result = run.ok()
    assert result.ctl(f"{tag}.from_host.sha256").strip() == sha256_file(
        share / "from_host.bin"), result.ctl(f"{tag}_read.log") + run.describe()
    if writable:
        run.assert_step(f"{tag}_write")
        assert (share / "copy.bin").read_bytes() == (share / "from_host.bin").read_bytes()
        written = share / "from_guest.bin"
        assert written.stat().st_size == GUEST_FILE_SIZE
        assert sha256_file(written) == result.ctl(f"{tag}.from_guest.sha256").strip(), (
            result.ctl(f"{tag}_write.log") + run.describe())
        note = share / "dir" / "sub" / "note.txt"
        assert note.read_text() == f"written by the guest on {tag}\n"
    run.assert_step(f"{tag}_umount")
    assert not run.leftover_backends, (
        f"backends still running after the domain ended: {run.leftover_backends}")


def check_two_queues(run: DomainRun, share: Path, tag: str) -> dict[str, int]:
    """Both vCPUs' files arrived intact, and the guest's two-queue device used both queues.

    The device is the one with a ``requests.1`` interrupt line (the others have
    one request queue).  Returns interrupts per request queue.
    """
    run.assert_step(f"{tag}_parallel")
    result = run.ok()
    assert result.ctl("nproc").strip() == "2"
    for cpu in range(2):
        lines = result.ctl(f"{tag}.cpu{cpu}.sha256").splitlines()
        assert len(lines) == 8, lines
        for line in lines:
            digest, name = line.split()
            assert sha256_file(share / name) == digest, f"{name} differs from the guest's"
    interrupts = result.ctl(f"{tag}.interrupts")
    rows = [line.split() for line in interrupts.splitlines()]
    devices = {r[-1].rsplit("-", 1)[0] for r in rows if r and r[-1].endswith("-requests.1")}
    assert len(devices) == 1, interrupts
    device = devices.pop()
    per_queue = {
        r[-1].rsplit(".", 1)[1]: sum(int(f) for f in r[1:3] if f.isdigit())
        for r in rows if r and r[-1].startswith(f"{device}-requests.")
    }
    assert sorted(per_queue) == ["0", "1"], interrupts
    assert all(n > 0 for n in per_queue.values()), per_queue
    return per_queue


def attach_run(node: pytest.Item, run: DomainRun, lv: Libvirt) -> None:
    attach_artifact(node, "guest console", run.work_dir / "console.log")
    attach_artifact(node, "libvirt domain log", lv.domain_log_dir / f"{run.name}.log")
    attach_artifact(node, "libvirtd log", lv.libvirtd_log)
    for alias in run.backend_logs:
        attach_artifact(node, f"backend log {alias}",
                        lv.domain_log_dir / f"{run.name}-{alias}-virtiofsd.log")


def backend_ok(run: DomainRun, alias: str) -> None:
    """libvirt logged the backend's output, and it has no Python traceback."""
    log = run.backend_logs.get(alias, "")
    assert "Traceback (most recent call last)" not in log, run.describe()


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def system_libvirt(guest_image: GuestImage) -> Iterator[SystemLibvirt]:
    """virtlogd + libvirtd (qemu:///system), started once and stopped after the last test
    here (module scope: only this module uses them, and the rest of the suite should
    not run beside idle daemons)."""
    reason = missing_prerequisites()
    if reason is not None:
        if os.environ.get("SHARDFS_REQUIRE_GUEST") == "1":
            pytest.fail(f"SHARDFS_REQUIRE_GUEST=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    # libvirtd runs scripts/shardfs; make sure its first run does not build the venv.
    subprocess.run([str(REPO_ROOT / "scripts" / "bootstrap-venv")], check=True)
    base = make_base_dir()
    lv = SystemLibvirt(base, guest_image)
    try:
        yield lv
    finally:
        lv.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def shares(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("libvirt-shares")


#: The options domain: tag -> its filesystem's settings (the share is added per run).
OPTION_CASES = {
    "base": VirtioFs("base"),
    "always": VirtioFs("always", xattr="on",
                       binary_xml="<cache mode='always'/><thread_pool size='4'/>"),
    "never": VirtioFs("never", xattr="off",
                      binary_xml="<cache mode='none'/><openfiles max='4096'/>"
                                 "<sandbox mode='namespace'/>"),
    "ro": VirtioFs("ro", extra_xml="<readonly/>"),
}


@dataclass
class PausedView:
    """What the host saw of the options domain's backends while its guest waited."""

    #: alias -> the pid libvirt's pidfile gave for it
    pids: dict[str, int] = field(default_factory=dict)
    #: alias -> ``shardfs stats --pid`` (exit status and output)
    stats: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    #: alias -> that process's /proc/PID/limits
    limits: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def paused_view() -> PausedView:
    """Filled by ``options_run``."""
    return PausedView()


@pytest.fixture(scope="module")
def options_run(system_libvirt: SystemLibvirt, shares: Path, paused_view: PausedView
                ) -> DomainRun:
    """One domain, one shardfs per ``<filesystem>``: defaults, cache/xattr/pool, read-only.

    Before it powers off, the guest waits while the host reads each backend's
    counters with ``shardfs stats --pid`` (libvirt passes ``--fd`` and no
    socket path, so the status socket is at its documented default).
    """
    filesystems = []
    for i, (tag, fs) in enumerate(OPTION_CASES.items()):
        share = seed_share(shares / tag, seed=i)
        filesystems.append(VirtioFs(tag, source_dir=share, xattr=fs.xattr,
                                    binary_xml=fs.binary_xml, extra_xml=fs.extra_xml))
    script = PRELUDE + SHARE_FUNCTIONS + "".join([
        share_steps("base", setfattr=True),
        share_steps("always", setfattr=True),
        share_steps("never", setfattr=True),
        share_steps("ro", writable=False),
        PAUSE_STEP,
    ])

    def read_stats(name: str) -> None:
        for fs in filesystems:
            try:
                pid = paused_view.pids[fs.alias] = system_libvirt.backend_pid(fs.alias)
            except AssertionError as e:
                paused_view.stats[fs.alias] = subprocess.CompletedProcess([], 1, "", str(e))
                continue
            paused_view.limits[fs.alias] = read_text(Path(f"/proc/{pid}/limits"))
            paused_view.stats[fs.alias] = subprocess.run(
                [daemon_python(), "-m", "shardfs", "stats", "--pid", str(pid), "--format", "json"],
                capture_output=True, text=True, check=False, timeout=60)

    return system_libvirt.boot(script, filesystems=filesystems, while_running=read_stats)


@pytest.fixture(scope="module")
def launch_run(system_libvirt: SystemLibvirt, shares: Path) -> Iterator[DomainRun]:
    """One domain with two vCPUs and three ways libvirt finds or configures shardfs.

    * ``chroot``: ``<sandbox mode='chroot'/>``;
    * ``found``: no ``<binary>``; libvirt takes the backend from the
      vhost-user JSON that ``scripts/install-vhost-user-json --prefer``
      installs (removed after);
    * ``queues``: the config-file route to N request queues under libvirt:
      ``<binary path>`` names a wrapper that adds ``--config`` with
      ``num_request_queues = 2``, and ``<qemu:override>`` gives QEMU's device
      the same number.
    """
    created = [p for p in (VHOST_USER_DIR.parent, VHOST_USER_DIR) if not p.exists()]
    installed = subprocess.run(
        [str(INSTALL_VHOST_USER_JSON), "--prefer", "--dir", str(VHOST_USER_DIR)],
        capture_output=True, text=True, check=False)
    json_path = Path(installed.stdout.strip().splitlines()[-1]) if installed.stdout.strip() \
        else None
    try:
        assert installed.returncode == 0 and json_path is not None and json_path.exists(), (
            f"install-vhost-user-json failed ({installed.returncode}): {installed.stderr}")
        description = json.loads(json_path.read_text())
        assert description["type"] == "fs"
        assert Path(description["binary"]) == SHARDFS_BINARY
        config = system_libvirt.base / "libvirt-2q.toml"
        config.write_text(QUEUES_CONFIG)
        wrapper = system_libvirt.base / "shardfs-2q"
        wrapper.write_text(f'#!/bin/sh\nexec {SHARDFS_BINARY} --config {config} "$@"\n')
        wrapper.chmod(0o755)
        queues = VirtioFs("queues", source_dir=seed_share(shares / "queues", seed=12),
                          binary=wrapper)
        filesystems = [
            VirtioFs("chroot", source_dir=seed_share(shares / "chroot", seed=10),
                     binary_xml="<sandbox mode='chroot'/>"),
            VirtioFs("found", source_dir=seed_share(shares / "found", seed=11), binary=None),
            queues,
        ]
        script = PRELUDE + SHARE_FUNCTIONS + share_steps("chroot") + share_steps("found") \
            + share_steps("queues", parallel=True)
        yield system_libvirt.boot(script, filesystems=filesystems, vcpus=2,
                                  extra_xml=num_request_queues_override(queues.alias, 2))
    finally:
        if json_path is not None:
            json_path.unlink(missing_ok=True)
        for d in reversed(created):
            if d.exists() and not any(d.iterdir()):
                d.rmdir()


# ----------------------------------------------------------------- options


def test_base_case(options_run: DomainRun, system_libvirt: SystemLibvirt, shares: Path,
                   request: pytest.FixtureRequest) -> None:
    """``<binary path='.../scripts/shardfs'/>`` and nothing else: libvirt starts shardfs."""
    attach_run(request.node, options_run, system_libvirt)
    check_share(options_run, shares / "base", "base")
    cmd = options_run.backend_command(shares / "base")
    assert cmd[0] == str(SHARDFS_BINARY), cmd
    assert any(a.startswith("--fd=") or a == "--fd" for a in cmd), cmd
    backend_ok(options_run, "ua-base")


def test_xattr_off_by_default(options_run: DomainRun, shares: Path) -> None:
    """No ``xattr='on'``: libvirt passes no ``--xattr``, and as with virtiofsd setfattr fails."""
    cmd = options_run.backend_command(shares / "base")
    assert not option_given(cmd, "--xattr") and not option_given(cmd, "--xattr", "true"), cmd
    options_run.assert_step("base_setfattr", rc=None)
    assert "user.x" not in os.listxattr(shares / "base" / "copy.bin")


def test_xattr_off_explicit(options_run: DomainRun, shares: Path) -> None:
    """``xattr='off'``: the same, stated."""
    options_run.assert_step("never_setfattr", rc=None)
    assert "user.x" not in os.listxattr(shares / "never" / "copy.bin")


def test_cache_always_xattr_on_thread_pool(
    options_run: DomainRun, system_libvirt: SystemLibvirt, shares: Path,
    request: pytest.FixtureRequest,
) -> None:
    """``<cache mode='always'/>``, ``xattr='on'``, ``<thread_pool size='4'/>``."""
    attach_run(request.node, options_run, system_libvirt)
    check_share(options_run, shares / "always", "always")
    cmd = options_run.backend_command(shares / "always")
    assert option_given(cmd, "--cache", "always"), cmd
    assert option_given(cmd, "--xattr"), cmd
    assert option_given(cmd, "--thread-pool-size", "4"), cmd
    options_run.assert_step("always_setfattr")
    assert options_run.ok().ctl("always_setfattr.log").count("from-the-guest") >= 1
    assert os.getxattr(shares / "always" / "copy.bin", "user.x") == b"from-the-guest"
    backend_ok(options_run, "ua-always")


def test_cache_none_openfiles_namespace(
    options_run: DomainRun, paused_view: PausedView, system_libvirt: SystemLibvirt,
    shares: Path, request: pytest.FixtureRequest,
) -> None:
    """``<cache mode='none'/>``, ``<openfiles max='4096'/>``, ``<sandbox mode='namespace'/>``."""
    attach_run(request.node, options_run, system_libvirt)
    check_share(options_run, shares / "never", "never")
    cmd = options_run.backend_command(shares / "never")
    assert option_given(cmd, "--cache", "never") or option_given(cmd, "--cache", "none"), cmd
    assert option_given(cmd, "--rlimit-nofile", "4096"), cmd
    # ... and the daemon libvirt started runs with it (read while the guest was paused).
    limits = paused_view.limits.get("ua-never", "")
    nofile = [line.split()[3:5] for line in limits.splitlines()
              if line.startswith("Max open files")]
    assert nofile == [["4096", "4096"]], limits
    assert option_given(cmd, "--sandbox", "namespace"), cmd
    backend_ok(options_run, "ua-never")


def test_readonly(options_run: DomainRun, system_libvirt: SystemLibvirt, shares: Path,
                  request: pytest.FixtureRequest) -> None:
    """``<readonly/>``: the guest reads, and a write fails with EROFS."""
    attach_run(request.node, options_run, system_libvirt)
    check_share(options_run, shares / "ro", "ro", writable=False)
    options_run.assert_step("ro_refused")
    assert sorted(p.name for p in (shares / "ro").iterdir()) == ["from_host.bin"]
    assert option_given(options_run.backend_command(shares / "ro"), "--readonly")
    backend_ok(options_run, "ua-ro")


def test_stats_of_a_daemon_libvirt_started(options_run: DomainRun,
                                           paused_view: PausedView) -> None:
    """``--fd`` alone: ``shardfs stats --pid PID`` reaches each daemon libvirt started."""
    options_run.assert_step("pause")
    assert sorted(paused_view.stats) == sorted(fs.alias for fs in OPTION_CASES.values())
    for alias, done in paused_view.stats.items():
        assert done.returncode == 0, f"{alias}: shardfs stats --pid failed: {done.stderr}"
        stats = json.loads(done.stdout)
        served = {q["queue"]: q["requests"] for q in stats["queues"]}
        assert served.get(1, 0) > 0, f"{alias}: {served}"
    # libvirt stopped them (SIGTERM) when the domain ended: each removed its socket.
    stale = [p for p in paused_view.pids.values() if Path(f"/run/shardfs/stats-{p}.sock").exists()]
    assert not stale, f"status sockets left behind by {stale}\n" + options_run.describe()


# ----------------------------------------------------------------- sandbox chroot, discovery


def test_sandbox_chroot(launch_run: DomainRun, system_libvirt: SystemLibvirt,
                        shares: Path, request: pytest.FixtureRequest) -> None:
    """``<sandbox mode='chroot'/>`` (xattrs off, libvirt's default): shardfs serves it."""
    attach_run(request.node, launch_run, system_libvirt)
    check_share(launch_run, shares / "chroot", "chroot")
    assert option_given(launch_run.backend_command(shares / "chroot"),
                        "--sandbox", "chroot")
    backend_ok(launch_run, "ua-chroot")


def test_discovery_through_vhost_user_json(
    launch_run: DomainRun, system_libvirt: SystemLibvirt, shares: Path,
    request: pytest.FixtureRequest,
) -> None:
    """No ``<binary>``: libvirt takes the backend from /etc/qemu/vhost-user/10-shardfs.json."""
    attach_run(request.node, launch_run, system_libvirt)
    check_share(launch_run, shares / "found", "found")
    cmd = launch_run.backend_command(shares / "found")
    assert cmd[0] == str(SHARDFS_BINARY), cmd
    backend_ok(launch_run, "ua-found")


def test_config_file_two_queues(launch_run: DomainRun, system_libvirt: SystemLibvirt,
                                shares: Path, request: pytest.FixtureRequest) -> None:
    """A daemon libvirt launches serves 2 queues: a ``--config`` wrapper as ``<binary>``."""
    attach_run(request.node, launch_run, system_libvirt)
    check_share(launch_run, shares / "queues", "queues")
    per_queue = check_two_queues(launch_run, shares / "queues", "queues")
    cmd = launch_run.backend_command(shares / "queues")
    assert cmd[0] == str(system_libvirt.base / "shardfs-2q"), cmd
    assert '"num-request-queues":2' in launch_run.domain_log, launch_run.describe()
    print(f"guest interrupts per request queue: {per_queue}")
    backend_ok(launch_run, "ua-queues")


# ----------------------------------------------------------------- external daemon, 2 queues


def test_source_socket_two_queues(system_libvirt: SystemLibvirt, shares: Path,
                                  request: pytest.FixtureRequest) -> None:
    """``<source socket>`` to a shardfs started by hand with ``--socket-group kvm``.

    libvirt's QEMU runs as libvirt-qemu:kvm, so the socket must let group kvm
    in.  Two request queues: ``<qemu:override>`` sets the device's
    ``num-request-queues`` (libvirt 11.3 has no XML for it), the guest has two
    vCPUs, and both queues serve requests (the guest's interrupts and
    shardfs's counters say so).
    """
    queues = 2
    share = seed_share(shares / "external", seed=20)
    sock_dir = system_libvirt.base / "external"
    sock_dir.mkdir(mode=0o755)
    daemon = ShardfsDaemon(
        socket_path=sock_dir / "fs.sock", shared_dir=share, log_path=sock_dir / "shardfs.log",
        tag="external", num_request_queues=queues, extra_args=["--socket-group", "kvm"],
    )
    attach_artifact(request.node, "external shardfs log", daemon.log_path)
    daemon.start()
    st = os.stat(daemon.socket_path)
    assert (grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)) == (QEMU_GROUP, 0o660)
    try:
        fs = VirtioFs("external", socket=daemon.socket_path)
        script = PRELUDE + SHARE_FUNCTIONS + share_steps("external", parallel=True)
        run = system_libvirt.boot(script, filesystems=[fs], vcpus=queues,
                                  extra_xml=num_request_queues_override(fs.alias, queues))
        attach_run(request.node, run, system_libvirt)
        stats = subprocess.run(
            [daemon_python(), "-m", "shardfs", "stats", "--socket-path", str(daemon.socket_path),
             "--format", "json"], capture_output=True, text=True, check=True)
    finally:
        daemon.stop_and_check()
    assert '"num-request-queues":2' in run.domain_log, run.describe()
    check_share(run, share, "external")
    per_queue = check_two_queues(run, share, "external")
    served = {q["queue"]: q["requests"] for q in json.loads(stats.stdout)["queues"]}
    print(f"guest interrupts per request queue: {per_queue}; shardfs requests: {served}")
    assert all(served[q] > 0 for q in range(1, queues + 1)), served


def test_source_socket_without_socket_group_is_refused(
    system_libvirt: SystemLibvirt, shares: Path, request: pytest.FixtureRequest
) -> None:
    """Why ``--socket-group kvm`` matters: without it QEMU (libvirt-qemu) cannot connect."""
    sock_dir = system_libvirt.base / "no-group"
    sock_dir.mkdir(mode=0o755)
    daemon = ShardfsDaemon(socket_path=sock_dir / "fs.sock", shared_dir=shares / "no-group",
                           log_path=sock_dir / "shardfs.log", tag="nogroup")
    attach_artifact(request.node, "external shardfs log", daemon.log_path)
    daemon.start()
    try:
        run = system_libvirt.boot(PRELUDE, filesystems=[VirtioFs("nogroup",
                                                                 socket=daemon.socket_path)])
    finally:
        daemon.stop_and_check()
    assert run.result is None, "QEMU connected to a root-only socket\n" + run.describe()
    assert "Permission denied" in run.create_error, run.describe()


# ----------------------------------------------------------------- qemu:///session


def test_session_idmap(guest_image: GuestImage, request: pytest.FixtureRequest) -> None:
    """``qemu:///session`` as an unprivileged user, the backend confined by ``<idmap>``.

    libvirt starts shardfs as the user with ``--uid-map``/``--gid-map`` (the
    user at 0, its subordinate range from 1), so shardfs's default namespace
    sandbox runs in a user namespace with those maps.  The guest's root
    creates files owned by the user on the host, and a file the guest gives
    uid 1000 belongs to subordinate id SUBUID + 999.

    ``<binary path>`` names a wrapper the user can run: the checkout's venv
    may live where the user cannot reach (its interpreter under /root).
    """
    reason = missing_prerequisites()
    if reason is not None:
        if os.environ.get("SHARDFS_REQUIRE_GUEST") == "1":
            pytest.fail(f"SHARDFS_REQUIRE_GUEST=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    account = rootless_account()
    base = make_base_dir()
    try:
        wrapper = base / "shardfs"
        wrapper.write_text(
            "#!/bin/sh\n"
            "# scripts/shardfs for a user who cannot reach the checkout's venv\n"
            f"PYTHONPATH={runtime()} exec {user_python(account)} -m shardfs \"$@\"\n")
        wrapper.chmod(0o755)
        share = seed_share(base / "share", seed=30)
        for p in (share, share / "from_host.bin"):
            os.chown(p, account.uid, account.gid)
        idmap = "<idmap>" + "".join(
            f"<{kind} start='0' target='{own}' count='1'/>"
            f"<{kind} start='1' target='{sub}' count='{SUBID_COUNT}'/>"
            for kind, own, sub in (("uid", account.uid, account.subuid),
                                   ("gid", account.gid, account.subgid))
        ) + "</idmap>"
        fs = VirtioFs("session", source_dir=share, binary=wrapper, extra_xml=idmap)
        script = PRELUDE + SHARE_FUNCTIONS + textwrap.dedent(
            """\
            step session_mount share_mount session
            step session_read share_read session
            step session_write share_write session
            owners() {
                touch $SHARES/session/by_root
                touch $SHARES/session/by_1000
                chown 1000:1000 $SHARES/session/by_1000
                stat -c '%n %u:%g' $SHARES/session/by_root $SHARES/session/by_1000
                test "$(stat -c %u:%g $SHARES/session/by_1000)" = 1000:1000
                test "$(stat -c %u:%g $SHARES/session/from_host.bin)" = 0:0
            }
            step session_owners owners
            step session_umount share_umount session
            """
        )
        lv = SessionLibvirt(base, guest_image, user=account.name)
        try:
            run = lv.boot(script, filesystems=[fs])
            attach_run(request.node, run, lv)
        finally:
            lv.close()
        check_share(run, share, "session")
        run.assert_step("session_owners")
        cmd = run.backend_command(share)
        print("libvirt ran:", shlex.join(cmd))
        assert cmd[0] == str(wrapper), cmd
        for kind, own, sub in (("--uid-map", account.uid, account.subuid),
                               ("--gid-map", account.gid, account.subgid)):
            assert f"{kind}=:0:{own}:1:" in cmd and f"{kind}=:1:{sub}:{SUBID_COUNT}:" in cmd, cmd
        for name in ("from_guest.bin", "copy.bin", "by_root"):
            st = os.stat(share / name)
            assert (st.st_uid, st.st_gid) == (account.uid, account.gid), name
        st = os.stat(share / "by_1000")
        assert (st.st_uid, st.st_gid) == (account.subuid + 999, account.subgid + 999)
        backend_ok(run, fs.alias)
    finally:
        shutil.rmtree(base, ignore_errors=True)
