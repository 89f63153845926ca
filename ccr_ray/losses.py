"""Losses by name. Stages (stages.py) list them with weights; `compute_losses` sums what a stage asks for.

    contrastive_en       symmetric InfoNCE between images and English text (CLIP path)   spec 1, "CrossEn"
    contrastive_target   symmetric InfoNCE between images and target-language text        MLA LE / DASD CMA
    distill_mse          MSE(f_target, f_en) over B x D elements, teacher without grad     MLA NLT / DASD CLA, CMA
    consistency_l1       L1(s_r, f_en): DASD semantic consistency in CLA                   spec 3.3
    consistency_smoothl1 SmoothL1_beta=1(s_r, v): DASD semantic consistency in CMA         spec 3.3
    adversarial_text     generator term BCE(D([s_a; f_en reversed]), onehot 0), CLA        spec 3.3
    adversarial_image    the same with the image embedding v as the semantics, CMA         spec 3.3

The contrastive loss is open_clip's `ClipLoss` with `local_loss=True, gather_with_grad=True`: every worker
scores its own rows against the features gathered from all workers (with gradients), so under DDP the averaged
gradient equals the single-process gradient of the global batch. It receives rank/world_size, so it is tested
with world_size=1 and never imports Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from ccr_ray._compat import ensure_torchvision_importable

ensure_torchvision_importable()
from open_clip.loss import ClipLoss  # noqa: E402


@dataclass
class LossContext:
    rank: int = 0
    world_size: int = 1
    scale: torch.Tensor | float = 100.0  # contrastive logit scale: fixed 100, or exp(learned logit_scale)
    adversary: Any = None  # DASD's discriminator (train/adversarial.py) for the adversarial generator terms
    _clip_loss: ClipLoss | None = None

    @property
    def clip_loss(self) -> ClipLoss:
        if self._clip_loss is None:
            self._clip_loss = ClipLoss(local_loss=self.world_size > 1, gather_with_grad=self.world_size > 1,
                                       cache_labels=True, rank=self.rank, world_size=self.world_size)
        return self._clip_loss


def contrastive(image: torch.Tensor, text: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    scale = ctx.scale if torch.is_tensor(ctx.scale) else torch.tensor(ctx.scale, device=image.device)
    return ctx.clip_loss(F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1), scale)


def distill_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student.float(), teacher.detach().float())


@dataclass(frozen=True)
class LossSpec:
    needs: tuple[str, ...]  # model outputs the loss reads
    fn: Callable[[dict, LossContext], torch.Tensor]
    adversarial_gold: str | None = None  # output the discriminator pairs with s_a (adversarial losses only)


def consistency_l1(s_r: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(s_r.float(), teacher.detach().float())


def consistency_smoothl1(s_r: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(s_r.float(), image.detach().float(), beta=1.0)


def adversarial(gold: str) -> LossSpec:
    """Generator term; the discriminator itself is ctx.adversary (train/adversarial.py)."""
    return LossSpec(("text_target", "s_a", gold), lambda o, c: c.adversary.generator_loss(o["s_a"], o[gold]),
                    adversarial_gold=gold)


LOSSES: dict[str, LossSpec] = {
    "contrastive_en": LossSpec(("image", "text_en"), lambda o, c: contrastive(o["image"], o["text_en"], c)),
    "contrastive_target": LossSpec(("image", "text_target"),
                                   lambda o, c: contrastive(o["image"], o["text_target"], c)),
    "distill_mse": LossSpec(("text_target", "text_en"), lambda o, c: distill_mse(o["text_target"], o["text_en"])),
    "consistency_l1": LossSpec(("text_target", "s_r", "text_en"), lambda o, c: consistency_l1(o["s_r"], o["text_en"])),
    "consistency_smoothl1": LossSpec(("text_target", "s_r", "image"),
                                     lambda o, c: consistency_smoothl1(o["s_r"], o["image"])),
    "adversarial_text": adversarial("text_en"),
    "adversarial_image": adversarial("image"),
}


def compute_losses(weights: Mapping[str, float], outputs: dict, ctx: LossContext
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the named losses (weight 0 = not computed) and each term's unweighted value."""
    total = None
    terms: dict[str, float] = {}
    for name, weight in weights.items():
        if weight == 0:
            continue
        if name not in LOSSES:
            raise KeyError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
        value = LOSSES[name].fn(outputs, ctx)
        terms[name] = float(value.detach())
        total = weight * value if total is None else total + weight * value
    if total is None:
        raise ValueError("every loss weight is 0: nothing to train")
    return total, terms
