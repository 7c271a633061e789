"""Control messages between the supervisor and its children.

Each worker has one SOCK_SEQPACKET socketpair to the supervisor.  A message
is a msgpack-encoded list ``[verb, *args]`` with fds attached by SCM_RIGHTS;
every request gets exactly one reply ``["ok", value]`` or ``["err", text]``,
so the supervisor can answer the frontend (REPLY_ACK, GET_VRING_BASE) only
once the worker has acted.  Seqpacket keeps message boundaries and fds
together, so there is no framing to get wrong.

Fd ownership: fds received are the receiver's; the sender closes its own
copies after sending.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import msgpack

#: Control messages are small; region lists are the largest.
MAX_CONTROL_BYTES = 1 << 16
MAX_CONTROL_FDS = 16


class ControlError(Exception):
    """The peer answered ``err`` or went away."""


def send(sock: socket.socket, msg: list[Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    data = msgpack.packb(msg, use_bin_type=True)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def recv(sock: socket.socket) -> tuple[list[Any], list[int]]:
    """One message and its fds; raises ControlError on EOF or garbage."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_CONTROL_BYTES, MAX_CONTROL_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        raise ControlError("peer closed the control channel")
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        for fd in fds:
            os.close(fd)
        raise ControlError("control message truncated")
    try:
        msg = msgpack.unpackb(data, raw=False)
    except Exception as e:
        for fd in fds:
            os.close(fd)
        raise ControlError(f"undecodable control message: {e}") from e
    if not isinstance(msg, list) or not msg:
        for fd in fds:
            os.close(fd)
        raise ControlError("control message is not a list")
    return msg, list(fds)


def call(sock: socket.socket, msg: list[Any], fds: list[int] | tuple[int, ...] = ()) -> Any:
    """Send a request and wait for its reply value."""
    send(sock, msg, fds)
    reply, extra = recv(sock)
    for fd in extra:
        os.close(fd)
    if reply[0] != "ok":
        raise ControlError(str(reply[1] if len(reply) > 1 else reply))
    return reply[1] if len(reply) > 1 else None
