"""shardfs.proc.spawn: the supervisor's fork-and-run children, with real processes."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from shardfs.proc.spawn import ForkedProcess


def _run(body: object) -> ForkedProcess:
    p = ForkedProcess(body, "test")  # type: ignore[arg-type]
    p.start()
    p.join()
    return p


def test_return_is_exit_0() -> None:
    assert _run(lambda: None).exitcode == 0


def test_system_exit_codes() -> None:
    def code(c: object) -> None:
        raise SystemExit(c)

    assert _run(lambda: code(3)).exitcode == 3
    assert _run(lambda: code(None)).exitcode == 0
    assert _run(lambda: code("a message")).exitcode == 1


def test_exception_is_exit_1_with_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    def boom() -> None:
        raise RuntimeError("boom in the child")

    assert _run(boom).exitcode == 1
    assert "RuntimeError: boom in the child" in capfd.readouterr().err


def test_child_never_runs_the_parents_atexit_or_returns(tmp_path: object) -> None:
    """The child leaves by os._exit: pytest's own teardown must not run in it."""
    r, w = os.pipe()

    def body() -> None:
        os.write(w, b"x")

    p = _run(body)
    os.close(w)
    assert os.read(r, 10) == b"x" and os.read(r, 10) == b""
    os.close(r)
    assert p.exitcode == 0


def test_join_timeout_is_alive_and_kill() -> None:
    p = ForkedProcess(lambda: time.sleep(60), "sleeper")
    pid = p.start()
    assert pid > 0 and p.pid == pid
    assert p.is_alive()
    t0 = time.monotonic()
    p.join(0.05)
    assert p.exitcode is None and p.is_alive()
    assert time.monotonic() - t0 < 30  # it returned; no timing is asserted beyond that
    p.kill()
    p.join()
    assert p.exitcode == -signal.SIGKILL
    assert not p.is_alive()
    p.kill()  # a no-op once reaped


def test_start_twice_is_refused() -> None:
    p = ForkedProcess(lambda: None, "once")
    p.start()
    with pytest.raises(RuntimeError):
        p.start()
    p.join()


def test_stdio_buffers_are_not_written_twice(capfd: pytest.CaptureFixture[str]) -> None:
    sys.stdout.write("before fork|")
    _run(lambda: print("in child", end="|"))
    sys.stdout.flush()
    out = capfd.readouterr().out
    assert out.count("before fork|") == 1 and out.count("in child|") == 1
