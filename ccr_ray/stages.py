"""The stage table: the only place in the library where a stage id appears; and the stage-aware resolution of a
config (`resolve_config`), which layers the table's values between the dataclass defaults and the user's.

Each entry says what trains (parameter groups of `CCRModel.param_groups()`), which losses with which default
weights (names in `losses.LOSSES`), which data (dataset and inputs per batch), which parent checkpoint it starts
from and what it inherits, and the seeds' hyper-parameters (spec sections 2.3 and 3.3) as defaults that a config
file overrides. Adding a stage = one entry here + one test row + one README line.

Reading of `finetune-all` (spec 2.3 leaves it ambiguous): we implement reading (b): the LE objective on the
downstream data's own target-language captions, training only the acquirers and the multilingual embedding,
on top of the finetune-en checkpoint. That is what MLA's README evaluation loads (CLIP from finetune-en,
acquirers/embedding from finetune-all).

DASD's two settings are recipes over these entries (README): zero-shot = clip (or a pretrained CLIP) -> cla -> cma;
cross-lingual finetune = finetune-en from the pretrained CLIP (`run.init_from`), then cla -> cma on the
machine-translated downstream captions (`data.pretrain` pointing at them).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, Literal

from ccr_ray.config import (
    ConfigError,
    ExperimentConfig,
    deep_merge,
    dotted_to_nested,
    load_config_file,
    parse_overrides,
)

# Parameter groups (see CCRModel.param_groups): the vocabulary `trains` is written in.
IMAGE_TOWER, TEXT_TOWER, LOGIT_SCALE = "image_tower", "text_tower", "logit_scale"
MULTILINGUAL_PATH = ("token_embedding", "embedding_proj", "adapters")
NEW_LANGUAGE_ADAPTERS = "new_language_adapters"  # the adapters of languages a run adds (model.add_languages)
CLIP_TOWERS = (IMAGE_TOWER, TEXT_TOWER)
# which parameter group computes which stage input: an input whose tower a stage does not train is frozen, so its
# features can be computed once (the frozen-feature cache, ccr_ray/features)
INPUT_TOWERS = {"image": IMAGE_TOWER, "text_en": TEXT_TOWER}


class Languages(str, Enum):
    """Which languages a stage's batches (or its validation score) use, given the model's target languages."""

    ENGLISH = "en"  # English only (the CLIP path)
    TARGETS = "targets"  # the target languages; training draws one per step (monolingual batches)
    ALL = "all"  # English and the targets

    def resolve(self, targets: Sequence[str]) -> list[str]:
        if self is Languages.ENGLISH:
            return ["en"]
        if self is Languages.TARGETS:
            return list(targets)
        return ["en", *targets]


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    trains: tuple[str, ...]  # parameter groups given to the optimizer; everything else is frozen
    losses: Mapping[str, float]  # loss name -> default weight
    dataset: Literal["pretrain", "downstream"]  # a field of DataConfig: CC300K-style or Multi30K-style
    inputs: tuple[str, ...]  # what a training batch carries: "image", "text_en", "text_target"
    languages: Languages  # languages of the training batches
    validation: Languages  # languages of the validation score (mean mR)
    parent: str | None = None  # stage whose checkpoint this one starts from
    inherit: str = "all"  # "all": every weight of the parent; "backbone": only the CLIP weights
    parent_optional: bool = False  # True: a local pretrained CLIP file (backbone.pretrained) can stand in
    adapter: str | None = None  # adapter kind the stage needs ("mla", "dasd"); None = any
    defaults: Mapping[str, Any] = field(default_factory=dict)  # dotted config keys, the seeds' values
    # Ray Tune's default search space for this stage (jobs/tune.py; tune/space.py has the syntax): the adapter size
    # of the method it trains, the learning rate around the seeds' value, and its secondary loss weights
    search_space: Mapping[str, str] = field(default_factory=dict)
    # can run with model.add_languages (a language added to a trained model): only the new languages' own adapters
    # train (NEW_LANGUAGE_ADAPTERS), everything another language reads is frozen; False for stages that train what
    # every language shares
    adds_language: bool = False

    def default_space(self, adds_languages: bool = False) -> dict[str, str]:
        """Ray Tune's default space; a run that adds languages keeps the trained model's architecture (the adapter
        size of every language), so only its training settings are swept."""
        return {k: v for k, v in self.search_space.items() if not (adds_languages and k.startswith("model."))}

    def targets(self, cfg: ExperimentConfig) -> list[str]:
        """The target languages a run trains and validates: the ones it adds, when it adds languages."""
        return list(cfg.model.add_languages or cfg.model.languages)

    def inherit_for(self, cfg: ExperimentConfig) -> str:
        """What a run inherits from its parent: everything when it adds languages to a trained model."""
        return "all" if cfg.model.add_languages else self.inherit

    def train_languages(self, targets: Sequence[str]) -> list[str]:
        return self.languages.resolve(targets)

    def eval_languages(self, targets: Sequence[str]) -> list[str]:
        return self.validation.resolve(targets)

    def config_defaults(self) -> dict[str, Any]:
        nested = dotted_to_nested(dict(self.defaults))
        nested.setdefault("loss", {})["weights"] = dict(self.losses)
        if self.adapter is not None:  # cla/cma build DASD adapters unless a config says otherwise (then it fails)
            nested.setdefault("model", {})["adapter"] = self.adapter
        return nested

    def dataset_root(self, cfg: ExperimentConfig) -> str:
        """The folder of the dataset this stage trains on (data.pretrain or data.downstream), expanded."""
        return cfg.path(getattr(cfg.data, self.dataset))

    def trained_groups(self, cfg: ExperimentConfig) -> tuple[str, ...]:
        """What trains in a run of this stage: its `trains`, less what the config freezes (a config can freeze a
        group the stage would train, never train one it would not); only the new languages' own adapters when the
        run adds languages."""
        if cfg.model.add_languages:
            if not self.adds_language:
                raise ConfigError(f"model.add_languages: stage {self.name!r} trains {', '.join(self.trains)}, which "
                                  "every language reads; it cannot add a language without changing the others "
                                  f"(stages that can: {', '.join(n for n, s in STAGES.items() if s.adds_language)})")
            return (NEW_LANGUAGE_ADAPTERS,)
        frozen = {"token_embedding": cfg.model.text.freeze_table, "embedding_proj": cfg.model.text.freeze_projection}
        return tuple(group for group in self.trains if not frozen.get(group, False))

    @property
    def needs_images(self) -> bool:
        return "image" in self.inputs

    @property
    def frozen_inputs(self) -> tuple[str, ...]:
        """Inputs computed by towers this stage does not train: what a frozen-feature cache may replace."""
        return tuple(name for name, tower in INPUT_TOWERS.items() if name in self.inputs and tower not in self.trains)

    def command(self, config: str | None = None) -> str:
        extra = f" --config {config}" if config and config != "demo" else ""
        return f"python jobs/train_stage.py --stage {self.name}{extra}"


def _table(*stages: Stage) -> Mapping[str, Stage]:
    return MappingProxyType({s.name: s for s in stages})


STAGES: Mapping[str, Stage] = _table(
    Stage(
        name="clip",
        summary="English image-text contrastive training of the backbone (stand-in for a downloaded CLIP; "
        "embedded default only)",
        trains=(*CLIP_TOWERS, LOGIT_SCALE),
        losses={"contrastive_en": 1.0},
        dataset="pretrain",
        inputs=("image", "text_en"),
        languages=Languages.ENGLISH,
        validation=Languages.ENGLISH,
        defaults={"loss.learn_scale": True, "optim.name": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 0.1,
                  "optim.warmup": 0.05, "train.select": "final"},
        search_space={"optim.lr": "loguniform(1e-4, 3e-3)"},
    ),
    Stage(
        name="nlt",
        summary="MLA Native Language Transfer: acquirers + embedding match the frozen English text embedding (MSE)",
        trains=MULTILINGUAL_PATH,
        losses={"distill_mse": 1.0},
        dataset="pretrain",
        inputs=("text_en", "text_target"),
        languages=Languages.TARGETS,
        validation=Languages.TARGETS,
        parent="clip",
        inherit="backbone",
        parent_optional=True,
        adapter="mla",
        defaults={"optim.lr": 2e-4, "train.max_steps": 45_000, "train.eval_every": 3_000, "train.batch_size": 128},
        adds_language=True,
        search_space={"model.mla.hidden": "choice(64, 128, 256)", "optim.lr": "loguniform(5e-5, 1e-3)"},
    ),
    Stage(
        name="le",
        summary="MLA Language Exposure: image-text InfoNCE (scale 100) on target captions",
        trains=MULTILINGUAL_PATH,
        losses={"contrastive_target": 1.0},
        dataset="pretrain",
        inputs=("image", "text_target"),
        languages=Languages.TARGETS,
        validation=Languages.TARGETS,
        parent="nlt",
        adapter="mla",
        # MLA's zero-shot evaluation used the final LE weights (spec 2.3)
        defaults={"optim.lr": 5e-6, "train.max_steps": 10_000, "train.eval_every": 500, "train.batch_size": 128,
                  "train.select": "final"},
        # stages that inherit every weight keep their parent's adapter size: only the learning rate
        adds_language=True,
        search_space={"optim.lr": "loguniform(1e-6, 5e-5)"},
    ),
    Stage(
        name="finetune-en",
        summary="Full CLIP fine-tuning on downstream English data (InfoNCE, scale 100); acquirers ride along",
        trains=CLIP_TOWERS,
        losses={"contrastive_en": 1.0},
        dataset="downstream",
        inputs=("image", "text_en"),
        languages=Languages.ENGLISH,
        validation=Languages.ENGLISH,  # both seeds select on English here (DASD-hist: eval_langs en); evaluate all after
        parent="le",
        # 5 epochs of Multi30K (29k images) at batch 128 ~ 1,130 steps
        defaults={"optim.lr": 3e-6, "train.max_steps": 1_130, "train.eval_every": 226, "train.batch_size": 128},
        search_space={"optim.lr": "loguniform(1e-6, 3e-5)"},
    ),
    Stage(
        name="finetune-all",
        summary="Reading (b): LE objective on the downstream target-language captions, acquirers + embedding only",
        trains=MULTILINGUAL_PATH,
        losses={"contrastive_target": 1.0},
        dataset="downstream",
        inputs=("image", "text_target"),
        languages=Languages.TARGETS,
        validation=Languages.TARGETS,
        parent="finetune-en",
        adapter="mla",
        defaults={"optim.lr": 5e-6, "train.max_steps": 10_000, "train.eval_every": 500, "train.batch_size": 128},
        search_space={"optim.lr": "loguniform(1e-6, 5e-5)"},
    ),
    Stage(
        name="cla",
        summary="DASD Cross-Lingual Alignment: MSE to the frozen English embedding + 0.1 L1(s_r, f_en) "
        "+ 0.001 adversarial (text semantics)",
        trains=MULTILINGUAL_PATH,
        losses={"distill_mse": 1.0, "consistency_l1": 0.1, "adversarial_text": 0.001},
        dataset="pretrain",
        inputs=("text_en", "text_target"),
        languages=Languages.TARGETS,
        validation=Languages.TARGETS,
        parent="clip",
        inherit="backbone",
        parent_optional=True,
        adapter="dasd",
        defaults={"optim.lr": 2e-4, "train.max_steps": 45_000, "train.eval_every": 3_000, "train.batch_size": 128},
        adds_language=True,
        search_space={"model.dasd.core": "choice(16, 32, 64)", "optim.lr": "loguniform(5e-5, 1e-3)",
                      "loss.weights.consistency_l1": "loguniform(0.01, 1)",
                      "loss.weights.adversarial_text": "loguniform(1e-4, 1e-2)"},
    ),
    Stage(
        name="cma",
        summary="DASD Cross-Modal Alignment: InfoNCE (scale 100) + MSE + 0.1 SmoothL1(s_r, v) "
        "+ 0.001 adversarial (image semantics)",
        trains=MULTILINGUAL_PATH,
        losses={"contrastive_target": 1.0, "distill_mse": 1.0, "consistency_smoothl1": 0.1,
                "adversarial_image": 0.001},
        dataset="pretrain",
        inputs=("image", "text_en", "text_target"),
        languages=Languages.TARGETS,
        validation=Languages.TARGETS,
        parent="cla",
        adapter="dasd",
        defaults={"optim.lr": 6e-6, "train.max_steps": 7_000, "train.eval_every": 500, "train.batch_size": 128},
        adds_language=True,
        search_space={"optim.lr": "loguniform(1e-6, 5e-5)", "loss.weights.contrastive_target": "uniform(0.5, 2)",
                      "loss.weights.distill_mse": "uniform(0.25, 2)",
                      "loss.weights.consistency_smoothl1": "loguniform(0.01, 1)",
                      "loss.weights.adversarial_image": "loguniform(1e-4, 1e-2)"},
    ),
)


@dataclass(frozen=True)
class Recipe:
    """A method's setting as a chain of stages, each one `jobs/train_stage.py` call (`jobs/demo.py --recipe`)."""

    name: str
    label: str  # row name in reports
    stages: tuple[str, ...]  # in order; `clip` stands in for a downloaded CLIP on the embedded default

    @property
    def final(self) -> str:
        return self.stages[-1]


RECIPES: Mapping[str, Recipe] = MappingProxyType({r.name: r for r in (
    Recipe("mla-zero-shot", "MLA zero-shot (nlt -> le)", ("clip", "nlt", "le")),
    Recipe("dasd-zero-shot", "DASD zero-shot (cla -> cma)", ("clip", "cla", "cma")),
)})


# --------------------------------------------------------------------------------------------- resolution


def check_stage_config(cfg: ExperimentConfig) -> None:
    """What the schema alone cannot check: the stage exists, builds its adapter kind, and weighs its own losses."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage: unknown stage {cfg.stage!r}; known: {', '.join(STAGES)}")
    stage = STAGES[cfg.stage]
    if stage.adapter is not None and cfg.model.adapter != stage.adapter:
        raise ConfigError(f"model.adapter: stage {stage.name!r} trains {stage.adapter!r} adapters, but the config "
                          f"says {cfg.model.adapter!r}")
    if cfg.model.add_languages:
        stage.trained_groups(cfg)  # refuses a stage that would train what every language reads
    unknown = set(cfg.loss.weights) - set(stage.losses)
    if unknown:
        raise ConfigError(f"loss.weights: {sorted(unknown)} are not losses of stage {stage.name!r} (its losses: "
                          f"{', '.join(stage.losses)})")


def resolve_config(stage: str, config: str | dict | None = "demo", overrides: list[str] | dict | None = None,
                   trial: dict[str, Any] | None = None) -> ExperimentConfig:
    """The validated config of one stage, in the documented precedence order: dataclass defaults < stage table <
    config file (top level, then its `stages.<stage>` block) < `--set` overrides < Ray Tune trial values."""
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
    cfg = ExperimentConfig.from_dict(merged)
    check_stage_config(cfg)
    return cfg
