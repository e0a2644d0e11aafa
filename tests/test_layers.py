"""The layers of docs/architecture.md, as import contracts (pyproject.toml's [tool.importlinter])."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

#: Every contract of the design, by name: a deleted or renamed one must not pass silently.
CONTRACTS = (
    "model imports nothing of ours",
    "db imports nothing of ours (it is handed URLs and values)",
    "the service layer never imports an entry point (tasks, watcher, web, commands)",
    "scheduler never imports worker, model or the screening use case",
    "no TensorFlow or Keras reachable from the watcher, beat or the Celery contract",
    "worker and scheduler use only the leaves of melanoscreen (settings, the Celery contract, text)",
    "the settings, the Celery contract and the text helpers are leaves",
    "command modules register on the one app without importing it back",
    "command modules never import each other (what they share is in cli._common or below)",
    "the review app imports db, TensorFlow-free service modules and the melanoscreen leaves only",
    "routers never import each other (what two share is in web.deps or the service layer)",
)


def test_every_contract_of_the_design_is_declared() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert sorted(c["name"] for c in declared) == sorted(CONTRACTS)


def test_the_review_app_is_forbidden_the_screening_use_case_and_the_model_by_name() -> None:
    # grimp sees imports inside functions, so naming them is what keeps TensorFlow out of web.
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    [web] = [c for c in declared if c["name"].startswith("the review app")]
    assert {"service.screening", "model", "tensorflow", "keras"} <= set(web["forbidden_modules"])


def test_every_import_contract_is_kept() -> None:
    result = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, COLUMNS="400"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{len(CONTRACTS)} kept, 0 broken" in result.stdout
    kept = {line.rsplit(" KEPT", 1)[0] for line in result.stdout.splitlines() if " KEPT" in line}
    for name in CONTRACTS:
        assert name in kept, name
