"""uid/gid translation between guest and host (``translate_uid``/``translate_gid``).

In the spirit of virtiofsd's ``--translate-uid``/``--translate-gid``: the ids
in requests (the caller's, a SETATTR's new owner, the supplementary group
of a create, the ids inside a POSIX ACL) are mapped guest -> host before the
filesystem sees them, and the ids in replies (every attribute, ACL values)
host -> guest.

**Syntax.**  A map is a list of entries separated by commas or blanks, each
``kind:a:b:count`` (virtiofsd's kinds; ids are decimal u32):

==================================  =========================================
``map:GUEST:HOST:COUNT``            GUEST..+COUNT <-> HOST..+COUNT, both ways
``guest:GUEST:HOST:COUNT``          guest -> host only
``host:HOST:GUEST:COUNT``           host -> guest only
``squash-guest:GUEST:HOST:COUNT``   every guest id in the range -> HOST
``squash-host:HOST:GUEST:COUNT``    every host id in the range -> GUEST
``forbid-guest:GUEST:COUNT``        a request with such an id is EPERM
==================================  =========================================

``translate_uid = "map:1000:5000:10"`` makes guest 1000..1009 host
5000..5009 and back.  Ranges of one direction must not overlap (ValueError
at start).  An id no entry covers passes unchanged, as in virtiofsd.

This is presentation, not a privilege boundary: the daemon still acts with
root's capabilities and the guest kernel's permission checks (see
``passthrough.creds``), so a guest whose root is mapped to an unprivileged
host uid still owns the share's contents.  Confine that with the sandbox.
"""

from __future__ import annotations

import errno
import os
import re
import struct

from shardfs.abi.fuse import FATTR_GID, FATTR_UID
from shardfs.fs.api import (
    NSEC_PER_SEC,
    Context,
    Entry,
    FileSystem,
    FsError,
    Opened,
    SetattrIn,
    Statx,
)
from shardfs.fs.forward import ForwardingFs

ID_LIMIT = 1 << 32
#: ``(uid_t)-1``: "unchanged" in chown, never translated.
ID_NONE = ID_LIMIT - 1
KINDS = ("map", "guest", "host", "squash-guest", "squash-host", "forbid-guest")

#: POSIX ACL xattr layout (linux/posix_acl_xattr.h): a version, then entries.
ACL_XATTR_VERSION = 2
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
ACL_USER, ACL_GROUP = 0x02, 0x08
ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")


class _Range:
    """``[start, start + count)`` maps to ``target + (id - start)``, or to
    ``target`` when squashed; ``target`` None forbids the range.

    Immutable.  Not a NamedTuple: ``in`` means "id in the range" here, and a
    tuple's ``count`` method would be shadowed by the field.
    """

    __slots__ = ("start", "count", "target", "squash")

    start: int
    count: int
    target: int | None
    squash: bool

    def __init__(self, start: int, count: int, target: int | None, squash: bool = False) -> None:
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "squash", squash)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def _key(self) -> tuple[int, int, int | None, bool]:
        return self.start, self.count, self.target, self.squash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Range):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return "_Range(start={!r}, count={!r}, target={!r}, squash={!r})".format(*self._key())

    def __contains__(self, ident: object) -> bool:
        return isinstance(ident, int) and self.start <= ident < self.start + self.count


class IdMap:
    """One id space's translation both ways (see the module doc)."""

    def __init__(self, to_host: list[_Range], to_guest: list[_Range]) -> None:
        for ranges, side in ((to_host, "guest"), (to_guest, "host")):
            spans = sorted((r.start, r.start + r.count) for r in ranges)
            for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
                if start < end:
                    raise ValueError(f"{side} ids {start}.. are mapped twice")
        self._to_host = to_host
        self._to_guest = to_guest

    @classmethod
    def parse(cls, text: str) -> IdMap:
        """Parse the entries of ``text``; ValueError naming the bad entry."""
        to_host: list[_Range] = []
        to_guest: list[_Range] = []
        entries = [e for e in re.split(r"[,\s]+", text.strip()) if e]
        if not entries:
            raise ValueError("no entries")
        for entry in entries:
            kind, _, rest = entry.partition(":")
            if kind not in KINDS:
                raise ValueError(f"{entry!r}: kind must be one of {', '.join(KINDS)}")
            nums = rest.split(":")
            want = 2 if kind == "forbid-guest" else 3
            try:
                values = [int(n, 10) for n in nums]
            except ValueError:
                values = []
            if len(values) != want or any(not 0 <= v < ID_LIMIT for v in values):
                raise ValueError(f"{entry!r}: expected {kind}:" + ":".join(
                    ["ID", "COUNT"] if want == 2 else ["ID", "ID", "COUNT"]) + " with u32 ids")
            count = values[-1]
            if count == 0 or values[0] + count > ID_LIMIT or (
                    want == 3 and kind != "squash-guest" and kind != "squash-host"
                    and values[1] + count > ID_LIMIT):
                raise ValueError(f"{entry!r}: the range is empty or passes 2^32")
            a, b = values[0], values[1] if want == 3 else 0
            if kind == "map":
                to_host.append(_Range(a, count, b))
                to_guest.append(_Range(b, count, a))
            elif kind == "guest":
                to_host.append(_Range(a, count, b))
            elif kind == "host":
                to_guest.append(_Range(a, count, b))
            elif kind == "squash-guest":
                to_host.append(_Range(a, count, b, squash=True))
            elif kind == "squash-host":
                to_guest.append(_Range(a, count, b, squash=True))
            else:
                to_host.append(_Range(a, count, None))
        return cls(to_host, to_guest)

    def to_host(self, ident: int) -> int:
        """A guest id as the host's; FsError(EPERM) for a forbidden one."""
        if ident == ID_NONE:
            return ident
        for r in self._to_host:
            if ident in r:
                if r.target is None:
                    raise FsError(errno.EPERM)
                return r.target if r.squash else r.target + ident - r.start
        return ident

    def to_guest(self, ident: int) -> int:
        """A host id as the guest sees it."""
        for r in self._to_guest:
            if ident in r:
                assert r.target is not None
                return r.target if r.squash else r.target + ident - r.start
        return ident


IDENTITY = IdMap([], [])


class IdMappedFs(ForwardingFs):
    """Translate ids on the way in and out of ``inner`` (see the module doc)."""

    def __init__(self, inner: FileSystem, uids: IdMap | str | None,
                 gids: IdMap | str | None) -> None:
        super().__init__(inner)
        self.uids = IdMap.parse(uids) if isinstance(uids, str) else uids or IDENTITY
        self.gids = IdMap.parse(gids) if isinstance(gids, str) else gids or IDENTITY

    # -- conversions ------------------------------------------------------------

    def _ctx(self, ctx: Context) -> Context:
        return Context(self.uids.to_host(ctx.uid), self.gids.to_host(ctx.gid), ctx.pid,
                       tuple(self.gids.to_host(g) for g in ctx.supp_groups), ctx.secctx)

    def _stat(self, st: os.stat_result) -> os.stat_result:
        uid, gid = self.uids.to_guest(st.st_uid), self.gids.to_guest(st.st_gid)
        if (uid, gid) == (st.st_uid, st.st_gid):
            return st
        return os.stat_result(
            (st.st_mode, st.st_ino, st.st_dev, st.st_nlink, uid, gid, st.st_size,
             # Whole seconds as stat(2) gives them (floored: int() of a
             # float rounds a time before 1970 the wrong way).
             st.st_atime_ns // NSEC_PER_SEC, st.st_mtime_ns // NSEC_PER_SEC,
             st.st_ctime_ns // NSEC_PER_SEC),
            {"st_atime": st.st_atime, "st_mtime": st.st_mtime, "st_ctime": st.st_ctime,
             "st_atime_ns": st.st_atime_ns, "st_mtime_ns": st.st_mtime_ns,
             "st_ctime_ns": st.st_ctime_ns, "st_blksize": st.st_blksize,
             "st_blocks": st.st_blocks, "st_rdev": st.st_rdev})

    def _entry(self, e: Entry) -> Entry:
        return Entry(e.nodeid, e.generation, self._stat(e.attr), e.entry_timeout_s,
                     e.attr_timeout_s, e.attr_flags)

    def _acl(self, value: bytes, host_side: bool) -> bytes:
        """The ids inside a POSIX ACL xattr value, translated; odd values unchanged
        (the host kernel refuses a malformed ACL itself)."""
        body = len(value) - _ACL_HEADER.size
        if body < 0 or body % _ACL_ENTRY.size or \
                _ACL_HEADER.unpack_from(value)[0] != ACL_XATTR_VERSION:
            return value
        out = bytearray(value)
        for off in range(_ACL_HEADER.size, len(value), _ACL_ENTRY.size):
            tag, perm, ident = _ACL_ENTRY.unpack_from(value, off)
            m = self.uids if tag == ACL_USER else self.gids if tag == ACL_GROUP else None
            if m is not None:
                ident = m.to_host(ident) if host_side else m.to_guest(ident)
                _ACL_ENTRY.pack_into(out, off, tag, perm, ident)
        return bytes(out)

    # -- ops that carry ids ---------------------------------------------------------

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        return self._entry(self.inner.lookup(self._ctx(ctx), parent, name))

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> tuple[os.stat_result, float]:
        st, t = self.inner.getattr(self._ctx(ctx), nodeid, fh)
        return self._stat(st), t

    def statx(self, ctx: Context, nodeid: int, fh: int | None, sx_flags: int,
              sx_mask: int) -> tuple[Statx, float]:
        sx, t = self.inner.statx(self._ctx(ctx), nodeid, fh, sx_flags, sx_mask)
        sx.uid, sx.gid = self.uids.to_guest(sx.uid), self.gids.to_guest(sx.gid)
        return sx, t

    def setattr(self, ctx: Context, nodeid: int, attr: SetattrIn) -> tuple[os.stat_result, float]:
        if attr.valid & (FATTR_UID | FATTR_GID):
            attr = SetattrIn(attr.valid, attr.fh, attr.size, attr.atime_ns, attr.mtime_ns,
                             attr.mode, self.uids.to_host(attr.uid) if attr.valid & FATTR_UID
                             else attr.uid,
                             self.gids.to_host(attr.gid) if attr.valid & FATTR_GID
                             else attr.gid)
        st, t = self.inner.setattr(self._ctx(ctx), nodeid, attr)
        return self._stat(st), t

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        return self._entry(self.inner.symlink(self._ctx(ctx), parent, name, target))

    def mknod(self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int,
              umask: int) -> Entry:
        return self._entry(self.inner.mknod(self._ctx(ctx), parent, name, mode, rdev, umask))

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        return self._entry(self.inner.mkdir(self._ctx(ctx), parent, name, mode, umask))

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        return self._entry(self.inner.link(self._ctx(ctx), nodeid, newparent, newname))

    def create(self, ctx: Context, parent: int, name: bytes, flags: int, mode: int,
               umask: int, kill_suidgid: bool = False) -> tuple[Entry, Opened]:
        e, o = self.inner.create(self._ctx(ctx), parent, name, flags, mode, umask, kill_suidgid)
        return self._entry(e), o

    def tmpfile(self, ctx: Context, parent: int, flags: int, mode: int,
                umask: int) -> tuple[Entry, Opened]:
        e, o = self.inner.tmpfile(self._ctx(ctx), parent, flags, mode, umask)
        return self._entry(e), o

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        self.inner.access(self._ctx(ctx), nodeid, mask)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        self.inner.unlink(self._ctx(ctx), parent, name)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        self.inner.rmdir(self._ctx(ctx), parent, name)

    def rename(self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes,
               flags: int) -> None:
        self.inner.rename(self._ctx(ctx), parent, name, newparent, newname, flags)

    def open(self, ctx: Context, nodeid: int, flags: int, kill_suidgid: bool = False) -> Opened:
        return self.inner.open(self._ctx(ctx), nodeid, flags, kill_suidgid)

    def getxattr(self, ctx: Context, nodeid: int, name: bytes, size: int) -> bytes | int:
        value = self.inner.getxattr(self._ctx(ctx), nodeid, name, size)
        if isinstance(value, bytes) and name in ACL_NAMES:
            return self._acl(value, host_side=False)
        return value

    def setxattr(self, ctx: Context, nodeid: int, name: bytes, value: bytes,
                 flags: int, setxattr_flags: int = 0) -> None:
        if name in ACL_NAMES:
            value = self._acl(value, host_side=True)
        self.inner.setxattr(self._ctx(ctx), nodeid, name, value, flags, setxattr_flags)

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        self.inner.removexattr(self._ctx(ctx), nodeid, name)
