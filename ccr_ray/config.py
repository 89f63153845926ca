"""Typed configuration: dataclasses, validated up front, with one precedence order.

Precedence, lowest to highest:
    dataclass defaults < stage table (`stages.py`) < config file (top level, then its `stages.<stage>` block)
    < `--set key=value` overrides < Ray Tune trial values.

A config crosses into Ray as a plain dict (`to_dict`) and becomes a dataclass again on the worker's first line
(`ExperimentConfig.from_dict`). Every error names the offending field (`optim.lr`, `train.batch_size`, ...).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGED_CONFIGS = Path(__file__).parent / "configs"

# Language codes the project knows how to name, tokenize and evaluate. English always takes the CLIP path.
KNOWN_LANGUAGES = ("en", "de", "fr", "cs", "zh", "ja", "nl", "es", "it", "ko", "pl", "ru", "tr", "id")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


# --------------------------------------------------------------------------------------------- sections


@dataclass
class BackboneConfig:
    name: str = "tiny-vit"  # open_clip model name (ViT-B-32), packaged preset (tiny-vit) or path to a JSON model config
    pretrained: str = ""  # local open_clip / OpenAI weights file; "" = random init. Nothing is ever downloaded
    quick_gelu: bool = True  # OpenAI CLIP weights were trained with QuickGELU


@dataclass
class TextConfig:
    tokenizer: str = "auto"  # Hugging Face tokenizer folder for non-English text (M-BERT); "auto" = the dataset's own
    embeddings_init: str = ""  # M-BERT folder whose word-embedding matrix initialises E; "" = random N(0, 0.02)
    embed_dim: int = 768  # width of the token table E (M-BERT: 768); a Linear maps it to the CLIP text width
    context_length: int = 0  # tokens per caption; 0 = the backbone's (77 for OpenAI CLIP)


@dataclass
class MLAConfig:
    hidden: int = 256  # acquirer bottleneck (512 -> hidden -> 512 after every frozen text block)


@dataclass
class DASDConfig:
    core: int = 32  # side of the generated per-caption core matrix (down 512->core, core x core, up core->512)
    sd_blocks: int = 2  # how many leading frozen text blocks feed semantic disentangling
    share_generators: bool = False  # one core generator for all layers instead of one per layer
    latent_dim: int = 512  # width of the latent z = QuickGELU(W_z [s_r; s_a])
    discriminator_hidden: list[int] = field(default_factory=lambda: [256, 128])
    discriminator_lr: float = 1e-4  # the discriminator's own Adam
    # Switches that restore the public code's behaviour (spec section 7); the defaults are the fixes.
    sr_init: str = "normal"  # "normal" = N(0, width^-1/2) like text_projection; "copy_text_projection"; "zeros"
    train_sd_norms: bool = True  # train LN_r / LN_a (public code: left at their initial values)
    mean_pool_padding: bool = False  # public code mean-pools s_a over padding too
    discriminator_in_main_optimizer: bool = False  # public code also steps D with the main optimizer


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    text: TextConfig = field(default_factory=TextConfig)
    adapter: str = "mla"  # "mla" (language acquirers) or "dasd" (dynamic adapters + semantic disentangling)
    mla: MLAConfig = field(default_factory=MLAConfig)
    dasd: DASDConfig = field(default_factory=DASDConfig)
    languages: list[str] = field(default_factory=lambda: ["de", "fr", "cs", "zh", "ja"])  # target languages


@dataclass
class DataConfig:
    pretrain: str = "{home}/data/demo"  # CC300K-style dataset folder (Parquet shards + dataset.json)
    downstream: str = "{home}/data/demo"  # downstream dataset for the finetune stages (Multi30K-style)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    val_max_images: int = 1000  # cap on validation images per language (0 = all)
    shuffle_buffer: int = 1024  # rows in the local shuffle buffer of each training stream
    prefetch_batches: int = 2
    # Ray Data may use at most this many CPUs; the rest stay with Ray Train (avoids the 2-core deadlock)
    max_cpus: float = 1.0
    task_cpus: float = 0.5  # Ray CPUs per read/preprocess task (fractions let reads and preprocessing share a core)
    parquet_footer_actors: int = 2  # RAY_DATA_PARQUET_FOOTER_NUM_ACTORS (faster reads of many files)
    # Frozen-feature cache (data/feature_cache.py): stages whose image / English text towers are frozen read their
    # embeddings, computed once, instead of images and English captions; built before training when missing or
    # stale. Stages that train those towers (clip, finetune-en) ignore it (the plan says so).
    feature_cache: bool = False
    feature_cache_dir: str = "{home}/cache/features"  # caches live in {feature_cache_dir}/{fingerprint[:16]}
    cache_actors: int = 1  # Ray Data actors holding the frozen towers while a cache builds
    cache_actor_cpus: float = 1.0  # Ray CPUs per actor; its torch threads = this, rounded up
    cache_batch_size: int = 64  # images per inference batch while building
    preserve_order: bool = False  # fixed row order in the training stream (reproducible batches; a little slower)


@dataclass
class LossConfig:
    scale: float = 100.0  # contrastive logit scale (the seeds: fixed 100, i.e. temperature 0.01)
    learn_scale: bool = False  # learn CLIP's logit_scale instead (only for the `clip` pre-training stand-in)
    weights: dict[str, float] = field(default_factory=dict)  # loss name -> weight; filled from the stage table


@dataclass
class OptimConfig:
    name: str = "bertadam"  # "bertadam" (the seeds': no bias correction, per-tensor clipping) or "adamw"
    lr: float = 1e-4
    warmup: float = 0.1  # fraction of total steps with linear warm-up
    schedule: str = "warmup_cosine"  # "warmup_cosine" (the seeds'), "warmup_linear" or "constant"
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    max_grad_norm: float = 1.0  # BertAdam: per parameter tensor; AdamW: global norm
    no_decay: list[str] = field(default_factory=lambda: ["bias", "LayerNorm.bias", "LayerNorm.weight"])


@dataclass
class TrainConfig:
    batch_size: int = 128  # global batch (split evenly over workers)
    max_steps: int = 1000  # optimizer steps (iteration mode, as the seeds' MetaLoader)
    eval_every: int = 200  # validate and checkpoint every N steps (and always at the last step); 0 = only at the end
    log_every: int = 20
    seed: int = 42
    precision: str = "auto"  # "auto" = bf16 autocast on GPU, fp32 on CPU; "fp32"; "bf16"
    select: str = "best"  # which checkpoint the stage hands on: "best" (by mean val mR) or "final"
    eval_before_training: bool = False  # score the starting weights on val first (logged only), as the seeds do


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # Ray CPUs reserved per Train worker
    torch_threads: int = 0  # intra-op threads per worker; 0 = (node cores - data.max_cpus) / workers on the node


@dataclass
class RunConfig:
    home: str = ""  # root for data and runs; "" = $CCR_RAY_HOME or ~/ccr_ray
    experiment: str = "demo"  # runs go to {home}/runs/{experiment}/{stage}; no timestamps, so runs resume
    # explicit start instead of the stage table's parent: a checkpoint folder, or "pretrained" = the local CLIP file
    # in model.backbone.pretrained with fresh multilingual weights (DASD's cross-lingual finetune starts so)
    init_from: str = ""
    max_failures: int = 1  # worker crashes survived by restarting from the last checkpoint
    checkpoints_to_keep: int = 2
    verbose: bool = True


@dataclass
class ExperimentConfig:
    stage: str = "nlt"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ------------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        cfg = _build(cls, data, "")
        cfg.validate()
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    # ------------------------------------------------------------------ derived values
    @property
    def home(self) -> Path:
        return resolve_home(self.run.home)

    def path(self, value: str) -> str:
        """Expand `{home}` and `~` in a path-valued field; relative paths stay relative to the caller's cwd."""
        if not value:
            return value
        return os.path.expanduser(value.replace("{home}", str(self.home)))

    def stage_dir(self, stage: str | None = None) -> Path:
        return self.home / "runs" / self.run.experiment / (stage or self.stage)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        from ccr_ray.stages import STAGES  # the table imports this module

        if self.stage not in STAGES:
            raise ConfigError(f"stage: unknown stage {self.stage!r}; known: {', '.join(STAGES)}")
        stage = STAGES[self.stage]
        m = self.model
        _check(m.adapter in ("mla", "dasd"), "model.adapter", f"must be 'mla' or 'dasd', got {m.adapter!r}")
        if stage.adapter is not None:
            _check(m.adapter == stage.adapter, "model.adapter",
                   f"stage {stage.name!r} trains {stage.adapter!r} adapters, but the config says {m.adapter!r}")
        _check(len(m.languages) > 0, "model.languages", "needs at least one target language")
        for lang in m.languages:
            _check(lang in KNOWN_LANGUAGES and lang != "en", "model.languages",
                   f"{lang!r} is not a known target language (known: {', '.join(KNOWN_LANGUAGES[1:])})")
        _check(len(set(m.languages)) == len(m.languages), "model.languages", "has duplicates")
        _check(m.mla.hidden > 0, "model.mla.hidden", "must be > 0")
        _check(m.dasd.core > 0, "model.dasd.core", "must be > 0")
        _check(m.dasd.sd_blocks >= 1, "model.dasd.sd_blocks", "must be >= 1")
        _check(m.dasd.sr_init in ("normal", "copy_text_projection", "zeros"), "model.dasd.sr_init",
               "must be normal, copy_text_projection or zeros")
        _check(m.dasd.latent_dim > 0 and all(h > 0 for h in m.dasd.discriminator_hidden), "model.dasd",
               "latent_dim and discriminator_hidden sizes must be > 0")
        _check(m.dasd.discriminator_lr > 0, "model.dasd.discriminator_lr", "must be > 0")
        _check(m.text.embed_dim > 0, "model.text.embed_dim", "must be > 0")
        _check(m.text.context_length >= 0, "model.text.context_length", "must be >= 0")
        o = self.optim
        _check(o.name in ("bertadam", "adamw"), "optim.name", f"must be 'bertadam' or 'adamw', got {o.name!r}")
        _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
        _check(0 <= o.warmup < 1, "optim.warmup", "must be in [0, 1)")
        _check(o.schedule in ("warmup_cosine", "warmup_linear", "constant"), "optim.schedule",
               "must be warmup_cosine, warmup_linear or constant")
        _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two values in [0, 1)")
        _check(o.eps > 0, "optim.eps", "must be > 0")
        t = self.train
        _check(t.batch_size > 0, "train.batch_size", "must be > 0")
        _check(t.max_steps > 0, "train.max_steps", "must be > 0")
        _check(t.eval_every >= 0, "train.eval_every", "must be >= 0")
        _check(t.log_every > 0, "train.log_every", "must be > 0")
        _check(t.precision in ("auto", "fp32", "bf16"), "train.precision", "must be auto, fp32 or bf16")
        _check(t.select in ("best", "final"), "train.select", "must be best or final")
        s = self.scaling
        _check(s.num_workers >= 1, "scaling.num_workers", "must be >= 1")
        _check(t.batch_size % s.num_workers == 0, "train.batch_size",
               f"{t.batch_size} is not divisible by scaling.num_workers={s.num_workers}")
        _check(s.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be > 0")
        _check(s.torch_threads >= 0, "scaling.torch_threads", "must be >= 0")
        _check(self.data.max_cpus > 0, "data.max_cpus", "must be > 0")
        _check(0 < self.data.task_cpus <= self.data.max_cpus, "data.task_cpus", "must be in (0, data.max_cpus]")
        _check(self.data.val_max_images >= 0, "data.val_max_images", "must be >= 0")
        _check(bool(self.data.feature_cache_dir), "data.feature_cache_dir", "must be a folder path")
        _check(self.data.cache_actors >= 1, "data.cache_actors", "must be >= 1")
        _check(self.data.cache_actor_cpus > 0, "data.cache_actor_cpus", "must be > 0")
        _check(self.data.cache_batch_size > 0, "data.cache_batch_size", "must be > 0")
        _check(self.loss.scale > 0, "loss.scale", "must be > 0")
        unknown = set(self.loss.weights) - set(stage.losses)
        _check(not unknown, "loss.weights",
               f"{sorted(unknown)} are not losses of stage {stage.name!r} (its losses: {', '.join(stage.losses)})")
        for name, w in self.loss.weights.items():
            _check(w >= 0, f"loss.weights.{name}", "must be >= 0")
        _check(self.run.experiment and "/" not in self.run.experiment, "run.experiment", "must be a plain name")
        _check(self.run.max_failures >= 0, "run.max_failures", "must be >= 0")
        _check(self.run.checkpoints_to_keep >= 1, "run.checkpoints_to_keep", "must be >= 1")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def resolve_home(home: str = "") -> Path:
    value = home or os.environ.get("CCR_RAY_HOME") or "~/ccr_ray"
    return Path(os.path.expanduser(value)).absolute()


# --------------------------------------------------------------------------------------------- dict <-> dataclass


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{_join(prefix, sorted(unknown)[0])}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], _join(prefix, f.name))
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, name)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # "de,fr" from --set
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return {str(k): _coerce(vt, v, f"{name}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported type {tp}")


# --------------------------------------------------------------------------------------------- merging


def deep_merge(base: dict, update: dict) -> dict:
    """Return base updated by update, recursively for nested mappings (dict-valued fields are replaced whole
    only when the update is not itself a mapping)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dotted_to_nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{"optim.lr": 1e-4} -> {"optim": {"lr": 1e-4}}"""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
        node[parts[-1]] = value
    return nested


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse `key=value` strings; values are JSON when they parse as JSON, else plain strings."""
    flat: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        flat[key] = value
    return dotted_to_nested(flat)


def load_config_file(path_or_name: str) -> dict[str, Any]:
    """A JSON config file, or the name of a packaged one (`demo`, `mla-vitb32`, ...)."""
    path = Path(path_or_name)
    if not path.exists():
        packaged = PACKAGED_CONFIGS / f"{path_or_name}.json"
        if packaged.exists():
            path = packaged
        else:
            known = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.json")))
            raise ConfigError(f"--config: no file {path_or_name!r} and no packaged config of that name ({known})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--config {path}: invalid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a JSON object at the top level")
    return data


def resolve_config(
    stage: str,
    config: str | dict | None = "demo",
    overrides: list[str] | dict | None = None,
    trial: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Build the validated config of one stage in the documented precedence order."""
    from ccr_ray.stages import STAGES

    if stage not in STAGES:
        raise ConfigError(f"--stage: unknown stage {stage!r}; known: {', '.join(STAGES)}")
    merged = ExperimentConfig(stage=stage).to_dict()
    merged = deep_merge(merged, STAGES[stage].config_defaults())
    if config is not None:
        file_cfg = load_config_file(config) if isinstance(config, str) else copy.deepcopy(config)
        per_stage = file_cfg.pop("stages", {}) or {}
        file_cfg.pop("description", None)
        if not isinstance(per_stage, dict):
            raise ConfigError("stages: expected a mapping of stage name -> overrides")
        unknown = set(per_stage) - set(STAGES)
        if unknown:
            raise ConfigError(f"stages.{sorted(unknown)[0]}: unknown stage (known: {', '.join(STAGES)})")
        merged = deep_merge(merged, file_cfg)
        merged = deep_merge(merged, per_stage.get(stage, {}))
    if overrides:
        merged = deep_merge(merged, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    if trial:
        merged = deep_merge(merged, dotted_to_nested(trial))
    merged["stage"] = stage
    return ExperimentConfig.from_dict(merged)
