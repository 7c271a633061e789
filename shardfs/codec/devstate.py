"""The device-state stream of a migration, sans-IO: bytes <-> :class:`DeviceState`.

What moves (vhost-user spec, "Migrating back-end state"): no file data,
offsets or locks, only what the guest's FUSE session names: the INIT flags in
force, every node it holds (nodeid, lookup count, how to find the inode
again) and every open handle (fh, node, open flags).  The destination
re-creates each one at the same nodeid/fh, so the guest carries on without a
new INIT.

Format, version 1 (all integers little-endian)::

    header  (48 bytes)
      magic        8s   b"SHARDFSM"
      version      u16  1
      mode         u16  0 = find-paths, 1 = file-handles (the source's --migration-mode)
      reserved     u32  0
      init_flags   u64  FUSE INIT flags in force (both words)
      node_floor   u32  no live or freed node slot has a generation above this
      handle_floor u32  likewise for handle slots
      nodes        u32  number of node records
      handles      u32  number of handle records
      body_bytes   u32  bytes after the header
      body_crc32   u32  zlib.crc32 of those bytes
    node record
      nodeid       u64  generation << 32 | slot
      nlookup      u64  lookups the guest holds (>= 1)
      kind         u32  st_mode & S_IFMT on the source
      error        u32  0, or the errno for a node the source could not locate
      handle_type  i32  file handle type (when handle_len > 0)
      handle_len   u16  0..128
      path_len     u16  0..4095: path from the share root, components joined by "/"
      handle       handle_len bytes
      path         path_len bytes (empty for the root's children's parent: never; an
                   empty path means "unknown", e.g. an open-but-unlinked file)
    handle record
      fh           u64  generation << 32 | slot
      nodeid       u64  the node it was opened on
      flags        i32  open(2) flags (O_CREAT, O_EXCL, O_TRUNC already took effect)
      is_dir       u32  0 or 1

The "id counters": shardfs ids are (slot, generation), so the destination
places every node and handle in its own slot with its own generation and
moves every free slot's generation to the floor, so an id the guest dropped
before the migration can never name a new node after it.

Decoding is total: any input either yields a :class:`DeviceState` whose
every field is in range, or raises :class:`StateError` with one line that
says what is wrong.  Names are not checked here (the codec knows no
filesystem); the loader checks each component as it checks a guest's.
"""

from __future__ import annotations

import zlib

from shardfs.abi.devstate import (
    HANDLE,
    HEADER,
    MAGIC,
    MAX_HANDLE_BYTES,
    MAX_PATH_BYTES,
    MAX_STATE_BYTES,
    MODE_FILE_HANDLES,
    MODE_FIND_PATHS,
    MODES,
    NODE,
    VERSION,
    DeviceState,
    HandleState,
    NodeState,
)

__all__ = ["MAX_STATE_BYTES", "MODES", "MODE_FILE_HANDLES", "MODE_FIND_PATHS", "DeviceState",
           "HandleState", "NodeState", "StateError", "decode", "encode"]

_SLOT_MASK = 0xFFFF_FFFF


class StateError(Exception):
    """The stream is not a state this version can load (one line, for the log)."""


def encode(state: DeviceState) -> bytes:
    """The stream for ``state``; ValueError if a field does not fit the format."""
    body = bytearray()
    for n in state.nodes:
        path = n.path or b""
        if len(n.handle) > MAX_HANDLE_BYTES or len(path) > MAX_PATH_BYTES:
            raise ValueError(f"node {n.nodeid:#x}: handle or path too long")
        body += NODE.pack(n.nodeid, n.nlookup, n.kind, n.error, n.handle_type, len(n.handle),
                           len(path))
        body += n.handle
        body += path
    for h in state.handles:
        body += HANDLE.pack(h.fh, h.nodeid, h.flags, int(h.is_dir))
    header = HEADER.pack(MAGIC, VERSION, state.mode, 0, state.init_flags, state.node_floor,
                          state.handle_floor, len(state.nodes), len(state.handles), len(body),
                          zlib.crc32(body))
    return header + bytes(body)


def decode(data: bytes | bytearray | memoryview, max_nodes: int | None = None,
           max_handles: int | None = None) -> DeviceState:
    """Parse and check a whole stream (see the module doc); StateError if it is bad.

    ``max_nodes``/``max_handles`` are the destination's capacities: a state
    that would not fit is refused before anything is applied.
    """
    data = memoryview(data)
    if len(data) > MAX_STATE_BYTES:
        raise StateError(f"state of {len(data)} bytes exceeds {MAX_STATE_BYTES}")
    if len(data) < HEADER.size:
        raise StateError(f"state truncated: {len(data)} bytes, the header alone is "
                         f"{HEADER.size}")
    (magic, version, mode, _reserved, init_flags, node_floor, handle_floor, nnodes, nhandles,
     body_bytes, crc) = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateError("not a shardfs device state (bad magic)")
    if version != VERSION:
        raise StateError(f"device state version {version}; this shardfs reads version "
                         f"{VERSION}")
    if mode not in MODES.values():
        raise StateError(f"unknown location mode {mode}")
    body = data[HEADER.size:]
    if len(body) != body_bytes:
        raise StateError(f"state body is {len(body)} bytes, the header says {body_bytes} "
                         "(truncated or padded)")
    if zlib.crc32(body) != crc:
        raise StateError("state body checksum mismatch (corrupt)")
    if max_nodes is not None and nnodes > max_nodes:
        raise StateError(f"{nnodes} nodes exceed this daemon's max_nodes {max_nodes}")
    if max_handles is not None and nhandles > max_handles:
        raise StateError(f"{nhandles} handles exceed this daemon's max_handles {max_handles}")
    minimum = nnodes * NODE.size + nhandles * HANDLE.size
    if minimum > len(body):
        raise StateError(f"{nnodes} nodes and {nhandles} handles need at least {minimum} "
                         f"bytes, the body has {len(body)}")
    state = DeviceState(mode, init_flags, node_floor, handle_floor)
    off = 0
    seen: dict[int, int] = {}
    for _ in range(nnodes):
        if off + NODE.size > len(body):
            raise StateError("state truncated inside a node record")
        nodeid, nlookup, kind, error, htype, hlen, plen = NODE.unpack_from(body, off)
        off += NODE.size
        if hlen > MAX_HANDLE_BYTES or plen > MAX_PATH_BYTES:
            raise StateError(f"node {nodeid:#x}: handle of {hlen} or path of {plen} bytes "
                             "is too long")
        if off + hlen + plen > len(body):
            raise StateError("state truncated inside a node record")
        handle = bytes(body[off:off + hlen])
        off += hlen
        path = bytes(body[off:off + plen]) if plen else None
        off += plen
        _check_id("node", nodeid, node_floor, seen, first_slot=2)
        if nlookup == 0:
            raise StateError(f"node {nodeid:#x} has a lookup count of 0")
        if path is not None and b"\0" in path:
            raise StateError(f"node {nodeid:#x}: NUL in its path")
        state.nodes.append(NodeState(nodeid, nlookup, kind, path, htype, handle, error))
    live = set(seen.values())
    seen = {}
    for _ in range(nhandles):
        if off + HANDLE.size > len(body):
            raise StateError("state truncated inside a handle record")
        fh, nodeid, flags, is_dir = HANDLE.unpack_from(body, off)
        off += HANDLE.size
        _check_id("handle", fh, handle_floor, seen, first_slot=1)
        if nodeid != 1 and nodeid not in live:
            raise StateError(f"handle {fh:#x} names node {nodeid:#x}, which the state "
                             "does not hold")
        if is_dir > 1:
            raise StateError(f"handle {fh:#x}: is_dir {is_dir}")
        state.handles.append(HandleState(fh, nodeid, flags, bool(is_dir)))
    if off != len(body):
        raise StateError(f"{len(body) - off} stray bytes after the last record")
    return state


def _check_id(what: str, ident: int, floor: int, seen: dict[int, int],
              first_slot: int) -> None:
    """An id is (generation << 32 | slot); each slot may appear once."""
    slot, gen = ident & _SLOT_MASK, ident >> 32
    if slot < first_slot or gen > floor:
        raise StateError(f"{what} id {ident:#x} is not a valid id (slot {slot}, "
                         f"generation {gen}, floor {floor})")
    if slot in seen:
        raise StateError(f"{what} slot {slot} appears twice")
    seen[slot] = ident
