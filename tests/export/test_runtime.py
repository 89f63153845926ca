"""The torch-free runtime: imports without torch/open_clip/ray, reproduces the PyTorch evaluation's
preprocessing and outputs, and names bad input."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from ccr_ray import runtime as rt
from ccr_ray.checkpoint import load_checkpoint, tokenizer_of
from ccr_ray.data.preprocess import tokenize_captions
from ccr_ray.data.transforms import ImageTransform
from tests.conftest import REPO

BLOCKER = """
import sys
BLOCKED = ("torch", "open_clip", "ray", "transformers", "torchvision", "pyarrow", "safetensors", "timm")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this process")
sys.meta_path.insert(0, Block())
"""

RUN = """
import json
import shutil
from PIL import Image
from ccr_ray.runtime import Encoder
enc = Encoder(sys.argv[1])
out = {"en": enc.encode_text(["a small red circle"], "en").tolist(),
       "de": enc.encode_text(["ein kleiner roter Kreis", "Ein Stern"], "de").tolist(),
       "image": enc.encode_image([Image.new("RGB", (48, 40), (200, 30, 30))]).tolist()}
third_party = sorted({m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names) - {"__main__"})
print(json.dumps({"out": out, "modules": third_party}))
"""


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          cwd=str(REPO))


def test_runtime_runs_where_torch_cannot_be_imported(mla_export):
    result = run_python(BLOCKER + RUN, mla_export)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    allowed = {"ccr_ray", "numpy", "onnxruntime", "tokenizers", "PIL"}
    extra = {m for m in report["modules"] if m not in allowed and not m.startswith("_")}
    assert not extra, f"the runtime imported {extra}"
    enc = rt.Encoder(mla_export)  # same numbers as in this (torch-importing) process
    assert np.allclose(report["out"]["de"], enc.encode_text(["ein kleiner roter Kreis", "Ein Stern"], "de"), atol=1e-6)
    assert np.allclose(report["out"]["image"], enc.encode_image([Image.new("RGB", (48, 40), (200, 30, 30))]),
                       atol=1e-6)


def test_the_blocker_blocks():
    result = run_python(BLOCKER + "import torch")
    assert result.returncode != 0 and "blocked" in result.stderr


def test_preprocessing_equals_the_pytorch_evaluation(mla_export, mla_ckpt):
    """Pixels: open_clip's own eval transform (torchvision) on odd-sized images; tokens: what
    ccr_ray.eval.retrieval feeds the PyTorch model."""
    from ccr_ray._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    _, meta = load_checkpoint(mla_ckpt)
    enc = rt.Encoder(mla_export)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for w, h in
              [(50, 30), (31, 77), (32, 32), (200, 120)]]
    reference = image_transform_v2(PreprocessCfg(**{k: meta.preprocess[k] for k in
                                                    ("size", "mean", "std", "interpolation", "resize_mode")}),
                                   is_train=False)
    ours = enc.preprocess(images)
    assert np.abs(ours - np.stack([reference(im).numpy() for im in images])).max() < 1e-5
    assert np.array_equal(ours, ImageTransform.from_config(meta.preprocess).batch(images))
    buffer = io.BytesIO()
    images[0].save(buffer, format="PNG")
    assert np.array_equal(enc.preprocess([buffer.getvalue()]), ours[:1])
    texts = ["Ein kleiner blauer Kreis unten", "x", "Oben rechts ein Stern " * 20]
    full = enc.text_inputs(texts, "de", trim=False)
    expected = tokenize_captions(texts, "de", 77, tokenizer_of(mla_ckpt))
    assert np.array_equal(full["input_ids"], expected["text_ids"])
    assert np.array_equal(full["attention_mask"], expected["text_mask"])
    en = ["A small blue circle!", "two &amp; three"]
    assert np.array_equal(enc.text_inputs(en, "en", trim=False)["input_ids"],
                          tokenize_captions(en, "en", 77, None)["text_en_ids"])
    trimmed = enc.text_inputs(["ein Kreis", "ein sehr großer roter Kreis"], "de")
    assert trimmed["input_ids"].shape[1] == int(trimmed["attention_mask"].sum(1).max()) < 77


@pytest.mark.parametrize("kind", ["mla", "dasd"])
def test_encoder_equals_pytorch(kind, request):
    folder, ckpt = request.getfixturevalue(f"{kind}_export"), request.getfixturevalue(f"{kind}_ckpt")
    model, meta = load_checkpoint(ckpt)
    model.eval()
    enc = rt.Encoder(folder)
    texts = ["Ein kleiner blauer Kreis unten", "Kreis", "Ein weißer Hintergrund mit einem kleinen orangefarbenen "
             "Kreis oben rechts und einem kleinen rosa Quadrat oben links", "Stern", "ein Dreieck " * 40]
    for lang in ("de", "zh"):
        inputs = tokenize_captions(texts, lang, 77, tokenizer_of(ckpt))
        with torch.no_grad():
            ref = F.normalize(model.encode_text(torch.from_numpy(inputs["text_ids"]),
                                                torch.from_numpy(inputs["text_mask"]), lang), dim=-1).numpy()
        got = enc.encode_text(texts, lang, batch_size=2)  # several batches of different lengths
        assert got.shape == ref.shape and (got * ref).sum(1).min() > 0.9999
    pil = [Image.new("RGB", (60, 40), c) for c in [(255, 0, 0), (0, 90, 255), (20, 200, 20)]]
    with torch.no_grad():
        pixels = ImageTransform.from_config(meta.preprocess).batch(pil)
        ref = F.normalize(model.encode_image(torch.from_numpy(pixels)), dim=-1).numpy()
    got = enc.encode_image(pil, batch_size=2)
    assert (got * ref).sum(1).min() > 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert enc.encode_text([], "de").shape == (0, 32)


def test_bad_input_is_named(mla_export, tmp_path):
    with pytest.raises(rt.ModelFolderError, match=str(tmp_path)):
        rt.Encoder(tmp_path)
    enc = rt.Encoder(mla_export)
    with pytest.raises(KeyError, match="'fr' is not in this model; it has en, de, zh"):
        enc.encode_text(["bonjour"], "fr")
    with pytest.raises(TypeError, match="images"):
        enc.encode_image([42])
    with pytest.raises(ValueError, match="precision"):
        rt.Encoder(mla_export, precision="fp16")
    with pytest.raises(rt.ModelFolderError, match="no int8 graphs"):
        rt.Encoder(rt_copy(mla_export, tmp_path / "no_int8", drop_int8=True), precision="int8")
    broken = rt_copy(mla_export, tmp_path / "broken")
    (broken / "text_encoder.onnx").unlink()
    with pytest.raises(rt.ModelFolderError, match="text_encoder.onnx"):
        rt.Encoder(broken)
    manifest = json.loads((broken / rt.MANIFEST).read_text())
    manifest["format_version"] = 99
    (broken / rt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(rt.ModelFolderError, match="format_version"):
        rt.Encoder(broken)


def rt_copy(folder, dst, drop_int8=False):
    import shutil

    shutil.copytree(folder, dst)
    if drop_int8:
        manifest = json.loads((dst / rt.MANIFEST).read_text())
        manifest["graphs"] = {k: v for k, v in manifest["graphs"].items() if not k.endswith(rt.INT8_SUFFIX)}
        (dst / rt.MANIFEST).write_text(json.dumps(manifest))
    return dst


def test_a_truncated_onnx_graph_names_the_file(mla_export, tmp_path):
    from ccr_ray.runtime import Encoder, ModelFolderError

    folder = tmp_path / "onnx"
    shutil.copytree(mla_export, folder)
    graph = folder / "text_encoder.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    encoder = Encoder(folder)
    with pytest.raises(ModelFolderError, match="text_encoder.onnx: cannot load the text graph"):
        encoder.encode_text(["ein roter Kreis"], "de")


@pytest.mark.parametrize("text, lang, problem", [
    ("\x00\x00", "en", "empty (only whitespace"),  # CLIP's byte-level BPE would read two byte tokens
    ("\u200b\ufeff", "de", "empty (only whitespace"),
    ("\x07 \x1b", "zh", "empty (only whitespace"),
    ("&nbsp;", "en", "empty once the en tokenizer"),  # CLIP's cleaning unescapes it to a space
    ("[SEP] [PAD]", "de", "empty once the de tokenizer"),  # special tokens typed in: nothing else
    ("ein Kreis \ud800", "de", "not valid Unicode"),  # a lone surrogate (JSON "\ud800", argv bytes)
    ("ein roter Kreis", "de", None),
    ("a\x00circle", "en", None),  # something to read beside the control character
    ("!", "en", None),
])
def test_caption_problem_asks_the_languages_tokenizer(text, lang, problem, mla_export):
    found = rt.Encoder(mla_export).caption_problem(text, lang)
    assert (found is None) if problem is None else (found or "").startswith(problem), found


@pytest.mark.parametrize("query", ["\x00\x00", "\u200b", "[SEP]"])
def test_search_refuses_a_query_with_nothing_to_read(query, mla_export, tmp_path, capsys):
    from tests.export.conftest import load_cli

    # captions are checked before the index loads (this one does not exist): the error is about the query
    code = load_cli("search").main(["--model", mla_export, "--index", str(tmp_path / "none"), "--lang", "de",
                                    "ein roter Kreis", query])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: QUERY 2: empty") and len(err.splitlines()) == 1, err
