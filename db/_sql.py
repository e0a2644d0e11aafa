"""SQL helpers every query module shares: a LIKE pattern's escape and id lists in chunks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

#: Ids per statement: SQLite limits the number of bound parameters of one statement.
CHUNK = 500


def escape_like(text: str) -> str:
    """`text` for a LIKE pattern with ESCAPE '\\': its `%`, `_` and `\\` match themselves."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def in_chunks(ids: Sequence[int], size: int = CHUNK) -> Iterator[list[int]]:
    """`ids` in lists of at most `size`, in order (for `IN (...)` clauses)."""
    for start in range(0, len(ids), size):
        yield list(ids[start:start + size])
