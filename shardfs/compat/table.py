"""The README's option table, made from :data:`shardfs.compat.options.OPTIONS`.

``python -m shardfs.compat.table`` prints it, ``... --write README.md``
replaces it there; a unit test checks that the README holds exactly this
text, so the table cannot drift from the parser.
"""

from __future__ import annotations

from typing import Any

from shardfs.compat.options import OPTIONS, SPECIAL_FLAGS, VIRTIOFSD, Option
from shardfs.config import FIELDS

BEGIN = "<!-- options table: python -m shardfs.compat.table -->"
END = "<!-- end of options table -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(opt: Option) -> str:
    if opt.default_text:
        return opt.default_text
    value: Any = FIELDS[opt.field]
    if opt.kind == "flag":
        return "on" if value else "off"
    if value is None or value == () or value == "":
        return "none"
    return f"`{value}`"


def _spelling(opt: Option) -> str:
    if opt.kind == "flag":
        return f"`{opt.flag}`, `--no-{opt.flag[2:]}`"
    return f"`{opt.flag} {opt.metavar}`" + (" (repeatable)" if opt.kind == "list" else "")


def markdown_table() -> str:
    """The table, between the BEGIN and END markers."""
    rows = [BEGIN, "", "| option | default | in virtiofsd 1.13 | in shardfs |",
            "| --- | --- | --- | --- |"]
    for opt in OPTIONS:
        peer = "same option, same default" if opt.origin == VIRTIOFSD else "not in virtiofsd"
        if opt.field == "readdirplus":
            peer = "only `--no-readdirplus`; same default"
        effect = opt.effect or opt.help
        if opt.origin == VIRTIOFSD and not opt.effect:
            effect = f"as virtiofsd: {opt.help}"
        rows.append(f"| {_spelling(opt)} | {_default(opt)} | {peer} | {_cell(effect)} |")
    for flag, origin, what in SPECIAL_FLAGS:
        peer = "same" if origin == VIRTIOFSD else "not in virtiofsd"
        rows.append(f"| `{flag}` | | {peer} | {_cell(what)} |")
    rows += ["", END]
    return "\n".join(rows)


def write(path: str) -> None:
    """Replace the table between the markers in ``path``."""
    with open(path) as f:
        text = f.read()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    with open(path, "w") as f:
        f.write(text[:start] + markdown_table() + text[end:])


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write"]:
        write(sys.argv[2])
    else:
        print(markdown_table())
