"""Train one stage (clip, nlt, le, finetune-en, finetune-all, cla, cma) on Ray Train.

Usage:
    python jobs/train_stage.py --stage STAGE [--config FILE|NAME] [--set key=value ...]
                               [--add-language LANG[,LANG]] [--from CKPT]
                               [--num-workers N] [--use-gpu] [--dry-run] [--fresh] [--verbose]

    --config    a JSON config file, or a packaged one by name (default: demo, the embedded default)
    --set       override any field, e.g. --set optim.lr=1e-4 --set model.languages=de,fr
    --dry-run   print the resolved config and the plan, check every input, start nothing
    --fresh     discard an earlier run of the same config instead of resuming it
    --add-language  add languages to a trained model (model.add_languages): only their adapters train, every other
                language's embeddings stay bit-identical; stages nlt/le (MLA) or cla/cma (DASD), the first with
                --from, the second finding the first's output ({stage}+{lang} beside the model's runs)
    --from      the checkpoint a stage starts from instead of its parent's (run.init_from)
    --verbose   per-step log lines and Ray's own logs on the console (otherwise a progress bar, and Ray's logs in
                the stage folder's ray.log)

On a cluster:  ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
                   python jobs/train_stage.py --stage le
The job connects to the cluster in RAY_ADDRESS (ray job submit sets it), else to a live `ray start` cluster on this
machine, else starts a local Ray (README, "Which Ray a job runs on").
The stage's output checkpoint goes to {run.home}/runs/{run.experiment}/{stage}/checkpoint ({stage}+{lang} when it adds
languages).
"""

from __future__ import annotations

import argparse
import json
import sys

from ccr_ray.cli import fail, local_log_file, plan_from_args, quiet_ray_env
from ccr_ray.config import ConfigError
from ccr_ray.stages import STAGES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True, choices=list(STAGES))
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--add-language", dest="add_language", default=None, metavar="LANG[,LANG]")
    parser.add_argument("--from", dest="init_from", default=None, metavar="CKPT")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_ray_env()
    overrides = list(args.overrides)
    if args.num_workers is not None:
        overrides.append(f"scaling.num_workers={args.num_workers}")
    if args.use_gpu:
        overrides.append("scaling.use_gpu=true")
    if args.verbose:
        overrides.append("run.verbose=true")
    if args.add_language:
        overrides.append(f"model.add_languages={args.add_language}")
    if args.init_from:
        overrides.append(f"run.init_from={args.init_from}")
    from ccr_ray.train.driver import run_stage
    from ccr_ray.train.plan import StageError

    try:
        cfg, plan = plan_from_args(args.stage, args.config, overrides)
    except (ConfigError, StageError) as err:
        return fail(str(err))
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
    print(plan.summary(), flush=True)
    if args.dry_run:
        return 0
    from ccr_ray.ray_utils import RayUnavailable, quiet_logs

    quiet_logs(local_log_file(cfg), verbose=cfg.run.verbose)
    try:
        result = run_stage(plan, fresh=args.fresh)
    except (StageError, RayUnavailable) as err:
        return fail(str(err))
    metrics = {k: round(v, 2) for k, v in result.metrics.items() if k.startswith("val/")}
    print(f"[{cfg.stage}] output checkpoint: {result.checkpoint}")
    print(f"[{cfg.stage}] validation at the selected step: {json.dumps(metrics)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
