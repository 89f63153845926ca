"""The main job on the embedded default: make demo data -> clip -> nlt -> le -> evaluate, with a baseline.

Usage:
    python jobs/demo.py [--recipe mla-zero-shot|dasd-zero-shot] [--experiment demo] [--stages clip,nlt,le]
                        [--set key=value ...] [--fresh] [--train-images N] [--eval-images N] [--num-workers N]

Trains the tiny English CLIP on procedural scenes (`clip`, standing in for a downloaded CLIP), teaches it
de/fr/cs/zh/ja with the recipe's stages (MLA: `nlt` then `le`; DASD: `cla` then `cma`), and prints the
per-language test recall table next to the baseline: the English-only model reading non-English captions
through its own BPE tokenizer. The report has a row for every recipe finished in the experiment, so
`--recipe dasd-zero-shot` after the default run compares the two methods (reusing data and `clip`).
Everything lands in {CCR_RAY_HOME or ~/ccr_ray}/runs/{experiment}/ (report.md, results.json,
mr_by_language.png, one folder per stage with its checkpoint, training log and curve). A stage whose output
already matches its config is reused; --fresh retrains.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _common import SHARED_DATA, fail, quiet_ray_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="mla-zero-shot")
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--stages", default=None, help="override the recipe's stage list")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--train-images", type=int, default=20_000)
    parser.add_argument("--eval-images", type=int, default=1_000)
    parser.add_argument("--num-workers", type=int, default=None)
    args = parser.parse_args(argv)
    quiet_ray_env()
    started = time.perf_counter()

    from ccr_ray.config import ConfigError, resolve_config, resolve_home
    from ccr_ray.stages import RECIPES, STAGES

    if args.recipe not in RECIPES:
        return fail(f"--recipe: unknown {args.recipe!r} (known: {', '.join(RECIPES)})")
    recipe = RECIPES[args.recipe]
    stages = [s for s in args.stages.split(",") if s] if args.stages else list(recipe.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        return fail(f"--stages: unknown {unknown} (known: {', '.join(STAGES)})")
    overrides = [f"run.experiment={args.experiment}", *args.overrides]
    if args.num_workers:
        overrides.append(f"scaling.num_workers={args.num_workers}")
    try:
        configs = {s: resolve_config(s, "demo", overrides) for s in stages}
    except ConfigError as err:
        return fail(str(err))
    home = resolve_home(configs[stages[0]].run.home)

    # 1. data
    import make_demo_data

    data_dir = configs[stages[0]].path(configs[stages[0]].data.pretrain)
    code = make_demo_data.main(["--out", data_dir, "--train", str(args.train_images), "--val",
                                str(args.eval_images), "--test", str(args.eval_images),
                                "--extra-text", str(SHARED_DATA)])
    if code:
        return code
    t_data = time.perf_counter()

    # 2. stages, one Ray session
    from ccr_ray.train.driver import ensure_ray, run_stage
    from ccr_ray.train.plan import StageError, plan_stage

    timings = {"data": t_data - started}
    for stage in stages:
        cfg = configs[stage]
        t0 = time.perf_counter()
        try:
            plan = plan_stage(cfg, "demo")
        except StageError as err:
            return fail(str(err))
        done = cfg.stage_dir() / "result.json"
        if not args.fresh and done.exists() and json.loads(done.read_text()).get("run", "").endswith(plan.run_name):
            print(f"[{stage}] reusing {plan.output_dir / 'checkpoint'} (same config; --fresh retrains)")
            continue
        ensure_ray()
        if cfg.run.verbose:
            print(plan.summary(), flush=True)
        try:
            run_stage(plan, fresh=True)
        except StageError as err:
            return fail(str(err))
        timings[stage] = time.perf_counter() - t0

    # 3. evaluation on the test split (no Ray needed): the baseline and every recipe finished in this experiment
    from ccr_ray.eval.retrieval import ADAPTED, CLIP_BPE, format_recall_table, format_table
    from ccr_ray.plots import plot_language_bars

    t0 = time.perf_counter()
    final = configs[stages[-1]]
    languages = ["en", *final.model.languages]
    base_ckpt = final.stage_dir("clip") / "checkpoint"
    results = {}
    if base_ckpt.exists():
        results["English-only CLIP (baseline: CLIP BPE on every language)"] = cached_evaluation(
            base_ckpt, data_dir, languages, CLIP_BPE)
    finished = [r for r in RECIPES.values() if (final.stage_dir(r.final) / "checkpoint").exists()]
    for other in finished:
        results[other.label] = cached_evaluation(final.stage_dir(other.final) / "checkpoint", data_dir, languages,
                                                 ADAPTED)
    if stages[-1] not in [r.final for r in finished]:  # a custom --stages list
        results[stages[-1]] = cached_evaluation(final.stage_dir() / "checkpoint", data_dir, languages, ADAPTED)
    current = recipe.label if stages[-1] == recipe.final else stages[-1]
    timings["evaluate"] = time.perf_counter() - t0
    rows = {name: r["results"] for name, r in results.items()}
    table = format_table(rows, languages)
    main_row = rows[current]
    report = [f"# ccr-ray demo: test split of {data_dir}", "", "mR (mean of text->image and image->text R@1/5/10) "
              "per language; chance level for 1,000 images is mR ~0.5", "", table, ""]
    report.append(format_recall_table(main_row, title=current))
    en = main_row.get("en", {}).get("mR")
    if en:
        ratios = {lang: main_row[lang]["mR"] / en for lang in final.model.languages if lang in main_row}
        report += ["", "non-English mR / English mR: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())]
    total = time.perf_counter() - started
    report += ["", "wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + f", total {total:.0f}"]
    out = home / "runs" / args.experiment
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(report) + "\n")
    (out / "results.json").write_text(json.dumps({"results": results, "timings": timings}, indent=2))
    plot_language_bars({k: {lang: v["mR"] for lang, v in r.items()} for k, r in rows.items()}, languages,
                       out / "mr_by_language.png", title="demo test mR by language")
    print("\n".join(report))
    print(f"report: {out / 'report.md'}")
    return 0


def cached_evaluation(checkpoint, data: str, languages: list[str], mode: str) -> dict:
    """Test-split evaluation of a checkpoint, kept beside it and reused while checkpoint, data and languages are
    unchanged (a report row for a recipe trained earlier costs nothing)."""
    from ccr_ray.data.schema import MANIFEST
    from ccr_ray.eval.evaluate import evaluate_checkpoint

    weights = os.stat(os.path.join(checkpoint, "model.safetensors"))
    key = {"weights": [weights.st_size, weights.st_mtime_ns], "data": data,
           "manifest": os.stat(os.path.join(data, MANIFEST)).st_mtime_ns, "languages": languages, "mode": mode}
    cache = os.path.join(os.path.dirname(checkpoint), f"test_eval_{mode}.json")
    if os.path.exists(cache):
        saved = json.loads(Path(cache).read_text())
        if saved.get("key") == key:
            return saved["report"]
    report = evaluate_checkpoint(str(checkpoint), data=data, split="test", languages=languages, mode=mode)
    with open(cache, "w") as f:
        json.dump({"key": key, "report": report}, f, indent=1)
    return report


if __name__ == "__main__":
    sys.exit(main())
