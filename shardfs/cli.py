"""Command line: ``shardfs [--config FILE] [virtiofsd's options] [--opt=value ...]``.

The options are virtiofsd 1.13's, with its syntax and defaults, plus
shardfs's own (:mod:`shardfs.compat` parses them and says how they combine
with a config file).  ``--print-capabilities`` prints the vhost-user
backend JSON that libvirt reads, then exits; ``shardfs stats`` reads a
running daemon's counters.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from shardfs.compat import CommandLineError, parse_command_line
from shardfs.config import Config, ConfigError, default_stats_socket, load
from shardfs.proc.limits import apply_rlimit_nofile

#: What ``--print-capabilities`` says (docs/interop/vhost-user.json, "fs"
#: features).  "separate-options" makes libvirt pass virtiofsd's modern
#: options rather than the C daemon's ``-o`` list; "migrate-precopy": live
#: migration with the state in QEMU's stream (README "Migration"), as virtiofsd.
CAPABILITIES = {"type": "fs", "features": ["migrate-precopy", "separate-options"]}
#: Python logging levels for virtiofsd's names; "off" is above every level.
_LOG_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "warning": logging.WARNING,
               "info": logging.INFO, "debug": logging.DEBUG, "trace": logging.DEBUG,
               "off": logging.CRITICAL + 10}
#: The syslog socket; the environment override exists for tests.
SYSLOG_SOCKET = os.environ.get("SHARDFS_SYSLOG_SOCKET", "/dev/log")


def check_fs_options(cfg: Config) -> None:
    """The syntax of the id and xattr maps, by their own parsers (ConfigError)."""
    from shardfs.fs.idmap import IdMap
    from shardfs.fs.xattrmap import XattrMap

    checks: list[tuple[str, Callable[[str], object]]] = [
        ("translate_uid", IdMap.parse), ("translate_gid", IdMap.parse),
        ("xattrmap", XattrMap.parse)]
    for name, parse in checks:
        value = getattr(cfg, name)
        if value is not None:
            try:
                parse(value)
            except ValueError as e:
                raise ConfigError(f"config: {name}: {e}") from None


def setup_logging(level: str, target: str) -> None:
    """Log to stderr (timestamps, process) or to syslog (the daemon facility)."""
    if target == "syslog":
        from logging.handlers import SysLogHandler

        handler: logging.Handler = SysLogHandler(address=SYSLOG_SOCKET,
                                                 facility=SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter(
            "shardfs[%(process)d]: %(processName)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(processName)s[%(process)d] %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=_LOG_LEVELS[level], handlers=[handler])


def stats_main(argv: list[str]) -> int:
    """``shardfs stats``: print the running daemon's per-queue and per-process figures."""
    p = argparse.ArgumentParser(prog="shardfs stats",
                                description="show a running shardfs's counters")
    p.add_argument("--config", metavar="FILE", help="the daemon's TOML config")
    p.add_argument("--socket-path", help="the daemon's vhost-user socket")
    p.add_argument("--stats-socket", help="the daemon's status socket")
    p.add_argument("--pid", type=int, help="the daemon's pid, for one started with --fd alone "
                   "(its status socket is then " + default_stats_socket(0).replace("0", "PID")
                   + ")")
    p.add_argument("--format", choices=("text", "json", "prometheus"), default="text")
    args = p.parse_args(argv)
    path = args.stats_socket
    if path is None:
        if args.pid is not None:
            path = default_stats_socket(args.pid)
        elif args.socket_path:
            path = f"{args.socket_path}.stats"
        else:
            try:
                path = load(args.config, {}).status_socket() if args.config else None
            except ConfigError as e:
                print(f"shardfs stats: {e}", file=sys.stderr)
                return 2
    if path is None:
        print("shardfs stats: give --stats-socket, --socket-path, --pid or --config",
              file=sys.stderr)
        return 2
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(args.format.encode() + b"\n")
            chunks = []
            while chunk := s.recv(1 << 16):
                chunks.append(chunk)
    except OSError as e:
        print(f"shardfs stats: {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    sys.stdout.write(b"".join(chunks).decode())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stats"]:
        return stats_main(argv[1:])
    try:
        cl = parse_command_line(argv)
    except CommandLineError as e:
        print(f"shardfs: {e}", file=sys.stderr)
        return 2
    if cl.print_capabilities:
        print(json.dumps(CAPABILITIES))
        return 0
    if cl.version:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("shardfs")
        except PackageNotFoundError:  # run from a checkout without installing
            ours = "unknown"
        print(f"shardfs {ours} (virtiofsd 1.13 command line)")
        return 0
    try:
        cfg = load(cl.config_path, cl.overrides)
        check_fs_options(cfg)
    except ConfigError as e:
        print(f"shardfs: {e}", file=sys.stderr)
        return 2
    no_syslog = cfg.log_target == "syslog" and not os.path.exists(SYSLOG_SOCKET)
    if no_syslog:
        # virtiofsd serves on when there is no syslog daemon (launchers pass --syslog
        # on hosts and in sandboxes without one): so do we, logging to stderr.
        cfg.log_target = "stderr"
    setup_logging(cfg.log_level, cfg.log_target)
    log = logging.getLogger("shardfs")
    if no_syslog:
        log.warning("log_target: syslog, but %s does not exist: logging to stderr",
                    SYSLOG_SOCKET)
    for note in cl.notes:
        log.info("%s", note)
    try:
        apply_rlimit_nofile(cfg.rlimit_nofile)
    except OSError as e:
        print(f"shardfs: rlimit_nofile: {e.strerror or e}", file=sys.stderr)
        return 2
    if not os.path.isdir(cfg.shared_dir):
        os.makedirs(cfg.shared_dir, exist_ok=True)
        log.info("created shared dir %s", cfg.shared_dir)
    from shardfs.proc.pidfile import release_pid_file, take_pid_file
    from shardfs.proc.sockets import open_listener
    from shardfs.proc.supervisor import Supervisor

    pid_fd = None
    try:
        try:
            if cfg.socket_path is not None:
                pid_fd = take_pid_file(cfg.socket_path)  # before the bind: never steal a socket
            listener = open_listener(cfg)
        except OSError as e:
            print(f"shardfs: socket_path: {e.strerror or e}", file=sys.stderr)
            return 1
        return Supervisor(cfg).run(listener)
    finally:
        if pid_fd is not None:
            release_pid_file(cfg.socket_path or "", pid_fd)


if __name__ == "__main__":
    sys.exit(main())
