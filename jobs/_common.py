"""Shared bits of the job CLIs (argument helpers, error reporting). Not a job itself."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real caption text shipped beside the repository (../shared/data); optional everywhere.
SHARED_DATA = Path(os.environ.get("CCR_RAY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def quiet_ray_env() -> None:
    """Defaults that keep a local run's output readable (users can override them in the environment)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
