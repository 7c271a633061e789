"""Live migration in the supervisor: the dirty log's fan-out and the state transfer.

The session (:mod:`shardfs.codec.vhost_user`) turns the migration messages
into calls on the device; :class:`MigrationDevice` implements them for the
supervisor's :class:`~shardfs.proc.device.WorkerDevice`:

* **Dirty log.**  SET_LOG_BASE's memfd, VHOST_F_LOG_ALL from SET_FEATURES and
  each ring's VHOST_VRING_F_LOG go to every worker (control verbs
  ``dirty_log`` and ``dirty_ring``); each worker maps the log itself and
  marks what it writes (:mod:`shardfs.virtq.dirtylog`).  The supervisor
  keeps a dup of the log fd and the settings so that a worker that crashes
  and is replaced during a migration logs again before its rings restart.
  A ring's log settings reach its worker *before* the ring starts: a ring
  started while logging serves waiting chains at once.
* **Device state.**  SET_DEVICE_STATE_FD arrives when every ring is stopped
  (GET_VRING_BASE: each worker finished the request it was serving before it
  answered, and the last used-ring marks were made then, before QEMU's final
  harvest), so the shared tables hold still.  Saving encodes them
  (:mod:`shardfs.fs.passthrough.migrate`, :mod:`shardfs.codec.devstate`)
  right away and a thread writes the bytes into QEMU's pipe, which QEMU
  drains only after our reply; CHECK_DEVICE_STATE joins it.  Loading reads
  the pipe in a thread (bounded by :data:`~shardfs.codec.devstate.MAX_STATE_BYTES`)
  and CHECK_DEVICE_STATE decodes, checks and applies, answering failure with
  the arena untouched when anything is wrong under ``abort``.
* **Failure and cancel.**  Nothing on the source changes during a save, so a
  failed or cancelled migration resumes where it was: QEMU clears LOG_ALL
  (logging stops in every worker) and restarts the rings.

Errors are one line in the log, never a traceback, and always a failed
CHECK_DEVICE_STATE or SET_DEVICE_STATE_FD, never a dead daemon.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from typing import Any

from shardfs.abi import vhost_user as vu
from shardfs.codec.vhost_user import Device, ProtocolError
from shardfs.config import Config
from shardfs.fs.passthrough.shared import SharedState
from shardfs.virtq.dirtylog import MAX_LOG_BYTES

# The state codec (shardfs.codec.devstate) and the passthrough's export and
# import (shardfs.fs.passthrough.migrate) are imported by the methods that
# use them, at the first save or load: a daemon that never migrates does not
# carry them (about 0.4 MB).  Their errors reach MigrationDevice as
# StateRefused.

log = logging.getLogger("shardfs.migration")

#: Bytes per read/write on the state pipe.
_CHUNK = 1 << 20


class StateRefused(Exception):
    """A state that cannot be saved or loaded: the codec's StateError or the
    passthrough's MigrationError, with its message."""


class Transfer:
    """One SET_DEVICE_STATE_FD: a thread moving bytes, and its outcome."""

    def __init__(self, direction: int, fd: int, data: bytes = b"") -> None:
        from shardfs.abi.devstate import MAX_STATE_BYTES

        self.limit = MAX_STATE_BYTES
        self.direction = direction
        self.fd = fd
        self.data = data
        self.received = bytearray()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="shardfs-state", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            if self.direction == vu.VHOST_TRANSFER_STATE_DIRECTION_SAVE:
                view = memoryview(self.data)
                while view:
                    n = os.write(self.fd, view[:_CHUNK])
                    view = view[n:]
            else:
                while True:
                    chunk = os.read(self.fd, _CHUNK)
                    if not chunk:
                        break
                    self.received += chunk
                    if len(self.received) > self.limit:
                        self.error = f"the state stream exceeds {self.limit} bytes"
                        break
        except OSError as e:
            self.error = f"state pipe: {e.strerror}"
        finally:
            os.close(self.fd)

    def join(self) -> str | None:
        self.thread.join()
        return self.error


class Migration:
    """The supervisor's migration state for one frontend connection."""

    def __init__(self, cfg: Config, shared: SharedState) -> None:
        self.cfg = cfg
        self.shared = shared
        self.log_fd: int | None = None
        self.log_size = self.log_offset = 0
        self.log_all = False
        #: queue index -> [used-ring log gpa or None, ring size]
        self.ring_logs: dict[int, list[Any]] = {}
        self.transfer: Transfer | None = None
        #: find-paths' premigration pass (started with LOG_ALL) and its result.
        self.premigration: threading.Thread | None = None
        self.known_paths: dict[int, bytes] = {}
        #: Seconds the last save/load spent in the supervisor, and its bytes (stats, tests).
        self.last: dict[str, Any] = {}

    def start_premigration(self) -> None:
        """While QEMU copies RAM, read every node's path (downtime then only confirms)."""
        if self.cfg.migration_mode != "find-paths" or self.premigration is not None:
            return
        self.known_paths = {}
        from shardfs.fs.passthrough.migrate import Share, collect_paths

        def run() -> None:
            t0 = time.perf_counter()
            try:
                share = Share.open(self.cfg.shared_dir)
                try:
                    self.known_paths = collect_paths(self.shared, share)
                finally:
                    share.close()
            except OSError as e:
                log.warning("migration: the premigration pass failed (%s); paths are read "
                            "at switch-over", e.strerror or e)
                return
            log.info("migration: premigration pass: %d paths in %.1f ms",
                     len(self.known_paths), 1000 * (time.perf_counter() - t0))

        self.premigration = threading.Thread(target=run, name="shardfs-premigration",
                                             daemon=True)
        self.premigration.start()

    def end_premigration(self) -> dict[int, bytes]:
        """Wait for the premigration pass; its paths (empty if none ran)."""
        if self.premigration is not None:
            self.premigration.join()
            self.premigration = None
        known, self.known_paths = self.known_paths, {}
        return known

    def close(self) -> None:
        self.end_premigration()
        if self.log_fd is not None:
            os.close(self.log_fd)
            self.log_fd = None
        if self.transfer is not None:
            self.transfer.join()
            self.transfer = None

    def log_message(self) -> tuple[list[Any], list[int]]:
        fds = [self.log_fd] if self.log_fd is not None else []
        return ["dirty_log", self.log_size, self.log_offset, self.log_all, bool(fds)], fds

    # -- save -----------------------------------------------------------------------

    def save(self, fd: int) -> None:
        """Encode the state and start writing it into ``fd`` (which this owns in
        every outcome: handed to the writer thread, or closed on failure)."""
        from shardfs.fs.passthrough.migrate import MigrationError

        try:
            data = self._encode_state()
        except MigrationError as e:
            os.close(fd)
            raise StateRefused(str(e)) from None
        except BaseException:
            os.close(fd)
            raise
        self.transfer = Transfer(vu.VHOST_TRANSFER_STATE_DIRECTION_SAVE, fd, data)

    def _encode_state(self) -> bytes:
        from shardfs.codec.devstate import MODES, encode
        from shardfs.fs.passthrough.migrate import Share, export_state

        t0 = time.perf_counter()
        known = self.end_premigration()
        share = Share.open(self.cfg.shared_dir)
        try:
            state = export_state(self.shared, share, MODES[self.cfg.migration_mode],
                                 self.cfg.migration_verify_handles, known)
        finally:
            share.close()
        lost = [n for n in state.nodes if n.error]
        for n in lost:
            log.warning("migration: node %#x cannot be located by %s (%s)", n.nodeid,
                        self.cfg.migration_mode, errno.errorcode.get(n.error, n.error))
        if lost and self.cfg.migration_on_error == "abort":
            raise ProtocolError(f"{len(lost)} node(s) cannot be located by "
                                f"{self.cfg.migration_mode} (an open but unlinked file?); "
                                "--migration-on-error abort: the migration fails and this "
                                "daemon keeps serving")
        data = encode(state)
        self.last = {"direction": "save", "nodes": len(state.nodes),
                     "handles": len(state.handles), "bytes": len(data),
                     "seconds": time.perf_counter() - t0}
        log.info("migration: saving %d nodes and %d handles (%d bytes, %.1f ms)",
                 len(state.nodes), len(state.handles), len(data), 1000 * self.last["seconds"])
        return data

    # -- load -----------------------------------------------------------------------

    def load(self, data: bytes) -> None:
        """Decode, check and apply; StateRefused leaves the arena untouched."""
        from shardfs.codec.devstate import StateError, decode
        from shardfs.fs.passthrough.migrate import MigrationError, Share, apply_import, plan_import

        t0 = time.perf_counter()
        s = self.shared
        try:
            state = decode(data, s.cap_nodes - 2, s.cap_handles - 1)
            self._check_init(state.init_flags)
            share = Share.open(self.cfg.shared_dir)
            try:
                plan = plan_import(state, share, self.cfg.migration_on_error)
            finally:
                share.close()
            for why in plan.lost:
                log.error("migration: lost %s; the guest gets errors on it "
                          "(--migration-on-error guest-error)", why)
            # It refuses an arena that is not fresh, before it writes anything.
            apply_import(s, state, plan)
        except (StateError, MigrationError) as e:
            raise StateRefused(str(e)) from None
        self.last = {"direction": "load", "nodes": len(state.nodes),
                     "handles": len(state.handles), "bytes": len(data),
                     "lost": len(plan.lost), "seconds": time.perf_counter() - t0}
        log.info("migration: loaded %d nodes and %d handles (%d lost, %.1f ms)",
                 len(state.nodes), len(state.handles), len(plan.lost),
                 1000 * self.last["seconds"])

    def _check_init(self, flags: int) -> None:
        """The source's session must be one this daemon's options would have
        negotiated (virtiofsd's ``NegotiatedOpts``: writeback, ACLs, ...)."""
        from shardfs.fs.passthrough.migrate import MigrationError
        from shardfs.fs.passthrough.session import InitOptions, wanted_flags

        cfg = self.cfg
        opts = InitOptions(writeback=cfg.writeback, killpriv_v2=cfg.killpriv_v2,
                           posix_acl=cfg.posix_acl, security_label=cfg.security_label,
                           announce_submounts=cfg.announce_submounts,
                           readdirplus=cfg.readdirplus, allow_mmap=cfg.allow_mmap)
        probe = (1 << 64) - 1
        governed = wanted_flags(InitOptions(True, True, True, True, True, True, True), probe)
        missing = flags & governed & ~wanted_flags(opts, probe)
        if missing:
            raise MigrationError(f"the source negotiated FUSE INIT flags {missing:#x} that "
                                 "this daemon's options do not allow (start it with the "
                                 "source's --writeback/--posix-acl/... options)")


class MigrationDevice(Device):
    """The migration half of the supervisor's Device (see the module doc).

    The subclass provides ``workers``, ``rings``, ``owner_index``, ``_call``
    and ``_all``; :attr:`migration` is set by the supervisor per connection.
    """

    migration: Migration | None = None
    workers: list[Any]
    rings: dict[int, Any]

    def _call(self, child: Any, msg: list[Any], fds: list[int] | tuple[int, ...] = ()) -> Any:
        raise NotImplementedError

    def _all(self, msg: list[Any], fds: list[int]) -> None:
        raise NotImplementedError

    def owner_index(self, index: int) -> int:
        raise NotImplementedError

    def _m(self) -> Migration:
        if self.migration is None:
            raise ProtocolError("migration is not set up on this connection")
        return self.migration

    def log_base(self, fd: int, size: int, offset: int) -> None:
        m = self.migration
        if m is None or not 0 < size <= MAX_LOG_BYTES or not 0 <= offset <= MAX_LOG_BYTES:
            os.close(fd)
            raise ProtocolError(f"SET_LOG_BASE of {size} bytes at offset {offset} refused")
        if m.log_fd is not None:
            os.close(m.log_fd)
        m.log_fd, m.log_size, m.log_offset = fd, size, offset
        log.info("dirty log: %d bytes (%d pages of guest memory)", size, size * 8)
        self._all(*m.log_message())

    def log_all(self, enabled: bool) -> None:
        m = self._m()
        m.log_all = enabled
        log.info("dirty logging %s", "on (migration)" if enabled else "off")
        if enabled:
            m.start_premigration()
        else:
            m.end_premigration()  # cancelled or done: the paths would go stale
        msg, _ = m.log_message()
        msg[-1] = False  # the workers keep the log they mapped
        self._all(msg, [])

    def ring_log(self, index: int, log_gpa: int | None, num: int) -> None:
        m = self._m()
        m.ring_logs[index] = [log_gpa, num]
        self._call(self.workers[self.owner_index(index)], ["dirty_ring", index, log_gpa, num])

    def ring_starting(self, index: int, log_gpa: int | None, num: int) -> None:
        """Before a ring (re)starts: its worker learns how to log its used ring."""
        m = self.migration
        if m is not None and (log_gpa is not None or index in m.ring_logs):
            self.ring_log(index, log_gpa, num)

    def replay_log(self, wid: int) -> None:
        """A replacement worker logs as the dead one did, before its rings restart."""
        m = self.migration
        if m is None or (m.log_fd is None and not m.ring_logs):
            return
        self._call(self.workers[wid], *m.log_message())
        for index, (gpa, num) in m.ring_logs.items():
            if self.owner_index(index) == wid:
                self._call(self.workers[wid], ["dirty_ring", index, gpa, num])

    def device_state(self, direction: int, fd: int) -> None:
        m = self.migration
        if m is None:
            os.close(fd)
            raise ProtocolError("migration is not set up on this connection")
        if m.transfer is not None:
            m.transfer.join()
            m.transfer = None
        if self.rings:
            os.close(fd)
            raise ProtocolError(f"rings {sorted(self.rings)} still run; the state moves "
                                "only while the device is suspended")
        if direction == vu.VHOST_TRANSFER_STATE_DIRECTION_SAVE:
            try:
                m.save(fd)
            except OSError as e:
                raise ProtocolError(f"cannot save the device state: {e.strerror or e}") from None
            except (ValueError, StateRefused) as e:
                raise ProtocolError(f"cannot save the device state: {e}") from None
        else:
            m.transfer = Transfer(direction, fd)

    def check_device_state(self) -> bool:
        m = self.migration
        if m is None or m.transfer is None:
            log.error("CHECK_DEVICE_STATE without a transfer")
            return False
        t = m.transfer
        m.transfer = None
        error = t.join()
        if error is not None:
            log.error("migration: %s", error)
            return False
        if t.direction == vu.VHOST_TRANSFER_STATE_DIRECTION_SAVE:
            return True
        try:
            m.load(bytes(t.received))
        except StateRefused as e:
            log.error("migration: cannot load the device state: %s", e)
            return False
        except OSError as e:
            log.error("migration: cannot load the device state: %s", e.strerror or e)
            return False
        try:
            # The session arrived without an INIT here: a later INIT (a guest
            # reboot) must drop it, as it would on the source.
            self._all(["migrated"], [])
        except ProtocolError as e:
            log.warning("migration: %s", e)
        return True
