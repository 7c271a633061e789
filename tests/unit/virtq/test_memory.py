"""GuestMemory: regions come and go, every translation is bounds-checked."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import pytest

from shardfs.virtq.memory import MAX_REGION_BYTES, GuestMemory, GuestMemoryError
from tests.unit.support import open_fd_count

PAGE = mmap.PAGESIZE


def memfd(size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create("shardfs-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """memfds a test creates; GuestMemory does not own them (mmap dups)."""
    out: list[int] = []
    yield out
    for fd in out:
        os.close(fd)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory()
    yield m
    m.clear()


def add(mem: GuestMemory, fds: list[int], gpa: int, size: int, *, user: int | None = None,
        mmap_offset: int = 0, fill: bytes = b"") -> None:
    fd = memfd(size + mmap_offset, fill)
    fds.append(fd)
    mem.add(gpa, size, gpa + 0x7000_0000_0000 if user is None else user, mmap_offset, fd)


def test_add_view_and_write_through(mem: GuestMemory, fds: list[int]) -> None:
    add(mem, fds, 0x10000, PAGE, fill=b"hello")
    assert bytes(mem.view(0x10000, 5)) == b"hello"
    mem.view(0x10000 + 1, 2)[:] = b"EL"
    assert os.pread(fds[0], 5, 0) == b"hELlo"  # MAP_SHARED: the guest sees our writes


def test_caller_keeps_the_fd_and_clear_leaks_nothing(mem: GuestMemory) -> None:
    fd = memfd(PAGE)
    before = open_fd_count()
    mem.add(0, PAGE, 0, 0, fd)
    os.close(fd)  # add() does not take it: the mapping holds its own reference
    assert bytes(mem.view(0, 4)) == bytes(4)
    mem.clear()
    assert open_fd_count() == before - 1


def test_mmap_offset_indexes_into_the_mapping(mem: GuestMemory, fds: list[int]) -> None:
    fd = memfd(3 * PAGE)
    fds.append(fd)
    os.pwrite(fd, b"at-offset", 2 * PAGE)
    mem.add(0x4000_0000, PAGE, 0x7000_0000, 2 * PAGE, fd)
    assert bytes(mem.view(0x4000_0000, 9)) == b"at-offset"
    with pytest.raises(GuestMemoryError):
        mem.view(0x4000_0000 + PAGE - 1, 2)


@pytest.mark.parametrize(("gpa", "size"), [
    (0x10000, PAGE),                 # identical
    (0x10000 - PAGE, 2 * PAGE),      # overlaps the start
    (0x10000 + PAGE - 1, PAGE),      # overlaps the end by one byte
    (0x10000 + 16, 16),              # inside
    (0, 0x100000),                   # contains it
])
def test_overlapping_regions_are_refused(mem: GuestMemory, fds: list[int], gpa: int,
                                         size: int) -> None:
    add(mem, fds, 0x10000, PAGE)
    with pytest.raises(GuestMemoryError, match="overlaps"):
        add(mem, fds, gpa, size)
    assert len(mem.regions) == 1


def test_adjacent_regions_are_accepted(mem: GuestMemory, fds: list[int]) -> None:
    add(mem, fds, 0x10000, PAGE)
    add(mem, fds, 0x10000 + PAGE, PAGE)
    add(mem, fds, 0x10000 - PAGE, PAGE)
    assert [r.gpa for r in mem.regions] == [0x10000 - PAGE, 0x10000, 0x10000 + PAGE]


@pytest.mark.parametrize(("gpa", "size", "offset"), [
    (0, 0, 0),                                 # empty
    (0, MAX_REGION_BYTES + PAGE, 0),           # larger than user space
    (0, PAGE, MAX_REGION_BYTES + PAGE),        # absurd mmap offset
    ((1 << 64) - PAGE, 2 * PAGE, 0),           # wraps the guest-physical space
])
def test_absurd_regions_are_refused(mem: GuestMemory, fds: list[int], gpa: int, size: int,
                                    offset: int) -> None:
    fd = memfd(PAGE)
    fds.append(fd)
    with pytest.raises(GuestMemoryError):
        mem.add(gpa, size, 0x1000, offset, fd)
    assert mem.regions == []


def test_wrapping_user_address_is_refused(mem: GuestMemory, fds: list[int]) -> None:
    fd = memfd(2 * PAGE)
    fds.append(fd)
    with pytest.raises(GuestMemoryError, match="wraps"):
        mem.add(0, 2 * PAGE, (1 << 64) - PAGE, 0, fd)


def test_unmappable_fd_is_a_memory_error_not_a_crash(mem: GuestMemory) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(GuestMemoryError, match="cannot map"):
            mem.add(0, PAGE, 0, 0, r)
    finally:
        os.close(r)
        os.close(w)
    assert mem.regions == []


def test_region_larger_than_its_file_is_refused(mem: GuestMemory, fds: list[int]) -> None:
    """Mapping past EOF would turn the first guest access there into SIGBUS."""
    fd = memfd(PAGE)
    fds.append(fd)
    with pytest.raises(GuestMemoryError):
        mem.add(0, 2 * PAGE, 0, 0, fd)
    with pytest.raises(GuestMemoryError):
        mem.add(0, PAGE, 0, PAGE, fd)  # the offset counts too
    assert mem.regions == []


def test_remove(mem: GuestMemory, fds: list[int]) -> None:
    add(mem, fds, 0, PAGE)
    add(mem, fds, PAGE, PAGE)
    assert not mem.remove(0, 2 * PAGE)       # size must match
    assert not mem.remove(16, PAGE)          # start must match
    assert mem.remove(0, PAGE)
    assert [r.gpa for r in mem.regions] == [PAGE]
    with pytest.raises(GuestMemoryError):
        mem.view(0, 1)
    add(mem, fds, 0, PAGE)                   # the hole can be refilled
    assert len(mem.regions) == 2


def test_views_outlive_removal(mem: GuestMemory, fds: list[int]) -> None:
    """A worker still holding a chain's views must not fault after REM_MEM_REG."""
    add(mem, fds, 0, PAGE, fill=b"still here")
    v = mem.view(0, 10)
    assert mem.remove(0, PAGE)
    assert bytes(v) == b"still here"
    v[:5] = b"STILL"
    assert os.pread(fds[0], 5, 0) == b"STILL"
    v.release()


@pytest.mark.parametrize(("gpa", "length"), [
    (0x10000 - 1, 1),            # before the region
    (0x10000 + PAGE, 1),         # just past the end
    (0x10000 + PAGE - 4, 5),     # crosses the end
    (0x10000, PAGE + 1),         # one byte too long
    ((1 << 64) - 1, 1),          # top of the address space
    (0x10000, -1),               # negative length
])
def test_view_bounds(mem: GuestMemory, fds: list[int], gpa: int, length: int) -> None:
    add(mem, fds, 0x10000, PAGE)
    with pytest.raises(GuestMemoryError):
        mem.view(gpa, length)


def test_view_edges_are_inclusive(mem: GuestMemory, fds: list[int]) -> None:
    add(mem, fds, 0x10000, PAGE)
    assert len(mem.view(0x10000, PAGE)) == PAGE
    assert len(mem.view(0x10000 + PAGE - 1, 1)) == 1


def test_views_span_adjacent_regions(mem: GuestMemory, fds: list[int]) -> None:
    add(mem, fds, 0, PAGE, fill=b"A" * PAGE)
    add(mem, fds, PAGE, PAGE, fill=b"B" * PAGE)
    add(mem, fds, 2 * PAGE, PAGE, fill=b"C" * PAGE)
    parts = mem.views(PAGE - 3, PAGE + 6)
    assert [len(p) for p in parts] == [3, PAGE, 3]
    assert b"".join(bytes(p) for p in parts) == b"AAA" + b"B" * PAGE + b"CCC"
    with pytest.raises(GuestMemoryError, match="cross"):
        mem.view(PAGE - 3, 6)  # view() is single-region by contract


def test_views_refuse_a_hole(mem: GuestMemory, fds: list[int]) -> None:
    add(mem, fds, 0, PAGE)
    add(mem, fds, 2 * PAGE, PAGE)
    with pytest.raises(GuestMemoryError):
        mem.views(PAGE - 1, 2)
    with pytest.raises(GuestMemoryError):
        mem.views(2 * PAGE + PAGE - 1, 2)  # runs off the last region
    assert mem.views(0, 0) == []


def test_user_to_gpa(mem: GuestMemory, fds: list[int]) -> None:
    add(mem, fds, 0x10000, PAGE, user=0x7F00_0000_0000)
    add(mem, fds, 0x80000, PAGE, user=0x7E00_0000_0000)
    assert mem.user_to_gpa(0x7F00_0000_0000, 16) == 0x10000
    assert mem.user_to_gpa(0x7F00_0000_0000 + 100, 16) == 0x10000 + 100
    assert mem.user_to_gpa(0x7E00_0000_0000 + PAGE - 16, 16) == 0x80000 + PAGE - 16
    for addr, n in [(0x7F00_0000_0000 - 1, 2), (0x7F00_0000_0000 + PAGE - 15, 16),
                    (0x10000, 16), (0, 0)]:
        with pytest.raises(GuestMemoryError):
            mem.user_to_gpa(addr, n)


def test_clear_drops_everything(mem: GuestMemory, fds: list[int]) -> None:
    add(mem, fds, 0, PAGE)
    add(mem, fds, PAGE, PAGE)
    mem.clear()
    assert mem.regions == []
    with pytest.raises(GuestMemoryError):
        mem.view(0, 1)
