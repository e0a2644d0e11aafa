"""A worker process's state: the settings (given before the pool forks) and, per pool process,
a session factory made by Celery's `worker_process_init` hook and the model, loaded on first use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery.signals import worker_process_init
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_session_factory
from melanoscreen.settings import Settings

if TYPE_CHECKING:
    from model.inference import Classifier

logger = logging.getLogger(__name__)

#: TensorFlow's C++ start-up notices: INFO and WARNING lines (`I0000 ...`, `W0000 ...`),
#: absl's line about logging before its start, the CPU-instructions hint. Since TensorFlow
#: 2.19 TF_CPP_MIN_LOG_LEVEL no longer silences them.
_TENSORFLOW_NOTICE = re.compile(r"^(?:[IW]\d{4} \d|WARNING: All log messages before absl::"
                                r"|To enable the following instructions:)")


@contextlib.contextmanager
def tensorflow_notices_dropped() -> Iterator[None]:
    """While TensorFlow loads, what it writes to this process's stderr (file descriptor 2) is
    caught; on leaving, every line but its start-up notices is passed on (errors and our own
    log lines are kept, only later)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode("utf-8", "replace").splitlines(True)
                    if not _TENSORFLOW_NOTICE.match(line)]
            if kept:
                os.write(2, "".join(kept).encode("utf-8"))


@dataclass
class WorkerProcess:
    """What one pool process holds: its own connections and its own model."""

    settings: Settings
    sessions: sessionmaker[Session]
    intra_op_threads: int = 1
    _classifier: Classifier | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def classifier(self) -> Classifier:
        """This process's model, loaded on first use (after the fork: TensorFlow is not fork-safe)."""
        with self._lock:
            if self._classifier is None:
                with tensorflow_notices_dropped():
                    from model.inference import Classifier, configure_threads

                    configure_threads(intra_op=self.intra_op_threads, inter_op=1)
                    self._classifier = Classifier(self.settings.model)
                logger.info("process %d loaded model %s (%d TensorFlow threads)", os.getpid(),
                            self._classifier.version, self.intra_op_threads)
            return self._classifier

    def warm(self) -> None:
        """Load the model and run one forward pass now, so the first image is screened as fast
        as the next (loading and tracing take seconds); a failure shows at the first task."""
        try:
            import numpy as np

            from service.dicom import preload

            preload()
            classifier = self.classifier()
            height, width = classifier.input_size
            with tensorflow_notices_dropped():  # the first forward pass says more
                classifier.predict_arrays_scoped(np.zeros((1, height, width, 3), dtype=np.float32))
        except Exception:
            logger.exception("process %d could not load the model at start", os.getpid())

    def gradcam_overlay(self, path: Path) -> bytes | None:
        """The Grad-CAM overlay (PNG) of a stored image by this process's model; None on failure."""
        try:
            from model.gradcam import overlay_png

            png = overlay_png(self.classifier(), path)
        except Exception:
            # An alert without its overlay is still an alert: never let the picture stop it.
            logger.exception("no Grad-CAM overlay for %s", path)
            return None
        self._keep_overlay(path, png)
        return png

    def _keep_overlay(self, path: Path, png: bytes) -> None:
        """Store the overlay as overlays/<sha256>.png for the review app's case page (which
        never runs TensorFlow); the latest model's overlay replaces an older one."""
        sha256 = path.name.split(".", 1)[0]  # store files are named <sha256>[.<ext>]
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            return
        folder = self.settings.overlays_dir
        partial = folder / f".{sha256}.{os.getpid()}.part"
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            partial.write_bytes(png)
            os.replace(partial, folder / f"{sha256}.png")
        except OSError as exc:
            logger.warning("cannot keep the Grad-CAM overlay of %s: %s", path, exc)


_settings: Settings | None = None
_intra_op_threads = 1
_process: WorkerProcess | None = None


def configure(settings: Settings, intra_op_threads: int = 1) -> None:
    """Record the settings (`melanoscreen worker` calls this in the parent, before the fork)."""
    global _settings, _intra_op_threads
    _settings, _intra_op_threads = settings, intra_op_threads


@worker_process_init.connect
def _start_process(**_: Any) -> None:
    """In each new pool process: fresh connections (nothing from the parent is reused) and the
    model, loaded and warmed before the process takes its first task."""
    global _process
    if _settings is not None:
        _process = WorkerProcess(_settings, make_session_factory(_settings.database),
                                 _intra_op_threads)
        _process.warm()


def process() -> WorkerProcess:
    """This pool process's state."""
    if _process is None:
        raise RuntimeError("worker not configured: start it with `melanoscreen worker`")
    return _process
