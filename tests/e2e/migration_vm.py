"""Two-QEMU live migration on one host, for tests/e2e/test_migration.py.

A :class:`Vm` is one QEMU 10 (TCG) with the self-contained migration guest
(scripts/build-migration-guest), a vhost-user-fs device on a shardfs socket,
memfd RAM shared with the backend, a QMP socket and a console log.  A
destination is the same command line plus ``-incoming tcp:127.0.0.1:PORT``.
:func:`migrate` drives QMP ``migrate`` and polls ``query-migrate``; success is
what MIGRATION.md §4 asks: the source ``completed`` and ``postmigrate``, the
destination ``running``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guest import GUEST_DIR, QEMU, REPO_ROOT, _die_with_parent, _kill_group, read_text

BUILD = REPO_ROOT / "scripts" / "build-migration-guest"
IMAGE = GUEST_DIR / "migration-initramfs.cpio.gz"
KERNEL = GUEST_DIR / "vmlinuz"
MEM = "256M"
TAG = "shardfs"


def build_image() -> Path:
    env = dict(os.environ, SHARDFS_GUEST_DIR=str(GUEST_DIR))
    res = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=300, env=env,
                         check=False)
    if res.returncode != 0 or not IMAGE.exists():
        raise RuntimeError(f"{BUILD} failed:\n{res.stdout}\n{res.stderr}")
    return IMAGE


class Qmp:
    """A minimal QMP client: commands in order, events kept aside."""

    def __init__(self, path: Path, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout_s)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP closed")
        return json.loads(line)  # type: ignore[no-any-return]

    def cmd(self, name: str, **args: Any) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")
            return reply.get("return")

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


@dataclass
class Vm:
    name: str
    work: Path
    socket_path: Path
    queues: int
    incoming_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    qmp: Qmp | None = None

    @property
    def console(self) -> Path:
        return self.work / f"{self.name}.console"

    @property
    def stderr_path(self) -> Path:
        return self.work / f"{self.name}.qemu.log"

    def command(self) -> list[str]:
        cmd = [
            QEMU, "-machine", "q35", "-accel", "tcg", "-m", MEM,
            "-smp", str(max(1, self.queues)),
            "-object", f"memory-backend-memfd,id=mem,size={MEM},share=on",
            "-numa", "node,memdev=mem",
            "-kernel", str(KERNEL), "-initrd", str(IMAGE),
            "-append", "console=ttyS0 quiet panic=-1",
            "-nographic", "-nodefaults", "-no-user-config", "-monitor", "none",
            "-chardev", f"file,id=console,path={self.console}", "-serial", "chardev:console",
            "-no-reboot",
            "-chardev", f"socket,id=vfs,path={self.socket_path}",
            "-device", f"vhost-user-fs-pci,chardev=vfs,tag={TAG},"
                       f"num-request-queues={self.queues},queue-size=1024",
            "-qmp", f"unix:{self.work / (self.name + '.qmp')},server=on,wait=off",
        ]
        if self.incoming_port is not None:
            cmd += ["-incoming", f"tcp:127.0.0.1:{self.incoming_port}"]
        return cmd

    def start(self) -> Vm:
        self.work.mkdir(parents=True, exist_ok=True)
        err = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=err, stderr=err, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        err.close()
        self.qmp = Qmp(self.work / (self.name + ".qmp"))
        return self

    def log(self) -> str:
        return read_text(self.stderr_path)

    def describe(self) -> str:
        return (f"--- {self.name} QEMU log ---\n{self.log()[-3000:]}\n"
                f"--- {self.name} console ---\n{read_text(self.console)[-3000:]}")

    def quit(self) -> None:
        if self.qmp is not None:
            try:
                self.qmp.cmd("quit")
            except (OSError, RuntimeError, ConnectionError):
                pass
            self.qmp.close()
            self.qmp = None
        self.wait(30)

    def wait(self, timeout_s: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _kill_group(self.proc)
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Outcome:
    status: str
    source_state: str
    dest_state: str | None
    downtime_ms: int | None
    total_ms: int | None
    info: dict[str, Any]


def migrate(src: Vm, dst: Vm, *, bandwidth: int = 1 << 30, timeout_s: float = 600.0,
            cancel_when_active: bool = False) -> Outcome:
    """Migrate ``src`` to ``dst`` (started with -incoming) and wait for the end."""
    assert src.qmp is not None and dst.qmp is not None and dst.incoming_port is not None
    src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": bandwidth,
                                             "downtime-limit": 300})
    src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{dst.incoming_port}")
    deadline = time.monotonic() + timeout_s
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        info = src.qmp.cmd("query-migrate")
        status = info.get("status", "")
        if cancel_when_active and status == "active":
            src.qmp.cmd("migrate_cancel")
            cancel_when_active = False
        if status in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"migration did not end in {timeout_s}s: {info}")
    dest_state = None
    if info["status"] == "completed":
        # The destination resumes right after the stream ends; give it a moment.
        for _ in range(300):
            try:
                dest_state = dst.qmp.status()
            except (OSError, ConnectionError, RuntimeError):
                dest_state = "gone"
                break
            if dest_state == "running":
                break
            time.sleep(0.1)
    return Outcome(info["status"], src.qmp.status(), dest_state, info.get("downtime"),
                   info.get("total-time"), info)
