"""Adding a language to a trained model vs training it jointly, on the embedded default.

Usage:
    python bench/add_language.py [--home DIR] [--lang ja] [--add-steps 200,50] [--skip-policies]
                                 [--out bench/results/add_language.json]

What runs, each through the job a user runs (jobs/make_demo_data.py, jobs/train_stage.py, one Ray session per call):
  joint   clip -> nlt -> le on de/fr/cs/zh/ja: the demo as `make demo` trains it ("retraining every stage")
  base    nlt -> le on de/fr/cs/zh from the same clip checkpoint (--from): the model the language is added to
  add     nlt --add-language ja --from base/le, then le --add-language ja (--add-steps: their steps; the demo's
          joint schedule gives ja about a fifth of nlt's 600 and le's 150 steps)
Then, without Ray: the test split's mR per language for joint, base and the merged model; every language but ja
bit-identical between base and merged (fingerprints, and the embeddings of every test caption); the wall time of
the add (its two stages) against retraining every stage (joint's three).

--skip-policies leaves out the table-policy measurement: the same add on the Ray-free training loop three times,
the new language reading the frozen token table through an offset of its own (what `--add-language` does by
default, model.text.new_language_table=offset), through nothing (=frozen), and with the whole table trainable
(which moves rows the other languages read: the upper bound an offset should reach), each scored on the validation
split. Writes JSON (and prints the tables).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from _report import write_report

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))
sys.path.insert(0, str(REPO))
OLD = ["de", "fr", "cs", "zh"]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=None)
    parser.add_argument("--lang", default="ja")
    parser.add_argument("--add-steps", default="200,50")
    parser.add_argument("--skip-policies", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench/results/add_language.json"))
    return parser.parse_args(argv)


def stage(name: str, experiment: str, *extra: str) -> float:
    import train_stage

    start = time.perf_counter()
    args = ["--stage", name, "--set", f"run.experiment={experiment}", *extra]
    if train_stage.main(args):
        raise SystemExit(f"train_stage {' '.join(args)} failed")
    return round(time.perf_counter() - start, 1)


def test_results(checkpoint: Path) -> dict:
    from ccr_ray.eval.evaluate import evaluate_checkpoint

    return {lang: round(r["mR"], 2) for lang, r in evaluate_checkpoint(str(checkpoint), split="test")["results"].items()}


def same_embeddings(base: Path, merged: Path, data: str, langs: list[str]) -> dict[str, bool]:
    """Every test caption of each language (and English), encoded by both checkpoints: bit-identical?"""
    import torch

    from ccr_ray import checkpoint as ckpt
    from ccr_ray.data import schema
    from ccr_ray.eval.retrieval import encode_captions

    a, _ = ckpt.load_checkpoint(base)
    b, _ = ckpt.load_checkpoint(merged)
    a.eval(), b.eval()
    table = schema.read_split_table(data, "test", ["en", *langs], with_images=False)
    out = {}
    with torch.no_grad():
        for lang in ["en", *langs]:
            texts = [c for caps in table[schema.captions_column(lang)].to_pylist() for c in caps]
            tok = ckpt.tokenizer_of(base)
            out[lang] = bool(torch.equal(encode_captions(a, texts, lang, a.context_length, tok, "cpu"),
                                         encode_captions(b, texts, lang, b.context_length, tok, "cpu")))
    return out


def policies(base: Path, home: Path, lang: str, steps: list[int]) -> dict:
    """The add on the Ray-free loop: an offset (the product), the table frozen, or trainable (the upper bound);
    val mR of `lang`."""
    import torch

    from ccr_ray.data import schema
    from ccr_ray.stages import resolve_config
    from ccr_ray.train import loop
    from ccr_ray.train.plan import CHECKPOINT_DIR, plan_stage
    from ccr_ray.train.state import TrainState
    from tests.unit.test_loop import stream

    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    for policy in ("offset", "frozen", "trainable"):
        experiment = f"addlang-policy-{policy}"
        score = None
        for name, n in zip(("nlt", "le"), steps):
            overrides = [f"run.experiment={experiment}", f"model.add_languages={lang}", f"train.max_steps={n}",
                         f"train.eval_every={n}", f"run.home={home}",
                         f"model.text.new_language_table={'offset' if policy == 'offset' else 'frozen'}"]
            if name == "nlt":
                overrides.append(f"run.init_from={base}")
            plan = plan_stage(resolve_config(name, "demo", overrides))
            state = TrainState.create(plan.cfg, plan.tokenizer_dir, plan.parent, "cpu")
            if policy == "trainable":  # what --add-language never does: the table every language reads trains
                trainable = state.model.set_trainable(["token_embedding", "new_language_adapters"], [lang])
                from ccr_ray.optim import Optimization

                state.optim = Optimization(trainable, plan.cfg.optim, t_total=plan.cfg.train.max_steps)
            val = schema.read_split_table(plan.dataset_root, "val", ["en", lang])
            loop.run(state, stream(plan, plan.cfg.train.batch_size))
            score = state.validate(val, plan.dataset_root)[f"val/mR/{lang}"]
            state.save(plan.output_dir.local_path() / CHECKPOINT_DIR, with_optimizer=False)
        out[policy] = round(score, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ccr_ray.cli import quiet_ray_env

    quiet_ray_env()
    home = Path(args.home or os.environ.get("CCR_RAY_HOME") or "~/ccr_ray").expanduser().absolute()
    os.environ["CCR_RAY_HOME"] = str(home)
    lang, steps = args.lang, [int(s) for s in args.add_steps.split(",")]
    runs = home / "runs"
    seconds: dict[str, float] = {}

    import make_demo_data

    from ccr_ray.cli import SHARED_DATA

    data = home / "data" / "demo"
    start = time.perf_counter()
    if make_demo_data.main(["--out", str(data), "--extra-text", str(SHARED_DATA)]):
        return 1
    seconds["data"] = round(time.perf_counter() - start, 1)
    languages = ",".join([*OLD, lang])
    for name in ("clip", "nlt", "le"):
        seconds[f"joint_{name}"] = stage(name, "addlang-joint", "--fresh", "--set", f"model.languages={languages}")
    clip = runs / "addlang-joint" / "clip" / "checkpoint"
    seconds["base_nlt"] = stage("nlt", "addlang-base", "--fresh", "--from", str(clip), "--set",
                                f"model.languages={','.join(OLD)}")
    seconds["base_le"] = stage("le", "addlang-base", "--fresh", "--set", f"model.languages={','.join(OLD)}")
    base = runs / "addlang-base" / "le" / "checkpoint"
    seconds["add_nlt"] = stage("nlt", "addlang-base", "--fresh", "--add-language", lang, "--from", str(base),
                               "--set", f"train.max_steps={steps[0]}", "--set", f"train.eval_every={steps[0]}")
    seconds["add_le"] = stage("le", "addlang-base", "--fresh", "--add-language", lang,
                              "--set", f"train.max_steps={steps[1]}", "--set", f"train.eval_every={steps[1]}")
    merged = runs / "addlang-base" / f"le+{lang}" / "checkpoint"

    from ccr_ray import checkpoint as ckpt

    results = {"joint": test_results(runs / "addlang-joint" / "le" / "checkpoint"), "base": test_results(base),
               "merged": test_results(merged)}
    old_prints, new_prints = ckpt.read_fingerprints(base), ckpt.read_fingerprints(merged)
    identical = same_embeddings(base, merged, str(data), OLD)
    retrain = seconds["joint_clip"] + seconds["joint_nlt"] + seconds["joint_le"]
    add = seconds["add_nlt"] + seconds["add_le"]
    report = {
        "benchmark": "add_language", "command": "python bench/add_language.py", "lang": lang,
        "add_steps": {"nlt": steps[0], "le": steps[1]},
        "test_mR": results,
        "added_over_joint": round(results["merged"][lang] / results["joint"][lang], 3),
        "other_languages_bit_identical": {"fingerprints": {k: old_prints[k] == new_prints.get(k) for k in old_prints},
                                          "embeddings": identical},
        "seconds": seconds, "add_seconds": round(add, 1), "retrain_seconds": round(retrain, 1),
        "add_over_retrain": round(add / retrain, 3),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_1m": round(os.getloadavg()[0], 2)},
    }
    if not args.skip_policies:
        report["table_policy_val_mR"] = policies(base, home, lang, steps)
    write_report(report, args.out)
    langs = ["en", *OLD, lang]
    print("| model | " + " | ".join(langs) + " |\n|---|" + "---|" * len(langs))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row.get(x, float('nan')):.1f}" for x in langs) + " |")
    print(f"{lang} added / joint: {report['added_over_joint']:.3f}; add {add:.0f} s vs retrain {retrain:.0f} s "
          f"({report['add_over_retrain']:.2f}); other languages bit-identical: {all(identical.values())} "
          f"(fingerprints {all(report['other_languages_bit_identical']['fingerprints'].values())})")
    if "table_policy_val_mR" in report:
        print(f"table policy, {lang} val mR: {report['table_policy_val_mR']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
