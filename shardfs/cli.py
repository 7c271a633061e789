"""Command line: ``shardfs [--config FILE] [virtiofsd's options] [--opt=value ...]``.

The options are virtiofsd 1.13's, with its syntax and defaults, plus
shardfs's own (:mod:`shardfs.compat` parses them and says how they combine
with a config file).  ``--print-capabilities`` prints the vhost-user
backend JSON that libvirt reads, then exits; ``shardfs stats`` reads a
running daemon's counters.  Serving happens in :mod:`shardfs.proc.daemon`,
which a program run execs into, so that this module's imports (argparse,
the option tables) are not part of the daemon's memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from shardfs.compat import CommandLineError, parse_command_line
from shardfs.config import Config, ConfigError, default_stats_socket, load

#: What ``--print-capabilities`` says (docs/interop/vhost-user.json, "fs"
#: features).  "separate-options" makes libvirt pass virtiofsd's modern
#: options rather than the C daemon's ``-o`` list; "migrate-precopy": live
#: migration with the state in QEMU's stream (README "Migration"), as virtiofsd.
CAPABILITIES = {"type": "fs", "features": ["migrate-precopy", "separate-options"]}


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


def main(argv: list[str] | None = None, *, exec_daemon: bool | None = None) -> int:
    """Parse and check the command line; then serve, print, or exit with 2.

    Run as a program (``argv`` None) this process then becomes the daemon
    image (:mod:`shardfs.proc.handover`: the parser's modules are left behind);
    with an explicit ``argv`` it serves in-process unless ``exec_daemon``.
    """
    run_as_program = argv is None
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
    if exec_daemon is None:
        exec_daemon = run_as_program
    if exec_daemon:
        from shardfs.proc import handover

        try:
            handover.exec_serve(cfg, cl.notes, argv)
        except OSError as e:  # no usable sys.executable: serve from this image
            print(f"shardfs: cannot start the daemon image ({e.strerror or e}); "
                  "serving from the parser's", file=sys.stderr)
    from shardfs.proc import daemon

    return daemon.serve(cfg, cl.notes)


if __name__ == "__main__":
    sys.exit(main())
