"""Files left in the inbox (empty, too large, not a regular file), remembered as they were when
seen.

A shared inbox may hold a hundred thousand of them. Each is looked at once: a rescan passes a
remembered name by without a stat (an event for it, or a change found by the bounded recheck,
brings it back), and the log says what was left in one line per scan, not one line per file.
"""

from __future__ import annotations

import os
from collections import deque

from melanoscreen.text import printable

EMPTY = "empty"
TOO_LARGE = "too large"
NOT_REGULAR = "not a regular file"  # a link, a FIFO, a device: never read
#: At most this many files are remembered (about 200 bytes each); beyond it a file left in the
#: inbox is looked at again at each scan (one stat), and still counted in the scan's one line.
CAPACITY = 300_000
#: Remembered files whose stat is taken again per scan, in turn: a change that no event reported
#: (polling, a folder without a watch, an overflowed event queue) is found within
#: `len(known) / RECHECK_PER_SCAN` scans.
RECHECK_PER_SCAN = 2_000
#: Names given as examples in a scan's line, per reason.
EXAMPLES = 3

#: (inode, size, mtime in ns) of a file as it was seen.
Seen = tuple[int, int, int]


def seen_as(info: os.stat_result) -> Seen:
    """What is remembered of a file's stat: a change to any of these brings it back."""
    return info.st_ino, info.st_size, info.st_mtime_ns


class LeftInInbox:
    """The files left in the inbox, by path (text), with why; and what to say at the next scan."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self.known: dict[str, tuple[Seen, str]] = {}
        #: Remembered paths in the order they are rechecked (may hold forgotten ones: skipped).
        self._turns: deque[str] = deque()
        #: Since the last line: how many were left, per reason, and the first few names.
        self._counts: dict[str, int] = {}
        self._examples: dict[str, list[str]] = {}

    def __contains__(self, path: str) -> bool:
        return path in self.known

    def __len__(self) -> int:
        return len(self.known)

    def unchanged(self, path: str, info: os.stat_result) -> bool:
        """Whether `path` is remembered exactly as it is now (so: nothing to do)."""
        known = self.known.get(path)
        return known is not None and known[0] == seen_as(info)

    def note(self, path: str, shown: str, info: os.stat_result, reason: str) -> None:
        """Remember a file left in the inbox, and count it for the next scan's line."""
        if path not in self.known:
            if len(self.known) >= self.capacity:
                self._count(shown, reason)
                return
            self._turns.append(path)
        self.known[path] = (seen_as(info), reason)
        self._count(shown, reason)

    def _count(self, shown: str, reason: str) -> None:
        self._counts[reason] = self._counts.get(reason, 0) + 1
        examples = self._examples.setdefault(reason, [])
        if len(examples) < EXAMPLES:
            examples.append(printable(shown))

    def forget(self, path: str) -> None:
        """The file changed or went: it is looked at afresh when seen again."""
        self.known.pop(path, None)

    def keep_only(self, present: set[str]) -> None:
        """After a whole scan: forget remembered files that are no longer there."""
        if len(present) != len(self.known):
            for path in [p for p in self.known if p not in present]:
                del self.known[path]

    def changed(self, limit: int = RECHECK_PER_SCAN) -> list[str]:
        """Take the stat of up to `limit` remembered files, in turn; those that changed or went
        are forgotten and returned (to be looked at afresh)."""
        found: list[str] = []
        for _ in range(min(limit, len(self._turns))):
            path = self._turns.popleft()
            known = self.known.get(path)
            if known is None:
                continue  # forgotten meanwhile: its turn goes too
            try:
                now = seen_as(os.lstat(path))
            except OSError:
                now = None
            if now != known[0]:
                del self.known[path]
                found.append(path)
            else:
                self._turns.append(path)
        if len(self._turns) > 2 * len(self.known) + limit:
            self._turns = deque(p for p in self._turns if p in self.known)
        return found

    def summary(self, max_bytes: int) -> tuple[str, bool] | None:
        """One line about what was left in the inbox since the last call, and whether it is
        worth a warning (a file too large: an image may have been meant); None when nothing was."""
        if not self._counts:
            return None
        serious = TOO_LARGE in self._counts
        parts = []
        for reason, count in sorted(self._counts.items()):
            what = f"{count} {reason}" + (
                f" (over MELANOSCREEN_MAX_FILE_BYTES, {max_bytes} bytes)" if reason == TOO_LARGE
                else "")
            examples = ", ".join(self._examples.get(reason, []))
            parts.append(f"{what}: {examples}{', ...' if count > EXAMPLES else ''}")
        self._counts, self._examples = {}, {}
        return ("left in the inbox unread, " + "; ".join(parts)
                + f" ({len(self.known)} such files in all; each is looked at again only when "
                "it changes)"), serious
