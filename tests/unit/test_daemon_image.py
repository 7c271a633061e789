"""The daemon's own image (shardfs.proc.daemon): the hand-over from the parser's
image (shardfs.proc.handover), and that the exec really leaves the parser's
modules behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from shardfs.config import FIELDS, Config
from shardfs.proc import handover

#: Modules only the command line needs; none may be in the daemon image.
PARSER_ONLY = {"argparse", "gettext", "json", "shutil", "shardfs.cli", "shardfs.compat"}
#: Modules needed only with DAX, host locks or a migration.
ON_DEMAND = {"shardfs.proc.coordinator", "shardfs.proc.dax", "shardfs.proc.locks",
             "shardfs.codec.devstate", "shardfs.fs.passthrough.migrate"}
#: Standard modules no daemon module may import: ``dataclasses`` imports ``inspect``
#: (which imports ``ast``, ``dis``...), about 0.86 MB of heap in every daemon process.
HEAVY_STDLIB = {"dataclasses", "inspect"}


def every_field_changed() -> Config:
    """A Config with every field away from its default, of the field's own type."""
    cfg = Config()
    for name in FIELDS:
        value = getattr(cfg, name)
        if isinstance(value, bool):
            new: object = not value
        elif isinstance(value, int):
            new = value + 7
        elif isinstance(value, str):
            new = value + "x"
        elif name in ("uid_map", "gid_map"):
            new = ((0, 1000, 1), (1, 100000, 65536))
        elif name == "cache_timeout_s":
            new = 2.5
        elif name in ("fd", "max_nodes", "max_handles", "rlimit_nofile"):
            new = 9
        else:
            new = f"{name}-value"
        setattr(cfg, name, new)
    return cfg


def test_hand_over_keeps_every_field_and_the_notes() -> None:
    cfg = every_field_changed()
    got, notes = handover.decode(handover.encode(cfg, ["a note", "another"]))
    assert got == cfg
    assert notes == ["a note", "another"]
    assert isinstance(got.uid_map, tuple) and all(isinstance(r, tuple) for r in got.uid_map)


@pytest.mark.parametrize("data, why", [
    (b"\xc1", "unreadable"),
    (msgpack.packb([1, 2]), "not a config hand-over"),
    (msgpack.packb({"config": {}, "notes": [], "extra": 1}), "not a config hand-over"),
    (msgpack.packb({"config": {"no_such": 1}, "notes": []}), "no_such: not a config field"),
    (msgpack.packb({"config": {"xattr": 1}, "notes": []}), "xattr: int where"),
    (msgpack.packb({"config": {"num_request_queues": "2"}, "notes": []}),
     "num_request_queues: str where"),
    (msgpack.packb({"config": {"uid_map": [[1, 2]]}, "notes": []}), "uid_map: not a list"),
    (msgpack.packb({"config": {}, "notes": [3]}), "not a config hand-over"),
])
def test_hand_over_refuses_what_config_would_not_hold(data: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        handover.decode(data)


def test_daemon_image_without_a_hand_over_exits_2_with_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "shardfs.proc.daemon", "99"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "hand-over" in r.stderr


def test_interpreter_flags_carry_over() -> None:
    r = subprocess.run([sys.executable, "-OO", "-P", "-X", "dev",
                        "-W", "ignore::DeprecationWarning", "-c",
                        "from shardfs.proc.handover import interpreter_flags; "
                        "print(' '.join(interpreter_flags()))"],
                       capture_output=True, text=True, check=True, timeout=60)
    flags = r.stdout.split()
    assert flags[0] == "-OO"
    assert "-P" in flags  # -m would otherwise import from the working directory
    assert flags[flags.index("-X") + 1] == "dev"
    assert "ignore::DeprecationWarning" in flags


def test_daemon_image_imports_neither_the_parser_nor_the_optional_parts() -> None:
    """What the daemon image imports at start (the supervisor and every module a
    worker runs) leaves out the parser's modules and what DAX, locks and
    migration need until they are configured or used, and the heavy standard
    modules no daemon module needs."""
    code = ("import sys, shardfs.proc.daemon, shardfs.proc.supervisor, shardfs.proc.pidfile; "
            "print(' '.join(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, timeout=60)
    loaded = set(r.stdout.split())
    assert "shardfs.proc.worker" in loaded
    unwanted = PARSER_ONLY | ON_DEMAND | HEAVY_STDLIB
    assert not loaded & unwanted, loaded & unwanted


def test_the_optional_parts_import_no_heavy_stdlib_either() -> None:
    """A daemon with DAX, host locks or a migration loads them later, into the
    same processes: they must not bring in what the start image leaves out."""
    code = ("import sys, shardfs.proc.daemon, shardfs.proc.supervisor, "
            + ", ".join(sorted(ON_DEMAND)) + "; print(' '.join(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-OO", "-c", code], capture_output=True, text=True,
                       check=True, timeout=60)
    loaded = set(r.stdout.split())
    assert ON_DEMAND <= loaded
    assert not loaded & HEAVY_STDLIB, loaded & HEAVY_STDLIB


def test_a_program_run_execs_into_the_daemon_image(tmp_path: Path) -> None:
    """Same pid (the pid file says so), -OO kept, the original arguments visible."""
    sock = str(tmp_path / "s.sock")
    args = ["--socket-path", sock, "--shared-dir", str(tmp_path / "share"),
            "--sandbox", "none", "--seccomp", "none"]
    proc = subprocess.Popen([sys.executable, "-OO", "-m", "shardfs", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # The socket is bound by the daemon image, after the exec.
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        assert argv[1] == "-OO"
        assert argv[argv.index("-m") + 1] == "shardfs.proc.daemon"
        assert argv[argv.index("--") + 1:] == args
        assert Path(sock + ".pid").read_text().strip() == str(proc.pid)
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        if proc.stderr:
            proc.stderr.close()
