"""The hand-over from the parser's image to the daemon's (:mod:`shardfs.proc.daemon`).

Why two images.  Parsing virtiofsd's command line needs ``argparse``
(with ``gettext``, ``locale`` and ``shutil``), the option tables of
:mod:`shardfs.compat` and ``json``: about 1.5 MB of heap that the daemon
never touches again, and that every forked worker would inherit.  So
``shardfs`` run as a program (:func:`shardfs.cli.main` with no ``argv``)
parses and validates, then :func:`exec_serve` replaces the process image
with ``python -m shardfs.proc.daemon``, which imports only what serving
needs.  The pid, the environment, the working directory, the inheritable
fds (``--fd``) and the interpreter's flags (``-OO`` above all) carry over,
so launchers see one process from start to exit.

Contract: the parsed :class:`~shardfs.config.Config` and the start-up
notes travel in an anonymous memfd as msgpack (:func:`encode` /
:func:`decode`), its number first in the daemon image's ``argv``,
followed by ``--`` and the original arguments (for ``ps``).
:func:`decode` refuses anything but Config's own fields with their own
types, so a mismatch between the two images fails at start with a
one-line message.  This module imports nothing the parser's image would
not otherwise need but msgpack: it is the only part of the daemon that
image loads.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import msgpack

from shardfs.config import FIELDS, Config

#: Config fields whose msgpack form (lists) is turned back into tuples.
_RANGE_FIELDS = ("uid_map", "gid_map")


def encode(cfg: Config, notes: list[str]) -> bytes:
    """The Config (every field) and the notes, as :func:`decode` reads them."""
    return msgpack.packb({"config": {name: getattr(cfg, name) for name in FIELDS},
                          "notes": list(notes)}, use_bin_type=True)


def decode(data: bytes) -> tuple[Config, list[str]]:
    """Inverse of :func:`encode`; ValueError names what does not fit."""
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types for bad input
        raise ValueError(f"unreadable ({e})") from None
    if not isinstance(msg, dict) or set(msg) != {"config", "notes"}:
        raise ValueError("not a config hand-over")
    values, notes = msg["config"], msg["notes"]
    if not isinstance(values, dict) or not isinstance(notes, list) \
            or not all(isinstance(n, str) for n in notes):
        raise ValueError("not a config hand-over")
    cfg = Config()
    for name, value in values.items():
        if name not in FIELDS:
            raise ValueError(f"{name}: not a config field")
        if name in _RANGE_FIELDS:
            value = _ranges(name, value)
        default = getattr(cfg, name)
        if value is not None and default is not None and not _same_kind(value, default):
            raise ValueError(f"{name}: {type(value).__name__} where the config has "
                             f"{type(default).__name__}")
        setattr(cfg, name, value)
    return cfg, notes


def _ranges(name: str, value: Any) -> tuple[tuple[int, int, int], ...]:
    if not isinstance(value, list) or not all(
            isinstance(r, list) and len(r) == 3 and all(type(i) is int for i in r)
            for r in value):
        raise ValueError(f"{name}: not a list of id ranges")
    return tuple((r[0], r[1], r[2]) for r in value)


def _same_kind(value: object, default: object) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def interpreter_flags() -> list[str]:
    """The flags this interpreter was started with that the next image must keep.

    ``-O``/``-OO`` matters most (``scripts/shardfs`` runs ``-OO`` to keep
    docstrings out of memory).  ``-I``, ``-P``, ``-E``, ``-s`` and ``-S``
    keep the import path as safe as the caller made it (``-m`` would
    otherwise put the working directory first); ``-B``, ``-X`` and ``-W``
    keep the rest of what the caller chose.
    """
    flags = []
    if sys.flags.optimize:
        flags.append("-" + "O" * sys.flags.optimize)
    for flag, on in (("-I", sys.flags.isolated), ("-P", sys.flags.safe_path),
                     ("-E", sys.flags.ignore_environment), ("-s", sys.flags.no_user_site),
                     ("-S", sys.flags.no_site), ("-B", sys.flags.dont_write_bytecode)):
        if on:
            flags.append(flag)
    for key, value in sys._xoptions.items():
        flags += ["-X", key if value is True else f"{key}={value}"]
    for w in sys.warnoptions:
        flags += ["-W", w]
    return flags


def exec_serve(cfg: Config, notes: list[str], argv: list[str]) -> NoReturn:
    """Replace this process with ``python -m shardfs.proc.daemon`` serving ``cfg``.

    Raises OSError if the exec fails (the caller then serves in-process).
    """
    fd = os.memfd_create("shardfs-config", 0)  # no MFD_CLOEXEC: the next image reads it
    try:
        os.write(fd, encode(cfg, notes))
        os.lseek(fd, 0, os.SEEK_SET)
        if cfg.fd is not None:
            os.set_inheritable(cfg.fd, True)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *interpreter_flags(), "-m", "shardfs.proc.daemon",
                                  str(fd), "--", *argv])
    except BaseException:
        os.close(fd)
        raise


def read(fd: int) -> tuple[Config, list[str]]:
    """The hand-over in ``fd`` (which this closes); ValueError or OSError if unusable."""
    with os.fdopen(fd, "rb") as f:
        return decode(f.read())
