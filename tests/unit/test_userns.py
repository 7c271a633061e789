"""The user namespace of a non-root daemon (shardfs.sandbox.userns), for real.

Each test forks; the child drops to the ``shardfs-rootless`` user (made by
``tests/frontend/test_rootless.py``'s helper, with subordinate ids), enters a
user namespace as the supervisor does, and reports what the kernel then
says (its maps, its pid, what a credential switch does) through a pipe as
JSON.  The parent asserts.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shardfs.fs.api import Context, FsError
from shardfs.fs.passthrough import creds
from shardfs.sandbox import SandboxError, SandboxPolicy, enter_user_namespace, linux, userns
from tests.frontend.test_rootless import SUBID_COUNT, Account, rootless_account

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="makes a user and switches to it")


@pytest.fixture(scope="module")
def account() -> Account:
    return rootless_account()


def as_user(account: Account, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child that is ``account`` (no groups); its JSON-able result.

    An exception comes back as ``{"raised": "Type: message"}``.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(account.gid, account.gid, account.gid)
            os.setresuid(account.uid, account.uid, account.uid)
            # As after execve: leaving root made the process undumpable, which
            # leaves /proc/self/{setgroups,uid_map,gid_map} root's.
            linux.prctl(linux.PR_SET_DUMPABLE, 1)
            out: Any = fn()
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            out = {"raised": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and data, status
    return json.loads(data)


def enter_and_report(uid_map: userns.IdMap = (), gid_map: userns.IdMap = ()) -> dict[str, Any]:
    pid = os.getpid()
    userns.enter(uid_map, gid_map)
    try:
        os.waitpid(-1, os.WNOHANG)
        helper_left = True
    except ChildProcessError:
        helper_left = False
    return {"uid_map": userns.read_map("uid_map"), "gid_map": userns.read_map("gid_map"),
            "euid": os.geteuid(), "same_pid": os.getpid() == pid,
            "setgroups": userns.may_setgroups(), "helper_left": helper_left}


def test_the_host_namespace_maps_every_id() -> None:
    assert userns.read_map("uid_map") == ((0, 0, 4294967295),)
    assert userns.may_setgroups()
    assert not userns.wanted("namespace")  # root keeps the host's namespace
    assert userns.format_map(((0, 1000, 1), (1, 100000, 65536))) == ":0:1000:1: :1:100000:65536:"


def test_root_refuses_maps_and_runs_the_rest() -> None:
    for mode in ("namespace", "chroot", "none"):
        assert userns.refusal(mode, (), (), queues=4, dax=True) is None
    why = userns.refusal("namespace", ((0, 1000, 1),), (), queues=1, dax=False)
    assert why is not None and why.startswith("uid_map: only for a non-root user"), why


def test_non_root_refusals_name_the_field(account: Account) -> None:
    def probe() -> dict[str, str | None]:
        return {
            "chroot": userns.refusal("chroot", (), (), queues=1, dax=False),
            "queues": userns.refusal("namespace", (), (), queues=2, dax=False),
            "dax": userns.refusal("namespace", (), (), queues=1, dax=True),
            "map_none": userns.refusal("none", (), ((0, 1, 1),), queues=1, dax=False),
            "fine": userns.refusal("namespace", ((0, 1, 1),), (), queues=1, dax=False),
            "none": userns.refusal("none", (), (), queues=1, dax=False),
            "none_queues": userns.refusal("none", (), (), queues=8, dax=False),
            "wanted": str(userns.wanted("namespace")),
        }

    out = as_user(account, probe)
    assert out["chroot"].startswith("sandbox: chroot needs root")
    assert out["queues"].startswith("num_request_queues: 2")
    assert out["dax"].startswith("dax_window: ")
    assert out["map_none"].startswith("gid_map: only for a non-root user")
    assert out["none_queues"].startswith("num_request_queues: 8")
    assert out["fine"] is None and out["none"] is None and out["wanted"] == "True"
    for text in out.values():
        assert text is None or "\n" not in text


def test_the_caller_alone_is_root_inside(account: Account) -> None:
    out = as_user(account, enter_and_report)
    assert out == {"uid_map": [[0, account.uid, 1]], "gid_map": [[0, account.gid, 1]],
                   "euid": 0, "same_pid": True, "setgroups": False, "helper_left": False}


def test_maps_go_through_newuidmap_from_outside(account: Account) -> None:
    umap = ((0, account.uid, 1), (1, account.subuid, SUBID_COUNT))
    gmap = ((0, account.gid, 1), (1, account.subgid, SUBID_COUNT))
    out = as_user(account, lambda: enter_and_report(umap, gmap))
    assert out == {"uid_map": [list(r) for r in umap], "gid_map": [list(r) for r in gmap],
                   "euid": 0, "same_pid": True, "setgroups": True, "helper_left": False}
    # A map for uids only: the gids get the caller's own, through newgidmap too.
    out = as_user(account, lambda: enter_and_report(umap, ()))
    assert out["gid_map"] == [[0, account.gid, 1]] and out["uid_map"] == [list(r) for r in umap]


def test_a_refused_map_is_one_line_naming_it(account: Account) -> None:
    far = account.subgid + 4 * SUBID_COUNT

    def probe() -> str:
        try:
            enter_user_namespace(SandboxPolicy("namespace", "none"), (),
                                 ((0, account.gid, 1), (1, far, SUBID_COUNT)))
        except SandboxError as e:
            return str(e)
        return "entered"

    out = as_user(account, probe)
    assert out.startswith(f"gid_map: newgidmap refused :0:{account.gid}:1: :1:{far}:"), out
    assert "\n" not in out


def test_credentials_inside_the_namespace(account: Account) -> None:
    """An unmapped guest id is EINVAL (never a file of the daemon's); a mapped one owns."""
    work = Path(tempfile.mkdtemp(prefix="shardfs-userns-"))
    os.chown(work, account.uid, account.gid)
    work.chmod(0o777)

    def attempt(uid: int, name: str) -> str:
        creds.configure(guest_dac=True)  # forget what this process read as root
        try:
            with creds.caller_creds(Context(uid, uid, 0)):
                os.mkdir(work / name)
        except FsError as e:
            return errno.errorcode[e.errno]
        return "made"

    def probe(umap: userns.IdMap, gmap: userns.IdMap) -> Callable[[], list[str]]:
        def run() -> list[str]:
            userns.enter(umap, gmap)
            return [attempt(0, f"root{len(umap)}"), attempt(1000, f"u1000_{len(umap)}"),
                    attempt(2000, f"u2000_{len(umap)}")]
        return run

    try:
        assert as_user(account, probe((), ())) == ["made", "EINVAL", "EINVAL"]
        umap = ((0, account.uid, 1), (1, account.subuid, SUBID_COUNT))
        gmap = ((0, account.gid, 1), (1, account.subgid, SUBID_COUNT))
        assert as_user(account, probe(umap, gmap)) == ["made", "made", "made"]
        # virtiofsd's own default map (the caller as itself, here as 1000): 0 is
        # not mapped, and the guest's root is served as the daemon, as virtiofsd does.
        own = (((1000, account.uid, 1),), ((1000, account.gid, 1),))
        assert as_user(account, probe(*own)) == ["made", "made", "EINVAL"]
        owners = {p.name: (p.stat().st_uid, p.stat().st_gid) for p in work.iterdir()}
        user = (account.uid, account.gid)
        assert owners == {"root0": user, "root2": user, "root1": user, "u1000_1": user,
                          "u1000_2": (account.subuid + 999, account.subgid + 999),
                          "u2000_2": (account.subuid + 1999, account.subgid + 1999)}, owners
    finally:
        shutil.rmtree(work)
