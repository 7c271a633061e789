"""The pure parts of virtiofsd's options: modcaps names and edits, the INIT flags
each option asks for, the cache timeout override, the host open mask, the
mount-point test and the file-handle check (the last two on real mounts, as root).
The daemon's behaviour is in tests/frontend/test_virtiofsd_options.py."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardfs.abi import capability as C
from shardfs.abi import fuse as F
from shardfs.config import ConfigError, load
from shardfs.fs.passthrough.core import HOST_OPEN_FLAGS, PassthroughBase
from shardfs.fs.passthrough.fhandle import check_handles
from shardfs.fs.passthrough.mounts import is_mount_point
from shardfs.fs.passthrough.policy import POLICIES, cache_policy
from shardfs.fs.passthrough.session import InitOptions, wanted_flags
from shardfs.sandbox import SandboxPolicy, caps

# -- modcaps -------------------------------------------------------------------------


def test_every_capability_of_linux_has_a_name() -> None:
    assert sorted(C.CAPABILITY_NUMBERS.values()) == list(range(C.CAP_LAST_CAP + 1))
    assert C.CAPABILITY_NUMBERS["SYS_ADMIN"] == C.CAP_SYS_ADMIN == 21
    assert C.CAPABILITY_NUMBERS["CHECKPOINT_RESTORE"] == 40


def test_parse_modcaps_is_case_insensitive_and_ordered() -> None:
    assert C.parse_modcaps("+sys_admin:-CHOWN:+Mknod") == (
        (True, C.CAP_SYS_ADMIN), (False, C.CAP_CHOWN), (True, C.CAP_MKNOD))


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty item"),
    ("+chown::-mknod", "empty item"),
    ("chown", "must start with + or -"),
    ("*chown", "must start with + or -"),
    ("+cap_chown", "no capability named 'cap_chown'"),
    ("-nosuch", "no capability named 'nosuch'"),
])
def test_parse_modcaps_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        C.parse_modcaps(text)


def test_kept_capabilities_edit_the_passthrough_set_in_order() -> None:
    assert caps.kept_capabilities(None) == caps.PASSTHROUGH_CAPS
    assert caps.kept_capabilities("-mknod:+sys_admin") == \
        caps.PASSTHROUGH_CAPS - {C.CAP_MKNOD} | {C.CAP_SYS_ADMIN}
    # A later item wins, as in virtiofsd's parse_modcaps.
    assert caps.kept_capabilities("-chown:+chown") == caps.PASSTHROUGH_CAPS
    assert C.CAP_CHOWN not in caps.kept_capabilities("+chown:-chown")


def test_sandbox_policy_checks_modcaps() -> None:
    assert SandboxPolicy("none", "none", "+sys_admin").keep == \
        caps.PASSTHROUGH_CAPS | {C.CAP_SYS_ADMIN}
    with pytest.raises(ValueError, match="no capability named"):
        SandboxPolicy("namespace", "kill", "+root")


@pytest.fixture
def base(tmp_path: Path) -> dict[str, Any]:
    return {"socket_path": str(tmp_path / "vhost.sock"), "shared_dir": str(tmp_path)}


@pytest.mark.parametrize(("extra", "message"), [
    ({"modcaps": "+sys_admin:-bogus"},
     "config: modcaps: '-bogus': no capability named 'bogus'"),
    ({"modcaps": "-dac_read_search", "inode_file_handles": "prefer"},
     "config: modcaps: cannot drop dac_read_search with inode_file_handles = prefer"),
    ({"modcaps": "-dac_read_search", "num_request_queues": 2},
     "config: modcaps: cannot drop dac_read_search with more than one request queue or DAX "
     "(nodes are reopened by file handle)"),
])
def test_config_modcaps_errors_are_one_line(base: dict[str, Any], extra: dict[str, Any],
                                           message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, {**base, **extra})
    assert str(info.value) == message


def test_config_modcaps_accepted(base: dict[str, Any]) -> None:
    assert load(None, {**base, "modcaps": "-MKNOD:+sys_admin"}).modcaps == "-MKNOD:+sys_admin"
    # One queue, no DAX, no file handles asked for: dac_read_search may go.
    assert load(None, {**base, "modcaps": "-dac_read_search"}).modcaps == "-dac_read_search"
    cfg = load(None, {**base, "modcaps": "-dac_read_search:+dac_read_search",
                      "num_request_queues": 2})
    assert cfg.num_request_queues == 2


# -- INIT flags ----------------------------------------------------------------------

EVERYTHING = (1 << 64) - 1


def test_defaults_ask_for_readdirplus_and_submounts_as_virtiofsd() -> None:
    wants = wanted_flags(InitOptions(), EVERYTHING)
    assert wants == (F.FUSE_CREATE_SUPP_GROUP | F.FUSE_DO_READDIRPLUS
                     | F.FUSE_READDIRPLUS_AUTO | F.FUSE_SUBMOUNTS)


@pytest.mark.parametrize(("option", "flags"), [
    ({"readdirplus": False}, F.FUSE_DO_READDIRPLUS | F.FUSE_READDIRPLUS_AUTO),
    ({"announce_submounts": False}, F.FUSE_SUBMOUNTS),
])
def test_turning_an_option_off_drops_its_flags(option: dict[str, bool], flags: int) -> None:
    default = wanted_flags(InitOptions(), EVERYTHING)
    assert wanted_flags(InitOptions(**option), EVERYTHING) == default & ~flags


@pytest.mark.parametrize(("option", "flags"), [
    ("allow_mmap", F.FUSE_DIRECT_IO_ALLOW_MMAP),
    ("writeback", F.FUSE_WRITEBACK_CACHE),
    ("killpriv_v2", F.FUSE_HANDLE_KILLPRIV_V2),
    ("posix_acl", F.FUSE_POSIX_ACL | F.FUSE_DONT_MASK | F.FUSE_SETXATTR_EXT),
    ("security_label", F.FUSE_SECURITY_CTX),
])
def test_turning_an_option_on_adds_its_flags(option: str, flags: int) -> None:
    default = wanted_flags(InitOptions(), EVERYTHING)
    assert wanted_flags(InitOptions(**{option: True}), EVERYTHING) == default | flags


def test_allow_mmap_is_a_flags2_bit() -> None:
    assert F.FUSE_DIRECT_IO_ALLOW_MMAP == 1 << 36


def test_acls_need_dont_mask_from_the_guest() -> None:
    wants = wanted_flags(InitOptions(posix_acl=True), EVERYTHING & ~F.FUSE_DONT_MASK)
    assert not wants & F.FUSE_POSIX_ACL


# -- cache timeout, open flags -------------------------------------------------------------


@pytest.mark.parametrize("name", list(POLICIES))
def test_cache_timeout_replaces_both_timeouts_only(name: str) -> None:
    p = cache_policy(name, 2.5)
    assert (p.entry_timeout_s, p.attr_timeout_s) == (2.5, 2.5)
    assert (p.open_flags, p.opendir_flags) == (POLICIES[name].open_flags,
                                               POLICIES[name].opendir_flags)
    assert cache_policy(name) is POLICIES[name]
    with pytest.raises(ValueError):
        cache_policy(name, -1)


def test_o_noatime_and_o_direct_pass_only_when_asked() -> None:
    assert not HOST_OPEN_FLAGS & (os.O_NOATIME | os.O_DIRECT)
    assert PassthroughBase.open_mask(False, False) == HOST_OPEN_FLAGS
    assert PassthroughBase.open_mask(False, True) == HOST_OPEN_FLAGS | os.O_NOATIME
    assert PassthroughBase.open_mask(True, False) == HOST_OPEN_FLAGS | os.O_DIRECT


# -- mount points and file handles (root: real mounts) -----------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Path]:
    """tmp_path with ``tmpfs`` and ``ramfs`` mounted, ``bind`` bound from ``origin``,
    and a plain directory ``plain``."""
    for name in ("tmpfs", "ramfs", "bind", "origin", "plain"):
        (tmp_path / name).mkdir()
    points = []
    try:
        for args in (["-t", "tmpfs", "tmpfs"], ["-t", "ramfs", "ramfs"]):
            point = str(tmp_path / args[1])
            subprocess.run(["mount", *args, point], check=True)
            points.append(point)
        subprocess.run(["mount", "--bind", str(tmp_path / "origin"), str(tmp_path / "bind")],
                       check=True)
        points.append(str(tmp_path / "bind"))
        (tmp_path / "tmpfs" / "inner").mkdir()
        yield tmp_path
    finally:
        for p in points:
            subprocess.run(["umount", "-l", p], check=False)


@needs_root
def test_is_mount_point(mounted: Path) -> None:
    parent_dev = os.stat(mounted).st_dev

    def check(path: Path, dev: int = parent_dev) -> bool:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            return is_mount_point(dev, fd, os.stat(fd))
        finally:
            os.close(fd)

    assert check(mounted / "tmpfs") and check(mounted / "ramfs")
    assert check(mounted / "bind")  # same st_dev, another mount
    assert not check(mounted / "plain")
    assert not check(mounted / "tmpfs" / "inner", os.stat(mounted / "tmpfs").st_dev)
    # Another st_dev alone counts (a btrfs subvolume has no mount of its own).
    assert check(mounted / "plain", parent_dev + 1)


@needs_root
def test_check_handles(mounted: Path) -> None:
    assert check_handles(str(mounted)) is None
    assert check_handles(str(mounted / "tmpfs")) is None
    why = check_handles(str(mounted / "ramfs"))
    assert why is not None and "makes no file handles" in why
    why = check_handles(str(mounted / "missing"))
    assert why is not None and why.startswith("cannot open")
