"""Assemble the filesystem a worker serves from the configured options.

The passthrough filesystem does the work; the options that change one
aspect everywhere are decorators around it, outermost first: ``readonly``
(:class:`~shardfs.fs.readonly.ReadOnlyFs`), then uid/gid translation
(:class:`~shardfs.fs.idmap.IdMappedFs`).  Nothing here reads the config
module: the caller passes plain values, so this stays in the ``fs`` layer.
"""

from __future__ import annotations

from typing import Any

from shardfs.fs.api import FileSystem
from shardfs.fs.idmap import IdMappedFs
from shardfs.fs.passthrough import PassthroughFs
from shardfs.fs.readonly import ReadOnlyFs


def build_fs(shared_dir: str, *, readonly: bool = False, translate_uid: str | None = None,
             translate_gid: str | None = None, **passthrough: Any) -> FileSystem:
    """The stack for ``shared_dir``; ``passthrough`` goes to :class:`PassthroughFs`.

    ValueError for a bad option (a map that does not parse, posix_acl
    without xattr...); the passthrough's own fds are closed then.
    """
    fs: FileSystem = PassthroughFs(shared_dir, **passthrough)
    try:
        if translate_uid or translate_gid:
            fs = IdMappedFs(fs, translate_uid or None, translate_gid or None)
        if readonly:
            fs = ReadOnlyFs(fs)
    except BaseException:
        fs.close()  # type: ignore[attr-defined]
        raise
    return fs
