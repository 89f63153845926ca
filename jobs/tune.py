"""Ray Tune sweep of one stage: adapter size, loss weights, learning rate (or any config key).

Usage:
    python jobs/tune.py --stage STAGE [--config FILE|demo] [--set k=v ...] [--space k=SPEC ...] [--space-file F]
                        [--num-samples N] [--max-concurrent K] [--search random|optuna] [--scheduler asha|none]
                        [--add-language LANG --from CKPT] [--name NAME] [--resume] [--report SWEEP_DIR] [--dry-run]

    --space       override one key of the stage's default space: optim.lr=loguniform(1e-5,1e-3),
                  model.mla.hidden=choice(32,64,128), loss.weights.consistency_l1=uniform(0.01,0.3),
                  train.batch_size=grid(64,128); KEY=fixed drops a default key
    --space-file  a JSON/YAML mapping key -> spec (a list = choice), applied before --space
    --search      random (default; no extra dependency) or optuna (pip install 'ccr-ray[optuna]')
    --scheduler   asha (default: stops weak trials at validations, on val/mR) or none
    --add-language / --from   sweep a stage that adds a language to a trained model (train_stage.py's options):
                  the default space then keeps the model's architecture and sweeps the training settings
    --name        the sweep's name (default: the stage + a hash of everything swept, so the same command names
                  the same sweep); outputs go to {home}/sweeps/{name}/
    --resume      continue an interrupted sweep (Ctrl-C, a killed driver, a lost head): finished trials are kept,
                  errored and interrupted ones resume their Train runs from their last checkpoints
    --report DIR  re-render the table, trials.csv, best.json and the plots of a sweep folder (no cluster)
    --dry-run     print the resolved space, the number of trials, per-trial resources and the concurrency

Each trial is the stage's own driver (`run_stage`: Ray Data + Ray Train, as `jobs/train_stage.py` runs it) with
the trial's values applied last. The stage's parent checkpoint must exist (e.g. run `clip` first for `nlt`).
"""

from __future__ import annotations

import argparse
import sys

from ccr_ray.cli import fail, quiet_ray_env
from ccr_ray.stages import STAGES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=list(STAGES))
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--space", action="append", default=[], metavar="KEY=SPEC")
    parser.add_argument("--space-file", default=None)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--max-concurrent", type=int, default=0)
    parser.add_argument("--search", default="random", choices=["random", "optuna"])
    parser.add_argument("--scheduler", default="asha", choices=["asha", "none"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random search (not of training)")
    parser.add_argument("--name", default="")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report", metavar="SWEEP_DIR", default=None)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--add-language", dest="add_language", default=None, metavar="LANG[,LANG]")
    parser.add_argument("--from", dest="init_from", default=None, metavar="CKPT")
    args = parser.parse_args(argv)
    if not args.report and not args.stage:
        parser.error("--stage is required (except with --report)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_ray_env()
    from ccr_ray.tune import report

    if args.report:
        try:
            print(report.render(args.report))
        except FileNotFoundError as err:
            return fail(str(err))
        return 0

    from ccr_ray.config import ConfigError, load_config_file
    from ccr_ray.train.plan import StageError
    from ccr_ray.tune.space import SpaceError, resolve_space, validate_space
    from ccr_ray.tune.sweep import SweepError, SweepSpec, describe, prepare

    try:
        config = load_config_file(args.config)
        space = resolve_space(STAGES[args.stage].default_space(bool(args.add_language)), args.space_file, args.space)
        overrides = list(args.overrides)
        if args.add_language:
            overrides.append(f"model.add_languages={args.add_language}")
        if args.init_from:
            overrides.append(f"run.init_from={args.init_from}")
        spec = SweepSpec(stage=args.stage, config=config, config_source=args.config, overrides=overrides,
                         space={k: str(d) for k, d in space.items()}, num_samples=args.num_samples,
                         max_concurrent=args.max_concurrent, search=args.search, scheduler=args.scheduler,
                         seed=args.seed, name=args.name)
        validate_space(space, spec.trial_config)  # before Ray starts: every value the space can give is valid
        spec = prepare(spec)
    except (ConfigError, SpaceError, SweepError, StageError) as err:
        return fail(str(err))
    if args.dry_run:
        import os

        print(describe(spec, {"CPU": float(os.cpu_count() or 1)}))
        print("(concurrency for this machine; on a cluster it follows the cluster's resources)")
        return 0

    from ccr_ray.ray_utils import RayUnavailable, ensure_ray, quiet_logs
    from ccr_ray.tune.sweep import run_sweep

    # Ray's own logs in a file; the console keeps Tune's trial table and our summary
    quiet_logs(spec.base_config().home / "logs" / f"sweep-{spec.name}.log")
    try:
        ensure_ray()
    except RayUnavailable as err:
        return fail(str(err))
    import ray

    print(describe(spec, ray.cluster_resources()), flush=True)
    try:
        run_sweep(spec, resume=args.resume)
    except SweepError as err:
        return fail(str(err))
    print(report.render(spec.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
