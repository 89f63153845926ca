"""ONNX export: every graph matches PyTorch (MLA and DASD, every language, batch 1 and >1, short and
context-filling captions, trimmed and full-length inputs), the check can fail, int8 graphs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ccr_ray import runtime as rt
from ccr_ray.checkpoint import load_checkpoint
from ccr_ray.export.onnx_export import (
    PARITY_THRESHOLD,
    ExportError,
    check_parity,
    export_checkpoint,
    model_fingerprint,
    resolve_plan,
)
from ccr_ray.export.probes import build_probes
from tests.export.conftest import LANGS, load_cli, make_checkpoint


def assert_parity_covers_everything(manifest: dict, languages: list[str], context: int):
    parity = manifest["parity"]
    assert parity["passed"] and parity["threshold"] == PARITY_THRESHOLD
    per_graph = [parity["image"], parity["text_en"], *(parity["text"][lang] for lang in languages)]
    assert sorted(parity["text"]) == sorted(languages)
    for entry in per_graph:
        assert entry["min_cosine"] >= PARITY_THRESHOLD, entry
        batches = {c["batch"] for c in entry["cases"]}
        assert 1 in batches and max(batches) >= 8, batches
    for entry in [parity["text_en"], *(parity["text"][lang] for lang in languages)]:
        trimmed = [c["trimmed_tokens"] for c in entry["cases"]]
        assert min(trimmed) <= 4, "a one-word caption (short sequence) is checked"
        assert max(trimmed) == context, "a context-filling caption is checked"
        assert all(c["tokens"] == context for c in entry["cases"]), "the full-length input is checked too"


@pytest.mark.parametrize("kind", ["mla", "dasd"])
def test_export_matches_pytorch(kind, request):
    folder = Path(request.getfixturevalue(f"{kind}_export"))
    model, meta = load_checkpoint(request.getfixturevalue(f"{kind}_ckpt"))
    manifest = json.loads((folder / rt.MANIFEST).read_text())
    assert manifest["model"]["adapter"] == kind
    assert manifest["model"]["fingerprint"] == model_fingerprint(model)
    assert manifest["languages"] == ["en", *LANGS]
    assert manifest["language_index"] == {lang: i for i, lang in enumerate(LANGS)}
    assert manifest["embed_dim"] == 32 and manifest["context_length"] == 77 and manifest["opset"] == 18
    assert manifest["padding_invariant"] is True
    assert_parity_covers_everything(manifest, list(LANGS), 77)
    for role in ("image", "text_en", "text"):
        graph = manifest["graphs"][role]
        proto = onnx.load(str(folder / graph["files"][0]))
        names = [i.name for i in proto.graph.input]
        assert names == graph["inputs"] and [o.name for o in proto.graph.output] == [graph["output"]]
        dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
        assert isinstance(dims[0], str), f"{role}: batch must be dynamic, got {dims}"
        if role != "image":
            assert isinstance(dims[1], str), f"{role}: sequence length must be dynamic, got {dims}"
    for name in (rt.PREPROCESS_FILE, rt.EN_TOKENIZER_FILE, "tokenizer/tokenizer.json"):
        assert (folder / name).exists(), name
    from ccr_ray.data.transforms import ImageTransform

    assert json.loads((folder / rt.PREPROCESS_FILE).read_text()) == ImageTransform.from_config(meta.preprocess).to_config()


def test_one_graph_selects_each_language(mla_export, mla_ckpt):
    """Perturbing one language's adapters breaks parity for that language only: the graph's lang_index really
    selects per-language weights (and the parity check can fail)."""
    model, _ = load_checkpoint(mla_ckpt)
    with torch.no_grad():
        for p in model.adapters.acquirers["zh"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    probes = build_probes(["en", *LANGS], 32, data=None, max_images=8)
    report = check_parity(model, mla_export, probes)
    assert not report["passed"]
    assert report["text"]["de"]["passed"] and report["text_en"]["passed"] and report["image"]["passed"]
    assert not report["text"]["zh"]["passed"] and report["text"]["zh"]["min_cosine"] < PARITY_THRESHOLD


def test_parity_failure_exits_nonzero(mla_ckpt, tmp_path, monkeypatch):
    """A graph that does not reproduce PyTorch fails the job (exit 1) and is marked in the manifest."""
    from ccr_ray.export import onnx_export

    original = onnx_export.ImageEncoder.forward
    monkeypatch.setattr(onnx_export.ImageEncoder, "forward",
                        lambda self, pixels: original(self, pixels).flip(-1))  # a wrong graph
    out = tmp_path / "bad"
    code = load_cli("to_onnx").main([mla_ckpt, "--out", str(out), "--graphs", "image,text_en"])
    assert code == 1
    manifest = json.loads((out / rt.MANIFEST).read_text())
    assert not manifest["parity"]["passed"] and not manifest["parity"]["image"]["passed"]
    assert manifest["parity"]["text_en"]["passed"] and sorted(manifest["graphs"]) == ["image", "text_en"]
    with pytest.raises(rt.ModelFolderError, match="parity"):
        rt.Encoder(out)


def test_dasd_pooling_over_padding_keeps_the_full_context(micro_data, tmp_path):
    """The seeds' s_a averages over padding too: outputs depend on the padded length, so the runtime must not
    trim; the graph still matches PyTorch on full-context inputs."""
    ckpt = make_checkpoint(micro_data, tmp_path / "ckpt", "cma", model={"adapter": "dasd",
                                                                     "dasd": {"mean_pool_padding": True}})
    plan, model, meta = resolve_plan(ckpt, str(tmp_path / "onnx"), graphs=("text",))
    manifest = export_checkpoint(plan, model, meta)
    assert manifest["padding_invariant"] is False and manifest["parity"]["passed"]
    assert manifest["languages"] == list(LANGS) and "text_en" not in manifest["graphs"]
    assert all(c["trimmed_tokens"] == 77 for lang in LANGS for c in manifest["parity"]["text"][lang]["cases"])
    encoder = rt.Encoder(tmp_path / "onnx")
    assert encoder.text_inputs(["ein Kreis"], "de")["input_ids"].shape == (1, 77)


def test_int8_text_graphs(mla_export, mla_ckpt):
    folder = Path(mla_export)
    manifest = json.loads((folder / rt.MANIFEST).read_text())
    for role in ("text_en", "text"):
        int8, fp32 = manifest["graphs"][role + "_int8"], manifest["graphs"][role]
        assert int8["precision"] == "int8" and int8["bytes"] < fp32["bytes"]
        ops = {n.op_type for n in onnx.load(str(folder / int8["files"][0])).graph.node}
        assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}, ops
    report = manifest["int8"]
    assert sorted(report) == ["de", "en", "zh"]
    for entry in report.values():
        assert 0.99 <= entry["min_cosine"] < 1.0  # quantised: close, not identical
        assert 0.0 <= entry["top1_agreement"] <= 1.0 and entry["queries"] > 0
    fp32_enc, int8_enc = rt.Encoder(folder), rt.Encoder(folder, precision="int8")
    texts = ["Ein kleiner blauer Kreis unten", "Ein weißer Hintergrund"]
    a, b = fp32_enc.encode_text(texts, "de"), int8_enc.encode_text(texts, "de")
    cos = (a * b).sum(1)
    assert (cos > 0.99).all() and not np.allclose(a, b)


def test_bad_input_is_named(mla_ckpt, tmp_path, capsys):
    cli = load_cli("to_onnx")
    assert cli.main([str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main([mla_ckpt, "--langs", "de,fr", "--out", str(tmp_path / "x")]) == 2
    assert "--langs" in capsys.readouterr().err
    assert cli.main([mla_ckpt, "--opset", "13", "--out", str(tmp_path / "x")]) == 2
    assert "--opset" in capsys.readouterr().err
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="refusing"):
        resolve_plan(mla_ckpt, str(tmp_path / "precious"))
    assert cli.main([mla_ckpt, "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "x")]) == 2
    assert "--data" in capsys.readouterr().err
    assert cli.main([mla_ckpt, "--graphs", "image,audio", "--out", str(tmp_path / "x")]) == 2
    assert "audio" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--opset", "99"], "--opset: 99 is above"),  # was a traceback from onnx's checker after the export
    (["--threshold", "5"], "--threshold: 5.0 must be a cosine in (0, 1]"),  # was exit 1 after a full export
    (["--langs", ","], "--langs: ',' names no language"),
    (["--data", "{model_folder}"], "--data: "),  # a folder that is no dataset: was silently replaced by renders
    (["--data", "{micro_data}", "--split", "dev"], "--split: "),  # a split the data lacks: the same
])
def test_bad_export_options_fail_in_one_line_before_exporting(args, message, mla_ckpt, micro_data, tmp_path,
                                                               capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    args = [a.format(model_folder=folder, micro_data=micro_data) for a in args]
    assert load_cli("to_onnx").main([mla_ckpt, "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
