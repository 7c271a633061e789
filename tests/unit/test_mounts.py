"""Mount fds for submounts (shardfs.fs.passthrough.mounts)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardfs.fs.passthrough.mounts import parse_mountinfo, submount_fds


def test_parse_mountinfo_unescapes_mount_points() -> None:
    text = (b"36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw\n"
            b"37 36 0:52 / /srv/a\\040b\\134c rw - tmpfs tmpfs rw\n"
            b"garbage\n")
    assert parse_mountinfo(text) == [(os.makedev(98, 0), b"/mnt/parent"),
                                     (os.makedev(0, 52), b"/srv/a b\\c")]


@pytest.fixture
def share(tmp_path: Path) -> Iterator[Path]:
    share = tmp_path / "share"
    (share / "m").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "t", str(share / "m")], check=True)
    try:
        yield share
    finally:
        subprocess.run(["umount", "-l", str(share / "m")], check=True)


def test_submounts_are_opened_by_dev(share: Path) -> None:
    fds = submount_fds(str(share))
    try:
        dev = os.stat(share / "m").st_dev
        assert list(fds) == [dev] and os.fstat(fds[dev]).st_dev == dev
    finally:
        for fd in fds.values():
            os.close(fd)


def test_a_mount_point_reached_through_a_symlink_is_skipped(share: Path,
                                                            tmp_path: Path) -> None:
    """mountinfo names a path the guest could have tampered with: the lookup
    is beneath the share without symlinks, so a planted link is not followed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (share / "evil").symlink_to(outside)
    fake = tmp_path / "mountinfo"
    dev = os.stat(share / "m").st_dev
    fake.write_bytes(f"1 1 {os.major(dev)}:{os.minor(dev)} / {share}/evil/x rw - tmpfs t rw\n"
                     f"2 1 {os.major(dev)}:{os.minor(dev)} / {share}/m rw - tmpfs t rw\n"
                     f"3 1 1:2 / {share}/missing rw - tmpfs t rw\n"
                     f"4 1 1:2 / {tmp_path}/elsewhere rw - tmpfs t rw\n".encode())
    fds = submount_fds(str(share), str(fake))
    try:
        assert list(fds) == [dev]  # only the real one
    finally:
        for fd in fds.values():
            os.close(fd)


def test_a_dev_that_does_not_match_is_skipped(share: Path, tmp_path: Path) -> None:
    fake = tmp_path / "mountinfo"
    fake.write_bytes(f"1 1 7:77 / {share}/m rw - tmpfs t rw\n".encode())  # not m's dev
    assert submount_fds(str(share), str(fake)) == {}
