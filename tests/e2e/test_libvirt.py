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
import shutil
import stat
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest import GuestImage, ShardfsDaemon, attach_artifact, daemon_python
from libvirt import (
    QEMU_GROUP,
    SHARDFS_BINARY,
    DomainRun,
    Libvirt,
    SystemLibvirt,
    VirtioFs,
    make_base_dir,
    missing_prerequisites,
    num_request_queues_override,
    option_given,
)
from test_guest import PRELUDE

pytestmark = [pytest.mark.guest, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_VHOST_USER_JSON = REPO_ROOT / "scripts" / "install-vhost-user-json"
VHOST_USER_DIR = Path("/etc/qemu/vhost-user")
#: Size of the file the host seeds each share with (crosses several FUSE reads).
HOST_FILE_SIZE = 1_500_007
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
        sha256sum $SHARES/$1/from_host.bin | cut -d' ' -f1 >"$CTL/$1.from_host.sha256"
    }}
    share_write() {{
        cp $SHARES/$1/from_host.bin $SHARES/$1/copy.bin
        head -c {GUEST_FILE_SIZE} /dev/urandom >$SHARES/$1/from_guest.bin
        sha256sum $SHARES/$1/from_guest.bin | cut -d' ' -f1 >"$CTL/$1.from_guest.sha256"
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
    share_umount() {{ sync; umount $SHARES/$1; }}
    """
)


def share_steps(tag: str, *, writable: bool = True, setfattr: bool = False) -> str:
    """Guest steps for the share with *tag*: mount, read, write (or refuse), umount."""
    steps = [f"step {tag}_mount share_mount {tag}", f"step {tag}_read share_read {tag}"]
    if writable:
        steps.append(f"step {tag}_write share_write {tag}")
        if setfattr:
            steps.append(f"step {tag}_setfattr share_setfattr {tag}")
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
    assert result.ctl(f"{tag}.from_host.sha256").strip() == sha256_file(share / "from_host.bin")
    if writable:
        run.assert_step(f"{tag}_write")
        assert (share / "copy.bin").read_bytes() == (share / "from_host.bin").read_bytes()
        written = share / "from_guest.bin"
        assert written.stat().st_size == GUEST_FILE_SIZE
        assert sha256_file(written) == result.ctl(f"{tag}.from_guest.sha256").strip()
        note = share / "dir" / "sub" / "note.txt"
        assert note.read_text() == f"written by the guest on {tag}\n"
    run.assert_step(f"{tag}_umount")
    assert not run.leftover_backends, (
        f"backends still running after the domain ended: {run.leftover_backends}")


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


@pytest.fixture(scope="session")
def system_libvirt(guest_image: GuestImage) -> Iterator[SystemLibvirt]:
    """virtlogd + libvirtd (qemu:///system), started for the session and stopped after."""
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


#: The options domain: tag -> (the filesystem's XML settings, writable).
OPTION_CASES = {
    "base": VirtioFs("base"),
    "always": VirtioFs("always", xattr="on",
                       binary_xml="<cache mode='always'/><thread_pool size='4'/>"),
    "never": VirtioFs("never", xattr="off",
                      binary_xml="<cache mode='none'/><openfiles max='4096'/>"
                                 "<sandbox mode='namespace'/>"),
    "ro": VirtioFs("ro", extra_xml="<readonly/>"),
}


@pytest.fixture(scope="module")
def options_run(system_libvirt: SystemLibvirt, shares: Path) -> DomainRun:
    """One domain, one shardfs per ``<filesystem>``: defaults, cache/xattr/pool, read-only."""
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
    ])
    return system_libvirt.boot(script, filesystems=filesystems)


@pytest.fixture(scope="module")
def chroot_discovery_run(system_libvirt: SystemLibvirt, shares: Path) -> Iterator[DomainRun]:
    """One domain: ``<sandbox mode='chroot'/>``, and a filesystem with no ``<binary>``.

    The second one is found through the vhost-user JSON that
    ``scripts/install-vhost-user-json --prefer`` installs; it is removed after.
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
        filesystems = [
            VirtioFs("chroot", source_dir=seed_share(shares / "chroot", seed=10),
                     binary_xml="<sandbox mode='chroot'/>"),
            VirtioFs("found", source_dir=seed_share(shares / "found", seed=11), binary=None),
        ]
        script = PRELUDE + SHARE_FUNCTIONS + share_steps("chroot") + share_steps("found")
        yield system_libvirt.boot(script, filesystems=filesystems)
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
    options_run: DomainRun, system_libvirt: SystemLibvirt, shares: Path,
    request: pytest.FixtureRequest,
) -> None:
    """``<cache mode='none'/>``, ``<openfiles max='4096'/>``, ``<sandbox mode='namespace'/>``."""
    attach_run(request.node, options_run, system_libvirt)
    check_share(options_run, shares / "never", "never")
    cmd = options_run.backend_command(shares / "never")
    assert option_given(cmd, "--cache", "never") or option_given(cmd, "--cache", "none"), cmd
    assert option_given(cmd, "--rlimit-nofile", "4096"), cmd
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


# ----------------------------------------------------------------- sandbox chroot, discovery


def test_sandbox_chroot(chroot_discovery_run: DomainRun, system_libvirt: SystemLibvirt,
                        shares: Path, request: pytest.FixtureRequest) -> None:
    """``<sandbox mode='chroot'/>`` (xattrs off, libvirt's default): shardfs serves it."""
    attach_run(request.node, chroot_discovery_run, system_libvirt)
    check_share(chroot_discovery_run, shares / "chroot", "chroot")
    assert option_given(chroot_discovery_run.backend_command(shares / "chroot"),
                        "--sandbox", "chroot")
    backend_ok(chroot_discovery_run, "ua-chroot")


def test_discovery_through_vhost_user_json(
    chroot_discovery_run: DomainRun, system_libvirt: SystemLibvirt, shares: Path,
    request: pytest.FixtureRequest,
) -> None:
    """No ``<binary>``: libvirt takes the backend from /etc/qemu/vhost-user/10-shardfs.json."""
    attach_run(request.node, chroot_discovery_run, system_libvirt)
    check_share(chroot_discovery_run, shares / "found", "found")
    cmd = chroot_discovery_run.backend_command(shares / "found")
    assert cmd[0] == str(SHARDFS_BINARY), cmd
    backend_ok(chroot_discovery_run, "ua-found")


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
        script = PRELUDE + SHARE_FUNCTIONS + textwrap.dedent(
            """\
            step external_mount share_mount external
            step external_read share_read external
            step external_write share_write external
            parallel() {
                for cpu in 0 1; do
                    taskset -c $cpu sh -c '
                        for i in 1 2 3 4 5 6 7 8; do
                            head -c 300000 /dev/urandom >$SHARES/external/cpu$0-$i.bin
                        done
                        cd $SHARES/external && sha256sum cpu$0-*.bin >"$CTL/cpu$0.sha256"
                    ' $cpu &
                done
                wait
                nproc >"$CTL/nproc"
                cat /proc/interrupts >"$CTL/interrupts"
            }
            step external_parallel parallel
            step external_umount share_umount external
            """
        )
        run = system_libvirt.boot(script, filesystems=[fs], vcpus=queues,
                                  extra_xml=num_request_queues_override(fs.alias, queues))
        attach_run(request.node, run, system_libvirt)
        stats = subprocess.run(
            [daemon_python(), "-m", "shardfs", "stats", "--socket-path", str(daemon.socket_path),
             "--format", "json"], capture_output=True, text=True, check=True)
    finally:
        daemon.stop_and_check()
    assert "num-request-queues" in run.domain_log and '"num-request-queues":2' in run.domain_log, (
        run.describe())
    check_share(run, share, "external")
    run.assert_step("external_parallel")
    result = run.ok()
    assert result.ctl("nproc").strip() == str(queues)
    for cpu in range(queues):
        lines = result.ctl(f"cpu{cpu}.sha256").splitlines()
        assert len(lines) == 8, result.ctl(f"cpu{cpu}.sha256")
        for line in lines:
            digest, name = line.split()
            assert sha256_file(share / name) == digest, f"{name} differs from the guest's"
    per_queue: dict[str, int] = {}
    for line in result.ctl("interrupts").splitlines():
        fields = line.split()
        if fields and "-requests." in fields[-1]:
            per_queue[fields[-1].rsplit(".", 1)[1]] = sum(
                int(f) for f in fields[1:1 + queues] if f.isdigit())
    assert sorted(per_queue) == ["0", "1"], result.ctl("interrupts")
    assert all(n > 0 for n in per_queue.values()), per_queue
    served = {q["queue"]: q["requests"] for q in json.loads(stats.stdout)["queues"]}
    print(f"guest interrupts per request queue: {per_queue}; shardfs requests: {served}")
    assert all(served[q] > 0 for q in range(1, queues + 1)), served
