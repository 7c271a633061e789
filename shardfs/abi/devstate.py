"""The device-state stream's layouts and records (format: :mod:`shardfs.codec.devstate`).

Kept in ``abi`` because both the codec and the filesystem's table export
(:mod:`shardfs.fs.passthrough.migrate`) speak these records.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

MAGIC = b"SHARDFSM"
VERSION = 1
MODE_FIND_PATHS, MODE_FILE_HANDLES = 0, 1
MODES = {"find-paths": MODE_FIND_PATHS, "file-handles": MODE_FILE_HANDLES}

HEADER = struct.Struct("<8sHHIQIIIIII")
NODE = struct.Struct("<QQIIiHH")
HANDLE = struct.Struct("<QQiI")
#: MAX_HANDLE_SZ (linux/exportfs.h) and PATH_MAX - 1.
MAX_HANDLE_BYTES = 128
MAX_PATH_BYTES = 4095
#: The largest stream accepted: more than a million nodes with long paths.
MAX_STATE_BYTES = 256 << 20


class NodeState(NamedTuple):
    nodeid: int
    nlookup: int
    kind: int
    path: bytes | None = None
    handle_type: int = 0
    handle: bytes = b""
    #: 0, or the errno the source met locating it (sent so the destination
    #: applies its --migration-on-error, as virtiofsd's ``Invalid``).
    error: int = 0


class HandleState(NamedTuple):
    fh: int
    nodeid: int
    flags: int
    is_dir: bool


class DeviceState:
    __slots__ = ("mode", "init_flags", "node_floor", "handle_floor", "nodes", "handles")

    mode: int
    init_flags: int
    node_floor: int
    handle_floor: int
    nodes: list[NodeState]
    handles: list[HandleState]

    def __init__(self, mode: int, init_flags: int, node_floor: int = 0, handle_floor: int = 0,
                 nodes: list[NodeState] | None = None,
                 handles: list[HandleState] | None = None) -> None:
        self.mode = mode
        self.init_flags = init_flags
        self.node_floor = node_floor
        self.handle_floor = handle_floor
        self.nodes = [] if nodes is None else nodes
        self.handles = [] if handles is None else handles

    def _key(self) -> tuple[int, int, int, int, list[NodeState], list[HandleState]]:
        return (self.mode, self.init_flags, self.node_floor, self.handle_floor, self.nodes,
                self.handles)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DeviceState):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # compared by value, and mutable
