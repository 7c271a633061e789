"""Operating shardfs: --fd from a supervisor such as libvirt or systemd, --socket-group,
--once, and the shipped config files."""

from __future__ import annotations

import grp
import json
import os
import socket
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from shardfs.testing.frontend import Frontend, FuseClient
from tests.frontend.conftest import REPO

DEADLINE_S = 30.0


def _start(args: list[str], tmp: Path, **kw: object) -> subprocess.Popen[bytes]:
    (tmp / "shared").mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "shardfs", "--shared-dir",
                             str(tmp / "shared"), "--log-level", "debug", *args],
                            cwd=REPO, stderr=open(tmp / "log", "w"), **kw)  # type: ignore[call-overload]


def _serve_one(path: str) -> None:
    with Frontend(path) as fe:
        fe.start()
        c = FuseClient(fe)
        c.init()
        assert c.getattr(1)


def test_fd_handed_over_like_systemd_socket_activation(tmp_path: Path) -> None:
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    fd = listener.fileno()
    proc = _start(["--fd", str(fd)], tmp_path, pass_fds=[fd])
    listener.close()  # only the daemon holds it now
    try:
        _serve_one(path)  # the kernel queues the connection even before accept
        # virtiofsd's default (once): it exits after the frontend leaves.
        assert proc.wait(DEADLINE_S) == 0
    finally:
        proc.kill()
    assert "frontend disconnected" in (tmp_path / "log").read_text()


def test_socket_group(tmp_path: Path) -> None:
    path = str(tmp_path / "g.sock")
    proc = _start(["--socket-path", path, "--socket-group", "daemon"], tmp_path)
    try:
        start = time.monotonic()
        while not os.path.exists(path + ".stats"):
            assert proc.poll() is None and time.monotonic() - start < DEADLINE_S
            time.sleep(0.01)
        st = os.stat(path)
        assert st.st_gid == grp.getgrnam("daemon").gr_gid
        assert stat.S_IMODE(st.st_mode) == 0o660
        _serve_one(path)
    finally:
        proc.terminate()
        assert proc.wait(DEADLINE_S) == 0


def test_unknown_socket_group_is_a_one_line_error(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "shardfs", "--socket-path",
                          str(tmp_path / "s"), "--shared-dir", str(tmp_path),
                          "--socket-group", "no-such-group-here"], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "socket_group" in out.stderr


def test_vhost_user_json_names_this_checkout_and_yields_to_virtiofsd(tmp_path: Path) -> None:
    """libvirt takes the first "fs" JSON by file name: by default shardfs sorts after
    Debian's 50-virtiofsd.json, with --prefer before it; the binary is runnable."""
    script = REPO / "scripts" / "install-vhost-user-json"
    out = subprocess.run([script, "--dir", str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == str(tmp_path / "90-shardfs.json")
    desc = json.loads(Path(out).read_text())
    assert desc["type"] == "fs" and desc["binary"] == str(REPO / "scripts" / "shardfs")
    assert sorted(["50-virtiofsd.json", Path(out).name])[0] == "50-virtiofsd.json"
    caps = subprocess.run([desc["binary"], "--print-capabilities"], capture_output=True,
                          text=True, check=True, timeout=300).stdout
    assert "separate-options" in json.loads(caps)["features"]
    out = subprocess.run([script, "--dir", str(tmp_path), "--prefer"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10-shardfs.json"]
    assert sorted(["50-virtiofsd.json", Path(out).name])[0] == "10-shardfs.json"
    subprocess.run([script, "--dir", str(tmp_path), "--remove"], check=True)
    assert not list(tmp_path.iterdir())


def test_shipped_config_files_parse() -> None:
    cfg = tomllib.loads((REPO / "config" / "shardfs.toml").read_text())["shardfs"]
    assert cfg["num_request_queues"] == 1
    unit = (REPO / "config" / "shardfs.service").read_text()
    assert "--fd 3" in unit and "KillSignal=SIGTERM" in unit


def test_syslog_target_carries_worker_lines(tmp_path: Path) -> None:
    """Workers log through the supervisor's connected syslog socket, sandbox and all."""
    logsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    logsock.bind(str(tmp_path / "log.sock"))
    logsock.settimeout(DEADLINE_S)
    path = str(tmp_path / "s.sock")
    env = dict(os.environ, SHARDFS_SYSLOG_SOCKET=str(tmp_path / "log.sock"))
    proc = _start(["--socket-path", path, "--log-target", "syslog"], tmp_path, env=env)
    try:
        seen = []
        while not any(b"worker 0 ready" in m for m in seen):
            seen.append(logsock.recv(65536))
        with Frontend(path) as fe:
            fe.start()
            c = FuseClient(fe)
            c.init()
            q = fe.queues[1]
            gpa = fe.ram.alloc(20)
            fe.ram.write(gpa, b"\x01" * 20)
            q.add([(gpa, 20)], [(fe.ram.alloc(64), 64)])
            fe.kick_queue(1)
            fe.wait_used(1)
        while not any(b"too short for fuse_in_header" in m for m in seen):
            seen.append(logsock.recv(65536))
        line = next(m for m in seen if b"too short" in m)
        assert line.startswith(b"<") and b"shardfs[" in line  # priority, then the tag
    finally:
        proc.terminate()
        assert proc.wait(DEADLINE_S) == 0
        logsock.close()


def _wait_for(path: Path, proc: subprocess.Popen[bytes], text: str | None = None) -> None:
    start = time.monotonic()
    while not path.exists() or (text is not None and text not in path.read_text()):
        assert proc.poll() is None and time.monotonic() - start < DEADLINE_S
        time.sleep(0.01)


def test_pid_file_and_ready_line_as_virtiofsd(tmp_path: Path) -> None:
    """virtme-ng waits for SOCKET.pid and Kata's runtime-rs for virtiofsd's ready line; the
    pid file's lock also keeps a second daemon from stealing a live socket path."""
    path = str(tmp_path / "s.sock")
    proc = _start(["--socket-path", path], tmp_path)
    try:
        _wait_for(tmp_path / "log", proc, "Waiting for vhost-user socket connection...")
        pid_file = Path(path + ".pid")
        assert pid_file.read_text().strip() == str(proc.pid)
        before = os.stat(path).st_ino
        second = subprocess.run([sys.executable, "-m", "shardfs", "--shared-dir",
                                 str(tmp_path / "shared"), "--socket-path", path],
                                cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_S)
        assert second.returncode == 1
        assert second.stderr.count("\n") == 1 and f"pid {proc.pid}" in second.stderr
        assert os.stat(path).st_ino == before  # the live socket is untouched
        _serve_one(path)
        assert proc.wait(DEADLINE_S) == 0  # virtiofsd's default: exit when QEMU leaves
    finally:
        proc.kill()
        proc.wait()
    assert not Path(path + ".pid").exists()


def test_syslog_without_a_syslog_daemon_serves_on_stderr(tmp_path: Path) -> None:
    """Kata and virtme-ng pass --syslog; virtiofsd serves on where no /dev/log exists."""
    path = str(tmp_path / "s.sock")
    env = dict(os.environ, SHARDFS_SYSLOG_SOCKET=str(tmp_path / "no-such-log"))
    proc = _start(["--socket-path", path, "--syslog"], tmp_path, env=env)
    try:
        _wait_for(tmp_path / "log", proc, "Waiting for vhost-user socket connection")
        assert "logging to stderr" in (tmp_path / "log").read_text()
        _serve_one(path)
        assert proc.wait(DEADLINE_S) == 0
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_to_the_process_group_is_a_shutdown_not_a_crash(tmp_path: Path) -> None:
    """libvirt stops a domain's backend with SIGTERM, which may reach every shardfs
    process at once: the supervisor must not take its children's exits for crashes."""
    import signal

    path = str(tmp_path / "s.sock")
    proc = _start(["--socket-path", path, "--sandbox", "none"], tmp_path,
                  start_new_session=True)
    try:
        _wait_for(tmp_path / "log", proc, "Waiting for vhost-user socket connection")
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(DEADLINE_S) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log = (tmp_path / "log").read_text()
    assert "restarting" not in log and "Traceback" not in log, log


def test_sigterm_while_exiting_after_the_vmm_left_is_still_a_clean_exit(tmp_path: Path) -> None:
    """virtiofsd's default: exit when the VMM leaves.  A launcher's SIGTERM that arrives
    while shardfs is already on its way out must not turn exit 0 into a signal death."""
    import signal

    path = str(tmp_path / "s.sock")
    proc = _start(["--socket-path", path, "--sandbox", "none"], tmp_path)
    try:
        _wait_for(tmp_path / "log", proc, "Waiting for vhost-user socket connection")
        _serve_one(path)
        _wait_for(tmp_path / "log", proc, "shut down")
        while proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            time.sleep(0.001)
        assert proc.returncode == 0
    finally:
        proc.kill()
        proc.wait()
