"""Losses against naive formulas (spec section 1 "CrossEn", section 2.3 MSE)."""

import math

import torch

from ccr_ray.losses import LOSSES, LossContext, compute_losses, contrastive, distill_mse


def naive_infonce(v, t, scale):
    """L = 1/2 [ -1/B sum_i log softmax_j(S_i.)_i  - 1/B sum_j log softmax_i(S_.j)_j ], S_ij = scale cos(v_i, t_j)."""
    B = v.shape[0]
    S = [[scale * float(torch.dot(v[i], t[j]) / (v[i].norm() * t[j].norm())) for j in range(B)] for i in range(B)]
    rows = sum(-(S[i][i] - math.log(sum(math.exp(S[i][j]) for j in range(B)))) for i in range(B)) / B
    cols = sum(-(S[j][j] - math.log(sum(math.exp(S[i][j]) for i in range(B)))) for j in range(B)) / B
    return 0.5 * (rows + cols)


def test_contrastive_matches_naive_formula():
    torch.manual_seed(0)
    v, t = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    for scale in (1.0, 10.0):  # 100 overflows math.exp in the naive reference; the formula is scale-generic
        got = contrastive(v.float(), t.float(), LossContext(scale=scale))
        assert abs(float(got) - naive_infonce(v, t, scale)) < 1e-4


def test_contrastive_prefers_matching_pairs():
    v = torch.eye(4)
    assert float(contrastive(v, v, LossContext(scale=100.0))) < 1e-3
    assert float(contrastive(v, v.roll(1, 0), LossContext(scale=100.0))) > 50


def test_mse_is_mean_over_all_elements_and_teacher_gets_no_gradient():
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5, requires_grad=True)
    got = distill_mse(s, t)
    assert abs(float(got.detach()) - float(((s - t) ** 2).sum().detach() / 15)) < 1e-6
    got.backward()
    assert s.grad is not None and t.grad is None


def test_compute_losses_weights_and_skips_zero():
    torch.manual_seed(1)
    out = {"image": torch.randn(4, 8), "text_target": torch.randn(4, 8), "text_en": torch.randn(4, 8)}
    ctx = LossContext(scale=100.0)
    total, terms = compute_losses({"distill_mse": 2.0, "contrastive_target": 0.5}, out, ctx)
    expected = 2.0 * distill_mse(out["text_target"], out["text_en"]) + 0.5 * contrastive(out["image"], out["text_target"], ctx)
    assert torch.allclose(total, expected)
    _, terms = compute_losses({"distill_mse": 1.0, "contrastive_target": 0.0}, out, ctx)
    assert set(terms) == {"distill_mse"}


def test_every_loss_declares_what_it_needs():
    for name, spec in LOSSES.items():
        assert spec.needs, name
