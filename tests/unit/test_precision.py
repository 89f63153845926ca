"""precision=auto and bf16 training on CPU: the rule (native bf16 and faster in a probe), and a micro `nlt` run in
bf16 whose loss curve stays within run-to-run noise of fp32 (two fp32 seeds give the noise)."""

import os

import numpy as np
import torch

from ccr_ray.models import precision
from ccr_ray.train import loop
from ccr_ray.train.plan import plan_stage
from ccr_ray.train.state import TrainState
from tests.unit.test_loop import stream


def test_auto_is_bf16_on_gpu_and_on_a_cpu_only_where_bf16_is_native_and_faster(monkeypatch):
    assert precision.bf16_speedup(size=64, rounds=1) > 0  # the probe runs here (its value depends on the CPU)
    assert precision.resolve_precision("fp32", torch.device("cuda")) == "fp32"
    assert precision.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert precision.resolve_precision("auto", torch.device("cuda")) == "bf16"
    for native, speedup, expected in ((True, 2.1, "bf16"), (True, 0.6, "fp32"), (False, 2.1, "fp32")):
        precision.cpu_bf16_is_faster.cache_clear()
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda n=native: n)
        monkeypatch.setattr(precision, "bf16_speedup", lambda s=speedup: s)
        assert precision.resolve_precision("auto", torch.device("cpu")) == expected, (native, speedup)
    precision.cpu_bf16_is_faster.cache_clear()


def losses(micro_cfg, micro_data, seed: int, prec: str) -> np.ndarray:
    clip = micro_cfg("clip")
    if not (clip.stage_dir() / "checkpoint").exists():
        TrainState.create(clip, os.path.join(micro_data, "tokenizer"), None, "cpu").save(
            clip.stage_dir() / "checkpoint", with_optimizer=False)
    plan = plan_stage(micro_cfg("nlt", train={"max_steps": 40, "log_every": 1, "eval_every": 0, "seed": seed,
                                              "precision": prec}, optim={"lr": 3e-3}))
    state = TrainState.create(plan.cfg, plan.tokenizer_dir, plan.parent, "cpu")
    assert state.precision == prec
    loop.run(state, stream(plan))
    return np.array([r["loss"] for r in state.history if "loss" in r])


def test_bf16_training_follows_the_fp32_loss_curve_within_seed_noise(micro_cfg, micro_data):
    fp32_a, fp32_b = losses(micro_cfg, micro_data, 1, "fp32"), losses(micro_cfg, micro_data, 2, "fp32")
    bf16 = losses(micro_cfg, micro_data, 1, "bf16")
    assert np.isfinite(bf16).all() and bf16[-5:].mean() < 0.5 * bf16[:5].mean()  # it learns
    noise = np.abs(fp32_a - fp32_b).mean()  # another seed: other batches, other init
    assert np.abs(bf16 - fp32_a).mean() <= 2 * noise, (np.abs(bf16 - fp32_a).mean(), noise)
    assert abs(bf16[-10:].mean() - fp32_a[-10:].mean()) <= 2 * abs(fp32_a[-10:].mean() - fp32_b[-10:].mean()) + 1e-3
