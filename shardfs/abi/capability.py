"""The capability ABI of ``<linux/capability.h>``, named as there.

Two layers call capget(2)/capset(2): the passthrough filesystem, which
moves capabilities in and out of the effective set around a caller's fsuid
(``fs/passthrough/creds.py``), and the sandbox, which drops the ones a
worker never needs (``sandbox/caps.py``).  Both take the numbers and the
version-3 structures from here.
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
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_LINUX_IMMUTABLE = 9
CAP_SYS_CHROOT = 18
CAP_SYS_ADMIN = 21
CAP_MKNOD = 27
CAP_SETFCAP = 31
CAP_MAC_OVERRIDE = 32

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
