"""Fixtures for the end-to-end guest tests (see guest.py).

* ``guest_image``   (session) builds ``.guest`` once; skips if QEMU or the kernel is
  missing (fails instead with ``SHARDFS_REQUIRE_GUEST=1``).
* ``run_guest``     boots the guest: ``run_guest(script, socket_path=..., ...) -> GuestResult``.
* ``shardfs_daemon`` starts ``python -m shardfs`` subprocesses; on teardown it sends
  SIGTERM and fails the test if a daemon exited abnormally.

On failure, the daemon log and the guest console/script logs are attached to the
test report.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest import (
    ARTIFACTS,
    DaemonPool,
    GuestImage,
    RunGuest,
    StartDaemon,
    build_guest,
    make_guest_runner,
    missing_prerequisites,
    read_text,
    tail,
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not report.failed:
        return
    for title, path in item.stash.get(ARTIFACTS, []):
        text = read_text(path)
        if text:
            report.sections.append((f"{title} ({path})", tail(text, 120)))


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    reason = missing_prerequisites()
    if reason is not None:
        if os.environ.get("SHARDFS_REQUIRE_GUEST") == "1":
            pytest.fail(f"SHARDFS_REQUIRE_GUEST=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return build_guest()


@pytest.fixture
def run_guest(
    guest_image: GuestImage, tmp_path: Path, request: pytest.FixtureRequest
) -> RunGuest:
    return make_guest_runner(guest_image, tmp_path, request.node)


@pytest.fixture
def shardfs_daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StartDaemon]:
    pool = DaemonPool(tmp_path, request.node)
    try:
        yield pool
    finally:
        errors = pool.close()
    if errors:
        pytest.fail("\n\n".join(errors), pytrace=False)

