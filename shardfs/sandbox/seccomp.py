"""seccomp: an allow-list of the system calls a sandboxed shardfs process makes.

Built with libseccomp (``libseccomp.so.2``, which apt itself depends on, so
every Debian has it) through ctypes.  The filter is prepared while the
library file is still reachable and loaded as the very last sandbox step,
when nothing but serving remains.

Modes (``seccomp =`` in the config):

``kill``
    any other system call kills the whole process (SECCOMP_RET_KILL_PROCESS).
    The supervisor sees the death through the pidfd, logs it with the signal
    (SIGSYS, -31) and replaces the worker, as for any crash.
``log``
    any other system call is allowed and logged by the kernel's audit
    (``dmesg``: ``type=1326 ... syscall=N``): for finding what a new code
    path needs before switching to ``kill``.
``none``
    no filter.

The list (:data:`ALLOWED_SYSCALLS`) was taken from ``strace -f`` of the
daemon under the unit, contract, frontend and guest tests, then reasoned
over: the CPython runtime (memory, signals, time, futexes), the data path
(preadv/pwritev on guest memory, eventfds, epoll), the control socket
(sendmsg/recvmsg with SCM_RIGHTS), every FUSE operation the passthrough
implements (the *at calls, xattrs, file handles, fallocate, renameat2,
copy_file_range, syncfs...), and the posix_ipc message queues the DAX
coordinator is to use.  Left out on purpose: process creation (clone,
fork, execve), mount, pivot_root, unshare, setns, ptrace, bpf, kexec,
module loading, keyctl, and every network call but AF_UNIX ``socket``/
``connect`` (a syslog log handler may reconnect to /dev/log).

A new system call on any path makes a process die under ``kill``: add it
here with the reason, and run the guest tests.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket

LIBSECCOMP = "libseccomp.so.2"

#: libseccomp actions (<seccomp.h>).
SCMP_ACT_KILL_PROCESS = 0x8000_0000
SCMP_ACT_LOG = 0x7FFC_0000
SCMP_ACT_ALLOW = 0x7FFF_0000
#: seccomp_attr_set attributes: no_new_privs and thread sync.
SCMP_FLTATR_CTL_NNP = 3
SCMP_FLTATR_CTL_TSYNC = 4
#: struct scmp_arg_cmp operators.
SCMP_CMP_EQ = 4

SECCOMP_MODES = ("kill", "log", "none")
_DEFAULT_ACTION = {"kill": SCMP_ACT_KILL_PROCESS, "log": SCMP_ACT_LOG}

#: Allowed without condition (see the module doc for how the list was made).
ALLOWED_SYSCALLS: tuple[str, ...] = (
    # CPython runtime: memory, signals, time, threads' futexes, exit
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "mlock", "munlock",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigtimedwait", "sigaltstack",
    "restart_syscall", "futex", "set_robust_list", "get_robust_list", "rseq",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
    "sched_yield", "sched_getaffinity", "getrandom", "uname", "sysinfo", "getrusage",
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getgroups",
    "getresuid", "getresgid", "getpgrp", "getpgid", "getsid",
    "getrlimit", "setrlimit", "prlimit64", "prctl", "arch_prctl", "umask",
    # the credentials switch keeps DAC capabilities effective under a guest
    # fsuid; capset can only move capabilities within the permitted set
    "capget", "capset",
    "exit", "exit_group",
    # file descriptors and I/O, the data path included
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "preadv2", "pwritev2", "lseek", "close", "close_range", "dup", "dup2", "dup3",
    "fcntl", "ioctl", "pipe2", "eventfd2", "select", "pselect6", "poll", "ppoll",
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2",
    "sendmsg", "recvmsg", "sendto", "recvfrom", "connect", "shutdown", "getsockopt",
    "getsockname", "getpeername",
    # posix_ipc message queues (workers <-> DAX coordinator)
    "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify",
    "mq_getsetattr",
    # the passthrough's filesystem calls
    "open", "openat", "openat2", "creat", "stat", "fstat", "lstat", "newfstatat", "statx",
    "statfs", "fstatfs", "access", "faccessat", "faccessat2", "readlink", "readlinkat",
    "getdents64", "getcwd", "chdir", "fchdir", "mkdir", "mkdirat", "mknod", "mknodat",
    "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2", "link", "linkat",
    "symlink", "symlinkat", "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown",
    "lchown", "fchownat", "truncate", "ftruncate", "fallocate", "fadvise64", "readahead",
    "fsync", "fdatasync", "sync_file_range", "syncfs", "flock", "utimensat", "futimesat",
    "utimes", "utime", "copy_file_range",
    "name_to_handle_at", "open_by_handle_at", "setfsuid", "setfsgid", "setgroups",
    # the per-request credential switch (fs/passthrough/creds.py) adjusts
    # effective capabilities within the permitted set
    "capset",
    "getxattr", "lgetxattr", "fgetxattr", "setxattr", "lsetxattr", "fsetxattr",
    "listxattr", "llistxattr", "flistxattr", "removexattr", "lremovexattr", "fremovexattr",
    "getxattrat", "setxattrat", "listxattrat", "removexattrat",
)



class _ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp."""

    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class SeccompError(OSError):
    """The filter could not be built or loaded."""


class _Lib:
    lib: ctypes.CDLL

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(_ArgCmp)]


class SeccompFilter:
    """A prepared filter: :meth:`load` applies it to this process, for good.

    Preparing resolves names and builds the rules (it needs the library
    file, so it happens before the sandbox hides it); names this libseccomp
    does not know are skipped, so a newer list runs on an older system.
    """

    def __init__(self, mode: str, allowed: tuple[str, ...] = ALLOWED_SYSCALLS) -> None:
        if mode not in _DEFAULT_ACTION:
            raise ValueError(f"seccomp mode {mode!r} builds no filter")
        try:
            self._lib = _Lib(ctypes.CDLL(LIBSECCOMP, use_errno=True))
        except OSError as e:
            raise SeccompError(errno.ENOENT, f"{LIBSECCOMP} not found (apt-get install "
                               f"libseccomp2, or set seccomp = none): {e}") from None
        lib = self._lib.lib
        self._ctx = lib.seccomp_init(_DEFAULT_ACTION[mode])
        if not self._ctx:
            raise SeccompError(errno.ENOMEM, "seccomp_init failed")
        self._rc(lib.seccomp_attr_set(self._ctx, SCMP_FLTATR_CTL_NNP, 1), "attr NNP")
        self.unknown: list[str] = []
        for name in dict.fromkeys(allowed):
            self._allow(name)
        # Allowed only with this first argument: socket(AF_UNIX) for a syslog
        # handler that reconnects; kill/tgkill only of ourselves (abort(),
        # faulthandler), never of another process.
        pid = os.getpid()
        self._allow("socket", (0, socket.AF_UNIX))
        self._allow("kill", (0, pid))
        self._allow("tgkill", (0, pid))

    def _allow(self, name: str, arg0: tuple[int, int] | None = None) -> None:
        lib = self._lib.lib
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            self.unknown.append(name)
            return
        if arg0 is None:
            rc = lib.seccomp_rule_add_array(self._ctx, SCMP_ACT_ALLOW, nr, 0, None)
        else:
            cmp = (_ArgCmp * 1)(_ArgCmp(arg0[0], SCMP_CMP_EQ, arg0[1], 0))
            rc = lib.seccomp_rule_add_array(self._ctx, SCMP_ACT_ALLOW, nr, 1, cmp)
        self._rc(rc, f"rule {name}")

    def _rc(self, rc: int, what: str) -> None:
        if rc < 0:
            self.release()
            raise SeccompError(-rc, f"seccomp: {what}: {os.strerror(-rc)}")

    def load(self) -> None:
        """Apply the filter to this process (irreversible) and free it."""
        try:
            self._rc(self._lib.lib.seccomp_load(self._ctx), "load")
        finally:
            self.release()

    def release(self) -> None:
        if self._ctx:
            self._lib.lib.seccomp_release(self._ctx)
            self._ctx = None
