"""Numeric precision of a forward pass: one rule for training, validation and evaluation."""

from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(setting: str, device: torch.device) -> str:
    """"auto" = bf16 autocast on GPU, fp32 on CPU (bf16 matmuls on CPU are slower than fp32)."""
    if setting == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return setting


def autocast(device: torch.device, precision: str):
    """bf16 autocast (no GradScaler needed, unlike the seeds' fp16); the model itself stays fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
