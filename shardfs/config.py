"""Configuration: ``config/shardfs.toml`` merged with command-line flags.

Every field is declared once, as an annotated attribute of :class:`Config`
with its default (:data:`FIELDS` lists them), so the TOML loader, the CLI
and the error messages agree.  Any problem is a :class:`ConfigError` whose
message is one line naming the field, e.g.
``config: num_request_queues: must be between 1 and 64, got 0``.
Flag names follow virtiofsd where one exists (``--socket-path``,
``--shared-dir``, ``--cache``...).
"""

from __future__ import annotations

import grp
import os
from typing import Any

from shardfs.abi.capability import CAP_DAC_READ_SEARCH, parse_modcaps
from shardfs.abi.fuse import FUSE_DAX_SHIFT
from shardfs.abi.vhost_user import ProtocolFeature
from shardfs.abi.virtio import VIRTIO_FS_TAG_MAX

CACHE_POLICIES = ("never", "metadata", "auto", "always")
#: virtiofsd's level names, plus "warning" (shardfs's older spelling of "warn").
LOG_LEVELS = ("error", "warn", "warning", "info", "debug", "trace", "off")
#: virtiofsd's ``--inode-file-handles`` values (see README "Using shardfs in place of virtiofsd").
INODE_FILE_HANDLES = ("never", "prefer", "mandatory")
#: virtiofsd's ``--migration-mode`` and ``--migration-on-error`` values.
MIGRATION_MODES = ("find-paths", "file-handles")
MIGRATION_ON_ERROR = ("abort", "guest-error")
#: One user-namespace id range: (id inside, id outside, count), as /proc/PID/uid_map.
NsRange = tuple[int, int, int]
#: Ids are 32-bit; (u32)-1 is "no id" and is never mapped.
MAX_ID = 0xFFFF_FFFE
#: shardfs.sandbox.SANDBOX_MODES and SECCOMP_MODES (config sits below sandbox).
SANDBOX_MODES = ("namespace", "chroot", "none")
SECCOMP_MODES = ("kill", "log", "none")
LOG_TARGETS = ("stderr", "syslog")
#: What ``locks`` may name (README "Semantics", shardfs.proc.locks).
LOCK_KINDS = ("posix", "flock")
#: More queues than this buys nothing on any machine we know of.
MAX_REQUEST_QUEUES = 64


#: Polling longer than this is a busy loop, not a latency trade.
MAX_POLL_US = 100_000
#: The DAX window is cut into the guest driver's 2 MiB ranges (fs/fuse/dax.c),
#: so it is a multiple of that; 1 TiB bounds a typo, not a real need.
DAX_WINDOW_UNIT = 1 << FUSE_DAX_SHIFT
MAX_DAX_WINDOW = 1 << 40
#: The SHMEM protocol feature bit: 21 for alioth and rust-vmm 0.16, 22 in QEMU
#: master (DESIGN §3); any bit above DEVICE_STATE, the last one shardfs offers.
DEFAULT_SHMEM_BIT = ProtocolFeature.SHMEM
MIN_SHMEM_BIT = ProtocolFeature.DEVICE_STATE + 1
MAX_SHMEM_BIT = 63
#: A cache timeout longer than a year is a typo.
MAX_TIMEOUT_S = 365 * 86400.0


class ConfigError(Exception):
    """A bad setting; ``str()`` is one line that names the field."""


class Config:
    """Every setting; the annotated class attributes are the fields and their defaults.

    A plain class, not a dataclass: ``dataclasses`` imports ``inspect`` (and
    ``ast``, ``dis``), about 0.86 MB in every daemon process.  Instances are
    mutable (the loader and the command line assign fields) and compare by value.
    """

    socket_path: str | None = None
    fd: int | None = None
    shared_dir: str = ""
    tag: str | None = None
    num_request_queues: int = 1
    cache: str = "auto"
    writeback: bool = False
    #: Off by default, as virtiofsd: a launcher that passes no --xattr gets none.
    xattr: bool = False
    log_level: str = "info"
    #: Exit when the frontend disconnects, as virtiofsd does (the shipped TOML,
    #: for a standing service, waits for the next connection instead).
    once: bool = True
    #: Adaptive polling: microseconds a worker watches its rings before sleeping.
    poll_us: int = 50
    #: The status socket; by default the vhost-user socket path plus ".stats".
    stats_socket: str | None = None
    #: Group that may connect to the vhost-user socket (mode 0660), as virtiofsd.
    socket_group: str | None = None
    #: stderr | syslog
    log_target: str = "stderr"
    #: namespace | chroot | none: how workers are confined (shardfs.sandbox).
    sandbox: str = "namespace"
    #: kill | log | none: the system-call allow-list (shardfs.sandbox.seccomp).
    seccomp: str = "kill"
    #: None sizes the budgets from RLIMIT_NOFILE (see fs.passthrough.fs_budgets).
    max_nodes: int | None = None
    max_handles: int | None = None
    #: Refuse every modification with EROFS (shardfs.fs.readonly).
    readonly: bool = False
    #: Guest <-> host id maps, e.g. "map:1000:5000:10" (shardfs.fs.idmap).
    translate_uid: str | None = None
    translate_gid: str | None = None
    #: xattr name rules, virtiofsd syntax (shardfs.fs.xattrmap).
    xattrmap: str | None = None
    #: POSIX ACLs (FUSE_POSIX_ACL); needs xattr.
    posix_acl: bool = False
    #: The daemon clears setuid/setgid on write/truncate (FUSE_HANDLE_KILLPRIV_V2).
    killpriv_v2: bool = False
    #: Label new inodes with the guest's security context (FUSE_SECURITY_CTX).
    security_label: bool = False
    #: Pass a guest's O_DIRECT on to the host open.
    allow_direct_io: bool = False
    #: Bytes of the DAX window (FUSE_SETUPMAPPING through vhost-user SHMEM); 0 = off.
    dax_window: int = 0
    #: Which protocol feature bit means SHMEM (see DEFAULT_SHMEM_BIT).
    shmem_bit: int = DEFAULT_SHMEM_BIT
    # --- virtiofsd options (shardfs.compat) -------------------------------------------
    #: User-namespace id maps (--uid-map/--gid-map ":inside:outside:count:"), applied
    #: with newuidmap/newgidmap when an unprivileged user runs the namespace sandbox.
    uid_map: tuple[NsRange, ...] = ()
    gid_map: tuple[NsRange, ...] = ()
    #: RLIMIT_NOFILE to set (soft and hard) before forking; 0 leaves it unchanged;
    #: None is virtiofsd's default, min(1,000,000, fs.nr_open) where permitted.
    rlimit_nofile: int | None = None
    #: Accepted for virtiofsd's command line; shardfs has no thread pool (requests
    #: run in one process per queue), so this does not change what the guest sees.
    thread_pool_size: int = 0
    #: virtiofsd's capability edits for the sandboxed processes, e.g. "+sys_admin:-chown".
    modcaps: str | None = None
    #: never | prefer | mandatory (virtiofsd's --inode-file-handles).
    inode_file_handles: str = "never"
    #: Tell the guest which directories are mount points (FUSE_SUBMOUNTS), as virtiofsd.
    announce_submounts: bool = True
    #: Offer READDIRPLUS (virtiofsd's --no-readdirplus turns it off).
    readdirplus: bool = True
    #: Let the guest mmap files under cache=never/metadata (FUSE_DIRECT_IO_ALLOW_MMAP).
    allow_mmap: bool = False
    #: Keep a guest's O_NOATIME on host opens (virtiofsd strips it unless asked).
    preserve_noatime: bool = False
    #: Entry and attr timeout overriding the cache policy's (the C virtiofsd's -o timeout=).
    cache_timeout_s: float | None = None
    #: Live-migration settings (virtiofsd's names); see README "Migration".
    migration_mode: str = "find-paths"
    migration_on_error: str = "abort"
    migration_verify_handles: bool = False
    migration_confirm_paths: bool = False
    #: Host-visible file locks (shardfs.proc.locks): "none", "posix", "flock" or
    #: "posix,flock"; off by default, as virtiofsd.
    locks: str = "none"

    def __init__(self, **values: Any) -> None:
        for name in values:
            if name not in FIELDS:
                raise TypeError(f"Config.__init__() got an unexpected keyword argument {name!r}")
        for name, default in FIELDS.items():
            setattr(self, name, values.get(name, default))

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # compared by value, and mutable

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in FIELDS) + ")"

    def validate(self) -> Config:
        if self.socket_path is None and self.fd is None:
            raise ConfigError("config: socket_path: set socket_path or fd")
        if self.socket_path is not None and self.fd is not None:
            raise ConfigError("config: fd: give socket_path or fd, not both")
        if self.fd is not None and self.socket_group is not None:
            raise ConfigError("config: socket_group: not with fd (whoever passes the fd "
                              "owns the socket's permissions), as virtiofsd")
        if self.fd is not None and self.fd < 0:
            raise ConfigError(f"config: fd: must be a non-negative fd number, got {self.fd}")
        if not self.shared_dir:
            raise ConfigError("config: shared_dir: is required")
        if os.path.exists(self.shared_dir) and not os.path.isdir(self.shared_dir):
            raise ConfigError(f"config: shared_dir: {self.shared_dir!r} is not a directory")
        if self.tag is not None and not 0 < len(self.tag.encode()) <= VIRTIO_FS_TAG_MAX:
            raise ConfigError(f"config: tag: must be 1 to {VIRTIO_FS_TAG_MAX} bytes, "
                              f"got {self.tag!r}")
        if not 1 <= self.num_request_queues <= MAX_REQUEST_QUEUES:
            raise ConfigError(f"config: num_request_queues: must be between 1 and "
                              f"{MAX_REQUEST_QUEUES}, got {self.num_request_queues}")
        if self.cache not in CACHE_POLICIES:
            raise ConfigError(f"config: cache: must be one of {', '.join(CACHE_POLICIES)}, "
                              f"got {self.cache!r}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"config: log_level: must be one of {', '.join(LOG_LEVELS)}, "
                              f"got {self.log_level!r}")
        if self.log_target not in LOG_TARGETS:
            raise ConfigError(f"config: log_target: must be one of {', '.join(LOG_TARGETS)}, "
                              f"got {self.log_target!r}")
        if self.socket_group is not None:
            try:
                grp.getgrnam(self.socket_group)
            except KeyError:
                raise ConfigError(f"config: socket_group: no group named "
                                  f"{self.socket_group!r}") from None
        if self.sandbox not in SANDBOX_MODES:
            raise ConfigError(f"config: sandbox: must be one of {', '.join(SANDBOX_MODES)}, "
                              f"got {self.sandbox!r}")
        if self.seccomp not in SECCOMP_MODES:
            raise ConfigError(f"config: seccomp: must be one of {', '.join(SECCOMP_MODES)}, "
                              f"got {self.seccomp!r}")
        if not 0 <= self.poll_us <= MAX_POLL_US:
            raise ConfigError(f"config: poll_us: must be between 0 and {MAX_POLL_US}, "
                              f"got {self.poll_us}")
        for name in ("max_nodes", "max_handles"):
            value = getattr(self, name)
            if value is not None and value < 16:
                raise ConfigError(f"config: {name}: must be at least 16")
        if self.posix_acl and not self.xattr:
            raise ConfigError("config: posix_acl: needs xattr = true (ACLs are xattrs)")
        if self.security_label and not self.xattr:
            raise ConfigError("config: security_label: needs xattr = true (labels are xattrs)")
        if self.xattrmap is not None and not self.xattr:
            raise ConfigError("config: xattrmap: needs xattr = true")
        for name in ("translate_uid", "translate_gid", "xattrmap"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ConfigError(f"config: {name}: is empty (leave it out instead)")
        # The syntax of the maps is checked by their parsers (cli.check_fs_options).
        if (not 0 <= self.dax_window <= MAX_DAX_WINDOW
                or self.dax_window % DAX_WINDOW_UNIT):
            raise ConfigError(f"config: dax_window: must be 0 (off) or a multiple of "
                              f"{DAX_WINDOW_UNIT} bytes up to {MAX_DAX_WINDOW}, "
                              f"got {self.dax_window}")
        self._validate_virtiofsd_options()
        if not MIN_SHMEM_BIT <= self.shmem_bit <= MAX_SHMEM_BIT:
            raise ConfigError(f"config: shmem_bit: must be between {MIN_SHMEM_BIT} and "
                              f"{MAX_SHMEM_BIT}, got {self.shmem_bit}")
        return self

    def _validate_virtiofsd_options(self) -> None:
        for name, ranges in (("uid_map", self.uid_map), ("gid_map", self.gid_map)):
            check_ns_ranges(name, ranges)
        if self.rlimit_nofile is not None and self.rlimit_nofile < 0:
            raise ConfigError(f"config: rlimit_nofile: must be 0 (unchanged) or a positive "
                              f"number of fds, got {self.rlimit_nofile}")
        if self.thread_pool_size < 0:
            raise ConfigError(f"config: thread_pool_size: must be 0 or more, "
                              f"got {self.thread_pool_size}")
        choices: tuple[tuple[str, tuple[str, ...]], ...] = (
            ("inode_file_handles", INODE_FILE_HANDLES), ("migration_mode", MIGRATION_MODES),
            ("migration_on_error", MIGRATION_ON_ERROR))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config: {name}: must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        if self.cache_timeout_s is not None and not 0 <= self.cache_timeout_s <= MAX_TIMEOUT_S:
            raise ConfigError(f"config: cache_timeout_s: must be between 0 and "
                              f"{MAX_TIMEOUT_S:.0f} seconds, got {self.cache_timeout_s}")
        self._validate_modcaps()
        self.lock_kinds()
        if self.posix_acl and (self.translate_uid or self.translate_gid):
            # As virtiofsd: ACL entries name host ids the translation would not rewrite.
            raise ConfigError("config: posix_acl: cannot be combined with translate_uid or "
                              "translate_gid (ACL entries would keep untranslated ids)")

    def lock_kinds(self) -> frozenset[str]:
        """The lock kinds ``locks`` names: a subset of {"posix", "flock"}."""
        words = [w.strip() for w in self.locks.split(",")]
        if words == ["none"]:
            return frozenset()
        if not words or any(w not in LOCK_KINDS for w in words):
            raise ConfigError(f"config: locks: must be none, posix, flock or posix,flock, "
                              f"got {self.locks!r}")
        return frozenset(words)

    def _validate_modcaps(self) -> None:
        """Names as virtiofsd's ``--modcaps`` takes them; and CAP_DAC_READ_SEARCH
        stays where file handles are opened: with ``inode_file_handles`` other
        than never (virtiofsd refuses that too), or where other workers or the
        DAX coordinator reopen nodes by handle (more than one queue, DAX)."""
        if self.modcaps is None:
            return
        try:
            items = parse_modcaps(self.modcaps)
        except ValueError as e:
            raise ConfigError(f"config: modcaps: {e}") from None
        dropped = [add for add, cap in items if cap == CAP_DAC_READ_SEARCH][-1:] == [False]
        if dropped and self.inode_file_handles != "never":
            raise ConfigError(f"config: modcaps: cannot drop dac_read_search with "
                              f"inode_file_handles = {self.inode_file_handles}")
        if dropped and (self.num_request_queues > 1 or self.dax_window):
            raise ConfigError("config: modcaps: cannot drop dac_read_search with more than "
                              "one request queue or DAX (nodes are reopened by file handle)")

    def status_socket(self) -> str:
        """Where the status socket lives: ``stats_socket``, next to ``socket_path``, or
        for a daemon handed its socket by ``fd`` alone, :func:`default_stats_socket`."""
        if self.stats_socket:
            return self.stats_socket
        if self.socket_path:
            return f"{self.socket_path}.stats"
        return default_stats_socket(os.getpid())


def runtime_dir() -> str:
    """``/run/shardfs`` for root; ``$XDG_RUNTIME_DIR/shardfs``, else ``/tmp/shardfs-UID``,
    for a user (the daemon makes it mode 0700 and refuses one it does not own)."""
    if os.geteuid() == 0:
        return "/run/shardfs"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "shardfs") if xdg else f"/tmp/shardfs-{os.geteuid()}"


def default_stats_socket(pid: int) -> str:
    """The status socket of the daemon whose supervisor is ``pid``, when it has no
    socket path to sit beside (``--fd`` from libvirt or Kata)."""
    return os.path.join(runtime_dir(), f"stats-{pid}.sock")


#: Every field of :class:`Config` and its default, in declaration order.
FIELDS: dict[str, Any] = {name: getattr(Config, name) for name in Config.__annotations__}
_TYPES: dict[str, tuple[type, ...]] = {
    "socket_path": (str,), "fd": (int,), "shared_dir": (str,), "tag": (str,),
    "num_request_queues": (int,), "cache": (str,), "writeback": (bool,), "xattr": (bool,),
    "log_level": (str,), "once": (bool,), "max_nodes": (int,), "max_handles": (int,),
    "poll_us": (int,), "stats_socket": (str,), "socket_group": (str,), "log_target": (str,),
    "sandbox": (str,), "seccomp": (str,),
    "readonly": (bool,), "translate_uid": (str,), "translate_gid": (str,), "xattrmap": (str,),
    "posix_acl": (bool,), "killpriv_v2": (bool,), "security_label": (bool,),
    "allow_direct_io": (bool,), "dax_window": (int,), "shmem_bit": (int,),
    "uid_map": (list,), "gid_map": (list,), "rlimit_nofile": (int,), "thread_pool_size": (int,),
    "modcaps": (str,), "inode_file_handles": (str,), "announce_submounts": (bool,),
    "readdirplus": (bool,), "allow_mmap": (bool,), "preserve_noatime": (bool,),
    "cache_timeout_s": (float, int), "migration_mode": (str,), "migration_on_error": (str,),
    "migration_verify_handles": (bool,), "migration_confirm_paths": (bool,),
    "locks": (str,),
}


def parse_ns_range(text: str) -> NsRange:
    """One virtiofsd ``--uid-map`` value, ``:inside:outside:count:``; ValueError if bad.

    The delimiter is the first character, as in virtiofsd (``:`` in practice),
    and the value must end with it.
    """
    if len(text) < 2 or text[-1] != text[0]:
        raise ValueError(f"{text!r} is not of the form :inside:outside:count:")
    parts = text[1:-1].split(text[0])
    if len(parts) != 3:
        raise ValueError(f"{text!r} is not of the form :inside:outside:count:")
    try:
        inside, outside, count = (int(p, 10) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r}: ids and count must be decimal numbers") from None
    return inside, outside, count


def check_ns_ranges(name: str, ranges: tuple[NsRange, ...]) -> None:
    """Each range within 32-bit ids and non-empty; no two overlapping inside or outside.

    The kernel refuses overlapping extents in ``uid_map`` (user_namespaces(7));
    catching it here names the field instead of failing in newuidmap.
    """
    seen: list[NsRange] = []
    for inside, outside, count in ranges:
        if count < 1 or min(inside, outside) < 0 or max(inside, outside) + count - 1 > MAX_ID:
            raise ConfigError(f"config: {name}: range :{inside}:{outside}:{count}: is empty or "
                              f"beyond the 32-bit ids")
        for i2, o2, c2 in seen:
            if (inside < i2 + c2 and i2 < inside + count
                    or outside < o2 + c2 and o2 < outside + count):
                raise ConfigError(f"config: {name}: range :{inside}:{outside}:{count}: overlaps "
                                  f":{i2}:{o2}:{c2}:")
        seen.append((inside, outside, count))


def coerce(name: str, value: Any, source: str = "config", from_cli: bool = False) -> Any:
    """Check one value's type (TOML) or parse it (command-line strings)."""
    if name not in FIELDS:
        raise ConfigError(f"{source}: {name}: unknown field")
    types = _TYPES[name]
    if types[0] is list:
        return _coerce_ns_ranges(name, value, source)
    if types[0] is float and isinstance(value, str) and from_cli:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{source}: {name}: expected a number, got {value!r}") from None
    if types[0] is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if from_cli and isinstance(value, str) and types[0] is not str:
        if types[0] is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{source}: {name}: expected true or false, got {value!r}")
        try:
            return int(value, 0)
        except ValueError:
            raise ConfigError(f"{source}: {name}: expected an integer, got {value!r}") from None
    if types[0] is int and isinstance(value, bool):
        raise ConfigError(f"{source}: {name}: expected an integer, got {value!r}")
    if not isinstance(value, types):
        raise ConfigError(f"{source}: {name}: expected {types[0].__name__}, got {value!r}")
    return value


def _coerce_ns_ranges(name: str, value: Any, source: str) -> tuple[NsRange, ...]:
    """A list of ``:inside:outside:count:`` strings (TOML, or repeated flags)."""
    if isinstance(value, tuple) and all(isinstance(r, tuple) for r in value):
        return value
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{source}: {name}: expected a list of \":inside:outside:count:\" "
                          f"strings, got {value!r}")
    try:
        return tuple(parse_ns_range(i) for i in items)
    except ValueError as e:
        raise ConfigError(f"{source}: {name}: {e}") from None


def load(path: str | None, overrides: dict[str, Any]) -> Config:
    """Read ``path`` (if any), apply ``overrides`` (already coerced), validate."""
    cfg = Config()
    explicit: set[str] = set()
    if path is not None:
        # Imported only when a file is named: a launcher's command line never
        # needs it, and the daemon's children would carry it (about 1 MB).
        import tomllib

        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"config: {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {path}: {e}") from None
        # Settings live in a [shardfs] table, or at the top level of a file without one.
        section = data.pop("shardfs", None) if "shardfs" in data else data
        if not isinstance(section, dict):
            raise ConfigError(f"config {path}: shardfs: must be a table")
        for key in data if section is not data else ():
            raise ConfigError(f"config {path}: {key}: unknown field (settings go in [shardfs])")
        for key, value in section.items():
            setattr(cfg, key, coerce(key, value, f"config {path}"))
            explicit.add(key)
    # The two ways to get a socket exclude each other: a flag picks one.
    if "fd" in overrides:
        cfg.socket_path = None
    if "socket_path" in overrides:
        cfg.fd = None
    for key, value in overrides.items():
        setattr(cfg, key, value)
    explicit.update(overrides)
    # As virtiofsd: --posix-acl and --security-label imply --xattr, unless xattrs
    # were turned off by name (then validate() says the two conflict).
    if (cfg.posix_acl or cfg.security_label) and "xattr" not in explicit:
        cfg.xattr = True
    return cfg.validate()
