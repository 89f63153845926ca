"""The stage table is consistent, and missing inputs fail before any cluster work with what to run."""

import pytest

from ccr_ray.losses import LOSSES
from ccr_ray.stages import STAGES
from ccr_ray.train.plan import StageError, plan_stage
from tests.conftest import MICRO_PRESET
from tests.unit.test_models import micro_model

GROUPS = set(micro_model().param_groups())


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_entry_is_consistent(name):
    stage = STAGES[name]
    assert set(stage.trains) <= GROUPS, set(stage.trains) - GROUPS
    assert set(stage.losses) <= set(LOSSES)
    needs = {n for loss in stage.losses for n in LOSSES[loss].needs} & {"image", "text_en", "text_target"}
    assert needs <= set(stage.inputs), f"{name}: losses need {needs - set(stage.inputs)}"
    assert stage.parent is None or stage.parent in STAGES
    assert stage.dataset in ("pretrain", "downstream")
    assert stage.inherit in ("all", "backbone")
    assert stage.languages in ("en", "targets") and stage.validation in ("en", "targets", "all")


def test_stage_chain_has_no_cycles():
    for name in STAGES:
        seen, cur = set(), name
        while cur is not None:
            assert cur not in seen
            seen.add(cur)
            cur = STAGES[cur].parent


def test_le_without_nlt_checkpoint_names_the_command(micro_cfg):
    with pytest.raises(StageError) as err:
        plan_stage(micro_cfg("le"), "demo")
    assert "python jobs/train_stage.py --stage nlt" in str(err.value)
    assert "there is none at" in str(err.value)


def test_nlt_without_clip_offers_a_pretrained_file(micro_cfg):
    with pytest.raises(StageError, match="model.backbone.pretrained"):
        plan_stage(micro_cfg("nlt"))


def test_missing_dataset_and_language_are_named(micro_cfg, micro_data, tmp_path):
    import os

    from ccr_ray.train.state import TrainState

    with pytest.raises(StageError, match="data.pretrain"):
        plan_stage(micro_cfg("clip", data={"pretrain": str(tmp_path / "nowhere")}))
    parent = TrainState.create(micro_cfg("clip"), os.path.join(micro_data, "tokenizer"), None, "cpu")
    parent.save(tmp_path / "clip-ckpt")
    ok = plan_stage(micro_cfg("nlt", run={"init_from": str(tmp_path / "clip-ckpt")}))
    assert ok.parent == str(tmp_path / "clip-ckpt")
    with pytest.raises(StageError, match="model.languages: .* no captions in ko"):
        plan_stage(micro_cfg("nlt", model={"languages": ["ko"]}, run={"init_from": str(tmp_path / "clip-ckpt")}))
    with pytest.raises(StageError, match="run.init_from"):
        plan_stage(micro_cfg("nlt", run={"init_from": str(tmp_path / "nothing")}))
    # "pretrained": the local CLIP file instead of the parent stage (DASD's cross-lingual finetune starts so)
    with pytest.raises(StageError, match="run.init_from=pretrained: set model.backbone.pretrained"):
        plan_stage(micro_cfg("finetune-en", run={"init_from": "pretrained"}))
    clip_file = tmp_path / "clip.safetensors"
    from safetensors.torch import save_file

    save_file({k[len("clip."):]: v.contiguous() for k, v in parent.model.state_dict().items() if k.startswith("clip.")},
              str(clip_file))
    fresh = plan_stage(micro_cfg("finetune-en", run={"init_from": "pretrained"},
                                 model={"backbone": {"name": MICRO_PRESET, "pretrained": str(clip_file)}}))
    assert fresh.parent is None


def test_first_stage_plans_with_random_init(micro_cfg):
    plan = plan_stage(micro_cfg("clip"))
    assert plan.parent is None and plan.train_languages == ["en"]
    assert plan.run_name.startswith("clip-") and plan.run_name == plan_stage(micro_cfg("clip")).run_name
    assert plan_stage(micro_cfg("clip", optim={"lr": 1e-2})).run_name != plan.run_name
    assert isinstance(plan.summary(), str)
