"""Names that came from the inbox, made safe to show as plain text. A leaf: imports nothing of ours.

A file name may hold any character but `/` and NUL: a newline would start a fake line in an email's
text part, an escape sequence would drive the terminal that shows `results`.
"""

from __future__ import annotations


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
