"""Running a recipe (stages.RECIPES: a method's setting as a chain of stages) end to end, and the report that
compares every finished recipe of an experiment with the English-only baseline. `jobs/demo.py` parses and calls.

    run_recipe(configs, ...)        each stage planned, reused when its published output matches its config,
                                    else trained on Ray (one Ray session for all stages)
    evaluate_experiment(...)        the test split, per language, for the baseline and every finished recipe;
                                    each evaluation kept beside its checkpoint and reused while nothing changed
    write_report(...)               report.md, results.json and mr_by_language.png in the experiment folder
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ccr_ray.config import ExperimentConfig
from ccr_ray.stages import RECIPES, Recipe

Say = Callable[[str], None]


@dataclass
class RecipeRun:
    recipe: Recipe
    stages: list[str]
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds (trained stages only)
    reused: list[str] = field(default_factory=list)


def run_recipe(recipe: Recipe, configs: dict[str, ExperimentConfig], config_source: str = "demo",
               fresh: bool = False, say: Say = print) -> RecipeRun:
    """Train the recipe's stages in order (`configs` maps each stage to its resolved config). A stage whose
    published result was made by the same run (same config and parent) is reused unless `fresh`."""
    from ccr_ray.ray_utils import ensure_ray
    from ccr_ray.train.driver import run_stage
    from ccr_ray.train.plan import plan_stage

    run = RecipeRun(recipe, list(configs))
    for stage, cfg in configs.items():
        started = time.perf_counter()
        plan = plan_stage(cfg, config_source)
        done = cfg.stage_location() / "result.json"
        if not fresh and done.is_file() and json.loads(done.read_text()).get("run_name") == plan.run_name:
            say(f"[{stage}] reusing {plan.output_dir / 'checkpoint'} (same config; --fresh retrains)")
            run.reused.append(stage)
            continue
        ensure_ray(log_to_driver=True)
        if cfg.run.verbose:
            say(plan.summary())
        result = run_stage(plan, fresh=True)
        run.timings[stage] = time.perf_counter() - started
        summary = ", ".join(f"{k.split('/')[-1]} {v:.1f}" for k, v in result.metrics.items() if k.startswith("val/mR/"))
        say(f"[{stage}] done in {run.timings[stage]:.0f}s; validation mR {result.metrics.get('val/mR', float('nan')):.2f}"
            + (f" ({summary})" if summary else ""))
    return run


def cached_evaluation(checkpoint: str | os.PathLike, data: str, languages: list[str], mode: str) -> dict:
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


BASELINE = "English-only CLIP (baseline: CLIP BPE on every language)"


def evaluate_experiment(cfg: ExperimentConfig, data: str, extra_stage: str | None = None) -> dict[str, dict]:
    """Row name -> evaluation report: the baseline (the `clip` stage read through CLIP's BPE), every finished
    recipe, and `extra_stage` when it ends no recipe (a custom stage list)."""
    from ccr_ray.eval.retrieval import ADAPTED, CLIP_BPE

    languages = ["en", *cfg.model.languages]
    results = {}
    base = cfg.stage_dir("clip") / "checkpoint"
    if base.exists():
        results[BASELINE] = cached_evaluation(base, data, languages, CLIP_BPE)
    for recipe in RECIPES.values():
        if (cfg.stage_dir(recipe.final) / "checkpoint").exists():
            results[recipe.label] = cached_evaluation(cfg.stage_dir(recipe.final) / "checkpoint", data, languages,
                                                      ADAPTED)
    if extra_stage and extra_stage not in [r.final for r in RECIPES.values()]:
        results[extra_stage] = cached_evaluation(cfg.stage_dir(extra_stage) / "checkpoint", data, languages, ADAPTED)
    return results


def write_report(out: Path, data: str, results: dict[str, dict], main_row: str, languages: list[str],
                 timings: dict[str, float]) -> str:
    """report.md (the table, the main row's recall table, ratios to English, timings), results.json, the plot."""
    from ccr_ray.eval.retrieval import format_recall_table, format_table
    from ccr_ray.plots import plot_language_bars

    rows = {name: r["results"] for name, r in results.items()}
    lines = [f"# ccr-ray demo: test split of {data}", "", "mR (mean of text->image and image->text R@1/5/10) "
             "per language; chance level for 1,000 images is mR ~0.5", "", format_table(rows, languages), ""]
    main = rows[main_row]
    lines.append(format_recall_table(main, title=main_row))
    en = main.get("en", {}).get("mR")
    if en:
        ratios = {lang: main[lang]["mR"] / en for lang in languages[1:] if lang in main}
        lines += ["", "non-English mR / English mR: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())]
    lines += ["", "wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"results": results, "timings": timings}, indent=2))
    plot_language_bars({k: {lang: v["mR"] for lang, v in r.items()} for k, r in rows.items()}, languages,
                       out / "mr_by_language.png", title="demo test mR by language")
    return text
