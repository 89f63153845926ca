"""ONNX export of models whose English text tower is a Hugging Face encoder (a tiny random BERT the test writes):
a text-only backbone (DASD; no image graph) and an image + HF-text backbone (MLA), each checked against PyTorch
by the exporter's parity check and encoded by the torch-free runtime with the tower's own English tokenizer."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch.nn import functional as F

from tests.conftest import micro_config
from tests.hf_fixtures import english_captions, write_tiny_bert

LANGS = ("de", "zh")


@pytest.fixture(scope="module")
def tiny_bert(micro_data, tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("hf") / "tiny-bert", english_captions(micro_data))


def hf_checkpoint(data, folder, stage, model):
    from ccr_ray.stages import resolve_config
    from ccr_ray.train.state import TrainState

    model = {"text": {"embed_dim": 16}, "mla": {"hidden": 8}, "dasd": {"core": 4, "latent_dim": 16},
             "languages": list(LANGS), **model}
    cfg = resolve_config(stage, micro_config(data, str(folder.parent / "home"), languages=LANGS, model=model,
                                             run={"init_from": "pretrained"}))
    TrainState.create(cfg, os.path.join(data, "tokenizer"), None, "cpu").save(folder)
    return str(folder)


def export(checkpoint, out):
    from ccr_ray.export.onnx_export import export_checkpoint, resolve_plan

    plan, model, meta = resolve_plan(checkpoint, str(out))
    return export_checkpoint(plan, model, meta), model


def check_runtime(folder, model, texts):
    """The runtime's embeddings equal PyTorch's for English (the HF tower, its tokenizer) and a target language."""
    from ccr_ray.data.preprocess import tokenize_captions
    from ccr_ray.runtime import Encoder

    enc = Encoder(folder)
    assert enc.tokenizer("en").kind == "hf"
    for lang in ("en", "de"):
        got = enc.encode_text(texts, lang)
        inputs = tokenize_captions(texts, lang, model.context_length, str(os.path.join(folder, "tokenizer")),
                                   english=model.english_tokenizer)
        with torch.no_grad():
            if lang == "en":
                ref = model.encode_text_en(torch.from_numpy(inputs["text_en_ids"]))
            else:
                ref = model.encode_text(torch.from_numpy(inputs["text_ids"]), torch.from_numpy(inputs["text_mask"]),
                                        lang)
        cos = (F.normalize(ref, dim=-1).numpy() * got).sum(axis=1)
        assert cos.min() > 0.9999, (lang, cos)


def test_text_only_dasd_exports_without_an_image_graph(tiny_bert, micro_data, tmp_path):
    ckpt = hf_checkpoint(micro_data, tmp_path / "cla", "cla",
                         {"adapter": "dasd", "backbone": {"name": str(tiny_bert),
                                                          "pretrained": str(tiny_bert / "model.safetensors")}})
    manifest, model = export(ckpt, tmp_path / "onnx")
    assert set(manifest["graphs"]) == {"text_en", "text"} and manifest["preprocess"] is None
    assert manifest["parity"]["passed"] and manifest["parity"]["min_cosine"] > 0.9999
    assert manifest["tokenizers"]["en"]["kind"] == "hf" and manifest["embed_dim"] == 32
    assert not (tmp_path / "onnx" / "preprocess.json").exists()
    tok = json.loads((tmp_path / "onnx" / "tokenizer_en" / "tokenizer.json").read_text())
    assert tok["normalizer"]["lowercase"]  # the tower's own (uncased) tokenizer, not CLIP's BPE
    check_runtime(tmp_path / "onnx", model, ["A dog runs on the GRASS", "ein roter Kreis", "zwei"])


def test_image_and_hf_text_mla_exports_all_three_graphs(tiny_bert, micro_data, tmp_path):
    cfg_file = tmp_path / "vit-bert.json"
    cfg_file.write_text(json.dumps({"embed_dim": 16, "text_cfg": {"hf_model_name": "tiny-bert",
                                                                  "hf_proj_type": "linear"},
                                    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                                   "patch_size": 16}}))
    ckpt = hf_checkpoint(micro_data, tmp_path / "le", "le",
                         {"adapter": "mla", "backbone": {"name": str(cfg_file), "hf_model": str(tiny_bert),
                                                         "pretrained": str(tiny_bert / "model.safetensors")}})
    manifest, model = export(ckpt, tmp_path / "onnx")
    assert set(manifest["graphs"]) == {"image", "text_en", "text"}
    assert manifest["parity"]["passed"], manifest["parity"]["min_cosine"]
    assert manifest["parity"]["image"]["passed"] and manifest["image_size"] == 32
    check_runtime(tmp_path / "onnx", model, ["two men play", "a big red car near the tree"])
