"""Names that came from the inbox, made safe to show as plain text or put in a CSV cell. A leaf:
imports nothing of ours.

A file name may hold any character but `/` and NUL: a newline would start a fake line in an email's
text part, an escape sequence would drive the terminal that shows `results`.
"""

from __future__ import annotations

from typing import Any


def printable(text: str) -> str:
    """`text` with every control or other non-printable character written as a visible escape
    (`\\x0a`, `\\u202e`), so it stays on one line and cannot drive a terminal."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
        else f"\\U{code:08x}"


#: A spreadsheet reads a cell that starts with one of these as a formula (or its start).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A text cell a spreadsheet cannot run: a leading quote before a formula's first character,
    and control characters escaped (the CSV is read on terminals too). Numbers stay numbers."""
    if not isinstance(value, str):
        return value
    return printable("'" + value if value.startswith(_FORMULA_START) else value)
