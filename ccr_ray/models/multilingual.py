"""The non-English input path shared by MLA and DASD (spec section 1, "new_embed").

    e_i = W_e . E[t_i] + b_e + P_i          E: token table (M-BERT's 119,547 x 768 for real runs), trainable
                                            W_e, b_e: Linear(768 -> width), trainable; P: CLIP's frozen positions
    e_i = W_e . (E[t_i] + O_l[t_i]) + ...   for a language l added to a trained model (not in the spec): E is
                                            frozen then (every other language reads its rows), and l reads it
                                            through an offset table of its own, O_l, zero at the start
    t   = LN_final(x^L)[pos(SEP)] . W_T     pooled at the [SEP] token, projected by CLIP's text projection
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MultilingualEmbedding(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, width: int, init_std: float = 0.02,
                 offset_languages: Sequence[str] = ()):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, embed_dim)  # E
        self.proj = nn.Linear(embed_dim, width)  # W_e, b_e
        # N(0, init_std) unless copied from M-BERT afterwards (0.02: BERT's initializer_range)
        nn.init.normal_(self.token_embedding.weight, std=init_std)
        # O_l per language that reads E through an offset (model.text.language_offsets): zero, so a language
        # starts from E's rows exactly; Adam on O_l from zero takes the steps it would take on E's rows
        self.token_offsets = nn.ModuleDict({lang: nn.Embedding(vocab_size, embed_dim) for lang in offset_languages})
        for table in self.token_offsets.values():
            nn.init.zeros_(table.weight)

    def forward(self, ids: torch.Tensor, lang: str | None = None,
                offset: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] -> [B, T, width]; the text tower adds its own positions (backbone.TextTower.embed).
        `offset`: rows already looked up ([B, T, embed_dim]) to add instead of `lang`'s own (the ONNX graph of
        all languages gathers them per language)."""
        rows = self.token_embedding(ids)
        if offset is None and lang in self.token_offsets:
            offset = self.token_offsets[lang](ids)
        if offset is not None:
            rows = rows + offset
        return self.proj(rows)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens of x [B, T, D]; with mask [B, T] (1 = real token) padding is excluded."""
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
