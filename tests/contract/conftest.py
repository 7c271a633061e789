"""Fixtures for the filesystem contract suite: real host files in tmp_path."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shardfs.fs.passthrough import PassthroughFs


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    """PassthroughFs sets umask(0) for the process; give the next test its own."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """The directory the filesystem serves."""
    d = tmp_path / "shared"
    d.mkdir()
    return d


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the shared one that the guest must never reach."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret").write_bytes(b"secret")
    os.setxattr(d / "secret", "user.secret", b"1")
    return d


@pytest.fixture(params=["openat2", "openat"])
def make_fs(request: pytest.FixtureRequest,
            shared: Path) -> Iterator[Callable[..., PassthroughFs]]:
    """Build PassthroughFs instances over ``shared``; all are closed afterwards.

    Every test runs twice: resolving names with openat2(RESOLVE_BENEATH),
    and with the plain openat fallback used where openat2 is missing or
    filtered, which must keep every guarantee on its own.
    """
    made: list[PassthroughFs] = []

    def make(**kwargs: Any) -> PassthroughFs:
        fs = PassthroughFs(str(shared), **kwargs)
        made.append(fs)
        if request.param == "openat":
            fs._has_openat2 = False
        elif not fs._has_openat2:
            pytest.skip("openat2 is not available on this kernel")
        return fs

    yield make
    for fs in made:
        fs.close()


@pytest.fixture
def fs(make_fs: Callable[..., PassthroughFs]) -> PassthroughFs:
    return make_fs()
