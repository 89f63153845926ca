"""Per-sample training throughput under Ray Train (1 worker, Ray Data feeding it) versus a plain single-process
loop over the same Parquet shards, with the same preprocessing code, model, batch and language schedule.

Usage:
    python bench/train_throughput.py [--stages nlt,le] [--steps 120] [--warmup 30] [--images 8000]
                                     [--backbone tiny-vit] [--out bench/results/train_throughput.json]

Steady-state samples/s excludes the first --warmup steps of both loops (stream start-up, allocator warm-up).
Both are measured in the same run, so the ratio is meaningful on a noisy machine; target ratio >= 0.97.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))


def plain_loop(cfg, plan, steps: int, warmup: int) -> float:
    """Single process: the shards read with pyarrow and preprocessed by the same TrainPreprocessor
    (`data/local.py`), stepped by the same training loop the Ray worker runs (`train/loop.py`)."""
    import torch

    from ccr_ray.data import schema
    from ccr_ray.data.local import local_batches
    from ccr_ray.data.preprocess import PreprocessSpec
    from ccr_ray.train import loop
    from ccr_ray.train.state import TrainState

    torch.set_num_threads(os.cpu_count() or 1)
    state = TrainState.create(cfg, plan.tokenizer_dir, plan.parent, "cpu")
    spec = PreprocessSpec(languages=tuple(plan.train_languages), inputs=plan.stage.inputs,
                          image=plan.preprocess if plan.stage.needs_images else None,
                          context_length=plan.context_length, tokenizer=plan.tokenizer_dir,
                          dataset_root=plan.dataset_root)
    batches = local_batches(schema.split_files(plan.dataset_root, cfg.data.train_split), spec, cfg.train.batch_size)
    loop.run(state, batches, steps=warmup)
    start = time.perf_counter()
    loop.run(state, batches, steps=steps - warmup)
    return (steps - warmup) * cfg.train.batch_size / (time.perf_counter() - start)


def ray_loop(cfg, warmup: int) -> float:
    from ccr_ray.train.driver import run_stage
    from ccr_ray.train.plan import plan_stage

    result = run_stage(plan_stage(cfg), fresh=True, publish=False)
    rows = [r for r in result.history if "samples_per_s" in r and r["step"] > warmup]
    # each logged rate covers the log_every steps before it: average weighted by steps
    return float(np.mean([r["samples_per_s"] for r in rows]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="nlt,le")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--backbone", default="tiny-vit")
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ccr_ray.data.synthetic import DemoDataConfig, write_demo_dataset
    from ccr_ray.ray_utils import ensure_ray
    from ccr_ray.stages import resolve_config
    from ccr_ray.train.plan import plan_stage
    from ccr_ray.train.state import TrainState

    home = Path(tempfile.mkdtemp(prefix="ccr-bench-"))
    data = home / "data" / "demo"
    write_demo_dataset(DemoDataConfig(out=str(data), sizes={"train": args.images, "val": 200, "test": 200}))
    common = [f"run.home={home}", f"model.backbone.name={args.backbone}", "run.experiment=bench",
              f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", "train.log_every=10",
              "data.val_max_images=50", "run.verbose=false"]
    # parents with random weights: throughput does not depend on them
    clip_cfg = resolve_config("clip", "demo", common)
    TrainState.create(clip_cfg, str(data / "tokenizer"), None, "cpu").save(clip_cfg.stage_dir("clip") / "checkpoint")
    nlt_cfg = resolve_config("nlt", "demo", common)
    TrainState.create(nlt_cfg, str(data / "tokenizer"), clip_cfg.stage_dir("clip") / "checkpoint", "cpu").save(
        nlt_cfg.stage_dir("nlt") / "checkpoint")
    ensure_ray()
    report = {"benchmark": "train_throughput", "cpus": os.cpu_count(), "platform": platform.platform(),
              "backbone": args.backbone, "steps": args.steps, "warmup": args.warmup, "stages": {}}
    for stage in args.stages.split(","):
        cfg = resolve_config(stage, "demo", common)
        plan = plan_stage(cfg)
        ray_rate = ray_loop(cfg, args.warmup)
        plain_rate = plain_loop(cfg, plan, args.steps, args.warmup)
        report["stages"][stage] = {"plain_samples_per_s": round(plain_rate, 1), "ray_samples_per_s": round(ray_rate, 1),
                                   "ratio_ray_over_plain": round(ray_rate / plain_rate, 3), "target": 0.97}
        print(stage, report["stages"][stage], flush=True)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
