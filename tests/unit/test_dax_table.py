"""The DAX window's checks and mapping table (shardfs.proc.dax), without processes."""

from __future__ import annotations

import errno
import random

import pytest

from shardfs.abi import fuse as F
from shardfs.fs.api import FsError
from shardfs.proc.dax import OFF_MAX, DaxShared, DaxTable, Geometry, Mapping

PAGE = 4096
WINDOW = 8 << 20
R = F.FUSE_SETUPMAPPING_FLAG_READ
W = F.FUSE_SETUPMAPPING_FLAG_WRITE
U64 = (1 << 64) - 1


@pytest.fixture
def geo() -> Geometry:
    return Geometry(WINDOW, PAGE)


def test_map_alignment_is_log2_of_the_page() -> None:
    assert Geometry(WINDOW, 4096).map_alignment_log2 == 12
    assert Geometry(WINDOW, 65536).map_alignment_log2 == 16


@pytest.mark.parametrize("moffset,length", [
    (0, WINDOW), (WINDOW - PAGE, PAGE), (2 << 20, 2 << 20)])
def test_ranges_inside_the_window(geo: Geometry, moffset: int, length: int) -> None:
    geo.check_range(moffset, length)


@pytest.mark.parametrize("moffset,length", [
    (0, 0),                      # empty
    (1, PAGE),                   # unaligned offset
    (0, PAGE + 1),               # unaligned length
    (WINDOW, PAGE),              # starts at the end
    (WINDOW - PAGE, 2 * PAGE),   # runs past the end
    (0, WINDOW + PAGE),          # longer than the window
    (U64 - PAGE + 1, 2 * PAGE),  # u64 moffset + len wraps to a small number
    (PAGE, U64 - PAGE + 1),      # ... the other way round
    (U64 & ~(PAGE - 1), PAGE),   # far beyond
])
def test_ranges_refused_with_einval(geo: Geometry, moffset: int, length: int) -> None:
    with pytest.raises(FsError) as e:
        geo.check_range(moffset, length)
    assert e.value.errno == errno.EINVAL


def test_wrapping_range_would_land_inside_a_naive_check(geo: Geometry) -> None:
    # What alioth computes in u64: the sum wraps to PAGE, which "fits".
    moffset, length = U64 - PAGE + 1, 2 * PAGE
    assert (moffset + length) & U64 == PAGE
    with pytest.raises(FsError):
        geo.check_range(moffset, length)


def test_setup_returns_writability(geo: Geometry) -> None:
    assert geo.check_setup(0, PAGE, R, 0) is False
    assert geo.check_setup(0, PAGE, R | W, 0) is True
    assert geo.check_setup(0, PAGE, W, 0) is True


@pytest.mark.parametrize("foffset,flags", [
    (1, R),                       # unaligned file offset
    (OFF_MAX - PAGE + 2, R),      # file range past loff_t
    (0, 0),                       # neither READ nor WRITE
    (0, R | 4),                   # unknown flag
    (0, R | (1 << 63)),
])
def test_setup_refused_with_einval(geo: Geometry, foffset: int, flags: int) -> None:
    with pytest.raises(FsError) as e:
        geo.check_setup(foffset, PAGE, flags, 0)
    assert e.value.errno == errno.EINVAL


def m(moffset: int, length: int, foffset: int = 0, nodeid: int = 2, fh: int = 7,
      writable: bool = False) -> Mapping:
    return Mapping(moffset, length, foffset, nodeid, fh, writable)


def test_insert_and_overlapping() -> None:
    t = DaxTable()
    a, b = m(0, 2 * PAGE), m(4 * PAGE, PAGE)
    t.insert(b)
    t.insert(a)
    assert list(t) == [a, b]
    assert t.overlapping(PAGE, 5 * PAGE) == [a, b]
    assert t.overlapping(2 * PAGE, 4 * PAGE) == []
    assert t.overlapping(5 * PAGE, 6 * PAGE) == []


def test_remap_in_place_replaces() -> None:
    t = DaxTable()
    t.insert(m(0, 2 << 20, writable=False))
    new = m(0, 2 << 20, nodeid=3, writable=True)
    t.insert(new)
    assert list(t) == [new]


def test_partial_overlap_keeps_the_outside_parts() -> None:
    t = DaxTable()
    t.insert(m(0, 4 * PAGE, foffset=10 * PAGE))
    t.insert(m(PAGE, PAGE, foffset=0, nodeid=9))
    assert [(x.moffset, x.length, x.foffset, x.nodeid) for x in t] == [
        (0, PAGE, 10 * PAGE, 2), (PAGE, PAGE, 0, 9), (2 * PAGE, 2 * PAGE, 12 * PAGE, 2)]


def test_cut_returns_the_pieces_inside() -> None:
    t = DaxTable()
    t.insert(m(0, 2 * PAGE, foffset=0))
    t.insert(m(3 * PAGE, 2 * PAGE, foffset=8 * PAGE))
    pieces = t.cut(PAGE, 4 * PAGE)
    assert [(x.moffset, x.length, x.foffset) for x in pieces] == [
        (PAGE, PAGE, PAGE), (3 * PAGE, PAGE, 8 * PAGE)]
    assert [(x.moffset, x.length, x.foffset) for x in t] == [
        (0, PAGE, 0), (4 * PAGE, PAGE, 9 * PAGE)]


def test_remove_exact_only() -> None:
    t = DaxTable()
    a = m(0, PAGE)
    t.insert(a)
    with pytest.raises(KeyError):
        t.remove(m(0, PAGE, nodeid=3))
    t.remove(a)
    assert len(t) == 0


def test_table_against_a_page_model() -> None:
    """Random inserts and cuts agree with a page-by-page model of the window."""
    rnd = random.Random(1234)
    pages = 64
    t = DaxTable()
    model: dict[int, tuple[int, int]] = {}  # window page -> (nodeid, file page)
    for step in range(2000):
        start = rnd.randrange(pages)
        n = rnd.randint(1, pages - start)
        if rnd.random() < 0.6:
            nodeid, fpage = step + 2, rnd.randrange(1000)
            t.insert(m(start * PAGE, n * PAGE, fpage * PAGE, nodeid))
            for i in range(n):
                model[start + i] = (nodeid, fpage + i)
        else:
            t.cut(start * PAGE, (start + n) * PAGE)
            for i in range(n):
                model.pop(start + i, None)
        seen: dict[int, tuple[int, int]] = {}
        last_end = -1
        for x in t:
            assert x.moffset >= last_end and x.length > 0  # ordered, disjoint
            last_end = x.end
            for i in range(x.length // PAGE):
                seen[x.moffset // PAGE + i] = (x.nodeid, x.foffset // PAGE + i)
        assert seen == model, step


def test_shared_counters() -> None:
    s = DaxShared()
    assert s.read()["mappings"] == 0
    s.set("mappings", 3)
    s.add("refused")
    s.add("refused", 2)
    assert s.get("mappings") == 3 and s.read()["refused"] == 3
