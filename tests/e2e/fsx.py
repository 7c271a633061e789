"""fsx, small: random I/O on one file, every read checked against an in-memory model.

In the spirit of the File System eXerciser (fsx-linux): a seeded pseudo-random
sequence of writes, truncates (up and down), hole punches, zero ranges,
fsyncs, close/reopen and reads, each applied both to a file and to a
``bytearray`` model; every read, and a full read after each reopen and at
the end, must equal the model byte for byte.  No mmap.

The sequence depends only on the seed and the op count, so the host runs
:func:`model` with the same arguments and compares what the guest left on
the share with the expected bytes.  Standalone on purpose (the guest runs it
with the host's ``/usr/bin/python3``, nothing of shardfs imported):

    python3 fsx.py PATH SEED OPS [--drop-caches EVERY]

prints ``fsx: PATH seed S: N ops ok, size Z, sha256 H`` and exits 0, or
prints the first mismatch (op number, offset, expected and got) and exits 1.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import random
import sys
from collections.abc import Iterator

#: Largest file the sequence grows (kept small: the guest runs under TCG).
MAX_SIZE = 1 << 20
#: Largest single write/read/punch.
MAX_LEN = 64 << 10
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
#: (op, weight)
OPS = (("write", 30), ("read", 25), ("truncate", 8), ("punch", 7), ("zero", 5),
       ("append", 10), ("fsync", 5), ("reopen", 5), ("pread_eof", 5))


class Mismatch(AssertionError):
    pass


def _ops(seed: int, count: int) -> Iterator[tuple[int, str, int, int, int]]:
    """(index, op, offset, length, data seed) for the whole sequence."""
    rng = random.Random(seed)
    names = [name for name, _ in OPS]
    weights = [w for _, w in OPS]
    for i in range(count):
        op = rng.choices(names, weights)[0]
        off = rng.randrange(MAX_SIZE)
        length = rng.randrange(1, MAX_LEN + 1)
        yield i, op, off, length, rng.getrandbits(32)


def _data(dseed: int, length: int) -> bytes:
    return random.Random(dseed).randbytes(length)


def _apply_model(m: bytearray, op: str, off: int, length: int, dseed: int) -> None:
    """Apply one op to the model (reads, fsync and reopen change nothing)."""
    if op == "write":
        length = min(length, MAX_SIZE - off)
        if off > len(m):
            m.extend(bytes(off - len(m)))
        m[off:off + length] = _data(dseed, length)
    elif op == "append":
        length = min(length, MAX_SIZE - len(m))
        m.extend(_data(dseed, length))
    elif op == "truncate":
        if off < len(m):
            del m[off:]
        else:
            m.extend(bytes(off - len(m)))
    elif op in ("punch", "zero"):
        end = min(off + length, len(m))  # both keep the size
        if off < end:
            m[off:end] = bytes(end - off)


def model(seed: int, count: int) -> bytes:
    """The content the sequence leaves in the file."""
    m = bytearray()
    for _, op, off, length, dseed in _ops(seed, count):
        _apply_model(m, op, off, length, dseed)
    return bytes(m)


def _fallocate(fd: int, mode: int, off: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _check(i: int, what: str, off: int, want: bytes, got: bytes) -> None:
    if want != got:
        at = next((k for k in range(min(len(want), len(got))) if want[k] != got[k]),
                  min(len(want), len(got)))
        raise Mismatch(f"op {i} ({what}): at offset {off + at}: expected "
                       f"{want[at:at + 16].hex()} ({len(want)} bytes), got "
                       f"{got[at:at + 16].hex()} ({len(got)} bytes)")


def _read_all(fd: int) -> bytes:
    out = bytearray()
    while chunk := os.pread(fd, 1 << 20, len(out)):
        out += chunk
    return bytes(out)


def _drop_caches() -> None:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root, or not Linux: the reads still go through the page cache


def run(path: str, seed: int, count: int, drop_every: int = 0) -> bytes:
    """Run the sequence on ``path`` (created or truncated); return the final content."""
    m = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i, op, off, length, dseed in _ops(seed, count):
            if op == "write":
                n = min(length, MAX_SIZE - off)
                if os.pwrite(fd, _data(dseed, n), off) != n:
                    raise Mismatch(f"op {i}: short write")
            elif op == "append":
                n = min(length, MAX_SIZE - len(m))
                if os.pwrite(fd, _data(dseed, n), len(m)) != n:
                    raise Mismatch(f"op {i}: short append")
            elif op == "truncate":
                os.ftruncate(fd, off)
            elif op == "punch":
                _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)
            elif op == "zero":
                _fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, length)
            elif op == "fsync":
                os.fsync(fd)
            elif op == "reopen":
                os.close(fd)
                if drop_every:
                    _drop_caches()
                fd = os.open(path, os.O_RDWR)
            _apply_model(m, op, off, length, dseed)
            if op == "read":
                _check(i, "read", off, bytes(m[off:off + length]), os.pread(fd, length, off))
            elif op == "pread_eof":
                _check(i, "read at EOF", len(m), b"", os.pread(fd, length, len(m)))
            if os.fstat(fd).st_size != len(m):
                raise Mismatch(f"op {i} ({op}): size {os.fstat(fd).st_size}, model {len(m)}")
            if op == "reopen" or (drop_every and i % drop_every == drop_every - 1):
                if drop_every:
                    os.fsync(fd)
                    _drop_caches()
                _check(i, "full read", 0, bytes(m), _read_all(fd))
        os.fsync(fd)
        _check(count, "final read", 0, bytes(m), _read_all(fd))
    finally:
        os.close(fd)
    return bytes(m)


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    drop = 0
    if "--drop-caches" in argv:
        drop = int(argv[argv.index("--drop-caches") + 1])
        args.remove(str(drop))
    path, seed, count = args[0], int(args[1]), int(args[2])
    try:
        data = run(path, seed, count, drop)
    except Mismatch as e:
        print(f"fsx: {path} seed {seed}: MISMATCH {e}", flush=True)
        return 1
    print(f"fsx: {path} seed {seed}: {count} ops ok, size {len(data)}, "
          f"sha256 {hashlib.sha256(data).hexdigest()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
