"""argv -> :class:`CommandLine`: virtiofsd's command line and shardfs's own, together.

How a command line and a config file combine (README "Using shardfs in
place of virtiofsd"):

1. Every :class:`~shardfs.config.Config` field starts at virtiofsd's
   default (xattrs off, cache auto, sandbox namespace, ...).
2. A config file is read only when one is named with ``--config``.
   ``scripts/shardfs`` names ``config/shardfs.toml`` only when it is run
   with no arguments at all, so a launcher's command line -- which always
   has arguments -- gets virtiofsd's defaults for whatever it leaves out,
   whatever that file says.  (A user who wants a file under a launcher
   names it in a wrapper: ``exec shardfs --config FILE "$@"``.)
3. Flags override the file; ``-o`` entries override flags, as virtiofsd
   applies its compat options last; later flags win over earlier ones.

Every error is a :class:`CommandLineError` whose ``str()`` is one line
naming the option.  Parsing never touches the system: checks that need it
(the socket group exists, the directory is a directory) are
:meth:`Config.validate`'s.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from shardfs.compat.legacy import LegacyOptionError, parse_legacy
from shardfs.compat.options import OPTIONS, Option
from shardfs.config import ConfigError, coerce

#: virtiofsd's deprecated alias of --inode-file-handles=prefer.
_INODE_FILE_HANDLES_ALIASES = {"fallback": "prefer"}


class CommandLineError(ValueError):
    """A bad command line; ``str()`` is one line that names the option."""


class CommandLine:
    """What a command line asks for.

    ``overrides`` holds coerced Config values, for :func:`shardfs.config.load`;
    ``notes`` are lines for the log at start (options accepted with no
    effect, or served differently), so a launcher's log shows them.
    """

    __slots__ = ("config_path", "print_capabilities", "version", "overrides", "notes")

    def __init__(self, config_path: str | None = None, print_capabilities: bool = False,
                 version: bool = False) -> None:
        self.config_path = config_path
        self.print_capabilities = print_capabilities
        self.version = version
        self.overrides: dict[str, Any] = {}
        self.notes: list[str] = []


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CommandLineError(message)


def build_parser() -> argparse.ArgumentParser:
    """The parser; ``--help`` prints every option, virtiofsd's and shardfs's."""
    p = _Parser(prog="shardfs", allow_abbrev=False,
                description="virtio-fs vhost-user backend with one process per request "
                "queue; accepts virtiofsd's command line (README: Using shardfs in place "
                "of virtiofsd)")
    p.add_argument("--config", metavar="FILE", help="TOML config file (flags override it)")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the vhost-user backend capabilities as JSON and exit")
    p.add_argument("-V", "--version", action="store_true", help="print the version and exit")
    p.add_argument("--socket", metavar="PATH", help="deprecated name of --socket-path")
    p.add_argument("--syslog", action="store_true", help="log to syslog instead of stderr")
    p.add_argument("-o", dest="compat_options", action="append", default=[], metavar="OPTS",
                   help="legacy option list: source=DIR,cache=none,no_xattr,... (deprecated)")
    p.add_argument("-d", dest="debug", action="store_true",
                   help="deprecated: --log-level debug")
    p.add_argument("-f", dest="foreground", action="store_true",
                   help="deprecated, no effect: shardfs never daemonizes")
    for opt in OPTIONS:
        _add(p, opt)
    return p


def _add(p: argparse.ArgumentParser, opt: Option) -> None:
    if opt.kind == "flag":
        p.add_argument(opt.flag, dest=opt.field, nargs="?", const="true", metavar="BOOL",
                       help=opt.help)
        p.add_argument("--no-" + opt.flag[2:], dest=opt.field, action="store_const",
                       const="false", help=argparse.SUPPRESS)
    elif opt.kind == "list":
        p.add_argument(opt.flag, dest=opt.field, action="append", metavar=opt.metavar,
                       help=opt.help)
    elif opt.field == "inode_file_handles":
        p.add_argument(opt.flag, dest=opt.field, nargs="?", const="prefer",
                       metavar=opt.metavar, help=opt.help)
    else:
        p.add_argument(opt.flag, dest=opt.field, metavar=opt.metavar, help=opt.help)


def _coerce(name: str, value: Any, source: str) -> Any:
    try:
        return coerce(name, value, source, from_cli=True)
    except ConfigError as e:
        raise CommandLineError(str(e)) from None


#: Options whose values may begin with "-" (``--modcaps -mknod``).
_HYPHEN_VALUES = ("--modcaps",)


def _join_hyphen_values(argv: list[str]) -> list[str]:
    """``--modcaps -x`` as ``--modcaps=-x``: argparse would take ``-x`` for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in _HYPHEN_VALUES and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def parse_command_line(argv: list[str]) -> CommandLine:
    """Parse ``argv`` (without the program name); :class:`CommandLineError` if bad."""
    args = build_parser().parse_args(_join_hyphen_values(argv))
    cl = CommandLine(config_path=args.config, print_capabilities=args.print_capabilities,
                     version=args.version)
    out = cl.overrides
    for opt in OPTIONS:
        value = getattr(args, opt.field)
        if value is None:
            continue
        if opt.field in ("translate_uid", "translate_gid"):
            value = ",".join(value)
        elif opt.field == "inode_file_handles":
            value = _INODE_FILE_HANDLES_ALIASES.get(value, value)
        elif opt.field == "seccomp" and value == "trap":
            cl.notes.append("--seccomp trap: served as kill (the process ends on a "
                            "forbidden system call)")
            value = "kill"
        out[opt.field] = _coerce(opt.field, value, opt.flag)
        if opt.effect and opt.field in ("thread_pool_size", "inode_file_handles"):
            cl.notes.append(f"{opt.flag}: {opt.effect}")
    if args.socket is not None:
        if "socket_path" in out and out["socket_path"] != args.socket:
            raise CommandLineError("--socket: give --socket-path or --socket (deprecated), "
                                   "not both")
        out["socket_path"] = args.socket
    if args.syslog:
        out["log_target"] = "syslog"
    if args.debug:
        out["log_level"] = "debug"
    try:
        legacy, notes = parse_legacy(args.compat_options)
    except LegacyOptionError as e:
        raise CommandLineError(str(e)) from None
    cl.notes.extend(notes)
    for name, value in legacy.items():
        out[name] = _coerce(name, value, f"-o {name}")
    if out.get("log_level") == "trace":
        cl.notes.append("--log-level trace: logged as debug")
    return cl
