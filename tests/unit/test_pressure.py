"""When a worker may spin (shardfs.proc.pressure): PSI's CPU stall counter read
from a file the test writes, on a clock the test gives; nothing depends on timing."""

from __future__ import annotations

from pathlib import Path

from shardfs.proc.pressure import SAMPLE_NS, CpuPressure, stall_total_us

PSI = ("some avg10=1.00 avg60=2.00 avg300=3.00 total={some}\n"
       "full avg10=0.00 avg60=0.00 avg300=0.00 total=7\n")


def write(path: Path, total_us: int) -> None:
    path.write_text(PSI.format(some=total_us))


def test_the_some_total_is_parsed() -> None:
    assert stall_total_us(PSI.format(some=123456).encode()) == 123456
    assert stall_total_us(b"full avg10=0 total=5\n") is None
    assert stall_total_us(b"some avg10=0 total=x\n") is None
    assert stall_total_us(b"") is None


def test_stalls_above_the_share_hold_spinning_off(tmp_path: Path) -> None:
    f = tmp_path / "cpu"
    write(f, 1_000)
    p = CpuPressure(str(f), max_share=0.10)
    t = 10**12
    assert not p.contended(t)  # the first reading has nothing to compare with
    write(f, 1_000 + SAMPLE_NS // 1000 // 2)  # stalled half of the next sample
    assert p.contended(t + SAMPLE_NS)
    # Within a sample the answer is kept, whatever the file says meanwhile.
    write(f, 0)
    assert p.contended(t + SAMPLE_NS + 1)
    # A quiet sample lets it spin again.
    write(f, 1_000 + SAMPLE_NS // 1000 // 2 + 10)
    assert not p.contended(t + 2 * SAMPLE_NS)
    p.close()


def test_stalls_below_the_share_allow_spinning(tmp_path: Path) -> None:
    f = tmp_path / "cpu"
    write(f, 0)
    p = CpuPressure(str(f), max_share=0.10)
    assert not p.contended(0 + SAMPLE_NS)
    write(f, SAMPLE_NS // 1000 // 20)  # 5%
    assert not p.contended(2 * SAMPLE_NS)
    p.close()


def test_without_psi_nothing_is_contended(tmp_path: Path) -> None:
    p = CpuPressure(str(tmp_path / "missing"))
    assert not p.contended(SAMPLE_NS)
    assert not p.contended(10 * SAMPLE_NS)
    p.close()
    garbled = tmp_path / "garbled"
    garbled.write_text("nonsense\n")
    q = CpuPressure(str(garbled))
    assert not q.contended(SAMPLE_NS) and not q.contended(3 * SAMPLE_NS)
    q.close()
