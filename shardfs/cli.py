"""Command line: ``shardfs [--config FILE] [--opt=value ...]``.

Flags mirror :class:`shardfs.config.Config` fields with dashes
(``--num-request-queues 2``); both ``--opt=value`` and ``--opt value`` work
(argparse).  ``--print-capabilities`` prints the vhost-user backend JSON that
libvirt reads, then exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from shardfs.config import CACHE_POLICIES, FIELDS, LOG_LEVELS, Config, ConfigError, coerce, load

CAPABILITIES = {"type": "fs", "features": []}
#: The syslog socket; the environment override exists for tests.
SYSLOG_SOCKET = os.environ.get("SHARDFS_SYSLOG_SOCKET", "/dev/log")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shardfs", description="virtio-fs vhost-user backend with one process per queue")
    p.add_argument("--config", metavar="FILE", help="TOML config file (flags override it)")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the vhost-user backend capabilities as JSON and exit")
    p.add_argument("--socket-path", help="vhost-user Unix socket to listen on")
    p.add_argument("--fd", help="an already listening Unix socket fd (from libvirt)")
    p.add_argument("--shared-dir", help="host directory to share")
    p.add_argument("--tag", help="mount tag answered through GET_CONFIG")
    p.add_argument("--num-request-queues", help="request queues, one worker process each")
    p.add_argument("--cache", help=f"cache policy: {' | '.join(CACHE_POLICIES)}")
    p.add_argument("--writeback", help="enable the guest's writeback cache (true/false)")
    p.add_argument("--xattr", help="serve extended attributes (true/false)")
    p.add_argument("--log-level", help=f"{' | '.join(LOG_LEVELS)}")
    p.add_argument("--once", action="store_const", const="true",
                   help="exit when the frontend disconnects (like virtiofsd)")
    p.add_argument("--poll-us",
                   help="adaptive polling: microseconds to watch the rings before sleeping (50)")
    p.add_argument("--stats-socket", help="status socket (default: SOCKET_PATH.stats)")
    p.add_argument("--socket-group", help="group allowed to connect to the socket (mode 0660)")
    p.add_argument("--log-target", help="stderr | syslog")
    p.add_argument("--sandbox", help="namespace | chroot | none: how workers are confined "
                   "(namespace)")
    p.add_argument("--seccomp", help="kill | log | none: system-call allow-list (kill)")
    p.add_argument("--dax-window", help="bytes of the DAX window, a multiple of 2 MiB "
                   "(0 = off, the default)")
    p.add_argument("--shmem-bit", help="protocol feature bit of vhost-user SHMEM: 21 "
                   "(alioth, rust-vmm 0.16, the default) or 22 (QEMU master)")
    p.add_argument("--max-nodes", help="node budget (host O_PATH fds per worker)")
    p.add_argument("--max-handles", help="open file budget per worker")
    p.add_argument("--readonly", action="store_const", const="true",
                   help="refuse every modification of the share with EROFS")
    p.add_argument("--translate-uid", help="guest<->host uid map, e.g. map:1000:5000:10")
    p.add_argument("--translate-gid", help="guest<->host gid map, e.g. map:1000:5000:10")
    p.add_argument("--xattrmap", help="xattr name rules (virtiofsd syntax)")
    p.add_argument("--posix-acl", help="POSIX ACLs (true/false)")
    p.add_argument("--killpriv-v2", help="FUSE_HANDLE_KILLPRIV_V2 (true/false)")
    p.add_argument("--security-label", help="label new inodes with the guest's "
                   "security context (true/false)")
    p.add_argument("--allow-direct-io", help="pass a guest's O_DIRECT to the host (true/false)")
    return p


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


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for name in FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = coerce(name, value, f"--{name.replace('_', '-')}", from_cli=True)
    return out


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
    logging.basicConfig(level=level.upper(), handlers=[handler])


def stats_main(argv: list[str]) -> int:
    """``shardfs stats``: print the running daemon's per-queue and per-process figures."""
    p = argparse.ArgumentParser(prog="shardfs stats",
                                description="show a running shardfs's counters")
    p.add_argument("--config", metavar="FILE", help="the daemon's TOML config")
    p.add_argument("--socket-path", help="the daemon's vhost-user socket")
    p.add_argument("--stats-socket", help="the daemon's status socket")
    p.add_argument("--format", choices=("text", "json", "prometheus"), default="text")
    args = p.parse_args(argv)
    path = args.stats_socket
    if path is None:
        if args.socket_path:
            path = f"{args.socket_path}.stats"
        else:
            try:
                path = load(args.config, {}).status_socket() if args.config else None
            except ConfigError as e:
                print(f"shardfs stats: {e}", file=sys.stderr)
                return 2
    if path is None:
        print("shardfs stats: give --stats-socket, --socket-path or --config", file=sys.stderr)
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
    args = build_parser().parse_args(argv)
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES))
        return 0
    try:
        cfg = load(args.config, overrides_from(args))
        check_fs_options(cfg)
        if cfg.log_target == "syslog" and not os.path.exists(SYSLOG_SOCKET):
            raise ConfigError(f"config: log_target: syslog, but {SYSLOG_SOCKET} does not exist")
    except ConfigError as e:
        print(f"shardfs: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, cfg.log_target)
    if not os.path.isdir(cfg.shared_dir):
        os.makedirs(cfg.shared_dir, exist_ok=True)
        logging.getLogger("shardfs").info("created shared dir %s", cfg.shared_dir)
    from shardfs.proc.supervisor import Supervisor, open_listener

    try:
        listener = open_listener(cfg)
    except OSError as e:
        print(f"shardfs: socket_path: {e}", file=sys.stderr)
        return 1
    return Supervisor(cfg).run(listener)


if __name__ == "__main__":
    sys.exit(main())
