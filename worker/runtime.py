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

if TYPE_CHECKING:
    from model.inference import Classifier

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
