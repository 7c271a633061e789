"""The coordinator process: the single owner of the DAX window.

FUSE_SETUPMAPPING and FUSE_REMOVEMAPPING change one shared table (what file
range is mapped at which window offset), and the frontend must see them in
one order, so one process serializes them (design card).  Workers will reach
it over a posix_ipc message queue with msgpack bodies; the supervisor reaches
it over its control socket, like any child.

Until the DAX window exists (issue "DAX window owned by the coordinator"),
the coordinator only answers liveness pings and exits on request; workers
answer SETUPMAPPING/REMOVEMAPPING with ENOSYS, as virtiofsd does.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import Any

from shardfs.proc import control

log = logging.getLogger("shardfs.coordinator")


class Coordinator:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.mappings: dict[int, Any] = {}

    def run(self) -> None:
        from shardfs.proc.worker import die_with_parent, set_process_name

        set_process_name("shardfs-coord")
        die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while True:
            try:
                msg, fds = control.recv(self.sock)
            except control.ControlError:
                return
            for fd in fds:
                os.close(fd)
            verb = msg[0]
            if verb == "ping":
                control.send(self.sock, ["ok", "pong"])
            elif verb == "stats":
                control.send(self.sock, ["ok", {"mappings": len(self.mappings)}])
            elif verb == "exit":
                return
            else:
                control.send(self.sock, ["err", f"unknown verb {verb!r}"])
