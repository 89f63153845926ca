"""Damaged files get a one-line error naming the file, never a library traceback: a truncated model.safetensors
(evaluate, export, planning a child stage); an empty search query is refused, naming the argument. The truncated
.onnx graph is tests/export/test_runtime.py."""

import os

import pytest

from ccr_ray import checkpoint as ckpt
from ccr_ray.train.state import TrainState


@pytest.fixture()
def truncated_checkpoint(micro_cfg, micro_data, tmp_path):
    cfg = micro_cfg("clip")
    folder = TrainState.create(cfg, os.path.join(micro_data, "tokenizer"), None, "cpu").save(
        cfg.stage_dir() / "checkpoint", with_optimizer=False)
    weights = folder / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def test_loading_a_truncated_checkpoint_names_the_file(truncated_checkpoint):
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors: not a readable safetensors file"):
        ckpt.load_checkpoint(truncated_checkpoint)


def test_evaluate_and_export_jobs_say_one_line(truncated_checkpoint, capsys, tmp_path):
    import evaluate

    from tests.export.conftest import load_cli

    assert evaluate.main([str(truncated_checkpoint)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "model.safetensors" in err and len(err.splitlines()) == 1
    assert load_cli("to_onnx").main([str(truncated_checkpoint), "--out", str(tmp_path / "onnx")]) != 0
    err = capsys.readouterr().err.strip()
    assert "model.safetensors" in err and "Traceback" not in err


def test_a_child_stage_on_a_truncated_parent_fails_at_planning(truncated_checkpoint, micro_cfg):
    from ccr_ray.train.plan import StageError, plan_stage

    cfg = micro_cfg("nlt", data={"feature_cache": True})
    with pytest.raises(StageError, match="model.safetensors"):
        plan_stage(cfg)


@pytest.mark.parametrize("query", ["", "   \t"])
def test_an_empty_search_query_is_refused_before_anything_loads(query, capsys, tmp_path):
    from tests.export.conftest import load_cli

    # the model folder does not exist: the query is checked first, so the error is about the query
    assert load_cli("search").main(["--model", str(tmp_path / "none"), "--index", str(tmp_path / "none"),
                                    "--lang", "de", "ein roter Kreis", query]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: QUERY 2: empty or whitespace-only query"


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_export_out_that_is_a_file_is_one_line_naming_out(where, capsys, tmp_path):
    from tests.export.conftest import load_cli

    file = tmp_path / "model.onnx"
    file.write_text("not a folder")
    out = file if where == "file" else file / "sub"
    # checked before the checkpoint loads (this one does not exist): the error is about --out, in a second
    assert load_cli("to_onnx").main([str(tmp_path / "checkpoint"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out: {file} is a file, not a folder", err
