"""The inbox's own inotify watches, for real: a folder made and filled at once (what a sync tool
or a copy of a whole folder does) has every file reported, none left to the periodic rescan."""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

from watchdog.events import FileSystemEvent

from scheduler.inotify import InboxEvents


def _reported(events: queue.Queue[FileSystemEvent], expected: set[str],
              timeout: float = 10.0) -> set[str]:
    """Paths reported as created or moved in, until `expected` are all seen or `timeout`."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while not expected <= seen and time.monotonic() < deadline:
        try:
            event = events.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.add(str(getattr(event, "dest_path", "") or event.src_path))
    return seen


def test_files_moved_into_a_folder_made_at_once_are_all_reported(tmp_path: Path) -> None:
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    inbox.mkdir()
    outside.mkdir()
    events: queue.Queue[FileSystemEvent] = queue.Queue()
    watching = InboxEvents(inbox, events, too_deep=lambda folder: None)
    watching.start()
    try:
        for batch in range(30):
            names = [f"image-{batch}-{i}.jpg" for i in range(40)]
            for name in names:
                (outside / name).write_bytes(b"x")
            folder = inbox / f"batch-{batch}"
            folder.mkdir()
            for name in names:
                os.rename(outside / name, folder / name)
            expected = {str(folder / name) for name in names}
            missing = expected - _reported(events, expected)
            assert not missing, f"batch {batch}: {len(missing)} of 40 files never reported"
    finally:
        watching.stop()
