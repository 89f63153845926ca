"""Typed config: precedence, validation messages naming the field, every packaged config valid for every stage."""

import json

import pytest

from ccr_ray.config import PACKAGED_CONFIGS, ConfigError, ExperimentConfig, parse_overrides
from ccr_ray.stages import STAGES, resolve_config


def test_precedence_defaults_stage_file_set_trial(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"optim": {"lr": 0.5}, "train": {"max_steps": 7},
                                "stages": {"le": {"optim": {"lr": 0.25}}}}))
    base = resolve_config("le", None)
    assert base.optim.lr == STAGES["le"].defaults["optim.lr"]  # stage table over dataclass default
    assert base.loss.weights == dict(STAGES["le"].losses)
    assert resolve_config("nlt", str(file)).optim.lr == 0.5  # file over stage table
    assert resolve_config("le", str(file)).optim.lr == 0.25  # the file's per-stage block over its top level
    cfg = resolve_config("le", str(file), ["optim.lr=0.125"])
    assert cfg.optim.lr == 0.125 and cfg.train.max_steps == 7  # --set over file
    assert resolve_config("le", str(file), ["optim.lr=0.125"], trial={"optim.lr": 0.0625}).optim.lr == 0.0625


def test_round_trip_through_dict():
    cfg = resolve_config("nlt", "demo")
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, field", [
    (["optim.lr=-1"], "optim.lr"),
    (["optim.lr=abc"], "optim.lr"),
    (["train.batch_size=2.5"], "train.batch_size"),
    (["model.languages=de,xx"], "model.languages"),
    (["optim.nme=adamw"], "optim.nme"),
    (["train.precision=fp8"], "train.precision"),
    (["loss.weights.adv=1"], "loss.weights"),
    (["scaling.num_workers=3"], "train.batch_size"),  # 128 not divisible by 3
    (["model.adapter=dasd"], "model.adapter"),  # nlt trains MLA acquirers
    (["data.task_cpus=2"], "data.task_cpus"),
])
def test_bad_values_fail_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=f"^(--set )?{field.replace('.', '[.]')}"):
        resolve_config("nlt", "demo", override)


@pytest.mark.parametrize("key, message", [
    ("model.mla.hiddn", "--set model.mla.hiddn: unknown field (did you mean model.mla.hidden?)"),
    ("modle.mla.hidden", "--set modle.mla.hidden: unknown field (did you mean model.mla.hidden?)"),
    ("lr", "--set lr: unknown field (did you mean optim.lr?)"),
    ("optim.lr.x", "--set optim.lr.x: optim.lr is a value, not a section"),
    ("xyz", "--set xyz: unknown field (known: data, loss, model, optim, run, scaling, stage, train)"),
])
def test_an_unknown_set_key_is_named_with_the_closest_key(key, message):
    with pytest.raises(ConfigError) as err:
        resolve_config("nlt", "demo", [f"{key}=16"])
    assert str(err.value) == message


def test_an_unknown_key_in_a_config_file_names_the_closest_field(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"train": {"max_step": 5}}))
    with pytest.raises(ConfigError, match=r"^train\.max_step: unknown field \(did you mean train\.max_steps\?\)$"):
        resolve_config("nlt", str(file))


def test_overrides_parse_json_and_strings():
    assert parse_overrides(["optim.lr=1", "run.verbose=true", "run.experiment=hello", "optim.betas=[1, 2]"]) == {
        "optim": {"lr": 1, "betas": [1, 2]}, "run": {"verbose": True, "experiment": "hello"}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_unknown_stage_and_config_name():
    with pytest.raises(ConfigError, match="unknown stage"):
        resolve_config("nope")
    with pytest.raises(ConfigError, match="no packaged config"):
        resolve_config("nlt", "no-such-config")


@pytest.mark.parametrize("path", sorted(PACKAGED_CONFIGS.glob("*.json")), ids=lambda p: p.stem)
def test_every_packaged_config_validates_for_every_compatible_stage(path):
    data = json.loads(path.read_text())
    adapter = data.get("model", {}).get("adapter")  # a file-wide adapter excludes the other method's stages
    checked = 0
    for name, stage in STAGES.items():
        if adapter and stage.adapter not in (None, adapter):
            continue
        resolve_config(name, path.stem)
        checked += 1
    assert checked >= 3


def test_home_placeholder_expands(tmp_path, monkeypatch):
    monkeypatch.setenv("CCR_RAY_HOME", str(tmp_path))
    cfg = resolve_config("nlt", "demo")
    assert cfg.path(cfg.data.pretrain) == str(tmp_path / "data" / "demo")
    assert cfg.stage_dir() == tmp_path / "runs" / "demo" / "nlt"
