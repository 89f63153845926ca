"""Retrieval metrics exactly as the seeds' `metrics.py` computes them (spec section 5). Pure torch.

Inputs: similarity S [n_captions, n_images] and `caption_image` [n_captions]: the image each caption belongs to.
* text->image: each caption ranks the N images; rank = number of images scoring strictly higher than its own
  (ties count in the caption's favour, as the seeds' sort-and-find does).
* image->text, the seeds' "group-max" rule: an image scores each image's *group* of captions by the max over
  the group; it ranks the N groups and looks for its own group. (More lenient than ranking all 5N captions;
  identical for one caption per image.)
* R@K = % of queries with rank < K; MedianR/MeanR are 1-based; mR = mean of the six recalls.
"""

from __future__ import annotations

import torch

KS = (1, 5, 10)
RECALL_KEYS = tuple(f"t2i_R@{k}" for k in KS) + tuple(f"i2t_R@{k}" for k in KS)


def _ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """scores [Q, C], target [Q] -> 0-based rank of the target column (strictly-greater count)."""
    own = scores.gather(1, target.view(-1, 1))
    return (scores > own).sum(dim=1)


def group_max(sim: torch.Tensor, caption_image: torch.Tensor, num_images: int) -> torch.Tensor:
    """[n_captions, n_images] -> [n_images (groups), n_images]: G[g, j] = max over captions c of image g."""
    index = caption_image.view(-1, 1).expand_as(sim)
    out = torch.full((num_images, sim.shape[1]), float("-inf"), dtype=sim.dtype, device=sim.device)
    return out.scatter_reduce(0, index, sim, reduce="amax", include_self=True)


def retrieval_metrics(sim: torch.Tensor, caption_image: torch.Tensor) -> dict[str, float]:
    sim = sim.float()
    caption_image = caption_image.long().to(sim.device)
    n_images = sim.shape[1]
    t2i = _ranks(sim, caption_image)
    groups = group_max(sim, caption_image, n_images)  # [group, image]
    i2t = _ranks(groups.t(), torch.arange(n_images, device=sim.device))
    out: dict[str, float] = {}
    for name, ranks in (("t2i", t2i), ("i2t", i2t)):
        for k in KS:
            out[f"{name}_R@{k}"] = float((ranks < k).float().mean() * 100)
        out[f"{name}_MedianR"] = float(ranks.float().median() + 1)
        out[f"{name}_MeanR"] = float(ranks.float().mean() + 1)
    out["t2i_AR"] = sum(out[f"t2i_R@{k}"] for k in KS) / 3
    out["i2t_AR"] = sum(out[f"i2t_R@{k}"] for k in KS) / 3
    out["mR"] = sum(out[k] for k in RECALL_KEYS) / 6
    out["n_captions"] = int(sim.shape[0])
    out["n_images"] = int(n_images)
    return out


def average_metrics(per_fold: list[dict[str, float]]) -> dict[str, float]:
    """k-fold averaging (COCO 5x1K): the mean of each metric over folds."""
    if not per_fold:
        raise ValueError("no folds to average")
    keys = per_fold[0].keys()
    out = {k: sum(m[k] for m in per_fold) / len(per_fold) for k in keys}
    out["folds"] = len(per_fold)
    return out
