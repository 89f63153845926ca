"""A stage's training state in plain PyTorch: the model, its optimizer, DASD's adversary, one step, validation,
save and restore. Built once per worker (`TrainState.create`); `train/loop.py` drives it.

Ray never appears here: the Ray Train worker (`train/worker.py`), the benchmarks and the tests build the same
state and hand it to the same loop.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import torch
from torch import nn

from ccr_ray import checkpoint as ckpt
from ccr_ray.config import EMBEDDINGS_TRANSFER as TRANSFER
from ccr_ray.config import ExperimentConfig
from ccr_ray.data.transforms import ImageTransform
from ccr_ray.eval.retrieval import evaluate_table, mean_mr
from ccr_ray.losses import LOSSES, LossContext, compute_losses
from ccr_ray.models import backbone
from ccr_ray.models.ccr import CCRModel, build_model, load_mbert_embeddings
from ccr_ray.models.precision import autocast, resolve_precision
from ccr_ray.optim import Optimization
from ccr_ray.stages import STAGES, Stage
from ccr_ray.storage import localize
from ccr_ray.tokenization import TokenizerInfo
from ccr_ray.train.adversarial import Adversary

MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps the learned scale at 100
# the token table E's parameter names, and a language's offset on it (optim.table_lr)
TABLE_PARAM = ("embedding.token_embedding.", "embedding.token_offsets.")
log = logging.getLogger(__name__)


def normalize_pixels(batch: dict[str, torch.Tensor], transform: ImageTransform) -> dict[str, torch.Tensor]:
    """uint8 pixels from the training stream (data/preprocess.py) -> float32 normalised, on their device, with
    the same arithmetic as `ImageTransform.normalize`. Float pixels (already normalised) pass through."""
    pixels = batch.get("pixels")
    if pixels is None or pixels.is_floating_point():
        return batch
    mean = torch.tensor(transform.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(transform.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return {**batch, "pixels": (pixels.to(torch.float32) / 255.0 - mean) / std}


def trim_padding(batch: dict[str, torch.Tensor], padding_invariant: bool, en_pad_id: int = 0
                 ) -> dict[str, torch.Tensor]:
    """Cut columns that are padding in every row. Exact: under CLIP's causal mask the pooled token ([SEP] / EOT)
    never attends to later positions; an HF tower masks padding out. Skipped for target captions when the adapter
    pools over padding (DASD's original mode). English ids end at their last non-padding token (`en_pad_id`, the
    English tokenizer's: CLIP's 0 after EOT, an HF tower's [PAD])."""
    out = dict(batch)
    if "text_en_ids" in out:
        ids = out["text_en_ids"]
        positions = torch.arange(1, ids.shape[1] + 1, device=ids.device)
        length = int(((ids != en_pad_id) * positions).max()) if ids.numel() else 0
        out["text_en_ids"] = ids[:, :length]
    if padding_invariant and "text_mask" in out:
        length = int(out["text_mask"].sum(dim=1).max())
        out["text_ids"], out["text_mask"] = out["text_ids"][:, :length], out["text_mask"][:, :length]
    return out


@dataclass
class ModelArtifacts:
    """What rebuilding the model needs besides the config (stored in every checkpoint)."""

    clip_cfg: dict
    tokens: TokenizerInfo
    preprocess: dict | None  # image preprocessing; None without an image tower
    tokenizer_dir: str


def build_stage_model(cfg: ExperimentConfig, stage: Stage, tokenizer_dir: str, parent: str | None
                      ) -> tuple[CCRModel, ModelArtifacts]:
    """Model for `stage`: from the parent checkpoint (all weights or backbone only, per the stage table), else
    from a local pretrained CLIP file / random init; E from M-BERT when configured and not inherited."""
    from ccr_ray.tokenization import target_tokenizer

    context = cfg.model.text.context_length
    if parent:
        meta = ckpt.read_meta(parent)
        clip_cfg = meta.clip_cfg
    else:
        clip_cfg = backbone.backbone_model_config(cfg.model.backbone.name, cfg.path(cfg.model.backbone.hf_model))
    if not context:
        context = int(clip_cfg["text_cfg"].get("context_length", 77))
    tokenizer = target_tokenizer(tokenizer_dir, context)
    tokens = tokenizer.info()
    model = build_model(cfg.model, tokens, clip_cfg=clip_cfg)
    inherit = stage.inherit_for(cfg)
    if parent:
        ckpt.load_weights_into(model, parent, inherit)
    elif cfg.model.backbone.pretrained:
        backbone.load_backbone_weights(model.clip, localize(cfg.path(cfg.model.backbone.pretrained)))
    if not parent or inherit == "backbone":
        model.adapters.after_backbone_loaded(model.text_tower)
    init = cfg.model.text.embeddings_init
    if init and (not parent or inherit == "backbone"):
        if init == TRANSFER:
            table = transferred_table(model, tokenizer, clip_cfg, cfg.train.seed)
            with torch.no_grad():  # E lives in the tower's input space: W_e starts as the identity
                model.embedding.proj.weight.copy_(torch.eye(model.width))
                model.embedding.proj.bias.zero_()
        else:
            table = table_rows(load_mbert_embeddings(localize(cfg.path(init))), tokenizer)
            if cfg.model.text.projection_init == "align":
                align_projection(model, table, tokenizer, clip_cfg)
        if tuple(table.shape) != tuple(model.embedding.token_embedding.weight.shape):
            raise ValueError(f"model.text.embeddings_init: table {tuple(table.shape)} does not match tokenizer "
                             f"vocabulary x embed_dim {tuple(model.embedding.token_embedding.weight.shape)}")
        with torch.no_grad():
            model.embedding.token_embedding.weight.copy_(table)
    return model, ModelArtifacts(clip_cfg, tokens, backbone.preprocess_config(model.clip), tokenizer_dir)


def table_rows(table: torch.Tensor, tokenizer) -> torch.Tensor:
    """A pretrained table's rows for the tokenizer's ids: the kept pieces of a trimmed vocabulary, in order; else
    the first vocab_size rows (XLM-R's table has rows past the tokenizer's 250,002 pieces)."""
    if tokenizer.kept is not None:
        if int(tokenizer.kept.max()) >= table.shape[0]:
            raise ValueError(f"model.text.embeddings_init: table has {table.shape[0]} rows; the tokenizer's vocabulary "
                             f"map keeps piece {int(tokenizer.kept.max())}")
        return table[torch.as_tensor(tokenizer.kept)]
    return table[:tokenizer.vocab_size] if table.shape[0] > tokenizer.vocab_size else table


def _vocabularies(tokenizer, clip_cfg: dict):
    """(target tokenizer, English tokenizer, the table's source ids in row order, special roles) for matching the
    table's pieces with the English tower's (models/vocab_transfer.py)."""
    from tokenizers import Tokenizer

    from ccr_ray.tokenization import (
        build_clip_bpe,
        english_tokenizer_folder,
        ensure_tokenizer_json,
        special_roles,
    )

    english_folder = english_tokenizer_folder(clip_cfg)
    english = Tokenizer.from_file(str(ensure_tokenizer_json(english_folder))) if english_folder else build_clip_bpe()
    target = Tokenizer.from_file(str(ensure_tokenizer_json(tokenizer.folder)))
    source_ids = tokenizer.kept.tolist() if tokenizer.kept is not None else list(range(tokenizer.vocab_size))
    target_roles, english_roles = special_roles(tokenizer.folder, target), special_roles(english_folder, english)
    roles = {role: (target_roles.get(role), english_roles.get(role)) for role in target_roles}
    return target, english, source_ids, roles


def align_projection(model: CCRModel, table: torch.Tensor, tokenizer, clip_cfg: dict) -> None:
    """model.text.projection_init=align: W_e, b_e fitted on the pieces both vocabularies have."""
    from ccr_ray.models.vocab_transfer import english_matches, fit_projection

    target, english, source_ids, roles = _vocabularies(tokenizer, clip_cfg)
    rows = model.text_tower.word_embeddings()
    weight, bias, fit = fit_projection(table, rows, english_matches(target, english, source_ids, roles))
    with torch.no_grad():
        model.embedding.proj.weight.copy_(weight)
        model.embedding.proj.bias.copy_(bias)
    log.info("model.text.projection_init=align: W_e fitted on %d pieces shared with the English vocabulary "
             "(mean cosine of the fit %.2f)", fit["pairs"], fit["fit_cosine"])


def transferred_table(model: CCRModel, tokenizer, clip_cfg: dict, seed: int) -> torch.Tensor:
    """Vocabulary transfer (models/vocab_transfer.py) from the English tower's own word embeddings and tokenizer."""
    from ccr_ray.models.vocab_transfer import transfer_table

    target, english, source_ids, roles = _vocabularies(tokenizer, clip_cfg)
    table, counts = transfer_table(target, english, model.text_tower.word_embeddings(), source_ids, roles, seed)
    log.info("model.text.embeddings_init=transfer: %d rows shared with the English vocabulary, %d composed of its "
             "pieces, %d random", counts["shared"], counts["composed"], counts["random"])
    return table


@dataclass
class TrainState:
    cfg: ExperimentConfig
    stage: Stage
    model: CCRModel  # the bare model (checkpoints, evaluation)
    artifacts: ModelArtifacts
    optim: Optimization
    device: torch.device
    precision: str
    loss_ctx: LossContext
    module: nn.Module | None = None  # what forward runs through: the model, or its DDP wrapper
    adversary: Adversary | None = None  # DASD's discriminator (training only; never part of the model)
    step: int = 0
    best_score: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.module is None:
            self.module = self.model

    # ---------------------------------------------------------------- building
    @classmethod
    def create(cls, cfg: ExperimentConfig, tokenizer_dir: str, parent: str | None, device: torch.device | str,
               rank: int = 0, world_size: int = 1) -> TrainState:
        stage = STAGES[cfg.stage]
        device = torch.device(device)
        # on shared storage: read through this machine's copy (a worker may be on another node than the driver)
        tokenizer_dir = localize(tokenizer_dir)
        parent = localize(parent) if parent else None
        torch.manual_seed(cfg.train.seed)
        model, artifacts = build_stage_model(cfg, stage, tokenizer_dir, parent)
        model.to(device)
        trainable = model.set_trainable(stage.trained_groups(cfg), new_languages=cfg.model.add_languages)
        adversary = None
        golds = [LOSSES[name].adversarial_gold for name, w in cfg.loss.weights.items() if w]
        gold = next((g for g in golds if g), None)
        if gold is not None:  # an adversarial loss is on: DASD's discriminator trains beside the model
            adversary = Adversary(model.width + model.text_tower.embed_dim, cfg.model.dasd, device, gold)
            if parent and stage.inherit_for(cfg) == "all":  # CMA carries CLA's discriminator on (spec 3.3)
                aux = ckpt.load_tensors(parent, ckpt.AUX_FILE)
                if aux is not None:
                    adversary.load_weights(aux)
            if adversary.in_main_optimizer:
                trainable = trainable + adversary.named_parameters()
        table_lr = cfg.optim.table_lr or None  # the token table's own learning rate, if set
        optim = Optimization(trainable, cfg.optim, t_total=cfg.train.max_steps,
                             lr_of=lambda name: table_lr if name.startswith(TABLE_PARAM) else None)
        ctx = LossContext(rank=rank, world_size=world_size, scale=cfg.loss.scale, adversary=adversary)
        return cls(cfg, stage, model, artifacts, optim, device, resolve_precision(cfg.train.precision, device), ctx,
                   adversary=adversary)

    @property
    def train_languages(self) -> list[str]:
        """Languages of the training batches (one drawn per step)."""
        return self.stage.train_languages(self.stage.targets(self.cfg))

    @property
    def eval_languages(self) -> list[str]:
        """Languages of the validation score (mean mR)."""
        return self.stage.eval_languages(self.stage.targets(self.cfg))

    @property
    def needs(self) -> set[str]:
        """Model outputs the stage's non-zero losses read (the forward computes nothing else)."""
        return {need for name, weight in self.cfg.loss.weights.items() if weight for need in LOSSES[name].needs}

    @cached_property
    def image_transform(self) -> ImageTransform | None:
        """The model's own preprocessing (fixed for the run): normalises stream pixels, preprocesses validation;
        None for a backbone without an image tower."""
        pre = self.artifacts.preprocess
        return ImageTransform.from_config(pre) if pre is not None else None

    # ---------------------------------------------------------------- one step
    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A stream batch as the model takes it: on the device, pixels normalised, all-padding columns cut."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        if "pixels" in batch:
            batch = normalize_pixels(batch, self.image_transform)
        return trim_padding(batch, self.model.adapters.padding_invariant, self.model.english_pad_id)

    def train_step(self, batch: dict[str, torch.Tensor], lang: str) -> dict[str, float]:
        self.module.train()
        batch = self.model_inputs(batch)
        with autocast(self.device, self.precision):
            outputs = self.module(batch, lang, tuple(self.needs))
        extra = self.adversary.step(outputs) if self.adversary is not None else {}
        if self.cfg.loss.learn_scale:
            self.loss_ctx.scale = self.model.clip.logit_scale.exp()
        total, terms = compute_losses(self.cfg.loss.weights, outputs, self.loss_ctx)
        self.optim.zero_grad()
        total.backward()
        if self.adversary is not None:
            self.adversary.after_backward()
        self.optim.step()
        if self.cfg.loss.learn_scale:
            with torch.no_grad():
                self.model.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.step += 1
        return {"loss": float(total.detach()), **terms, **extra}

    # ---------------------------------------------------------------- validation
    def validate(self, table: pa.Table, dataset_root: str | None = None) -> dict[str, float]:
        """Mean mR over the stage's validation languages; tracks the best score for model selection."""
        langs = self.eval_languages
        self.model.eval()
        results = evaluate_table(
            self.model, table, langs, self.image_transform,
            self.model.context_length, self.artifacts.tokenizer_dir, self.device,
            max_images=self.cfg.data.val_max_images, precision=self.precision, root=dataset_root)
        metrics: dict[str, float] = {f"val/mR/{lang}": r["mR"] for lang, r in results.items()}
        metrics["val/mR"] = mean_mr(results, langs)
        score = metrics["val/mR"]
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_step = score, self.step
        metrics["val/best_mR"] = self.best_score
        return metrics

    def score_starting_weights(self, table: pa.Table, dataset_root: str | None = None) -> dict[str, float]:
        """The weights the stage starts from, scored as the seeds do before training: logged for the curve,
        neither a checkpoint nor a candidate for model selection."""
        best = (self.best_score, self.best_step)
        metrics = self.validate(table, dataset_root)
        self.best_score, self.best_step = best
        metrics.pop("val/best_mR", None)
        self.history.append({"step": 0, "event": "before_training", **metrics})
        return metrics

    # ---------------------------------------------------------------- checkpoints
    def meta(self, metrics: dict | None = None) -> ckpt.CheckpointMeta:
        a = self.artifacts
        return ckpt.CheckpointMeta(config=self.cfg.to_dict(), clip_cfg=a.clip_cfg, tokens=a.tokens.to_dict(),
                                   preprocess=a.preprocess, stage=self.stage.name, step=self.step,
                                   metrics=metrics or {}, best_score=self.best_score, best_step=self.best_step,
                                   log=self.history)

    def save(self, path: str | Path, metrics: dict | None = None, with_optimizer: bool = True) -> Path:
        tensors, scalars = self.optim.state_tensors() if with_optimizer else (None, None)
        aux = None
        if self.adversary is not None:
            aux = self.adversary.weights()
            if with_optimizer:
                d_tensors, scalars["adversary"] = self.adversary.optimizer_state()
                tensors.update(d_tensors)
        return ckpt.save_checkpoint(path, self.model, self.meta(metrics), tokenizer_dir=self.artifacts.tokenizer_dir,
                                    aux=aux, optimizer=tensors, optimizer_scalars=scalars)

    def restore(self, path: str | Path) -> None:
        """Resume: weights, optimizer moments, step, best score and log from a checkpoint of this run."""
        meta = ckpt.read_meta(path)
        self.model.load_state_dict(ckpt.read_tensors(Path(path) / ckpt.MODEL_FILE), strict=True)
        tensors = ckpt.load_tensors(path, ckpt.OPTIM_FILE)
        scalars = ckpt.load_optimizer_scalars(path)
        if tensors is not None:
            self.optim.load_state_tensors(tensors, scalars)
        if self.adversary is not None:
            aux = ckpt.load_tensors(path, ckpt.AUX_FILE)
            if aux is not None:
                self.adversary.load_weights(aux)
            if tensors is not None:
                self.adversary.load_optimizer_state(tensors, scalars.get("adversary", {}))
        self.step, self.best_score, self.best_step = meta.step, meta.best_score, meta.best_step
        self.history = list(meta.log)
