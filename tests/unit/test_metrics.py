"""recall@K, the seeds' group-max image->text rule and k-fold averaging against brute force."""

import itertools

import numpy as np
import pytest
import torch

from ccr_ray.eval.metrics import average_metrics, retrieval_metrics
from ccr_ray.eval.retrieval import score_language


def brute_force(sim, caption_image, k):
    n_caps, n_img = sim.shape
    t2i = 0
    for c in range(n_caps):
        own = sim[c, caption_image[c]]
        rank = sum(1 for j in range(n_img) if sim[c, j] > own)
        t2i += rank < k
    i2t = 0
    for j in range(n_img):
        group_score = [max(sim[c, j] for c in range(n_caps) if caption_image[c] == g) for g in range(n_img)]
        rank = sum(1 for g in range(n_img) if group_score[g] > group_score[j])
        i2t += rank < k
    return 100 * t2i / n_caps, 100 * i2t / n_img


def test_hand_made_case_group_max():
    # 3 images; image 0 has 2 captions, image 1 has 1, image 2 has 2 (contiguous groups)
    caption_image = np.array([0, 0, 1, 2, 2])
    sim = np.array([
        [0.9, 0.1, 0.0],   # cap of img0: rank 0
        [0.2, 0.8, 0.1],   # cap of img0: rank 1
        [0.3, 0.1, 0.4],   # cap of img1: rank 2
        [0.0, 0.0, 0.5],   # cap of img2: rank 0
        [0.6, 0.0, 0.1],   # cap of img2: rank 1
    ])
    m = retrieval_metrics(torch.tensor(sim), torch.tensor(caption_image))
    assert m["t2i_R@1"] == pytest.approx(40.0)  # captions 0 and 3
    # image 0: groups {0.9, 0.3, 0.6} -> own 0.9 rank 0; image 1: {0.8, 0.1, 0.0} -> own 0.1 rank 1;
    # image 2: {0.1, 0.4, 0.5} -> own 0.5 rank 0
    assert m["i2t_R@1"] == pytest.approx(200 / 3)
    assert m["i2t_R@5"] == pytest.approx(100.0)
    assert m["mR"] == pytest.approx(sum(m[k] for k in ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10")) / 6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cases_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 4, size=12)
    caption_image = np.repeat(np.arange(12), counts)
    sim = rng.normal(size=(len(caption_image), 12)).round(1)  # rounding creates ties
    m = retrieval_metrics(torch.tensor(sim), torch.tensor(caption_image))
    for k in (1, 5, 10):
        t2i, i2t = brute_force(sim, caption_image, k)
        assert m[f"t2i_R@{k}"] == pytest.approx(t2i)
        assert m[f"i2t_R@{k}"] == pytest.approx(i2t)


def test_perfect_and_chance():
    m = retrieval_metrics(torch.eye(50), torch.arange(50))
    assert m["mR"] == pytest.approx(100.0) and m["t2i_MedianR"] == 1.0


def test_folds_are_scored_separately_and_averaged():
    rng = np.random.default_rng(0)
    feats_img = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(8, 4))), dim=-1).float()
    feats_cap = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(8, 4))), dim=-1).float()
    caption_image = np.arange(8)
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    got = score_language(feats_img, feats_cap, caption_image, folds)
    per = []
    for f in (0, 1):
        idx = np.flatnonzero(folds == f)
        sim = feats_cap[idx] @ feats_img[idx].T
        per.append(retrieval_metrics(sim, torch.arange(4)))
    want = average_metrics(per)
    for key in ("t2i_R@1", "i2t_R@1", "mR"):
        assert got[key] == pytest.approx(want[key])
    assert got["folds"] == 2
    # folds differ from scoring all 8 images together (the check can fail)
    together = retrieval_metrics(feats_cap @ feats_img.T, torch.arange(8))
    assert any(together[k] != pytest.approx(got[k]) for k in ("t2i_R@1", "i2t_R@1", "t2i_R@5", "i2t_R@5"))


def test_permutation_invariance_of_image_order():
    rng = np.random.default_rng(5)
    sim = rng.normal(size=(6, 6))
    perm = list(itertools.islice(itertools.permutations(range(6)), 3))[-1]
    a = retrieval_metrics(torch.tensor(sim), torch.arange(6))
    b = retrieval_metrics(torch.tensor(sim[:, perm]), torch.tensor([perm.index(i) for i in range(6)]))
    assert a["mR"] == pytest.approx(b["mR"])
