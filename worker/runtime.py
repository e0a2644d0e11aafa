"""What a worker process needs (plain values from the CLI) and its lazily built heavy state."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from db.session import make_session_factory
from worker.mail import SmtpConfig

if TYPE_CHECKING:
    from model.inference import Classifier
    from worker.delivery import DeliveryOptions

logger = logging.getLogger(__name__)


@dataclass
class WorkerConfig:
    """Set once by `melanoscreen worker` before the pool forks."""

    database_url: str
    data_dir: Path
    model_path: Path | None = None
    alert_threshold: float | None = None  # None: the model card's threshold
    batch_size: int = 16
    sweep_limit: float = 600.0
    max_attempts: int = 5
    concurrency: int = 1
    intra_op_threads: int = 1
    alert_recipients: tuple[str, ...] = ()  # empty: flagged images are recorded, nobody is told
    smtp: SmtpConfig = field(default_factory=SmtpConfig)  # no host: .eml files in outbox/
    timezone: str = "UTC"
    alert_max_attempts: int = 8
    alert_retry_base: float = 30.0  # seconds
    alert_retry_cap: float = 3600.0

    @property
    def outbox_dir(self) -> Path:
        """Where messages go as .eml files when no SMTP host is configured."""
        return self.data_dir / "outbox"

    def delivery_options(self) -> DeliveryOptions:
        """The delivery settings as the delivery code takes them."""
        from worker.delivery import DeliveryOptions

        return DeliveryOptions(smtp=self.smtp, outbox_dir=self.outbox_dir, timezone=self.timezone,
                               max_attempts=self.alert_max_attempts,
                               retry_base=self.alert_retry_base, retry_cap=self.alert_retry_cap,
                               stale_after=self.sweep_limit)

    @property
    def quarantine_dir(self) -> Path:
        """Where unreadable images go, each with a `.reason.txt` beside it."""
        return self.data_dir / "quarantine"


@dataclass
class _ProcessState:
    pid: int = -1
    sessions: sessionmaker[Session] | None = None
    classifier: Classifier | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_config: WorkerConfig | None = None
_state = _ProcessState()


def configure(config: WorkerConfig) -> None:
    """Record the worker's configuration (in the parent, before the fork)."""
    global _config
    _config = config


def config() -> WorkerConfig:
    """The configuration set by `configure`."""
    if _config is None:
        raise RuntimeError("worker not configured: start it with `melanoscreen worker`")
    return _config


def _this_process() -> _ProcessState:
    global _state
    if _state.pid != os.getpid():
        # A fresh fork: nothing from the parent (connections, TensorFlow) is reused.
        _state = _ProcessState(pid=os.getpid())
    return _state


def sessions() -> sessionmaker[Session]:
    """This process's session factory."""
    state = _this_process()
    if state.sessions is None:
        state.sessions = make_session_factory(config().database_url)
    return state.sessions


def classifier() -> Classifier:
    """This process's model, loaded on first use (after the fork: TensorFlow is not fork-safe)."""
    state = _this_process()
    with state.lock:
        if state.classifier is None:
            from model.inference import Classifier, configure_threads

            cfg = config()
            configure_threads(intra_op=cfg.intra_op_threads, inter_op=1)
            state.classifier = Classifier(cfg.model_path)
            logger.info("process %d loaded model %s (%d TensorFlow threads)", os.getpid(),
                        state.classifier.version, cfg.intra_op_threads)
        return state.classifier


def gradcam_overlay(path: Path) -> bytes | None:
    """The Grad-CAM overlay (PNG) of a stored image by this process's model; None on failure."""
    try:
        from model.gradcam import overlay_png

        return overlay_png(classifier(), path)
    except Exception:
        # An alert without its overlay is still an alert: never let the picture stop it.
        logger.exception("no Grad-CAM overlay for %s", path)
        return None
