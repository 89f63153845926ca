"""Numeric precision of a forward pass: one rule for training, validation and evaluation.

"auto" is bf16 autocast where the device computes bf16 faster than fp32, else fp32:
    GPU   bf16 (tensor cores; no GradScaler needed, unlike the seeds' fp16)
    CPU   bf16 only when the CPU has native bf16 instructions (AVX512-BF16 or AMX) *and* a short GEMM probe on
          this machine runs bf16 at least 1.15x the fp32 rate; otherwise fp32. Both are needed: an AMD EPYC with
          AVX512-BF16 measured 211 vs 99 GFLOP/s (one thread), while on another CPU with the same flag oneDNN's bf16
          path ran slower than fp32. The probe compares the two back to back (a ratio within one run), once per
          process, and costs ~0.1 s.
The model itself stays fp32; only the forward's matmuls run in bf16.
"""

from __future__ import annotations

import functools
import time
from contextlib import nullcontext

import torch

PRECISIONS = ("auto", "fp32", "bf16")
MIN_SPEEDUP = 1.15  # bf16 must beat fp32 by this much in the probe to be chosen on a CPU


def resolve_precision(setting: str, device: torch.device) -> str:
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16"
    return "bf16" if cpu_bf16_is_faster() else "fp32"


def cpu_has_native_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_faster() -> bool:
    return cpu_has_native_bf16() and bf16_speedup() >= MIN_SPEEDUP


def bf16_speedup(size: int = 384, rounds: int = 5) -> float:
    """bf16 over fp32 matmul rate on this CPU, with the current thread count: the best of `rounds` alternating
    timings of a [4*size, size] x [size, 4*size] product (a transformer FFN's shape), so load hits both alike."""
    a = torch.randn(4 * size, size)
    b = torch.randn(size, 4 * size)
    pairs = {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}
    best = {k: float("inf") for k in pairs}
    for _ in range(rounds):
        for name, (x, y) in pairs.items():
            x @ y  # warm (oneDNN primitive creation)
            start = time.perf_counter()
            for _ in range(4):
                x @ y
            best[name] = min(best[name], time.perf_counter() - start)
    return best["fp32"] / max(best["bf16"], 1e-12)


def autocast(device: torch.device, precision: str):
    """bf16 autocast (no GradScaler needed, unlike the seeds' fp16); the model itself stays fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
