"""The C virtiofsd's ``-o opt[,opt...]`` list.

libvirt speaks it to a backend whose ``--print-capabilities`` lacks
``separate-options`` (``--fd=N -o source=DIR,cache=...,xattr|no_xattr,...``),
and older Kata Containers and hand-written units still pass it.  virtiofsd
1.13 accepts most of it with a deprecation warning; shardfs accepts that
set plus the C daemon's ``log_level=``, ``timeout=``, ``norace``, ``debug``
and ``vhost_user_socket=``, which virtiofsd 1.13 has dropped.

Lock options: ``posix_lock`` and ``flock`` turn host-visible locks on (the
``locks`` field: ``posix`` and ``flock``), as they did in the C virtiofsd;
``no_posix_lock`` and ``no_flock`` (the default) leave each kind in the
guest's kernel.  virtiofsd 1.13 refuses ``posix_lock`` and ``flock``.

Values are split on ``,``; a doubled ``,,`` is a literal comma, as libvirt
escapes it in ``source=`` (``virQEMUBuildBufferEscapeComma``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

#: ``-o NAME`` switches: name -> (Config field, value).
SWITCHES: dict[str, tuple[str, Any]] = {}
for _name in ("xattr", "posix_acl", "security_label", "writeback", "readdirplus",
              "announce_submounts", "allow_direct_io", "killpriv_v2"):
    SWITCHES[_name] = (_name, True)
    SWITCHES[f"no_{_name}"] = (_name, False)
SWITCHES["debug"] = ("log_level", "debug")

#: Accepted switches that describe shardfs's fixed behaviour, with why.
NO_EFFECT = {
    "norace": "shardfs has no racy fallback to turn off",
}

#: Refused, with the reason.
REFUSED: dict[str, str] = {}

#: ``-o`` lock switches: name -> (kind in the ``locks`` field, on?).
LOCK_SWITCHES = {"posix_lock": ("posix", True), "no_posix_lock": ("posix", False),
                 "flock": ("flock", True), "no_flock": ("flock", False)}

#: ``-o NAME=VALUE`` options: name -> Config field.
VALUED = {
    "source": "shared_dir",
    "cache": "cache",
    "sandbox": "sandbox",
    "modcaps": "modcaps",
    "xattrmap": "xattrmap",
    "log_level": "log_level",
    "timeout": "cache_timeout_s",
    "vhost_user_socket": "socket_path",
}

#: The C daemon's names for cache policies and log levels.
CACHE_NAMES = {"none": "never", "never": "never", "auto": "auto", "always": "always",
               "metadata": "metadata"}
LOG_LEVEL_NAMES = {"err": "error", "error": "error", "warn": "warn", "warning": "warn",
                   "info": "info", "debug": "debug"}


class LegacyOptionError(ValueError):
    """An ``-o`` entry shardfs cannot honour; ``str()`` is one line naming it."""


def split_options(text: str) -> Iterator[str]:
    """The entries of one ``-o`` argument; ``,,`` is a literal comma."""
    entry: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1:i + 2] == ",":
                entry.append(",")
                i += 2
                continue
            yield "".join(entry)
            entry = []
        else:
            entry.append(c)
        i += 1
    yield "".join(entry)


def parse_legacy(values: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Every ``-o`` argument, in order: (raw field values, notes for the log).

    Values are strings as on the command line (the caller coerces them);
    later entries win, as in virtiofsd.  Raises :class:`LegacyOptionError`.
    """
    out: dict[str, Any] = {}
    notes: list[str] = []
    kinds: dict[str, bool] = {}
    for text in values:
        for entry in split_options(text):
            if not entry:
                continue
            name, sep, value = entry.partition("=")
            if not sep:
                if name in SWITCHES:
                    field, v = SWITCHES[name]
                    out[field] = v
                elif name in LOCK_SWITCHES:
                    kind, on = LOCK_SWITCHES[name]
                    kinds[kind] = on
                elif name in NO_EFFECT:
                    notes.append(f"-o {name}: {NO_EFFECT[name]}")
                elif name in REFUSED:
                    raise LegacyOptionError(f"-o {name}: {REFUSED[name]}")
                else:
                    raise LegacyOptionError(f"-o {name}: unknown option")
                continue
            if name not in VALUED:
                raise LegacyOptionError(f"-o {name}: unknown option")
            if name == "cache":
                if value not in CACHE_NAMES:
                    raise LegacyOptionError(f"-o cache: must be one of "
                                            f"{', '.join(CACHE_NAMES)}, got {value!r}")
                value = CACHE_NAMES[value]
            elif name == "log_level":
                if value not in LOG_LEVEL_NAMES:
                    raise LegacyOptionError(f"-o log_level: must be one of "
                                            f"{', '.join(LOG_LEVEL_NAMES)}, got {value!r}")
                value = LOG_LEVEL_NAMES[value]
            out[VALUED[name]] = value
    if any(kinds.values()):
        out["locks"] = ",".join(k for k in ("posix", "flock") if kinds.get(k))
    return out, notes
