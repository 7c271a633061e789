"""The option table: every command-line flag shardfs accepts, in one place.

Each :class:`Option` names the :class:`~shardfs.config.Config` field it
sets, how it is spelled (virtiofsd 1.13's spelling wherever virtiofsd has
the option), and -- for virtiofsd's options -- what it does in shardfs.
The parser (:mod:`shardfs.compat.parse`) and the README's side-by-side
table are both made from this, so they cannot drift apart.

Kinds:

``flag``
    a boolean, virtiofsd style: bare ``--xattr`` turns it on and
    ``--no-xattr`` off (so virtiofsd's ``--no-readdirplus``,
    ``--no-killpriv-v2`` and ``--no-announce-submounts`` all exist);
    shardfs's older ``--xattr=true|false`` (and ``--xattr false``) still work.
``value``
    ``--opt VALUE`` or ``--opt=VALUE``.
``list``
    repeatable (``--uid-map`` given once per range).
"""

from __future__ import annotations

from typing import NamedTuple

#: Where an option comes from, for the README table.
VIRTIOFSD = "virtiofsd"
SHARDFS = "shardfs"


class Option(NamedTuple):
    """One command-line option.

    ``field`` is the Config field it sets.  ``effect`` says, for a virtiofsd
    option, what shardfs does with it when that differs from virtiofsd or
    needs saying; empty when it behaves exactly as virtiofsd's.
    """

    flag: str
    field: str
    kind: str
    help: str
    origin: str = VIRTIOFSD
    effect: str = ""
    #: How the value is shown in --help and the README.
    metavar: str = "VALUE"
    #: The default as the README shows it, when the Config default does not say it.
    default_text: str = ""


OPTIONS: tuple[Option, ...] = (
    # -- the socket and the share ---------------------------------------------------------
    Option("--shared-dir", "shared_dir", "value", "host directory to share", metavar="DIR"),
    Option("--tag", "tag", "value", "mount tag advertised through the vhost-user CONFIG "
           "feature", metavar="TAG"),
    Option("--socket-path", "socket_path", "value", "vhost-user Unix socket to listen on",
           metavar="PATH"),
    Option("--socket-group", "socket_group", "value",
           "group allowed to connect to the socket (mode 0660)", metavar="GROUP"),
    Option("--fd", "fd", "value", "an already listening Unix socket fd (from libvirt, Kata)",
           effect="with no socket path the stats socket is "
           "/run/shardfs/stats-PID.sock (root) or $XDG_RUNTIME_DIR/shardfs/stats-PID.sock",
           metavar="FD"),
    # -- semantics --------------------------------------------------------------------------
    Option("--cache", "cache", "value", "caching policy: auto | always | never | metadata",
           metavar="POLICY"),
    Option("--xattr", "xattr", "flag", "serve extended attributes (off by default)"),
    Option("--posix-acl", "posix_acl", "flag", "POSIX ACLs (implies --xattr)"),
    Option("--xattrmap", "xattrmap", "value", "xattr name rules, virtiofsd syntax",
           metavar="RULES"),
    Option("--security-label", "security_label", "flag",
           "label new inodes with the guest's security context (implies --xattr)"),
    Option("--readonly", "readonly", "flag", "refuse every modification with EROFS"),
    Option("--writeback", "writeback", "flag", "let the guest cache writes"),
    Option("--allow-direct-io", "allow_direct_io", "flag",
           "honour a guest's O_DIRECT on host opens"),
    Option("--allow-mmap", "allow_mmap", "flag",
           "allow shared mmap under --cache never|metadata"),
    Option("--readdirplus", "readdirplus", "flag", "offer READDIRPLUS (on by default; "
           "virtiofsd spells only --no-readdirplus)"),
    Option("--announce-submounts", "announce_submounts", "flag",
           "tell the guest which directories are mount points (on by default)"),
    Option("--killpriv-v2", "killpriv_v2", "flag",
           "FUSE_HANDLE_KILLPRIV_V2 (off by default)"),
    Option("--preserve-noatime", "preserve_noatime", "flag",
           "keep a guest's O_NOATIME on host opens"),
    Option("--inode-file-handles", "inode_file_handles", "value",
           "never | prefer | mandatory (bare: prefer)",
           effect="shardfs always records a file handle with each node, because "
           "workers on other queues reopen nodes by handle; never and prefer keep an O_PATH "
           "fd per node too (never is served as prefer), mandatory refuses a share "
           "whose filesystem has no file handles", metavar="WHEN"),
    Option("--translate-uid", "translate_uid", "list",
           "guest<->host uid translation, e.g. map:1000:5000:10 (repeatable)", metavar="RULE"),
    Option("--translate-gid", "translate_gid", "list",
           "guest<->host gid translation (repeatable)", metavar="RULE"),
    # -- sandbox and limits -----------------------------------------------------------------
    Option("--sandbox", "sandbox", "value", "namespace | chroot | none", metavar="MODE"),
    Option("--seccomp", "seccomp", "value", "none | kill | log | trap",
           effect="trap is served as kill: the process ends on a call outside the list "
           "(virtiofsd's trap handler logs the call, then exits too)", metavar="ACTION"),
    Option("--modcaps", "modcaps", "value", "modify the capabilities the sandboxed "
           "processes keep, e.g. +sys_admin:-chown", metavar="CAPS"),
    Option("--uid-map", "uid_map", "list",
           "user-namespace uid range :inside:outside:count: (repeatable)", metavar=":IN:OUT:N:"),
    Option("--gid-map", "gid_map", "list",
           "user-namespace gid range :inside:outside:count: (repeatable)", metavar=":IN:OUT:N:"),
    Option("--rlimit-nofile", "rlimit_nofile", "value",
           "RLIMIT_NOFILE to set; 0 leaves it unchanged",
           default_text="min(1,000,000, fs.nr_open) where permitted, else the hard limit",
           metavar="N"),
    Option("--thread-pool-size", "thread_pool_size", "value",
           "accepted for compatibility; shardfs has no thread pool",
           effect="accepted and has no effect: shardfs serves each request queue in its own "
           "process, requests on a queue in order; scale with --num-request-queues", metavar="N"),
    # -- logging ----------------------------------------------------------------------------
    Option("--log-level", "log_level", "value", "error | warn | info | debug | trace | off",
           effect="trace logs as debug", metavar="LEVEL"),
    # -- migration (see README "Migration") --------------------------------------------------
    Option("--migration-mode", "migration_mode", "value", "find-paths | file-handles",
           effect="as virtiofsd (the source's setting); find-paths reads each path from "
           "the live inode at switch-over, so host renames before it are followed too",
           metavar="MODE"),
    Option("--migration-on-error", "migration_on_error", "value", "abort | guest-error",
           effect="as virtiofsd on the destination; on the source, abort also fails the "
           "save when a node cannot be located, so the source serves on", metavar="ACTION"),
    Option("--migration-verify-handles", "migration_verify_handles", "flag",
           "check file handles on the destination",
           effect="as virtiofsd (find-paths: the destination compares each file handle)"),
    Option("--migration-confirm-paths", "migration_confirm_paths", "flag",
           "re-check paths at switch-over",
           effect="accepted; always so in shardfs (paths are read at switch-over)"),
    # -- shardfs's own ----------------------------------------------------------------------
    Option("--num-request-queues", "num_request_queues", "value",
           "request queues, one worker process each", SHARDFS, metavar="N"),
    Option("--once", "once", "flag", "exit when the frontend disconnects (virtiofsd's "
           "behaviour); --no-once waits for the next frontend", SHARDFS),
    Option("--poll-us", "poll_us", "value",
           "microseconds a worker watches its rings before sleeping (50)", SHARDFS, metavar="US"),
    Option("--stats-socket", "stats_socket", "value", "status socket path", SHARDFS,
           metavar="PATH"),
    Option("--log-target", "log_target", "value", "stderr | syslog", SHARDFS, metavar="TARGET"),
    Option("--dax-window", "dax_window", "value",
           "bytes of the DAX window, a multiple of 2 MiB (0 = off)", SHARDFS, metavar="BYTES"),
    Option("--shmem-bit", "shmem_bit", "value",
           "protocol feature bit of vhost-user SHMEM: 21 or 22", SHARDFS, metavar="BIT"),
    Option("--max-nodes", "max_nodes", "value", "node budget per worker", SHARDFS, metavar="N"),
    Option("--max-handles", "max_handles", "value", "open file budget per worker", SHARDFS,
           metavar="N"),
    Option("--cache-timeout-s", "cache_timeout_s", "value",
           "entry and attr timeout overriding the cache policy's (seconds)", SHARDFS,
           metavar="SECONDS"),
    Option("--locks", "locks", "value",
           "host-visible file locks: none | posix | flock | posix,flock (README "
           "\"Semantics\")", SHARDFS, metavar="KINDS"),
)

#: Flags with a fixed meaning that set no single field (handled by the parser).
SPECIAL_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--socket", "virtiofsd", "deprecated name of --socket-path"),
    ("--syslog", "virtiofsd", "log to syslog instead of stderr"),
    ("-o", "virtiofsd", "the legacy list: source=DIR, cache=none|auto|always|metadata, "
     "sandbox=, modcaps=, xattrmap=, [no_]xattr, [no_]posix_acl, [no_]security_label, "
     "[no_]writeback, [no_]readdirplus, announce_submounts, [no_]allow_direct_io, "
     "[no_]killpriv_v2, [no_]flock, [no_]posix_lock (host-visible locks, as --locks); also "
     "the C daemon's log_level=, timeout= (entry and attr timeout), norace, debug, "
     "vhost_user_socket="),
    ("-d", "virtiofsd", "deprecated: --log-level debug"),
    ("-f", "virtiofsd", "deprecated, no effect (shardfs never daemonizes)"),
    ("--print-capabilities", "virtiofsd", "print the vhost-user backend JSON and exit"),
    ("-V, --version", "virtiofsd", "print the version and exit"),
    ("--config", SHARDFS, "TOML config file; flags override it"),
)

BY_FIELD = {o.field: o for o in OPTIONS}
