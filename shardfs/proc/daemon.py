"""The daemon's own image: everything that runs after the command line is parsed.

``shardfs`` run as a program parses its command line in one image and then
execs ``python -m shardfs.proc.daemon`` (:mod:`shardfs.proc.handover` says
why and how), whose :func:`main` reads the parsed config and calls
:func:`serve`.  :func:`serve` is the same code either way; in-process
callers (the tests) reach it through :func:`shardfs.cli.main` with an
explicit ``argv``.
"""

from __future__ import annotations

import logging
import os
import sys

from shardfs.config import Config
from shardfs.proc import handover
from shardfs.proc.limits import apply_rlimit_nofile

#: Python logging levels for virtiofsd's names; "off" is above every level.
_LOG_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "warning": logging.WARNING,
               "info": logging.INFO, "debug": logging.DEBUG, "trace": logging.DEBUG,
               "off": logging.CRITICAL + 10}
#: The syslog socket; the environment override exists for tests.
SYSLOG_SOCKET = os.environ.get("SHARDFS_SYSLOG_SOCKET", "/dev/log")


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


def main(argv: list[str]) -> int:
    """``python -m shardfs.proc.daemon FD -- ARGS``: read the hand-over from FD and serve."""
    try:
        cfg, notes = handover.read(int(argv[0]))
    except (IndexError, ValueError, OSError) as e:
        print(f"shardfs: the daemon image needs the hand-over of shardfs.cli: {e}",
              file=sys.stderr)
        return 2
    return serve(cfg, notes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
