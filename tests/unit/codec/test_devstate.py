"""The device-state stream codec: round trips, and every bad stream is a StateError."""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from shardfs.codec import devstate as ds


def sample(n_nodes: int = 5) -> ds.DeviceState:
    nodes = [ds.NodeState((1 << 32) | (i + 2), i + 1, 0o100000, f"d/f{i}".encode(), 1,
                          bytes([i]) * 8) for i in range(n_nodes)]
    nodes.append(ds.NodeState(0x20, 1, 0o040000, None, error=2))
    handles = [ds.HandleState((3 << 32) | 1, nodes[0].nodeid, 0o2, False),
               ds.HandleState(2, 1, 0, True)]
    return ds.DeviceState(ds.MODE_FIND_PATHS, 0x1234_5678_9ABC, 3, 3, nodes, handles)


def test_round_trip() -> None:
    st = sample()
    assert ds.decode(ds.encode(st)) == st
    empty = ds.DeviceState(ds.MODE_FILE_HANDLES, 0)
    assert ds.decode(ds.encode(empty)) == empty


def test_every_truncation_is_refused() -> None:
    data = ds.encode(sample())
    for n in range(len(data)):
        with pytest.raises(ds.StateError):
            ds.decode(data[:n])


@pytest.mark.parametrize("seed", range(8))
def test_fuzz_never_raises_anything_else(seed: int) -> None:
    rng = random.Random(seed)
    data = ds.encode(sample(20))
    for _ in range(500):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        if rng.random() < 0.7:  # a right checksum reaches the record parser
            struct.pack_into("<I", bad, 44, zlib.crc32(bytes(bad[48:])))
        try:
            st = ds.decode(bytes(bad), 1 << 20, 1 << 20)
        except ds.StateError:
            continue
        for n in st.nodes:  # whatever decodes is in range
            assert 1 < n.nodeid & 0xFFFF_FFFF and n.nlookup > 0
            assert len(n.handle) <= ds.MAX_HANDLE_BYTES


def _with_header(data: bytes, fmt: str, offset: int, value: int, fix_crc: bool = False) -> bytes:
    bad = bytearray(data)
    struct.pack_into(fmt, bad, offset, value)
    if fix_crc:
        struct.pack_into("<I", bad, 44, zlib.crc32(bytes(bad[48:])))
    return bytes(bad)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: b"XXXXXXXX" + d[8:], "bad magic"),
    (lambda d: _with_header(d, "<H", 8, 2), "version 2"),
    (lambda d: _with_header(d, "<H", 10, 7), "location mode"),
    (lambda d: d + b"\0", "padded"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
    (lambda d: _with_header(d, "<I", 32, 1 << 30), "exceed"),
    (lambda d: _with_header(d, "<I", 36, 1 << 30), "exceed"),
])
def test_bad_headers(mutate: object, message: str) -> None:
    data = ds.encode(sample())
    with pytest.raises(ds.StateError, match=message):
        ds.decode(mutate(data), 1000, 1000)  # type: ignore[operator]


def test_oversized_stream_is_refused_before_parsing() -> None:
    with pytest.raises(ds.StateError, match="exceeds"):
        ds.decode(bytes(ds.MAX_STATE_BYTES + 1))


@pytest.mark.parametrize("nodes,handles,message", [
    ([ds.NodeState(2, 1, 0, b"a"), ds.NodeState(1 << 32 | 2, 1, 0, b"b")], [], "twice"),
    ([ds.NodeState(1, 1, 0, b"a")], [], "not a valid id"),
    ([ds.NodeState(9 << 32 | 2, 1, 0, b"a")], [], "not a valid id"),
    ([ds.NodeState(2, 0, 0, b"a")], [], "lookup count of 0"),
    ([ds.NodeState(2, 1, 0, b"a\0b")], [], "NUL"),
    ([ds.NodeState(2, 1, 0, b"a")], [ds.HandleState(1, 3, 0, False)], "does not hold"),
    ([], [ds.HandleState(0, 1, 0, False)], "not a valid id"),
])
def test_bad_records(nodes: list[ds.NodeState], handles: list[ds.HandleState],
                     message: str) -> None:
    data = ds.encode(ds.DeviceState(ds.MODE_FIND_PATHS, 0, 3, 3, nodes, handles))
    with pytest.raises(ds.StateError, match=message):
        ds.decode(data)


def test_capacity_of_the_destination() -> None:
    data = ds.encode(sample(5))
    with pytest.raises(ds.StateError, match="max_nodes"):
        ds.decode(data, max_nodes=3)
    with pytest.raises(ds.StateError, match="max_handles"):
        ds.decode(data, max_handles=1)
