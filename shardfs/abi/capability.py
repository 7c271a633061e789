"""The capability ABI of ``<linux/capability.h>``, named as there.

Two layers call capget(2)/capset(2): the passthrough filesystem, which
moves capabilities in and out of the effective set around a caller's fsuid
(``fs/passthrough/creds.py``), and the sandbox, which drops the ones a
worker never needs (``sandbox/caps.py``).  Both take the numbers and the
version-3 structures from here, and the configuration checks the names of
``modcaps`` against :data:`CAPABILITY_NUMBERS` (every capability up to
``CAP_LAST_CAP`` of Linux 6.12's header).
"""

from __future__ import annotations

import ctypes

_LINUX_CAPABILITY_VERSION_3 = 0x2008_0522
#: Version 3 carries 64 capability bits in two ``__user_cap_data_struct``s.
_LINUX_CAPABILITY_U32S_3 = 2

CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_FOWNER = 3
CAP_FSETID = 4
CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_LINUX_IMMUTABLE = 9
CAP_NET_BIND_SERVICE = 10
CAP_NET_BROADCAST = 11
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_IPC_LOCK = 14
CAP_IPC_OWNER = 15
CAP_SYS_MODULE = 16
CAP_SYS_RAWIO = 17
CAP_SYS_CHROOT = 18
CAP_SYS_PTRACE = 19
CAP_SYS_PACCT = 20
CAP_SYS_ADMIN = 21
CAP_SYS_BOOT = 22
CAP_SYS_NICE = 23
CAP_SYS_RESOURCE = 24
CAP_SYS_TIME = 25
CAP_SYS_TTY_CONFIG = 26
CAP_MKNOD = 27
CAP_LEASE = 28
CAP_AUDIT_WRITE = 29
CAP_AUDIT_CONTROL = 30
CAP_SETFCAP = 31
CAP_MAC_OVERRIDE = 32
CAP_MAC_ADMIN = 33
CAP_SYSLOG = 34
CAP_WAKE_ALARM = 35
CAP_BLOCK_SUSPEND = 36
CAP_AUDIT_READ = 37
CAP_PERFMON = 38
CAP_BPF = 39
CAP_CHECKPOINT_RESTORE = 40
CAP_LAST_CAP = CAP_CHECKPOINT_RESTORE

#: What a change of fsuid from 0 drops from the effective set, and a change
#: back to 0 raises again from the permitted set (the kernel's
#: ``CAP_FS_MASK``; capabilities(7), "Effect of user ID changes").
CAP_FS_MASK = ((1 << CAP_CHOWN) | (1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)
               | (1 << CAP_FOWNER) | (1 << CAP_FSETID) | (1 << CAP_LINUX_IMMUTABLE)
               | (1 << CAP_MKNOD) | (1 << CAP_MAC_OVERRIDE))


class cap_user_header(ctypes.Structure):  # noqa: N801 - the kernel's name
    """``struct __user_cap_header_struct``."""

    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class cap_user_data(ctypes.Structure):  # noqa: N801 - the kernel's name
    """``struct __user_cap_data_struct``: 32 bits of each set."""

    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


#: The data argument of capget/capset for version 3.
cap_user_data_v3 = cap_user_data * _LINUX_CAPABILITY_U32S_3


def header_v3() -> cap_user_header:
    """A version-3 header for the calling thread (pid 0)."""
    return cap_user_header(_LINUX_CAPABILITY_VERSION_3, 0)


#: Every capability by its name without ``CAP_`` (``"SYS_ADMIN"`` -> 21), as
#: libcap-ng's ``capng_name_to_capability`` knows them: virtiofsd's ``--modcaps``
#: names capabilities this way.
CAPABILITY_NUMBERS: dict[str, int] = {
    name[len("CAP_"):]: value for name, value in list(globals().items())
    if name.startswith("CAP_") and name not in ("CAP_LAST_CAP", "CAP_FS_MASK")
    and isinstance(value, int)
}


def parse_modcaps(text: str) -> tuple[tuple[bool, int], ...]:
    """virtiofsd's ``--modcaps``: ``+name`` or ``-name`` items joined by ``:``.

    Names are case-insensitive and carry no ``CAP_`` prefix.  Returns
    ``(add, number)`` per item, in order (a later item wins over an earlier
    one for the same capability).  ValueError naming the bad item otherwise.
    """
    out = []
    for item in text.split(":"):
        if not item:
            raise ValueError("empty item: expected (+|-)capability[:...]")
        sign, name = item[0], item[1:].upper()
        if sign not in "+-":
            raise ValueError(f"{item!r}: must start with + or -")
        number = CAPABILITY_NUMBERS.get(name)
        if number is None:
            raise ValueError(f"{item!r}: no capability named {name.lower()!r}")
        out.append((sign == "+", number))
    return tuple(out)
