"""The daemon's own image: everything that runs after the command line is parsed.

Why a second image.  Parsing virtiofsd's command line needs ``argparse``
(with ``gettext``, ``locale`` and ``shutil``), the option tables of
:mod:`shardfs.compat` and ``json``: about 1.3 MB of heap that the
daemon never touches again, and that every forked worker would inherit.
So ``shardfs`` run as a program (:func:`shardfs.cli.main` with no
``argv``) parses and validates, then :func:`exec_serve` replaces the
process image with ``python -m shardfs.proc.daemon``, which imports only what
serving needs.  The pid, the environment, the working directory, the
inheritable fds (``--fd``) and the interpreter's flags (``-OO`` above all)
carry over, so launchers see one process from start to exit.

Contract of the hand-over: the parsed :class:`~shardfs.config.Config` and
the start-up notes travel in an anonymous memfd as msgpack
(:func:`encode` / :func:`decode`), its number first in ``argv``, followed
by ``--`` and the original arguments (for ``ps``).  :func:`decode`
refuses anything but Config's own fields with their own types, so a
mismatch between the two images fails at start with a one-line message.

:func:`serve` is the same code either way; in-process callers (the tests)
call it through :func:`shardfs.cli.main` with an explicit ``argv``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, NoReturn

import msgpack

from shardfs.config import FIELDS, Config
from shardfs.proc.limits import apply_rlimit_nofile

#: Python logging levels for virtiofsd's names; "off" is above every level.
_LOG_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "warning": logging.WARNING,
               "info": logging.INFO, "debug": logging.DEBUG, "trace": logging.DEBUG,
               "off": logging.CRITICAL + 10}
#: The syslog socket; the environment override exists for tests.
SYSLOG_SOCKET = os.environ.get("SHARDFS_SYSLOG_SOCKET", "/dev/log")
#: Config fields whose msgpack form (lists) is turned back into tuples.
_RANGE_FIELDS = ("uid_map", "gid_map")


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


def serve(cfg: Config, notes: list[str]) -> int:
    """Log, raise the fd limit, take the pid file and the socket, run the supervisor.

    Returns the process exit code: 2 for a limit that cannot be set, 1 for
    a socket that cannot be taken, else the supervisor's.
    """
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
    for note in notes:
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

    # The supervisor exists (and handles SIGTERM) before the socket does: a
    # launcher may stop the daemon as soon as it sees the socket.
    supervisor = Supervisor(cfg)
    pid_fd = None
    try:
        try:
            if cfg.socket_path is not None:
                pid_fd = take_pid_file(cfg.socket_path)  # before the bind: never steal a socket
            listener = open_listener(cfg)
        except OSError as e:
            print(f"shardfs: socket_path: {e.strerror or e}", file=sys.stderr)
            return 1
        return supervisor.run(listener)
    finally:
        if pid_fd is not None:
            release_pid_file(cfg.socket_path or "", pid_fd)


# -- the hand-over between the two images ----------------------------------------------

def encode(cfg: Config, notes: list[str]) -> bytes:
    """The Config (every field) and the notes, as :func:`decode` reads them."""
    return msgpack.packb({"config": {name: getattr(cfg, name) for name in FIELDS},
                          "notes": list(notes)}, use_bin_type=True)


def decode(data: bytes) -> tuple[Config, list[str]]:
    """Inverse of :func:`encode`; ValueError names what does not fit."""
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types for bad input
        raise ValueError(f"unreadable ({e})") from None
    if not isinstance(msg, dict) or set(msg) != {"config", "notes"}:
        raise ValueError("not a config hand-over")
    values, notes = msg["config"], msg["notes"]
    if not isinstance(values, dict) or not isinstance(notes, list) \
            or not all(isinstance(n, str) for n in notes):
        raise ValueError("not a config hand-over")
    cfg = Config()
    for name, value in values.items():
        if name not in FIELDS:
            raise ValueError(f"{name}: not a config field")
        if name in _RANGE_FIELDS:
            value = _ranges(name, value)
        default = getattr(cfg, name)
        if value is not None and default is not None and not _same_kind(value, default):
            raise ValueError(f"{name}: {type(value).__name__} where the config has "
                             f"{type(default).__name__}")
        setattr(cfg, name, value)
    return cfg, notes


def _ranges(name: str, value: Any) -> tuple[tuple[int, int, int], ...]:
    if not isinstance(value, list) or not all(
            isinstance(r, list) and len(r) == 3 and all(type(i) is int for i in r)
            for r in value):
        raise ValueError(f"{name}: not a list of id ranges")
    return tuple((r[0], r[1], r[2]) for r in value)


def _same_kind(value: object, default: object) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def interpreter_flags() -> list[str]:
    """The flags this interpreter was started with that the next image must keep.

    ``-O``/``-OO`` matters most (``scripts/shardfs`` runs ``-OO`` to keep
    docstrings out of memory).  ``-I``, ``-P``, ``-E``, ``-s`` and ``-S``
    keep the import path as safe as the caller made it (``-m`` would
    otherwise put the working directory first); ``-B``, ``-X`` and ``-W``
    keep the rest of what the caller chose.
    """
    flags = []
    if sys.flags.optimize:
        flags.append("-" + "O" * sys.flags.optimize)
    for flag, on in (("-I", sys.flags.isolated), ("-P", sys.flags.safe_path),
                     ("-E", sys.flags.ignore_environment), ("-s", sys.flags.no_user_site),
                     ("-S", sys.flags.no_site), ("-B", sys.flags.dont_write_bytecode)):
        if on:
            flags.append(flag)
    for key, value in sys._xoptions.items():
        flags += ["-X", key if value is True else f"{key}={value}"]
    for w in sys.warnoptions:
        flags += ["-W", w]
    return flags


def exec_serve(cfg: Config, notes: list[str], argv: list[str]) -> NoReturn:
    """Replace this process with ``python -m shardfs.proc.daemon`` serving ``cfg``.

    Raises OSError if the exec fails (the caller then serves in-process).
    """
    fd = os.memfd_create("shardfs-config", 0)  # no MFD_CLOEXEC: the next image reads it
    try:
        os.write(fd, encode(cfg, notes))
        os.lseek(fd, 0, os.SEEK_SET)
        if cfg.fd is not None:
            os.set_inheritable(cfg.fd, True)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *interpreter_flags(), "-m", "shardfs.proc.daemon",
                                  str(fd), "--", *argv])
    except BaseException:
        os.close(fd)
        raise


def main(argv: list[str]) -> int:
    """``python -m shardfs.proc.daemon FD -- ARGS``: read the hand-over from FD and serve."""
    try:
        fd = int(argv[0])
        with os.fdopen(fd, "rb") as f:
            cfg, notes = decode(f.read())
    except (IndexError, ValueError, OSError) as e:
        print(f"shardfs: the daemon image needs the hand-over of shardfs.cli: {e}",
              file=sys.stderr)
        return 2
    return serve(cfg, notes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
