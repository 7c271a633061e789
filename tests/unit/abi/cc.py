"""Compile and run a small C program against the system's kernel headers.

The ABI tests ask the C compiler, not a hand-written table, what the kernel's
layouts are.  Without gcc or the headers they skip and say why.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile

import pytest

INCLUDE = "/usr/include"


def require_header(name: str) -> str:
    """The text of ``/usr/include/<name>``, or skip the test."""
    path = os.path.join(INCLUDE, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} is missing (install linux-libc-dev): cannot check the kernel ABI")
    with open(path) as f:
        return f.read()


def run_c(headers: list[str], body: str) -> dict[str, int]:
    """Compile ``body`` as the inside of main() and parse its ``name value`` lines."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (gcc) on PATH: cannot ask the kernel headers for sizes")
    includes = "".join(f"#include <{h}>\n" for h in ["stddef.h", "stdio.h", *headers])
    src = f"{includes}\nint main(void) {{\n{body}\nreturn 0;\n}}\n"
    with tempfile.TemporaryDirectory() as d:
        c_path, exe = os.path.join(d, "abi.c"), os.path.join(d, "abi")
        with open(c_path, "w") as f:
            f.write(src)
        build = subprocess.run([cc, "-std=gnu11", "-w", "-o", exe, c_path],
                               capture_output=True, text=True)
        assert build.returncode == 0, f"cannot compile the ABI probe:\n{build.stderr}\n{src}"
        out = subprocess.run([exe], capture_output=True, text=True, check=True).stdout
    values: dict[str, int] = {}
    for line in out.splitlines():
        name, value = line.split()
        values[name] = int(value)
    return values


def print_value(key: str, expr: str) -> str:
    """A C statement printing ``key`` and the integer ``expr``."""
    return f'printf("%s %llu\\n", "{key}", (unsigned long long)({expr}));\n'


def object_macros(header_text: str) -> set[str]:
    """Names the header #defines as object-like macros (not function-like)."""
    return set(re.findall(r"^#define\s+(\w+)(?=[\s\\]|$)", header_text, re.M))


def enum_members(header_text: str) -> set[str]:
    """Names that appear as ``NAME = value`` members of an enum."""
    return set(re.findall(r"^\s*(\w+)\s*=\s*[\w()<| ]+,?\s*(?:/\*.*)?$", header_text, re.M))


_SCALAR = re.compile(r"^\s*(?P<type>(?:u?int|__u|__s|__le|__be)\d+(?:_t)?)\s+(?P<name>\w+)\s*;",
                     re.M)


def scalar_members(header_text: str, struct_name: str) -> list[tuple[str, bool]]:
    """(member, signed) for the non-array scalar members declared in ``struct_name``."""
    m = re.search(r"^struct\s+" + re.escape(struct_name) + r"\s*\{(.*?)^\}", header_text,
                  re.M | re.S)
    if m is None:
        return []
    out = []
    for mm in _SCALAR.finditer(m.group(1)):
        t = mm.group("type")
        out.append((mm.group("name"), t.startswith("int") or t.startswith("__s")))
    return out


def struct_fields(st: struct.Struct) -> dict[int, tuple[int, bool]]:
    """Offset -> (size, signed) of every non-padding field of a little-endian Struct."""
    fmt = st.format
    assert fmt[0] == "<", f"{fmt!r} is not little-endian"
    out: dict[int, tuple[int, bool]] = {}
    off = 0
    for count_s, code in re.findall(r"(\d*)([a-zA-Z?])", fmt[1:]):
        count = int(count_s) if count_s else 1
        size = struct.calcsize("<" + code)
        if code == "x":
            off += count
        elif code == "s":
            out[off] = (count, False)
            off += count
        else:
            for _ in range(count):
                out[off] = (size, code.islower() and code not in "sx?")
                off += size
    assert off == st.size
    return out
