"""Contract tests of the semantics options: TMPFILE, the caller's ids in SETATTR,
killpriv, security labels, POSIX ACLs, xattrmap, uid/gid translation and
the read-only decorator.  Every result is checked on the host files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shardfs.abi.fuse import (
    FATTR_ATIME,
    FATTR_ATIME_NOW,
    FATTR_FH,
    FATTR_GID,
    FATTR_MODE,
    FATTR_MTIME,
    FATTR_MTIME_NOW,
    FATTR_SIZE,
    FATTR_UID,
    FUSE_CREATE_SUPP_GROUP,
    FUSE_DONT_MASK,
    FUSE_HANDLE_KILLPRIV_V2,
    FUSE_POSIX_ACL,
    FUSE_ROOT_ID,
    FUSE_SECURITY_CTX,
    FUSE_SETXATTR_ACL_KILL_SGID,
    FUSE_SETXATTR_EXT,
    FUSE_WRITEBACK_CACHE,
)
from shardfs.fs.api import Context, SecContext
from shardfs.fs.build import build_fs
from shardfs.fs.idmap import IdMap, IdMappedFs
from shardfs.fs.passthrough import PassthroughFs, creds
from shardfs.fs.passthrough import sys as lsys
from shardfs.fs.readonly import ReadOnlyFs
from shardfs.fs.xattrmap import XattrMap
from tests.contract.test_passthrough import (
    NSEC,
    ROOT,
    USER,
    assert_same_stat,
    errno_of,
    open_fds,
    read_all,
    setattr_in,
    snapshot,
)

MakeFs = Callable[..., PassthroughFs]
OTHER = Context(uid=2000, gid=2000, pid=3)
SGID_GROUP = 4321
ACL_FLAGS = FUSE_POSIX_ACL | FUSE_DONT_MASK | FUSE_SETXATTR_EXT

# POSIX ACL xattr values (linux/posix_acl_xattr.h).
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20)
NO_ID = 0xFFFF_FFFF


def acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def acl_entries(value: bytes) -> list[tuple[int, int, int]]:
    return [struct.unpack_from("<HHI", value, off) for off in range(4, len(value), 8)]


def mode_of(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def session(fs: PassthroughFs, offered: int) -> int:
    """INIT as the dispatcher does it: the fs's wants, intersected, then recorded."""
    enabled = offered & fs.init(offered)
    fs.negotiated(enabled)
    return enabled


@pytest.fixture(autouse=True)
def _daemon_ids_come_back() -> Iterator[None]:
    """Whatever a test does as a caller, the process's own credentials return."""
    groups = os.getgroups()
    caps = lsys.capget()
    yield
    assert lsys.setfsuid(lsys.ID_UNCHANGED) == 0 and lsys.setfsgid(lsys.ID_UNCHANGED) == 0
    assert os.getgroups() == groups and lsys.capget() == caps
    creds.configure(guest_dac=True)


# -- TMPFILE ------------------------------------------------------------------------------


def test_tmpfile_is_unnamed_until_linked(fs: PassthroughFs, shared: Path) -> None:
    os.chmod(shared, 0o777)
    before = sorted(os.listdir(shared))
    fds = open_fds()
    e, o = fs.tmpfile(USER, FUSE_ROOT_ID, os.O_RDWR, 0o640, 0o022)
    assert stat.S_ISREG(e.attr.st_mode) and e.attr.st_nlink == 0
    assert (e.attr.st_uid, e.attr.st_gid, stat.S_IMODE(e.attr.st_mode)) == (1000, 1000, 0o640)
    assert sorted(os.listdir(shared)) == before
    assert fs.write(ROOT, e.nodeid, o.fh, 0, [memoryview(b"unnamed")], 0) == 7
    assert read_all(fs, e.nodeid, o.fh, 100) == b"unnamed"
    fs.link(USER, e.nodeid, FUSE_ROOT_ID, b"named")
    assert (shared / "named").read_bytes() == b"unnamed"
    fs.release(ROOT, e.nodeid, o.fh)
    fs.forget(e.nodeid, 2)
    assert open_fds() == fds


def test_tmpfile_flags_and_budgets(make_fs: MakeFs, shared: Path) -> None:
    fs = make_fs(max_nodes=2, max_handles=1)
    # O_EXCL: can never be linked (linkat: ENOENT), as on the host.
    e, o = fs.tmpfile(ROOT, FUSE_ROOT_ID, os.O_RDWR | os.O_EXCL, 0o600, 0)
    assert errno_of(fs.link, ROOT, e.nodeid, FUSE_ROOT_ID, b"x") == errno.ENOENT
    # Budgets are checked first: nothing is opened.
    fds = open_fds()
    assert errno_of(fs.tmpfile, ROOT, FUSE_ROOT_ID, os.O_RDWR, 0o600, 0) == errno.ENFILE
    fs.release(ROOT, e.nodeid, o.fh)
    fs.forget(e.nodeid, 1)
    assert open_fds() == fds - 2
    assert errno_of(fs.tmpfile, ROOT, FUSE_ROOT_ID, os.O_RDONLY, 0o600, 0) == errno.EINVAL
    (shared / "f").write_bytes(b"")
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    assert errno_of(fs.tmpfile, ROOT, f.nodeid, os.O_RDWR, 0o600, 0) == errno.ENOTDIR
    assert os.listdir(shared) == ["f"]


# -- SETATTR under the caller's ids -----------------------------------------------------------


def test_chmod_by_the_caller(fs: PassthroughFs, shared: Path) -> None:
    p = shared / "f"
    p.write_bytes(b"")
    os.chown(p, USER.uid, 0)
    os.chmod(p, 0o755)
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    # The owner outside the file's group: g+s is dropped, the rest applies.
    fs.setattr(USER, f.nodeid, setattr_in(FATTR_MODE, mode=0o2775))
    assert mode_of(p) == 0o775
    fs.setattr(USER, f.nodeid, setattr_in(FATTR_MODE, mode=0o4755))
    assert mode_of(p) == 0o4755  # setuid on one's own file is allowed
    # Not the owner: EPERM, as chmod(2) says.
    assert errno_of(fs.setattr, OTHER, f.nodeid, setattr_in(FATTR_MODE, mode=0o777)) \
        == errno.EPERM
    # ... except a pure drop of setuid/setgid (a guest's kill-privilege step).
    fs.setattr(OTHER, f.nodeid, setattr_in(FATTR_MODE, mode=0o755))
    assert mode_of(p) == 0o755
    # Root keeps g+s on any file.
    fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_MODE, mode=0o2755))
    assert mode_of(p) == 0o2755


def test_truncate_and_chown_clear_setuid(fs: PassthroughFs, shared: Path) -> None:
    p = shared / "f"
    p.write_bytes(b"data")
    os.chown(p, USER.uid, USER.gid)
    os.chmod(p, 0o6775)
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_SIZE, size=2))
    assert mode_of(p) == 0o6775  # root's truncate keeps them (CAP_FSETID)
    fs.setattr(USER, f.nodeid, setattr_in(FATTR_SIZE, size=1))
    assert mode_of(p) == 0o775 and p.read_bytes() == b"d"  # the owner's does not
    os.chmod(p, 0o6775)
    fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_UID | FATTR_GID, uid=0, gid=0))
    assert mode_of(p) == 0o775 and os.lstat(p).st_uid == 0  # any chown of a file


def test_times_by_the_caller(fs: PassthroughFs, shared: Path) -> None:
    p = shared / "f"
    p.write_bytes(b"")
    os.chmod(p, 0o666)
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    # Explicit times need the owner; "now" needs write access (here: o+w).
    assert errno_of(fs.setattr, USER, f.nodeid,
                    setattr_in(FATTR_MTIME, mtime_ns=5 * NSEC)) == errno.EPERM
    fs.setattr(USER, f.nodeid, setattr_in(FATTR_MTIME | FATTR_MTIME_NOW | FATTR_ATIME
                                          | FATTR_ATIME_NOW))
    # Only the set fields change (UTIME_OMIT for the other).
    fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_MTIME, mtime_ns=7 * NSEC + 3))
    before = os.lstat(p)
    fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_ATIME, atime_ns=9 * NSEC))
    after = os.lstat(p)
    assert after.st_mtime_ns == before.st_mtime_ns == 7 * NSEC + 3
    assert after.st_atime_ns == 9 * NSEC


def test_open_kill_suidgid(fs: PassthroughFs, shared: Path) -> None:
    p = shared / "f"
    p.write_bytes(b"data")
    os.chmod(p, 0o6755)
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    fs.open(ROOT, f.nodeid, os.O_WRONLY | os.O_TRUNC)
    assert mode_of(p) == 0o6755 and p.read_bytes() == b""
    fs.open(ROOT, f.nodeid, os.O_RDWR, kill_suidgid=True)  # no O_TRUNC: nothing
    assert mode_of(p) == 0o6755
    fs.open(ROOT, f.nodeid, os.O_WRONLY | os.O_TRUNC, kill_suidgid=True)
    assert mode_of(p) == 0o755
    os.chmod(p, 0o4755)
    fs.create(ROOT, FUSE_ROOT_ID, b"f", os.O_WRONLY | os.O_TRUNC, 0o644, 0, kill_suidgid=True)
    assert mode_of(p) == 0o755
    # A non-root caller's O_TRUNC open clears them unasked, as its truncate would.
    os.chmod(p, 0o6777)
    fs.open(USER, f.nodeid, os.O_WRONLY | os.O_TRUNC)
    assert mode_of(p) == 0o777
    os.chmod(p, 0o6777)
    fs.create(USER, FUSE_ROOT_ID, b"f", os.O_WRONLY | os.O_TRUNC, 0o644, 0)
    assert mode_of(p) == 0o777


def test_killpriv_v2_is_negotiated_on_request(make_fs: MakeFs) -> None:
    assert not make_fs().init(FUSE_HANDLE_KILLPRIV_V2) & FUSE_HANDLE_KILLPRIV_V2
    assert make_fs(killpriv_v2=True).init(FUSE_HANDLE_KILLPRIV_V2) & FUSE_HANDLE_KILLPRIV_V2


# -- creating as the caller: supplementary group, DAC ------------------------------------------


def test_supplementary_group_of_a_create(fs: PassthroughFs, shared: Path) -> None:
    sg = shared / "sg"
    sg.mkdir()
    os.chown(sg, 0, SGID_GROUP)
    os.chmod(sg, 0o2775)
    d = fs.lookup(ROOT, FUSE_ROOT_ID, b"sg")
    member = Context(USER.uid, USER.gid, 2, supp_groups=(SGID_GROUP,))
    fs.create(USER, d.nodeid, b"outsider", os.O_WRONLY, 0o2775, 0)
    fs.create(member, d.nodeid, b"member", os.O_WRONLY, 0o2775, 0)
    assert mode_of(sg / "outsider") == 0o775  # not in the group: S_ISGID dropped
    assert mode_of(sg / "member") == 0o2775  # FUSE_EXT_GROUPS says it is
    for name in ("outsider", "member"):
        assert (os.lstat(sg / name).st_uid, os.lstat(sg / name).st_gid) == (1000, SGID_GROUP)


def test_dac_is_the_guests_unless_capset_is_forbidden(fs: PassthroughFs, shared: Path) -> None:
    os.chmod(shared, 0o755)  # root's; the guest kernel let USER in (say, by a group)
    fs.mkdir(USER, FUSE_ROOT_ID, b"allowed", 0o755, 0)
    assert os.lstat(shared / "allowed").st_uid == USER.uid
    creds.configure(guest_dac=False)  # a seccomp filter without capset
    assert errno_of(fs.mkdir, USER, FUSE_ROOT_ID, b"refused", 0o755, 0) == errno.EACCES
    os.chmod(shared, 0o775)
    os.chown(shared, 0, SGID_GROUP)
    member = Context(USER.uid, USER.gid, 2, supp_groups=(SGID_GROUP,))
    fs.mkdir(member, FUSE_ROOT_ID, b"by_group", 0o755, 0)
    assert not (shared / "refused").exists() and (shared / "by_group").is_dir()


def test_access_is_strict(fs: PassthroughFs, shared: Path) -> None:
    p = shared / "f"
    p.write_bytes(b"")
    os.chmod(p, 0o600)
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    assert errno_of(fs.access, USER, f.nodeid, os.R_OK) == errno.EACCES
    fs.access(ROOT, f.nodeid, os.R_OK | os.W_OK)


# -- security labels ---------------------------------------------------------------------------


def test_security_labels_on_new_inodes(fs: PassthroughFs, shared: Path) -> None:
    lab = Context(0, 0, 1, secctx=(SecContext(b"security.shardfs", b"label\0"),))
    fs.create(lab, FUSE_ROOT_ID, b"f", os.O_RDWR, 0o644, 0)
    fs.mkdir(lab, FUSE_ROOT_ID, b"d", 0o755, 0)
    fs.mknod(lab, FUSE_ROOT_ID, b"fifo", stat.S_IFIFO | 0o644, 0, 0)
    fs.symlink(lab, FUSE_ROOT_ID, b"ln", b"target")
    e, _ = fs.tmpfile(lab, FUSE_ROOT_ID, os.O_RDWR, 0o644, 0)
    fs.link(ROOT, e.nodeid, FUSE_ROOT_ID, b"tmp")
    for name in ("f", "d", "fifo", "ln", "tmp"):
        assert os.getxattr(shared / name, "security.shardfs",
                           follow_symlinks=False) == b"label\0"
    # A label that is not a security.* xattr: refused, and nothing is left behind.
    bad = Context(0, 0, 1, secctx=(SecContext(b"user.evil", b"x"),))
    fds, nodes, before = open_fds(), fs.node_count(), sorted(os.listdir(shared))
    for call in (lambda: fs.create(bad, FUSE_ROOT_ID, b"x", os.O_RDWR, 0o644, 0),
                 lambda: fs.mkdir(bad, FUSE_ROOT_ID, b"x", 0o755, 0),
                 lambda: fs.mknod(bad, FUSE_ROOT_ID, b"x", stat.S_IFIFO | 0o644, 0, 0),
                 lambda: fs.symlink(bad, FUSE_ROOT_ID, b"x", b"t"),
                 lambda: fs.tmpfile(bad, FUSE_ROOT_ID, os.O_RDWR, 0o644, 0)):
        assert errno_of(call) == errno.EINVAL
    fs.idle()  # undone lookups close their fds between requests (SharedNodeTable.graveyard)
    assert (open_fds(), fs.node_count(), sorted(os.listdir(shared))) == (fds, nodes, before)


def test_security_label_is_asked_for(make_fs: MakeFs) -> None:
    assert make_fs(security_label=True).init(FUSE_SECURITY_CTX) & FUSE_SECURITY_CTX
    assert not make_fs().init(FUSE_SECURITY_CTX) & FUSE_SECURITY_CTX
    assert make_fs().init(FUSE_CREATE_SUPP_GROUP) & FUSE_CREATE_SUPP_GROUP


# -- POSIX ACLs --------------------------------------------------------------------------------


def test_acls_off_unless_negotiated(make_fs: MakeFs, shared: Path) -> None:
    p = shared / "f"
    p.write_bytes(b"")
    os.setxattr(p, "system.posix_acl_access",
                acl((ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 4, 1234), (ACL_GROUP_OBJ, 4, NO_ID),
                    (ACL_MASK, 4, NO_ID), (ACL_OTHER, 0, NO_ID)))
    fs = make_fs(posix_acl=True)
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    # Configured but not negotiated (the guest would not enforce them): hidden.
    # Reading one says "no ACL" (ENODATA), as the guest kernel's ACL cache
    # does; an EOPNOTSUPP beside the cache's ENODATA broke coreutils' cp -a.
    for name in (b"system.posix_acl_access", b"system.posix_acl_default"):
        assert errno_of(fs.getxattr, ROOT, f.nodeid, name, 100) == errno.ENODATA
        assert errno_of(fs.setxattr, ROOT, f.nodeid, name, b"", 0) == errno.EOPNOTSUPP
        assert errno_of(fs.removexattr, ROOT, f.nodeid, name) == errno.EOPNOTSUPP
    names = fs.listxattr(ROOT, f.nodeid, 1000)
    assert isinstance(names, bytes) and b"posix_acl" not in names
    # The guest must offer POSIX_ACL and DONT_MASK; then all three are on.
    assert session(fs, FUSE_POSIX_ACL) == 0
    assert session(fs, ACL_FLAGS) == ACL_FLAGS
    value = fs.getxattr(ROOT, f.nodeid, b"system.posix_acl_access", 100)
    assert isinstance(value, bytes) and (ACL_USER, 4, 1234) in acl_entries(value)
    assert b"system.posix_acl_access" in fs.listxattr(ROOT, f.nodeid, 1000)  # type: ignore


def test_acl_changes(make_fs: MakeFs, shared: Path) -> None:
    fs = make_fs(posix_acl=True)
    session(fs, ACL_FLAGS)
    p = shared / "f"
    p.write_bytes(b"")
    os.chown(p, USER.uid, 0)
    os.chmod(p, 0o2770)
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    value = acl((ACL_USER_OBJ, 7, NO_ID), (ACL_USER, 6, 1234), (ACL_GROUP_OBJ, 7, NO_ID),
                (ACL_MASK, 7, NO_ID), (ACL_OTHER, 0, NO_ID))
    # Only the owner sets an ACL: the host judges the caller's ids.
    assert errno_of(fs.setxattr, OTHER, f.nodeid, b"system.posix_acl_access", value, 0) \
        == errno.EPERM
    # The owner, outside the file's group: the host's mode update drops S_ISGID.
    fs.setxattr(USER, f.nodeid, b"system.posix_acl_access", value, 0)
    assert mode_of(p) == 0o770
    assert (ACL_USER, 6, 1234) in acl_entries(os.getxattr(p, "system.posix_acl_access"))
    # ACL_KILL_SGID (the guest's verdict) clears it even for root.
    os.chmod(p, 0o2770)
    fs.setxattr(ROOT, f.nodeid, b"system.posix_acl_access", value, 0)
    assert mode_of(p) == 0o2770
    fs.setxattr(ROOT, f.nodeid, b"system.posix_acl_access", value, 0,
                FUSE_SETXATTR_ACL_KILL_SGID)
    assert mode_of(p) == 0o770
    fs.removexattr(USER, f.nodeid, b"system.posix_acl_access")
    assert "system.posix_acl_access" not in os.listxattr(p)


def test_acl_default_replaces_the_umask(make_fs: MakeFs, shared: Path) -> None:
    fs = make_fs(posix_acl=True)
    session(fs, ACL_FLAGS)
    (shared / "plain").mkdir(mode=0o777)
    (shared / "inherit").mkdir(mode=0o777)
    os.setxattr(shared / "inherit", "system.posix_acl_default",
                acl((ACL_USER_OBJ, 7, NO_ID), (ACL_GROUP_OBJ, 7, NO_ID), (ACL_OTHER, 5, NO_ID)))
    for d in ("plain", "inherit"):
        node = fs.lookup(ROOT, FUSE_ROOT_ID, d.encode())
        # DONT_MASK: the mode comes unmasked, the umask beside it.
        fs.create(ROOT, node.nodeid, b"f", os.O_RDWR, 0o777, 0o077)
        fs.mkdir(ROOT, node.nodeid, b"d", 0o777, 0o077)
    assert mode_of(shared / "plain" / "f") == 0o700  # umask applied
    assert mode_of(shared / "plain" / "d") == 0o700
    assert mode_of(shared / "inherit" / "f") == 0o775  # the default ACL wins
    assert mode_of(shared / "inherit" / "d") == 0o775
    assert os.umask(0o022) == 0 and os.umask(0) == 0o022  # the daemon's stays 0


# -- xattrmap ----------------------------------------------------------------------------------


def test_xattrmap_prefix_all(make_fs: MakeFs, shared: Path) -> None:
    fs = make_fs(xattrmap=":prefix:all::user.virtiofs.::bad:all:::")
    p = shared / "f"
    p.write_bytes(b"")
    os.setxattr(p, "user.host", b"h")  # the host's own: invisible to the guest
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    fs.setxattr(ROOT, f.nodeid, b"security.selinux", b"guest_t", 0)
    fs.setxattr(ROOT, f.nodeid, b"trusted.overlay.x", b"1", 0)
    assert os.getxattr(p, "user.virtiofs.security.selinux") == b"guest_t"
    assert os.getxattr(p, "user.virtiofs.trusted.overlay.x") == b"1"
    assert "security.selinux" not in os.listxattr(p)
    assert fs.getxattr(ROOT, f.nodeid, b"security.selinux", 100) == b"guest_t"
    listed = fs.listxattr(ROOT, f.nodeid, 1000)
    assert isinstance(listed, bytes)
    assert sorted(listed.split(b"\0")[:-1]) == [b"security.selinux", b"trusted.overlay.x"]
    assert fs.listxattr(ROOT, f.nodeid, 0) == len(listed)
    fs.removexattr(ROOT, f.nodeid, b"trusted.overlay.x")
    assert sorted(os.listxattr(p)) == ["user.host", "user.virtiofs.security.selinux"]


def test_xattrmap_rules(make_fs: MakeFs, shared: Path) -> None:
    fs = make_fs(xattrmap="/prefix/all/trusted./user.virtiofs./ /bad/server//trusted./ "
                          "/bad/client/user.virtiofs.// /unsupported/all/security.ima/"
                          "security.ima/ /ok/all///")
    p = shared / "f"
    p.write_bytes(b"")
    os.setxattr(p, "trusted.host", b"1")
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    fs.setxattr(ROOT, f.nodeid, b"trusted.guest", b"g", 0)
    fs.setxattr(ROOT, f.nodeid, b"user.plain", b"p", 0)
    assert os.getxattr(p, "user.virtiofs.trusted.guest") == b"g"
    assert os.getxattr(p, "user.plain") == b"p"
    assert errno_of(fs.setxattr, ROOT, f.nodeid, b"user.virtiofs.x", b"", 0) == errno.EPERM
    assert errno_of(fs.getxattr, ROOT, f.nodeid, b"user.virtiofs.x", 0) == errno.ENODATA
    assert errno_of(fs.setxattr, ROOT, f.nodeid, b"security.ima", b"", 0) == errno.EOPNOTSUPP
    listed = fs.listxattr(ROOT, f.nodeid, 1000)
    assert isinstance(listed, bytes)
    assert sorted(listed.split(b"\0")[:-1]) == [b"trusted.guest", b"user.plain"]


def test_xattrmap_moves_security_capability(make_fs: MakeFs, shared: Path) -> None:
    fs = make_fs(xattrmap=":prefix:all::user.virtiofs.::bad:all:::")
    p = shared / "f"
    p.write_bytes(b"0123")
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    cap = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # v2, cap_net_bind_service
    for change in ("write", "truncate", "chown"):
        fs.setxattr(ROOT, f.nodeid, b"security.capability", cap, 0)
        assert fs.getxattr(ROOT, f.nodeid, b"security.capability", 100) == cap
        o = fs.open(ROOT, f.nodeid, os.O_RDWR)
        if change == "write":
            fs.write(ROOT, f.nodeid, o.fh, 0, [memoryview(b"x")], 0)
        elif change == "truncate":
            fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_SIZE, size=1))
        else:
            fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_UID, uid=5))
        fs.release(ROOT, f.nodeid, o.fh)
        # As the kernel drops a real security.capability on these changes.
        assert errno_of(fs.getxattr, ROOT, f.nodeid, b"security.capability", 100) \
            == errno.ENODATA, change


@pytest.mark.parametrize("text,message", [
    ("", "no rules"),
    (":prefix:all:a:b:", "no catch-all rule for guest names"),
    (":prefix:client:::", "no catch-all rule for host names"),
    (":foo:all:::", "type 'foo'"),
    (":ok:both:::", "scope 'both'"),
    (":ok:all::", "not ended by the separator"),
    (":map::x::ok:all:::", "a map rule must be the last"),
])
def test_xattrmap_parse_errors(text: str, message: str, shared: Path) -> None:
    with pytest.raises(ValueError, match=message):
        XattrMap.parse(text)
    with pytest.raises(ValueError):
        PassthroughFs(str(shared), xattrmap=text)


def test_xattrmap_map_shorthand() -> None:
    m = XattrMap.parse(" :map:trusted.:user.virtiofs.: ")
    assert m.to_host(b"trusted.a") == b"user.virtiofs.trusted.a"
    assert m.to_host(b"user.a") == b"user.a"
    assert errno_of(m.to_host, b"user.virtiofs.a") == errno.EPERM
    assert m.to_guest(b"user.virtiofs.trusted.a") == b"trusted.a"
    assert m.to_guest(b"trusted.host") is None and m.to_guest(b"user.b") == b"user.b"
    m = XattrMap.parse(":map::user.g.:")
    assert m.to_host(b"security.x") == b"user.g.security.x"
    assert m.to_guest(b"user.other") is None


# -- uid/gid translation -----------------------------------------------------------------------


def test_idmap_parse() -> None:
    m = IdMap.parse("map:1000:5000:10, squash-guest:2000:65534:100 forbid-guest:0:1 "
                    "host:0:3000:1")
    assert [m.to_host(i) for i in (1000, 1009, 1010, 2050)] == [5000, 5009, 1010, 65534]
    assert [m.to_guest(i) for i in (5000, 5009, 4999, 0)] == [1000, 1009, 4999, 3000]
    assert errno_of(m.to_host, 0) == errno.EPERM
    for bad, message in (("map:1:2", "expected"), ("nope:1:2:3", "kind"),
                         ("map:1:2:0", "empty"), ("map:4294967295:1:2", "passes"),
                         ("map:0:0:10,guest:5:100:1", "mapped twice"), ("  ", "no entries"),
                         ("map:-1:0:1", "expected")):
        with pytest.raises(ValueError, match=message):
            IdMap.parse(bad)


def test_idmapped_fs(make_fs: MakeFs, shared: Path) -> None:
    inner = make_fs(posix_acl=True)
    session(inner, ACL_FLAGS)
    fs = IdMappedFs(inner, "map:1000:5000:10 forbid-guest:3000:1", "map:1000:5000:10")
    os.chmod(shared, 0o777)
    guest = Context(1001, 1002, 9)
    e, o = fs.create(guest, FUSE_ROOT_ID, b"f", os.O_RDWR, 0o644, 0)
    p = shared / "f"
    assert (os.lstat(p).st_uid, os.lstat(p).st_gid) == (5001, 5002)
    assert (e.attr.st_uid, e.attr.st_gid) == (1001, 1002)
    host = os.lstat(p)
    for field in ("st_ino", "st_mode", "st_size", "st_mtime_ns", "st_ctime_ns", "st_blocks"):
        assert getattr(e.attr, field) == getattr(host, field)
    st, _ = fs.setattr(ROOT, e.nodeid, setattr_in(FATTR_UID | FATTR_GID, uid=1005, gid=1006))
    assert (os.lstat(p).st_uid, os.lstat(p).st_gid) == (5005, 5006)
    assert (st.st_uid, st.st_gid) == (1005, 1006)
    assert fs.getattr(ROOT, e.nodeid, None)[0].st_uid == 1005
    sx, _ = fs.statx(ROOT, e.nodeid, None, 0, 0xFFF)  # STATX carries ids too
    assert (sx.uid, sx.gid, sx.ino) == (1005, 1006, host.st_ino)
    os.chown(p, 42, 43)  # outside every range: unchanged both ways
    assert fs.lookup(ROOT, FUSE_ROOT_ID, b"f").attr.st_uid == 42
    assert errno_of(fs.mkdir, Context(3000, 0, 1), FUSE_ROOT_ID, b"d", 0o755, 0) == errno.EPERM
    assert errno_of(fs.setattr, ROOT, e.nodeid, setattr_in(FATTR_UID, uid=3000)) == errno.EPERM
    # The ids inside an ACL travel too.
    value = acl((ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 4, 1003), (ACL_GROUP_OBJ, 4, NO_ID),
                (ACL_GROUP, 4, 1004), (ACL_MASK, 4, NO_ID), (ACL_OTHER, 0, NO_ID))
    fs.setxattr(ROOT, e.nodeid, b"system.posix_acl_access", value, 0)
    host_acl = acl_entries(os.getxattr(p, "system.posix_acl_access"))
    assert (ACL_USER, 4, 5003) in host_acl and (ACL_GROUP, 4, 5004) in host_acl
    back = fs.getxattr(ROOT, e.nodeid, b"system.posix_acl_access", 1000)
    assert isinstance(back, bytes) and sorted(acl_entries(back)) == sorted(acl_entries(value))
    fs.release(ROOT, e.nodeid, o.fh)
    assert_same_stat(inner.getattr(ROOT, e.nodeid, None)[0], p)


# -- read-only ---------------------------------------------------------------------------------


def test_readonly_refuses_every_change(make_fs: MakeFs, shared: Path, tmp_path: Path) -> None:
    inner = make_fs()
    (shared / "f").write_bytes(b"data")
    (shared / "d").mkdir()
    fs = ReadOnlyFs(inner)
    assert not fs.init(FUSE_WRITEBACK_CACHE | FUSE_HANDLE_KILLPRIV_V2) & (
        FUSE_WRITEBACK_CACHE | FUSE_HANDLE_KILLPRIV_V2)
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    d = fs.lookup(ROOT, FUSE_ROOT_ID, b"d")
    ro = fs.open(ROOT, f.nodeid, os.O_RDONLY)
    before = snapshot(tmp_path)
    fds, nodes = open_fds(), fs.node_count()
    refused: list[Callable[[], object]] = [
        lambda: fs.open(ROOT, f.nodeid, os.O_WRONLY),
        lambda: fs.open(ROOT, f.nodeid, os.O_RDWR),
        lambda: fs.open(ROOT, f.nodeid, os.O_RDONLY | os.O_TRUNC),
        lambda: fs.create(ROOT, FUSE_ROOT_ID, b"new", os.O_RDONLY, 0o644, 0),
        lambda: fs.create(ROOT, FUSE_ROOT_ID, b"f", os.O_WRONLY, 0o644, 0),
        lambda: fs.create(ROOT, FUSE_ROOT_ID, b"f", os.O_RDONLY | os.O_TRUNC, 0o644, 0),
        lambda: fs.tmpfile(ROOT, FUSE_ROOT_ID, os.O_RDWR, 0o644, 0),
        lambda: fs.mkdir(ROOT, FUSE_ROOT_ID, b"new", 0o755, 0),
        lambda: fs.mknod(ROOT, FUSE_ROOT_ID, b"new", stat.S_IFIFO | 0o644, 0, 0),
        lambda: fs.symlink(ROOT, FUSE_ROOT_ID, b"new", b"t"),
        lambda: fs.link(ROOT, f.nodeid, FUSE_ROOT_ID, b"new"),
        lambda: fs.unlink(ROOT, FUSE_ROOT_ID, b"f"),
        lambda: fs.rmdir(ROOT, FUSE_ROOT_ID, b"d"),
        lambda: fs.rename(ROOT, FUSE_ROOT_ID, b"f", d.nodeid, b"g", 0),
        lambda: fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_MODE, mode=0o777)),
        lambda: fs.setattr(ROOT, f.nodeid, setattr_in(FATTR_ATIME_NOW | FATTR_ATIME)),
        lambda: fs.write(ROOT, f.nodeid, ro.fh, 0, [memoryview(b"x")], 0),
        lambda: fs.fallocate(ROOT, f.nodeid, ro.fh, 0, 100, 0),
        lambda: fs.copy_file_range(ROOT, f.nodeid, ro.fh, 0, f.nodeid, ro.fh, 8, 2, 0),
        lambda: fs.setxattr(ROOT, f.nodeid, b"user.x", b"1", 0),
        lambda: fs.removexattr(ROOT, f.nodeid, b"user.x"),
        lambda: fs.access(ROOT, f.nodeid, os.W_OK),
    ]
    for call in refused:
        assert errno_of(call) == errno.EROFS
    # Like a ro mount: an existing name with O_EXCL is EEXIST, a directory EISDIR.
    assert errno_of(fs.create, ROOT, FUSE_ROOT_ID, b"f", os.O_RDONLY | os.O_EXCL, 0o644,
                    0) == errno.EEXIST
    assert errno_of(fs.create, ROOT, FUSE_ROOT_ID, b"d", os.O_RDONLY, 0o644, 0) == errno.EISDIR
    assert snapshot(tmp_path) == before
    assert (open_fds(), fs.node_count()) == (fds, nodes)  # no lookup left behind
    # Reading works, and CREATE of an existing file opens it for reading.
    assert read_all(inner, f.nodeid, ro.fh, 10) == b"data"
    e, o = fs.create(ROOT, FUSE_ROOT_ID, b"f", os.O_RDONLY, 0o644, 0)
    assert e.nodeid == f.nodeid and read_all(inner, f.nodeid, o.fh, 10) == b"data"
    fs.access(ROOT, f.nodeid, os.R_OK)
    fs.fsync(ROOT, f.nodeid, ro.fh, False)
    assert fs.listxattr(ROOT, f.nodeid, 0) == 0


# -- handles belong to their node; O_DIRECT ----------------------------------------------------


def test_handle_of_another_node_is_ebadf(fs: PassthroughFs, shared: Path) -> None:
    for name in ("a", "b"):
        (shared / name).write_bytes(name.encode())
    a = fs.lookup(ROOT, FUSE_ROOT_ID, b"a")
    b = fs.lookup(ROOT, FUSE_ROOT_ID, b"b")
    o = fs.open(ROOT, a.nodeid, os.O_RDWR)
    buf = [memoryview(bytearray(1))]
    for call in (lambda: fs.read(ROOT, b.nodeid, o.fh, 0, buf),
                 lambda: fs.write(ROOT, b.nodeid, o.fh, 0, buf, 0),
                 lambda: fs.flush(ROOT, b.nodeid, o.fh),
                 lambda: fs.fsync(ROOT, b.nodeid, o.fh, False),
                 lambda: fs.lseek(ROOT, b.nodeid, o.fh, 0, os.SEEK_SET),
                 lambda: fs.fallocate(ROOT, b.nodeid, o.fh, 0, 1, 0),
                 lambda: fs.setattr(ROOT, b.nodeid, setattr_in(FATTR_FH | FATTR_SIZE, fh=o.fh)),
                 lambda: fs.release(ROOT, b.nodeid, o.fh)):
        assert errno_of(call) == errno.EBADF
    assert read_all(fs, a.nodeid, o.fh, 1) == b"a"


@pytest.mark.parametrize("allow", [False, True])
def test_o_direct(make_fs: MakeFs, shared: Path, allow: bool) -> None:
    fs = make_fs(allow_direct_io=allow)
    (shared / "f").write_bytes(bytes(8192))
    f = fs.lookup(ROOT, FUSE_ROOT_ID, b"f")
    o = fs.open(ROOT, f.nodeid, os.O_RDWR | os.O_DIRECT)
    fd = fs._handles.get(o.fh).fd
    assert bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT) == allow
    if not allow:  # FUSE's O_DIRECT takes any offset and length; so do we
        assert fs.write(ROOT, f.nodeid, o.fh, 3, [memoryview(b"odd")], 0) == 3
        assert (shared / "f").read_bytes()[:6] == b"\0\0\0odd"


def test_bad_options_are_refused_without_leaks(shared: Path) -> None:
    fds = open_fds()
    with pytest.raises(ValueError):
        PassthroughFs(str(shared), posix_acl=True, xattr=False)
    for bad in ({"translate_uid": "map:1"}, {"translate_gid": "squash-host:1:2"},
                {"xattrmap": ":ok:client:::"}):
        with pytest.raises(ValueError):
            build_fs(str(shared), **bad)  # type: ignore[arg-type]
    assert open_fds() == fds
    fs = build_fs(str(shared), readonly=True, translate_uid="map:0:100:1")
    try:
        assert isinstance(fs, ReadOnlyFs) and isinstance(fs.inner, IdMappedFs)
        assert errno_of(fs.mkdir, ROOT, FUSE_ROOT_ID, b"d", 0o755, 0) == errno.EROFS
        assert fs.getattr(ROOT, FUSE_ROOT_ID, None)[0].st_uid == os.stat(shared).st_uid
    finally:
        fs.close()  # type: ignore[attr-defined]
    assert open_fds() == fds
