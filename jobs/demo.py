"""The main job on the embedded default: make demo data -> clip -> nlt -> le -> evaluate, with a baseline.

Usage:
    python jobs/demo.py [--experiment demo] [--stages clip,nlt,le] [--set key=value ...] [--fresh]
                        [--train-images N] [--workers N]

Trains the tiny English CLIP on procedural scenes (`clip`, standing in for a downloaded CLIP), teaches it
de/fr/cs/zh/ja with MLA (`nlt` then `le`), and prints the per-language test recall table next to the baseline:
the English-only model reading non-English captions through its own BPE tokenizer. Everything lands in
{CCR_RAY_HOME or ~/ccr_ray}/runs/{experiment}/ (report.md, results.json, mr_by_language.png, one folder per
stage with its checkpoint, training log and curve). A stage whose output already matches its config is reused;
--fresh retrains.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _common import SHARED_DATA, fail, quiet_ray_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--stages", default="clip,nlt,le")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--train-images", type=int, default=20_000)
    parser.add_argument("--eval-images", type=int, default=1_000)
    parser.add_argument("--num-workers", type=int, default=None)
    args = parser.parse_args(argv)
    quiet_ray_env()
    started = time.perf_counter()

    from ccr_ray.config import ConfigError, resolve_config, resolve_home
    from ccr_ray.stages import STAGES

    stages = [s for s in args.stages.split(",") if s]
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
    from ccr_ray.train.driver import StageError, ensure_ray, plan_stage, run_stage

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
        try:
            run_stage(cfg, config_source="demo", fresh=True)
        except StageError as err:
            return fail(str(err))
        timings[stage] = time.perf_counter() - t0

    # 3. evaluation on the test split (no Ray needed)
    from ccr_ray.eval.evaluate import evaluate_checkpoint
    from ccr_ray.eval.retrieval import CLIP_BPE, format_recall_table, format_table
    from ccr_ray.plots import plot_language_bars

    t0 = time.perf_counter()
    final = configs[stages[-1]]
    languages = ["en", *final.model.languages]
    model_ckpt = final.stage_dir() / "checkpoint"
    base_ckpt = final.stage_dir("clip") / "checkpoint"
    results = {}
    if base_ckpt.exists():
        results["English-only CLIP (baseline: CLIP BPE on every language)"] = evaluate_checkpoint(
            str(base_ckpt), data=data_dir, split="test", languages=languages, mode=CLIP_BPE)
    label = {"le": "MLA zero-shot (nlt -> le)", "nlt": "MLA after nlt", "cma": "DASD zero-shot (cla -> cma)"}
    results[label.get(stages[-1], stages[-1])] = evaluate_checkpoint(str(model_ckpt), data=data_dir, split="test",
                                                                     languages=languages)
    timings["evaluate"] = time.perf_counter() - t0
    rows = {name: r["results"] for name, r in results.items()}
    table = format_table(rows, languages)
    main_row = list(rows.values())[-1]
    report = [f"# ccr-ray demo: test split of {data_dir}", "", "mR (mean of text->image and image->text R@1/5/10) "
              "per language; chance level for 1,000 images is mR ~0.5", "", table, ""]
    report.append(format_recall_table(main_row, title=list(rows)[-1]))
    en = main_row.get("en", {}).get("mR")
    if en:
        ratios = {lang: main_row[lang]["mR"] / en for lang in final.model.languages if lang in main_row}
        report += ["", "non-English mR / English mR: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())]
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


if __name__ == "__main__":
    sys.exit(main())
