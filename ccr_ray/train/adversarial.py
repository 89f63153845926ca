"""DASD's adversarial game, outside the model (spec 3.1c, 3.3). Plain PyTorch + torch.distributed, no Ray.

Per training step, after the model's forward pass:
  1. `train_discriminator(s_a, gold)`: L_D on detached inputs, the discriminator's own Adam (lr 1e-4,
     betas (0.9, 0.999), eps 1e-8, no decay), in fp32 outside autocast. Under DDP its gradients are averaged
     across workers by hand (the discriminator is not part of the DDP-wrapped model), so every worker keeps
     identical discriminator weights.
  2. The model loss gets `generator_loss(s_a, gold)` (weight 0.001 in the stage table): it flows into s_a only.
     The discriminator's weights take no part in the main update unless `discriminator_in_main_optimizer`
     restores the public code's behaviour (then their generator-loss gradients are averaged too and the main
     BertAdam steps them as well).
"Another sample's semantics" is the batch reversal i -> B-1-i of the *global* batch: under DDP the frozen gold
features are all-gathered (no gradient needed) and each worker takes its rows' partners from the reversed
whole, so N workers compute exactly what one process computes on the same global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ccr_ray.models.dasd import Discriminator, discriminator_loss, generator_loss
from ccr_ray.optim import load_optimizer_state, optimizer_state

PREFIX = "discriminator."
OPTIM_PREFIX = "adam/"  # its optimizer state beside the main optimizer's in optimizer.safetensors


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Adversary:
    """An auxiliary trainer beside the model: the training step calls `step(outputs)` after the forward pass (the
    discriminator's own update) and `after_backward()` after the model's backward; the generator term is a loss
    (`losses.adversarial_*`) that reads `LossContext.adversary`."""

    def __init__(self, in_dim: int, cfg, device: torch.device, gold: str):
        self.cfg = cfg
        self.gold = gold  # the model output that carries each sample's semantics: text_en (CLA) or image (CMA)
        self.in_main_optimizer = cfg.discriminator_in_main_optimizer
        self._partner: tuple[torch.Tensor, torch.Tensor] | None = None  # (gold, its partners) of the current step
        self.disc = Discriminator(in_dim, list(cfg.discriminator_hidden)).to(device)
        self.optimizer = torch.optim.Adam(self.disc.parameters(), lr=cfg.discriminator_lr, betas=(0.9, 0.999),
                                          eps=1e-8, weight_decay=0.0)
        if _distributed():
            for p in self.disc.parameters():
                dist.broadcast(p.data, src=0)

    # ---------------------------------------------------------------- the training step's hooks
    def step(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        """Discriminator first, on detached features, so the generator term sees the updated discriminator."""
        return {"discriminator": self.train_discriminator(outputs["s_a"], outputs[self.gold])}

    def after_backward(self) -> None:
        """The public code's mode: the main optimizer also steps the discriminator on averaged gradients."""
        if self.in_main_optimizer:
            self.sync_grads()

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(PREFIX + n, p) for n, p in self.disc.named_parameters()]

    def sync_grads(self) -> None:
        if not _distributed():
            return
        world = dist.get_world_size()
        for p in self.disc.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(world)

    def partner(self, gold: torch.Tensor) -> torch.Tensor:
        """gold of sample B-1-i of the global batch for each local row i (workers hold equal local batches).
        The discriminator step and the generator term of one training step share one all-gather."""
        if self._partner is not None and self._partner[0] is gold:
            return self._partner[1]
        if _distributed():
            gathered = [torch.empty_like(gold) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, gold.detach().contiguous())
            rank, local = dist.get_rank(), gold.shape[0]
            partner = torch.cat(gathered).flip(0)[rank * local:(rank + 1) * local]
        else:
            partner = gold.flip(0)
        self._partner = (gold, partner)
        return partner

    def train_discriminator(self, s_a: torch.Tensor, gold: torch.Tensor, partner: torch.Tensor | None = None
                            ) -> float:
        self.disc.train()
        self.optimizer.zero_grad(set_to_none=True)
        partner = self.partner(gold) if partner is None else partner
        with torch.autocast(device_type=s_a.device.type, enabled=False):
            loss = discriminator_loss(self.disc, s_a, gold, partner)
        loss.backward()
        self.sync_grads()
        self.optimizer.step()
        return float(loss.detach())

    def generator_loss(self, s_a: torch.Tensor, gold: torch.Tensor, partner: torch.Tensor | None = None
                       ) -> torch.Tensor:
        partner = self.partner(gold) if partner is None else partner
        # the discriminator's weights only need gradients when the main optimizer also steps them
        for p in self.disc.parameters():
            p.requires_grad_(self.in_main_optimizer)
        try:
            with torch.autocast(device_type=s_a.device.type, enabled=False):
                return generator_loss(self.disc, s_a, gold, partner)
        finally:
            for p in self.disc.parameters():
                p.requires_grad_(True)

    # ---------------------------------------------------------------- checkpoint state (tensors only)
    def weights(self) -> dict[str, torch.Tensor]:
        return {PREFIX + k: v for k, v in self.disc.state_dict().items()}

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> bool:
        own = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        if not own:
            return False
        self.disc.load_state_dict(own, strict=True)
        return True

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return optimizer_state(self.optimizer, self.named_parameters(), OPTIM_PREFIX)

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        load_optimizer_state(self.optimizer, self.named_parameters(), tensors, scalars, OPTIM_PREFIX)
