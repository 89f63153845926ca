"""The main job on the embedded default: make demo data -> clip -> nlt -> le -> evaluate, with a baseline.

Usage:
    python jobs/demo.py [--recipe mla-zero-shot|dasd-zero-shot] [--experiment demo] [--stages clip,nlt,le]
                        [--set key=value ...] [--fresh] [--train-images N] [--eval-images N] [--num-workers N]
                        [--verbose]

Trains the tiny English CLIP on procedural scenes (`clip`, standing in for a downloaded CLIP), teaches it
de/fr/cs/zh/ja with the recipe's stages (MLA: `nlt` then `le`; DASD: `cla` then `cma`), and prints the
per-language test recall table next to the baseline: the English-only model reading non-English captions
through its own BPE tokenizer. The report has a row for every recipe finished in the experiment, so
`--recipe dasd-zero-shot` after the default run compares the two methods (reusing data and `clip`).
Everything lands in {CCR_RAY_HOME or ~/ccr_ray}/runs/{experiment}/ (report.md, results.json,
mr_by_language.png, one folder per stage with its checkpoint, training log and curve; Ray's own logs in
ray.log, on the console too with --verbose). A stage whose output already matches its config is reused;
--fresh retrains.
"""

from __future__ import annotations

import argparse
import sys
import time

from ccr_ray.cli import SHARED_DATA, fail, quiet_ray_env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="mla-zero-shot")
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--stages", default=None, help="override the recipe's stage list")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--train-images", type=int, default=20_000)
    parser.add_argument("--eval-images", type=int, default=1_000)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--verbose", action="store_true", help="Ray's own logs and the stage plans on the console")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_ray_env()
    started = time.perf_counter()

    from ccr_ray.config import ConfigError, resolve_home
    from ccr_ray.recipes import evaluate_experiment, run_recipe, write_report
    from ccr_ray.stages import RECIPES, STAGES, resolve_config
    from ccr_ray.train.plan import StageError

    if args.recipe not in RECIPES:
        return fail(f"--recipe: unknown {args.recipe!r} (known: {', '.join(RECIPES)})")
    recipe = RECIPES[args.recipe]
    stages = [s for s in args.stages.split(",") if s] if args.stages else list(recipe.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        return fail(f"--stages: unknown {unknown} (known: {', '.join(STAGES)})")
    overrides = [f"run.experiment={args.experiment}", f"run.verbose={str(args.verbose).lower()}", *args.overrides]
    if args.num_workers:
        overrides.append(f"scaling.num_workers={args.num_workers}")
    try:
        configs = {s: resolve_config(s, "demo", overrides) for s in stages}
    except ConfigError as err:
        return fail(str(err))
    final = configs[stages[-1]]
    out = resolve_home(final.run.home) / "runs" / args.experiment
    from ccr_ray.ray_utils import quiet_logs

    quiet_logs(out / "ray.log", verbose=args.verbose)

    # 1. data
    import make_demo_data

    data_dir = final.path(final.data.pretrain)
    code = make_demo_data.main(["--out", data_dir, "--train", str(args.train_images), "--val",
                                str(args.eval_images), "--test", str(args.eval_images),
                                "--extra-text", str(SHARED_DATA)])
    if code:
        return code
    timings = {"data": time.perf_counter() - started}

    # 2. stages, one Ray session
    from ccr_ray.ray_utils import RayUnavailable

    try:
        run = run_recipe(recipe, configs, config_source="demo", fresh=args.fresh)
    except (StageError, RayUnavailable) as err:
        return fail(str(err))
    timings.update(run.timings)

    # 3. evaluation on the test split (no Ray needed): the baseline and every recipe finished in this experiment
    t0 = time.perf_counter()
    print("[evaluate] test split, every language ...", flush=True)
    results = evaluate_experiment(final, data_dir, extra_stage=stages[-1])
    timings["evaluate"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    main_row = recipe.label if stages[-1] == recipe.final else stages[-1]
    print(write_report(out, data_dir, results, main_row, ["en", *final.model.languages], timings), end="")
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
