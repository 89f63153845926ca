"""DASD: dynamic adapters with semantics disentangling (spec section 3). Plain PyTorch.

Semantic disentangling (SD), on the caption's first `sd_blocks` frozen CLIP text blocks (no adapters):
    g   = blocks[0:sd_blocks](e)                                      [B, T, width]
    s_r = LN_r(g)[pos(SEP)] . W_sr                                    [B, embed]   semantic-related
    s_a = mean_i LN_a(g)_i  (real tokens only; see below)             [B, width]   semantic-agnostic
    z   = QuickGELU(W_z [s_r; s_a] + b_z)                             [B, latent]
Dynamic adapter after every frozen block l, language ℓ, token-wise:
    M_l = reshape(G_l z + c_l)                                        [B, core, core], generated per caption
    x^l = h + U_{l,ℓ} ReLU((D_{l,ℓ} h + d_{l,ℓ}) M_l) + u_{l,ℓ}      D: width->core, U: core->width
The discriminator (training only, never part of CCRModel, so never exported or evaluated) tells
[s_a; own semantics] from [s_a; another sample's semantics]: `Discriminator`, stepped by train/adversarial.py.

Deviations from the public code (spec section 7), each with a switch in DASDConfig restoring the original:
  * W_sr is initialised (N(0, width^-1/2), like CLIP's text_projection); the public code leaves `torch.empty`
    memory. `sr_init`: "normal" | "copy_text_projection" | "zeros" (uninitialised memory is not reproducible, so
    it has no switch).
  * LN_r / LN_a are trained (`train_sd_norms=True`); the public code never gives them to the optimizer.
  * s_a averages real tokens only (`mean_pool_padding=False`); the public code averages all 77 positions,
    padding included.
  * The discriminator has only its own Adam (`discriminator_in_main_optimizer=False`); the public code also
    steps it with the main optimizer. And it is stepped outside the model's forward pass, in fp32, not inside
    forward under autocast (that one is not switchable: it is a side effect in forward).
The seeds compute the embedding twice (once per SD branch, identical values); we compute it once.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ccr_ray.models.adapters import TextAdapters
from ccr_ray.models.multilingual import masked_mean


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class DynamicAdapter(nn.Module):
    """Static per-language down/up projections of one layer; the core comes from a generator."""

    def __init__(self, width: int, core: int):
        super().__init__()
        self.down = nn.Linear(width, core)
        self.up = nn.Linear(core, width)

    def forward(self, h: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        # h [B, T, width], core [B, c, c]: row vector a_i^T M for every token
        return h + self.up(F.relu(torch.bmm(self.down(h), core)))


class DASDAdapters(TextAdapters):
    """Semantic disentangling in `prepare`, the dynamic adapters in `after_block`, s_r / s_a as aux outputs."""

    def __init__(self, languages: list[str], layers: int, width: int, cfg, embed_dim: int | None = None):
        super().__init__(languages)
        embed_dim = embed_dim or width
        self.core = cfg.core
        self.sd_blocks = cfg.sd_blocks
        if not 1 <= cfg.sd_blocks <= layers:
            raise ValueError(f"model.dasd.sd_blocks: {cfg.sd_blocks} is not in [1, {layers}]")
        self.mean_pool_padding = cfg.mean_pool_padding
        self.ln_r = nn.LayerNorm(width)
        self.ln_a = nn.LayerNorm(width)
        self.sr_projection = nn.Parameter(torch.empty(width, embed_dim))  # W_sr
        self.latent = nn.Sequential(nn.Linear(embed_dim + width, cfg.latent_dim), QuickGELU())  # W_z, b_z
        n_generators = 1 if cfg.share_generators else layers
        self.generators = nn.ModuleList([nn.Linear(cfg.latent_dim, cfg.core * cfg.core) for _ in range(n_generators)])
        self.adapters = nn.ModuleDict({lang: nn.ModuleList([DynamicAdapter(width, cfg.core) for _ in range(layers)])
                                       for lang in languages})
        self.train_sd_norms = cfg.train_sd_norms
        self.sr_init = cfg.sr_init
        self.reset_sr_projection()

    def reset_sr_projection(self, text_projection: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            if self.sr_init == "zeros":
                self.sr_projection.zero_()
            elif self.sr_init == "copy_text_projection" and text_projection is not None:
                self.sr_projection.copy_(text_projection)
            else:
                nn.init.normal_(self.sr_projection, std=self.sr_projection.shape[0] ** -0.5)

    def after_backbone_loaded(self, tower) -> None:
        """Called once the CLIP weights are in place (W_sr may copy the text projection)."""
        if self.sr_init == "copy_text_projection":
            self.reset_sr_projection(tower.after_load()["text_projection"])

    @property
    def padding_invariant(self) -> bool:
        """Outputs do not depend on padding length unless s_a pools over padding (the original mode)."""
        return not self.mean_pool_padding

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Registered but not trained in this configuration (LN_r / LN_a in the original mode)."""
        return [] if self.train_sd_norms else [*self.ln_r.parameters(), *self.ln_a.parameters()]

    # ---------------------------------------------------------------- semantic disentangling
    def disentangle(self, tower, x0: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None):
        g = tower.run_blocks(x0, 0, self.sd_blocks, tower.attention(ids, mask))  # [B, T, width]
        s_r = tower.pool(self.ln_r(g), ids, mask) @ self.sr_projection  # the sentence's token ([SEP])
        s_a = masked_mean(self.ln_a(g), None if self.mean_pool_padding else mask)
        z = self.latent(torch.cat([s_r, s_a], dim=-1))
        return s_r, s_a, z

    def cores(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The per-caption core of every layer, [B, core, core] each: a function of z alone."""
        return [gen(z).view(z.shape[0], self.core, self.core) for gen in self.generators]

    # ---------------------------------------------------------------- the adapter interface
    def prepare(self, tower, x0: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, lang: str):
        s_r, s_a, z = self.disentangle(tower, x0, ids, mask)
        return {"s_r": s_r, "s_a": s_a, "z": z, "cores": self.cores(z)}

    def after_block(self, layer: int, h: torch.Tensor, lang: str, context) -> torch.Tensor:
        cores = context["cores"]
        return self.adapters[lang][layer](h, cores[min(layer, len(cores) - 1)])

    def aux_outputs(self, context) -> dict[str, torch.Tensor]:
        return {"s_r": context["s_r"], "s_a": context["s_a"]}

    def language_dicts(self) -> list[str]:
        return ["adapters"]  # the generators, the SD pass and the latent MLP are shared by every language

    def dynamic_path_parameters(self) -> int:
        """Parameters of the dynamic-adapter path as the spec counts them (3.2): static down/up of every
        language, the generators and the latent MLP (not W_sr, the SD LayerNorms or the discriminator)."""
        parts = [self.adapters, self.generators, self.latent]
        return sum(p.numel() for part in parts for p in part.parameters())


class Discriminator(nn.Module):
    """The "not-so-weak" MLP: [s_a; semantics] (width + embed) -> 256 -> 128 -> 2 logits, Tanh activations."""

    def __init__(self, in_dim: int, hidden: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.Tanh()]
            prev = h
        layers.append(nn.Linear(prev, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def adversarial_pairs(s_a: torch.Tensor, gold: torch.Tensor, partner: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """m_i = [s_a,i ; gold_{B-1-i}] (another sample's semantics), u_i = [s_a,i ; gold_i] (its own).

    `partner` is gold_{B-1-i} for each local row; by default the local batch reversed. Under DDP the caller
    passes the reversal of the *global* batch (train/adversarial.py), so N workers pair the same samples as one
    process would."""
    partner = gold.flip(0) if partner is None else partner
    return torch.cat([s_a, partner], dim=-1), torch.cat([s_a, gold], dim=-1)


def onehot(n: int, index: int, like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(n, 2, dtype=like.dtype, device=like.device)
    out[:, index] = 1.0
    return out


def discriminator_loss(disc: nn.Module, s_a: torch.Tensor, gold: torch.Tensor, partner: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """L_D = 1/2 [BCE(D(m), onehot 1) + BCE(D(u), onehot 0)], on detached inputs (spec 3.3)."""
    partner = None if partner is None else partner.detach().float()
    m, u = adversarial_pairs(s_a.detach().float(), gold.detach().float(), partner)
    lm, lu = disc(m), disc(u)
    return 0.5 * (F.binary_cross_entropy_with_logits(lm, onehot(len(m), 1, lm))
                  + F.binary_cross_entropy_with_logits(lu, onehot(len(u), 0, lu)))


def generator_loss(disc: nn.Module, s_a: torch.Tensor, gold: torch.Tensor, partner: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """BCE(D(m), onehot 0), averaged over B x 2 logits; gradients reach s_a (gold is a frozen feature)."""
    partner = None if partner is None else partner.detach().float()
    m, _ = adversarial_pairs(s_a.float(), gold.detach().float(), partner)
    logits = disc(m)
    return F.binary_cross_entropy_with_logits(logits, onehot(len(m), 0, logits))
