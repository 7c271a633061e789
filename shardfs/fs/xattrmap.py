"""Extended attribute name mapping (``xattrmap``), as virtiofsd's ``--xattrmap``.

A guest's xattr names may collide with the host's own: an SELinux label the
guest sets as ``security.selinux`` would relabel the host file, a guest's
``trusted.overlay.*`` would confuse a host overlayfs.  A map rewrites names
on their way between guest and host.

**Syntax** (virtiofsd's).  A map is a sequence of rules.  Each rule starts
with a separator character of its choice (the first non-blank character),
which then ends every field of that rule; blanks and newlines may sit
between rules::

    :type:scope:key:prepend:
    :map:key:prepend:

* ``scope`` is ``client`` (names the guest sends: GETXATTR, SETXATTR,
  REMOVEXATTR; matched on ``key``), ``server`` (names the host lists:
  LISTXATTR; matched on ``prepend``) or ``all`` (both).
* ``type``, for a name that *starts with* the matched field:

  ========== ============================== =====================================
  type       client name (key matched)      host name in a listing (prepend matched)
  ========== ============================== =====================================
  prefix     ``prepend`` is put in front    ``prepend`` is stripped
  ok         passed unchanged               listed unchanged
  bad        EPERM (ENODATA for GETXATTR)   hidden
  unsupported EOPNOTSUPP                    hidden
  ========== ============================== =====================================

* ``:map:KEY:PREPEND:`` is shorthand for
  ``:prefix:all:KEY:PREPEND:  :bad:client:PREPEND::  :bad:server::KEY:  :ok:all:::``
  (with an empty KEY: ``:prefix:all::PREPEND:  :bad:all:::``), and must be
  the last rule.

The first rule whose scope and field match decides.  Every name must meet
a rule, so a map needs a catch-all for each direction (a ``client`` rule
with an empty key and a ``server`` rule with an empty prepend); one that
lacks it is refused when parsed.

Examples: ``:prefix:all::user.virtiofs.::bad:all:::`` keeps every guest
xattr under ``user.virtiofs.`` on the host and hides the host's own;
``/prefix/all/security./user.guest.security./ /ok/all///`` moves only the
guest's security labels out of the host's way.
"""

from __future__ import annotations

import errno
from typing import NamedTuple

from shardfs.fs.api import FsError

KINDS = ("prefix", "ok", "bad", "unsupported")
SCOPES = ("client", "server", "all")


class Rule(NamedTuple):
    kind: str
    client: bool
    server: bool
    key: bytes
    prepend: bytes


class XattrMap:
    """A parsed map; ``to_host`` for names from the guest, ``to_guest`` for listings."""

    def __init__(self, rules: list[Rule]) -> None:
        if not any(r.client and not r.key for r in rules):
            raise ValueError("no catch-all rule for guest names (a client or all rule "
                             "with an empty key)")
        if not any(r.server and not r.prepend for r in rules):
            raise ValueError("no catch-all rule for host names (a server or all rule "
                             "with an empty prepend)")
        self.rules = rules
        self._client = [r for r in rules if r.client]
        self._server = [r for r in rules if r.server]

    @classmethod
    def parse(cls, text: str) -> XattrMap:
        """Parse the virtiofsd syntax; ValueError naming the rule that is wrong."""
        rules: list[Rule] = []
        pos, n, mapped = 0, 0, False
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos == len(text):
                break
            n += 1
            if mapped:
                raise ValueError(f"rule {n}: a map rule must be the last")
            sep = text[pos]
            (kind,), pos = _take(text, pos + 1, sep, 1, n)
            if kind == "map":
                (key, prepend), pos = _take(text, pos, sep, 2, n)
                rules += _expand_map(key.encode(), prepend.encode())
                mapped = True
                continue
            if kind not in KINDS:
                raise ValueError(f"rule {n}: type {kind!r} is not one of "
                                 f"{', '.join(KINDS)}, map")
            (scope, key, prepend), pos = _take(text, pos, sep, 3, n)
            if scope not in SCOPES:
                raise ValueError(f"rule {n}: scope {scope!r} is not one of "
                                 f"{', '.join(SCOPES)}")
            rules.append(Rule(kind, scope in ("client", "all"), scope in ("server", "all"),
                              key.encode(), prepend.encode()))
        if not rules:
            raise ValueError("no rules")
        return cls(rules)

    def to_host(self, name: bytes, *, getting: bool = False) -> bytes:
        """The host name for a guest's ``name``; FsError for bad/unsupported names.

        ``getting``: a ``bad`` name is ENODATA for GETXATTR (it does not
        exist, as far as the guest can tell), EPERM otherwise.
        """
        for r in self._client:
            if name.startswith(r.key):
                if r.kind == "prefix":
                    return r.prepend + name
                if r.kind == "ok":
                    return name
                if r.kind == "bad":
                    raise FsError(errno.ENODATA if getting else errno.EPERM)
                raise FsError(errno.EOPNOTSUPP)
        raise FsError(errno.EPERM)  # unreachable: the catch-all is checked at parse

    def host_name(self, name: bytes) -> bytes | None:
        """``to_host`` without raising: None for a name the guest may not use."""
        try:
            return self.to_host(name)
        except FsError:
            return None

    def to_guest(self, name: bytes) -> bytes | None:
        """The name to list for a host xattr ``name``, or None to hide it."""
        for r in self._server:
            if name.startswith(r.prepend):
                if r.kind == "prefix":
                    return name[len(r.prepend):] or None
                if r.kind == "ok":
                    return name
                return None
        return None


def _take(text: str, pos: int, sep: str, count: int, n: int) -> tuple[list[str], int]:
    """``count`` fields from ``pos``, each ended by ``sep``; and the position after them."""
    out = []
    for _ in range(count):
        end = text.find(sep, pos)
        if end < 0:
            raise ValueError(f"rule {n}: a field is not ended by the separator {sep!r}")
        out.append(text[pos:end])
        pos = end + 1
    return out, pos


def _expand_map(key: bytes, prepend: bytes) -> list[Rule]:
    """The rules ``:map:KEY:PREPEND:`` stands for (see the module doc)."""
    if not key:
        return [Rule("prefix", True, True, b"", prepend), Rule("bad", True, True, b"", b"")]
    return [Rule("prefix", True, True, key, prepend), Rule("bad", True, False, prepend, b""),
            Rule("bad", False, True, b"", key), Rule("ok", True, True, b"", b"")]
