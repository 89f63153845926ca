"""MLA language acquirers (spec section 2.1).

After every frozen CLIP text block l, for language ℓ, token-wise:
    x^l = h + U_{l,ℓ} ReLU(D_{l,ℓ} h + d_{l,ℓ}) + u_{l,ℓ}        D: width -> hidden, U: hidden -> width
PyTorch default init (not zero, not identity at start), as in the public code. The public code also registers
a LayerNorm per acquirer that the forward pass never uses; we leave it out (spec 2.1, "dead parameters").
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ccr_ray.models.adapters import TextAdapters


class LanguageAcquirer(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(width, hidden)
        self.up = nn.Linear(hidden, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.relu(self.down(h)))


class MLAAdapters(TextAdapters):
    """One acquirer per (language, layer); no per-caption context, no extra outputs (models/adapters.py)."""

    def __init__(self, languages: list[str], layers: int, width: int, hidden: int):
        super().__init__(languages)
        self.acquirers = nn.ModuleDict(
            {lang: nn.ModuleList([LanguageAcquirer(width, hidden) for _ in range(layers)]) for lang in languages}
        )

    def after_block(self, layer: int, h: torch.Tensor, lang: str, context) -> torch.Tensor:
        return self.acquirers[lang][layer](h)

    def language_dicts(self) -> list[str]:
        return ["acquirers"]
