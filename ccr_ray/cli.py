"""What every CLI in jobs/ and export/ shares: error reporting, the quiet defaults for Ray, the recall table
printer. Importable as a library module, so the CLIs need no path tricks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Real caption text shipped beside a checkout of the repository (../shared/data); optional everywhere.
SHARED_DATA = Path(os.environ.get("CCR_RAY_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def quiet_ray_env() -> None:
    """Defaults that keep a local run's output readable (users can override them in the environment)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def plan_from_args(stage: str, config: str, overrides: list[str]):
    """A job's config (defaults < stage table < --config < --set) and its stage plan: every check that needs no
    cluster. Raises ConfigError or StageError, each naming the field or path."""
    from ccr_ray.stages import resolve_config
    from ccr_ray.train.plan import plan_stage

    plan = plan_stage(resolve_config(stage, config, overrides), config)
    return plan.cfg, plan  # the planned config (a run that adds languages takes its model from the checkpoint)


def local_log_file(cfg) -> Path:
    """Where a job keeps Ray's own logs: beside the stage's outputs when runs are on local disk, else under
    {home}/logs (logs are written as they come, which an object store cannot append to)."""
    where = cfg.stage_location()
    if where.is_local:
        return where.local_path() / "ray.log"
    return cfg.home / "logs" / cfg.run.experiment / f"{cfg.stage}-ray.log"


def print_retrieval_report(report: dict, title: str, seconds: float, out: str | None) -> None:
    """The per-language recall table and mean mR of an evaluation report; the report as JSON to `out`."""
    from ccr_ray.eval.retrieval import format_recall_table

    print(format_recall_table(report["results"], title, **({"protocol": report["protocol"]}
                                                           if "protocol" in report else {})))
    print(f"mean mR over {', '.join(report['results'])}: {report['mean_mR']:.2f}   ({seconds:.1f}s)")
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
