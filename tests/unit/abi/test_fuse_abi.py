"""shardfs.abi.fuse against the kernel's ``linux/fuse.h``, as gcc lays it out.

Sizes alone miss swapped fields, so every scalar member the header declares
is also checked for offset, width and signedness against the Struct format.
Opcodes and flag constants are compared by name wherever the header has them.
"""

from __future__ import annotations

import struct

import pytest

from shardfs.abi import fuse as F
from tests.unit.abi.cc import (
    enum_members,
    object_macros,
    print_value,
    require_header,
    run_c,
    scalar_members,
    struct_fields,
)

HEADER = "linux/fuse.h"

#: Every layout in shardfs.abi.fuse, by the kernel struct it mirrors.
STRUCTS = {name: st for name, st in vars(F).items()
           if isinstance(st, struct.Struct) and name.startswith("fuse_")}
#: Aliases of another layout whose kernel struct wraps it (fuse_statfs_out { kstatfs st; }).
CONSTANTS = {name: v for name, v in vars(F).items()
             if name.isupper() and isinstance(v, int) and not isinstance(v, bool)}


@pytest.fixture(scope="module")
def header() -> str:
    return require_header(HEADER)


@pytest.fixture(scope="module")
def kernel(header: str) -> dict[str, int]:
    """sizeof, offsetof and constant values as the compiler sees them."""
    body = []
    for name in STRUCTS:
        body.append(print_value(f"sizeof.{name}", f"sizeof(struct {name})"))
        for member, _ in scalar_members(header, name):
            body.append(print_value(f"offsetof.{name}.{member}",
                                    f"offsetof(struct {name}, {member})"))
            body.append(print_value(f"sizeof.{name}.{member}",
                                    f"sizeof(((struct {name} *)0)->{member})"))
    known = object_macros(header) | enum_members(header)
    for name in [*CONSTANTS, *(op.name for op in F.FuseOpcode)]:
        if name in known:
            body.append(print_value(f"const.{name}", name))
    for n in range(0, 40):
        body.append(print_value(f"rec_align.{n}", f"FUSE_REC_ALIGN({n})"))
    return run_c([HEADER], "".join(body))


def test_every_layout_is_checked() -> None:
    # Guard against the table silently shrinking: these are the ones dispatch uses.
    for name in ("fuse_in_header", "fuse_out_header", "fuse_entry_out", "fuse_attr_out",
                 "fuse_init_in", "fuse_init_out", "fuse_read_in", "fuse_write_in",
                 "fuse_setattr_in", "fuse_kstatfs", "fuse_dirent"):
        assert name in STRUCTS


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_size_matches_kernel(name: str, kernel: dict[str, int]) -> None:
    assert STRUCTS[name].size == kernel[f"sizeof.{name}"], (
        f"struct {name}: shardfs {STRUCTS[name].size} bytes, kernel {kernel[f'sizeof.{name}']}")


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_fields_match_kernel(name: str, header: str, kernel: dict[str, int]) -> None:
    """Each scalar member sits at the same offset, with the same width and signedness."""
    ours = struct_fields(STRUCTS[name])
    for member, signed in scalar_members(header, name):
        off = kernel[f"offsetof.{name}.{member}"]
        size = kernel[f"sizeof.{name}.{member}"]
        assert off in ours, f"{name}.{member}: no field starts at offset {off} in {ours}"
        assert ours[off][0] == size, f"{name}.{member}: width {ours[off][0]}, kernel {size}"
        assert ours[off][1] == signed, f"{name}.{member}: signedness differs from the kernel"


def test_opcodes_match_kernel(kernel: dict[str, int]) -> None:
    missing = [op.name for op in F.FuseOpcode if f"const.{op.name}" not in kernel]
    assert not missing, f"opcodes not in {HEADER}: {missing}"
    for op in F.FuseOpcode:
        assert op.value == kernel[f"const.{op.name}"], op.name


def test_constants_match_kernel(kernel: dict[str, int]) -> None:
    checked = 0
    for name, value in CONSTANTS.items():
        key = f"const.{name}"
        if key in kernel:
            theirs = kernel[key]
            if theirs >= 1 << 63:
                # ``(1 << 31)`` is a negative int in C; the kernel uses it as a u32 flag.
                theirs &= 0xFFFFFFFF
            assert value == theirs, f"{name}: shardfs {value:#x}, kernel {theirs:#x}"
            checked += 1
    # Flags, FATTR_*, FOPEN_*, name offsets, compat sizes and the version are all in fuse.h.
    assert checked >= 75, f"only {checked} constants found in {HEADER}"
    for name in ("FUSE_KERNEL_VERSION", "FUSE_NAME_OFFSET", "FUSE_NAME_OFFSET_DIRENTPLUS",
                 "FUSE_COMPAT_ENTRY_OUT_SIZE", "FUSE_MIN_READ_BUFFER", "FUSE_INIT_EXT"):
        assert f"const.{name}" in kernel, name


def test_we_do_not_claim_a_newer_minor_than_the_header(kernel: dict[str, int]) -> None:
    # Speaking a minor the layouts were not built for would misparse INIT replies.
    assert F.FUSE_KERNEL_MINOR_VERSION <= kernel["const.FUSE_KERNEL_MINOR_VERSION"]
    assert F.FUSE_MIN_MINOR_VERSION <= F.FUSE_KERNEL_MINOR_VERSION


def test_rec_align_matches_kernel(kernel: dict[str, int]) -> None:
    for n in range(0, 40):
        assert F.fuse_rec_align(n) == kernel[f"rec_align.{n}"], n


def test_compat_sizes_are_prefixes_of_the_full_layouts() -> None:
    assert F.FUSE_COMPAT_INIT_IN_SIZE == 16  # major, minor, max_readahead, flags
    assert F.FUSE_COMPAT_INIT_IN_SIZE < F.fuse_init_in.size
    assert F.FUSE_COMPAT_SETXATTR_IN_SIZE == F.fuse_getxattr_in.size
    assert F.FUSE_NAME_OFFSET_DIRENTPLUS == F.fuse_entry_out.size + F.fuse_dirent.size
