"""virtiofsd's command line, parsed by shardfs.compat, against virtiofsd's own meaning.

The command lines here are the ones launchers really send (libvirt 11.3's
two syntaxes, from src/qemu/qemu_virtiofs.c qemuVirtioFSBuildCommandLine),
plus every option of ``virtiofsd --help`` (1.13.2) and every ``-o`` entry
virtiofsd 1.13 accepts.  Each is checked through :func:`shardfs.config.load`,
i.e. into the Config the daemon would run with.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shardfs import cli
from shardfs.compat import CommandLineError, parse_command_line
from shardfs.compat.legacy import split_options
from shardfs.compat.options import OPTIONS
from shardfs.config import FIELDS, Config, ConfigError, load

REPO = Path(__file__).resolve().parents[2]
PEER = REPO / ".peer" / "virtiofsd" / "usr" / "libexec" / "virtiofsd"


def config(argv: list[str]) -> Config:
    cl = parse_command_line(argv)
    return load(cl.config_path, cl.overrides)


def error(argv: list[str]) -> str:
    with pytest.raises((CommandLineError, ConfigError)) as info:
        config(argv)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def share(tmp_path: Path) -> str:
    return str(tmp_path)


# -- libvirt ---------------------------------------------------------------------------


def test_libvirt_separate_options_defaults(share: str) -> None:
    # <filesystem> with nothing but <source dir> and <binary path>: what libvirt 11.3 sends.
    cfg = config(["--fd=3", "--shared-dir", share])
    assert cfg.fd == 3 and cfg.socket_path is None and cfg.shared_dir == share
    # Everything else is virtiofsd's default.
    assert (cfg.xattr, cfg.cache, cfg.sandbox, cfg.seccomp) == (False, "auto", "namespace",
                                                                "kill")
    assert (cfg.readdirplus, cfg.announce_submounts, cfg.writeback, cfg.killpriv_v2) == (
        True, True, False, False)
    assert cfg.rlimit_nofile is None and cfg.log_level == "info"


def test_libvirt_separate_options_full(share: str) -> None:
    cfg = config(["--fd=7", "--shared-dir", share, "--cache", "never", "--sandbox", "chroot",
                  "--thread-pool-size=16", "--rlimit-nofile=4096", "--log-level", "debug",
                  "--uid-map=:0:1000:1:", "--uid-map=:1:100000:65536:",
                  "--gid-map=:0:1000:1:", "--gid-map=:1:100000:65536:"])
    assert (cfg.cache, cfg.sandbox, cfg.thread_pool_size, cfg.rlimit_nofile) == (
        "never", "chroot", 16, 4096)
    assert cfg.uid_map == ((0, 1000, 1), (1, 100000, 65536)) == cfg.gid_map
    assert cfg.log_level == "debug" and not cfg.xattr


def test_libvirt_xattr_on_with_chroot(share: str) -> None:
    # Served: xattrs go through the /proc/self/fd directory held across the chroot.
    cfg = config(["--fd=3", "--shared-dir", share, "--sandbox", "chroot", "--xattr"])
    assert cfg.sandbox == "chroot" and cfg.xattr


def test_libvirt_legacy_o_syntax(share: str) -> None:
    # What libvirt sends a backend without "separate-options".
    cfg = config(["--fd=5", "-o", f"source={share},cache=none,sandbox=chroot,no_xattr,"
                  "no_flock,no_posix_lock", "--thread-pool-size=2", "-d"])
    assert (cfg.shared_dir, cfg.cache, cfg.sandbox, cfg.xattr) == (share, "never", "chroot",
                                                                   False)
    assert cfg.log_level == "debug" and cfg.thread_pool_size == 2


def test_libvirt_escapes_commas_in_source(tmp_path: Path) -> None:
    odd = tmp_path / "a,b"
    odd.mkdir()
    cfg = config(["--fd=5", "-o", "source=" + str(odd).replace(",", ",,") + ",xattr"])
    assert cfg.shared_dir == str(odd) and cfg.xattr
    assert list(split_options("a,,b,c")) == ["a,b", "c"]


@pytest.mark.parametrize(("entries", "locks"), [
    ("flock", "flock"), ("posix_lock", "posix"), ("posix_lock,flock", "posix,flock"),
    ("flock,no_flock", "none"), ("no_flock,no_posix_lock", "none"),
])
def test_legacy_lock_switches_turn_host_locks_on(share: str, entries: str, locks: str) -> None:
    # As the C virtiofsd: -o posix_lock / -o flock ask for host-visible locks.
    cfg = config(["--fd=5", "-o", f"source={share},{entries}"])
    assert cfg.locks == locks


def test_locks_flag_and_its_one_line_refusal(share: str) -> None:
    assert config(["--fd=5", "--shared-dir", share, "--locks", "posix,flock"]).locks == \
        "posix,flock"
    assert "locks" in error(["--fd=5", "--shared-dir", share, "--locks", "fcntl"])


# -- every virtiofsd option ------------------------------------------------------------


@pytest.mark.parametrize(("flag", "field", "on"), [
    ("--xattr", "xattr", True), ("--posix-acl", "posix_acl", True),
    ("--writeback", "writeback", True), ("--readonly", "readonly", True),
    ("--allow-direct-io", "allow_direct_io", True), ("--allow-mmap", "allow_mmap", True),
    ("--no-readdirplus", "readdirplus", False),
    ("--announce-submounts", "announce_submounts", True),
    ("--no-announce-submounts", "announce_submounts", False),
    ("--killpriv-v2", "killpriv_v2", True), ("--no-killpriv-v2", "killpriv_v2", False),
    ("--security-label", "security_label", True),
    ("--preserve-noatime", "preserve_noatime", True),
    ("--migration-verify-handles", "migration_verify_handles", True),
    ("--migration-confirm-paths", "migration_confirm_paths", True),
])
def test_bare_boolean_flags(share: str, flag: str, field: str, on: bool) -> None:
    cfg = config(["--socket-path=/tmp/s", "--shared-dir", share, flag])
    assert getattr(cfg, field) is on


def test_shardfs_value_forms_of_flags_still_work(share: str) -> None:
    base = ["--socket-path=/tmp/s", "--shared-dir", share]
    assert config([*base, "--xattr=true"]).xattr
    assert not config([*base, "--xattr", "false"]).xattr
    assert config([*base, "--xattr", "--cache", "always"]).cache == "always"
    assert not config([*base, "--xattr", "--no-xattr"]).xattr  # the last one wins


def test_posix_acl_and_security_label_imply_xattr(share: str) -> None:
    base = ["--socket-path=/tmp/s", "--shared-dir", share]
    assert config([*base, "--posix-acl"]).xattr
    assert config([*base, "--security-label"]).xattr
    assert "posix_acl" in error([*base, "--posix-acl", "--no-xattr"])


@pytest.mark.parametrize(("argv", "field", "value"), [
    (["--thread-pool-size", "0"], "thread_pool_size", 0),
    (["--rlimit-nofile=0"], "rlimit_nofile", 0),
    (["--modcaps=+sys_admin:-chown"], "modcaps", "+sys_admin:-chown"),
    (["--inode-file-handles=mandatory"], "inode_file_handles", "mandatory"),
    (["--inode-file-handles"], "inode_file_handles", "prefer"),
    (["--inode-file-handles=fallback"], "inode_file_handles", "prefer"),
    (["--log-level", "warn"], "log_level", "warn"),
    (["--log-level", "off"], "log_level", "off"),
    (["--log-level", "trace"], "log_level", "trace"),
    (["--syslog"], "log_target", "syslog"),
    (["--seccomp", "trap"], "seccomp", "kill"),
    (["--seccomp", "log"], "seccomp", "log"),
    (["--translate-uid", "map:1000:5000:10", "--translate-uid", "squash-guest:0:1:5"],
     "translate_uid", "map:1000:5000:10,squash-guest:0:1:5"),
    (["--xattr", "--xattrmap", ":map::user.virtiofs.:"], "xattrmap", ":map::user.virtiofs.:"),
    (["--tag", "myfs"], "tag", "myfs"),
    (["--migration-mode", "file-handles"], "migration_mode", "file-handles"),
    (["--migration-on-error", "guest-error"], "migration_on_error", "guest-error"),
    (["-d"], "log_level", "debug"),
])
def test_valued_options(share: str, argv: list[str], field: str, value: Any) -> None:
    cfg = config(["--socket-path=/tmp/s", "--shared-dir", share, *argv])
    assert getattr(cfg, field) == value


def test_deprecated_socket_and_f(share: str) -> None:
    cfg = config(["--socket", "/tmp/old.sock", "--shared-dir", share, "-f"])
    assert cfg.socket_path == "/tmp/old.sock"


def test_socket_group_with_fd_is_refused(share: str) -> None:
    assert "socket_group" in error(["--fd=3", "--shared-dir", share, "--socket-group", "root"])


@pytest.mark.parametrize(("argv", "name"), [
    (["--uid-map=0:1000:1"], "uid_map"),
    (["--uid-map=:0:1000:"], "uid_map"),
    (["--gid-map=:0:x:1:"], "gid_map"),
    (["--uid-map=:0:1000:0:"], "uid_map"),
    (["--uid-map=:0:1000:10:", "--uid-map=:5:2000:10:"], "uid_map"),
    (["--uid-map=:0:4294967290:10:"], "uid_map"),
    (["--inode-file-handles=always"], "inode_file_handles"),
    (["--rlimit-nofile=-1"], "rlimit_nofile"),
    (["--thread-pool-size=many"], "thread_pool_size"),
    (["--migration-mode=teleport"], "migration_mode"),
    (["--cache", "sometimes"], "cache"),
    (["-o", "cache=sometimes"], "cache"),
    (["-o", "bogus"], "bogus"),
    (["-o", "timeout=soon"], "cache_timeout_s"),
    (["-o", "log_level=loud"], "log_level"),
    (["--posix-acl", "--translate-uid", "map:0:1:1"], "posix_acl"),
])
def test_bad_options_are_one_line_naming_the_field(share: str, argv: list[str],
                                                   name: str) -> None:
    assert name in error(["--socket-path=/tmp/s", "--shared-dir", share, *argv])


# -- the -o list ----------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "field", "value"), [
    ("cache=none", "cache", "never"), ("cache=auto", "cache", "auto"),
    ("cache=always", "cache", "always"), ("cache=metadata", "cache", "metadata"),
    ("xattr", "xattr", True), ("no_xattr", "xattr", False),
    ("posix_acl", "posix_acl", True), ("no_posix_acl", "posix_acl", False),
    ("security_label", "security_label", True),
    ("writeback", "writeback", True), ("no_writeback", "writeback", False),
    ("readdirplus", "readdirplus", True), ("no_readdirplus", "readdirplus", False),
    ("announce_submounts", "announce_submounts", True),
    ("allow_direct_io", "allow_direct_io", True),
    ("no_allow_direct_io", "allow_direct_io", False),
    ("killpriv_v2", "killpriv_v2", True), ("no_killpriv_v2", "killpriv_v2", False),
    ("sandbox=none", "sandbox", "none"), ("modcaps=-mknod", "modcaps", "-mknod"),
    ("xattr,xattrmap=:map::user.x.:", "xattrmap", ":map::user.x.:"),
    ("log_level=err", "log_level", "error"), ("log_level=warn", "log_level", "warn"),
    ("timeout=2.5", "cache_timeout_s", 2.5), ("debug", "log_level", "debug"),
    ("no_flock", "xattr", False), ("no_posix_lock", "xattr", False), ("norace", "xattr", False),
])
def test_every_legacy_entry(share: str, entry: str, field: str, value: Any) -> None:
    cfg = config(["--socket-path=/tmp/s", "-o", f"source={share},{entry}"])
    assert getattr(cfg, field) == value


def test_legacy_entries_override_flags_as_in_virtiofsd(share: str) -> None:
    cfg = config(["--socket-path=/tmp/s", "--shared-dir", "/nonexistent", "--xattr",
                  "-o", f"source={share},no_xattr", "-o", "cache=always"])
    assert cfg.shared_dir == share and not cfg.xattr and cfg.cache == "always"


def test_vhost_user_socket_legacy_entry(share: str) -> None:
    assert config(["-o", f"vhost_user_socket=/tmp/v.sock,source={share}"]).socket_path == \
        "/tmp/v.sock"


# -- the table, the parser and virtiofsd agree -----------------------------------------


def test_every_config_field_has_an_option() -> None:
    named = {o.field for o in OPTIONS} | {"log_target"}
    assert set(FIELDS) <= named


@pytest.mark.skipif(not PEER.exists() and os.environ.get("SHARDFS_REQUIRE_PEER") != "1",
                    reason="virtiofsd not fetched (scripts/get-virtiofsd)")
def test_every_option_virtiofsd_prints_is_accepted(share: str) -> None:
    """Parse ``virtiofsd --help`` and feed each of its options to shardfs."""
    text = subprocess.run([str(PEER), "--help"], capture_output=True, text=True,
                          check=True).stdout
    flags = set()
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("-"):
            for word in stripped.replace(",", " ").split():
                word = word.split("=")[0]
                if re.fullmatch(r"--?[a-zA-Z][\w-]*", word):
                    flags.add(word)
    assert {"--shared-dir", "--uid-map", "--thread-pool-size", "-o"} <= flags
    samples = {"--shared-dir": share, "--tag": "t", "--socket": "/tmp/s",
               "--socket-path": "/tmp/s", "--socket-group": "root", "--fd": "3",
               "--thread-pool-size": "1", "--xattrmap": ":map::user.v.:",
               "--sandbox": "none", "--seccomp": "kill", "--inode-file-handles": "prefer",
               "--cache": "auto", "--modcaps": "-mknod", "--log-level": "info",
               "--rlimit-nofile": "0", "-o": "no_xattr", "--uid-map": ":0:0:1:",
               "--gid-map": ":0:0:1:", "--translate-uid": "map:0:0:1",
               "--translate-gid": "map:0:0:1", "--migration-mode": "find-paths",
               "--migration-on-error": "abort"}
    for flag in sorted(flags - {"-h", "--help", "-V", "--version", "--print-capabilities"}):
        argv = [flag] if flag not in samples else [flag, samples[flag]]
        base = ["--shared-dir", share]
        if flag not in ("--fd", "--socket", "--socket-path"):
            base += ["--socket-path", "/tmp/s"]
        if flag == "--socket-group":
            base = ["--shared-dir", share, "--socket-path", "/tmp/s"]
        if flag == "--xattrmap":
            argv.append("--xattr")
        cl = parse_command_line([*base, *argv])
        load(cl.config_path, cl.overrides)


def test_print_capabilities_says_separate_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--print-capabilities"]) == 0
    caps = json.loads(capsys.readouterr().out)
    assert caps == {"type": "fs", "features": ["migrate-precopy", "separate-options"]}


def test_scripts_shardfs_prints_capabilities_like_virtiofsd() -> None:
    """libvirt runs the binary with exactly this argument and parses stdout as JSON."""
    out = subprocess.run([str(REPO / "scripts" / "shardfs"), "--print-capabilities"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert json.loads(out)["features"] == ["migrate-precopy", "separate-options"]


def test_help_lists_virtiofsd_options() -> None:
    out = subprocess.run([sys.executable, "-m", "shardfs", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--thread-pool-size", "--uid-map", "--inode-file-handles", "--shared-dir"):
        assert flag in out


def test_readme_option_table_is_the_generated_one() -> None:
    """The README's table is ``python -m shardfs.compat.table``: regenerate it when an
    option changes."""
    from shardfs.compat.table import markdown_table

    assert markdown_table() in (REPO / "README.md").read_text()
