"""BertAdam and the warm-up cosine schedule against a hand-written reference (spec section 1)."""

import math
from types import SimpleNamespace

import pytest
import torch

from ccr_ray.optim import BertAdam, Optimization, warmup_cosine


def test_warmup_cosine_formula():
    assert warmup_cosine(0.0, 0.1) == 0.0
    assert warmup_cosine(0.05, 0.1) == pytest.approx(0.5)
    # the cosine runs over the whole progress: at p = 0.1 the factor is ~0.976, not 1
    assert warmup_cosine(0.1, 0.1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))
    assert warmup_cosine(1.0, 0.1) == pytest.approx(0.0, abs=1e-12)


def reference_bertadam(params, grads_per_step, names, lr, t_total, warmup, wd, b1=0.9, b2=0.98, eps=1e-6, clip=1.0,
                       no_decay=("bias", "LayerNorm.bias", "LayerNorm.weight")):
    """Plain-python re-statement of pytorch-pretrained-bert's BertAdam as the seeds use it."""
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step, grads in enumerate(grads_per_step):
        for k, (p, g) in enumerate(zip(params, grads)):
            norm = float(g.norm())
            if norm > clip:  # per-tensor clipping
                g = g * (clip / (norm + 1e-6))
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            update = m[k] / (v[k].sqrt() + eps)  # no bias correction
            if not any(s in names[k] for s in no_decay):
                update = update + wd * p
            progress = step / t_total  # updates taken before this one
            factor = progress / warmup if progress < warmup else 0.5 * (1 + math.cos(math.pi * progress))
            params[k] = p - lr * factor * update
    return params


def test_bertadam_matches_reference():
    torch.manual_seed(0)
    names = ["ln_1.weight", "proj.bias", "acquirer.down.weight"]
    shapes = [(5,), (5,), (4, 5)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    steps = [[torch.randn(s) * (3.0 if i % 2 else 0.2) for s in shapes] for i in range(6)]
    cfg = SimpleNamespace(name="bertadam", lr=0.1, warmup=0.2, schedule="warmup_cosine", weight_decay=0.2,
                          betas=[0.9, 0.98], eps=1e-6, max_grad_norm=1.0,
                          no_decay=["bias", "LayerNorm.bias", "LayerNorm.weight"])
    expected = reference_bertadam([p.detach() for p in params], steps, names, lr=0.1, t_total=6, warmup=0.2, wd=0.2)
    opt = Optimization(list(zip(names, params)), cfg, t_total=6)
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for got, want in zip(params, expected):
        assert torch.allclose(got.detach(), want, atol=1e-6)
    # the first update used progress 0 -> lr 0: a ln weight (decayed: CLIP names it ln_*) still moved afterwards
    assert not torch.allclose(params[0].detach(), torch.zeros(5))


def test_bertadam_first_step_has_zero_lr_under_warmup():
    p = torch.nn.Parameter(torch.ones(3))
    opt = BertAdam([p], lr=1.0, t_total=10, warmup=0.1)
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


def test_optimizer_state_round_trip_continues_identically():
    torch.manual_seed(0)
    for name in ("bertadam", "adamw"):
        cfg = SimpleNamespace(name=name, lr=0.05, warmup=0.1, schedule="warmup_cosine", weight_decay=0.1,
                              betas=[0.9, 0.98], eps=1e-6, max_grad_norm=1.0, no_decay=["bias"])
        grads = [torch.randn(4) for _ in range(6)]
        a = torch.nn.Parameter(torch.randn(4))
        b = torch.nn.Parameter(a.detach().clone())
        opt_a = Optimization([("w", a)], cfg, t_total=6)
        for g in grads[:3]:
            a.grad = g.clone()
            opt_a.step()
        tensors, scalars = opt_a.state_tensors()
        b.data.copy_(a.detach())
        opt_b = Optimization([("w", b)], cfg, t_total=6)
        opt_b.load_state_tensors(tensors, scalars)
        for g in grads[3:]:
            a.grad, b.grad = g.clone(), g.clone()
            opt_a.step()
            opt_b.step()
        assert torch.allclose(a.detach(), b.detach(), atol=1e-7), name
