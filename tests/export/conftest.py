"""Export fixtures: tiny MLA and DASD checkpoints on the micro dataset, their export folders (built once per
session), and a private local Ray cluster for the embedding job."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.conftest import REPO, micro_config, private_ray

LANGS = ("de", "zh")


def load_cli(name: str):
    """An export/ CLI module by file (export/ is not a package; tests call its main([...]))."""
    spec = importlib.util.spec_from_file_location(f"export_cli_{name}", REPO / "export" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_checkpoint(data: str, folder: Path, stage: str, **sections) -> str:
    from ccr_ray.stages import resolve_config
    from ccr_ray.train.state import TrainState

    cfg = resolve_config(stage, micro_config(data, str(folder.parent / "home"), languages=LANGS, **sections))
    TrainState.create(cfg, os.path.join(data, "tokenizer"), None, "cpu").save(folder)
    return str(folder)


@pytest.fixture(scope="session")
def mla_ckpt(micro_data, tmp_path_factory) -> str:
    return make_checkpoint(micro_data, tmp_path_factory.mktemp("mla") / "checkpoint", "le")


@pytest.fixture(scope="session")
def dasd_ckpt(micro_data, tmp_path_factory) -> str:
    return make_checkpoint(micro_data, tmp_path_factory.mktemp("dasd") / "checkpoint", "cma",
                           model={"adapter": "dasd"})


@pytest.fixture(scope="session")
def mla_export(mla_ckpt, tmp_path_factory) -> str:
    """Through the CLI, with int8 graphs."""
    out = tmp_path_factory.mktemp("mla_onnx") / "onnx"
    assert load_cli("to_onnx").main([mla_ckpt, "--out", str(out), "--int8"]) == 0
    return str(out)


@pytest.fixture(scope="session")
def dasd_export(dasd_ckpt, tmp_path_factory) -> str:
    from ccr_ray.export.onnx_export import export_checkpoint, resolve_plan

    out = tmp_path_factory.mktemp("dasd_onnx") / "onnx"
    plan, model, meta = resolve_plan(dasd_ckpt, str(out))
    export_checkpoint(plan, model, meta)
    return str(out)


@pytest.fixture(scope="module")
def ray_cluster():
    with private_ray("ccrexp-") as ray:
        yield ray
