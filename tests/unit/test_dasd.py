"""DASD contracts (spec section 3): parameter counts, the generated core, SD on the first blocks, every loss term
against a naive formula, the discriminator's separate optimizer, the public-code switches."""

import os

import pytest
import torch
from torch.nn import functional as F

from ccr_ray.config import DASDConfig, ModelConfig
from ccr_ray.losses import LossContext, compute_losses
from ccr_ray.models.ccr import build_model
from ccr_ray.models.dasd import (
    DASDAdapters,
    Discriminator,
    adversarial_pairs,
    discriminator_loss,
    generator_loss,
)
from ccr_ray.tokenization import TokenizerInfo
from ccr_ray.train.adversarial import Adversary
from ccr_ray.train.state import TrainState
from tests.conftest import MICRO_PRESET
from tests.unit.test_models import target_ids

TOKENS = TokenizerInfo(vocab_size=50, pad_id=0, cls_id=2, sep_id=3)


def dasd_model(**dasd):
    cfg = ModelConfig(adapter="dasd", languages=["de", "fr"])
    cfg.backbone.name = MICRO_PRESET
    cfg.text.embed_dim = 24
    cfg.dasd = DASDConfig(core=4, latent_dim=16, **dasd)
    torch.manual_seed(0)
    return build_model(cfg, TOKENS)


def test_parameter_counts_at_real_size():
    adapters = DASDAdapters(["ja"], layers=12, width=512, cfg=DASDConfig(core=32, latent_dim=512), embed_dim=512)
    assert adapters.dynamic_path_parameters() == 7_228_288
    assert adapters.sr_projection.numel() == 262_144
    assert sum(p.numel() for p in Discriminator(1024, [256, 128]).parameters()) == 295_554


def test_core_is_generated_per_caption_from_z_alone():
    model = dasd_model().eval()
    ids, mask = target_ids(2)
    with torch.no_grad():
        x0 = model.text_tower.embed(model.embedding(ids))
        _, _, z = model.adapters.disentangle(model.text_tower, x0, ids, mask)
        cores = model.adapters.cores(z)
        again = model.adapters.cores(z.clone())
    assert len(cores) == model.num_layers and cores[0].shape == (2, 4, 4)
    assert not torch.allclose(cores[0][0], cores[0][1])  # two captions, two cores
    assert all(torch.equal(a, b) for a, b in zip(cores, again))  # same z, same cores
    shared = dasd_model(share_generators=True)
    assert len(shared.adapters.generators) == 1


def test_sd_uses_exactly_the_first_two_blocks():
    model = dasd_model().eval()
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, b in
             enumerate(model.clip.transformer.resblocks)]
    ids, mask = target_ids(2)
    with torch.no_grad():
        x0 = model.text_tower.embed(model.embedding(ids))
        model.adapters.disentangle(model.text_tower, x0, ids, mask)
    for h in hooks:
        h.remove()
    assert calls == [0, 1]
    assert model.adapters.sd_blocks == 2


def test_padding_switch():
    ids, mask = target_ids(3)
    pad = lambda t: F.pad(t, (0, 10))  # noqa: E731
    fixed, original = dasd_model().eval(), dasd_model(mean_pool_padding=True).eval()
    with torch.no_grad():
        assert torch.allclose(fixed.encode_text(ids, mask, "de"), fixed.encode_text(pad(ids), pad(mask), "de"),
                              atol=1e-5)
        assert not torch.allclose(original.encode_text(ids, mask, "de"),
                                  original.encode_text(pad(ids), pad(mask), "de"), atol=1e-5)
    assert fixed.adapters.padding_invariant and not original.adapters.padding_invariant


def test_sr_init_and_norm_switches():
    assert dasd_model().adapters.sr_projection.abs().sum() > 0  # initialised (public code: torch.empty)
    assert dasd_model(sr_init="zeros").adapters.sr_projection.abs().sum() == 0
    model = dasd_model(sr_init="copy_text_projection")
    model.adapters.after_backbone_loaded(model.text_tower)
    assert torch.equal(model.adapters.sr_projection, model.clip.text_projection)
    frozen = dasd_model(train_sd_norms=False)
    trainable = {n for n, _ in frozen.set_trainable(["adapters"])}
    assert not any(".ln_r." in n or ".ln_a." in n for n in trainable)
    assert any(".ln_r." in n for n, _ in dasd_model().set_trainable(["adapters"]))


def test_adversarial_pairs_and_losses_match_naive_formulas():
    torch.manual_seed(0)
    s_a, gold = torch.randn(4, 3), torch.randn(4, 5)
    m, u = adversarial_pairs(s_a, gold)
    for i in range(4):
        assert torch.equal(m[i], torch.cat([s_a[i], gold[3 - i]]))  # another sample's semantics (batch reversed)
        assert torch.equal(u[i], torch.cat([s_a[i], gold[i]]))
    disc = Discriminator(8, [6])

    def bce(logits, target):  # naive binary cross-entropy with logits, mean over B x 2
        p = torch.sigmoid(logits)
        return -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()

    one = torch.tensor([[0.0, 1.0]]).repeat(4, 1)
    zero = torch.tensor([[1.0, 0.0]]).repeat(4, 1)
    assert torch.allclose(discriminator_loss(disc, s_a, gold), 0.5 * (bce(disc(m), one) + bce(disc(u), zero)), atol=1e-6)
    assert torch.allclose(generator_loss(disc, s_a, gold), bce(disc(m), zero), atol=1e-6)
    s_r, f_en, v = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5) * 3
    out = {"s_r": s_r, "text_en": f_en, "image": v, "text_target": torch.randn(4, 5), "s_a": s_a}
    _, terms = compute_losses({"consistency_l1": 1.0, "consistency_smoothl1": 1.0}, out, LossContext())
    assert terms["consistency_l1"] == pytest.approx(float((s_r - f_en).abs().mean()), rel=1e-6)
    d = (s_r - v).abs()
    naive = torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()
    assert terms["consistency_smoothl1"] == pytest.approx(float(naive), rel=1e-6)


def test_generator_term_reaches_s_a_not_the_discriminator():
    adv = Adversary(8, DASDConfig(discriminator_hidden=[6]), torch.device("cpu"), gold="text_en")
    s_a = torch.randn(4, 3, requires_grad=True)
    adv.generator_loss(s_a, torch.randn(4, 5)).backward()
    assert s_a.grad is not None and s_a.grad.abs().sum() > 0
    assert all(p.grad is None for p in adv.disc.parameters())


@pytest.mark.parametrize("in_main", [False, True])
def test_discriminator_and_main_optimizers(micro_cfg, micro_data, in_main):
    cfg = micro_cfg("cla", model={"adapter": "dasd", "dasd": {"core": 8, "latent_dim": 32,
                                                              "discriminator_in_main_optimizer": in_main}})
    state = TrainState.create(cfg, os.path.join(micro_data, "tokenizer"), None, "cpu")
    main = {id(p) for g in state.optim.optimizer.param_groups for p in g["params"]}
    disc = {id(p) for p in state.adversary.disc.parameters()}
    assert {id(p) for g in state.adversary.optimizer.param_groups for p in g["params"]} == disc
    assert (main & disc == disc) if in_main else not (main & disc)


def test_cla_step_moves_everything_it_should(micro_cfg, micro_data, tmp_path):
    from tests.unit.test_checkpoint import batch_for

    tok = os.path.join(micro_data, "tokenizer")
    cfg = micro_cfg("cla", model={"adapter": "dasd"})
    state = TrainState.create(cfg, tok, None, "cpu")
    frozen = {n: p.detach().clone() for n, p in state.model.named_parameters() if not p.requires_grad}
    disc_before = [p.detach().clone() for p in state.adversary.disc.parameters()]
    metrics = state.train_step(batch_for(state), "de")
    assert {"distill_mse", "consistency_l1", "adversarial_text", "discriminator"} <= set(metrics)
    assert all(torch.equal(p, frozen[n]) for n, p in state.model.named_parameters() if n in frozen)
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, state.adversary.disc.parameters()))
    state.train_step(batch_for(state), "de")
    state.save(tmp_path / "cla")
    assert (tmp_path / "cla" / "aux.safetensors").exists()
    # CMA starts from CLA: adapters, embedding and discriminator carry over
    cma = TrainState.create(micro_cfg("cma", model={"adapter": "dasd"}), tok, str(tmp_path / "cla"), "cpu")
    for a, b in zip(state.adversary.disc.parameters(), cma.adversary.disc.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(cma.model.adapters.sr_projection, state.model.adapters.sr_projection)
    metrics = cma.train_step(batch_for(cma), "zh")
    assert {"contrastive_target", "distill_mse", "consistency_smoothl1", "adversarial_image"} <= set(metrics)
    # resume restores the discriminator and its optimizer too
    again = TrainState.create(cfg, tok, None, "cpu")
    again.restore(tmp_path / "cla")
    assert again.adversary.optimizer.state and all(
        torch.equal(a, b) for a, b in zip(state.adversary.disc.parameters(), again.adversary.disc.parameters()))


def test_discriminator_is_not_part_of_the_model():
    model = dasd_model()
    assert not any("discriminator" in n or "disc." in n for n, _ in model.named_parameters())
