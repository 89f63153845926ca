"""Real-size training steps: ViT-B-32 + an M-BERT-sized token table (119,547 x 768), random weights.

Usage:
    python bench/real_size_steps.py [--stages nlt,le,cla,cma] [--batch 32] [--steps 3] [--languages de,fr,cs,zh,ja]
                                    [--device cpu|cuda] [--precision auto|fp32|bf16]
                                    [--out bench/results/real_size_steps.json]

Smoke, per stage in a fresh subprocess (so peak memory is the stage's own): build the stage's model at real
size (MLA: 3,154,944 acquirer parameters per language; DASD: core 32, latent 512) and take one step through the
same `TrainState.train_step` the Ray Train worker runs, on real Multi30K captions (de) from ../shared/data when
present. Timing, in one more subprocess holding every stage's model: one warm-up step each, then `--steps`
rounds of one step per stage, round-robin, so load on a shared machine hits every stage alike; median seconds
per step, and the optimizer step's share of it. Reports peak RSS (and peak CUDA memory on GPU), samples/s, and
the per-sample cost of DASD's stages relative to MLA's (cla/nlt, cma/le): what the dynamic adapter costs.
The tokenizer is a synthetic vocab.txt with M-BERT's size and special-token ids ([PAD] 0, [UNK] 100, [CLS] 101,
[SEP] 102), built like a real M-BERT folder (no download).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _mbert import MBERT_VOCAB, mbert_shaped_tokenizer
from _report import write_report

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CCR_RAY_SHARED_DATA", REPO.parent / "shared" / "data"))
PAIRS = {"cla": "nlt", "cma": "le"}  # DASD stage -> the MLA stage it replaces (spec section 8)


def captions(n: int) -> tuple[list[str], list[str]]:
    base = SHARED / "multi30k" / "task1"
    if (base / "train.de").exists():
        de = (base / "train.de").read_text(encoding="utf-8").splitlines()[:n]
        en = (base / "train.en").read_text(encoding="utf-8").splitlines()[:n]
        return de, en
    return (["Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt."] * n,
            ["A man in an orange hat starring at something."] * n)


def build_state(stage: str, args):
    """TrainState of `stage` at real size and a batch of real captions."""
    import torch

    from ccr_ray.stages import STAGES, resolve_config
    from ccr_ray.tokenization import english_tokenizer, target_tokenizer
    from ccr_ray.train.state import TrainState

    work = Path(args.workdir)
    de, en = captions(max(args.batch, 2000))
    tokenizer = work / "mbert-shaped"
    if not (tokenizer / "vocab.txt").exists():
        mbert_shaped_tokenizer(tokenizer, de)
    overrides = {"model.backbone.name": "ViT-B-32", "model.languages": args.languages,
                 "model.adapter": STAGES[stage].adapter or "mla", "model.mla.hidden": 256, "model.dasd.core": 32,
                 "train.batch_size": args.batch, "train.max_steps": 1000, "train.precision": args.precision,
                 "run.home": str(work)}
    cfg = resolve_config(stage, None, [f"{k}={v}" for k, v in overrides.items()])
    state = TrainState.create(cfg, str(tokenizer), None, args.device)
    context = state.model.context_length
    ids, mask = target_tokenizer(str(tokenizer), context)(de[:args.batch])
    batch = {"text_ids": torch.from_numpy(ids), "text_mask": torch.from_numpy(mask),
             "text_en_ids": torch.from_numpy(english_tokenizer(context)(en[:args.batch])),
             "pixels": torch.randn(args.batch, 3, 224, 224)}
    return state, batch


def timed_step(state, batch, lang: str, device: str) -> tuple[float, dict]:
    import torch

    start = time.perf_counter()
    metrics = state.train_step(batch, lang)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, metrics


def run_one(stage: str, args) -> dict:
    """Smoke: build one stage's model in this (fresh) process and take one step; peak memory is its own."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    state, batch = build_state(stage, args)
    build_s = time.perf_counter() - t0
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    first_s, metrics = timed_step(state, batch, args.languages.split(",")[0], args.device)
    out = {"stage": stage, "batch": args.batch, "device": args.device, "precision": state.precision,
           "build_s": round(build_s, 2), "first_step_s": round(first_s, 3),
           "trainable_params": sum(p.numel() for p in state.optim.params),
           "loss_terms": {k: round(v, 5) for k, v in metrics.items()},
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if args.device.startswith("cuda"):
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def run_interleaved(stages: list[str], args) -> dict:
    """Timing: every stage's model in one process, steps taken round-robin, so load drift on a shared machine
    hits all stages alike and the ratios stay meaningful. Median seconds per step per stage."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    lang = args.languages.split(",")[0]
    built = {stage: build_state(stage, args) for stage in stages}
    for state, batch in built.values():  # warm-up step (allocator, first-call overheads)
        timed_step(state, batch, lang, args.device)
    times: dict[str, list[float]] = {stage: [] for stage in stages}
    optim_times: dict[str, list[float]] = {stage: [] for stage in stages}
    for stage, (state, _) in built.items():  # time the optimizer's share of each step (BertAdam over E and adapters)
        state.optim.step = _timed(state.optim.step, optim_times[stage], args.device)
    for _ in range(args.steps):
        for stage, (state, batch) in built.items():
            times[stage].append(timed_step(state, batch, lang, args.device)[0])
    out = {}
    for stage, t in times.items():
        step, opt = statistics.median(t), statistics.median(optim_times[stage][-args.steps:])
        out[stage] = {"step_s": round(step, 3), "step_s_all": [round(x, 3) for x in t],
                      "samples_per_s": round(args.batch / step, 2), "optimizer_step_s": round(opt, 3),
                      "optimizer_share": round(opt / step, 3)}
    return out


def _timed(fn, sink: list[float], device: str):
    import torch

    def wrapper(*a, **kw):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(*a, **kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        sink.append(time.perf_counter() - start)
        return result

    return wrapper


def subprocess_result(args, *extra: str) -> dict | None:
    cmd = [sys.executable, __file__, "--batch", str(args.batch), "--steps", str(args.steps), "--languages",
           args.languages, "--device", args.device, "--precision", args.precision, "--workdir", args.workdir, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="nlt,le,cla,cma")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--languages", default="de,fr,cs,zh,ja")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--out", default="bench/results/real_size_steps.json")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: smoke one stage, print JSON
    parser.add_argument("--interleaved", default=None, help=argparse.SUPPRESS)  # internal: time these stages
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return 0
    if args.interleaved:
        print("RESULT " + json.dumps(run_interleaved(args.interleaved.split(","), args)), flush=True)
        return 0
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="ccr-realsize-")
    stages = args.stages.split(",")
    report = {"benchmark": "real_size_steps", "backbone": "ViT-B-32", "token_table": [MBERT_VOCAB, 768],
              "batch": args.batch, "timed_steps": args.steps, "cpus": os.cpu_count(), "platform": platform.platform(),
              "stages": {}}
    for stage in stages:
        result = subprocess_result(args, "--one", stage)
        if result is None:
            return 1
        report["stages"][stage] = result
        print(f"{stage}: one step {result['first_step_s']:.2f} s (batch {args.batch}, built in {result['build_s']:.1f} s), "
              f"peak RSS {result['peak_rss_mib']:.0f} MiB, {result['trainable_params']:,} trainable", flush=True)
    timing = subprocess_result(args, "--interleaved", ",".join(stages))
    if timing is None:
        return 1
    for stage, t in timing.items():
        report["stages"][stage].update(t)
        print(f"{stage}: {t['step_s']:.2f} s/step median of {args.steps} interleaved ({t['samples_per_s']:.1f} "
              f"samples/s; optimizer step {t['optimizer_step_s']:.2f} s = {t['optimizer_share']:.0%})", flush=True)
    ratios = {}
    for dasd, mla in PAIRS.items():
        if dasd in report["stages"] and mla in report["stages"]:
            ratios[f"{dasd}/{mla}"] = round(report["stages"][dasd]["step_s"] / report["stages"][mla]["step_s"], 3)
    report["per_sample_cost_ratio"] = ratios
    if ratios:
        print("per-sample step cost, DASD / MLA:", ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
