"""The interface every text adapter implements (MLA's acquirers, DASD's dynamic adapters, any future one).

`CCRModel.encode_text` runs the frozen text tower (`backbone.TextTower`: CLIP or HF) and calls, in order:

    context = adapters.prepare(tower, x0, ids, mask, lang)     once per caption batch (DASD: semantic disentangling)
    h = adapters.after_block(layer, h, lang, context)           after every frozen block
    aux = adapters.aux_outputs(context)                         extra features the stage's losses read (s_r, s_a)

and around training and export:

    adapters.after_backbone_loaded(tower)     once the backbone's weights are in place (DASD may copy W_T)
    adapters.frozen_parameters()              registered but not trained in this configuration
    adapters.language_dicts()                 names of the ModuleDicts keyed by language (the exporter stacks them)
    adapters.padding_invariant                False when outputs depend on padding (then batches are not trimmed)

Every method but `after_block` has a no-op default, so an adapter implements only what it uses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TextAdapters(nn.Module):
    padding_invariant: bool = True  # outputs do not depend on how much padding follows [SEP]

    def __init__(self, languages: list[str]):
        super().__init__()
        self.languages = list(languages)

    def prepare(self, tower, x0: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, lang: str) -> Any:
        return None

    def after_block(self, layer: int, h: torch.Tensor, lang: str, context: Any) -> torch.Tensor:
        raise NotImplementedError

    def aux_outputs(self, context: Any) -> dict[str, torch.Tensor]:
        return {}

    def after_backbone_loaded(self, tower) -> None:
        return None

    def frozen_parameters(self) -> list[nn.Parameter]:
        return []

    def language_dicts(self) -> list[str]:
        """Names (under this module) of the ModuleDicts that hold one entry per language."""
        return []
