"""Configuration: TOML and command line, one-line errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shardfs import cli
from shardfs.compat.parse import build_parser
from shardfs.config import (
    CACHE_POLICIES,
    FIELDS,
    LOG_LEVELS,
    MAX_REQUEST_QUEUES,
    Config,
    ConfigError,
    load,
)
from shardfs.proc import daemon

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def base(tmp_path: Path) -> dict[str, Any]:
    """The minimum a valid configuration needs."""
    return {"socket_path": str(tmp_path / "vhost.sock"), "shared_dir": str(tmp_path)}


def toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "shardfs.toml"
    path.write_text(text)
    return str(path)


def config_error(path: str | None, overrides: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    return msg


# -- load() ---------------------------------------------------------------------------


def test_defaults(base: dict[str, Any]) -> None:
    cfg = load(None, base)
    assert cfg.socket_path == base["socket_path"] and cfg.fd is None
    assert cfg.num_request_queues == 1 and cfg.cache == "auto" and cfg.log_level == "info"
    # virtiofsd's defaults: a launcher that passes no --xattr gets no xattrs.
    assert not cfg.xattr and not cfg.writeback and cfg.once  # exit on disconnect
    assert cfg.readdirplus and cfg.announce_submounts and cfg.sandbox == "namespace"


def test_shipped_config_file_loads(tmp_path: Path) -> None:
    cfg = load(str(REPO / "config" / "shardfs.toml"), {"shared_dir": str(tmp_path)})
    assert cfg.socket_path and cfg.tag == "shardfs"


@pytest.mark.parametrize("text", [
    '[shardfs]\nnum_request_queues = 3\ncache = "never"\n',
    'num_request_queues = 3\ncache = "never"\n',  # a flat file works too
])
def test_toml_values(tmp_path: Path, base: dict[str, Any], text: str) -> None:
    cfg = load(toml(tmp_path, text), base)
    assert cfg.num_request_queues == 3 and cfg.cache == "never"


def test_toml_gives_socket_and_dir(tmp_path: Path) -> None:
    path = toml(tmp_path, f'socket_path = "{tmp_path}/s"\nshared_dir = "{tmp_path}"\n'
                          'writeback = true\ntag = "t"\n')
    cfg = load(path, {})
    assert cfg.socket_path == f"{tmp_path}/s" and cfg.writeback and cfg.tag == "t"


def test_unknown_key_in_toml(tmp_path: Path, base: dict[str, Any]) -> None:
    msg = config_error(toml(tmp_path, "[shardfs]\nnum_request_queue = 2\n"), base)
    assert "num_request_queue" in msg and "unknown" in msg


@pytest.mark.parametrize(("line", "field"), [
    ('num_request_queues = "many"', "num_request_queues"),
    ("num_request_queues = 1.5", "num_request_queues"),
    ("num_request_queues = true", "num_request_queues"),
    ("tag = 5", "tag"),
    ("socket_path = [1]", "socket_path"),
    ('writeback = "maybe"', "writeback"),
    ("xattr = 1", "xattr"),
    ("cache = false", "cache"),
    ("fd = 2.0", "fd"),
    ('max_nodes = "lots"', "max_nodes"),
])
def test_wrong_type_in_toml(tmp_path: Path, base: dict[str, Any], line: str,
                            field: str) -> None:
    assert field in config_error(toml(tmp_path, f"[shardfs]\n{line}\n"), base)


def test_toml_syntax_error_is_one_line(tmp_path: Path, base: dict[str, Any]) -> None:
    path = toml(tmp_path, "[shardfs\nnum = \n")
    assert path in config_error(path, base)


def test_missing_config_file(tmp_path: Path, base: dict[str, Any]) -> None:
    assert "nope.toml" in config_error(str(tmp_path / "nope.toml"), base)


@pytest.mark.parametrize("n", [0, -1, MAX_REQUEST_QUEUES + 1, 65])
def test_num_request_queues_range(base: dict[str, Any], n: int) -> None:
    msg = config_error(None, {**base, "num_request_queues": n})
    assert "num_request_queues" in msg and str(n) in msg


@pytest.mark.parametrize("n", [1, 2, MAX_REQUEST_QUEUES])
def test_num_request_queues_accepted(base: dict[str, Any], n: int) -> None:
    assert load(None, {**base, "num_request_queues": n}).num_request_queues == n


@pytest.mark.parametrize(("field", "value"), [
    ("cache", "sometimes"), ("cache", "AUTO"), ("cache", ""),
    ("log_level", "verbose"), ("log_level", "INFO"), ("log_level", "critical"),
])
def test_bad_choices(base: dict[str, Any], field: str, value: str) -> None:
    msg = config_error(None, {**base, field: value})
    assert field in msg and repr(value) in msg


def test_every_documented_choice_is_accepted(base: dict[str, Any]) -> None:
    for c in CACHE_POLICIES:
        assert load(None, {**base, "cache": c}).cache == c
    for lv in LOG_LEVELS:
        assert load(None, {**base, "log_level": lv}).log_level == lv


@pytest.mark.parametrize("tag", ["x" * 37, "é" * 19, ""])
def test_bad_tag(base: dict[str, Any], tag: str) -> None:
    assert "tag" in config_error(None, {**base, "tag": tag})


@pytest.mark.parametrize("tag", ["x", "x" * 36, "é" * 18])
def test_tag_up_to_36_bytes(base: dict[str, Any], tag: str) -> None:
    assert load(None, {**base, "tag": tag}).tag == tag


def test_neither_socket_path_nor_fd(tmp_path: Path) -> None:
    assert "socket_path" in config_error(None, {"shared_dir": str(tmp_path)})


def test_both_socket_path_and_fd(base: dict[str, Any]) -> None:
    assert "fd" in config_error(None, {**base, "fd": 3})


def test_fd_alone_and_negative(tmp_path: Path) -> None:
    assert load(None, {"fd": 3, "shared_dir": str(tmp_path)}).fd == 3
    assert "fd" in config_error(None, {"fd": -1, "shared_dir": str(tmp_path)})


def test_shared_dir(tmp_path: Path, base: dict[str, Any]) -> None:
    assert "shared_dir" in config_error(None, {**base, "shared_dir": ""})
    f = tmp_path / "file"
    f.write_text("")
    assert "shared_dir" in config_error(None, {**base, "shared_dir": str(f)})
    # Missing is fine: the CLI creates it.
    assert load(None, {**base, "shared_dir": str(tmp_path / "new")})


@pytest.mark.parametrize("field", ["max_nodes", "max_handles"])
def test_budgets(base: dict[str, Any], field: str) -> None:
    assert field in config_error(None, {**base, field: 15})
    assert getattr(load(None, {**base, field: 16}), field) == 16


def test_every_field_has_a_flag() -> None:
    flags = {a.dest for a in build_parser()._actions}
    assert set(FIELDS) <= flags


# -- command line ---------------------------------------------------------------------


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run cli.main() up to the supervisor, which is replaced by a recorder."""
    import shardfs.proc.sockets as sockets
    import shardfs.proc.supervisor as sup

    seen: dict[str, Any] = {}

    class FakeSupervisor:
        def __init__(self, cfg: Config) -> None:
            seen["cfg"] = cfg

        def run(self, listener: object) -> int:
            seen["listener"] = listener
            return 0

    monkeypatch.setattr(sup, "Supervisor", FakeSupervisor)
    # The limit is the daemon's, not this test process's (tests/unit/test_limits.py).
    monkeypatch.setattr(daemon, "apply_rlimit_nofile",
                        lambda n: seen.setdefault("rlimit_nofile", n) or 0)
    monkeypatch.setattr(sockets, "open_listener", lambda cfg: "listener")
    return seen


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_print_capabilities(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_main(["--print-capabilities"], capsys)
    assert rc == 0 and err == ""
    caps = json.loads(out)
    assert caps["type"] == "fs"


def test_print_capabilities_needs_no_other_flags(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    # libvirt probes the binary before it has a socket for it.
    rc, out, _ = run_main(["--print-capabilities", "--config", str(tmp_path / "missing")],
                          capsys)
    assert rc == 0 and json.loads(out)["type"] == "fs"


@pytest.mark.parametrize("style", ["equals", "space"])
def test_opt_value_styles(tmp_path: Path, started: dict[str, Any],
                          capsys: pytest.CaptureFixture[str], style: str) -> None:
    opts = {"--socket-path": str(tmp_path / "s"), "--shared-dir": str(tmp_path / "share"),
            "--num-request-queues": "3", "--cache": "never", "--tag": "abc",
            "--writeback": "true", "--xattr": "off", "--log-level": "debug",
            "--max-nodes": "0x100"}
    argv: list[str] = []
    for k, v in opts.items():
        argv += [f"{k}={v}"] if style == "equals" else [k, v]
    rc, _, err = run_main([*argv, "--once"], capsys)
    assert rc == 0, err
    cfg = started["cfg"]
    assert cfg.socket_path == str(tmp_path / "s")
    assert (cfg.num_request_queues, cfg.cache, cfg.tag) == (3, "never", "abc")
    assert cfg.writeback is True and cfg.xattr is False and cfg.once is True
    assert cfg.log_level == "debug" and cfg.max_nodes == 256
    assert (tmp_path / "share").is_dir()  # created on start
    assert started["listener"] == "listener"


def test_cli_overrides_toml(tmp_path: Path, started: dict[str, Any],
                            capsys: pytest.CaptureFixture[str]) -> None:
    path = toml(tmp_path, f'[shardfs]\nsocket_path = "{tmp_path}/toml.sock"\n'
                          f'shared_dir = "{tmp_path}"\nnum_request_queues = 2\n'
                          'cache = "never"\n')
    rc, _, err = run_main(["--config", path, "--num-request-queues", "4",
                           f"--socket-path={tmp_path}/cli.sock"], capsys)
    assert rc == 0, err
    cfg = started["cfg"]
    assert cfg.num_request_queues == 4 and cfg.socket_path == f"{tmp_path}/cli.sock"
    assert cfg.cache == "never"  # not given on the command line: the file's value stays


def test_cli_fd_overrides_toml_socket_path(tmp_path: Path, started: dict[str, Any],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = toml(tmp_path, f'socket_path = "{tmp_path}/toml.sock"\nshared_dir = "{tmp_path}"\n')
    rc, _, err = run_main(["--config", path, "--fd", "3"], capsys)
    assert rc == 0, err
    assert started["cfg"].fd == 3 and started["cfg"].socket_path is None


@pytest.mark.parametrize(("args", "field"), [
    (["--num-request-queues", "0"], "num_request_queues"),
    (["--num-request-queues=65"], "num_request_queues"),
    (["--num-request-queues", "two"], "num-request-queues"),
    (["--cache", "sometimes"], "cache"),
    (["--log-level=loud"], "log_level"),
    (["--tag", "t" * 40], "tag"),
    (["--writeback", "perhaps"], "writeback"),
    (["--fd", "x"], "fd"),
    (["--max-handles", "1"], "max_handles"),
])
def test_cli_errors_name_the_field(tmp_path: Path, started: dict[str, Any],
                                   capsys: pytest.CaptureFixture[str], args: list[str],
                                   field: str) -> None:
    base = ["--socket-path", str(tmp_path / "s"), "--shared-dir", str(tmp_path)]
    rc, out, err = run_main([*base, *args], capsys)
    assert rc == 2 and "cfg" not in started
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], err


def test_cli_without_socket(tmp_path: Path, started: dict[str, Any],
                            capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_main(["--shared-dir", str(tmp_path)], capsys)
    assert rc == 2 and "socket_path" in err and len(err.strip().splitlines()) == 1


def test_cli_unknown_key_in_config_file(tmp_path: Path, started: dict[str, Any],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = toml(tmp_path, "[shardfs]\nsockets = 1\n")
    rc, _, err = run_main(["--config", path, "--socket-path", "s", "--shared-dir",
                           str(tmp_path)], capsys)
    assert rc == 2 and "sockets" in err and len(err.strip().splitlines()) == 1


def test_cli_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert "--no-such-flag" in err and len(err.strip().splitlines()) == 1
