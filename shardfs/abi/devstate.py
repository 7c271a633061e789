"""The device-state stream's layouts and records (format: :mod:`shardfs.codec.devstate`).

Kept in ``abi`` because both the codec and the filesystem's table export
(:mod:`shardfs.fs.passthrough.migrate`) speak these records.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

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


@dataclass(frozen=True, slots=True)
class NodeState:
    nodeid: int
    nlookup: int
    kind: int
    path: bytes | None = None
    handle_type: int = 0
    handle: bytes = b""
    #: 0, or the errno the source met locating it (sent so the destination
    #: applies its --migration-on-error, as virtiofsd's ``Invalid``).
    error: int = 0


@dataclass(frozen=True, slots=True)
class HandleState:
    fh: int
    nodeid: int
    flags: int
    is_dir: bool


@dataclass(slots=True)
class DeviceState:
    mode: int
    init_flags: int
    node_floor: int = 0
    handle_floor: int = 0
    nodes: list[NodeState] = field(default_factory=list)
    handles: list[HandleState] = field(default_factory=list)
