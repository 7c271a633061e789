"""An id-mapped attribute keeps the host's times exactly, before 1970 too.

IdMappedFs rebuilds ``os.stat_result`` when it changes an owner.  The whole
seconds it puts in the tuple are floored as stat(2) gives them: ``int()`` of
the float time rounded -1.5 s to -1 where stat(2) says -2.  The reply packers
read the tuple's fields, so the two must agree with the ``_ns`` fields.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shardfs.dispatch.replies import (
    _ATTR_OUT,
    _pack_attr_out,
    _pack_entry_out,
    attr_fields,
    pack_entry,
)
from shardfs.fs.api import Entry
from shardfs.fs.idmap import IdMappedFs
from shardfs.fs.passthrough import PassthroughFs

NS = 1_000_000_000


@pytest.mark.parametrize("ns", [-1_500_000_000, -1, -NS, 0, 1_700_000_000_123_456_789])
def test_mapped_stat_keeps_times_and_packs_like_the_host_one(tmp_path: Path, ns: int) -> None:
    f = tmp_path / "f"
    f.touch()
    os.utime(f, ns=(ns, ns))
    host = os.stat(f, follow_symlinks=False)
    uid = host.st_uid
    fs = PassthroughFs(str(tmp_path))
    try:
        mapped = IdMappedFs(fs, f"map:{uid + 7}:{uid}:1", None)._stat(host)
    finally:
        fs.destroy()
    assert mapped.st_uid == uid + 7
    assert mapped[7] == mapped[8] == host[8] == ns // NS  # whole seconds, floored
    assert mapped.st_mtime_ns == host.st_mtime_ns
    want = list(attr_fields(host))
    want[11] = uid + 7  # fuse_attr.uid
    assert list(attr_fields(mapped)) == want
    buf = bytearray(_ATTR_OUT.size)
    _pack_attr_out(memoryview(buf), 0, 1, 0, mapped)
    assert list(_ATTR_OUT.unpack(buf)[3:]) == want
    # The entry packer reads the tuple the same way; pack_entry goes by attr_fields.
    e = Entry(5, 1, mapped, 1.5, 2.25)
    out = bytearray(len(pack_entry(e)))
    _pack_entry_out(out, 0, e)
    assert bytes(out) == pack_entry(e)
