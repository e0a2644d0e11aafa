"""The layer rules of DESIGN.md, as import contracts (pyproject.toml's [tool.importlinter])."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_every_import_contract_is_kept() -> None:
    result = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, COLUMNS="200"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
    # Every contract of the design is there: a deleted one must not pass silently.
    for rule in ("model imports nothing of ours", "db imports nothing of ours",
                 "scheduler never imports worker or model", "no TensorFlow or Keras reachable",
                 "without importing it back", "the review app imports db and the melanoscreen leaves only"):
        assert rule in result.stdout, rule
